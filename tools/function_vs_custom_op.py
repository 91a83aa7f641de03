"""Why bnlib.nn's training path is an ``autograd.Function`` and not a ``torch.library.custom_op``.

The same seam code (``bnlib.nn._train_forward`` / ``_train_backward``) is wrapped both
ways; the script prints the best-of-N time per call (forward, forward+backward) on one
thread, and whether forward-mode AD gives the right tangent through each wrapper.

    .venv/bin/python tools/function_vs_custom_op.py

Timings are best-of-N wall-clock times on a machine that may be shared: compare the two
rows of one run, not runs on different machines.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

import bnlib.nn as bnn


@torch.library.custom_op("bnlib_probe::train_forward", mutates_args=())
def op_forward(x: Tensor, w: Tensor, b: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    y, mean, var = bnn._train_forward(x, w, b, eps)
    return y, mean, var


@op_forward.register_fake
def _(x: Tensor, w: Tensor, b: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    c = x.shape[1]
    return torch.empty_like(x), x.new_empty(c), x.new_empty(c)


@torch.library.custom_op("bnlib_probe::train_backward", mutates_args=())
def op_backward(
    dy: Tensor, x: Tensor, w: Tensor, mean: Tensor, var: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = bnn._train_backward(dy, x, w, mean, var, eps)
    assert dw is not None and db is not None
    return dx, dw, db


def _setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
    x, w, _, eps = inputs
    ctx.save_for_backward(x, w, output[1], output[2])
    ctx.eps = eps


def _backward(ctx: Any, dy: Tensor, _dmean: Any, _dvar: Any) -> tuple[Any, ...]:
    x, w, mean, var = ctx.saved_tensors
    dx, dw, db = op_backward(dy, x, w, mean, var, ctx.eps)
    return dx, dw, db, None


op_forward.register_autograd(_backward, setup_context=_setup)

WRAPPERS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "autograd.Function": lambda x, w, b: bnn.BatchNormFunction.apply(x, w, b, 1e-5)[0],
    "custom_op": lambda x, w, b: op_forward(x, w, b, 1e-5)[0],
}


def best_times(fn: Callable[..., Tensor], shape: tuple[int, ...], reps: int) -> tuple[float, float]:
    x = torch.randn(shape).requires_grad_()
    dy = torch.randn(shape)
    w = torch.ones(shape[1], requires_grad=True)
    b = torch.zeros(shape[1], requires_grad=True)
    best_f = best_fb = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        y = fn(x, w, b)
        t1 = time.perf_counter()
        y.backward(dy)
        t2 = time.perf_counter()
        best_f, best_fb = min(best_f, t1 - t0), min(best_fb, t2 - t0)
    return best_f * 1e6, best_fb * 1e6


def forward_ad_errors() -> dict[str, str]:
    """Max |tangent - reference| for a unit-scale problem, reference: torch.nn's BN."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    t = torch.randn(x.shape, generator=g, dtype=torch.float64)
    w, b = torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)

    def reference(x: Tensor) -> Tensor:
        return torch.nn.functional.batch_norm(x, None, None, w, b, training=True)

    ref = torch.func.jvp(reference, (x,), (t,))[1]
    out = {}
    for name, fn in WRAPPERS.items():
        tangent = torch.func.jvp(lambda x, fn=fn: fn(x, w, b), (x,), (t,))[1]
        out[name] = f"{(tangent - ref).abs().max().item():.1e}"
    return out


def main() -> None:
    torch.set_num_threads(1)
    errors = forward_ad_errors()
    print("| wrapper | shape | forward (us) | forward+backward (us) | jvp error |")
    print("|---|---|---|---|---|")
    for shape, reps in (((8, 16, 8, 8), 400), ((32, 64, 28, 28), 15)):
        best: dict[str, tuple[float, float]] = {}
        for _ in range(3):  # interleaved rounds, best of all
            for name, fn in WRAPPERS.items():
                f, fb = best_times(fn, shape, reps)
                old = best.get(name, (float("inf"), float("inf")))
                best[name] = (min(old[0], f), min(old[1], fb))
        for name, (f, fb) in best.items():
            print(f"| {name} | {shape} | {f:.0f} | {fb:.0f} | {errors[name]} |")


if __name__ == "__main__":
    main()
