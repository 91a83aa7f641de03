# The BatchNorm Book.  `make book` builds the HTML book; `make test` runs everything CI runs.
# Both create the virtual environment .venv and install the pinned requirements when needed.

SHELL := /bin/bash
.SHELLFLAGS := -e -o pipefail -c
.DEFAULT_GOAL := help

VENV ?= .venv
PY = $(VENV)/bin/python
JB = $(VENV)/bin/jupyter-book
STAMP = $(VENV)/.stamp-requirements
PORT ?= 8000

# notebooks of the book (nbval and the hygiene test look at book/ only, never at _build/)
NOTEBOOKS := $(shell find book -name '*.ipynb' -not -path '*/.ipynb_checkpoints/*' 2>/dev/null | sort)
# `make execute NB=book/transform.ipynb` re-runs one notebook; default: all of them
NB ?= $(NOTEBOOKS)

NBVAL_CELL_TIMEOUT ?= 600
# nbval as CI runs it: stored outputs compared (never --nbval-lax), kernel = this venv,
# a sanitizer only for what legitimately varies (timings)
NBVAL_FLAGS = --nbval --nbval-current-env --nbval-cell-timeout=$(NBVAL_CELL_TIMEOUT) \
	--nbval-sanitize-with=tests/nbval_sanitize.cfg -p no:cacheprovider
# every page rebuilt (an incremental build would not repeat the warnings of unchanged
# pages), and any Sphinx warning fails the build
BUILD_FLAGS = --all --warningiserror --keep-going

# the browser test drives Debian's chromium through Playwright (`playwright install` cannot
# download browsers here)
CHROMIUM ?= /usr/bin/chromium
export CHROMIUM

TIMINGS = _build/timings.txt
# $(call timed,LABEL,COMMAND): run COMMAND, then record how long it took
timed = t0=$$(date +%s); $(2); line="[time] $(1): $$(( $$(date +%s) - t0 )) s"; \
	echo "$$line"; mkdir -p _build; echo "$$line" >> $(TIMINGS)

# ipykernel's debugger otherwise prints a warning about frozen modules
export PYDEVD_DISABLE_FILE_VALIDATION = 1

.PHONY: help install chromium book test lint unit nbval build browser execute serve clean

help:
	@echo "make book     build the HTML book into _build/html (installs .venv first)"
	@echo "make test     unit tests, nbval over book/, warning-free book build, browser test"
	@echo "make execute  re-run notebooks in place (NB=book/x.ipynb for one)"
	@echo "make serve    serve _build/html on http://127.0.0.1:$(PORT)/"
	@echo "make clean    remove _build and caches (keeps .venv)"

install: $(STAMP)

# idempotent: reinstalls only when requirements.txt or pyproject.toml changed
$(STAMP): requirements.txt pyproject.toml
	@if [ ! -x $(PY) ]; then echo "creating $(VENV)"; python3 -m venv $(VENV); fi
	$(PY) -m pip install --progress-bar off -r requirements.txt
	@touch $@

# Debian's chromium for the browser test: installed when missing and we are root (as in CI);
# otherwise the one command to run is printed and the browser test skips (fails when CI=true)
chromium:
	@if [ -x "$(CHROMIUM)" ]; then \
		echo "chromium: $(CHROMIUM)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's chromium for the browser test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
		echo "No Chromium at $(CHROMIUM); the browser test will skip. Install it with:"; \
		echo "    sudo apt-get install -y chromium"; \
	fi

book: install
	$(JB) build . $(BUILD_FLAGS)
	@echo "The book is at $(CURDIR)/_build/html/index.html (or run: make serve)"

