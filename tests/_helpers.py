"""Small helpers shared by the bnlib tests (imported as ``from _helpers import ...``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def cuda_param(value):
    """A pytest parameter that runs where CUDA exists and is skipped elsewhere."""
    return pytest.param(
        value,
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ],
    )


#: Parametrize a test over devices with ``@pytest.mark.parametrize("device", DEVICES)``.
DEVICES = ["cpu", cuda_param("cuda")]

#: Parity tolerances with torch.nn, per dtype.
TOL = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-10},
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
}


def assert_close(actual, expected, dtype=torch.float64, msg: str = "") -> None:
    """``torch.testing.assert_close`` with the parity tolerance of ``dtype``; None == None."""
    if expected is None or actual is None:
        assert actual is None and expected is None, msg
        return
    torch.testing.assert_close(
        actual, expected, **TOL[dtype], msg=lambda m: f"{msg}: {m}" if msg else m
    )


def state_snapshot(module: torch.nn.Module) -> dict:
    """A deep copy of the state dict plus the gradients, for before/after comparisons."""
    snap = {k: v.detach().clone() for k, v in module.state_dict().items()}
    for name, p in module.named_parameters():
        snap["grad:" + name] = None if p.grad is None else p.grad.detach().clone()
    return snap


def assert_same_state(before: dict, after: dict) -> None:
    """Exact (bitwise) equality of two :func:`state_snapshot` results."""
    assert before.keys() == after.keys()
    for k in before:
        a, b = before[k], after[k]
        if a is None or b is None:
            assert a is None and b is None, k
        else:
            assert a.dtype == b.dtype and a.shape == b.shape, k
            assert torch.equal(a, b), k


def to_numpy(a) -> np.ndarray:
    """NumPy copy of a NumPy array or torch tensor (any device)."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
        if a.dtype == torch.bfloat16:  # NumPy has no bfloat16; float32 holds it exactly
            a = a.float()
        return a.numpy()
    return np.asarray(a)
