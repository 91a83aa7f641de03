"""Benchmark: training-mode forward + backward, bnlib against torch's native BatchNorm.

Run ``python -m bnlib.bench`` (``--help`` for options). For each shape it times

- ``bnlib.functional`` on NumPy arrays (forward + compact backward),
- ``bnlib.nn`` on torch tensors (module forward + ``backward``), eager and
  with :func:`bnlib.nn.use_compiled`,
- ``torch.nn`` native BatchNorm (the reference),

in float32 on the CPU, and on CUDA too where a GPU is present. The
implementations take turns inside each repeat (interleaved), so a slow phase
of the machine hits all of them alike; the table reports medians and, in the
last column, the ratio to native.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from . import functional as F
from . import nn as bnn

SHAPES = [(64, 64, 32, 32), (256, 1024)]


def _modules(shape, device):
    C = shape[1]
    ours = {2: bnn.BatchNorm1d, 3: bnn.BatchNorm1d, 4: bnn.BatchNorm2d, 5: bnn.BatchNorm3d}
    theirs = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
              5: torch.nn.BatchNorm3d}
    return ours[len(shape)](C, device=device), theirs[len(shape)](C, device=device)


def _cases(shape, device: str, compiled: bool) -> dict[str, Callable[[], None]]:
    gen = torch.Generator().manual_seed(0)
    x_cpu = torch.randn(shape, generator=gen)
    dy_cpu = torch.randn(shape, generator=gen)
    x = x_cpu.clone().to(device).requires_grad_()
    dy = dy_cpu.to(device)
    ours, native = _modules(shape, device)

    def run_module(module):
        def step():
            x.grad = None
            module(x).backward(dy)
        return step

    cases = {}
    if device == "cpu":
        xn, dyn = x_cpu.numpy(), dy_cpu.numpy()
        gamma, beta = np.ones(shape[1], np.float32), np.zeros(shape[1], np.float32)

        def numpy_step():
            _, cache = F.batch_norm_forward(xn, gamma, beta)
            F.batch_norm_backward(dyn, cache)

        cases["bnlib.functional (NumPy)"] = numpy_step
    cases["bnlib.nn (torch, eager)"] = run_module(ours)
    if compiled:
        ours_compiled = _modules(shape, device)[0]
        eager_step = run_module(ours_compiled)

        def compiled_step():
            bnn.use_compiled(True)
            try:
                eager_step()
            finally:
                bnn.use_compiled(False)

        cases["bnlib.nn (torch.compile)"] = compiled_step
    cases["torch.nn (native)"] = run_module(native)
    return cases


def bench(
    shape, device: str, repeats: int, compiled: bool = True, warmup: int = 3
) -> dict[str, float]:
    """Median seconds per forward+backward of each implementation, interleaved.

    The warm-up rounds absorb torch.compile's compilation.
    """
    cases = _cases(shape, device, compiled)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for i in range(warmup + repeats):
        for name, step in cases.items():
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed repeats per case")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile variant (it needs a C++ compiler)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, numpy {np.__version__}, "
          f"torch threads {torch.get_num_threads()}, repeats {args.repeats}, float32")
    if "cuda" in devices:
        print(f"cuda: {torch.cuda.get_device_name()}")
    header = f"{'device':6} {'shape':18} {'implementation':27} {'median ms':>10} {'x native':>9}"
    print(header)
    print("-" * len(header))
    for device in devices:
        for shape in SHAPES:
            result = bench(shape, device, args.repeats, compiled=not args.no_compile)
            native = result["torch.nn (native)"]
            for name, sec in result.items():
                print(f"{device:6} {str(shape):18} {name:27} {sec * 1e3:10.3f} {sec / native:9.2f}")


if __name__ == "__main__":
    main()
