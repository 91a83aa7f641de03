"""Function transforms, forward AD, compile and export: bnlib.nn against torch.nn.

Every case runs the same transform on a torch BatchNorm2d and on bnlib's, in training
mode with batch statistics, and the numbers must agree to float64 precision. Running
``python tests/test_transforms.py`` prints the pass/fail table of all cases for both
libraries (the table in the report of issue 11).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest
import torch
from torch.func import functional_call

import bnlib.nn as bnn

C = 3
TOL = {"atol": 1e-10, "rtol": 1e-10}


def make_bn(cls: type, track: bool = False) -> torch.nn.Module:
    """A float64 BatchNorm2d with distinct per-channel parameters, in training mode."""
    m = cls(C, dtype=torch.float64, track_running_stats=track)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([0.5, 1.5, 2.0]))
        m.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return m


def data(seed: int = 0, shape: tuple[int, ...] = (4, C, 2, 2)) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = 1 + 2 * torch.randn(shape, generator=g, dtype=torch.float64)
    r = torch.randn(shape, generator=g, dtype=torch.float64)
    return x, r


def functional(m: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """``f(x, w, b)``: the module as a pure function of input and parameters."""

    def f(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return functional_call(m, {"weight": w, "bias": b}, (x,))

    return f


def params(m: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return m.weight.detach().clone(), m.bias.detach().clone()


# -- the cases: each takes a BatchNorm2d class and returns tensors (or True) -------------


def case_func_grad(cls):
    m = make_bn(cls)
    x, r = data()
    f = functional(m)
    return torch.func.grad(lambda x, w, b: (f(x, w, b) * r).sum(), argnums=(0, 1, 2))(x, *params(m))


def case_func_jacrev(cls):
    m = make_bn(cls)
    return torch.func.jacrev(functional(m), argnums=(0, 1, 2))(data()[0], *params(m))


def case_func_jacfwd(cls):
    m = make_bn(cls)
    return torch.func.jacfwd(functional(m), argnums=(0, 1, 2))(data()[0], *params(m))


def case_func_jvp(cls):
    m = make_bn(cls)
    x, r = data()
    w, b = params(m)
    return torch.func.jvp(functional(m), (x, w, b), (r, w.flip(0), b + 1))


def case_func_vmap_input(cls):
    m = make_bn(cls)
    xs = torch.stack([data(s)[0] for s in range(3)])
    return torch.func.vmap(functional(m), in_dims=(0, None, None))(xs, *params(m))


def case_func_vmap_params(cls):
    """An ensemble: one input, a batch of parameter sets; running statistics are updated
    once (the statistics of an unbatched input are unbatched)."""
    m = make_bn(cls, track=True)
    w, b = params(m)
    y = torch.func.vmap(functional(m), in_dims=(None, 0, 0))(
        data()[0], torch.stack([w, 2 * w]), torch.stack([b, b - 1])
    )
    return y, m.running_mean, m.running_var


def case_func_vmap_grad(cls):
    """Per-sample gradients of the parameters (vmap over grad)."""
    m = make_bn(cls)
    xs = torch.stack([data(s)[0] for s in range(3)])
    r = data(9)[1]
    f = functional(m)
    per_sample = torch.func.vmap(
        torch.func.grad(lambda x, w, b: (f(x, w, b) * r).square().sum(), argnums=(1, 2)),
        in_dims=(0, None, None),
    )
    return per_sample(xs, *params(m))


def case_func_hessian(cls):
    m = make_bn(cls)
    x, r = data(shape=(3, C, 2, 1))
    f = functional(m)
    w, b = params(m)
    return torch.func.hessian(lambda x: (f(x, w, b) * r).square().sum())(x)


def case_forward_ad(cls):
    m = make_bn(cls)
    x, r = data()
    fwAD = torch.autograd.forward_ad
    with fwAD.dual_level():
        y = m(fwAD.make_dual(x, r))
        return fwAD.unpack_dual(y).tangent.clone()


def case_grads_batched(cls):
    m = make_bn(cls)
    x = data()[0].requires_grad_()
    y = m(x)
    dys = torch.stack([data(s)[1] for s in range(4)])
    return torch.autograd.grad(y, (x, m.weight, m.bias), dys, is_grads_batched=True)


def case_jacobian_vectorize(cls):
    m = make_bn(cls)
    return torch.autograd.functional.jacobian(
        functional(m), (data()[0], *params(m)), vectorize=True
    )


def case_gradcheck(cls):
    m = make_bn(cls)
    x = data(shape=(3, C, 2, 1))[0].requires_grad_()
    w, b = (p.requires_grad_() for p in params(m))
    return torch.autograd.gradcheck(
        functional(m), (x, w, b), check_batched_grad=True, check_forward_ad=True
    )


def case_gradgradcheck(cls):
    m = make_bn(cls)
    x = data(shape=(3, C, 2, 1))[0].requires_grad_()
    w, b = (p.requires_grad_() for p in params(m))
    return torch.autograd.gradgradcheck(functional(m), (x, w, b))


def _compiled(cls, backend):
    torch._dynamo.reset()
    m = make_bn(cls, track=True)
    x, r = data()
    x.requires_grad_()
    step = torch.compile(m, backend=backend, fullgraph=True)  # fullgraph: a break raises
    y = step(x)
    (y * r).sum().backward()
    y2 = step(x.detach() * 2)  # a second call reuses the graph
    return y, y2, x.grad, m.weight.grad, m.bias.grad, m.running_mean, m.running_var


def case_compile_eager(cls):
    return _compiled(cls, "eager")


def case_compile_aot_eager(cls):
    return _compiled(cls, "aot_eager")


def case_export(cls):
    outs = []
    for training in (True, False):
        m = make_bn(cls, track=True)
        m.train(training)
        x = data()[0]
        ep = torch.export.export(m, (x,))
        outs.append(ep.module()(x))
        outs += [m.running_mean, m.running_var]  # export traced, it did not run
    return outs


CASES = {
    "torch.func.grad": case_func_grad,
    "torch.func.jacrev": case_func_jacrev,
    "torch.func.jacfwd": case_func_jacfwd,
    "torch.func.jvp": case_func_jvp,
    "torch.func.vmap (input)": case_func_vmap_input,
    "torch.func.vmap (parameters)": case_func_vmap_params,
    "vmap(grad) per-sample gradients": case_func_vmap_grad,
    "torch.func.hessian": case_func_hessian,
    "torch.autograd.forward_ad": case_forward_ad,
    "autograd.grad(is_grads_batched=True)": case_grads_batched,
    "functional.jacobian(vectorize=True)": case_jacobian_vectorize,
    "gradcheck(batched grad, forward AD)": case_gradcheck,
    "gradgradcheck": case_gradgradcheck,
    "torch.compile(fullgraph, eager)": case_compile_eager,
    "torch.compile(fullgraph, aot_eager)": case_compile_aot_eager,
    "torch.export.export (train, eval)": case_export,
}


def case_fx_symbolic_trace(cls):
    """A plain trace; the BN must be one call_module node."""
    model = torch.nn.Sequential(make_bn(cls), torch.nn.ReLU())
    gm = torch.fx.symbolic_trace(model)
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "call_module", "output"]
    return gm(data()[0])


def case_jit_script(cls):
    return torch.jit.script(make_bn(cls))(data()[0])


# in the table only: bnlib refuses TorchScript by design (see test_ecosystem.py)
TABLE_ONLY = {
    "torch.fx.symbolic_trace (one node)": case_fx_symbolic_trace,
    "torch.jit.script": case_jit_script,
}


def _leaves(out) -> list:
    return torch.utils._pytree.tree_leaves(out)


def assert_same(ours, ref) -> None:
    a, b = _leaves(ours), _leaves(ref)
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(u, v, **TOL)
        else:
            assert u == v


@pytest.mark.parametrize("name", list(CASES))
def test_transform_matches_torch(name):
    case = CASES[name]
    ref = case(torch.nn.BatchNorm2d)  # the reference passes: the case is a real use
    ours = case(bnn.BatchNorm2d)
    assert_same(ours, ref)


def test_vmap_with_tracked_running_stats_raises_clearly_and_changes_nothing():
    """As torch: vmap over the input cannot update unbatched running statistics."""
    xs = torch.stack([data(s)[0] for s in range(2)])
    for cls in (torch.nn.BatchNorm2d, bnn.BatchNorm2d):
        m = make_bn(cls, track=True)
        before = {k: v.clone() for k, v in m.state_dict().items()}
        with pytest.raises(RuntimeError, match=r"(?i)running_mean"):
            torch.func.vmap(m)(xs)
        if cls is bnn.BatchNorm2d:  # bnlib: the failed call changed nothing
            for k, v in m.state_dict().items():
                assert torch.equal(v, before[k]), k


def test_replace_all_batch_norm_modules_then_vmap():
    """torch.func's helper for vmap over BN models finds bnlib's modules too."""
    xs = torch.stack([data(s)[0] for s in range(2)])
    outs = []
    for cls in (torch.nn.BatchNorm2d, bnn.BatchNorm2d):
        model = torch.nn.Sequential(torch.nn.Conv2d(C, C, 1, dtype=torch.float64), make_bn(cls))
        torch.manual_seed(0)
        model[0].reset_parameters()
        torch.func.replace_all_batch_norm_modules_(model)
        assert model[1].running_mean is None
        outs.append(torch.func.vmap(model)(xs))
    assert_same(outs[1], outs[0])


def test_vmap_rule_is_used_not_a_loop(monkeypatch):
    """Under vmap the Function runs once, on the folded (N, B*C, ...) problem."""
    m = make_bn(bnn.BatchNorm2d)
    xs = torch.stack([data(s)[0] for s in range(5)])
    shapes = []
    original = bnn._train_forward

    def recording(x, *rest):
        shapes.append(tuple(x.shape))
        return original(x, *rest)

    monkeypatch.setattr(bnn, "_train_forward", recording)
    torch.func.vmap(m)(xs)
    assert shapes == [(4, 5 * C, 2, 2)]


if __name__ == "__main__":  # the table: python tests/test_transforms.py
    import warnings

    warnings.simplefilter("ignore")
    rows = []
    for name, case in {**CASES, **TABLE_ONLY}.items():
        results = {}
        outs = {}
        for lib, cls in (("torch.nn", torch.nn.BatchNorm2d), ("bnlib.nn", bnn.BatchNorm2d)):
            try:
                outs[lib] = case(cls)
                results[lib] = "pass"
            except Exception as e:  # noqa: BLE001 - the table records any failure
                results[lib] = f"fail ({type(e).__name__})"
        same = ""
        if len(outs) == 2:
            try:
                assert_same(outs["bnlib.nn"], outs["torch.nn"])
                same = "yes"
            except AssertionError:
                same = "NO"
        rows.append((name, results["torch.nn"], results["bnlib.nn"], same))
    head = ("transform (training mode, float64)", "torch.nn", "bnlib.nn", "same numbers")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(4)]
    for r in [head, tuple("-" * w for w in widths), *rows]:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    print(f"torch {torch.__version__}", file=sys.stderr)
