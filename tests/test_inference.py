"""bnlib.inference: recalibrate, fold, freeze_batch_norm / unfreeze_batch_norm."""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import assert_close, assert_same_state, state_snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bnlib.nn as bnn
from bnlib.inference import (
    fold,
    freeze_batch_norm,
    is_batch_norm,
    recalibrate,
    unfreeze_batch_norm,
)

f64 = torch.float64
BN_KINDS = {
    "torch": (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
    "bnlib": (bnn.BatchNorm1d, bnn.BatchNorm2d, bnn.BatchNorm3d),
}


# --------------------------------------------------------------------------- architectures
class Residual(nn.Module):
    """conv-BN-ReLU, then a residual branch conv-BN added to it, then ReLU and a head."""

    def __init__(self, bn2d: type) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = bn2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = bn2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(h + self.bn2(self.conv2(h)))
        return self.head(h)


class SharedConv(nn.Module):
    """One convolution module called twice, each call followed by its own BN: not foldable."""

    def __init__(self, bn2d: type) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn_a = bn2d(3)
        self.bn_b = bn2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn_a(self.conv(x)))
        return self.bn_b(self.conv(h))


class ConvFeedsSkip(nn.Module):
    """The convolution's output goes to BN and to a skip connection: not foldable."""

    def __init__(self, bn2d: type) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = bn2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.bn(h) + h


class SharedConvOneBN(nn.Module):
    """One convolution module called twice, only its first call followed by BN: not foldable."""

    def __init__(self, bn2d: type) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = bn2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.relu(self.bn(self.conv(x))))


class WeightReadDirectly(nn.Module):
    """The convolution's weight is also read in the forward pass: not foldable."""

    def __init__(self, bn2d: type) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = bn2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.conv.weight.sum()


class LinearOverLastAxis(nn.Module):
    """Linear on (N, 3, 36) gives (N, 3, 5); BatchNorm1d(3) normalises axis 1: not foldable."""

    def __init__(self, bn1d: type) -> None:
        super().__init__()
        self.lin = nn.Linear(36, 5)
        self.bn = bn1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.lin(x.flatten(2)))


def plain(bn: tuple[type, ...]) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        bn[1](8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=True),  # with a bias of its own
        bn[1](8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False),  # grouped
        bn[1](8),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),  # depthwise
        bn[1](8),
    )


def mlp(bn: tuple[type, ...]) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(3 * 6 * 6, 16),
        bn[0](16),
        nn.ReLU(),
        nn.Linear(16, 8, bias=False),
        bn[0](8),
        nn.ReLU(),
        nn.Linear(8, 5),
    )


def bn_after_relu(bn: tuple[type, ...]) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), bn[1](8), nn.Conv2d(8, 4, 3), bn[1](4))


def affine_false(bn: tuple[type, ...]) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), bn[1](8, affine=False), nn.ReLU())


def no_running_stats(bn: tuple[type, ...]) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), bn[1](8, track_running_stats=False))


