"""Where bnlib.nn's time goes: its layers' calls, one by one, against the kernels and native.

For each shape (float32, contiguous, torch's current thread count) this script times, taking
turns inside every repeat (interleaved) so that a slow phase of the machine hits all alike:

- ``kernels fwd`` / ``kernels bwd``: ``bnlib.kernels.train_forward`` / ``train_backward``
  called directly: the fused kernels and their thin tensor wrapper;
- ``Function fwd``: the autograd Function the module uses (``_EagerBatchNormFunction.apply``)
  with grad enabled: kernels plus autograd's bookkeeping;
- ``module fwd``: the module call (checks, Function, running statistics);
- ``module step`` / ``native step``: forward and ``backward`` through the module, bnlib's and
  ``torch.nn``'s;
- ``module eval`` / ``kernels eval`` / ``native eval``: inference forwards.

It prints the median time of each (microseconds), the minor page faults per call (memory
the allocator handed back to the system and takes again: the kernel zeroes every such page,
which can cost more than the computation), and the overheads: module step minus the
kernels' forward and backward, and module eval minus kernels eval.
Usage: ``python tools/profile_nn.py [--repeats 31] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from bnlib import kernels
from bnlib import nn as bnn

SHAPES = [(256, 1024), (32, 256, 14, 14), (64, 64, 32, 32)]


def _cases(shape: tuple[int, ...]) -> dict[str, Callable[[], Any]]:
    C = shape[1]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    dy = torch.randn(shape, generator=gen)
    xg = x.clone().requires_grad_()
    ours = (bnn.BatchNorm1d if len(shape) == 2 else bnn.BatchNorm2d)(C)
    native = (torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(C)
    ours_eval = (bnn.BatchNorm1d if len(shape) == 2 else bnn.BatchNorm2d)(C).eval()
    native_eval = (torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(C).eval()
    w, b = ours.weight.detach(), ours.bias.detach()
    _, mean, var = kernels.train_forward(x, w, b, 1e-5)
    rm, rv = ours_eval.running_mean, ours_eval.running_var

    def step(module: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            xg.grad = None
            module(xg).backward(dy)

        return run

    def no_grad(f: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return f()

        return run

    return {
        "kernels fwd": lambda: kernels.train_forward(x, w, b, 1e-5),
        "kernels bwd": lambda: kernels.train_backward(dy, x, w, mean, var, 1e-5),
        "Function fwd": lambda: bnn._EagerBatchNormFunction.apply(
            xg, ours.weight, ours.bias, 1e-5
        ),
        "module fwd": lambda: ours(xg),
        "module step": step(ours),
        "native step": step(native),
        "module eval": no_grad(lambda: ours_eval(x)),
        "kernels eval": lambda: kernels.eval_forward(x, rm, rv, w, b, 1e-5),
        "native eval": no_grad(lambda: native_eval(x)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--repeats", type=int, default=31)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, median microseconds per call over {args.repeats}")
    for shape in SHAPES:
        cases = _cases(shape)
        for f in cases.values():  # compile, allocate
            for _ in range(3):
                f()
        times: dict[str, list[float]] = {k: [] for k in cases}
        faults = dict.fromkeys(cases, 0)
        for _ in range(args.repeats):
            for k, f in cases.items():
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t0 = time.perf_counter()
                for _ in range(5):
                    f()
                times[k].append((time.perf_counter() - t0) / 5 * 1e6)
                faults[k] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        med = {k: statistics.median(v) for k, v in times.items()}
        print("x".join(map(str, shape)))
        pages = torch.Size(shape).numel() * 4 // 4096
        print(f"  {'':13} {'us':>9} {'page faults per call':>21} (one tensor: {pages} pages)")
        for k, v in med.items():
            print(f"  {k:13} {v:9.1f} {faults[k] / (5 * args.repeats):21.0f}")
        step_over = med["module step"] - med["kernels fwd"] - med["kernels bwd"]
        print(f"  overhead of the module step over its kernels: {step_over:.1f}")
        eval_over = med["module eval"] - med["kernels eval"]
        print(f"  overhead of module eval over kernels eval: {eval_over:.1f}")


if __name__ == "__main__":
    main()
