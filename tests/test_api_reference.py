"""The API reference page (book/api.md) lists every public name of every public bnlib module.

The rendered page is checked after the build by tests/test_browser.py.
"""

import importlib
import re
from pathlib import Path

import pytest

API_PAGE = Path(__file__).resolve().parent.parent / "book" / "api.md"


@pytest.mark.parametrize(
    "module",
    ["bnlib.functional", "bnlib.nn", "bnlib.inference", "bnlib.distributed", "bnlib.kernels"],
)
def test_api_page_lists_every_public_name(module: str) -> None:
    if module != "bnlib.functional":
        pytest.importorskip("torch")
    names = importlib.import_module(module).__all__
    text = API_PAGE.read_text(encoding="utf-8")
    section = text.split(f".. currentmodule:: {module}", 1)[1].split("```", 1)[0]
    listed = re.findall(r"^   (\w+)$", section, flags=re.MULTILINE)
    assert sorted(listed) == sorted(names), f"autosummary of {module} in book/api.md"
    assert f".. automodule:: {module}" in section