def conv1d_3d(bn: tuple[type, ...]) -> nn.Module:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv1d(3, 5, 3)
            self.b1 = bn[0](5)
            self.c3 = nn.Conv3d(1, 4, 3, padding=1, bias=False)
            self.b3 = bn[2](4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.b1(self.c1(x.flatten(2)))  # (N, 5, 34)
            v = self.b3(self.c3(x.unsqueeze(1)))  # (N, 4, 3, 6, 6)
            return a.sum((1, 2)) + v.sum((1, 2, 3, 4))

    return Net()


def transposed(bn: tuple[type, ...]) -> nn.Module:
    return nn.Sequential(
        nn.ConvTranspose2d(3, 8, 3, stride=2, groups=1, bias=False),
        bn[1](8),
        nn.ReLU(),
        nn.ConvTranspose2d(8, 6, 3, groups=2),
        bn[1](6),
    )


# (builder, number of BN modules left after folding)
ARCHITECTURES = {
    "plain conv stack": (plain, 0),
    "Linear + BatchNorm1d MLP": (mlp, 0),
    "residual block": (lambda bn: Residual(bn[1]), 0),
    "shared convolution": (lambda bn: SharedConv(bn[1]), 2),
    "shared convolution, one BN": (lambda bn: SharedConvOneBN(bn[1]), 1),
    "conv output feeds a skip": (lambda bn: ConvFeedsSkip(bn[1]), 1),
    "conv weight read directly": (lambda bn: WeightReadDirectly(bn[1]), 1),
    "Linear over the last axis": (lambda bn: LinearOverLastAxis(bn[0]), 1),
    "BN after ReLU": (bn_after_relu, 1),
    "affine=False": (affine_false, 0),
    "track_running_stats=False": (no_running_stats, 1),
    "Conv1d and Conv3d": (conv1d_3d, 0),
    "ConvTranspose2d (grouped)": (transposed, 0),
}


def trained(
    model: nn.Module, dtype: torch.dtype, seed: int = 0, shape: tuple[int, ...] = (3, 6, 6)
) -> nn.Module:
    """``model`` in ``dtype`` with non-trivial running statistics and BN parameters."""
    torch.manual_seed(seed)
    model = model.to(dtype)
    with torch.no_grad():
        for m in model.modules():
            if is_batch_norm(m):
                if m.weight is not None:
                    m.weight.uniform_(0.5, 2.0)
                if m.bias is not None:
                    m.bias.normal_()
        model.train()
        for _ in range(3):
            model(3.0 * torch.randn(16, *shape, dtype=dtype) + 1.0)
    return model.eval()


def count_bn(model: nn.Module) -> int:
    return sum(is_batch_norm(m) for m in model.modules())


# --------------------------------------------------------------------------- fold
@pytest.mark.parametrize("dtype", [torch.float32, f64])
@pytest.mark.parametrize("kind", sorted(BN_KINDS))
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_fold_equals_model_in_eval(arch: str, kind: str, dtype: torch.dtype) -> None:
    build, bn_left = ARCHITECTURES[arch]
    model = trained(build(BN_KINDS[kind]), dtype)
    before = state_snapshot(model)
    folded = fold(model)
    assert count_bn(folded) == bn_left, folded.code
    assert not folded.training
    x = 3.0 * torch.randn(7, 3, 6, 6, dtype=dtype) + 1.0
    with torch.no_grad():
        assert_close(folded(x), model(x), dtype)
    assert_same_state(before, state_snapshot(model))  # the original is untouched
    assert not model.training


def test_fold_creates_the_bias_and_keeps_dtype() -> None:
    model = trained(affine_false(BN_KINDS["torch"]), torch.float32)
    assert model[0].bias is None
    folded = fold(model)
    conv = folded.get_submodule("0")
    assert conv.bias is not None and conv.bias.dtype == torch.float32
    assert model[0].bias is None


def test_fold_formula() -> None:
    """W' = W s, b' = (b - mu) s + beta, s = gamma / sqrt(var + eps), for a Linear."""
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, eps=1e-3))
    model = trained(model, f64, shape=(4,))
    lin, bn = model[0], model[1]
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    folded = fold(model).get_submodule("0")
    assert_close(folded.weight, lin.weight * s[:, None])
    assert_close(folded.bias, (lin.bias - bn.running_mean) * s + bn.bias)


def test_fold_bnlib_bn_without_bias() -> None:
    model = trained(nn.Sequential(nn.Conv2d(3, 4, 3), bnn.BatchNorm2d(4, bias=False)), f64)
    folded = fold(model)
    x = torch.randn(2, 3, 6, 6, dtype=f64)
    assert count_bn(folded) == 0
    assert_close(folded(x).detach(), model(x).detach())


def test_fold_after_train_mode_model_leaves_flags() -> None:
    model = trained(plain(BN_KINDS["bnlib"]), f64).train()
    fold(model)
    assert all(m.training for m in model.modules())


def test_fold_untraceable_model_raises() -> None:
    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)) if x.sum() > 0 else x

    with pytest.raises(torch.fx.proxy.TraceError):
        fold(Dynamic())


