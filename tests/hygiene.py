"""Notebook hygiene: what nbval cannot see.

nbval re-runs a notebook and compares each cell's new outputs with the stored ones, but a
cell with *no* stored output passes whatever it prints, so an unexecuted notebook passes
nbval. ``check_notebook`` rejects, for a notebook given as a dict (``json.load`` /
``nbformat.read``):

* a code cell with source that was never executed (``execution_count`` is None);
* execution counts that are not 1, 2, 3, ... in cell order (not run top to bottom in
  one fresh kernel);
* a stored error output, unless the cell is tagged ``raises-exception``;
* any output on stderr (warnings; their ``/tmp/ipykernel_<pid>/`` paths change every run);
* a memory address (`` at 0x7f...``) in an output (changes every run);
* an absolute path of this machine (``/tmp/``, ``/root/``, ``/home/``, ``/work/``) in an
  output (differs on every other machine);
* an SVG output (Matplotlib's SVG carries random ids that nbval compares: keep PNG);
* a code cell that names one of the variables that choose a CPU code path (``CODE_PATH_VARS``:
  ATen's, MKL's, oneDNN's, Numba's): ``make nbval`` sets them to emulate other CPUs, and a
  notebook that set them itself would defeat that check.

Each problem is one string that starts with the cell's number (1-based, all cells).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
LOCAL_PATH = re.compile(r"(?<![\w.~])/(?:tmp|root|home|work)/")
CODE_PATH_VARS = (
    "ATEN_CPU_CAPABILITY",
    "MKL_CBWR",
    "MKL_ENABLE_INSTRUCTIONS",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "NUMBA_CPU_NAME",
    "NUMBA_CPU_FEATURES",
)


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def _output_texts(output: dict) -> Iterator[str]:
    kind = output.get("output_type")
    if kind == "stream":
        yield _text(output.get("text", ""))
    elif kind in ("execute_result", "display_data"):
        for mime, value in output.get("data", {}).items():
            if mime.startswith("text/") or mime.endswith("json"):
                yield _text(value)
    elif kind == "error":
        yield "\n".join(output.get("traceback", []))
        yield _text(output.get("evalue", ""))


def check_notebook(nb: dict) -> list[str]:
    """Return the hygiene problems of notebook ``nb`` (an empty list when it is clean)."""
    problems: list[str] = []
    expected = 1
    order_reported = False
    for number, cell in enumerate(nb.get("cells", []), start=1):
        if cell.get("cell_type") != "code":
            continue
        where = f"cell {number}"
        source = _text(cell.get("source", ""))
        tags = cell.get("metadata", {}).get("tags", [])
        count = cell.get("execution_count")
        for name in CODE_PATH_VARS:
            if name in source:
                problems.append(
                    f"{where}: names {name}, a variable that picks the CPU code path "
                    "(make nbval sets it to emulate other CPUs; a notebook must not)"
                )
        if count is None:
            if source.strip():
                problems.append(f"{where}: never executed (execution_count is None)")
        else:
            if count != expected and not order_reported:
                problems.append(
                    f"{where}: execution count {count}, expected {expected}: execution counts "
                    "are not 1, 2, 3, ... (run the notebook top to bottom in a fresh kernel)"
                )
                order_reported = True
            expected = count + 1
        for output in cell.get("outputs", []):
            kind = output.get("output_type")
            if kind == "error" and "raises-exception" not in tags:
                problems.append(
                    f"{where}: stored error {output.get('ename', '')} "
                    "(tag the cell raises-exception if the error is intended)"
                )
            if kind == "stream" and output.get("name") == "stderr":
                first = _text(output.get("text", "")).strip().splitlines()[:1]
                problems.append(f"{where}: output on stderr: {first[0] if first else ''!r}")
            if "image/svg+xml" in output.get("data", {}):
                problems.append(f"{where}: SVG output (random ids; use PNG figures)")
            for text in _output_texts(output):
                match = ADDRESS.search(text)
                if match:
                    problems.append(f"{where}: memory address {match.group(0).strip()!r} in output")
                match = LOCAL_PATH.search(text)
                if match:
                    problems.append(f"{where}: absolute local path {match.group(0)!r} in output")
    return problems
