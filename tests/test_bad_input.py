"""Bad input: torch's exception classes, messages that name the problem, and no state change."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from _helpers import DEVICES, assert_same_state, state_snapshot

import bnlib.nn as bnn
from bnlib.functional import (
    batch_norm_backward,
    batch_norm_backward_naive,
    batch_norm_forward,
    batch_norm_inference,
    running_average,
)

C = 4
TORCH_CLS = {"1d": torch.nn.BatchNorm1d, "2d": torch.nn.BatchNorm2d, "3d": torch.nn.BatchNorm3d}
BNLIB_CLS = {"1d": bnn.BatchNorm1d, "2d": bnn.BatchNorm2d, "3d": bnn.BatchNorm3d}
GOOD_SHAPE = {"1d": (6, C, 3), "2d": (3, C, 2, 3), "3d": (2, C, 2, 2, 3)}
CONFIGS = {
    "default": {},
    "momentum_none": {"momentum": None},
    "no_affine": {"affine": False},
    "no_track": {"track_running_stats": False},
}


def trained_pair(kind, device="cpu", **kwargs):
    """torch and bnlib modules with the same non-trivial state (two training steps)."""
    torch.manual_seed(0)
    ref = TORCH_CLS[kind](C, device=device, dtype=torch.float64, **kwargs)
    bn = BNLIB_CLS[kind](C, device=device, dtype=torch.float64, **kwargs)
    if ref.weight is not None:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-1, 1)
    bn.load_state_dict(ref.state_dict())
    for step in range(2):
        x = 1 + torch.randn(GOOD_SHAPE[kind], dtype=torch.float64, device=device) * (1 + step)
        for mod in (ref, bn):
            mod(x.clone().requires_grad_()).sum().backward()  # gradients exist too
    return ref, bn


def check_raises(ref, bn, x, exc, match, torch_raises=True):
    """bnlib raises ``exc`` matching ``match`` (as torch does, if it does); bnlib's state,
    parameters and gradients are bitwise unchanged afterwards."""
    if torch_raises:
        with pytest.raises(Exception) as info:
            ref(x.clone())
        assert type(info.value) is exc, f"torch raised {type(info.value).__name__}"
    before = state_snapshot(bn)
    xb = x.clone().requires_grad_(x.is_floating_point())
    with pytest.raises(exc, match=match):
        bn(xb)
    assert_same_state(before, state_snapshot(bn))
    assert xb.grad is None


# ---------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------

WRONG_RANK = [
    ("1d", (C,), r"expected 2D or 3D input \(got 1D input\)"),
    ("1d", (2, C, 3, 3), r"expected 2D or 3D input \(got 4D input\)"),
    ("2d", (2, C, 3), r"expected 4D input \(got 3D input\)"),
    ("2d", (2, C, 3, 3, 3), r"expected 4D input \(got 5D input\)"),
    ("3d", (2, C, 3, 3), r"expected 5D input \(got 4D input\)"),
    ("3d", (2, C, 2, 2, 2, 2), r"expected 5D input \(got 6D input\)"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("kind, shape, match", WRONG_RANK)
def test_wrong_rank(kind, shape, match, config, training, device):
    ref, bn = trained_pair(kind, device, **CONFIGS[config])
    ref.train(training)
    bn.train(training)
    x = torch.randn(shape, dtype=torch.float64, device=device)
    check_raises(ref, bn, x, ValueError, match)


ONE_VALUE = [("1d", (1, C)), ("1d", (1, C, 1)), ("2d", (1, C, 1, 1)), ("3d", (1, C, 1, 1, 1))]
MSG_ONE_VALUE = r"Expected more than 1 value per channel when training"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("kind, shape", ONE_VALUE)
def test_one_value_per_channel_in_training(kind, shape, config, device):
    ref, bn = trained_pair(kind, device, **CONFIGS[config])
    x = torch.randn(shape, dtype=torch.float64, device=device)
    check_raises(ref, bn, x, ValueError, MSG_ONE_VALUE)
    # in eval, without running statistics, batch statistics are used: the same error
    ref.eval()
    bn.eval()
    if not bn.track_running_stats:
        check_raises(ref, bn, x, ValueError, MSG_ONE_VALUE)
    else:  # with running statistics, a single example is fine, as in torch
        torch.testing.assert_close(bn(x), ref(x), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("config", list(CONFIGS) + ["no_affine_no_track"])
@pytest.mark.parametrize("kind", ["1d", "2d", "3d"])
@pytest.mark.parametrize("channels", [C - 1, C + 1], ids=["fewer", "more"])
def test_channel_count_mismatch(kind, channels, config, training, device):
    kwargs = CONFIGS.get(config, {"affine": False, "track_running_stats": False})
    ref, bn = trained_pair(kind, device, **kwargs)
    ref.train(training)
    bn.train(training)
    shape = list(GOOD_SHAPE[kind])
    shape[1] = channels
    x = torch.randn(shape, dtype=torch.float64, device=device)
    # torch has nothing to compare the channel count with when there are no per-channel
    # tensors at all; bnlib still checks it against num_features
    torch_raises = config != "no_affine_no_track"
    check_raises(ref, bn, x, RuntimeError, r"(?i)channel", torch_raises=torch_raises)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("module", ["BatchNorm1d", "SyncBatchNorm"])
def test_zero_channels_is_a_value_error(module, config, training):
    """num_features = 0: torch fails with an IndexError deep in its kernel; bnlib names the
    problem (it used to divide by zero while counting the values per channel)."""
    from bnlib.distributed import SyncBatchNorm

    cls = bnn.BatchNorm1d if module == "BatchNorm1d" else SyncBatchNorm
    bn = cls(0, dtype=torch.float64, **CONFIGS[config]).train(training)
    before = state_snapshot(bn)
    for shape in ((4, 0), (4, 0, 3)):
        with pytest.raises(ValueError, match=r"at least one channel.*\[4, 0"):
            bn(torch.randn(shape, dtype=torch.float64))
    assert_same_state(before, state_snapshot(bn))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eps", [0.0, -1e-3], ids=["zero", "negative"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("kind", ["1d", "2d", "3d"])
def test_non_positive_eps_in_training(kind, config, eps, device):
    ref, bn = trained_pair(kind, device, **CONFIGS[config])
    ref.eps = bn.eps = eps
    x = torch.randn(GOOD_SHAPE[kind], dtype=torch.float64, device=device)
    check_raises(ref, bn, x, ValueError, r"eps must be positive")


@pytest.mark.parametrize("kind", ["1d", "2d", "3d"])
def test_zero_eps_in_eval_with_running_stats_is_allowed(kind):
    ref, bn = trained_pair(kind)
    ref.eval()
    bn.eval()
    ref.eps = bn.eps = 0.0
    x = torch.randn(GOOD_SHAPE[kind], dtype=torch.float64)
    torch.testing.assert_close(bn(x), ref(x), atol=1e-12, rtol=1e-12)


# Regression test: eval with eps < 0 once returned an output instead of raising.
@pytest.mark.parametrize("kind", ["1d", "2d", "3d"])
def test_negative_eps_in_eval_raises_like_torch(kind):
    ref, bn = trained_pair(kind)
    ref.eval()
    bn.eval()
    ref.eps = bn.eps = -1e-3
    x = torch.randn(GOOD_SHAPE[kind], dtype=torch.float64)
    check_raises(ref, bn, x, ValueError, r"eps")


# Regression test: integer input once gave a truncated int64 output in eval.
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_integer_input(training):
    ref, bn = trained_pair("2d")
    ref.train(training)
    bn.train(training)
    x = torch.randint(0, 5, GOOD_SHAPE["2d"])
    check_raises(ref, bn, x, NotImplementedError, r"(?i)long|int|dtype|floating")


@pytest.mark.parametrize("kind", ["1d", "2d", "3d"])
def test_failed_call_then_good_call_matches_torch_without_the_extra_count(kind):
    """After a rejected batch, training continues as if the bad call never happened."""
    ref, bn = trained_pair(kind, momentum=None)
    bad = torch.randn((1, C) + (1,) * (len(GOOD_SHAPE[kind]) - 2), dtype=torch.float64)
    with pytest.raises(ValueError):
        bn(bad)  # not given to torch, which would count it
    x = torch.randn(GOOD_SHAPE[kind], dtype=torch.float64)
    torch.testing.assert_close(bn(x), ref(x), atol=1e-12, rtol=1e-12)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(bn.state_dict()[k], v, atol=1e-12, rtol=1e-12, msg=k)


def test_torch_counts_the_failed_call_and_bnlib_does_not():
    """The documented difference from torch: a call that raises changes nothing."""
    ref, bn = trained_pair("2d")
    bad = torch.randn(1, C, 1, 1, dtype=torch.float64)
    for mod in (ref, bn):
        with pytest.raises(ValueError):
            mod(bad)
    assert int(ref.num_batches_tracked) == 3
    assert int(bn.num_batches_tracked) == 2



# Regression test: a momentum of the wrong type once failed inside lerp_ (a list of
# overloads), after num_batches_tracked had been incremented.
@pytest.mark.parametrize("momentum", ["0.1", [0.1], True])
def test_momentum_of_wrong_type_raises_type_error_and_changes_nothing(momentum):
    _, bn = trained_pair("2d")
    bn.momentum = momentum
    before = state_snapshot(bn)
    x = torch.randn(GOOD_SHAPE["2d"], dtype=torch.float64)
    with pytest.raises(TypeError, match="momentum must be a float"):
        bn(x)
    assert_same_state(before, state_snapshot(bn))


# ---------------------------------------------------------------------------
# functional API
# ---------------------------------------------------------------------------

BACKENDS = ["numpy", "torch"]


def arr(a, backend):
    return a if backend == "numpy" else torch.from_numpy(a)


def good(backend, shape=(4, C, 3)):
    rng = np.random.default_rng(0)
    return (
        arr(rng.standard_normal(shape), backend),
        arr(rng.random(C) + 0.5, backend),
        arr(rng.standard_normal(C), backend),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["gamma", "beta"])
@pytest.mark.parametrize("length", [C - 1, C + 1])
def test_functional_per_channel_vector_of_wrong_length(backend, which, length):
    x, g, b = good(backend)
    wrong = arr(np.ones(length), backend)
    args = (x, wrong, b) if which == "gamma" else (x, g, wrong)
    with pytest.raises(RuntimeError, match=rf"{C} elements.*\({length},\)"):
        batch_norm_forward(*args)
    # torch's functional batch_norm raises the same class
    xt, gt, bt = (torch.as_tensor(np.asarray(a)) for a in args)
    with pytest.raises(RuntimeError):
        torch.nn.functional.batch_norm(xt, None, None, gt, bt, training=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["running_mean", "running_var", "gamma"])
def test_functional_inference_vector_of_wrong_length(backend, which):
    x, g, b = good(backend)
    vecs = {
        "running_mean": arr(np.zeros(C), backend),
        "running_var": arr(np.ones(C), backend),
        "gamma": g,
    }
    vecs[which] = arr(np.ones(C + 2), backend)
    with pytest.raises(RuntimeError, match=rf"{C} elements"):
        batch_norm_inference(x, vecs["gamma"], b, vecs["running_mean"], vecs["running_var"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(C,), ()], ids=["1D", "0D"])
def test_functional_input_of_rank_below_2(backend, shape):
    x = arr(np.ones(shape), backend)
    msg = rf"expected at least 2D input \(got {len(shape)}D input\)"
    with pytest.raises(ValueError, match=msg):
        batch_norm_forward(x, None, None)
    with pytest.raises(ValueError, match=r"at least 2D"):
        batch_norm_inference(x, None, None, arr(np.zeros(C), backend), arr(np.ones(C), backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan")], ids=["zero", "negative", "nan"])
def test_functional_non_positive_eps(backend, eps):
    x, g, b = good(backend)
    with pytest.raises(ValueError, match=r"eps must be positive"):
        batch_norm_forward(x, g, b, eps=eps)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, C), (1, C, 1), (1, C, 1, 1)])
def test_functional_one_value_per_channel(backend, shape):
    x = arr(np.ones(shape), backend)
    with pytest.raises(ValueError, match=MSG_ONE_VALUE):
        batch_norm_forward(x, None, None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("axis", [3, -4])
def test_functional_channel_axis_out_of_range(backend, axis):
    x, g, b = good(backend)
    with pytest.raises(ValueError, match=r"channel_axis"):
        batch_norm_forward(x, g, b, channel_axis=axis)


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_does_not_modify_its_inputs(backend):
    x, g, b = good(backend)
    dy = arr(np.random.default_rng(1).standard_normal(tuple(x.shape)), backend)
    copies = [np.array(np.asarray(a), copy=True) for a in (x, g, b, dy)]
    _, cache = batch_norm_forward(x, g, b)
    batch_norm_backward(dy, cache)
    for a, c in zip((x, g, b, dy), copies, strict=True):
        assert np.array_equal(np.asarray(a), c)


# ---------------------------------------------------------------------------
# functional API: strict inputs (issue 11, item 5). Each of these failed on main.
# ---------------------------------------------------------------------------

NON_FLOAT = {
    "numpy": [np.int64, np.int32, np.bool_, np.complex128],
    "torch": [torch.int64, torch.int32, torch.bool, torch.complex128],
}


def cast(a, backend, dtype):
    return a.astype(dtype) if backend == "numpy" else torch.from_numpy(a).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", range(4), ids=["int64", "int32", "bool", "complex"])
def test_functional_non_floating_input_is_a_type_error_naming_the_dtype(backend, k):
    dtype = NON_FLOAT[backend][k]
    x = cast(np.arange(32.0).reshape(4, C, 2) % 3, backend, dtype)
    name = str(x.dtype)
    with pytest.raises(TypeError, match=rf"{name}.*floating"):
        batch_norm_forward(x, None, None)
    with pytest.raises(TypeError, match=rf"{name}.*floating"):
        batch_norm_inference(x, None, None, arr(np.zeros(C), backend), arr(np.ones(C), backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("backward", [batch_norm_backward, batch_norm_backward_naive])
@pytest.mark.parametrize("dy_shape", [(1, C, 3), (4, C, 1), (4, C), (2, 4, C, 3)])
def test_functional_dy_of_another_shape_is_refused(backend, backward, dy_shape):
    """Broadcasting dy used to give wrong gradients (dbeta = 1 instead of N)."""
    x, g, b = good(backend)
    _, cache = batch_norm_forward(x, g, b)
    dy = arr(np.ones(dy_shape), backend)
    with pytest.raises(
        ValueError, match=rf"dy has shape {re.escape(str(dy_shape))}.*\(4, {C}, 3\)"
    ):
        backward(dy, cache)


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_non_floating_dy(backend):
    x, g, b = good(backend)
    _, cache = batch_norm_forward(x, g, b)
    dy = cast(np.ones(tuple(x.shape)), backend, NON_FLOAT[backend][0])
    with pytest.raises(TypeError, match=r"dy has dtype"):
        batch_norm_backward(dy, cache)


@pytest.mark.parametrize("which", ["gamma", "beta"])
@pytest.mark.parametrize("x_backend", BACKENDS)
def test_functional_mixed_array_libraries(x_backend, which):
    other = "numpy" if x_backend == "torch" else "torch"
    x, g, b = good(x_backend)
    foreign = arr(np.ones(C), other)
    args = (x, foreign, b) if which == "gamma" else (x, g, foreign)
    lib_x, lib_v = ("torch", "numpy") if x_backend == "torch" else ("numpy", "torch")
    with pytest.raises(TypeError, match=rf"is a {lib_v} array but x is a {lib_x} array"):
        batch_norm_forward(*args)
    with pytest.raises(TypeError, match=r"but x is a"):
        batch_norm_inference(x, None, None, foreign, arr(np.ones(C), x_backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_mixed_libraries_in_backward(backend):
    x, g, b = good(backend)
    _, cache = batch_norm_forward(x, g, b)
    other = "numpy" if backend == "torch" else "torch"
    with pytest.raises(TypeError, match=r"dy is a .* array but the forward input"):
        batch_norm_backward(arr(np.ones(tuple(x.shape)), other), cache)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("container", [list, tuple])
def test_functional_lists_are_accepted_and_converted(backend, container):
    """Decision: Python lists/tuples of numbers are per-channel vectors too."""
    x, g, b = good(backend)
    y_list, _ = batch_norm_forward(
        x, container(np.asarray(g).tolist()), container(np.asarray(b).tolist())
    )
    y_arr, _ = batch_norm_forward(x, g, b)
    assert type(y_list) is type(y_arr)
    np.testing.assert_allclose(np.asarray(y_list), np.asarray(y_arr), rtol=1e-14, atol=1e-14)
    rm, rv = container([0.0] * C), container([1.0] * C)
    y_inf = batch_norm_inference(x, None, None, rm, rv)
    assert type(y_inf) is type(x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", ["a string", 3.0, {"a": 1}])
def test_functional_non_array_gamma(backend, bad):
    x, _, b = good(backend)
    with pytest.raises(TypeError, match=r"weight \(gamma\) must be an array of x's library"):
        batch_norm_forward(x, bad, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_non_array_x(backend):
    with pytest.raises(TypeError, match=r"x must be a NumPy array or a torch tensor, got list"):
        batch_norm_forward([[1.0, 2.0], [3.0, 4.0]], None, None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", [-1.0, -1e-8, float("nan")])
def test_functional_inference_negative_eps(backend, eps):
    """eps = -1 used to give NaN silently."""
    x, g, b = good(backend)
    with pytest.raises(ValueError, match=r"eps must be non-negative"):
        batch_norm_inference(x, g, b, arr(np.zeros(C), backend), arr(np.ones(C), backend), eps=eps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_inference_zero_eps_is_allowed(backend):
    x, g, b = good(backend)
    y = batch_norm_inference(x, g, b, arr(np.zeros(C), backend), arr(np.ones(C), backend), eps=0.0)
    np.testing.assert_allclose(
        np.asarray(y), np.asarray(x * g.reshape(1, C, 1) + b.reshape(1, C, 1))
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("missing", ["running_mean", "running_var"])
def test_functional_inference_missing_running_stats(backend, missing):
    x, g, b = good(backend)
    stats = {"running_mean": arr(np.zeros(C), backend), "running_var": arr(np.ones(C), backend)}
    stats[missing] = None
    with pytest.raises(RuntimeError, match=rf"{missing} is None.*batch_norm_forward"):
        batch_norm_inference(x, g, b, stats["running_mean"], stats["running_var"])
    if backend == "torch":  # torch raises the same class
        with pytest.raises(RuntimeError):
            torch.nn.functional.batch_norm(x, stats["running_mean"], stats["running_var"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, C), (0, C, 3), (4, C, 0), (2, C, 0, 3)])
def test_functional_empty_batch_is_a_value_error_without_warnings(backend, shape):
    import warnings

    x = arr(np.ones(shape), backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning would fail the test
        with pytest.raises(ValueError, match=r"empty batch.*skip empty batches"):
            batch_norm_forward(x, None, None)
        # inference needs no statistics of the batch: an empty batch gives an empty output
        y = batch_norm_inference(x, None, None, arr(np.zeros(C), backend), arr(np.ones(C), backend))
    assert tuple(y.shape) == shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("axis", [1.0, "1", None, True])
def test_functional_channel_axis_must_be_an_int(backend, axis):
    x, g, b = good(backend)
    with pytest.raises(TypeError, match=r"channel_axis must be an int"):
        batch_norm_forward(x, g, b, channel_axis=axis)
    with pytest.raises(TypeError, match=r"channel_axis must be an int"):
        batch_norm_inference(
            x, g, b, arr(np.zeros(C), backend), arr(np.ones(C), backend), channel_axis=axis
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_numpy_integer_channel_axis_is_fine(backend):
    x, g, b = good(backend)
    y1, _ = batch_norm_forward(x, g, b, channel_axis=np.int64(1))
    y2, _ = batch_norm_forward(x, g, b, channel_axis=1)
    assert np.array_equal(np.asarray(y1), np.asarray(y2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", ["1e-5", None])
def test_functional_eps_of_wrong_type(backend, eps):
    x, g, b = good(backend)
    with pytest.raises(TypeError, match=r"eps must be a real number"):
        batch_norm_forward(x, g, b, eps=eps)


@pytest.mark.parametrize("momentum", ["0.1", None, [0.1], True])
def test_running_average_momentum_of_wrong_type(momentum):
    with pytest.raises(TypeError, match=r"momentum must be a real number"):
        running_average(np.zeros(C), np.ones(C), momentum)


@pytest.mark.parametrize("momentum", [-0.1, 1.5, float("nan")])
def test_running_average_momentum_out_of_range(momentum):
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        running_average(np.zeros(C), np.ones(C), momentum)


def test_running_average_is_the_bn_update():
    r, bt = np.array([1.0, 2.0]), np.array([3.0, -2.0])
    np.testing.assert_allclose(running_average(r, bt, 0.25), 0.75 * r + 0.25 * bt)


@pytest.mark.parametrize("cls", ["BatchRenorm2d", "GhostBatchNorm2d", "InstanceNorm2d"])
def test_family_module_momentum_of_wrong_type_changes_nothing(cls):
    kwargs = {"virtual_batch_size": 2} if cls.startswith("Ghost") else {}
    if cls.startswith("Instance"):
        kwargs["track_running_stats"] = True
    mod = getattr(bnn, cls)(C, dtype=torch.float64, **kwargs)
    mod.momentum = "0.1"
    before = state_snapshot(mod)
    with pytest.raises(TypeError, match=r"momentum must be a float"):
        mod(torch.randn(4, C, 3, 3, dtype=torch.float64))
    assert_same_state(before, state_snapshot(mod))