# --------------------------------------------------------------------------- recalibrate
def population(xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased variance of all values of all batches (direct, float64)."""
    x = torch.cat([t.double() for t in xs]).transpose(0, 1).reshape(xs[0].shape[1], -1)
    return x.mean(1), x.var(1, correction=1)


def bn_inputs(model: nn.Module, bn: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """The inputs ``bn`` receives when ``model`` runs on each batch in its current modes."""
    seen: list[torch.Tensor] = []
    handle = bn.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        for b in batches:
            model(b)
    handle.remove()
    return seen


def two_bn_net(kind: str, dtype: torch.dtype = f64) -> nn.Module:
    bn = BN_KINDS[kind]
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), bn[1](4), nn.ReLU(), nn.Conv2d(4, 5, 3), bn[1](5)
    )
    return trained(net, dtype)


def data(sizes: list[int], seed: int = 2, dtype: torch.dtype = f64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [2.0 * torch.randn(n, 3, 6, 6, generator=g, dtype=dtype) + 0.5 for n in sizes]


@pytest.mark.parametrize("method", ["train", "layerwise"])
@pytest.mark.parametrize("kind", sorted(BN_KINDS))
def test_recalibrate_one_batch_is_that_batch(kind: str, method: str) -> None:
    model = two_bn_net(kind)
    (x,) = data([9])
    recalibrate(model, [x], method=method)
    with torch.no_grad():
        z = model[0](x)
    mean, var = population([z])
    assert_close(model[1].running_mean, mean)
    assert_close(model[1].running_var, var)
    assert int(model[1].num_batches_tracked) == 1


@pytest.mark.parametrize("kind", sorted(BN_KINDS))
def test_recalibrate_one_batch_equals_momentum_one_step(kind: str) -> None:
    """One batch: the statistics a training step with momentum=1 stores (torch's or bnlib's)."""
    model = two_bn_net(kind)
    (x,) = data([9])
    reference = copy.deepcopy(model).train()
    for m in reference.modules():
        if is_batch_norm(m):
            m.momentum = 1.0
    with torch.no_grad():
        reference(x)
    recalibrate(model, [x])
    for a, b in zip(model.modules(), reference.modules(), strict=True):
        if is_batch_norm(a):
            assert_close(a.running_mean, b.running_mean)
            assert_close(a.running_var, b.running_var)


@pytest.mark.parametrize("kind", sorted(BN_KINDS))
def test_recalibrate_train_method_population_statistics(kind: str) -> None:
    model = two_bn_net(kind)
    xs = data([5, 17, 32, 2])
    # direct computation: every BN in training mode, inputs of each BN pooled over all batches
    ref = copy.deepcopy(model).train()
    in1, in2 = bn_inputs(ref, ref[1], xs), bn_inputs(ref, ref[4], xs)
    recalibrate(model, [(x, torch.zeros(len(x))) for x in xs])  # (input, target) tuples
    for bn, inputs in ((model[1], in1), (model[4], in2)):
        mean, var = population(inputs)
        assert_close(bn.running_mean, mean)
        assert_close(bn.running_var, var)
        assert int(bn.num_batches_tracked) == len(xs)


@pytest.mark.parametrize("kind", sorted(BN_KINDS))
def test_recalibrate_layerwise_matches_eval_mode_inputs(kind: str) -> None:
    model = two_bn_net(kind)
    xs = data([5, 17, 32])
    recalibrate(model, xs, method="layerwise")
    assert not model.training
    for bn in (model[1], model[4]):  # eval-mode inputs now have exactly the stored statistics
        mean, var = population(bn_inputs(model, bn, xs))
        assert_close(bn.running_mean, mean)
        assert_close(bn.running_var, var)


def test_recalibrate_methods_differ_beyond_first_layer() -> None:
    model_t, model_l = two_bn_net("torch"), two_bn_net("torch")
    xs = data([4, 4, 4])
    recalibrate(model_t, xs)
    recalibrate(model_l, xs, method="layerwise")
    assert_close(model_t[1].running_var, model_l[1].running_var)  # same first layer
    assert (model_t[4].running_var - model_l[4].running_var).abs().max() > 1e-3


@settings(max_examples=8, deadline=None)
@given(sizes=st.lists(st.integers(1, 12), min_size=1, max_size=5), seed=st.integers(0, 100))
def test_recalibrate_does_not_depend_on_how_data_is_split(sizes: list[int], seed: int) -> None:
    """First BN: population statistics of all conv outputs, whatever the batch split."""
    model = two_bn_net("bnlib")
    xs = data(sizes, seed)
    recalibrate(model, xs)  # first BN: the same in both methods
    with torch.no_grad():
        mean, var = population([model[0](torch.cat(xs))])
    assert_close(model[1].running_mean, mean)
    assert_close(model[1].running_var, var)


def test_recalibrate_float32_model() -> None:
    model = two_bn_net("torch", torch.float32)
    xs = data([8, 8], dtype=torch.float32)
    recalibrate(model, xs)
    with torch.no_grad():
        mean, var = population([model[0](x) for x in xs])
    assert_close(model[1].running_mean, mean.float(), torch.float32)
    assert_close(model[1].running_var, var.float(), torch.float32)
    assert model[1].running_var.dtype == torch.float32


def test_recalibrate_num_batches() -> None:
    model, ref = two_bn_net("torch"), two_bn_net("torch")
    xs = data([6, 6, 6])
    recalibrate(model, iter(xs), num_batches=2)
    recalibrate(ref, xs[:2])
    assert_same_state(state_snapshot(model), state_snapshot(ref))
    assert int(model[1].num_batches_tracked) == 2


@pytest.mark.parametrize("method", ["train", "layerwise"])
def test_recalibrate_touches_only_bn_buffers_and_restores_flags(method: str) -> None:
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4, momentum=None),
        nn.Dropout(0.5),
        nn.Conv2d(4, 4, 3),
        bnn.BatchNorm2d(4),
        nn.BatchNorm2d(4, track_running_stats=False),
    ).double()
    model.train()
    model[1].eval()  # mixed flags
    model[2].eval()
    flags = [m.training for m in model.modules()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = state_snapshot(model)
    recalibrate(model, data([6, 6]), method=method)
    after = state_snapshot(model)
    assert [m.training for m in model.modules()] == flags
    bn_buffers = {"1.running_mean", "1.running_var", "4.running_mean", "4.running_var"}
    for k in before:
        if k in bn_buffers:
            assert not torch.equal(before[k], after[k]), k
        elif k.endswith("num_batches_tracked"):
            assert int(after[k]) == 2, k
        else:
            assert before[k] is None and after[k] is None or torch.equal(before[k], after[k]), k


def test_recalibrate_runs_dropout_in_eval_mode() -> None:
    torch.manual_seed(4)
    base = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).double()
    with_dropout = nn.Sequential(base[0], nn.Dropout(0.9), base[1])
    xs = data([8])
    recalibrate(with_dropout.train(), xs)
    mean, var = population([base[0](xs[0]).detach()])
    assert_close(base[1].running_mean, mean)
    assert_close(base[1].running_var, var)


def test_recalibrate_frozen_bn_is_recalibrated_and_stays_frozen() -> None:
    model = freeze_batch_norm(two_bn_net("torch"))
    (x,) = data([10])
    recalibrate(model, [x])
    mean, var = population([model[0](x).detach()])
    assert_close(model[1].running_mean, mean)
    model.train()
    assert not model[1].training


def test_recalibrate_model_without_bn_is_a_no_op() -> None:
    model = nn.Sequential(nn.Linear(2, 2))

    def never() -> list[torch.Tensor]:
        raise AssertionError("batches must not be read")

    assert recalibrate(model, iter(never, None)) is model


@pytest.mark.parametrize("method", ["train", "layerwise"])
@pytest.mark.parametrize(
    "batches, kwargs, error, match",
    [
        ([], {}, ValueError, "no batch"),
        (iter([]), {}, ValueError, "no batch"),
        (None, {"num_batches": 0}, ValueError, "num_batches"),
        (None, {"num_batches": 1.5}, ValueError, "num_batches"),
        (["not a tensor"], {}, TypeError, "str"),
        ([()], {}, ValueError, "empty tuple"),
        (None, {"method": "eval"}, ValueError, "method"),
    ],
)
def test_recalibrate_bad_input(method, batches, kwargs, error, match) -> None:  # type: ignore[no-untyped-def]
    model = two_bn_net("bnlib")
    model.train()
    model[3].eval()
    flags = [m.training for m in model.modules()]
    before = state_snapshot(model)
    if batches is None:
        batches = data([4])
    kwargs = {"method": method, **kwargs}
    with pytest.raises(error, match=match):
        recalibrate(model, batches, **kwargs)
    assert_same_state(before, state_snapshot(model))
    assert [m.training for m in model.modules()] == flags


@pytest.mark.parametrize("method", ["train", "layerwise"])
def test_recalibrate_error_in_a_later_batch_changes_nothing(method: str) -> None:
    model = two_bn_net("torch")
    before = state_snapshot(model)
    bad = torch.randn(4, 2, 6, 6, dtype=f64)  # wrong number of channels
    with pytest.raises(RuntimeError):
        recalibrate(model, [*data([4, 4]), bad], method=method)
    assert_same_state(before, state_snapshot(model))
    assert not model.training


def test_recalibrate_one_value_per_channel() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).double()
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="at least 2"):
        recalibrate(model, [torch.randn(1, 3, dtype=f64)], method="layerwise")
    with pytest.raises(ValueError):  # training mode: torch's own error
        recalibrate(model, [torch.randn(1, 3, dtype=f64)])
    assert_same_state(before, state_snapshot(model))


# --------------------------------------------------------------------------- freeze
@pytest.mark.parametrize("kind", sorted(BN_KINDS))
def test_freeze_survives_train_and_a_training_step(kind: str) -> None:
    model = two_bn_net(kind).train()
    freeze_batch_norm(model)
    model.train()
    assert [m.training for m in model.modules()] == [True, True, False, True, True, False]
    bn_state = {k: v.clone() for k, v in model.state_dict().items() if k[0] in "14"}
    conv_w = model[0].weight.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for x in data([8, 8]):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    for k, v in model.state_dict().items():
        if k in bn_state:
            assert torch.equal(v, bn_state[k]), k
    assert not torch.equal(model[0].weight, conv_w)  # the rest trains
    # a frozen BN computes the eval-mode map even inside model.train()
    (x,) = data([3])
    out_train = model(x)
    assert_close(out_train.detach(), model.eval()(x).detach())


def test_requires_grad_false_alone_does_not_freeze_statistics() -> None:
    model = two_bn_net("torch").train()
    for p in model[1].parameters():
        p.requires_grad_(False)
    before = model[1].running_mean.clone()
    model(data([8])[0])
    assert not torch.equal(before, model[1].running_mean)


def test_unfreeze_restores_flags_and_freeze_is_idempotent() -> None:
    model = two_bn_net("bnlib").train()
    model[4].weight.requires_grad_(False)  # a flag of the user's own
    freeze_batch_norm(model)
    freeze_batch_norm(model)
    assert all(not p.requires_grad for m in (model[1], model[4]) for p in m.parameters())
    model.eval()
    unfreeze_batch_norm(model)
    assert model[1].training and model[4].training  # as when frozen
    assert model[1].weight.requires_grad and model[1].bias.requires_grad
    assert not model[4].weight.requires_grad and model[4].bias.requires_grad
    model.eval()
    model.train()
    assert all(m.training for m in model.modules())
    assert "train" not in model[1].__dict__


def test_frozen_model_deepcopy_stays_frozen() -> None:
    model = freeze_batch_norm(two_bn_net("torch"))
    clone = copy.deepcopy(model)
    clone.train()
    assert not clone[1].training and clone[0].training
    assert not model[0].training  # the original was not switched by the clone's train()


def test_is_batch_norm() -> None:
    assert is_batch_norm(nn.BatchNorm2d(2)) and is_batch_norm(bnn.BatchNorm1d(2))
    assert is_batch_norm(nn.SyncBatchNorm(2))
    assert not is_batch_norm(nn.LayerNorm(2)) and not is_batch_norm(nn.GroupNorm(1, 2))


def test_api_page_lists_bnlib_inference() -> None:
    """book/api.md documents every public name of bnlib.inference."""
    import re
    from pathlib import Path

    import bnlib.inference

    text = (Path(__file__).resolve().parent.parent / "book" / "api.md").read_text(encoding="utf-8")
    section = text.split(".. currentmodule:: bnlib.inference", 1)[1].split("```", 1)[0]
    listed = re.findall(r"^   (\w+)$", section, flags=re.MULTILINE)
    assert sorted(listed) == sorted(bnlib.inference.__all__)
    assert ".. automodule:: bnlib.inference" in section


def test_frozen_model_survives_save_and_load(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = freeze_batch_norm(two_bn_net("bnlib"))
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    loaded.train()
    assert not loaded[1].training and loaded[0].training
    unfreeze_batch_norm(loaded).train()
    assert loaded[1].training
