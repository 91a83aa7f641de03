"""bnlib.nn on PyTorch's own BatchNorm module cases (``torch.testing._internal.common_modules``).

Each ``ModuleInfo`` input of torch's test suite for ``nn.BatchNorm1d/2d/3d`` (constructor
arguments and forward inputs, in training and in eval mode) is run through torch's module
and bnlib's, twice, with identical state: outputs, gradients and buffers must agree to
float64 precision.
"""

from __future__ import annotations

import pytest
import torch

import bnlib.nn as bnn

# Importing torch's test utilities freezes torch.backends' global flags (common_utils calls
# torch.backends.disable_global_flags() for torch's own suite); unfreeze them again so that
# other test files may still set flags such as cudnn.allow_tf32.
_frozen = torch.backends.flags_frozen()
common_modules = pytest.importorskip("torch.testing._internal.common_modules")
if not _frozen:
    torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
    assert not torch.backends.flags_frozen()

INFOS = [mi for mi in common_modules.module_db if mi.module_cls in bnn._REPLACEMENTS]


def test_module_db_has_batchnorm_cases():
    assert {mi.module_cls for mi in INFOS} == set(bnn._REPLACEMENTS)


def _cases():
    for mi in INFOS:
        for training in (True, False):
            inputs = mi.module_inputs_func(
                mi, device="cpu", dtype=torch.float64, requires_grad=True, training=training
            )
            for i, inp in enumerate(inputs):
                name = f"{mi.name}-{'train' if training else 'eval'}-{inp.desc or i}"
                yield pytest.param(mi.module_cls, inp, training, id=name)


@pytest.mark.parametrize("torch_cls, inp, training", list(_cases()))
def test_module_db_case(torch_cls, inp, training):
    args, kwargs = inp.constructor_input.args, inp.constructor_input.kwargs
    ref = torch_cls(*args, **kwargs, dtype=torch.float64)
    ours = bnn._REPLACEMENTS[torch_cls](*args, **kwargs, dtype=torch.float64)
    assert isinstance(ours, torch_cls) and repr(ours) == repr(ref)
    ours.load_state_dict(ref.state_dict())
    ref.train(training)
    ours.train(training)
    (x,) = inp.forward_input.args
    g = torch.Generator().manual_seed(0)
    for step in range(2):
        xr = (x.detach() * (1 + step)).requires_grad_()
        xo = xr.detach().clone().requires_grad_()
        yr, yo = ref(xr), ours(xo)
        torch.testing.assert_close(yo, yr, atol=1e-10, rtol=1e-10)
        dy = torch.randn(yr.shape, generator=g, dtype=torch.float64)
        yr.backward(dy)
        yo.backward(dy)
        torch.testing.assert_close(xo.grad, xr.grad, atol=1e-10, rtol=1e-10)
        for (n, p), (_, q) in zip(ref.named_parameters(), ours.named_parameters(), strict=True):
            torch.testing.assert_close(q.grad, p.grad, atol=1e-10, rtol=1e-10, msg=n)
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[k], v, atol=1e-10, rtol=1e-10, msg=k)
