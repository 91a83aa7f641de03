"""nbval, run as `make test` runs it, really compares stored outputs: a changed number fails."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
FIXTURE = TESTS / "fixtures" / "nbval" / "one_plus_one.ipynb"
# the flags of the Makefile's nbval stage (never --nbval-lax: it does not compare outputs)
NBVAL_FLAGS = [
    "--nbval",
    "--nbval-current-env",
    "--nbval-cell-timeout=120",
    f"--nbval-sanitize-with={TESTS / 'nbval_sanitize.cfg'}",
    "-p",
    "no:cacheprovider",
]


def run_nbval(notebook: Path) -> subprocess.CompletedProcess:
    # run in the notebook's own temporary folder: no ini file, conftest or cache of the repo
    return subprocess.run(
        [sys.executable, "-m", "pytest", *NBVAL_FLAGS, notebook.name],
        cwd=notebook.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_nbval_passes_a_notebook_whose_stored_output_is_right(tmp_path: Path) -> None:
    notebook = tmp_path / FIXTURE.name
    shutil.copy(FIXTURE, notebook)
    result = run_nbval(notebook)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout, result.stdout


def test_nbval_fails_a_notebook_with_a_changed_stored_number(tmp_path: Path) -> None:
    nb = json.loads(FIXTURE.read_text(encoding="utf-8"))
    cell = next(c for c in nb["cells"] if c["cell_type"] == "code")
    assert cell["outputs"][0]["text"] == ["2\n"]
    cell["outputs"][0]["text"] = ["3\n"]
    notebook = tmp_path / "changed.ipynb"
    notebook.write_text(json.dumps(nb, indent=1), encoding="utf-8")
    result = run_nbval(notebook)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 failed" in result.stdout, result.stdout
    assert "Cell outputs differ" in result.stdout, result.stdout
