"""BatchNorm at inference: recalibrate running statistics, fold BN, freeze BN.

Three tools for a trained model that contains BatchNorm layers (torch's
``torch.nn.BatchNorm1d/2d/3d`` or bnlib's):

- :func:`recalibrate` replaces the running averages of every BN layer by exact
  population statistics over a data set (the idea of PreciseBN, Wu & Johnson
  2021), in place.
- :func:`fold` returns a new model in which every BN that directly follows a
  convolution or a linear layer is folded into that layer's weight and bias; in
  eval mode it computes the same function with fewer operations.
- :func:`freeze_batch_norm` fixes the statistics and the affine parameters of
  every BN for fine-tuning, so that ``model.train()`` does not unfreeze them;
  :func:`unfreeze_batch_norm` undoes it.

In eval mode a BN layer with running mean :math:`\\mu`, running variance
:math:`v`, scale :math:`\\gamma` and shift :math:`\\beta` is the per-channel
affine map :math:`y = s\\,x + t` with

.. math::

    s = \\frac{\\gamma}{\\sqrt{v+\\epsilon}}, \\qquad t = \\beta - s\\,\\mu .

If :math:`x = W u + b` comes from a linear map (a convolution or a linear
layer) whose output channel :math:`c` is row :math:`c` of :math:`W`, then
:math:`y = W' u + b'` with :math:`W'_c = s_c W_c` and :math:`b'_c = s_c b_c + t_c`.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.fx
from torch import Tensor, nn

from . import nn as bnn

__all__ = [
    "fold",
    "freeze_batch_norm",
    "is_batch_norm",
    "recalibrate",
    "unfreeze_batch_norm",
]

# torch's base class, and bnlib's (a subclass of torch's once bnlib.nn derives from it)
_BN_BASES: tuple[type, ...] = tuple(
    {nn.modules.batchnorm._BatchNorm, getattr(bnn, "_BatchNorm", nn.modules.batchnorm._BatchNorm)}
)
_CONV_TYPES: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE_TYPES: tuple[type, ...] = (
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def is_batch_norm(module: nn.Module) -> bool:
    """True for torch's and bnlib's BatchNorm modules (any subclass of either base)."""
    return isinstance(module, _BN_BASES)


def _get(module: nn.Module, name: str) -> Tensor | None:
    """The tensor attribute ``name`` of ``module`` (parameter or buffer), or None."""
    value = getattr(module, name, None)
    return value if isinstance(value, Tensor) else None


def _need(module: nn.Module, name: str) -> Tensor:
    value = _get(module, name)
    if value is None:
        raise AttributeError(f"{type(module).__name__} has no tensor '{name}'")
    return value


def _has_running_stats(module: nn.Module) -> bool:
    return (
        is_batch_norm(module)
        and _get(module, "running_mean") is not None
        and _get(module, "running_var") is not None
    )


# --------------------------------------------------------------------------- recalibrate


def _batch_input(batch: Any) -> Any:
    """The model input of one element of ``batches``: a tensor, or the first item of a tuple."""
    if isinstance(batch, (tuple, list)):
        if len(batch) == 0:
            raise ValueError("recalibrate: got an empty tuple as a batch")
        return batch[0]
    if isinstance(batch, Tensor):
        return batch
    raise TypeError(
        "recalibrate: each batch must be an input tensor or an (input, target, ...) tuple, "
        f"got {type(batch).__name__}"
    )


class _Moments:
    """Per-channel count, mean and sum of squared deviations, merged batch by batch in float64.

    Batches are combined with Chan, Golub and LeVeque's pairwise update, so the
    result equals the two-pass mean and variance of all values together.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"recalibrate: a BatchNorm input must be at least 2D, got {x.dim()}D")
        axes = (0, *range(2, x.dim()))
        xd = x.detach().to(torch.float64)
        m = xd.numel() // xd.shape[1]
        if m == 0:
            return
        mean_b = xd.mean(axes)
        m2_b = (xd - mean_b.reshape(1, -1, *([1] * (xd.dim() - 2)))).square().sum(axes)
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = m, mean_b, m2_b
            return
        n = self.count + m
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (m / n)
        self.m2 = self.m2 + m2_b + delta.square() * (self.count * m / n)
        self.count = n

    def statistics(self, name: str) -> tuple[Tensor, Tensor]:
        """Population mean and unbiased variance; ValueError with fewer than 2 values."""
        if self.mean is None or self.m2 is None or self.count < 2:
            raise ValueError(
                f"recalibrate: BatchNorm '{name}' saw {self.count} value(s) per channel; "
                "the unbiased variance needs at least 2"
            )
        return self.mean, self.m2 / (self.count - 1)


