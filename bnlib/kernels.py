"""Fused CPU kernels for Batch Normalization, written in Python and compiled by Numba.

The three functions of the kernel seam of :mod:`bnlib.nn` (same signatures as
its eager versions):

- :func:`train_forward` ``(x, weight, bias, eps) -> (y, mean, var)``: the batch
  statistics in **one pass over memory**, then the normalisation in a second
  pass (read ``x``, write ``y``);
- :func:`train_backward` ``(dy, x, weight, mean, var, eps) -> (dx, dweight, dbias)``:
  one pass reads ``dy`` and ``x`` for :math:`\\sum g` and :math:`\\sum g\\hat x`,
  a second reads them again and writes ``dx``;
- :func:`eval_forward` ``(x, running_mean, running_var, weight, bias, eps) -> y``:
  one pass.

**Memory layouts.** A contiguous ``(N, C, *spatial)`` tensor (NCL, NCHW, NCDHW)
is a stack of ``N * C`` *rows*, each the ``L`` values of one sample and one
channel, contiguous in memory: the *planar* kernels work row by row. A
channels-last tensor (NHWC memory), a contiguous ``(N, C)`` matrix and an
``(N, C, 1)`` tensor are an ``(M, C)`` matrix with the channels interleaved
along each row: the *interleaved* kernels work on blocks of consecutive rows.
Any other stride pattern is left to the eager path (:func:`supports` says no).

**Statistics, stable in one pass.** Each short block of data (a row, or a slice
of a long row, or a block of interleaved rows; at most :data:`BLOCK` values per
channel, so it stays in the L1 cache) gets the *corrected two-pass* mean and
sum of squared deviations, computed in the input's dtype: a first mean
:math:`\\bar x`, then :math:`\\sum(x-\\bar x)` and :math:`\\sum (x-\\bar x)^2`.
Reading the block the second time costs no memory traffic. The blocks are then
combined in float64 by Chan, Golub and LeVeque's exact merge,

.. math::

    n = n_a + n_b,\\quad \\delta = \\mu_b - \\mu_a,\\quad
    \\mu = \\mu_a + \\delta\\,\\frac{n_b}{n},\\quad
    M_2 = M_{2,a} + M_{2,b} + \\delta^2\\,\\frac{n_a n_b}{n},

so no unshifted :math:`E[x^2] - E[x]^2` ever appears.

**Determinism.** Work is split into pieces whose boundaries depend on the
tensor's shape only (rows, blocks, and :data:`PARTS` groups of blocks), never
on the number of threads, and partial results are merged in a fixed order:
the results are bitwise identical for every thread count. The number of threads
follows ``torch.get_num_threads()``.

**Precision.** float32 and float64 are computed in their own dtype inside a
block and in float64 across blocks. float16 and bfloat16 are converted to
float32 by torch first (Numba has no bfloat16) and the output converted back,
as torch computes them. The normalisation subtracts the float64 mean as two
float32 numbers (``hi + lo``), so ``x - mean`` stays exact when the mean is
large against the spread (``x = 1e4 + N(0, 1)``).

**Other devices.** Given CUDA tensors, the three functions run the same formulas
as torch code compiled by ``torch.compile`` (Inductor fuses each pass into one
kernel); :func:`supports` stays CPU-only, so :mod:`bnlib.nn` uses them on CPU only.

If Numba cannot be imported, :func:`supports` is False, one warning says so,
and :mod:`bnlib.nn` keeps its eager path. Compiled machine code is cached on
disk (``cache=True``: in ``__pycache__`` beside this file, or in
``NUMBA_CACHE_DIR``), so only the first process after installation compiles.
"""

from __future__ import annotations

import importlib
import math
import threading
import types
import warnings
from collections.abc import Callable
from typing import Any, TypeVar, cast

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "BLOCK",
    "PARTS",
    "ROW_BLOCK",
    "available",
    "enabled",
    "eval_forward",
    "set_enabled",
    "supports",
    "train_backward",
    "train_forward",
]

#: Values per channel in one block: small enough to stay in the L1 cache.
BLOCK = 4096
#: Interleaved layout: values in one block of rows (all channels): it stays in the L2 cache.
ROW_BLOCK = 1 << 15
#: Interleaved layout: the rows are split into at most this many groups of blocks,
#: reduced in parallel and merged in order (a number independent of the thread count).
PARTS = 64

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_NATIVE = (torch.float32, torch.float64)

