"""Property tests (hypothesis) of the invariants of batch normalisation."""

from __future__ import annotations

import os

import numpy as np
import torch
from _helpers import to_numpy
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import bnlib.nn as bnn
from bnlib.functional import batch_norm_backward, batch_norm_forward

# BN_HYPOTHESIS_EXAMPLES=2000 for a long local run; the default keeps the suite fast
EXAMPLES = int(os.environ.get("BN_HYPOTHESIS_EXAMPLES", "40"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None)


@st.composite
def problems(draw, max_rank=5):
    """A well-conditioned BN problem: (x, gamma, beta, dy, eps), float64 NumPy.

    The data come from a seeded generator (hypothesis picks the seed, shape, location
    and spread); channels whose values are nearly constant are rejected, since there
    eps, not the data, decides the output.
    """
    rank = draw(st.integers(2, max_rank))
    n = draw(st.integers(2, 6))
    c = draw(st.integers(1, 4))
    spatial = draw(st.lists(st.integers(1, 3), min_size=rank - 2, max_size=rank - 2))
    shape = (n, c, *spatial)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    loc = draw(st.floats(-1e3, 1e3))
    spread = draw(st.floats(1e-2, 1e2))
    x = loc + spread * rng.standard_normal(shape)
    axes = tuple(i for i in range(x.ndim) if i != 1)
    assume(np.all(x.var(axis=axes) > 1e-3 * spread**2))
    gamma = rng.uniform(0.2, 3.0, c) * rng.choice([-1.0, 1.0], c)
    beta = rng.standard_normal(c) * 5
    dy = rng.standard_normal(shape)
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    return x, gamma, beta, dy, eps


def per_channel(a, shape):
    """Broadcast a (C,) vector against an input of ``shape``."""
    return a.reshape((1, shape[1]) + (1,) * (len(shape) - 2))


@SETTINGS
@given(problems())
def test_gradient_sums_vanish(p):
    """Σ dx = 0 per channel, and Σ dx·x̂ = 0 up to the eps term, which is known exactly."""
    x, gamma, beta, dy, eps = p
    _, cache = batch_norm_forward(x, gamma, beta, eps=eps)
    dx, dgamma, _ = batch_norm_backward(dy, cache)
    axes, m = cache.axes, cache.m
    k = np.abs(gamma * cache.inv_std.ravel())  # |γ| / sqrt(σ² + eps)
    scale = k * m * np.abs(dy).sum(axis=axes) + np.abs(dx).sum(axis=axes)  # size of the terms
    # x_hat = (x - mean)/sd carries a relative error of about 1e-16 |x|/sd (cancellation)
    cond = 1 + np.abs(x).max(axis=axes) / np.sqrt(cache.var.ravel())
    scale = scale * cond
    assert np.all(np.abs(dx.sum(axis=axes)) <= 1e-13 * scale)

    s = (dx * cache.x_hat).sum(axis=axes)
    var = cache.var.ravel()
    # Σ x̂² = m σ²/(σ²+eps), not m, so Σ dx·x̂ = γ/sqrt(σ²+eps) · Σ g x̂ · eps/(σ²+eps)
    eps_term = gamma * cache.inv_std.ravel() * dgamma * eps / (var + eps)
    assert np.all(np.abs(s - eps_term) <= 1e-13 * scale)
    assert np.all(np.abs(s) <= np.abs(eps_term) + 1e-13 * scale)


@SETTINGS
@given(problems(), st.floats(0.05, 20.0), st.integers(0, 2**32 - 1))
def test_shift_and_scale_invariance(p, a, seed):
    """BN(a·x + c) = BN(x) for a > 0 and per-channel c, up to the effect of eps."""
    x, gamma, beta, _, eps = p
    c = np.random.default_rng(seed).uniform(-1e3, 1e3, x.shape[1])
    x2 = a * x + per_channel(c, x.shape)
    y1, cache1 = batch_norm_forward(x, gamma, beta, eps=eps)
    y2, _ = batch_norm_forward(x2, gamma, beta, eps=eps)

    var = per_channel(cache1.var.ravel(), x.shape)
    # y2 = β + γ x̂1 · r with r = a·sqrt(σ²+eps)/sqrt(a²σ²+eps); |ln r| <= delta
    delta = 0.5 * eps * np.maximum(1 / var, 1 / (a * a * var))
    eps_effect = np.abs(per_channel(gamma, x.shape) * cache1.x_hat) * delta * (1 + delta)
    # rounding: x - μ loses digits when |x| (or |x2|) is large compared with the spread
    sd = np.sqrt(var)
    rounding = 1e-12 * np.abs(per_channel(gamma, x.shape)) * (
        1 + np.abs(x).max() / sd + np.abs(x2).max() / (a * sd)
    )
    assert np.all(np.abs(y2 - y1) <= eps_effect + rounding)


@SETTINGS
@given(problems())
def test_normalised_output_has_zero_mean_and_unit_variance(p):
    """Before the affine step, y has mean 0 and variance σ²/(σ²+eps) ≈ 1 per channel."""
    x, _, _, _, eps = p
    y, cache = batch_norm_forward(x, None, None, eps=eps)
    axes = cache.axes
    var_x = x.var(axis=axes)
    assert np.all(np.abs(y.mean(axis=axes)) <= 1e-10)
    np.testing.assert_allclose(y.var(axis=axes), var_x / (var_x + eps), rtol=1e-9)
    # and with the affine step: mean β, standard deviation |γ| (times the eps factor)
    y_aff, _ = batch_norm_forward(x, p[1], p[2], eps=eps)
    np.testing.assert_allclose(y_aff.mean(axis=axes), p[2], atol=1e-9 * (1 + np.abs(p[1]).max()))
    np.testing.assert_allclose(y_aff.std(axis=axes), np.abs(p[1]) * np.sqrt(var_x / (var_x + eps)),
                               rtol=1e-9)


@SETTINGS
@given(problems(), st.booleans(), st.integers(-1, 0))
def test_numpy_and_torch_backends_agree(p, affine, axis_choice):
    x, gamma, beta, dy, eps = p
    channel_axis = 1 if axis_choice == 0 else -1
    if channel_axis == -1:
        x, dy = np.moveaxis(x, 1, -1), np.moveaxis(dy, 1, -1)
    g, b = (gamma, beta) if affine else (None, None)
    y_np, c_np = batch_norm_forward(x, g, b, eps=eps, channel_axis=channel_axis)
    t = [None if a is None else torch.from_numpy(np.ascontiguousarray(a)) for a in (x, g, b, dy)]
    y_t, c_t = batch_norm_forward(t[0], t[1], t[2], eps=eps, channel_axis=channel_axis)
    assert isinstance(y_t, torch.Tensor) and y_t.dtype == torch.float64
    sd = np.sqrt(c_np.var.min())
    tol = 1e-12 * (1 + np.abs(x).max() / sd) * (1 + np.abs(gamma).max())
    np.testing.assert_allclose(to_numpy(y_t), y_np, rtol=0, atol=tol)
    np.testing.assert_allclose(to_numpy(c_t.mean), c_np.mean, rtol=1e-12, atol=1e-12 * sd)
    np.testing.assert_allclose(to_numpy(c_t.var), c_np.var, rtol=1e-9)
    grads_np = batch_norm_backward(dy, c_np)
    grads_t = batch_norm_backward(t[3], c_t)
    for a, b_, name in zip(grads_t, grads_np, ("dx", "dgamma", "dbeta"), strict=True):
        assert isinstance(a, torch.Tensor)
        scale = np.abs(b_).max() + 1
        np.testing.assert_allclose(to_numpy(a), b_, rtol=0, atol=1e-9 * scale, err_msg=name)


KINDS = {2: (torch.nn.BatchNorm1d, bnn.BatchNorm1d), 3: (torch.nn.BatchNorm1d, bnn.BatchNorm1d),
         4: (torch.nn.BatchNorm2d, bnn.BatchNorm2d), 5: (torch.nn.BatchNorm3d, bnn.BatchNorm3d)}


@settings(max_examples=max(EXAMPLES // 2, 10), deadline=None, database=None)
@given(problems(), st.sampled_from([0.1, None, 0.5]), st.booleans(), st.booleans())
def test_module_matches_torch(p, momentum, affine, track):
    """One training step and one eval step of bnlib.nn against torch.nn, float64."""
    x, gamma, beta, dy, eps = p
    torch_cls, bn_cls = KINDS[x.ndim]
    kw = {"eps": eps, "momentum": momentum, "affine": affine, "track_running_stats": track}
    ref = torch_cls(x.shape[1], dtype=torch.float64, **kw)
    bn = bn_cls(x.shape[1], dtype=torch.float64, **kw)
    if affine:
        with torch.no_grad():
            ref.weight.copy_(torch.from_numpy(gamma))
            ref.bias.copy_(torch.from_numpy(beta))
        bn.load_state_dict(ref.state_dict())
    sd = float(np.sqrt(x.var(axis=tuple(i for i in range(x.ndim) if i != 1)).min()))
    tol = 1e-12 * (1 + float(np.abs(x).max()) / sd) * 10
    for mode in ("train", "eval"):
        ref.train(mode == "train")
        bn.train(mode == "train")
        xr = torch.from_numpy(x).requires_grad_()
        xb = torch.from_numpy(x).requires_grad_()
        yr, yb = ref(xr), bn(xb)
        torch.testing.assert_close(yb, yr, atol=tol, rtol=1e-10)
        yr.backward(torch.from_numpy(dy))
        yb.backward(torch.from_numpy(dy))
        gscale = float(xr.grad.abs().max()) + 1
        torch.testing.assert_close(xb.grad, xr.grad, atol=1e-9 * gscale, rtol=0)
        if track:
            torch.testing.assert_close(bn.running_mean, ref.running_mean, atol=tol * sd,
                                       rtol=1e-10)
            torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-8, atol=0)
            assert torch.equal(bn.num_batches_tracked, ref.num_batches_tracked)
