"""bnlib.nn against torch.nn: modules, autograd Function, state, convert."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from _helpers import DEVICES, assert_close, assert_same_state, state_snapshot
from torch.utils._python_dispatch import TorchDispatchMode

import bnlib.nn as bnn
from bnlib.nn import BatchNormFunction

TORCH_CLS = {"1d": torch.nn.BatchNorm1d, "2d": torch.nn.BatchNorm2d, "3d": torch.nn.BatchNorm3d}
BNLIB_CLS = {"1d": bnn.BatchNorm1d, "2d": bnn.BatchNorm2d, "3d": bnn.BatchNorm3d}
C = 4
# (kind, input shape): ranks 2 to 5; BatchNorm1d takes both (N, C) and (N, C, L)
CASES = [
    pytest.param("1d", (8, C), id="1d-rank2"),
    pytest.param("1d", (5, C, 6), id="1d-rank3"),
    pytest.param("2d", (4, C, 3, 5), id="2d-rank4"),
    pytest.param("3d", (3, C, 2, 3, 4), id="3d-rank5"),
]
AFFINE = {  # name -> constructor keywords
    "affine": {"affine": True},
    "no_affine": {"affine": False},
    "no_bias": {"affine": True, "bias": False},
}


def make_pair(kind, dtype=torch.float64, device="cpu", seed=0, **kwargs):
    """A torch BatchNorm and a bnlib BatchNorm with the same (random) parameters."""
    ref = TORCH_CLS[kind](C, device=device, dtype=dtype, **kwargs)
    bn = BNLIB_CLS[kind](C, device=device, dtype=dtype, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if ref.weight is not None:
            ref.weight.copy_(0.5 + torch.rand(C, generator=g, dtype=torch.float64))
        if ref.bias is not None:
            ref.bias.copy_(torch.randn(C, generator=g, dtype=torch.float64))
    bn.load_state_dict(ref.state_dict())
    return ref, bn


def make_input(shape, dtype=torch.float64, device="cpu", seed=0, offset=1.0, scale=1.0):
    """Random input with per-channel offsets and scales, so every channel has its own stats."""
    g = torch.Generator().manual_seed(seed)
    bshape = [1] * len(shape)
    bshape[1] = shape[1]
    ch = torch.arange(shape[1], dtype=torch.float64).reshape(bshape)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * (scale + 0.5 * ch) + offset * ch
    return x.to(device=device, dtype=dtype)


def check_step(ref, bn, x, dtype, seed, lr=0.1):
    """One forward+backward through both modules; compare everything; apply one SGD step."""
    g = torch.Generator().manual_seed(1000 + seed)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x)
    xr = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    yr, yb = ref(xr), bn(xb)
    assert yb.dtype == yr.dtype and yb.device == yr.device and yb.shape == yr.shape
    assert_close(yb, yr, dtype, "output")
    yr.backward(dy)
    yb.backward(dy)
    assert_close(xb.grad, xr.grad, dtype, "input grad")
    for name in ("weight", "bias"):
        pr, pb = getattr(ref, name), getattr(bn, name)
        assert (pr is None) == (pb is None), name
        if pr is not None:
            assert_close(pb.grad, pr.grad, dtype, f"{name} grad")
    for name in ("running_mean", "running_var"):
        assert_close(getattr(bn, name), getattr(ref, name), dtype, name)
    if ref.num_batches_tracked is None:
        assert bn.num_batches_tracked is None
    else:
        assert bn.num_batches_tracked.dtype == torch.long
        assert torch.equal(bn.num_batches_tracked, ref.num_batches_tracked)
    with torch.no_grad():  # move the parameters, identically, so later steps see new values
        for mod in (ref, bn):
            for p in mod.parameters():
                p -= lr * p.grad.to(p.dtype)
                p.grad = None


def run_sequence(ref, bn, shape, dtype, device, modes="TTTEETTE"):
    for i, mode in enumerate(modes):
        ref.train(mode == "T")
        bn.train(mode == "T")
        x = make_input(shape, dtype, device, seed=i, offset=1.0 + 0.25 * i, scale=1.0 + 0.2 * i)
        check_step(ref, bn, x, dtype, seed=i)


# ---------------------------------------------------------------------------
# parity over multi-step train / eval / train sequences
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("track", [True, False], ids=["track", "no_track"])
@pytest.mark.parametrize("affine", list(AFFINE))
@pytest.mark.parametrize("momentum", [0.1, None, 0.3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind, shape", CASES)
def test_parity_train_eval_sequence(kind, shape, dtype, momentum, affine, track, device):
    ref, bn = make_pair(
        kind, dtype, device, momentum=momentum, track_running_stats=track, **AFFINE[affine]
    )
    run_sequence(ref, bn, shape, dtype, device)
    if track:  # the statistics really moved
        assert int(bn.num_batches_tracked) == 5
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))


@pytest.mark.parametrize("device", DEVICES)
def test_eval_without_tracking_uses_batch_statistics(device):
    bn = bnn.BatchNorm2d(C, track_running_stats=False, device=device, dtype=torch.float64)
    bn.eval()
    x = make_input((4, C, 3, 3), device=device)
    y = bn(x)
    mean = y.mean(dim=(0, 2, 3))
    var = y.var(dim=(0, 2, 3), correction=0)
    assert_close(mean, torch.zeros_like(mean))
    var_x = x.var(dim=(0, 2, 3), correction=0)
    assert_close(var, var_x / (var_x + bn.eps))


@pytest.mark.parametrize("kind, shape", CASES)
def test_large_offset_float32_module(kind, shape):
    g = torch.Generator().manual_seed(0)
    big = (shape[0] * 64,) + tuple(shape[1:])
    x = 1e4 + torch.randn(big, generator=g)
    bn = BNLIB_CLS[kind](C)
    y = bn(x)
    dims = [d for d in range(x.dim()) if d != 1]
    assert y.mean(dim=dims).abs().max() < 1e-2
    assert (y.var(dim=dims, correction=0) - 1).abs().max() < 1e-2
    assert torch.allclose(bn.running_mean, torch.full((C,), 1e3), rtol=1e-4)


# Regression test: the fast backward once computed b*(x - mean) as b*x - b*mean,
# which cancels at large offsets (about 5x torch's error in float32).
@pytest.mark.parametrize("mix", [0.5, 1.0])
def test_large_offset_float32_backward_accuracy(mix):
    """dx in float32 at x = 1e4 + N(0, 1) is about as accurate as torch's native kernel.

    The upstream gradient is partly aligned with x_hat (``mix``), as with a loss that
    depends on the size of the output; then most of the terms of dx cancel.
    """
    g = torch.Generator().manual_seed(0)
    x = 1e4 + torch.randn(32, C, 8, 8, generator=g)
    x_hat = torch.nn.functional.batch_norm(x.double(), None, None, training=True)
    dy = (mix * x_hat + (1 - mix) * torch.randn(x.shape, generator=g).double()).float()
    x64 = x.double().requires_grad_()
    torch.nn.functional.batch_norm(x64, None, None, training=True).backward(dy.double())
    errors = {}
    for name, mod in (("torch", torch.nn.BatchNorm2d(C)), ("bnlib", bnn.BatchNorm2d(C))):
        xx = x.clone().requires_grad_()
        mod(xx).backward(dy)
        errors[name] = float((xx.grad.double() - x64.grad).abs().max() / dy.abs().max())
    assert errors["bnlib"] <= 2 * errors["torch"] + 1e-6, errors


@pytest.mark.parametrize("offset", [1e4, 1e5])
def test_large_offset_float32_far_more_accurate_than_torch(offset):
    """The corrected two pass (forward and backward) keeps float32 output and dx errors
    near float32 rounding at large offsets, where torch's kernel loses about
    log10(offset) digits (measured: 1e3 to 1e4 times bnlib's error)."""
    g = torch.Generator().manual_seed(0)
    x = offset + torch.randn(32, C, 8, 8, generator=g)
    dy = torch.randn(x.shape, generator=g)
    x64 = x.double().requires_grad_()
    y64 = torch.nn.functional.batch_norm(x64, None, None, training=True)
    y64.backward(dy.double())
    errors = {}
    for name, mod in (("torch", torch.nn.BatchNorm2d(C)), ("bnlib", bnn.BatchNorm2d(C))):
        xx = x.clone().requires_grad_()
        y = mod(xx)
        y.backward(dy)
        errors[name] = (
            float((y.detach().double() - y64).abs().max()),
            float((xx.grad.double() - x64.grad).abs().max() / dy.abs().max()),
        )
    for i in range(2):
        assert errors["bnlib"][i] < 2e-6 and errors["bnlib"][i] < errors["torch"][i] / 50, errors


# ---------------------------------------------------------------------------
# construction, repr, state_dict
# ---------------------------------------------------------------------------

CONFIGS = [
    {},
    {"eps": 1e-3, "momentum": None},
    {"momentum": 0.3, "affine": False},
    {"bias": False},
    {"track_running_stats": False},
    {"affine": False, "track_running_stats": False},
]


@pytest.mark.parametrize("kwargs", CONFIGS)
@pytest.mark.parametrize("kind", ["1d", "2d", "3d"])
def test_repr_parameters_buffers(kind, kwargs):
    ref, bn = TORCH_CLS[kind](5, **kwargs), BNLIB_CLS[kind](5, **kwargs)
    assert repr(bn) == repr(ref)
    assert [n for n, _ in bn.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in bn.named_buffers()] == [n for n, _ in ref.named_buffers()]
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        a, b = getattr(ref, name), getattr(bn, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert type(a) is type(b) and a.dtype == b.dtype and torch.equal(a, b), name
    for p, q in zip(ref.parameters(), bn.parameters(), strict=True):
        assert p.requires_grad == q.requires_grad


@pytest.mark.parametrize("kwargs", CONFIGS)
@pytest.mark.parametrize("kind", ["1d", "2d", "3d"])
def test_state_dict_both_ways(kind, kwargs):
    shape = dict((c.values[0], c.values[1]) for c in CASES)[kind]
    ref, bn = make_pair(kind, **kwargs)
    run_sequence(ref, bn, shape, torch.float64, "cpu", modes="TTE")
    sd_ref, sd_bn = ref.state_dict(), bn.state_dict()
    assert list(sd_ref) == list(sd_bn)
    assert sd_bn._metadata[""]["version"] == sd_ref._metadata[""]["version"] == 2
    # torch -> bnlib (strict)
    fresh_bn = BNLIB_CLS[kind](C, dtype=torch.float64, **kwargs)
    fresh_bn.load_state_dict(sd_ref, strict=True)
    for k, v in fresh_bn.state_dict().items():
        assert v.dtype == sd_ref[k].dtype and torch.equal(v, sd_ref[k]), k
    # bnlib -> torch (strict)
    fresh_ref = TORCH_CLS[kind](C, dtype=torch.float64, **kwargs)
    fresh_ref.load_state_dict(sd_bn, strict=True)
    for k, v in fresh_ref.state_dict().items():
        assert torch.equal(v, sd_bn[k]), k


@pytest.mark.parametrize("metadata", ["version1", "no_version", "no_metadata"])
@pytest.mark.parametrize("kind", ["1d", "2d", "3d"])
def test_old_state_dict_without_num_batches_tracked(kind, metadata):
    src = TORCH_CLS[kind](C)
    with torch.no_grad():
        src.running_mean.fill_(0.25)
        src.weight.fill_(2.0)
    sd = src.state_dict()
    del sd["num_batches_tracked"]
    if metadata == "version1":
        sd._metadata[""]["version"] = 1
    elif metadata == "no_version":
        del sd._metadata[""]["version"]
    else:
        del sd._metadata
    for cls in (TORCH_CLS[kind], BNLIB_CLS[kind]):
        m = cls(C)
        m.load_state_dict(copy.copy(sd), strict=True)
        assert m.num_batches_tracked.dtype == torch.long
        assert int(m.num_batches_tracked) == 0, cls
        assert torch.all(m.running_mean == 0.25) and torch.all(m.weight == 2.0)


def test_old_state_dict_into_trained_module_keeps_count_like_torch():
    """Loading a pre-version-2 state dict leaves a trained module's counter as it was."""
    sd = torch.nn.BatchNorm2d(C).state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1
    counts = []
    for cls in (torch.nn.BatchNorm2d, bnn.BatchNorm2d):
        m = cls(C)
        for _ in range(3):
            m(torch.randn(4, C, 2, 2))
        m.load_state_dict(copy.copy(sd), strict=True)
        counts.append(int(m.num_batches_tracked))
    assert counts == [3, 3]


def test_current_state_dict_without_num_batches_tracked_is_missing_key():
    sd = torch.nn.BatchNorm2d(C).state_dict()  # version 2: the key is required
    del sd["num_batches_tracked"]
    for cls in (torch.nn.BatchNorm2d, bnn.BatchNorm2d):
        with pytest.raises(RuntimeError, match="num_batches_tracked"):
            cls(C).load_state_dict(sd, strict=True)


@pytest.mark.parametrize("kind, shape", CASES)
def test_reset_running_stats_and_parameters(kind, shape):
    ref, bn = make_pair(kind, momentum=0.3)
    run_sequence(ref, bn, shape, torch.float64, "cpu", modes="TTT")
    ref.reset_running_stats()
    bn.reset_running_stats()
    assert int(bn.num_batches_tracked) == 0
    assert torch.all(bn.running_mean == 0) and torch.all(bn.running_var == 1)
    assert not torch.all(bn.weight == 1)  # parameters untouched by reset_running_stats
    for k, v in ref.state_dict().items():
        assert_close(bn.state_dict()[k], v, msg=k)
    run_sequence(ref, bn, shape, torch.float64, "cpu", modes="TT")
    ref.reset_parameters()
    bn.reset_parameters()
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    assert int(bn.num_batches_tracked) == 0
    for k, v in ref.state_dict().items():
        assert torch.equal(bn.state_dict()[k], v), k  # all reset: exactly equal


# ---------------------------------------------------------------------------
# dtype / device moves, pickling, empty batches
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind, shape", CASES)
def test_double(kind, shape):
    ref, bn = make_pair(kind, dtype=torch.float32, momentum=None)
    ref, bn = ref.double(), bn.double()
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert getattr(bn, name).dtype == torch.float64, name
    assert bn.num_batches_tracked.dtype == torch.long
    run_sequence(ref, bn, shape, torch.float64, "cpu", modes="TTET")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind, shape", CASES)
def test_to_device(kind, shape, device):
    ref, bn = make_pair(kind, dtype=torch.float64)
    ref, bn = ref.to(device), bn.to(device)
    for t in list(bn.parameters()) + list(bn.buffers()):
        assert t.device.type == device
    run_sequence(ref, bn, shape, torch.float64, device, modes="TTET")
    back = bn.to("cpu")
    assert all(t.device.type == "cpu" for t in back.state_dict().values())


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "torch.save"])
@pytest.mark.parametrize("kind, shape", CASES)
def test_pickling(kind, shape, how):
    ref, bn = make_pair(kind, momentum=None)
    run_sequence(ref, bn, shape, torch.float64, "cpu", modes="TT")
    if how == "pickle":
        clone = pickle.loads(pickle.dumps(bn))
    elif how == "deepcopy":
        clone = copy.deepcopy(bn)
    else:
        buf = io.BytesIO()
        torch.save(bn, buf)
        buf.seek(0)
        clone = torch.load(buf, weights_only=False)
    assert type(clone) is type(bn) and repr(clone) == repr(bn)
    assert clone.training == bn.training
    assert_same_state(state_snapshot(clone), state_snapshot(bn))
    assert clone.running_mean.data_ptr() != bn.running_mean.data_ptr()
    # the copy trains on exactly like the original, and like torch
    run_sequence(ref, clone, shape, torch.float64, "cpu", modes="TTET")
    assert int(bn.num_batches_tracked) == 2  # the original is untouched


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("track", [True, False], ids=["track", "no_track"])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize(
    "kind, shape",
    [("1d", (0, C)), ("1d", (0, C, 5)), ("2d", (0, C, 3, 3)), ("3d", (0, C, 2, 2, 2)),
     ("2d", (2, C, 0, 3))],
)
def test_empty_batch(kind, shape, momentum, track, device):
    ref, bn = make_pair(kind, device=device, momentum=momentum, track_running_stats=track)
    full = (3,) + shape[1:]
    run_sequence(ref, bn, full, torch.float64, device, modes="T")
    before = state_snapshot(bn)
    for mode in ("train", "eval"):
        ref.train(mode == "train")
        bn.train(mode == "train")
        xr = torch.zeros(shape, dtype=torch.float64, device=device, requires_grad=True)
        xb = torch.zeros(shape, dtype=torch.float64, device=device, requires_grad=True)
        yr, yb = ref(xr), bn(xb)
        assert yb.shape == yr.shape == shape and yb.dtype == torch.float64
        assert yb.device == xb.device
        yr.sum().backward()
        yb.sum().backward()
        assert xb.grad.shape == shape
        for name in ("weight", "bias"):
            assert torch.equal(getattr(bn, name).grad, torch.zeros(C, dtype=torch.float64,
                                                                   device=device))
            assert torch.equal(getattr(bn, name).grad, getattr(ref, name).grad)
            getattr(bn, name).grad = None
            getattr(ref, name).grad = None
        for name in ("running_mean", "running_var"):
            if track:
                assert torch.equal(getattr(bn, name), before[name]), name
            assert_close(getattr(bn, name), getattr(ref, name))
        if track:
            expected = int(before["num_batches_tracked"]) + 1  # incremented once, in train
            assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == expected
    # and the next real batches still match torch (momentum=None depends on the count)
    run_sequence(ref, bn, full, torch.float64, device, modes="TTE")


