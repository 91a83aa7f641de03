"""Every notebook in book/ passes the hygiene rules of tests/hygiene.py, and the rules bite."""

import json
import re
from pathlib import Path

import pytest
from hygiene import check_notebook

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "notebooks"


def book_notebooks() -> list[Path]:
    return sorted(
        p for p in (ROOT / "book").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts
    )


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    "path", book_notebooks(), ids=lambda p: str(p.relative_to(ROOT))
)  # no notebooks yet: pytest reports one skipped test ("got empty parameter set")
def test_book_notebook_is_clean(path: Path) -> None:
    problems = check_notebook(load(path))
    assert not problems, f"{path.relative_to(ROOT)}:\n  " + "\n  ".join(problems)


def test_clean_fixture_is_accepted() -> None:
    # executed top to bottom, an empty unexecuted cell, an intended error tagged raises-exception
    assert check_notebook(load(FIXTURES / "clean.ipynb")) == []


@pytest.mark.parametrize(
    ("fixture", "message"),
    [
        ("unexecuted", "cell 3: never executed"),
        ("out_of_order", "cell 2: execution count 2, expected 1"),
        ("error", "cell 2: stored error ZeroDivisionError"),
        ("stderr", "cell 2: output on stderr"),
        ("memory_address", "cell 2: memory address 'at 0x7f3a2c1b4e90'"),
        ("local_path", "cell 2: absolute local path '/work/'"),
        ("svg", "cell 2: SVG output"),
        ("code_path", "cell 2: names ATEN_CPU_CAPABILITY"),
    ],
)
def test_broken_fixture_is_rejected(fixture: str, message: str) -> None:
    problems = check_notebook(load(FIXTURES / f"{fixture}.ipynb"))
    assert any(p.startswith(message) for p in problems), problems


def test_fixtures_do_not_sit_in_book() -> None:
    assert not any("fixtures" in p.parts for p in book_notebooks())


CITE = re.compile(r"\{cite(?::[a-z]+)?\}`([^`]+)`")
BIB_KEY = re.compile(r"^@\w+\{([^,\s]+),", re.MULTILINE)


def cited_keys(text: str) -> set[str]:
    text = re.sub(r"``.*?``", "", text)  # a role shown as code (``{cite}`key` ``) cites nothing
    return {k.strip() for m in CITE.finditer(text) for k in m.group(1).split(",")}


def test_every_cited_key_is_in_the_bibliography() -> None:
    """A {cite} key missing from references.bib fails the (slow) book build; this finds it in
    a second, and names the page."""
    keys = set(BIB_KEY.findall((ROOT / "references.bib").read_text(encoding="utf-8")))
    pages = [*book_notebooks(), *sorted((ROOT / "book").glob("*.md"))]
    missing = {}
    for page in pages:
        text = page.read_text(encoding="utf-8")
        if page.suffix == ".ipynb":
            text = "\n".join("".join(c["source"]) for c in load(page)["cells"])
        unknown = cited_keys(text) - keys
        if unknown:
            missing[str(page.relative_to(ROOT))] = sorted(unknown)
    assert not missing, f"cited but not in references.bib: {missing}"


def test_cited_keys_reads_every_form() -> None:
    text = "see {cite}`a2000x` and {cite:p}`b2001y, c2002z` and {cite:t}`d`, not `` {cite}`e` ``"
    assert cited_keys(text) == {"a2000x", "b2001y", "c2002z", "d"}
