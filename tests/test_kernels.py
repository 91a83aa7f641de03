"""bnlib.kernels: the fused kernels against bnlib.functional and torch's native BatchNorm."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _helpers import DEVICES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnlib import functional as F
from bnlib import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba did not load")

EPS = 1e-5

# (shape, channels_last): every layout the kernels take, ranks 2 to 5
LAYOUTS = [
    ((7, 5), False),  # (N, D): interleaved
    ((6, 3, 9), False),  # NCL: planar
    ((6, 3, 1), False),  # NCL with L = 1: interleaved
    ((4, 3, 5, 7), False),  # NCHW: planar
    ((4, 3, 5, 7), True),  # NHWC memory: interleaved
    ((2, 3, 4, 3, 5), False),  # NCDHW
    ((2, 3, 4, 3, 5), True),  # NDHWC memory
]
ODD = [
    ((9, 1, 4, 4), False),  # one channel
    ((2, 3), False),  # N * HW = 2
    ((1, 2, 2), False),  # N * HW = 2 with N = 1
    ((1, 4, 1, 2), True),
    ((3, 5000), False),  # huge C: more channels than a block holds rows
    ((2, 2, 9000), False),  # rows longer than a block
    ((300, 70), False),  # more blocks than parts in the interleaved layout
]


def make(shape, channels_last=False, dtype=torch.float64, seed=0, offset=0.0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5 + offset).to(dtype)
    if channels_last:
        x = x.contiguous(
            memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        )
    return x


def params(C, affine, dtype=torch.float64, seed=1):
    if not affine:
        return None, None
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.rand(C, generator=gen, dtype=dtype) + 0.5,
        torch.randn(C, generator=gen, dtype=dtype),
    )


def reference(x, w, b, dy):
    """bnlib.functional in float64: y, mean, var, dx, dw, db."""
    xd = x.double()
    wd = None if w is None else w.double()
    bd = None if b is None else b.double()
    y, cache = F.batch_norm_forward(xd, wd, bd, EPS)
    dx, dw, db = F.batch_norm_backward(dy.double(), cache)
    return y, cache.mean.reshape(-1), cache.var.reshape(-1), dx, dw.reshape(-1), db.reshape(-1)


def run(x, w, b, dy):
    y, mean, var = kernels.train_forward(x, w, b, EPS)
    dx, dw, db = kernels.train_backward(dy, x, w, mean, var, EPS)
    return y, mean, var, dx, dw, db


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize(("shape", "channels_last"), LAYOUTS + ODD)
def test_float64_matches_functional(shape, channels_last, affine):
    x = make(shape, channels_last)
    dy = make(shape, channels_last, seed=2)
    w, b = params(shape[1], affine)
    assert kernels.supports(x)
    got = run(x, w, b, dy)
    want = reference(x, w, b, dy)
    names = ["y", "mean", "var", "dx", "dweight", "dbias"]
    for name, g, e in zip(names, got, want, strict=True):
        if name == "dweight" and not affine:
            assert g is None
            continue
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-10, msg=name)
    assert got[0].stride() == x.stride() and got[3].stride() == x.stride()  # layout kept
    y_eval = kernels.eval_forward(x, got[1], got[2], w, b, EPS)
    want_eval = F.batch_norm_inference(x, w, b, got[1], got[2], EPS)
    torch.testing.assert_close(y_eval, want_eval, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize(("shape", "channels_last"), LAYOUTS + ODD[:4])
def test_float32_matches_native(shape, channels_last, affine):
    x = make(shape, channels_last, torch.float32)
    dy = make(shape, channels_last, torch.float32, seed=2)
    w, b = params(shape[1], affine, torch.float32)
    xr = x.clone().requires_grad_()
    wr = None if w is None else w.clone().requires_grad_()
    br = None if b is None else b.clone().requires_grad_()
    rm, rv = torch.zeros(shape[1]), torch.ones(shape[1])
    yr = torch.nn.functional.batch_norm(xr, rm, rv, wr, br, True, 1.0, EPS)
    yr.backward(dy)
    y, mean, var, dx, dw, db = run(x, w, b, dy)
    m = x.numel() // shape[1]
    tol = {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(y, yr.detach(), **tol)
    torch.testing.assert_close(mean, rm, **tol)  # momentum 1: running = batch statistics
    torch.testing.assert_close(var * m / (m - 1), rv, **tol)  # torch keeps the unbiased one
    torch.testing.assert_close(dx, xr.grad, **tol)
    if affine:
        torch.testing.assert_close(dw, wr.grad, **tol)
        torch.testing.assert_close(db, br.grad, **tol)
    ye = kernels.eval_forward(x, rm, rv, w, b, EPS)
    yn = torch.nn.functional.batch_norm(x, rm, rv, w, b, False, 0.1, EPS)
    torch.testing.assert_close(ye, yn, **tol)


@pytest.mark.parametrize(
    ("shape", "channels_last"),
    [((16, 4, 16, 16), False), ((16, 4, 16, 16), True), ((512, 4), False)],
)
def test_float32_large_offset_no_worse_than_native(shape, channels_last):
    """x = 1e4 + N(0, 1) in float32: errors against float64 at most native's (plus rounding)."""
    gen = torch.Generator().manual_seed(3)
    x = (1e4 + torch.randn(shape, generator=gen)).contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    dy = torch.randn(shape, generator=gen).contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    w, b = torch.ones(shape[1]), torch.zeros(shape[1])
    want = reference(x, w, b, dy)
    ours = run(x, w, b, dy)
    xr = x.clone().requires_grad_()
    yr = torch.nn.functional.batch_norm(xr, None, None, w, b, True, 0.1, EPS)
    yr.backward(dy)
    native = {"y": yr.detach(), "dx": xr.grad}
    for name, idx in [("y", 0), ("dx", 3)]:
        err_ours = (ours[idx].double() - want[idx]).abs().max().item()
        err_native = (native[name].double() - want[idx]).abs().max().item()
        assert err_ours <= err_native, (name, err_ours, err_native)
    # statistics: the mean to float32 rounding, the variance to 1e-5 relative
    assert (ours[1].double() - want[1]).abs().max() <= 1e4 * 2**-23
    torch.testing.assert_close(ours[2].double(), want[2], rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("shape", "channels_last"), [((4, 3, 5, 7), False), ((4, 3, 5, 7), True), ((9, 6), False)]
)
def test_low_precision_matches_native(shape, channels_last, dtype):
    x = make(shape, channels_last, dtype)
    dy = make(shape, channels_last, dtype, seed=2)
    w, b = params(shape[1], True, torch.float32)
    y, mean, var, dx, dw, db = run(x, w, b, dy)
    assert y.dtype == dx.dtype == dtype and mean.dtype == var.dtype == torch.float32
    xr = x.clone().requires_grad_()
    wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()
    yr = torch.nn.functional.batch_norm(xr, None, None, wr, br, True, 0.1, EPS)
    yr.backward(dy)
    torch.testing.assert_close(y, yr.detach())  # dtype-default tolerances
    torch.testing.assert_close(dx, xr.grad)
    torch.testing.assert_close(dw, wr.grad, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(db, br.grad, atol=1e-3, rtol=1e-3)
    want = reference(x.float(), w, b, dy.float())  # float32 accumulation: close to float64
    torch.testing.assert_close(mean.double(), want[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("shape", "channels_last"),
    [((8, 6, 40, 40), False), ((8, 6, 40, 40), True), ((4000, 24), False)],
)
def test_same_bits_for_every_thread_count(shape, channels_last):
    x = make(shape, channels_last, torch.float32)
    dy = make(shape, channels_last, torch.float32, seed=2)
    w, b = params(shape[1], True, torch.float32)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(run(x, w, b, dy) + (kernels.eval_forward(x, w, w, w, b, EPS),))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, c in zip(results[0], other, strict=True):
            assert torch.equal(a, c)
    assert torch.equal(run(x, w, b, dy)[3], results[0][3])  # and repeatable


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(1, 6), min_size=2, max_size=5).map(tuple),
    channels_last=st.booleans(),
    affine=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_any_shape_matches_functional(shape, channels_last, affine, seed):
    if np.prod(shape) // shape[1] < 2:
        shape = (2, *shape[1:])  # training needs two values per channel
    x = make(shape, channels_last and len(shape) >= 4, seed=seed)
    dy = make(shape, channels_last and len(shape) >= 4, seed=seed + 1)
    w, b = params(shape[1], affine, seed=seed + 2)
    got = run(x, w, b, dy)
    want = reference(x, w, b, dy)
    for i, (g, e) in enumerate(zip(got, want, strict=True)):
        if g is not None:
            torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-10, msg=str(i))


