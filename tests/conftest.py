"""Shared pytest fixtures. Keep this file small; put test-specific helpers in their own modules."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (the folder holding _config.yml)."""
    return ROOT