@pytest.mark.parametrize("params", ["same", "float32"], ids=["all_low", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_low_precision_module(dtype, params):
    """Half-precision input, with parameters in the same dtype or in float32, as torch allows."""
    ref, bn = make_pair("2d", dtype=torch.float32)
    if params == "same":
        ref, bn = ref.to(dtype), bn.to(dtype)
    ulp = 2.0**-10 if dtype == torch.float16 else 2.0**-7
    for i, mode in enumerate("TTE"):
        ref.train(mode == "T")
        bn.train(mode == "T")
        x = make_input((8, C, 4, 4), seed=i).to(dtype)
        xr, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, yb = ref(xr), bn(xb)
        assert yb.dtype == yr.dtype == dtype
        dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(i)).to(dtype)
        yr.backward(dy)
        yb.backward(dy)
        for a, b, name in ((yb, yr, "y"), (xb.grad, xr.grad, "dx")):
            assert a.dtype == b.dtype, name
            a, b = a.float(), b.float()
            assert torch.all((a - b).abs() <= 2 * ulp * b.abs().clamp(min=1)), name
        for name in ("weight", "bias", "running_mean", "running_var"):
            a, b = getattr(bn, name), getattr(ref, name)
            a, b = (a.grad, b.grad) if name in ("weight", "bias") else (a, b)
            assert a.dtype == b.dtype, name
            tol = 2 * ulp if b.dtype == dtype else 1e-4
            a, b = a.float(), b.float()
            assert torch.all((a - b).abs() <= tol * b.abs().clamp(min=1)), name
        ref.zero_grad()
        bn.zero_grad()


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_memory_format(device):
    ref, bn = make_pair("2d", device=device)
    x = make_input((4, C, 5, 6), device=device).to(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    check_step(ref, bn, x, torch.float64, seed=0)
    yr, yb = ref(x), bn(x)
    assert yb.is_contiguous(memory_format=torch.channels_last) == yr.is_contiguous(
        memory_format=torch.channels_last)


@pytest.mark.parametrize("kind, shape", CASES)
def test_training_forward_under_no_grad(kind, shape):
    ref, bn = make_pair(kind, momentum=None)
    with torch.no_grad():
        for i in range(3):
            x = make_input(shape, seed=i, offset=1 + i)
            assert_close(bn(x), ref(x))
    for k, v in ref.state_dict().items():
        assert_close(bn.state_dict()[k], v, msg=k)


# ---------------------------------------------------------------------------
# the autograd Function: bnlib's math, gradcheck, memory
# ---------------------------------------------------------------------------

class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind, shape", CASES)
def test_no_torch_batch_norm_kernel(kind, shape):
    bn = BNLIB_CLS[kind](C, dtype=torch.float64)
    x = make_input(shape).requires_grad_()
    with _OpRecorder() as rec:
        bn(x).square().sum().backward()
        bn.eval()
        bn(x).sum().backward()
    assert rec.ops, "the recorder saw nothing"
    assert not [op for op in rec.ops if "norm" in op], rec.ops
    # sanity: the recorder would have seen torch's kernel
    with _OpRecorder() as rec:
        torch.nn.functional.batch_norm(x, None, None, training=True).sum().backward()
    assert any("batch_norm" in op for op in rec.ops)


def test_module_backward_is_bnlib_function():
    bn = bnn.BatchNorm2d(C, dtype=torch.float64)
    y = bn(make_input((2, C, 3, 3)).requires_grad_())
    assert "BatchNormFunction" in type(y.grad_fn).__name__


def _inputs(affine, shape=(3, C, 2, 3), seed=0):
    x = make_input(shape, seed=seed).requires_grad_()
    g = torch.Generator().manual_seed(seed + 1)
    w = (0.5 + torch.rand(C, generator=g, dtype=torch.float64)).requires_grad_()
    b = torch.randn(C, generator=g, dtype=torch.float64).requires_grad_()
    if affine == "affine":
        return x, w, b
    if affine == "no_bias":
        return x, w, None
    return x, None, None


@pytest.mark.parametrize("affine", list(AFFINE))
def test_gradcheck_function(affine):
    x, w, b = _inputs(affine)
    args = tuple(t for t in (x, w, b) if t is not None)

    def f(*a):
        xx = a[0]
        ww = a[1] if w is not None else None
        bb = a[2] if b is not None else None
        return BatchNormFunction.apply(xx, ww, bb, 1e-3)  # (y, mean, var)

    out = f(*args)
    assert len(out) == 3 and not out[1].requires_grad and not out[2].requires_grad
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


@pytest.mark.parametrize("affine", ["affine", "no_affine", "no_bias"])
def test_gradcheck_module(affine):
    bn = bnn.BatchNorm2d(C, dtype=torch.float64, **AFFINE[affine])
    x, w, b = _inputs(affine, seed=3)
    names = [n for n, _ in bn.named_parameters()]
    params = [t for t in (w, b) if t is not None][: len(names)]

    def f(xx, *ps):
        return torch.func.functional_call(bn, dict(zip(names, ps, strict=True)), (xx,))

    assert torch.autograd.gradcheck(f, (x, *params))
    assert torch.autograd.gradgradcheck(f, (x, *params))


@pytest.mark.parametrize("through", ["function", "module"])
@pytest.mark.parametrize("affine", list(AFFINE))
def test_saved_for_backward_is_one_input_sized_tensor(affine, through):
    shape = (4, C, 5, 6)
    x, w, b = _inputs(affine, shape=shape)
    numels = []

    def pack(t):
        numels.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if through == "function":
            y = BatchNormFunction.apply(x, w, b, 1e-5)[0]
        else:
            y = bnn.BatchNorm2d(C, dtype=torch.float64, **AFFINE[affine])(x)
    big = [n for n in numels if n > C]
    assert big == [x.numel()], numels
    assert sum(numels) <= x.numel() + 6 * C, numels
    if through == "function":
        saved = y.grad_fn.saved_tensors
        assert sum(t.numel() for t in saved if t is not None) == sum(numels)


# ---------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------

class _Inner(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.BatchNorm1d(4, affine=False, momentum=None)

    def forward(self, x):
        return self.norm(x)


class _Net(torch.nn.Module):
    """A small CNN with BN in 3D, 2D and 1D, bare and inside Sequential / nested modules."""

    def __init__(self):
        super().__init__()
        self.conv3 = torch.nn.Conv3d(2, 3, 3, padding=1)
        self.bn3 = torch.nn.BatchNorm3d(3, momentum=0.3)
        self.block = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3, padding=1),
            torch.nn.BatchNorm2d(4, bias=False),
            torch.nn.ReLU(),
        )
        self.inner = torch.nn.ModuleDict({"a": _Inner()})
        self.fc = torch.nn.Linear(4, 5)
        self.head = torch.nn.Sequential(torch.nn.BatchNorm1d(5, track_running_stats=False))

    def forward(self, x):
        h = self.bn3(self.conv3(x)).mean(dim=2)  # (N, 3, H, W)
        h = self.block(h).flatten(2)  # (N, 4, L)
        h = self.inner["a"](h).mean(dim=2)  # (N, 4)
        return self.head(self.fc(h))


def _bn_modules(model):
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm | bnn._BatchNorm)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_convert_model(dtype, device):
    # TF32 convolutions would turn float32 rounding noise into 1e-3 errors
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        _check_convert_model(dtype, device)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def _check_convert_model(dtype, device):
    torch.manual_seed(0)
    ref = _Net().to(device=device, dtype=dtype)
    ref.block[1].weight.requires_grad_(False)  # a frozen parameter stays frozen
    g = torch.Generator().manual_seed(0)

    def batch(i):
        return (torch.randn(6, 2, 3, 4, 5, generator=g, dtype=torch.float64) + i).to(device, dtype)

    ref(batch(0))  # nonzero running statistics before converting
    ref.block.eval()  # a mixed training flag must survive
    model = bnn.convert(copy.deepcopy(ref))
    assert model is not ref
    pairs = list(zip(_bn_modules(ref), _bn_modules(model), strict=True))
    assert len(pairs) == 4
    for (n1, m1), (n2, m2) in pairs:
        assert n1 == n2
        assert type(m2) is BNLIB_CLS[type(m1).__name__[-2:]], n2
        assert m2.training == m1.training and repr(m2) == repr(m1)
    assert not [n for n, m in model.named_modules()
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                and not isinstance(m, bnn._BatchNorm)]
    assert list(model.state_dict()) == list(ref.state_dict())
    for k, v in ref.state_dict().items():
        w = model.state_dict()[k]
        assert w.dtype == v.dtype and w.device == v.device and torch.equal(w, v), k
    for (n, p), (_, q) in zip(ref.named_parameters(), model.named_parameters(), strict=True):
        assert q.requires_grad == p.requires_grad, n
    assert [m.training for m in model.modules()] == [m.training for m in ref.modules()]

    for i, mode in enumerate("TTET"):
        ref.train(mode == "T")
        model.train(mode == "T")
        x = batch(i + 1)
        yr, ym = ref(x), model(x)
        assert_close(ym, yr, dtype, f"step {i}")
        r = torch.randn(yr.shape, generator=g, dtype=torch.float64).to(device, dtype)
        (yr * r).sum().backward()  # (not y.square().sum(): a BN output's is constant)
        (ym * r).sum().backward()
        # gradients that are zero in exact arithmetic (fc.bias feeds a BN) are rounding
        # noise, so the tolerance is relative to the largest gradient in the model
        scale = max(p.grad.abs().max().item() for p in ref.parameters() if p.requires_grad)
        tol = (1e-10 if dtype == torch.float64 else 1e-5) * scale
        for (n, p), (_, q) in zip(ref.named_parameters(), model.named_parameters(), strict=True):
            if p.requires_grad:
                torch.testing.assert_close(
                    q.grad, p.grad, atol=tol, rtol=0, msg=lambda m, n=n: f"{n}: {m}"
                )
                p.grad = q.grad = None
            else:
                assert p.grad is None and q.grad is None, n
        for k, v in ref.state_dict().items():
            assert_close(model.state_dict()[k].double(), v.double(), torch.float32, k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["1d", "2d", "3d"])
