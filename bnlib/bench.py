"""Benchmark bnlib's BatchNorm against torch's native kernel, with a roofline.

Run ``python -m bnlib.bench`` (``--help`` for the options). For each shape and
memory layout, in float32 on the CPU, it times

- ``train``: forward + backward of a training-mode BN (module call and
  ``backward``), and
- ``eval``: an inference-mode forward,

for three implementations: ``bnlib.nn`` (the module, whatever path it takes by
default), ``bnlib.kernels`` (the fused kernels called directly, without
autograd) and ``torch.nn`` (native, the reference). The implementations and a
plain tensor copy take turns inside every repeat (interleaved), so a slow phase
of a shared machine hits all of them alike. Columns:

- ``median ms``: the median time of one call (``q1_ms``, ``q3_ms``: the quartiles
  over the repeats, the spread);
- ``x native``: the median over repeats of the per-repeat ratio to native;
- ``% roofline``: the time a memory-bound kernel would need, as a percentage of
  the measured time. The bandwidth comes from the copy ``y.copy_(x)`` of a tensor
  of the same size in the same run (one read and one write per copy), timed with
  the same estimator (median over the same repeats). The
  training step needs at least 8 input-sized passes over memory (forward: read
  ``x`` for the statistics, read ``x`` and write ``y``; backward: read ``dy`` and
  ``x`` for the two sums, read both and write ``dx``), inference 2 (read ``x``,
  write ``y``). The copy writes half the bytes it moves, the training step a
  quarter; writes usually cost more than reads, so a fused training step can
  reach about 100 % or slightly more of this roofline.
- ``faults``: minor page faults per call: pages the memory allocator (glibc's malloc)
  had returned to the system when a large tensor was freed and takes back for the next one;
  the system zeroes each such page, which on some machines (virtual machines especially)
  costs microseconds per 4 KiB page and can outweigh the computation. How often it happens
  depends on the order of allocations and frees, so it differs between implementations and
  even between neighbouring rows; a row whose implementations differ in faults compares
  allocators as much as kernels.
- ``copy_GBps``: the bandwidth of the interleaved copy; ``reference_GBps``: the
  memory bandwidth of the run, :func:`copy_bandwidth` of a tensor larger than
  the caches, with the same estimator. ``consistent`` is true when the case's
  copy is no more than :data:`AGREE` times slower than the reference (a cached
  copy may be faster, never that much slower) and its quartiles lie within a
  factor :data:`AGREE` of each other. A case that fails it ran while the
  machine's speed changed (another process, frequency scaling, a thread pool
  that had not gone to sleep): its ratios and roofline percentages must not be
  used to judge a target. The table marks such rows with ``!``.

A second table times **whole loops** (:data:`LOOPS`): a small ResNet on 32x32 images and an
MLP on flattened 28x28 images, synthetic data, each as a ``torch.nn`` model and as
:func:`bnlib.nn.convert` of a copy of it (same weights). ``train`` is one optimisation step
(forward, cross-entropy, backward, SGD with momentum), ``eval`` one inference forward; the two
models take turns in every repeat, and ``x native`` is again the median per-repeat ratio.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

try:
    import resource
except ImportError:  # not on Windows: no fault counts there
    resource = None  # type: ignore[assignment]

from . import kernels
from . import nn as bnn

#: (shape, channels_last) cases of the default run.
CASES: list[tuple[tuple[int, ...], bool]] = [
    ((64, 64, 32, 32), False),
    ((64, 64, 32, 32), True),
    ((256, 1024), False),
    ((32, 256, 14, 14), False),
    ((32, 256, 14, 14), True),
]
#: Input-sized passes over memory that a kernel cannot avoid.
PASSES = {"train": 8, "eval": 2}
NATIVE = "torch.nn (native)"
#: Largest factor by which a case's copy may be slower than the reference, or its quartiles
#: apart, before the case counts as inconsistent.
AGREE = 2.0
#: Elements of the reference copy: 64 MiB of float32, more than the last-level cache one core
#: sees on common CPUs, so that it measures the memory's bandwidth.
REFERENCE_NUMEL = 2**24


def _bn_classes(rank: int) -> tuple[type, type]:
    ours = {2: bnn.BatchNorm1d, 3: bnn.BatchNorm1d, 4: bnn.BatchNorm2d, 5: bnn.BatchNorm3d}
    theirs = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}
    theirs[5] = torch.nn.BatchNorm3d
    return ours[rank], theirs[rank]


def _input(shape: tuple[int, ...], channels_last: bool, seed: int) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if channels_last:
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    return x


def _steps(shape: tuple[int, ...], channels_last: bool, mode: str) -> dict[str, Callable[[], Any]]:
    """The timed callables of one case, keyed by implementation name."""
    x = _input(shape, channels_last, 0)
    dy = _input(shape, channels_last, 1)
    C = shape[1]
    Ours, Theirs = _bn_classes(len(shape))
    ours, native = Ours(C), Theirs(C)
    out = torch.empty_like(x)
    steps: dict[str, Callable[[], Any]] = {}
    if mode == "train":
        xg = x.clone().requires_grad_()

        def module_step(module: torch.nn.Module) -> Callable[[], Any]:
            def step() -> None:
                xg.grad = None
                module(xg).backward(dy)

            return step

        steps["bnlib.nn"] = module_step(ours)
        if kernels.supports(x):
            w, b = ours.weight.detach(), ours.bias.detach()

            def fused_step() -> None:
                # y stays alive through the backward pass, as in a network
                y, mean, var = kernels.train_forward(x, w, b, 1e-5)
                dx, _, _ = kernels.train_backward(dy, x, w, mean, var, 1e-5)
                del y, dx

            steps["bnlib.kernels"] = fused_step
        steps[NATIVE] = module_step(native)
    else:
        ours.eval()
        native.eval()

        def eval_step(module: torch.nn.Module) -> Callable[[], Any]:
            def step() -> None:
                with torch.no_grad():
                    module(x)

            return step

        steps["bnlib.nn"] = eval_step(ours)
        if kernels.supports(x):
            rm, rv, w, b = ours.running_mean, ours.running_var, ours.weight, ours.bias

            def fused_eval() -> None:
                kernels.eval_forward(x, rm, rv, w.detach(), b.detach(), 1e-5)

            steps["bnlib.kernels"] = fused_eval
        steps[NATIVE] = eval_step(native)
    steps["copy"] = lambda: out.copy_(x)
    return steps


# ---------------------------------------------------------------------------
# whole training loops: torch.nn models against bnlib.nn.convert of the same models
# ---------------------------------------------------------------------------


class _Block(torch.nn.Module):
    """A ResNet basic block: two 3x3 conv-BN pairs and a shortcut (1x1 conv-BN when the
    shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        conv = torch.nn.Conv2d
        self.conv1 = conv(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(c_out)
        self.conv2 = conv(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(c_out)
        self.shortcut = torch.nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = torch.nn.Sequential(
                conv(c_in, c_out, 1, stride, bias=False), torch.nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


def _resnet() -> torch.nn.Module:
    """A small ResNet for 32x32 images: 3 stages of one block (32, 64, 128 channels), 8 BN."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, 1, 1, bias=False),
        torch.nn.BatchNorm2d(32),
        torch.nn.ReLU(),
        _Block(32, 32, 1),
        _Block(32, 64, 2),
        _Block(64, 128, 2),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(128, 10),
    )


def _mlp() -> torch.nn.Module:
    """An MLP on flattened 28x28 images: 784-1024-1024-10 with BN after each hidden layer."""
    return torch.nn.Sequential(
        torch.nn.Linear(784, 1024),
        torch.nn.BatchNorm1d(1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 1024),
        torch.nn.BatchNorm1d(1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 10),
    )


#: name: (model factory, input shape) of the whole-loop rows.
LOOPS: dict[str, tuple[Callable[[], torch.nn.Module], tuple[int, ...]]] = {
    "resnet 32x3x32x32": (_resnet, (32, 3, 32, 32)),
    "mlp 256x784": (_mlp, (256, 784)),
}


def loop_models(name: str, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(torch_model, bnlib_model)``: the same initial weights, the second converted by
    :func:`bnlib.nn.convert`."""
    factory, _ = LOOPS[name]
    torch.manual_seed(seed)
    theirs = factory()
    ours = copy.deepcopy(theirs)
    bnn.convert(ours)
    return theirs, ours


def _loop_steps(name: str, mode: str) -> dict[str, Callable[[], Any]]:
    """One training step (forward, cross-entropy, backward, SGD with momentum) or one
    inference forward, for the torch.nn model and its bnlib conversion."""
    _, shape = LOOPS[name]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen)
    target = torch.randint(0, 10, (shape[0],), generator=gen)
    theirs, ours = loop_models(name)
    steps: dict[str, Callable[[], Any]] = {}
    for label, model in (("bnlib.nn", ours), (NATIVE, theirs)):
        if mode == "train":
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

            def train_step(model: torch.nn.Module = model, opt: Any = opt) -> None:
                opt.zero_grad(set_to_none=True)
                loss: Any = torch.nn.functional.cross_entropy(model(x), target)
                loss.backward()
                opt.step()

            steps[label] = train_step
        else:
            model.eval()

            def eval_step(model: torch.nn.Module = model) -> None:
                with torch.no_grad():
                    model(x)

            steps[label] = eval_step
    return steps


def bench_loop(name: str, mode: str, repeats: int, warmup: int = 3) -> list[dict[str, Any]]:
    """Time the whole-loop case ``name`` (a key of :data:`LOOPS`); one row per implementation.

    The two models take turns in every repeat (interleaved); ``x_native`` is the median of the
    per-repeat ratios. No roofline: a loop is mostly convolutions and matrix products.
    """
    steps = _loop_steps(name, mode)
    times, faults, inner = _interleaved(steps, repeats, warmup, 20e-3, 50)
    rows = []
    for k, ts in times.items():
        q1, q3 = _quartiles(ts)
        ratios = [t / n for t, n in zip(ts, times[NATIVE], strict=True)]
        rows.append(
            {
                "loop": name,
                "mode": mode,
                "implementation": k,
                "median_ms": statistics.median(ts) * 1e3,
                "q1_ms": q1 * 1e3,
                "q3_ms": q3 * 1e3,
                "x_native": statistics.median(ratios),
                "faults_per_call": _per_call(faults[k], repeats * inner),
                "consistent": q3 <= AGREE * q1,
            }
        )
    return rows


def _interleaved(
    steps: dict[str, Callable[[], Any]], repeats: int, warmup: int, sample_s: float, most: int
) -> tuple[dict[str, list[float]], dict[str, int], int]:
    """Warm every step up, then time them in turns: ``repeats`` samples each of ``inner``
    calls (enough for about ``sample_s`` seconds with the slowest step, at most ``most``).
    Returns the per-call times, the page faults of all samples, and ``inner``."""
    for step in steps.values():  # compile, allocate, fault pages in
        for _ in range(warmup):
            step()
    slowest = max(_time(step, 1) for step in steps.values())
    inner = max(1, min(most, round(sample_s / max(slowest, 1e-7))))
    times: dict[str, list[float]] = {name: [] for name in steps}
    faults = dict.fromkeys(steps, 0)
    for _ in range(repeats):
        for name, step in steps.items():
            f0 = _faults()
            times[name].append(_time(step, inner))
            faults[name] += _faults() - f0
    return times, faults, inner


def _time(step: Callable[[], Any], inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        step()
    return (time.perf_counter() - t0) / inner


def _faults() -> int:
    """Minor page faults of this process so far: each is a page of memory the allocator had
    handed back to the system and takes again, which the kernel must zero."""
    if resource is None:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _per_call(faults: int, calls: int) -> float:
    """Faults per call (NaN where the platform does not count them)."""
    return math.nan if resource is None else faults / calls


def copy_bandwidth(numel: int = REFERENCE_NUMEL, repeats: int = 15) -> dict[str, float]:
    """Bandwidth of ``y.copy_(x)`` for float32 tensors of ``numel`` values, in GB/s.

    One read and one write per value; the median over ``repeats`` calls, and the
    quartiles (``q1_GBps`` is the slower one), at torch's current thread count.
    """
    x = torch.randn(numel)
    out = torch.empty_like(x)
    out.copy_(x)  # fault the pages in
    ts = [_time(lambda: out.copy_(x), 1) for _ in range(repeats)]
    q1, q3 = _quartiles(ts)
    nbytes = 2 * numel * 4
    return {
        "GBps": nbytes / statistics.median(ts) / 1e9,
        "q1_GBps": nbytes / q3 / 1e9,
        "q3_GBps": nbytes / q1 / 1e9,
    }


def bench_case(
    shape: tuple[int, ...],
    channels_last: bool,
    mode: str,
    repeats: int,
    warmup: int = 2,
    reference_GBps: float | None = None,
) -> list[dict[str, Any]]:
    """Time one case; one result row per implementation (see the module docstring).

    ``reference_GBps`` is the run's memory bandwidth; by default
    :func:`copy_bandwidth` measures it first.
    """
    if reference_GBps is None:
        reference_GBps = copy_bandwidth(repeats=max(repeats, 5))["GBps"]
    steps = _steps(shape, channels_last, mode)
    times, faults, inner = _interleaved(steps, repeats, warmup, 2e-3, 100)
    rows = []
    passes = PASSES[mode]
    nbytes = torch.Size(shape).numel() * 4
    copy_GBps = 2 * nbytes / statistics.median(times["copy"]) / 1e9
    q1_copy, q3_copy = _quartiles(times["copy"])
    consistent = copy_GBps * AGREE >= reference_GBps and q3_copy <= AGREE * q1_copy
    for name, ts in times.items():
        if name == "copy":
            continue
        ratios = [t / n for t, n in zip(ts, times[NATIVE], strict=True)]
        # roofline time of one call = passes * (time of one pass); a copy makes 2 passes
        roof = [passes * c / 2 / t for t, c in zip(ts, times["copy"], strict=True)]
        q1, q3 = _quartiles(ts)
        rows.append(
            {
                "shape": list(shape),
                "layout": "channels_last" if channels_last else "contiguous",
                "mode": mode,
                "implementation": name,
                "median_ms": statistics.median(ts) * 1e3,
                "q1_ms": q1 * 1e3,
                "q3_ms": q3 * 1e3,
                "x_native": statistics.median(ratios),
                "pct_roofline": 100 * statistics.median(roof),
                "copy_GBps": copy_GBps,
                "reference_GBps": reference_GBps,
                "faults_per_call": _per_call(faults[name], repeats * inner),
                "consistent": consistent,
            }
        )
    return rows


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    """First and third quartile (both the value itself for a single sample)."""
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"shape must look like 64x64x32x32, got {text!r}"
        ) from None
    if not 2 <= len(shape) <= 5 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"shape needs 2 to 5 positive sizes, got {text!r}")
    return shape


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m bnlib.bench``."""
    p = argparse.ArgumentParser(
        prog="python -m bnlib.bench",
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--repeats", type=_positive, default=15, help="timed repeats per case (>= 1)")
    p.add_argument(
        "--threads",
        type=_positive,
        default=torch.get_num_threads(),
        help="CPU threads for torch and the kernels (>= 1)",
    )
    p.add_argument(
        "--shape",
        type=_shape,
        action="append",
        default=None,
        help="a shape such as 64x64x32x32, repeatable; 4-D and 5-D shapes also run "
        "channels_last (default: the issue's three shapes)",
    )
    p.add_argument("--mode", choices=["train", "eval", "both"], default="both", help="what to time")
    p.add_argument(
        "--loops",
        choices=["all", "none", *LOOPS],
        default="all",
        help="whole training loops to time (torch.nn model against bnlib.nn.convert of it)",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.shape:
        cases = [(s, False) for s in args.shape] + [(s, True) for s in args.shape if len(s) >= 4]
    else:
        cases = CASES
    modes = ["train", "eval"] if args.mode == "both" else [args.mode]
    reference = copy_bandwidth(repeats=max(args.repeats, 5))
    rows = []
    for mode in modes:
        for shape, channels_last in cases:
            rows.extend(bench_case(shape, channels_last, mode, args.repeats, 2, reference["GBps"]))
    names = list(LOOPS) if args.loops == "all" else [] if args.loops == "none" else [args.loops]
    loops = [r for mode in modes for name in names for r in bench_loop(name, mode, args.repeats)]
    info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "dtype": "float32",
        "kernels": kernels.supports(torch.zeros(2, 2)),
    }
    if args.json:
        json.dump({"info": info, "results": rows, "loops": loops}, sys.stdout, indent=1)
        print()
        return rows + loops
    print(", ".join(f"{k} {v}" for k, v in info.items()))
    print(f"roofline: train {PASSES['train']} passes, eval {PASSES['eval']} passes over the input")
    print(
        f"memory bandwidth (copy of {REFERENCE_NUMEL * 4 >> 20} MiB): {reference['GBps']:.1f} GB/s,"
        f" quartiles {reference['q1_GBps']:.1f}-{reference['q3_GBps']:.1f}"
    )
    head = (
        f"{'mode':5} {'shape':17} {'layout':13} {'implementation':17} "
        f"{'median ms':>9} {'quartiles ms':>15} {'x native':>8} {'% roofline':>10} {'copy GB/s':>9}"
        f" {'faults':>6}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        spread = f"{r['q1_ms']:.3f}-{r['q3_ms']:.3f}"
        print(
            f"{r['mode']:5} {'x'.join(map(str, r['shape'])):17} {r['layout']:13} "
            f"{r['implementation']:17} {r['median_ms']:9.3f} {spread:>15} {r['x_native']:8.2f} "
            f"{r['pct_roofline']:10.0f} {r['copy_GBps']:9.1f} {r['faults_per_call']:6.0f}"
            + ("" if r["consistent"] else " !")
        )
    if not all(r["consistent"] for r in rows):
        print(
            f"! this case's copy ran more than {AGREE:g}x slower than the memory bandwidth above,"
            f" or its quartiles differ by more than {AGREE:g}x: the machine changed speed during"
            " the measurement; do not judge a target from these rows, rerun on a quiet machine"
        )
    if loops:
        print()
        head = (
            f"{'mode':5} {'whole loop':31} {'implementation':17} "
            f"{'median ms':>9} {'quartiles ms':>15} {'x native':>8} {'faults':>6}"
        )
        print(head)
        print("-" * len(head))
        for r in loops:
            spread = f"{r['q1_ms']:.2f}-{r['q3_ms']:.2f}"
            print(
                f"{r['mode']:5} {r['loop']:31} {r['implementation']:17} {r['median_ms']:9.2f}"
                f" {spread:>15} {r['x_native']:8.2f} {r['faults_per_call']:6.0f}"
                + ("" if r["consistent"] else " !")
            )
        if not all(r["consistent"] for r in loops):
            print(f"! quartiles more than {AGREE:g}x apart: the machine changed speed; rerun")
    return rows + loops


if __name__ == "__main__":
    main()