def test_supports():
    x = torch.randn(4, 3, 5, 5)
    assert kernels.supports(x)
    assert kernels.supports(x.to(memory_format=torch.channels_last))
    assert kernels.supports(x.half()) and kernels.supports(x.bfloat16())
    assert not kernels.supports(x.transpose(2, 3))  # neither contiguous nor channels-last
    assert not kernels.supports(x[:, :, ::2])
    assert not kernels.supports(x.long())
    assert not kernels.supports(torch.randn(5))
    assert not kernels.supports(torch.randn(1, 2, 1, 1, 1, 2))
    assert not kernels.supports(torch.randn(0, 3))
    assert not kernels.supports(torch.randn(2, 3, device="meta"))
    assert not torch.func.vmap(lambda t: torch.tensor(kernels.supports(t)))(torch.randn(2, 4, 3))[0]
    kernels.set_enabled(False)
    try:
        assert not kernels.enabled() and not kernels.supports(x)
    finally:
        kernels.set_enabled(True)
    assert kernels.enabled()
    with pytest.raises(TypeError, match="bool"):
        kernels.set_enabled(1)  # type: ignore[arg-type]


def test_dy_in_another_layout():
    x = make((4, 3, 5, 7), True)
    dy = make((4, 3, 5, 7), False, seed=2)
    w, b = params(3, True)
    got = run(x, w, b, dy)
    want = reference(x, w, b, dy)
    torch.testing.assert_close(got[3], want[3], atol=1e-10, rtol=1e-10)