numba: Any  # the module, or None where it cannot be imported
_IMPORT_ERROR: Exception | None = None
try:
    numba = importlib.import_module("numba")
except Exception as error:  # pragma: no cover - exercised by monkeypatching in the tests
    numba, _IMPORT_ERROR = None, error
njit: Any = None if numba is None else numba.njit
prange = range if numba is None else numba.prange

# Threads: Numba picks its threading layer (OpenMP here). Measured with torch's own OpenMP
# pool in the same process: on a quiet 2-core machine the OpenMP layer ran these kernels
# about 1.5-2x faster than Numba's "workqueue" pool (it wakes up faster); on an
# oversubscribed machine the two spinning OpenMP pools took the cores from each other and
# "workqueue" was faster. Set NUMBA_THREADING_LAYER=workqueue for the latter case.
# The lock lets one caller at a time into the pool (required by "workqueue").
_lock = threading.Lock()

_enabled = True
_warned = False


def _warn_once(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"bnlib.kernels: the fused CPU kernels are unavailable ({reason}); "
            "bnlib.nn falls back to its eager torch path (same results, slower).",
            RuntimeWarning,
            stacklevel=3,
        )


def available() -> bool:
    """Whether the Numba backend loaded (warns once when it did not)."""
    if numba is None:
        _warn_once(f"numba could not be imported: {_IMPORT_ERROR!r}")
        return False
    return True


def enabled() -> bool:
    """Whether :mod:`bnlib.nn` may use the fused kernels (switch with :func:`set_enabled`)."""
    return _enabled


def set_enabled(flag: bool) -> None:
    """Allow (True, the default) or forbid (False) the fused kernels in :mod:`bnlib.nn`."""
    global _enabled
    if not isinstance(flag, bool):
        raise TypeError(f"set_enabled expects a bool, got {type(flag).__name__}")
    _enabled = flag


def _layout(x: Tensor) -> str | None:
    """``"planar"``, ``"interleaved"`` or None (a stride pattern the kernels do not take)."""
    if x.is_contiguous():
        spatial = math.prod(x.shape[2:])
        return "interleaved" if spatial == 1 else "planar"
    if torch.movedim(x, 1, -1).is_contiguous():
        return "interleaved"
    return None


def supports(x: Tensor) -> bool:
    """True where the fused kernels apply to ``x``.

    That is: the kernels are enabled and Numba loaded; ``x`` is a plain CPU
    tensor (not a subclass such as a fake or batched tensor, not under a
    ``torch.func`` transform) of rank 2 to 5 with float16, bfloat16, float32 or
    float64 values, a non-empty batch, and a contiguous or channels-last layout.
    """
    if not _enabled or type(x) not in (Tensor, torch.nn.Parameter):
        return False
    if x.device.type != "cpu" or x.dtype not in _NATIVE + _LOW_PRECISION:
        return False
    if not 2 <= x.dim() <= 5 or x.numel() == 0 or x.layout != torch.strided:
        return False
    if _functorch_active():
        return False
    return _layout(x) is not None and available()


def _functorch_active() -> bool:
    """Whether a torch.func transform (vmap, grad, jvp, ...) is running."""
    level = getattr(torch._C._functorch, "maybe_current_level", None)
    return level is not None and level() is not None


# ---------------------------------------------------------------------------
# The kernels. Plain loops over NumPy arrays; Numba compiles them to vectorised,
# multithreaded machine code. ``prange`` marks the loops that run in parallel.
# ---------------------------------------------------------------------------

# Reductions may be reassociated (so LLVM vectorises the sums, in an order fixed at
# compile time); element-wise code keeps IEEE semantics, so (x - hi) - lo stays as written.
_REDUCE = {"reassoc", "nsz", "contract"}
#: The kernels' arrays: NumPy arrays (typed loosely: Numba, not mypy, checks the loops).
Array = Any


_F = TypeVar("_F", bound=Callable[..., Any])


def _jit(**options: Any) -> Callable[[_F], _F]:
    """``numba.njit`` with an on-disk cache (without one where no directory is writable)."""

    def decorate(f: _F) -> _F:
        if numba is None:
            return f
        try:
            return cast(_F, njit(cache=True, **options)(f))
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return cast(_F, njit(**options)(f))

    return decorate


