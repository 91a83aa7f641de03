"""`make nbval` checks the book under other CPUs' code paths: the settings exist, reach the
libraries, and are what CI runs by default (issue 20: outputs that hold on any x86-64 CPU)."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAKEFILE = (ROOT / "Makefile").read_text(encoding="utf-8")


def setting(name: str) -> dict[str, str]:
    line = re.search(rf"^SETTING_{name} =(.*)$", MAKEFILE, re.M)
    assert line, f"no SETTING_{name} in the Makefile"
    return dict(pair.split("=", 1) for pair in line.group(1).split())


def test_make_nbval_runs_native_and_the_baseline_emulation_by_default():
    default = re.search(r"^NBVAL_SETTINGS \?= (.*)$", MAKEFILE, re.M)
    assert default and set(default.group(1).split()) >= {"native", "baseline"}
    assert setting("native") == {}
    assert setting("baseline") == {
        "ATEN_CPU_CAPABILITY": "default",
        "MKL_CBWR": "COMPATIBLE",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
        "NUMBA_CPU_NAME": "x86-64",
    }
    assert setting("avx2") == {
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_CBWR": "AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "NUMBA_CPU_NAME": "haswell",
    }


PROBE = (
    "import torch, numba; "
    "print(torch.backends.cpu.get_cpu_capability(), numba.config.CPU_NAME)"
)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 code paths")
@pytest.mark.parametrize(
    ("name", "aten", "numba_cpu"), [("baseline", "DEFAULT", "x86-64"), ("avx2", "AVX2", "haswell")]
)
def test_each_emulation_reaches_aten_and_numba(name, aten, numba_cpu):
    """A setting that a library ignored would make the check pass vacuously."""
    if name == "avx2" and "avx2" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("this CPU has no AVX2")
    env = {**os.environ, **setting(name)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [aten, numba_cpu]