def test_missing_numba_warns_once_and_supports_nothing(monkeypatch):
    monkeypatch.setattr(kernels, "numba", None)
    monkeypatch.setattr(kernels, "_IMPORT_ERROR", ImportError("no module named numba"))
    monkeypatch.setattr(kernels, "_warned", False)
    x = torch.randn(4, 3)
    with pytest.warns(RuntimeWarning, match="falls back to its eager torch path") as record:
        assert not kernels.supports(x)
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not kernels.supports(x)  # no second warning


@pytest.mark.parametrize("device", DEVICES)
def test_device_paths_match_functional(device):
    """Off the CPU the same formulas run through torch.compile (skips without CUDA)."""
    if device == "cpu":  # the torch formulas themselves, uncompiled, on the CPU
        fwd, bwd, ev = (
            kernels._torch_train_forward,
            kernels._torch_train_backward,
            kernels._torch_eval_forward,
        )
    else:
        fwd, bwd, ev = kernels.train_forward, kernels.train_backward, kernels.eval_forward
    for shape, channels_last in LAYOUTS:
        x = make(shape, channels_last).to(device)
        dy = make(shape, channels_last, seed=2).to(device)
        w, b = (p.to(device) for p in params(shape[1], True))
        y, mean, var = fwd(x, w, b, EPS)
        dx, dw, db = bwd(dy, x, w, mean, var, EPS)
        want = reference(x, w, b, dy)
        for g, e in zip((y, mean, var, dx, dw, db), want, strict=True):
            torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(ev(x, mean, var, w, b, EPS), y, atol=1e-10, rtol=1e-10)


def test_no_writable_cache_directory_still_compiles(monkeypatch):
    """numba raises at decoration when no cache location is writable; _jit compiles uncached."""
    import numba.core.caching as caching

    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [])

    def total(v):
        return v.sum()

    with pytest.raises(RuntimeError, match="no locator"):
        kernels.njit(cache=True)(total)
    compiled = kernels._jit()(total)
    assert compiled(np.arange(4.0)) == 6.0


def test_concurrent_callers_get_correct_results():
    """Numba's workqueue pool must not be entered twice at once: the kernels serialise."""
    from concurrent.futures import ThreadPoolExecutor

    xs = [make((8, 4, 40, 40), seed=s, dtype=torch.float32) for s in range(4)]
    want = [kernels.train_forward(x, None, None, EPS)[0] for x in xs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda x: kernels.train_forward(x, None, None, EPS)[0], xs * 3))
    for i, y in enumerate(got):
        assert torch.equal(y, want[i % 4])