def test_convert_bare_bn_root(kind, device):
    ref = TORCH_CLS[kind](C, momentum=None, device=device, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.running_mean.uniform_()
        ref.num_batches_tracked.fill_(7)
    ref.bias.requires_grad_(False)
    ref.eval()
    new = bnn.convert(ref)
    assert type(new) is BNLIB_CLS[kind]
    assert not new.training and repr(new) == repr(ref)
    assert not new.bias.requires_grad and new.weight.requires_grad
    for k, v in ref.state_dict().items():
        w = new.state_dict()[k]
        assert w.dtype == v.dtype and w.device == v.device and torch.equal(w, v), k
    # a bnlib module is left as it is
    assert bnn.convert(new) is new


def test_eager_function_matches_the_transform_ready_function():
    """The module's plain eager path (the old-style Function) gives the same bits as
    BatchNormFunction, forward and backward."""
    x = make_input((3, C, 2, 3)).requires_grad_()
    w = torch.linspace(0.5, 1.5, C, dtype=torch.float64).requires_grad_()
    b = torch.linspace(-1, 1, C, dtype=torch.float64).requires_grad_()
    dy = make_input((3, C, 2, 3), seed=1)
    results = []
    for fn in (bnn._EagerBatchNormFunction, bnn.BatchNormFunction):
        y, mean, var = fn.apply(x, w, b, 1e-5)
        grads = torch.autograd.grad(y, (x, w, b), dy)
        results.append((y, mean, var, *grads))
    for ours, ref in zip(*results, strict=True):
        assert torch.equal(ours, ref)
    y = bnn.BatchNorm2d(C, dtype=torch.float64)(x)
    assert type(y.grad_fn).__name__.startswith("_EagerBatchNormFunction")