@_jit(fastmath=_REDUCE)
def block_stats(v: Array) -> tuple[float, float]:
    """Mean and sum of squared deviations of a short 1-D block, corrected two-pass.

    Both sums run in ``v``'s dtype over a block that sits in the cache; the
    correction ``d = sum(v - first_mean)`` repairs the rounding of the first mean.
    """
    n = v.dtype.type(v.size)
    total = v.dtype.type(0)
    for i in range(v.size):
        total += v[i]
    first_mean = total / n
    d = v.dtype.type(0)
    d2 = v.dtype.type(0)
    for i in range(v.size):
        dev = v[i] - first_mean
        d += dev
        d2 += dev * dev
    d64 = float(d)
    return float(first_mean) + d64 / v.size, float(d2) - d64 * d64 / v.size


@_jit()
def chan_merge(
    n_a: float, mean_a: float, m2_a: float, n_b: float, mean_b: float, m2_b: float
) -> tuple[float, float, float]:
    """Merge the (count, mean, M2) of two groups exactly (Chan, Golub & LeVeque)."""
    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n)
    m2 = m2_a + m2_b + delta * delta * (n_a * n_b / n)
    return n, mean, m2


@_jit()
def row_stats(row: Array) -> tuple[float, float]:
    """(mean, M2) of one contiguous row: block by block, merged in order."""
    count, mean, m2 = 0.0, 0.0, 0.0
    for start in range(0, row.size, BLOCK):
        block = row[start : start + BLOCK]
        block_mean, block_m2 = block_stats(block)
        count, mean, m2 = chan_merge(count, mean, m2, float(block.size), block_mean, block_m2)
    return mean, m2


@_jit(parallel=True)
def planar_stats(x: Array) -> tuple[Array, Array]:
    """Per-channel mean and biased variance of x viewed as (N, C, L): one pass."""
    N, C, L = x.shape
    row_mean = np.empty((N, C))
    row_m2 = np.empty((N, C))
    for r in prange(N * C):  # every row independently, in parallel
        n, c = r // C, r % C
        row_mean[n, c], row_m2[n, c] = row_stats(x[n, c])
    mean = np.empty(C)
    var = np.empty(C)
    for c in range(C):  # merge the N rows of each channel, in order
        count, mu, m2 = 0.0, 0.0, 0.0
        for n in range(N):
            count, mu, m2 = chan_merge(count, mu, m2, float(L), row_mean[n, c], row_m2[n, c])
        mean[c] = mu
        var[c] = m2 / count
    return mean, var


@_jit(parallel=True)
def planar_normalise(x: Array, hi: Array, lo: Array, scale: Array, shift: Array, y: Array) -> None:
    """y = ((x - hi) - lo) * scale + shift per channel, for x viewed as (N, C, L)."""
    N, C, L = x.shape
    for r in prange(N * C):
        n, c = r // C, r % C
        h, l, s, b = hi[c], lo[c], scale[c], shift[c]
        for i in range(L):
            y[n, c, i] = ((x[n, c, i] - h) - l) * s + b


@_jit(fastmath=_REDUCE)
def _block_grad_sums(g: Array, x: Array, hi: float) -> tuple[float, float, float]:
    """sum g, sum g * (x - hi) and sum (x - hi) over a short block, in the block's dtype."""
    sum_g = x.dtype.type(0)
    sum_gx = x.dtype.type(0)
    sum_x = x.dtype.type(0)
    for i in range(x.size):
        xc = x[i] - hi
        sum_g += g[i]
        sum_gx += g[i] * xc
        sum_x += xc
    return float(sum_g), float(sum_gx), float(sum_x)


@_jit()
def _row_grad_sums(g: Array, x: Array, hi: float) -> tuple[float, float, float]:
    """The three sums over one row: block by block, added in float64."""
    sum_g, sum_gx, sum_x = 0.0, 0.0, 0.0
    for start in range(0, x.size, BLOCK):
        bg, bgx, bx = _block_grad_sums(g[start : start + BLOCK], x[start : start + BLOCK], hi)
        sum_g += bg
        sum_gx += bgx
        sum_x += bx
    return sum_g, sum_gx, sum_x


@_jit(parallel=True)
def planar_grad_sums(g: Array, x: Array, hi: Array) -> tuple[Array, Array, Array]:
    """Per-channel sums of g, g * (x - hi) and x - hi for g, x viewed as (N, C, L): one pass."""
    N, C, L = x.shape
    sums = np.empty((3, N, C))
    for r in prange(N * C):
        n, c = r // C, r % C
        sums[0, n, c], sums[1, n, c], sums[2, n, c] = _row_grad_sums(g[n, c], x[n, c], hi[c])
    total = sums.sum(axis=1)  # over the N rows of each channel, in order
    return total[0], total[1], total[2]