test:
	@rm -f $(TIMINGS)
	@$(call timed,install,$(MAKE) --no-print-directory install)
	@# nbval (two jobs at a time, each one notebook under one CPU setting), the longest
	@# step, runs in the background while chromium's check, lint, the unit tests, the book
	@# build and the browser test run in the foreground: the book renders the stored
	@# outputs, so it does not wait for nbval, and the two cores stay busy. Every step runs
	@# even if an earlier one fails; any failure fails make test. nbval's report comes last.
	@mkdir -p _build; \
	( t0=$$(date +%s); rc=0; $(MAKE) --no-print-directory nbval > _build/nbval.log 2>&1 || rc=$$?; \
	  echo "[time] nbval (beside the steps below): $$(( $$(date +%s) - t0 )) s" >> $(TIMINGS); \
	  exit $$rc ) & nbval_pid=$$!; \
	fail=""; \
	for step in "chromium:chromium" "lint:lint" "unit tests:unit" "book build:build" "browser test:browser"; do \
		t0=$$(date +%s); $(MAKE) --no-print-directory $${step#*:} || fail="$$fail $${step%%:*}"; \
		line="[time] $${step%%:*}: $$(( $$(date +%s) - t0 )) s"; echo "$$line"; echo "$$line" >> $(TIMINGS); \
	done; \
	wait $$nbval_pid || fail="$$fail nbval"; \
	cat _build/nbval.log; \
	if [ -n "$$fail" ]; then echo "make test FAILED:$$fail"; cat $(TIMINGS); exit 1; fi; \
	echo "make test passed."; cat $(TIMINGS)

# ruff over the library, the tests, the tools and the notebooks' code cells; mypy --strict
# over the library
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy --strict -p bnlib

unit: install
	$(PY) -m pytest tests -m "not browser" -p no:cacheprovider

# Another CPU's code paths, emulated on this one: a committed output must not depend on
# which vector kernels ATen picks, on MKL's and oneDNN's instruction sets, or on the CPU
# Numba compiles bnlib's kernels for. `make nbval` checks every notebook under each of
# NBVAL_SETTINGS (by default native and baseline; add avx2 for the third: each setting adds
# 10 to 17 minutes of one-core job time), one (setting, notebook) pair per job, NBVAL_WORKERS
# jobs at a time (tools/nbval_pool.py; one torch thread per notebook),
# e.g. `make nbval NBVAL_SETTINGS="native baseline avx2" NB=book/cnn.ipynb`.
SETTING_native =
SETTING_baseline = ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE ONEDNN_MAX_CPU_ISA=SSE41 NUMBA_CPU_NAME=x86-64
SETTING_avx2 = ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 NUMBA_CPU_NAME=haswell
NBVAL_SETTINGS ?= native baseline

NBVAL_WORKERS ?= 2
nbval: install
	@if [ -z "$(NOTEBOOKS)" ]; then echo "nbval: no notebooks in book/ yet, nothing to check"; exit 0; fi; \
	for s in $(NBVAL_SETTINGS); do case $$s in native|baseline|avx2) ;; \
		*) echo "unknown setting $$s (native, baseline, avx2)"; exit 2;; esac; done; \
	$(PY) tools/nbval_pool.py --workers $(NBVAL_WORKERS) \
		$(foreach s,$(NBVAL_SETTINGS),--setting $(s) "$(SETTING_$(s))") $(NB) -- $(NBVAL_FLAGS)

# Jupyter Book's own command, nothing before it: MathJax is copied by the build itself
# (tools/sphinx_book.py), and the browser test then checks that every chapter's math typesets
build: install
	$(JB) build . $(BUILD_FLAGS)

# the book just built, in headless Chromium; screenshots in _build/screenshots/
browser: install
	rm -rf _build/screenshots
	$(PY) -m pytest tests/test_browser.py -m browser -p no:cacheprovider

execute: install
	$(PY) tools/execute_notebooks.py $(NB)

serve:
	@test -f _build/html/index.html || { echo "no _build/html yet: run make book"; exit 1; }
	$(or $(wildcard $(PY)),python3) -m http.server $(PORT) --bind 127.0.0.1 --directory _build/html

clean:
	rm -rf _build .pytest_cache .hypothesis .ruff_cache
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +
