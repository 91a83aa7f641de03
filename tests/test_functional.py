"""bnlib.functional against torch.autograd, for NumPy arrays and torch tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from _helpers import cuda_param, to_numpy

from bnlib.functional import (
    BNCache,
    batch_norm_backward,
    batch_norm_backward_naive,
    batch_norm_forward,
    batch_norm_inference,
)

SHAPES = [(8, 3), (4, 3, 5), (2, 3, 4, 5), (2, 3, 2, 3, 4)]
SHAPE_IDS = ["rank2", "rank3", "rank4", "rank5"]
BACKENDS = ["numpy", "torch-cpu", cuda_param("torch-cuda")]
NP_DTYPE = {"float64": np.float64, "float32": np.float32, "float16": np.float16}
TORCH_DTYPE = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
TOL = {"float64": 1e-10, "float32": 1e-5}
AFFINE = ["gamma_beta", "none", "gamma_only", "beta_only"]


def as_backend(a: np.ndarray, backend: str, dtype: str = "float64"):
    """``a`` (float64 NumPy) as an array of ``backend`` in ``dtype``."""
    if backend == "numpy":
        return a.astype(NP_DTYPE[dtype])
    device = backend.split("-", 1)[1]
    return torch.from_numpy(a).to(device=device, dtype=TORCH_DTYPE[dtype])


def check_kind(a, like, dtype=None) -> None:
    """``a`` is the same kind of array as ``like``: type, device, and (given) dtype."""
    if isinstance(like, np.ndarray):
        assert isinstance(a, np.ndarray), type(a)
    else:
        assert isinstance(a, torch.Tensor), type(a)
        assert a.device == like.device
    if dtype is not None:
        assert a.dtype == dtype, (a.dtype, dtype)


def data(shape, seed=0, offset=1.0):
    rng = np.random.default_rng(seed)
    C = shape[1]
    bshape = [1] * len(shape)
    bshape[1] = C
    ch = np.arange(C, dtype=np.float64).reshape(bshape)
    x = rng.standard_normal(shape) * (1.0 + 0.5 * ch) + offset * ch
    gamma = 0.5 + rng.random(C)
    beta = rng.standard_normal(C)
    dy = rng.standard_normal(shape)
    return x, gamma, beta, dy


def pick(affine, gamma, beta):
    g = gamma if affine in ("gamma_beta", "gamma_only") else None
    b = beta if affine in ("gamma_beta", "beta_only") else None
    return g, b


def torch_reference(x, gamma, beta, dy, eps):
    """y, dx, dgamma, dbeta by torch.autograd through torch's batch_norm (float64, CPU).

    A missing gamma is 1 and a missing beta 0; their gradients are still returned
    (bnlib returns dgamma and dbeta whatever the affine setting).
    """
    C = x.shape[1]
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    g = torch.tensor(np.ones(C) if gamma is None else gamma, requires_grad=True)
    b = torch.tensor(np.zeros(C) if beta is None else beta, requires_grad=True)
    y = TF.batch_norm(xt, None, None, g, b, training=True, eps=eps)
    y.backward(torch.tensor(dy))
    return y.detach().numpy(), xt.grad.numpy(), g.grad.numpy(), b.grad.numpy()


def close(a, b, tol, what=""):
    np.testing.assert_allclose(to_numpy(a).astype(np.float64), b, rtol=tol, atol=tol, err_msg=what)


# ---------------------------------------------------------------------------
# forward and backward against torch.autograd
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_forward_backward_against_torch_autograd(shape, backend, affine, dtype):
    x, gamma, beta, dy = data(shape)
    g, b = pick(affine, gamma, beta)
    eps = 1e-3
    x_b = as_backend(x, backend, dtype)
    g_b = None if g is None else as_backend(g, backend, dtype)
    b_b = None if b is None else as_backend(b, backend, dtype)
    dy_b = as_backend(dy, backend, dtype)
    # the reference sees exactly the (possibly float32-rounded) values bnlib sees
    xr, gr, br, dyr = (None if a is None else to_numpy(a).astype(np.float64)
                       for a in (x_b, g_b, b_b, dy_b))
    y_ref, dx_ref, dg_ref, db_ref = torch_reference(xr, gr, br, dyr, eps)

    y, cache = batch_norm_forward(x_b, g_b, b_b, eps=eps)
    check_kind(y, x_b, x_b.dtype)
    assert tuple(y.shape) == shape
    tol = TOL[dtype]
    close(y, y_ref, tol, "y")

    assert isinstance(cache, BNCache)
    bshape = (1, shape[1]) + (1,) * (len(shape) - 2)
    assert tuple(cache.x_hat.shape) == shape
    for name in ("mean", "var", "inv_std"):
        assert tuple(getattr(cache, name).shape) == bshape, name
        check_kind(getattr(cache, name), x_b, x_b.dtype)
    assert cache.axes == tuple(i for i in range(len(shape)) if i != 1)
    assert cache.m == x.size // shape[1] and cache.eps == eps
    assert (cache.gamma is None) == (g is None)
    close(cache.mean.reshape(-1), xr.mean(axis=cache.axes), tol, "mean")
    close(cache.var.reshape(-1), xr.var(axis=cache.axes), tol, "var")

    for backward in (batch_norm_backward, batch_norm_backward_naive):
        dx, dgamma, dbeta = backward(dy_b, cache)
        check_kind(dx, x_b, x_b.dtype)
        assert tuple(dx.shape) == shape
        for v in (dgamma, dbeta):
            check_kind(v, x_b, x_b.dtype)
            assert tuple(v.shape) == (shape[1],)
        close(dx, dx_ref, tol, f"{backward.__name__}: dx")
        close(dgamma, dg_ref, tol, f"{backward.__name__}: dgamma")
        close(dbeta, db_ref, tol, f"{backward.__name__}: dbeta")


@pytest.mark.parametrize("channel_axis", [-1, "last"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES[1:], ids=SHAPE_IDS[1:])
def test_channels_last_equals_transposed(shape, backend, channel_axis):
    x, gamma, beta, dy = data(shape, seed=1)
    axis = len(shape) - 1 if channel_axis == "last" else channel_axis
    x_b, g_b, b_b, dy_b = (as_backend(a, backend) for a in (x, gamma, beta, dy))
    y, cache = batch_norm_forward(x_b, g_b, b_b)
    dx, dgamma, dbeta = batch_norm_backward(dy_b, cache)

    x_cl, dy_cl = np.moveaxis(x, 1, -1), np.moveaxis(dy, 1, -1)
    x_cl_b, dy_cl_b = as_backend(np.ascontiguousarray(x_cl), backend), as_backend(
        np.ascontiguousarray(dy_cl), backend)
    y_cl, cache_cl = batch_norm_forward(x_cl_b, g_b, b_b, channel_axis=axis)
    check_kind(y_cl, x_cl_b, x_cl_b.dtype)
    assert tuple(cache_cl.mean.shape) == (1,) * (len(shape) - 1) + (shape[1],)
    assert cache_cl.m == cache.m
    np.testing.assert_allclose(np.moveaxis(to_numpy(y_cl), -1, 1), to_numpy(y), atol=1e-12)
    for backward in (batch_norm_backward, batch_norm_backward_naive):
        dx_cl, dgamma_cl, dbeta_cl = backward(dy_cl_b, cache_cl)
        np.testing.assert_allclose(np.moveaxis(to_numpy(dx_cl), -1, 1), to_numpy(dx), atol=1e-12)
        np.testing.assert_allclose(to_numpy(dgamma_cl), to_numpy(dgamma), atol=1e-12)
        np.testing.assert_allclose(to_numpy(dbeta_cl), to_numpy(dbeta), atol=1e-12)
    # inference, channels-last
    rm, rv = np.linspace(-1, 1, shape[1]), np.linspace(0.5, 2, shape[1])
    rm_b, rv_b = as_backend(rm, backend), as_backend(rv, backend)
    y_inf = batch_norm_inference(x_b, g_b, b_b, rm_b, rv_b)
    y_inf_cl = batch_norm_inference(x_cl_b, g_b, b_b, rm_b, rv_b, channel_axis=axis)
    np.testing.assert_allclose(np.moveaxis(to_numpy(y_inf_cl), -1, 1), to_numpy(y_inf),
                               atol=1e-12)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_inference_against_torch(shape, backend, affine, dtype):
    x, gamma, beta, _ = data(shape, seed=2)
    g, b = pick(affine, gamma, beta)
    C = shape[1]
    rng = np.random.default_rng(3)
    rm, rv = rng.standard_normal(C), 0.2 + rng.random(C) * 3
    eps = 1e-4
    args = [None if a is None else as_backend(a, backend, dtype) for a in (x, g, b, rm, rv)]
    y = batch_norm_inference(*args, eps=eps)
    check_kind(y, args[0], args[0].dtype)
    ref = TF.batch_norm(*(None if a is None else torch.tensor(to_numpy(a), dtype=torch.float64)
                          for a in (args[0], args[3], args[4], args[1], args[2])),
                        training=False, eps=eps)
    close(y, ref.numpy(), TOL[dtype])


# ---------------------------------------------------------------------------
# naive backward == compact backward
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("with_gamma", [True, False], ids=["gamma", "no_gamma"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_naive_backward_equals_compact(shape, backend, with_gamma):
    x, gamma, beta, dy = data(shape, seed=4)
    x_b, g_b, b_b, dy_b = (as_backend(a, backend) for a in (x, gamma, beta, dy))
    _, cache = batch_norm_forward(x_b, g_b if with_gamma else None, b_b, eps=1e-5)
    compact = batch_norm_backward(dy_b, cache)
    naive = batch_norm_backward_naive(dy_b, cache)
    for a, b, name in zip(compact, naive, ("dx", "dgamma", "dbeta"), strict=True):
        check_kind(b, a, a.dtype)
        assert np.max(np.abs(to_numpy(a) - to_numpy(b))) <= 1e-12, name
    # and they are not trivially zero
    assert np.max(np.abs(to_numpy(compact[0]))) > 0.1


# ---------------------------------------------------------------------------
# low precision: float16 / bfloat16 accumulate in float32
# ---------------------------------------------------------------------------

LOW = [
    pytest.param("numpy", "float16", id="numpy-float16"),
    pytest.param("torch-cpu", "float16", id="torch-float16"),
    pytest.param("torch-cpu", "bfloat16", id="torch-bfloat16"),
    pytest.param("torch-cuda", "float16", id="cuda-float16", marks=BACKENDS[2].marks),
    pytest.param("torch-cuda", "bfloat16", id="cuda-bfloat16", marks=BACKENDS[2].marks),
]


@pytest.mark.parametrize("backend, dtype", LOW)
def test_low_precision_inputs(backend, dtype):
    shape = (16, 3, 4, 4)
    x, gamma, beta, dy = data(shape, seed=5)
    x_lo, dy_lo = as_backend(x, backend, dtype), as_backend(dy, backend, dtype)
    g_lo, b_lo = as_backend(gamma, backend, dtype), as_backend(beta, backend, dtype)
    f32 = np.float32 if backend == "numpy" else torch.float32
    y, cache = batch_norm_forward(x_lo, g_lo, b_lo)
    check_kind(y, x_lo, x_lo.dtype)
    for name in ("x_hat", "mean", "var", "inv_std", "gamma"):
        check_kind(getattr(cache, name), x_lo, f32)
    dx, dgamma, dbeta = batch_norm_backward(dy_lo, cache)
    check_kind(dx, x_lo, x_lo.dtype)
    check_kind(dgamma, x_lo, f32)
    check_kind(dbeta, x_lo, f32)

    # the float32 computation on the same (rounded) values
    up = [to_numpy(a).astype(np.float32) for a in (x_lo, g_lo, b_lo, dy_lo)]
    y32, cache32 = batch_norm_forward(*up[:3])
    dx32, dg32, db32 = batch_norm_backward(up[3], cache32)
    unit = 2.0 ** -10 if dtype == "float16" else 2.0 ** -7  # one ulp at 1
    y_np, dx_np = to_numpy(y).astype(np.float32), to_numpy(dx).astype(np.float32)
    # output: the float32 result rounded once to the low-precision format
    assert np.all(np.abs(y_np - y32) <= unit * np.maximum(np.abs(y32), 1.0))
    assert np.all(np.abs(dx_np - dx32) <= unit * np.maximum(np.abs(dx32), 1.0))
    np.testing.assert_allclose(to_numpy(dgamma), dg32, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(to_numpy(dbeta), db32, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(to_numpy(cache.var).ravel(), cache32.var.ravel(), rtol=1e-5)


# ---------------------------------------------------------------------------
# large offset in float32: the variance must be computed stably
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_large_offset_float32(backend):
    rng = np.random.default_rng(6)
    shape = (32, 3, 16, 16)
    x = 1e4 + rng.standard_normal(shape)
    x_b = as_backend(x, backend, "float32")
    y, cache = batch_norm_forward(x_b, None, None)
    axes = (0, 2, 3)
    y_np = to_numpy(y).astype(np.float64)
    assert np.max(np.abs(y_np.mean(axis=axes))) < 1e-2
    assert np.max(np.abs(y_np.var(axis=axes) - 1)) < 1e-2
    np.testing.assert_allclose(to_numpy(cache.mean).ravel(), 1e4, rtol=1e-6)
    np.testing.assert_allclose(to_numpy(cache.var).ravel(), x.var(axis=axes), rtol=1e-2)

    # the test discriminates: E[x^2] - E[x]^2 in float32, on the same backend, fails badly
    if backend == "numpy":
        naive = (x_b * x_b).mean(axis=axes) - x_b.mean(axis=axes) ** 2
    else:
        naive = (x_b * x_b).mean(dim=axes) - x_b.mean(dim=axes) ** 2
    naive = to_numpy(naive).astype(np.float64)
    assert np.max(np.abs(naive - 1)) > 0.5, naive
    y_naive = (to_numpy(x_b) - to_numpy(x_b).mean(axis=axes, keepdims=True)) / np.sqrt(
        np.abs(naive).reshape(1, -1, 1, 1) + 1e-5)
    assert np.max(np.abs(y_naive.var(axis=axes) - 1)) > 1e-2


@pytest.mark.parametrize("name", ["batch_norm_backward", "batch_norm_backward_naive"])
def test_backward_input_checks_keep_the_printed_formula(name):
    """The dy checks wrap the BN backward functions from outside, so the source the backprop
    chapter prints (inspect.getsource) is still the formula, and the signature is unchanged."""
    import inspect

    import bnlib.functional as F

    fn = getattr(F, name)
    source = inspect.getsource(fn)
    assert source.startswith(f"def {name}(dy: Array, cache: BNCache)")
    assert "_check_gradient" not in source
    assert list(inspect.signature(fn).parameters) == ["dy", "cache"]
    _, cache = batch_norm_forward(np.ones((4, 3)) + np.arange(3.0), None, None)
    with pytest.raises(ValueError, match="dy has shape"):
        fn(np.ones((1, 3)), cache)