@_jit(parallel=True)
def planar_grad_input(
    g: Array, x: Array, hi: Array, a: Array, b: Array, c0: Array, dx: Array
) -> None:
    """dx = a * g + b * (x - hi) + c0 per channel, for g, x viewed as (N, C, L)."""
    N, C, L = x.shape
    for r in prange(N * C):
        n, c = r // C, r % C
        ac, bc, cc, h = a[c], b[c], c0[c], hi[c]
        for i in range(L):
            dx[n, c, i] = ac * g[n, c, i] + bc * (x[n, c, i] - h) + cc


def _parts(M: int, C: int) -> tuple[int, int]:
    """Interleaved layout: (rows per block, blocks per part), from the shape only."""
    rows = max(1, ROW_BLOCK // C)
    blocks = -(-M // rows)
    return rows, -(-blocks // PARTS)


@_jit(fastmath=_REDUCE)
def _interleaved_block_stats(x: Array, acc: Array, dev: Array, dev2: Array) -> None:
    """Corrected two-pass sums of a block of rows of an (rows, C) matrix, per channel."""
    rows, C = x.shape
    acc[:] = 0
    dev[:] = 0
    dev2[:] = 0
    for r in range(rows):
        for c in range(C):
            acc[c] += x[r, c]
    acc /= x.dtype.type(rows)  # the first mean
    for r in range(rows):
        for c in range(C):
            d = x[r, c] - acc[c]
            dev[c] += d
            dev2[c] += d * d


@_jit(parallel=True)
def interleaved_stats(x: Array, rows_per_block: int, blocks_per_part: int) -> tuple[Array, Array]:
    """Per-channel mean and biased variance of an (M, C) matrix: one pass.

    Each part (a fixed group of blocks) runs on one thread and merges its blocks
    in order; the parts are then merged in order.
    """
    M, C = x.shape
    rows_per_part = rows_per_block * blocks_per_part
    n_parts = -(-M // rows_per_part)
    part_count = np.zeros(n_parts)
    part_mean = np.zeros((n_parts, C))
    part_m2 = np.zeros((n_parts, C))
    for p in prange(n_parts):
        acc = np.empty(C, x.dtype)
        dev = np.empty(C, x.dtype)
        dev2 = np.empty(C, x.dtype)
        for start in range(p * rows_per_part, min(M, (p + 1) * rows_per_part), rows_per_block):
            block = x[start : min(M, start + rows_per_block)]
            k = float(block.shape[0])
            _interleaved_block_stats(block, acc, dev, dev2)
            # chan_merge for every channel at once: the counts are the same for all
            n = part_count[p] + k
            f_b, f_ab = k / n, part_count[p] * k / n
            for c in range(C):
                d = float(dev[c])
                block_mean = float(acc[c]) + d / k
                block_m2 = float(dev2[c]) - d * d / k
                delta = block_mean - part_mean[p, c]
                part_mean[p, c] += delta * f_b
                part_m2[p, c] += block_m2 + delta * delta * f_ab
            part_count[p] = n
    mean = np.zeros(C)
    m2 = np.zeros(C)
    count = 0.0
    for p in range(n_parts):
        for c in range(C):
            _, mean[c], m2[c] = chan_merge(
                count, mean[c], m2[c], part_count[p], part_mean[p, c], part_m2[p, c]
            )
        count += part_count[p]
    return mean, m2 / count


@_jit(parallel=True)
def interleaved_normalise(
    x: Array, hi: Array, lo: Array, scale: Array, shift: Array, y: Array, rows_per_block: int
) -> None:
    """y = ((x - hi) - lo) * scale + shift per channel, for an (M, C) matrix."""
    M, C = x.shape
    for blk in prange(-(-M // rows_per_block)):
        for r in range(blk * rows_per_block, min(M, (blk + 1) * rows_per_block)):
            for c in range(C):
                y[r, c] = ((x[r, c] - hi[c]) - lo[c]) * scale[c] + shift[c]


@_jit(parallel=True)
def interleaved_grad_sums(
    g: Array, x: Array, hi: Array, rows_per_block: int, blocks_per_part: int
) -> tuple[Array, Array, Array]:
    """Per-channel sums of g, g * (x - hi) and x - hi of (M, C) matrices: one pass, fixed order."""
    M, C = x.shape
    rows_per_part = rows_per_block * blocks_per_part
    n_parts = -(-M // rows_per_part)
    part = np.zeros((n_parts, 3, C))
    for p in prange(n_parts):
        bg = np.empty(C, x.dtype)
        bgx = np.empty(C, x.dtype)
        bx = np.empty(C, x.dtype)
        for start in range(p * rows_per_part, min(M, (p + 1) * rows_per_part), rows_per_block):
            bg[:] = 0
            bgx[:] = 0
            bx[:] = 0
            for r in range(start, min(M, start + rows_per_block)):
                for c in range(C):
                    xc = x[r, c] - hi[c]
                    bg[c] += g[r, c]
                    bgx[c] += g[r, c] * xc
                    bx[c] += xc
            for c in range(C):
                part[p, 0, c] += bg[c]
                part[p, 1, c] += bgx[c]
                part[p, 2, c] += bx[c]
    total = np.zeros((3, C))
    for p in range(n_parts):  # in order
        total += part[p]
    return total[0], total[1], total[2]


@_jit(parallel=True)
def interleaved_grad_input(
    g: Array, x: Array, hi: Array, a: Array, b: Array, c0: Array, dx: Array, rows_per_block: int
) -> None:
    """dx = a * g + b * (x - hi) + c0 per channel, for (M, C) matrices."""
    M, C = x.shape
    for blk in prange(-(-M // rows_per_block)):
        for r in range(blk * rows_per_block, min(M, (blk + 1) * rows_per_block)):
            for c in range(C):
                dx[r, c] = a[c] * g[r, c] + b[c] * (x[r, c] - hi[c]) + c0[c]


# ---------------------------------------------------------------------------
# The seam: torch tensors in and out. Per-channel arithmetic in float64 NumPy.
# ---------------------------------------------------------------------------


#: Below this many values one thread does the work: starting the thread pool costs more
#: (measured with the OpenMP layer: 2^15 beat 2^19 on a (256, 1024) batch).
SMALL = 1 << 15


def _set_threads(x: Tensor) -> int:
    """Use torch's thread count (one thread for small tensors). Results do not depend on it."""
    assert numba is not None
    threads = 1 if x.numel() < SMALL else torch.get_num_threads()
    threads = max(1, min(threads, int(numba.config.NUMBA_NUM_THREADS)))
    numba.set_num_threads(threads)
    return threads


_serial_twins: dict[Any, Any] = {}


def _choose(kernel: _F, threads: int) -> _F:
    """``kernel`` for several threads; for one, its *serial twin*: the same Python
    function compiled without threading, which saves the thread pool's start-up
    (tens of microseconds per call) and gives the same bits (same loops, same order)."""
    if threads > 1:
        return kernel
    if kernel not in _serial_twins:
        f = kernel.py_func  # type: ignore[attr-defined]
        twin = types.FunctionType(f.__code__, f.__globals__, f.__name__ + "_serial")
        twin.__qualname__ = f.__qualname__ + "_serial"  # its own on-disk cache entry
        twin.__doc__ = f.__doc__
        _serial_twins[kernel] = _jit()(twin)
    return cast(_F, _serial_twins[kernel])


def _view(t: Tensor, layout: str) -> np.ndarray:
    """The (N, C, L) or (M, C) NumPy view of ``t``'s memory (no copy)."""
    if layout == "planar":
        return t.detach().reshape(t.shape[0], t.shape[1], -1).numpy()
    return torch.movedim(t.detach(), 1, -1).reshape(-1, t.shape[1]).numpy()


def _vector(v: Tensor | None, C: int, fill: float) -> np.ndarray:
    """A per-channel parameter as a float64 NumPy vector (``fill`` where it is None)."""
    if v is None:
        return np.full(C, fill)
    return v.detach().to(device="cpu", dtype=torch.float64).reshape(C).numpy()


def _compute(x: Tensor) -> Tensor:
    """``x`` in the dtype the kernels compute in (float32 for float16/bfloat16)."""
    return x.float() if x.dtype in _LOW_PRECISION else x


def _split(mean: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """A float64 vector as hi + lo in ``dtype``: hi the rounded value, lo the remainder."""
    hi = mean.astype(dtype)
    return hi, (mean - hi).astype(dtype)


def _normalise(
    xc: Tensor, layout: str, mean: np.ndarray, scale: np.ndarray, shift: np.ndarray, threads: int
) -> Tensor:
    xv = _view(xc, layout)
    y = torch.empty_like(xc)  # same memory format as x
    yv = _view(y, layout)
    dt = xv.dtype
    hi, lo = _split(mean, dt)
    if layout == "planar":
        _choose(planar_normalise, threads)(xv, hi, lo, scale.astype(dt), shift.astype(dt), yv)
    else:
        rows, _ = _parts(*xv.shape)
        _choose(interleaved_normalise, threads)(
            xv, hi, lo, scale.astype(dt), shift.astype(dt), yv, rows
        )
    return y


def train_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BN: ``(y, mean, var)``, the batch mean and *biased* variance.

    Two passes over memory: the statistics, then the normalisation.
    ``mean`` and ``var`` have shape ``(C,)`` in the compute dtype.
    """
    if x.device.type != "cpu":
        return _device_train_forward(x, weight, bias, eps)
    with _lock:  # one caller at a time in Numba's thread pool
        threads = _set_threads(x)
        layout = _layout(x)
        assert layout is not None, "unsupported layout: check kernels.supports(x) first"
        xc = _compute(x)
        xv = _view(xc, layout)
        C = x.shape[1]
        if layout == "planar":
            mean, var = _choose(planar_stats, threads)(xv)
        else:
            mean, var = _choose(interleaved_stats, threads)(xv, *_parts(*xv.shape))
        inv_std = 1.0 / np.sqrt(var + eps)
        scale = _vector(weight, C, 1.0) * inv_std
        y = _normalise(xc, layout, mean, scale, _vector(bias, C, 0.0), threads)
        return (
            y.to(x.dtype),
            torch.from_numpy(mean).to(xc.dtype),
            torch.from_numpy(var).to(xc.dtype),
        )


def train_backward(
    dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, var: Tensor, eps: float
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Gradients of training-mode BN by the closed form, in two passes over memory.

    With :math:`s = \\gamma/\\sqrt{\\sigma^2+\\epsilon}` and the sums
    :math:`\\sum g` (``dbias``) and :math:`\\sum g\\hat x` (``dweight``) of the
    first pass, the second pass evaluates
    :math:`dx = s\\,g - \\frac{s}{m}\\big(\\sum g + \\hat x \\sum g\\hat x\\big)`
    as ``a * g + b * (x - mean) + c`` with per-channel ``a, b, c``. The first
    pass also sums ``x - mean``, which corrects a ``mean`` rounded to float32
    (as in the corrected two-pass algorithm), so large offsets cost no accuracy.
    ``dweight`` is None when ``weight`` is None; ``dbias`` is always returned
    (the caller drops it when there is no bias).
    """
    if x.device.type != "cpu":
        return _device_train_backward(dy, x, weight, mean, var, eps)
    with _lock:  # one caller at a time in Numba's thread pool
        threads = _set_threads(x)
        layout = _layout(x)
        assert layout is not None, "unsupported layout: check kernels.supports(x) first"
        xc = _compute(x)
        g = _compute(dy).to(xc.dtype)
        if g.stride() != xc.stride():  # dy in another memory format: match x's
            g = torch.empty_like(xc).copy_(g)
        xv, gv = _view(xc, layout), _view(g, layout)
        C = x.shape[1]
        m = x.numel() // C
        hi = _vector(mean, C, 0.0).astype(xv.dtype)
        if layout == "planar":
            sum_g, sum_gx, sum_x = _choose(planar_grad_sums, threads)(gv, xv, hi)
        else:
            sum_g, sum_gx, sum_x = _choose(interleaved_grad_sums, threads)(
                gv, xv, hi, *_parts(*xv.shape)
            )
        # the given mean may be rounded (float32): the exact one is hi + delta
        delta = sum_x / m
        sum_gxc = sum_gx - delta * sum_g  # sum g * (x - mean)
        inv_std = 1.0 / np.sqrt(_vector(var, C, 0.0) + eps)
        dweight = inv_std * sum_gxc  # sum g * x_hat
        a = _vector(weight, C, 1.0) * inv_std
        b = -a * inv_std * dweight / m
        c0 = -a * sum_g / m - b * delta  # b * (x - mean) = b * (x - hi) - b * delta
        dx = torch.empty_like(xc)
        dxv = _view(dx, layout)
        dt = xv.dtype
        if layout == "planar":
            _choose(planar_grad_input, threads)(
                gv, xv, hi, a.astype(dt), b.astype(dt), c0.astype(dt), dxv
            )
        else:
            rows, _ = _parts(*xv.shape)
            _choose(interleaved_grad_input, threads)(
                gv, xv, hi, a.astype(dt), b.astype(dt), c0.astype(dt), dxv, rows
            )
        pdtype = weight.dtype if weight is not None else dy.dtype
        dw = None if weight is None else torch.from_numpy(dweight).to(pdtype)
        return dx.to(dy.dtype), dw, torch.from_numpy(sum_g).to(pdtype)


def eval_forward(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """Inference, one pass: ``(x - mean) * weight / sqrt(var + eps) + bias``, given statistics."""
    if x.device.type != "cpu":
        return _device_eval_forward(x, running_mean, running_var, weight, bias, eps)
    with _lock:  # one caller at a time in Numba's thread pool
        threads = _set_threads(x)
        layout = _layout(x)
        assert layout is not None, "unsupported layout: check kernels.supports(x) first"
        C = x.shape[1]
        scale = _vector(weight, C, 1.0) / np.sqrt(_vector(running_var, C, 0.0) + eps)
        mean = _vector(running_mean, C, 0.0)
        y = _normalise(_compute(x), layout, mean, scale, _vector(bias, C, 0.0), threads)
        return y.to(x.dtype)


# ---------------------------------------------------------------------------
# Other devices (CUDA): the same formulas as torch code, fused by torch.compile
# (Inductor turns each reduction into one Welford/sum kernel over memory and each
# element-wise line into one more). Compiled on first use, one graph per shape.
# ---------------------------------------------------------------------------


def _axes(x: Tensor) -> tuple[int, ...]:
    return (0, *range(2, x.dim()))


def _channel(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape(1, -1, *([1] * (x.dim() - 2)))


def _torch_train_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    xc = _compute(x)
    var, mean = torch.var_mean(xc, _axes(x), correction=0)  # one pass (Welford)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    y = (xc - _channel(mean, x)) * _channel(scale, x)
    if bias is not None:
        y = y + _channel(bias, x)
    return y.to(x.dtype), mean, var


def _torch_train_backward(
    dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, var: Tensor, eps: float
) -> tuple[Tensor, Tensor | None, Tensor]:
    xc, g = _compute(x), _compute(dy)
    m = x.numel() // x.shape[1]
    inv_std = torch.rsqrt(var + eps)
    centred = xc - _channel(mean, x)
    sum_g = g.sum(_axes(x))  # these two sums fuse into one pass
    dweight = (g * centred).sum(_axes(x)) * inv_std
    a = inv_std if weight is None else inv_std * weight
    b = -a * inv_std * dweight / m
    c0 = -a * sum_g / m
    dx = _channel(a, x) * g + _channel(b, x) * centred + _channel(c0, x)
    pdtype = weight.dtype if weight is not None else xc.dtype
    dw = None if weight is None else dweight.to(pdtype)
    return dx.to(dy.dtype), dw, sum_g.to(pdtype)


def _torch_eval_forward(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    xc = _compute(x)
    scale = torch.rsqrt(running_var.to(xc.dtype) + eps)
    if weight is not None:
        scale = scale * weight
    y = (xc - _channel(running_mean.to(xc.dtype), x)) * _channel(scale, x)
    if bias is not None:
        y = y + _channel(bias, x)
    return y.to(x.dtype)


_compiled: dict[str, Any] = {}


def _compiled_fn(name: str, fn: Any) -> Any:
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=False)
    return _compiled[name]


def _device_train_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    out: tuple[Tensor, Tensor, Tensor] = _compiled_fn("fwd", _torch_train_forward)(
        x, weight, bias, eps
    )
    return out


def _device_train_backward(
    dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, var: Tensor, eps: float
) -> tuple[Tensor, Tensor | None, Tensor]:
    out: tuple[Tensor, Tensor | None, Tensor] = _compiled_fn("bwd", _torch_train_backward)(
        dy, x, weight, mean, var, eps
    )
    return out


def _device_eval_forward(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    out: Tensor = _compiled_fn("eval", _torch_eval_forward)(
        x, running_mean, running_var, weight, bias, eps
    )
    return out