def test_nn_uses_the_kernels_on_cpu_with_the_eager_results(monkeypatch):
    """bnlib.nn routes its seam to the kernels by default; switched off, the eager path
    gives the same numbers (float64, 1e-10)."""
    import bnlib.nn as bnn

    calls = []
    for name in ("train_forward", "train_backward", "eval_forward"):
        real = getattr(kernels, name)
        monkeypatch.setattr(
            kernels, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a)
        )
    results = []
    for enabled in (True, False):
        kernels.set_enabled(enabled)
        try:
            torch.manual_seed(0)
            bn = bnn.BatchNorm2d(3, dtype=torch.float64)
            x = make((4, 3, 5, 5), True).requires_grad_()
            y = bn(x)
            y.backward(make((4, 3, 5, 5), seed=2))
            bn.eval()
            with torch.no_grad():
                y_eval = bn(x)
            results.append((y, x.grad, bn.weight.grad, bn.bias.grad, bn.running_var, y_eval))
        finally:
            kernels.set_enabled(True)
        if enabled:
            assert calls == ["train_forward", "train_backward", "eval_forward"]
        else:
            assert len(calls) == 3  # nothing more while disabled
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    # never while autograd records the computation (double backward); same numbers
    second = []
    for enabled in (True, False):
        kernels.set_enabled(enabled)
        try:
            calls.clear()
            x = make((4, 3, 5), seed=3).requires_grad_()
            bn = bnn.BatchNorm1d(3, dtype=torch.float64)
            (gx,) = torch.autograd.grad(bn(x).pow(3).sum(), x, create_graph=True)
            assert calls == (["train_forward"] if enabled else [])  # recorded backward: eager
            gx.sum().backward()
            second.append(x.grad)
        finally:
            kernels.set_enabled(True)
    torch.testing.assert_close(second[0], second[1], atol=1e-10, rtol=1e-10)
    # under vmap the seam sees the batch folded into channels: plain tensors again
    outs = []
    for enabled in (True, False):
        kernels.set_enabled(enabled)
        try:
            bn = bnn.BatchNorm1d(3, dtype=torch.float64, track_running_stats=False)
            outs.append(torch.func.vmap(bn)(make((2, 4, 3, 5))))
        finally:
            kernels.set_enabled(True)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("threads", [1, 2])
def test_torch_thread_count_is_left_alone(monkeypatch, threads):
    """A kernel call must not change torch.get_num_threads(): Numba's OpenMP pool can share
    the runtime with torch, and a changed count made one-thread notebooks run torch's own
    work on two threads (25x slower on a busy machine). The bug is simulated so the test
    bites on every machine: Numba's thread setup is made to change torch's count."""
    if not kernels.supports(torch.zeros(2, 2)):
        pytest.skip("Numba not available")
    set_threads = kernels._set_threads

    def meddling(x):
        used = set_threads(x)
        torch.set_num_threads(threads + 1)  # what a shared OpenMP runtime did
        return used

    monkeypatch.setattr(kernels, "_set_threads", meddling)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(8, 4, 64, 64)  # above kernels.SMALL: the parallel path
        w, b = torch.ones(4), torch.zeros(4)
        y, mean, var = kernels.train_forward(x, w, b, 1e-5)
        assert torch.get_num_threads() == threads
        kernels.train_backward(torch.ones_like(y), x, w, mean, var, 1e-5)
        assert torch.get_num_threads() == threads
        kernels.eval_forward(x, mean, var, w, b, 1e-5)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_block_stats_keeps_its_correction_under_fastmath():
    """The statistics kernels may reassociate sums (fastmath 'reassoc'); that must not let the
    compiler drop the two-pass correction d = sum(v - first_mean). Adversarial block: float32
    values 2**24 + 2k, whose float32 sum rounds (partial sums pass 2**25, where the spacing is 4),
    so the first mean is off by a sizeable fraction of the spread, and M2 without the correction
    is far off in any summation order (checked below for numpy's pairwise and a sequential sum)."""
    rng = np.random.default_rng(0)
    v = (2.0**24 + 2 * rng.integers(0, 8, size=kernels.BLOCK)).astype(np.float32)
    v64 = v.astype(np.float64)
    true_m2 = float(((v64 - v64.mean()) ** 2).sum())
    sequential = np.float32(0)
    for value in v:
        sequential = np.float32(sequential + value)
    for first_mean in (v.sum(dtype=np.float32) / np.float32(v.size), sequential / v.size):
        uncorrected = float(((v64 - float(first_mean)) ** 2).sum())
        assert abs(uncorrected / true_m2 - 1) > 1e-2  # the data defeats an uncorrected pass
    mean, m2 = kernels.block_stats(v)
    assert abs(mean - v64.mean()) < 1e-3 * np.sqrt(true_m2 / v.size)
    assert abs(m2 / true_m2 - 1) < 1e-4
