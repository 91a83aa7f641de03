"""The normalisation family: bnlib.functional.normalize_* and the modules built on it.

Parity with torch's GroupNorm, LayerNorm and InstanceNorm (float64, 1e-10); Batch
Renormalization against a direct implementation of its definition; Ghost BN against
BatchNorm on each chunk.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from _helpers import DEVICES, assert_close, assert_same_state, state_snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

import bnlib.nn as bnn
from bnlib.functional import (
    batch_norm_backward,
    batch_norm_forward,
    normalize_backward,
    normalize_forward,
)

D = torch.float64


def randn(*shape, device="cpu", seed=0, scale=2.0, loc=1.0):
    g = torch.Generator().manual_seed(seed)
    return (loc + scale * torch.randn(*shape, generator=g, dtype=D)).to(device)


# ---------------------------------------------------------------------------
# the general routine, against torch.autograd and torch's functional ops
# ---------------------------------------------------------------------------


def flat(t):
    return None if t is None else t.reshape(-1)


# (name, x shape, axes, param_axes, torch reference taking (x, w, b) -> y)
CASES = [
    (
        "batch",
        (6, 4, 3, 2),
        (0, 2, 3),
        (1,),
        lambda x, w, b: TF.batch_norm(x, None, None, w, b, True),
    ),
    (
        "layer",
        (6, 4, 3, 2),
        (1, 2, 3),
        (1, 2, 3),
        lambda x, w, b: TF.layer_norm(x, (4, 3, 2), w, b),
    ),
    ("layer_last", (6, 5), (1,), (1,), lambda x, w, b: TF.layer_norm(x, (5,), w, b)),
    ("instance", (6, 4, 3, 2), (2, 3), (1,), lambda x, w, b: TF.instance_norm(x, weight=w, bias=b)),
    (
        "group",
        (6, 2, 2, 6),  # x of shape (6, 4, 6) viewed as (N, G, C/G, L)
        (2, 3),
        (1, 2),
        lambda x, w, b: TF.group_norm(x.reshape(6, 4, 6), 2, flat(w), flat(b)).reshape(6, 2, 2, 6),
    ),
]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("name, shape, axes, param_axes, ref", CASES, ids=[c[0] for c in CASES])
def test_normalize_forward_backward_match_torch(
    name, shape, axes, param_axes, ref, affine, backend
):
    pshape = tuple(shape[a] for a in param_axes)
    x = randn(*shape).requires_grad_()
    w = (
        0.5 + torch.rand(pshape, dtype=D, generator=torch.Generator().manual_seed(1))
    ).requires_grad_()
    b = randn(*pshape, seed=2).requires_grad_()
    dy = randn(*shape, seed=3)
    y_ref = ref(x, w if affine else None, b if affine else None)
    grads = torch.autograd.grad(y_ref, (x, w, b) if affine else (x,), dy, allow_unused=True)

    conv = (lambda t: t.detach().numpy()) if backend == "numpy" else (lambda t: t.detach())
    wb = (conv(w), conv(b)) if affine else (None, None)
    y, cache = normalize_forward(conv(x), *wb, axes, 1e-5, param_axes)
    dx, dgamma, dbeta = normalize_backward(conv(dy), cache)
    assert cache.m == int(np.prod([shape[a] for a in axes]))
    for mine, theirs in [(y, y_ref), (dx, grads[0])] + (
        [(dgamma, grads[1]), (dbeta, grads[2])] if affine else []
    ):
        assert_close(torch.as_tensor(mine), theirs.detach())
        assert tuple(mine.shape) == tuple(theirs.shape)


@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5), (2, 3, 4, 5)])
def test_batch_norm_is_the_special_case(shape):
    x = randn(*shape).numpy()
    g, b, dy = np.linspace(0.5, 2, 3), np.linspace(-1, 1, 3), randn(*shape, seed=4).numpy()
    axes = tuple(i for i in range(len(shape)) if i != 1)
    y1, c1 = batch_norm_forward(x, g, b)
    y2, c2 = normalize_forward(x, g, b, axes, 1e-5, (1,))
    assert np.array_equal(y1, y2)
    for a, b_ in zip(batch_norm_backward(dy, c1), normalize_backward(dy, c2), strict=True):
        np.testing.assert_allclose(a, b_, rtol=1e-12, atol=1e-12)


def test_normalize_default_param_axes_are_the_unreduced_ones():
    x = randn(5, 3, 4).numpy()
    _, c = normalize_forward(x, np.ones(3), None, (0, 2))
    assert c.param_axes == (1,)


@pytest.mark.parametrize(
    "axes, param_axes, exc, match",
    [
        ((0, 0), (1,), ValueError, "names an axis twice"),
        ((0, 5), (1,), ValueError, "out of range"),
        ((0, 1.0), (1,), TypeError, "must be an int"),
        ("02", (1,), TypeError, "tuple of ints"),
        ((0, 2), (7,), ValueError, "out of range"),
    ],
)
def test_normalize_bad_axes(axes, param_axes, exc, match):
    with pytest.raises(exc, match=match):
        normalize_forward(randn(4, 3, 2).numpy(), None, None, axes, 1e-5, param_axes)


def test_normalize_empty_input_and_wrong_parameter_size():
    with pytest.raises(ValueError, match="empty"):
        normalize_forward(np.ones((0, 3)), None, None, (1,))
    with pytest.raises(RuntimeError, match="should contain 3 elements"):
        normalize_forward(np.ones((2, 3)), np.ones(2), None, (1,), 1e-5, (1,))


# ---------------------------------------------------------------------------
# modules: parity with torch
# ---------------------------------------------------------------------------


def randomise(module, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 + torch.rand(p.shape, generator=g, dtype=p.dtype))
    return module


def check_parity(ref, mine, shape, steps=3, device="cpu", train=True):
    """Same outputs, input and parameter gradients, and state after ``steps`` calls."""
    randomise(ref)
    mine.load_state_dict(ref.state_dict())
    assert list(mine.state_dict()) == list(ref.state_dict())
    ref.train(train)
    mine.train(train)
    for step in range(steps):
        x = randn(*shape, seed=10 + step, loc=step, device=device)
        xr, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, ym = ref(xr), mine(xm)
        assert_close(ym, yr, msg=f"forward, step {step}")
        dy = randn(*yr.shape, seed=20 + step, device=device)
        yr.backward(dy)
        ym.backward(dy)
        assert_close(xm.grad, xr.grad, msg="dx")
        for (n, p), (_, q) in zip(ref.named_parameters(), mine.named_parameters(), strict=True):
            assert_close(q.grad, p.grad, msg=f"grad {n}")
        for k, v in ref.state_dict().items():
            assert_close(mine.state_dict()[k].double(), v.double(), msg=k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize(
    "groups, channels, shape",
    [
        (1, 6, (4, 6, 5)),
        (2, 6, (4, 6, 3, 3)),
        (3, 6, (2, 6, 2, 2, 3)),
        (6, 6, (3, 6, 4)),
        (2, 4, (5, 4)),
    ],
)
def test_group_norm_matches_torch(groups, channels, shape, affine, device):
    ref = torch.nn.GroupNorm(groups, channels, affine=affine, device=device, dtype=D)
    mine = bnn.GroupNorm(groups, channels, affine=affine, device=device, dtype=D)
    assert isinstance(mine, torch.nn.GroupNorm) and repr(mine) == repr(ref)
    check_parity(ref, mine, shape, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"elementwise_affine": False}, {"bias": False}],
    ids=["affine", "none", "no_bias"],
)
@pytest.mark.parametrize(
    "normalized, shape", [((5,), (4, 5)), ((5,), (2, 3, 5)), ((3, 4), (2, 6, 3, 4))]
)
def test_layer_norm_matches_torch(normalized, shape, kwargs, device):
    ref = torch.nn.LayerNorm(normalized, device=device, dtype=D, **kwargs)
    mine = bnn.LayerNorm(normalized, device=device, dtype=D, **kwargs)
    assert isinstance(mine, torch.nn.LayerNorm) and repr(mine) == repr(ref)
    for train in (True, False):  # no batch statistics: the same in both modes
        check_parity(ref, mine, shape, device=device, train=train)


INSTANCE = {
    "1d": (torch.nn.InstanceNorm1d, bnn.InstanceNorm1d, (3, 4, 7)),
    "2d": (torch.nn.InstanceNorm2d, bnn.InstanceNorm2d, (3, 4, 3, 5)),
    "3d": (torch.nn.InstanceNorm3d, bnn.InstanceNorm3d, (2, 4, 2, 3, 2)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"affine": True},
        {"track_running_stats": True},
        {"affine": True, "track_running_stats": True},
        {"track_running_stats": True, "momentum": None},
        {"track_running_stats": True, "momentum": 0.3},
    ],
    ids=["default", "affine", "track", "affine_track", "track_momentum_none", "track_momentum_0.3"],
)
@pytest.mark.parametrize("kind", list(INSTANCE))
def test_instance_norm_matches_torch(kind, kwargs, train, device):
    ref_cls, cls, shape = INSTANCE[kind]
    ref, mine = (
        ref_cls(4, device=device, dtype=D, **kwargs),
        cls(4, device=device, dtype=D, **kwargs),
    )
    assert isinstance(mine, ref_cls) and repr(mine) == repr(ref)
    if train and ref.track_running_stats:  # give eval non-trivial running statistics first
        pass
    check_parity(ref, mine, shape, device=device, train=train)
    # unbatched input, as torch accepts it
    check_parity(ref, mine, shape[1:], steps=1, device=device, train=train)


def test_instance_norm_defaults_are_torchs():
    m = bnn.InstanceNorm2d(3)
    assert (m.affine, m.track_running_stats, m.eps, m.momentum) == (False, False, 1e-5, 0.1)
    assert list(m.state_dict()) == []


@pytest.mark.parametrize(
    "module, shape",
    [
        (lambda: bnn.GroupNorm(2, 4, dtype=D), (3, 4, 3)),
        (lambda: bnn.LayerNorm((4, 3), dtype=D), (3, 4, 3)),
        (lambda: bnn.InstanceNorm1d(4, affine=True, dtype=D), (3, 4, 3)),
        (lambda: bnn.BatchRenorm1d(4, dtype=D), (5, 4, 3)),
        (lambda: bnn.GhostBatchNorm1d(4, 2, dtype=D), (5, 4, 3)),
    ],
    ids=["group", "layer", "instance", "renorm", "ghost"],
)
@pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)  # torch's AD
def test_modules_pass_gradcheck_and_gradgradcheck(module, shape):
    torch.manual_seed(0)
    mod = randomise(module())
    if isinstance(mod, bnn.BatchRenorm1d):
        # r and d are constants for backprop, so gradcheck (finite differences) agrees only
        # where both are clipped: sigma_B/sigma ~ 2/10 < 1/r_max, (mu_B - mu)/sigma ~ 0.6 > d_max
        with torch.no_grad():
            mod.running_mean.fill_(-5.0)
            mod.running_var.fill_(100.0)
        mod.r_max, mod.d_max = 1.5, 0.2
    x = randn(*shape).requires_grad_()
    params = tuple(p.detach().clone().requires_grad_() for p in mod.parameters())
    names = [n for n, _ in mod.named_parameters()]
    buffers = {k: v.clone() for k, v in mod.named_buffers()}

    def f(x, *ps):
        out = torch.func.functional_call(mod, dict(zip(names, ps, strict=True)), (x,))
        with torch.no_grad():  # every call starts from the same running statistics
            for k, v in mod.named_buffers():
                v.copy_(buffers[k])
        return out

    assert torch.autograd.gradcheck(f, (x, *params), check_forward_ad=True, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(f, (x, *params))


def test_normalize_function_vmap_matches_a_loop():
    mod = randomise(bnn.GroupNorm(2, 4, dtype=D))
    xs = randn(5, 3, 4, 6)
    batched = torch.func.vmap(mod)(xs)
    looped = torch.stack([mod(x) for x in xs])
    assert_close(batched, looped)


# ---------------------------------------------------------------------------
# Batch Renormalization against its definition
# ---------------------------------------------------------------------------


def renorm_reference(x, weight, bias, running_mean, running_var, eps, momentum, r_max, d_max):
    """The definition (Ioffe 2017, Algorithm 1), written out with autograd ops.

    Returns y and the updated running statistics."""
    axes = [0, *range(2, x.dim())]
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    mu_b = x.mean(axes, keepdim=True)
    var_b = ((x - mu_b) ** 2).mean(axes, keepdim=True)
    sigma_b = torch.sqrt(var_b + eps)
    sigma = torch.sqrt(running_var.reshape(shape) + eps)
    r = torch.clamp(sigma_b / sigma, 1 / r_max, r_max).detach()
    d = torch.clamp((mu_b - running_mean.reshape(shape)) / sigma, -d_max, d_max).detach()
    x_hat = (x - mu_b) / sigma_b
    y = weight.reshape(shape) * (x_hat * r + d) + bias.reshape(shape)
    m = x.numel() // x.shape[1]
    new_mean = (1 - momentum) * running_mean + momentum * mu_b.detach().reshape(-1)
    new_var = (1 - momentum) * running_var + momentum * var_b.detach().reshape(-1) * m / (m - 1)
    return y, new_mean, new_var


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "r_max, d_max", [(1.0, 0.0), (1.2, 0.1), (2.0, 0.5), (3.0, 5.0), (100.0, 100.0)]
)
@pytest.mark.parametrize(
    "cls, shape",
    [
        (bnn.BatchRenorm1d, (8, 3)),
        (bnn.BatchRenorm2d, (4, 3, 2, 3)),
        (bnn.BatchRenorm3d, (2, 3, 2, 2, 3)),
    ],
)
def test_batch_renorm_matches_its_definition(cls, shape, r_max, d_max, device):
    mod = randomise(cls(3, momentum=0.2, r_max=r_max, d_max=d_max, device=device, dtype=D))
    with torch.no_grad():  # running statistics far from the batch's, so the clipping acts
        mod.running_mean.copy_(torch.tensor([-1.0, 0.5, 3.0]))
        mod.running_var.copy_(torch.tensor([0.2, 1.0, 9.0]))
    w = mod.weight.detach().clone().requires_grad_()
    b = mod.bias.detach().clone().requires_grad_()
    rm, rv = mod.running_mean.clone(), mod.running_var.clone()
    clipped = False
    for step in range(3):
        x = randn(*shape, seed=step, loc=step - 1.0, device=device)
        xr, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
        var_b, mu_b = torch.var_mean(x, [0, *range(2, x.dim())], correction=0)
        sigma = (rv + mod.eps).sqrt()
        r, d = (var_b + mod.eps).sqrt() / sigma, (mu_b - rm) / sigma
        clipped |= bool(((r > r_max) | (r < 1 / r_max) | (d.abs() > d_max)).any())
        y_ref, rm, rv = renorm_reference(xr, w, b, rm, rv, mod.eps, 0.2, r_max, d_max)
        y = mod(xm)
        assert_close(y, y_ref, msg="forward")
        dy = randn(*shape, seed=50 + step, device=device)
        g_ref = torch.autograd.grad(y_ref, (xr, w, b), dy)
        y.backward(dy)
        for mine, theirs, n in zip(
            (xm.grad, mod.weight.grad, mod.bias.grad), g_ref, "xwb", strict=True
        ):
            assert_close(mine, theirs, msg=f"grad {n}")
        mod.zero_grad()
        assert_close(mod.running_mean, rm, msg="running_mean")
        assert_close(mod.running_var, rv, msg="running_var")
    assert int(mod.num_batches_tracked) == 3
    assert clipped == (r_max < 100)  # the limits act, except in the widest setting
    # eval mode is BatchNorm's
    mod.eval()
    ref = torch.nn.BatchNorm1d(3, device=device, dtype=D) if cls is bnn.BatchRenorm1d else None
    x = randn(*shape, seed=99, device=device)
    expected = TF.batch_norm(
        x, mod.running_mean, mod.running_var, mod.weight, mod.bias, False, 0.0, mod.eps
    )
    assert_close(mod(x), expected)
    del ref


def test_batch_renorm_with_r_max_1_and_d_max_0_trains_exactly_like_batch_norm():
    torch.manual_seed(0)

    def net(norm):
        torch.manual_seed(1)
        return torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3),
            norm,
            torch.nn.ReLU(),
            torch.nn.Flatten(),
            torch.nn.Linear(4 * 4 * 4, 3),
        ).double()

    a, b = net(torch.nn.BatchNorm2d(4)), net(bnn.BatchRenorm2d(4, r_max=1.0, d_max=0.0))
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (a, b)]
    for step in range(8):
        x = randn(8, 1, 6, 6, seed=step)
        t = torch.arange(8) % 3
        for m, opt in zip((a, b), opts, strict=True):
            opt.zero_grad()
            TF.cross_entropy(m(x), t).backward()
            opt.step()
    for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert k == k2
        assert_close(v2.double(), v.double(), msg=k)


def test_batch_renorm_signature_and_types():
    m = bnn.BatchRenorm2d(5)
    assert isinstance(m, torch.nn.BatchNorm2d) and isinstance(
        m, torch.nn.modules.batchnorm._BatchNorm
    )
    assert (m.eps, m.momentum, m.affine, m.r_max, m.d_max, m.track_running_stats) == (
        1e-5,
        0.1,
        True,
        3.0,
        5.0,
        True,
    )
    assert list(m.state_dict()) == list(torch.nn.BatchNorm2d(5).state_dict())
    assert "r_max=3.0, d_max=5.0" in repr(m)
    m.r_max, m.d_max = 1.5, 0.5  # plain attributes a schedule may change


# ---------------------------------------------------------------------------
# Ghost Batch Normalization against BatchNorm on each chunk
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("N, vbs", [(12, 4), (10, 4), (8, 3), (8, 8), (5, 16)])
@pytest.mark.parametrize(
    "cls, tail",
    [
        (bnn.GhostBatchNorm1d, ()),
        (bnn.GhostBatchNorm1d, (3,)),
        (bnn.GhostBatchNorm2d, (2, 3)),
        (bnn.GhostBatchNorm3d, (2, 1, 2)),
    ],
)
def test_ghost_batch_norm_is_batch_norm_on_each_chunk(cls, tail, N, vbs, momentum, device):
    C = 3
    mod = randomise(cls(C, vbs, momentum=momentum, device=device, dtype=D))
    ref = randomise(torch.nn.BatchNorm1d(C, momentum=momentum, device=device, dtype=D))
    rm, rv = mod.running_mean.clone(), mod.running_var.clone()
    for step in range(2):
        x = randn(N, C, *tail, seed=step, loc=step, device=device).requires_grad_()
        dy = randn(N, C, *tail, seed=10 + step, device=device)
        y = mod(x)
        chunks = x.split(vbs)
        expected = torch.cat(
            [TF.batch_norm(c, None, None, ref.weight, ref.bias, True) for c in chunks]
        )
        assert_close(y, expected)
        g_ref = torch.autograd.grad(expected, (x, ref.weight, ref.bias), dy)
        g = torch.autograd.grad(y, (x, mod.weight, mod.bias), dy)
        for a, b_ in zip(g, g_ref, strict=True):
            assert_close(a, b_)
        # documented update: one per call, chunk statistics weighted by chunk size
        axes = [0, *range(2, x.dim())]
        w = [c.shape[0] / N for c in chunks]
        mean = sum(wi * c.detach().mean(axes) for wi, c in zip(w, chunks, strict=True))
        var = sum(wi * c.detach().var(axes, correction=1) for wi, c in zip(w, chunks, strict=True))
        factor = momentum if momentum is not None else 1 / (step + 1)
        rm, rv = (1 - factor) * rm + factor * mean, (1 - factor) * rv + factor * var
        assert_close(mod.running_mean, rm)
        assert_close(mod.running_var, rv)
    assert int(mod.num_batches_tracked) == 2
    mod.eval()
    x = randn(N, C, *tail, seed=7, device=device)
    assert_close(mod(x), TF.batch_norm(x, rm, rv, mod.weight, mod.bias, False))


def test_ghost_with_one_chunk_is_torch_batch_norm():
    ref = randomise(torch.nn.BatchNorm2d(3, dtype=D))
    mine = bnn.GhostBatchNorm2d(3, virtual_batch_size=64, dtype=D)
    check_parity(ref, mine, (6, 3, 2, 2))
    assert isinstance(mine, torch.nn.BatchNorm2d)
    assert list(mine.state_dict()) == list(ref.state_dict())


def test_ghost_last_chunk_of_one_example_is_refused_and_changes_nothing():
    mod = bnn.GhostBatchNorm1d(3, 4, dtype=D)
    before = state_snapshot(mod)
    with pytest.raises(ValueError, match="last ghost batch.*virtual_batch_size"):
        mod(randn(9, 3))
    assert_same_state(before, state_snapshot(mod))


@pytest.mark.parametrize("vbs, exc", [(0, ValueError), (2.0, TypeError), (True, TypeError)])
def test_ghost_bad_virtual_batch_size(vbs, exc):
    with pytest.raises(exc, match="virtual_batch_size"):
        bnn.GhostBatchNorm1d(3, vbs)


# ---------------------------------------------------------------------------
# bad input to the modules: an error, and nothing changed
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, x, exc",
    [
        (lambda: bnn.GroupNorm(2, 4, dtype=D), randn(3, 6, 2), RuntimeError),
        (
            lambda: bnn.GroupNorm(2, 4, dtype=D),
            torch.ones(3, 4, 2, dtype=torch.long),
            NotImplementedError,
        ),
        (lambda: bnn.LayerNorm(5, dtype=D), randn(3, 4), RuntimeError),
        (
            lambda: bnn.InstanceNorm1d(4, track_running_stats=True, dtype=D),
            randn(3, 4, 1),
            ValueError,
        ),
        (lambda: bnn.BatchRenorm2d(4, dtype=D), randn(1, 4, 1, 1), ValueError),
        (lambda: bnn.BatchRenorm2d(4, dtype=D), randn(2, 4, 3), ValueError),
        (lambda: bnn.BatchRenorm2d(4, dtype=D), randn(2, 5, 3, 3), RuntimeError),
        (lambda: bnn.GhostBatchNorm2d(4, 2, dtype=D), randn(0, 4, 3, 3), ValueError),
        (
            lambda: bnn.GhostBatchNorm2d(4, 2, dtype=D),
            torch.ones(4, 4, 3, 3, dtype=torch.int32),
            NotImplementedError,
        ),
    ],
)
def test_family_bad_input_changes_nothing(make, x, exc):
    mod = randomise(make())
    before = state_snapshot(mod)
    with pytest.raises(exc):
        mod(x)
    assert_same_state(before, state_snapshot(mod))


# ---------------------------------------------------------------------------
# property test: any reduced axes, any parameter axes
# ---------------------------------------------------------------------------


@st.composite
def axis_choices(draw):
    ndim = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    axes = draw(st.lists(st.sampled_from(range(ndim)), min_size=1, max_size=ndim, unique=True))
    param_axes = draw(st.lists(st.sampled_from(range(ndim)), max_size=ndim, unique=True))
    seed = draw(st.integers(0, 2**16))
    return shape, tuple(axes), tuple(param_axes), seed


@settings(max_examples=60, deadline=None)
@given(axis_choices())
def test_normalize_backward_is_the_gradient_for_any_axes(choice):
    """normalize_backward equals autograd through a plain torch implementation of the forward."""
    shape, axes, param_axes, seed = choice
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=D) * 3 + 1).requires_grad_()
    pshape = [n if i in param_axes else 1 for i, n in enumerate(shape)]
    w = (torch.rand(pshape, generator=g, dtype=D) + 0.5).requires_grad_()
    b = torch.randn(pshape, generator=g, dtype=D).requires_grad_()
    dy = torch.randn(shape, generator=g, dtype=D)
    mean = x.mean(axes, keepdim=True)
    var = ((x - mean) ** 2).mean(axes, keepdim=True)
    y_ref = w * (x - mean) / torch.sqrt(var + 1e-5) + b
    ref = torch.autograd.grad(y_ref, (x, w, b), dy)
    y, cache = normalize_forward(x.detach(), w.detach(), b.detach(), axes, 1e-5, param_axes)
    dx, dw, db = normalize_backward(dy, cache)
    assert_close(y, y_ref.detach())
    assert_close(dx, ref[0])
    assert_close(dw.reshape(pshape), ref[1])
    assert_close(db.reshape(pshape), ref[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "make",
    [
        lambda cls, dt: cls.GroupNorm(2, 4, dtype=dt),
        lambda cls, dt: cls.LayerNorm((4, 3), dtype=dt),
        lambda cls, dt: cls.InstanceNorm1d(4, affine=True, track_running_stats=True, dtype=dt),
    ],
    ids=["group", "layer", "instance"],
)
def test_low_precision_matches_torch(make, dtype):
    """float16/bfloat16 are computed in float32, as torch does: the same rounded outputs."""
    ref, mine = make(torch.nn, dtype), make(bnn, dtype)
    mine.load_state_dict(ref.state_dict())
    x = randn(5, 4, 3).to(dtype)
    xr, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, ym = ref(xr), mine(xm)
    assert ym.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(ym, yr, atol=tol, rtol=tol)
    dy = randn(5, 4, 3, seed=3).to(dtype)
    yr.backward(dy)
    ym.backward(dy)
    assert xm.grad.dtype == dtype
    torch.testing.assert_close(xm.grad, xr.grad, atol=5 * tol, rtol=5 * tol)
    for p, q in zip(ref.parameters(), mine.parameters(), strict=True):
        assert q.grad.dtype == p.grad.dtype
        torch.testing.assert_close(q.grad, p.grad, atol=5 * tol * 15, rtol=5 * tol)