def _bn_states(bns: dict[str, nn.Module]) -> dict[str, dict[str, Tensor]]:
    out: dict[str, dict[str, Tensor]] = {}
    for name, bn in bns.items():
        out[name] = {k: b.detach().clone() for k, b in bn.named_buffers(recurse=False)}
    return out


def _restore_bn_states(bns: dict[str, nn.Module], states: dict[str, dict[str, Tensor]]) -> None:
    with torch.no_grad():
        for name, bn in bns.items():
            for k, b in bn.named_buffers(recurse=False):
                b.copy_(states[name][k])


def _record_inputs(modules: dict[str, nn.Module], moments: dict[str, _Moments]) -> list[Any]:
    """Forward pre-hooks that add each module's input to its moments; returns the handles."""
    handles = []
    for name, module in modules.items():

        def hook(_mod: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            moments[name].add(args[0])

        handles.append(module.register_forward_pre_hook(hook))
    return handles


def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    num_batches: int | None = None,
    method: Literal["train", "layerwise"] = "train",
) -> nn.Module:
    """Recompute the running statistics of every BatchNorm as population statistics, in place.

    For every BN layer with running statistics (torch's or bnlib's), the
    running mean becomes the mean of all values its input takes over the data,
    per channel, and the running variance their unbiased variance
    (:math:`\\frac{1}{n-1}\\sum (x-\\bar x)^2` over all :math:`n` values of a
    channel in all batches together, not an average of per-batch variances).
    This is the idea of PreciseBN (Wu & Johnson, 2021). With one batch, the
    first BN gets exactly that batch's mean and unbiased variance of its
    input; with ``method="train"`` every BN gets what one training-mode step
    with ``momentum=1`` would store (with ``"layerwise"``, deeper layers see
    the eval-mode inputs described below instead).

    What "the values its input takes" means for a layer after the first BN
    depends on how the earlier BN layers normalise, and ``method`` chooses:

    ``"train"`` (default, as PreciseBN and ``torch.optim.swa_utils.update_bn``)
        One pass over the data with every BN in training mode: each BN
        normalises a batch with that batch's own statistics, as during
        training, and every layer's population statistics are those of the
        inputs it receives in that regime. Other modules (Dropout, say) run in
        eval mode (``update_bn`` runs them in training mode).
    ``"layerwise"``
        The whole model in eval mode, one pass over the data per BN layer, in
        the order the forward pass first calls them: layer :math:`k`'s
        statistics are taken with layers :math:`1..k-1` already normalising by
        their new population statistics. Afterwards every BN's running
        statistics are exactly the mean and unbiased variance of the inputs it
        receives in eval mode over this data. ``batches`` is read once and
        kept in memory for the repeated passes.

    Parameters
    ----------
    model : torch.nn.Module
        Changed in place; only BN buffers change.
    batches : iterable
        Model inputs, or tuples (or lists) whose first element is the model
        input, e.g. a ``DataLoader`` of ``(input, target)``. Inputs are passed
        to ``model`` as they are (move them to the model's device yourself).
    num_batches : int, optional
        Use only the first ``num_batches`` elements of ``batches``.
    method : {"train", "layerwise"}, default "train"
        How deeper layers' statistics are defined (above).

    Returns
    -------
    torch.nn.Module
        ``model`` itself.

    Notes
    -----
    - Touched: ``running_mean``, ``running_var`` and ``num_batches_tracked``
      of every BN that tracks running statistics. ``num_batches_tracked`` is
      set to the number of batches used, so that a BN with ``momentum=None``
      (cumulative average) that keeps training weighs the recalibrated
      statistics as the average of that many batches. ``momentum`` plays no
      role in the recalibration itself.
    - BN layers with ``track_running_stats=False`` have no running
      statistics; they are left alone (and use batch statistics in both
      modes).
    - The training flag of every module is restored, also when an error is
      raised; on any error, all BN buffers are restored too. BN layers frozen
      by :func:`freeze_batch_norm` are recalibrated as well and stay frozen.
    - A model without BN layers that track statistics is returned unchanged
      without reading ``batches``.

    Raises
    ------
    ValueError
        ``batches`` yields nothing, ``num_batches`` is not positive, an
        unknown ``method``, or a BN sees fewer than 2 values per channel.
    TypeError
        A batch is neither a tensor nor a tuple or list.
    """
    if method not in ("train", "layerwise"):
        raise ValueError(f"recalibrate: method must be 'train' or 'layerwise', got {method!r}")
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    ):
        raise ValueError(f"recalibrate: num_batches must be a positive int, got {num_batches!r}")
    bns = {name: m for name, m in model.named_modules() if _has_running_stats(m)}
    if not bns:
        return model

    flags = {m: m.training for m in model.modules()}
    states = _bn_states(bns)
    handles: list[Any] = []
    done = False
    try:
        with torch.no_grad():
            if method == "train":
                results, used = _recalibrate_train(model, bns, batches, num_batches, handles)
            else:
                results, used = _recalibrate_layerwise(model, bns, batches, num_batches, handles)
            _restore_bn_states(bns, states)
            for name, (mean, var) in results.items():
                bn = bns[name]
                _need(bn, "running_mean").copy_(mean)
                _need(bn, "running_var").copy_(var)
                tracked = _get(bn, "num_batches_tracked")
                if tracked is not None:
                    tracked.fill_(used)
        done = True
    finally:
        for h in handles:
            h.remove()
        if not done:
            _restore_bn_states(bns, states)
        for m, flag in flags.items():
            m.training = flag
    return model


