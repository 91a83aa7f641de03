"""The package as pip builds it: licence, metadata, extras, readme, and what the sdist ships.

Built with setuptools' PEP 517 backend in a subprocess (no network, no build isolation), into
a temporary folder; the repository gains nothing but the ignored ``bnlib.egg-info``/``build``.
"""

from __future__ import annotations

import email
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("dist")
    code = textwrap.dedent(
        f"""
        from setuptools import build_meta
        wheel = build_meta.build_wheel({str(out)!r})
        sdist = build_meta.build_sdist({str(out)!r})
        print("DISTS", wheel, sdist)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SetuptoolsDeprecationWarning" not in done.stderr, done.stderr[-3000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("DISTS "))
    wheel_name, sdist_name = line.split()[1:]
    return out / wheel_name, out / sdist_name


def _metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return email.message_from_bytes(zf.read(name))


def test_license_is_declared_and_shipped(dists: tuple[Path, Path]) -> None:
    wheel, _ = dists
    meta = _metadata(wheel)
    assert meta["License-Expression"] == "MIT"
    assert meta["License-File"] == "LICENSE"
    with zipfile.ZipFile(wheel) as zf:
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in zf.namelist())
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_metadata_names_authors_urls_classifiers_and_extras(dists: tuple[Path, Path]) -> None:
    meta = _metadata(dists[0])
    assert meta["Author"]
    urls = meta.get_all("Project-URL") or []
    assert any(u.startswith("Repository, https://github.com/") for u in urls)
    classifiers = meta.get_all("Classifier") or []
    assert "Typing :: Typed" in classifiers
    assert any(c.startswith("Programming Language :: Python :: 3.1") for c in classifiers)
    assert set(meta.get_all("Provides-Extra") or []) >= {"torch", "plot"}
    requires = meta.get_all("Requires-Dist") or []
    assert any(r.startswith("torch") and 'extra == "torch"' in r for r in requires)
    assert any(r.startswith("matplotlib") and 'extra == "plot"' in r for r in requires)


def test_long_description_is_the_library_readme(dists: tuple[Path, Path]) -> None:
    body = _metadata(dists[0]).get_payload()
    assert isinstance(body, str)
    assert body.startswith("# bnlib")
    assert 'pip install "bnlib[torch]"' in body
    assert "make book" not in body  # the book's README is not the package's


def test_sdist_ships_the_library_not_half_the_tests(dists: tuple[Path, Path]) -> None:
    with tarfile.open(dists[1]) as tf:
        names = [n.split("/", 1)[1] for n in tf.getnames() if "/" in n]
    assert "LICENSE" in names and "bnlib/functional.py" in names and "bnlib/py.typed" in names
    assert not [n for n in names if n.startswith(("tests/", "book/", "tools/"))]


def test_build_and_dist_are_ignored() -> None:
    ignored = subprocess.run(
        ["git", "check-ignore", "build/", "dist/", "bnlib.egg-info/"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert ignored.stdout.split() == ["build/", "dist/", "bnlib.egg-info/"]
