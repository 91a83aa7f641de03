"""bnlib.nn.use_compiled: the torch.compile'd kernels give the eager results."""

import shutil

import pytest
import torch

import bnlib.nn as bnn

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None,
    reason="torch.compile on the CPU needs a C++ compiler",
)


@pytest.fixture
def compiled():
    bnn.use_compiled(True)
    yield
    bnn.use_compiled(False)


def test_compiled_matches_torch_float64(compiled):
    gen = torch.Generator().manual_seed(0)
    x = (3 + 2 * torch.randn(6, 4, 5, 5, generator=gen, dtype=torch.float64)).requires_grad_()
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    ours = bnn.BatchNorm2d(4, dtype=torch.float64)
    ref = torch.nn.BatchNorm2d(4, dtype=torch.float64)
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(torch.linspace(0.5, 2, 4))
            m.bias.copy_(torch.linspace(-1, 1, 4))
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = ours(x), ref(x_ref)
    y.backward(dy)
    y_ref.backward(dy)
    assert bnn._compiled_kernels is not None
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-10, atol=1e-10)


def test_switch_off_restores_eager():
    bnn.use_compiled(True)
    bnn.use_compiled(False)
    assert bnn._compiled_kernels is None