def _take(batches: Iterable[Any], num_batches: int | None) -> Iterable[Any]:
    for i, batch in enumerate(batches):
        if num_batches is not None and i >= num_batches:
            return
        yield batch


def _no_data_error() -> ValueError:
    return ValueError("recalibrate: `batches` yielded no batch; need at least one")


def _recalibrate_train(
    model: nn.Module,
    bns: dict[str, nn.Module],
    batches: Iterable[Any],
    num_batches: int | None,
    handles: list[Any],
) -> tuple[dict[str, tuple[Tensor, Tensor]], int]:
    moments = {name: _Moments() for name in bns}
    handles.extend(_record_inputs(bns, moments))
    for m in model.modules():  # flags set directly: frozen BN layers are recalibrated too
        m.training = is_batch_norm(m)
    used = 0
    for batch in _take(batches, num_batches):
        model(_batch_input(batch))
        used += 1
    if used == 0:
        raise _no_data_error()
    return {name: moments[name].statistics(name) for name in bns}, used


def _recalibrate_layerwise(
    model: nn.Module,
    bns: dict[str, nn.Module],
    batches: Iterable[Any],
    num_batches: int | None,
    handles: list[Any],
) -> tuple[dict[str, tuple[Tensor, Tensor]], int]:
    inputs = [_batch_input(b) for b in _take(batches, num_batches)]
    if not inputs:
        raise _no_data_error()
    for m in model.modules():
        m.training = False
    # the order in which the forward pass first calls each BN
    order: list[str] = []
    probes = []
    for name, bn in bns.items():

        def first_call(_mod: nn.Module, _args: tuple[Any, ...], name: str = name) -> None:
            if name not in order:
                order.append(name)

        probes.append(bn.register_forward_pre_hook(first_call))
    try:
        model(inputs[0])
    finally:
        for p in probes:
            p.remove()
    results: dict[str, tuple[Tensor, Tensor]] = {}
    for name in order:
        moments = {name: _Moments()}
        hook = _record_inputs({name: bns[name]}, moments)
        handles.extend(hook)
        for x in inputs:
            model(x)
        hook[0].remove()
        mean, var = moments[name].statistics(name)
        _need(bns[name], "running_mean").copy_(mean)  # later layers see the new statistics
        _need(bns[name], "running_var").copy_(var)
        results[name] = (mean, var)
    return results, len(inputs)


# --------------------------------------------------------------------------- fold


