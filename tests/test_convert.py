"""bnlib.nn.convert: the same objects (parameters, buffers, modules), shared modules stay
shared, every alias converted, and documented behaviour for subclasses, SyncBatchNorm
and lazy modules."""

from __future__ import annotations

import warnings

import pytest
import torch

import bnlib.nn as bnn


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


def small_cnn() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 9, 5),
        torch.nn.BatchNorm1d(5),
    )


def test_keeps_parameter_and_buffer_objects():
    model = small_cnn()
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert bnn.convert(model) is model
    after = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert after.keys() == tensors.keys()
    for k, t in tensors.items():
        assert after[k] is t, k
    assert type(model[1]) is bnn.BatchNorm2d and type(model[5]) is bnn.BatchNorm1d


def test_optimizer_built_before_convert_still_updates_bn():
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bnn.convert(model)
    w0 = model[1].weight.detach().clone()
    out = model(randn(8, 2, 3, 3))
    (out * randn(*out.shape, seed=1)).sum().backward()
    opt.step()
    assert model[1].weight.grad is not None
    assert not torch.equal(model[1].weight, w0)  # the optimizer moved the BN weight


def test_shared_module_stays_shared():
    shared = torch.nn.BatchNorm1d(3)
    model = torch.nn.ModuleDict(
        {
            "a": torch.nn.Sequential(torch.nn.Linear(3, 3), shared),
            "b": torch.nn.Sequential(shared),
        }
    )
    n_params = sum(p.numel() for p in model.parameters())
    bnn.convert(model)
    assert model["a"][1] is model["b"][0] is shared
    assert type(shared) is bnn.BatchNorm1d
    assert sum(p.numel() for p in model.parameters()) == n_params


def test_every_alias_is_converted():
    bn = torch.nn.BatchNorm2d(3)
    model = torch.nn.Module()
    model.first = bn
    model.register_module("second", bn)
    bnn.convert(model)
    assert model.first is model.second is bn and type(bn) is bnn.BatchNorm2d


@pytest.mark.parametrize("kind", ["1d", "2d", "3d"])
def test_root_bn_is_converted_and_returned(kind):
    cls = getattr(torch.nn, f"BatchNorm{kind}")
    bn = cls(3, momentum=None).eval()
    weight = bn.weight
    new = bnn.convert(bn)
    assert type(new) is getattr(bnn, f"BatchNorm{kind}")
    assert new.weight is weight and not new.training and new.momentum is None


def test_converted_module_computes_with_bnlib_and_keeps_hooks():
    bn = torch.nn.BatchNorm2d(3)
    seen = []
    bn.register_forward_hook(lambda m, i, o: seen.append(type(m)))
    bnn.convert(bn)
    y = bn(randn(4, 3, 2, 2).requires_grad_())
    assert seen == [bnn.BatchNorm2d]
    assert "BatchNormFunction" in type(y.grad_fn).__name__


def test_bnlib_modules_left_silently():
    model = torch.nn.Sequential(bnn.BatchNorm2d(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bnn.convert(model)
    assert type(model[0]) is bnn.BatchNorm2d


class _MyBN(torch.nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize(
    "make, name",
    [(lambda: _MyBN(3), "_MyBN"), (lambda: torch.nn.SyncBatchNorm(3), "SyncBatchNorm")],
    ids=["subclass", "sync"],
)
def test_subclasses_and_syncbn_are_left_with_a_warning(make, name):
    odd = make()
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3), odd)
    with pytest.warns(UserWarning, match=rf"1 \(.*{name}\)"):
        bnn.convert(model)
    assert model[1] is odd and type(odd).__name__ == name
    assert type(model[0]) is bnn.BatchNorm2d  # the plain one is still converted


def test_uninitialised_lazy_raises_and_changes_nothing():
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(3), torch.nn.LazyBatchNorm1d())
    with pytest.raises(ValueError, match=r"1 is an uninitialised LazyBatchNorm1d.*once"):
        bnn.convert(model)
    assert type(model[0]) is torch.nn.BatchNorm1d  # nothing converted


def test_initialised_lazy_is_converted():
    model = torch.nn.Sequential(torch.nn.LazyBatchNorm1d())
    model(randn(4, 3))  # materialises: the module becomes a torch.nn.BatchNorm1d
    running_mean = model[0].running_mean.clone()
    bnn.convert(model)
    assert type(model[0]) is bnn.BatchNorm1d
    assert model[0].num_features == 3 and torch.equal(model[0].running_mean, running_mean)
