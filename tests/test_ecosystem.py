"""bnlib.nn where the torch ecosystem looks for BatchNorm: isinstance checks, the
freeze-BN idiom, SyncBatchNorm conversion, quantization fusion, torch.fx, TorchScript."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

import bnlib.nn as bnn

KINDS = {
    "1d": (torch.nn.BatchNorm1d, bnn.BatchNorm1d, (6, 3, 4)),
    "2d": (torch.nn.BatchNorm2d, bnn.BatchNorm2d, (4, 3, 2, 3)),
    "3d": (torch.nn.BatchNorm3d, bnn.BatchNorm3d, (2, 3, 2, 2, 3)),
}


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def trained(model: torch.nn.Module, x: torch.Tensor, steps: int = 2) -> torch.nn.Module:
    """``model`` after a few training-mode calls (non-trivial running statistics)."""
    model.train()
    with torch.no_grad():
        for i in range(steps):
            model(x * (1 + i) + i)
    return model


@pytest.mark.parametrize("kind", list(KINDS))
def test_isinstance_of_torch_classes(kind):
    torch_cls, ours_cls, _ = KINDS[kind]
    bn = ours_cls(3)
    assert isinstance(bn, torch_cls)
    assert isinstance(bn, _BatchNorm)
    assert isinstance(bn, torch.nn.modules.batchnorm._NormBase)
    assert not isinstance(bn, torch.nn.SyncBatchNorm)


@pytest.mark.parametrize("kind", list(KINDS))
def test_freeze_bn_idiom(kind):
    """The usual fine-tuning helper: put every BN in eval mode, train the rest."""
    _, ours_cls, shape = KINDS[kind]
    model = torch.nn.Sequential(ours_cls(3, dtype=torch.float64), torch.nn.ReLU())
    trained(model, randn(*shape))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.eval()
    model(randn(*shape, seed=1) * 5 + 3)
    assert not model[0].training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # running statistics frozen


def test_convert_sync_batchnorm_finds_bnlib_modules():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 1), bnn.BatchNorm2d(3), torch.nn.Sequential(bnn.BatchNorm1d(3))
    )
    weight = model[1].weight
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(synced[1], torch.nn.SyncBatchNorm)
    assert isinstance(synced[2][0], torch.nn.SyncBatchNorm)
    assert synced[1].weight is weight  # the parameters are handed over


FUSIONS = [
    (
        "conv-bn",
        lambda: torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), bnn.BatchNorm2d(3)),
        [["0", "1"]],
        (4, 2, 5, 5),
    ),
    (
        "conv-bn-relu",
        lambda: torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), bnn.BatchNorm2d(3), torch.nn.ReLU()),
        [["0", "1", "2"]],
        (4, 2, 5, 5),
    ),
    (
        "conv1d-bn",
        lambda: torch.nn.Sequential(torch.nn.Conv1d(2, 3, 3), bnn.BatchNorm1d(3)),
        [["0", "1"]],
        (4, 2, 7),
    ),
    (
        "conv3d-bn",
        lambda: torch.nn.Sequential(torch.nn.Conv3d(2, 3, 2), bnn.BatchNorm3d(3)),
        [["0", "1"]],
        (2, 2, 3, 3, 3),
    ),
    (
        "linear-bn",
        lambda: torch.nn.Sequential(torch.nn.Linear(2, 3), bnn.BatchNorm1d(3)),
        [["0", "1"]],
        (8, 2),
    ),
    (
        "convT-bn",
        lambda: torch.nn.Sequential(torch.nn.ConvTranspose2d(2, 3, 2), bnn.BatchNorm2d(3)),
        [["0", "1"]],
        (4, 2, 3, 3),
    ),
]


@pytest.mark.parametrize("name, build, groups, shape", FUSIONS, ids=[f[0] for f in FUSIONS])
def test_quantization_fuse_modules_in_eval(name, build, groups, shape):
    torch.manual_seed(0)
    model = trained(build().double(), randn(*shape)).eval()
    fused = torch.ao.quantization.fuse_modules(model, groups)
    assert isinstance(fused[1], torch.nn.Identity)  # the BN was folded into the layer
    x = randn(*shape, seed=1)
    torch.testing.assert_close(fused(x), model(x), atol=1e-10, rtol=1e-10)


def test_fuse_modules_in_qat_mode_is_torchs_limit():
    """Quantization-aware fusion builds torch's ConvBn2d, which takes torch's exact
    BatchNorm2d only: documented, not papered over."""
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), bnn.BatchNorm2d(3)).train()
    with pytest.raises(AssertionError, match="Incorrect types"):
        torch.ao.quantization.fuse_modules_qat(model, [["0", "1"]])


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 1, dtype=torch.float64)
        self.bn = bnn.BatchNorm2d(3, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


def test_fx_symbolic_trace_keeps_bn_as_one_node():
    torch.manual_seed(0)
    model = torch.nn.Sequential(_Block(), bnn.BatchNorm2d(3, dtype=torch.float64))
    gm = torch.fx.symbolic_trace(model)  # a plain trace, no custom tracer
    calls = [(n.op, n.target) for n in gm.graph.nodes if n.op != "placeholder"]
    assert ("call_module", "0.bn") in calls and ("call_module", "1") in calls
    # nothing from inside BatchNorm was traced: only conv, bn, relu, bn, output
    assert [op for op, _ in calls] == [
        "call_module",
        "call_module",
        "call_function",
        "call_module",
        "output",
    ]
    assert type(gm.get_submodule("0.bn")) is bnn.BatchNorm2d
    for training in (True, False):
        ref, traced = copy.deepcopy(model).train(training), copy.deepcopy(gm).train(training)
        x = randn(4, 2, 3, 3)
        torch.testing.assert_close(traced(x), ref(x), atol=1e-12, rtol=1e-12)
        for (k, v), (k2, v2) in zip(
            ref.state_dict().items(), traced.state_dict().items(), strict=True
        ):
            assert k == k2 and torch.equal(v, v2), k


def test_fx_symbolic_trace_of_a_lone_bn_raises_like_torch():
    for cls in (torch.nn.BatchNorm2d, bnn.BatchNorm2d):
        with pytest.raises(torch.fx.proxy.TraceError):
            torch.fx.symbolic_trace(cls(3))
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(bnn.BatchNorm2d(3)))
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "output"]


def test_torch_jit_script_raises_a_clear_error():
    torch.jit.script(torch.nn.BatchNorm2d(4))  # torch's own still scripts
    for module in (bnn.BatchNorm2d(4), torch.nn.Sequential(torch.nn.ReLU(), bnn.BatchNorm1d(4))):
        with pytest.raises(RuntimeError, match=r"TorchScript.*torch\.compile.*torch\.export"):
            torch.jit.script(module)