class _BNLeafTracer(torch.fx.Tracer):
    """torch.fx tracer that keeps every BatchNorm (torch's and bnlib's) as one call_module node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_batch_norm(m) or super().is_leaf_module(m, module_qualified_name)


def _bn_affine(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """``(s, t)`` in float64 such that ``bn`` in eval mode is ``y = s x + t`` per channel."""
    mean = _need(bn, "running_mean").detach().to(torch.float64)
    var = _need(bn, "running_var").detach().to(torch.float64)
    s = 1.0 / torch.sqrt(var + float(getattr(bn, "eps")))  # noqa: B009
    gamma, beta = _get(bn, "weight"), _get(bn, "bias")
    if gamma is not None:
        s = s * gamma.detach().to(torch.float64)
    t = -s * mean
    if beta is not None:
        t = t + beta.detach().to(torch.float64)
    return s, t


def _folded_layer(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of ``layer`` (conv, transposed conv or linear) with ``bn`` (eval) folded into it."""
    s, t = _bn_affine(bn)
    new = copy.deepcopy(layer)
    ref = _need(layer, "weight")
    bias = _get(layer, "bias")
    w = ref.detach().to(torch.float64)
    if isinstance(layer, _CONV_TRANSPOSE_TYPES):
        # weight (in, out/groups, *k): output channel g*(out/groups)+j is [g-th in block, j]
        g = int(getattr(layer, "groups"))  # noqa: B009
        in_ch, out_g = w.shape[0], w.shape[1]
        kdims = w.shape[2:]
        w = w.reshape(g, in_ch // g, out_g, *kdims) * s.reshape(g, 1, out_g, *([1] * len(kdims)))
        w = w.reshape(in_ch, out_g, *kdims)
    else:  # Conv*d and Linear: output channel c is weight[c]
        w = w * s.reshape(-1, *([1] * (w.dim() - 1)))
    b = t if bias is None else s * bias.detach().to(torch.float64) + t
    new.weight = nn.Parameter(w.to(ref.dtype), requires_grad=ref.requires_grad)
    new.bias = nn.Parameter(b.to(ref.dtype), requires_grad=ref.requires_grad)
    return new


def _out_channels(layer: nn.Module) -> int:
    name = "out_features" if isinstance(layer, nn.Linear) else "out_channels"
    return int(getattr(layer, name))


def _foldable_pair(
    gm: torch.fx.GraphModule, bn_node: torch.fx.Node, calls: dict[str, int], attrs: set[str]
) -> torch.fx.Node | None:
    """The layer node that ``bn_node`` can be folded into, or None."""
    bn = gm.get_submodule(str(bn_node.target))
    if not _has_running_stats(bn) or len(bn_node.args) != 1 or bn_node.kwargs:
        return None
    prev = bn_node.args[0]
    if not isinstance(prev, torch.fx.Node) or prev.op != "call_module":
        return None
    target = str(prev.target)
    layer = gm.get_submodule(target)
    if isinstance(layer, nn.Linear):
        if not isinstance(bn, (nn.BatchNorm1d, bnn.BatchNorm1d)):
            return None
    elif not isinstance(layer, _CONV_TYPES + _CONV_TRANSPOSE_TYPES):
        return None
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in layer.parameters()):
        return None  # a lazy module that never ran
    if _out_channels(layer) != int(getattr(bn, "num_features")):  # noqa: B009
        return None
    if len(prev.users) != 1:  # the layer's output is used elsewhere too
        return None
    if calls[target] != 1:  # the layer module is called at more than one place
        return None
    if any(a == target or a.startswith(target + ".") for a in attrs):
        return None  # its parameters are read directly somewhere in the graph
    return prev


def fold(model: nn.Module) -> nn.Module:
    """A new model, equal to ``model`` in eval mode, with BN folded into the layer before it.

    The forward graph is traced with ``torch.fx`` (a tracer that keeps every
    BN, torch's or bnlib's, as one node), so residual connections and other
    non-sequential graphs are handled. A BN node is folded when all of these
    hold:

    - it tracks running statistics (a BN with ``track_running_stats=False``
      normalises with batch statistics even in eval mode, so it is kept), and
      it is called with its input as the only argument;
    - its input is the output of a ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d``
      (grouped and depthwise included) or ``Linear`` module whose number of
      output channels (``out_features`` for ``Linear``) equals the BN's
      ``num_features``, and whose parameters are initialised (a lazy module
      that never ran is kept);
    - for ``Linear`` the BN must be a ``BatchNorm1d``, whose channel is the
      linear layer's output feature on an ``(N, C)`` input. A ``Linear``
      applied to an ``(N, L, C_in)`` input and followed by a ``BatchNorm1d``
      over axis 1 is kept when ``out_features`` differs from ``L``, but folded
      wrongly when the two happen to be equal: the graph carries no shapes, so
      that case is not detected;
    - that output is used by the BN only, the layer module is called at one
      place only, and its parameters are not read elsewhere in the graph.

    The folded layer is a new module: weight :math:`W'_c = s_c W_c`, bias
    :math:`b'_c = s_c b_c + t_c` (a bias is created when the layer had none),
    with :math:`s = \\gamma/\\sqrt{v+\\epsilon}` and :math:`t = \\beta - s\\mu`,
    computed in float64 and stored in the layer's dtype. ``affine=False`` BN
    (no :math:`\\gamma, \\beta`) and bnlib's ``bias=False`` BN are handled.
    Every other BN (after a ReLU, a pooling layer, an addition, ...) is kept.

    Parameters
    ----------
    model : torch.nn.Module
        Not modified. Must be traceable by ``torch.fx`` (no control flow
        that depends on tensor values).

    Returns
    -------
    torch.fx.GraphModule
        The folded model, in eval mode. In training mode it would differ
        from ``model``: folding fixes the statistics.
    """
    root = copy.deepcopy(model)
    tracer = _BNLeafTracer()
    graph = tracer.trace(root)
    gm = torch.fx.GraphModule(root, graph, root.__class__.__name__ + "Folded")
    calls: dict[str, int] = {}
    attrs: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
        elif node.op == "get_attr":
            attrs.add(str(node.target))
    for bn_node in list(gm.graph.nodes):
        if bn_node.op != "call_module" or not is_batch_norm(gm.get_submodule(str(bn_node.target))):
            continue
        layer_node = _foldable_pair(gm, bn_node, calls, attrs)
        if layer_node is None:
            continue
        target = str(layer_node.target)
        new = _folded_layer(gm.get_submodule(target), gm.get_submodule(str(bn_node.target)))
        parent_name, _, child = target.rpartition(".")
        setattr(gm.get_submodule(parent_name), child, new)
        bn_node.replace_all_uses_with(layer_node)
        gm.graph.erase_node(bn_node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.eval()
    return gm


# --------------------------------------------------------------------------- freeze

_FROZEN = "_bnlib_frozen"


def _frozen_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """``train`` of a frozen BN: the module stays in eval mode whatever ``mode`` says."""
    self.training = False
    for child in self.children():
        child.train(mode)
    return self


def freeze_batch_norm(model: nn.Module) -> nn.Module:
    """Freeze every BatchNorm in ``model`` for fine-tuning, in place.

    Each BN (torch's or bnlib's) is put in eval mode, and its ``train`` method
    is replaced on the instance so that ``model.train()`` leaves it in eval
    mode: it normalises with its running statistics and never updates them.
    Its ``weight`` and ``bias`` get ``requires_grad=False``, so an optimizer
    leaves them alone too (build the optimizer after freezing, or filter on
    ``requires_grad``). A BN with ``track_running_stats=False`` has no
    statistics to freeze and keeps using batch statistics; only its
    parameters are frozen.

    Setting ``requires_grad=False`` alone does *not* freeze the statistics:
    a BN in training mode still normalises with batch statistics and updates
    its running averages.

    Calling it twice is harmless; :func:`unfreeze_batch_norm` restores the
    training flags and ``requires_grad`` flags each BN had before the first call.

    Returns
    -------
    torch.nn.Module
        ``model`` itself.
    """
    for m in model.modules():
        if not is_batch_norm(m) or _FROZEN in m.__dict__:
            continue
        saved: dict[str, Any] = {"training": m.training}
        for pname in ("weight", "bias"):
            p = getattr(m, pname, None)
            if isinstance(p, nn.Parameter):
                saved[pname] = p.requires_grad
                p.requires_grad_(False)
        m.__dict__[_FROZEN] = saved
        # a partial of a module-level function: survives deepcopy and pickling (torch.save)
        m.__dict__["train"] = functools.partial(_frozen_train, m)
        m.training = False
    return model


def unfreeze_batch_norm(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze_batch_norm`: restore ``train`` and the saved flags, in place.

    Returns
    -------
    torch.nn.Module
        ``model`` itself.
    """
    for m in model.modules():
        saved = m.__dict__.pop(_FROZEN, None)
        if saved is None:
            continue
        m.__dict__.pop("train", None)
        m.training = bool(saved["training"])
        for pname in ("weight", "bias"):
            p = getattr(m, pname, None)
            if pname in saved and isinstance(p, nn.Parameter):
                p.requires_grad_(bool(saved[pname]))
    return model
