"""PyTorch modules: drop-in replacements for ``torch.nn.BatchNorm1d/2d/3d``.

The constructor, parameters, buffers, ``state_dict`` keys, ``repr`` and
semantics follow ``torch.nn.BatchNorm*d`` of the pinned torch. The arithmetic
is bnlib's own: training mode runs :func:`bnlib.functional.batch_norm_forward`
and, in the backward pass, :func:`bnlib.functional.batch_norm_backward`, wired
together by a ``torch.autograd.Function``. Torch's batch-norm kernels are never
called.

One deliberate difference: a call that raises changes nothing. Torch increments
``num_batches_tracked`` before it validates the input; bnlib validates first.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import Module, Parameter, init

from . import functional as F

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormFunction",
    "convert",
    "use_compiled",
]


_LOW_PRECISION = (torch.float16, torch.bfloat16)  # computed in float32, as torch does


def _stats(x: Tensor, axes: tuple[int, ...], m: int):
    """Per-channel statistics by the corrected two-pass algorithm.

    Returns ``(mean0, delta, var, xc)``: a first estimate ``mean0`` of the mean,
    the correction ``delta = mean(x - mean0)`` (the mean is ``mean0 + delta``),
    the biased variance ``mean((x - mean0)**2) - delta**2``, and the centred
    input ``xc = x - mean0``. When the channel's mean is large against its
    spread, ``x - mean0`` is exact in floating point (Sterbenz), and ``delta``
    carries the part of the mean that ``mean0`` cannot represent, so neither
    the variance nor ``x_hat = (xc - delta) / std`` suffers cancellation; this
    is how the float32 results stay as accurate as torch's at x = 1e4 + N(0, 1).
    On CPU these plain reductions are several times faster than torch's fused
    Welford ``var_mean`` over non-trailing axes.
    """
    mean0 = x.mean(axes, keepdim=True)
    xc = x - mean0
    delta = xc.mean(axes, keepdim=True)
    var = torch.mul(xc, xc).sum(axes, keepdim=True).div_(m).sub_(delta * delta)
    return mean0, delta, var, xc


class BatchNormFunction(torch.autograd.Function):
    """Training-mode BN as an autograd node whose backward is bnlib's closed form.

    ``forward(x, weight, bias, eps)`` returns ``(y, mean, var)``: the output and
    the per-channel batch mean and biased variance (the last two are not
    differentiable; the module uses them to update its running statistics).

    This is the fast path of :mod:`bnlib.functional`'s equations for torch
    tensors. Per channel, with :math:`s = \\gamma/\\sqrt{\\sigma^2+\\epsilon}`,
    the forward pass is the affine map :math:`y = s\\,(x-\\mu) + \\beta`, and
    the backward formula of :func:`bnlib.functional.batch_norm_backward`,

    .. math::

        dx = \\frac{s}{m}\\Big(m\\,g - \\textstyle\\sum g - \\hat x \\sum g\\hat x\\Big),

    is regrouped, using :math:`\\hat x = (x-\\mu)/\\sqrt{\\sigma^2+\\epsilon}`, into
    :math:`dx = s\\,g + b\\,(x-\\mu) + c` with per-channel :math:`b, c`: the same
    formula, evaluated in fewer passes over memory, with in-place updates.

    :func:`use_compiled` runs the same two kernels through ``torch.compile``.

    Saved for backward: the input ``x`` (the one input-sized tensor, as in
    torch's native kernel) and per-channel vectors. When a graph of the
    backward is requested (``create_graph=True``, double backward), the
    backward recomputes the forward from ``x`` with
    :func:`bnlib.functional.batch_norm_forward` and applies
    :func:`bnlib.functional.batch_norm_backward` with differentiable
    operations, so the returned gradients are differentiable themselves.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        forward_kernel = _compiled_kernels[0] if _compiled_kernels else _fast_forward
        y, mean0, delta, var, inv_std = forward_kernel(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean0, delta, inv_std)
        ctx.eps, ctx.has_bias = eps, bias is not None
        mean, var = (mean0 + delta).reshape(-1), var.reshape(-1)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy: Tensor, _dmean, _dvar):
        x, weight, mean0, delta, inv_std = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: differentiable ops all the way to x
            _, cache = F.batch_norm_forward(x, weight, None, ctx.eps)
            dx, dgamma, dbeta = F.batch_norm_backward(dy, cache)
        else:
            backward_kernel = _compiled_kernels[1] if _compiled_kernels else _fast_backward
            dx, dgamma, dbeta = backward_kernel(dy, x, weight, mean0, delta, inv_std)
        dweight = None if weight is None else dgamma.to(weight.dtype)
        dbias = None
        if ctx.has_bias:
            dbias = dbeta.to(weight.dtype if weight is not None else dy.dtype)
        return dx, dweight, dbias, None


def _fast_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
    """Training-mode forward: ``(y, mean0, delta, var, inv_std)``.

    The per-channel results have the broadcast shape ``(1, C, 1, ...)``.
    """
    axes = (0, *range(2, x.dim()))
    m = x.numel() // x.shape[1]
    xf = x.float() if x.dtype in _LOW_PRECISION else x
    mean0, delta, var, xc = _stats(xf, axes, m)
    inv_std = torch.rsqrt(var + eps)
    scale = inv_std if weight is None else inv_std * weight.reshape(inv_std.shape)
    # y = scale * (x - mean) + beta = scale * xc + (beta - scale * delta), in xc's memory
    shift = -scale * delta
    if bias is not None:
        shift = shift + bias.reshape(inv_std.shape)
    y = xc.mul_(scale).add_(shift)
    return y.to(x.dtype), mean0, delta, var, inv_std


def _fast_backward(dy, x, weight, mean0, delta, inv_std):
    """:func:`bnlib.functional.batch_norm_backward`, regrouped as dx = s·g + b·(x - μ) + c.

    ``x - μ`` is evaluated as ``(x - mean0) - delta`` (see :func:`_stats`), the
    ``delta`` folded into per-channel constants.
    """
    axes = (0, *range(2, x.dim()))
    m = x.numel() // x.shape[1]
    low = x.dtype in _LOW_PRECISION
    g = dy.float() if low else dy
    xf = x.float() if low else x
    dbeta = g.sum(axes, keepdim=True)  # sum g
    xc = torch.sub(xf, mean0)
    # sum g * x_hat = inv_std * (sum g * xc - delta * sum g)
    dgamma = torch.mul(xc, g).sum(axes, keepdim=True).sub_(delta * dbeta).mul_(inv_std)
    s = inv_std if weight is None else inv_std * weight.reshape(inv_std.shape)
    # dx = s/m * (m g - dbeta - x_hat dgamma),  x_hat = (xc - delta) inv_std
    b = -s * inv_std * dgamma / m
    c = -s * dbeta / m - b * delta
    dx = xc.mul_(b).add_(c).addcmul_(g, s)
    return dx.to(dy.dtype), dgamma.reshape(-1), dbeta.reshape(-1)


_compiled_kernels: tuple | None = None  # in use: (forward, backward), or None for eager
_compiled_cache: tuple | None = None


def use_compiled(enabled: bool = True) -> None:
    """Run :class:`BatchNormFunction`'s fast kernels through ``torch.compile``.

    The compiled kernels compute the same formulas, fused into a few loops,
    at the cost of a compilation (tens of seconds on the first call of each
    input shape, and a C++ compiler on the CPU). Off by default.

    Parameters
    ----------
    enabled : bool, default True
        Switch the compiled kernels on (True) or back to eager (False).
    """
    global _compiled_kernels, _compiled_cache
    if enabled and _compiled_cache is None:
        _compiled_cache = (torch.compile(_fast_forward), torch.compile(_fast_backward))
    _compiled_kernels = _compiled_cache if enabled else None


class _BatchNorm(Module):
    """Common base of :class:`BatchNorm1d`, :class:`BatchNorm2d`, :class:`BatchNorm3d`."""

    _version = 2  # state_dict version 2 added num_batches_tracked, as in torch
    _input_dims: tuple[int, ...] = ()
    _dims_text: str = ""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = Parameter(torch.empty(num_features, **factory))
            if bias:
                self.bias = Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    # -- initialisation ----------------------------------------------------
    def reset_running_stats(self) -> None:
        """Set ``running_mean`` to 0, ``running_var`` to 1, ``num_batches_tracked`` to 0."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset the running statistics and set ``weight`` to 1, ``bias`` to 0."""
        self.reset_running_stats()
        if self.affine:
            init.ones_(self.weight)
            if self.bias is not None:
                init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            # state dicts from before version 2 lack the counter: keep ours (0 when fresh), as torch
            state_dict[key] = (
                self.num_batches_tracked
                if self.num_batches_tracked is not None
                and self.num_batches_tracked.device != torch.device("meta")
                else torch.tensor(0, dtype=torch.long)
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # -- forward -----------------------------------------------------------
    def _check_input(self, x: Tensor, batch_stats: bool) -> None:
        """Every check that can fail, before any state is touched."""
        if x.dim() not in self._input_dims:
            raise ValueError(f"expected {self._dims_text} input (got {x.dim()}D input)")
        if not x.is_floating_point():
            raise NotImplementedError(
                f"batch_norm is not implemented for {x.dtype} input (floating point only)"
            )
        if x.shape[1] != self.num_features:
            raise RuntimeError(
                f"expected input with {self.num_features} channels (num_features), "
                f"got {x.shape[1]} channels (input shape {list(x.shape)})"
            )
        if batch_stats:
            values_per_channel = x.shape[0] * math.prod(x.shape[2:])
            if values_per_channel == 1:
                raise ValueError(
                    "Expected more than 1 value per channel when training, "
                    f"got input size {x.shape}"
                )
            if not self.eps > 0:
                raise ValueError(
                    f"batch_norm eps must be positive during training, but got {self.eps}"
                )
        elif not self.eps >= 0:
            raise ValueError(f"batch_norm eps must be non-negative, but got {self.eps}")

    def forward(self, input: Tensor) -> Tensor:
        # batch statistics in training, and in eval when there are no running statistics
        use_batch_stats = self.training or self.running_mean is None
        update_stats = self.training and self.track_running_stats
        self._check_input(input, use_batch_stats)

        if not use_batch_stats:
            return F.batch_norm_inference(
                input, self.weight, self.bias, self.running_mean, self.running_var, self.eps
            )
        if input.numel() == 0:  # empty batch, as torch: empty output, statistics unchanged
            if update_stats:
                self.num_batches_tracked.add_(1)
            C = self.num_features
            return F.batch_norm_inference(
                input, self.weight, self.bias, input.new_zeros(C), input.new_ones(C), self.eps
            )

        y, mean, var = BatchNormFunction.apply(input, self.weight, self.bias, self.eps)
        if update_stats:
            self._update_running_stats(mean, var, input.numel() // input.shape[1])
        return y

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, m: int) -> None:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = self.momentum
        unbiased_var = var * (m / (m - 1))
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), factor)


class BatchNorm1d(_BatchNorm):
    """Batch normalisation over a 2D ``(N, C)`` or 3D ``(N, C, L)`` input.

    A drop-in replacement for :class:`torch.nn.BatchNorm1d`, computed by bnlib.

    Parameters
    ----------
    num_features : int
        ``C``, the number of features or channels.
    eps : float, default 1e-5
        Added to the variance for numerical stability.
    momentum : float or None, default 0.1
        Weight of the new batch in the running averages; ``None`` for a
        cumulative (equal-weight) average.
    affine : bool, default True
        Learn a per-channel scale ``weight`` (γ) and shift ``bias`` (β).
    track_running_stats : bool, default True
        Keep ``running_mean``, ``running_var`` and ``num_batches_tracked`` and
        use them in eval mode; if False, batch statistics are used in both modes.
    device, dtype : optional
        Where and in which dtype to create parameters and buffers.
    bias : bool, default True (keyword only)
        With ``affine``, whether to learn the shift β.

    Shape
    -----
    Input ``(N, C)`` or ``(N, C, L)``; output the same.
    """

    _input_dims = (2, 3)
    _dims_text = "2D or 3D"


class BatchNorm2d(_BatchNorm):
    """Batch normalisation over a 4D ``(N, C, H, W)`` input, one (γ, β) per channel.

    A drop-in replacement for :class:`torch.nn.BatchNorm2d`, computed by bnlib.
    Statistics are taken over ``N``, ``H`` and ``W``: ``m = N·H·W`` values per
    channel. Parameters as for :class:`BatchNorm1d`.

    Shape
    -----
    Input ``(N, C, H, W)``; output the same.
    """

    _input_dims = (4,)
    _dims_text = "4D"


class BatchNorm3d(_BatchNorm):
    """Batch normalisation over a 5D ``(N, C, D, H, W)`` input.

    A drop-in replacement for :class:`torch.nn.BatchNorm3d`, computed by bnlib.
    Parameters as for :class:`BatchNorm1d`.

    Shape
    -----
    Input ``(N, C, D, H, W)``; output the same.
    """

    _input_dims = (5,)
    _dims_text = "5D"


_REPLACEMENTS = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}


def _converted(bn: torch.nn.modules.batchnorm._BatchNorm) -> _BatchNorm:
    ref = bn.weight if bn.weight is not None else bn.running_mean
    factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    new = _REPLACEMENTS[type(bn)](
        bn.num_features,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        bias=bn.bias is not None,
        **factory,
    )
    with torch.no_grad():
        new.load_state_dict(bn.state_dict())
    if bn.weight is not None:
        new.weight.requires_grad_(bn.weight.requires_grad)
    if bn.bias is not None:
        new.bias.requires_grad_(bn.bias.requires_grad)
    new.train(bn.training)
    return new


def convert(module: Module) -> Module:
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` in ``module`` with bnlib's.

    Parameters, buffers, ``requires_grad`` flags, the training flag, device and
    dtype are kept, so the converted model computes the same function. Modules
    are replaced in place; the (possibly new) root module is returned, so
    ``convert(torch.nn.BatchNorm2d(3))`` works too.

    Parameters
    ----------
    module : torch.nn.Module

    Returns
    -------
    torch.nn.Module
        ``module`` itself, or the replacement if ``module`` is itself a
        BatchNorm layer.
    """
    if type(module) in _REPLACEMENTS:
        return _converted(module)
    for name, child in module.named_children():
        new_child = convert(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


# ===========================================================================
# The normalisation family: GroupNorm, LayerNorm, InstanceNorm1d/2d/3d,
# BatchRenorm1d/2d/3d and GhostBatchNorm1d/2d/3d. Each subclasses torch's own
# class (so isinstance checks, parameters, buffers and state_dict keys are
# torch's) and computes with bnlib.functional.normalize_forward/backward.
# ===========================================================================

__all__ += [
    "NormalizeFunction",
    "GroupNorm",
    "LayerNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
]

from typing import Any  # noqa: E402

from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm  # noqa: E402


class NormalizeFunction(torch.autograd.Function):
    """:func:`bnlib.functional.normalize_forward` as an autograd node.

    ``apply(x, weight, bias, axes, eps, param_axes)`` returns ``(y, mean, var)``:
    the output and the statistics of each reduced group (broadcast shape, not
    differentiable). The backward is :func:`bnlib.functional.normalize_backward`,
    the closed form; it recomputes the forward from the saved input with
    differentiable operations, so double backward works too (one extra pass
    over the input, the price of a short, obviously correct backward). The
    forward-mode derivative (``jvp``) is the closed-form linearisation
    :math:`\\dot y = \\gamma\\,\\sigma^{-1}(\\dot x - \\overline{\\dot x}
    - \\hat x\\,\\overline{\\dot x \\hat x}) + \\dot\\gamma \\hat x + \\dot\\beta`
    (bars: means over the reduced axes), and ``vmap`` is generated by torch.

    Why an ``autograd.Function`` rather than letting autograd differentiate
    the routine's torch operations: the book's point is that the closed form
    is what trains, and the tests compare it with autograd (gradcheck), which
    would be vacuous if autograd computed both sides.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        axes: tuple[int, ...],
        eps: float,
        param_axes: tuple[int, ...],
    ) -> tuple[Tensor, Tensor, Tensor]:
        y, cache = F.normalize_forward(x, weight, bias, axes, eps, param_axes)
        return y, cache.mean, cache.var

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
        x, weight, bias, axes, eps, param_axes = inputs
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(x, weight)
        ctx.axes, ctx.eps, ctx.param_axes = axes, eps, param_axes
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(output[1], output[2])

    @staticmethod
    def backward(
        ctx: Any, dy: Tensor, _dmean: Tensor | None, _dvar: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        _, cache = F.normalize_forward(x, weight, None, ctx.axes, ctx.eps, ctx.param_axes)
        dx, dgamma, dbeta = F.normalize_backward(dy, cache)
        dweight = None if weight is None else dgamma.reshape(weight.shape).to(weight.dtype)
        dbias = None
        if ctx.has_bias:
            pshape = weight.shape if weight is not None else dbeta.shape
            dbias = dbeta.reshape(pshape).to(dy.dtype if weight is None else weight.dtype)
        return dx, dweight, dbias, None, None, None

    @staticmethod
    def jvp(
        ctx: Any,
        dx: Tensor | None,
        dweight: Tensor | None,
        dbias: Tensor | None,
        *_: Any,
    ) -> tuple[Tensor | None, None, None]:
        x, weight = ctx.saved_tensors
        _, c = F.normalize_forward(x, None, None, ctx.axes, ctx.eps, ctx.param_axes)
        pshape = c.x_hat.shape if weight is None else None
        dy = torch.zeros_like(c.x_hat) if pshape is not None else None
        bshape = [n if i in c.param_axes else 1 for i, n in enumerate(x.shape)]
        if dx is not None:
            dxc = dx.to(c.x_hat.dtype)
            mean_dx = dxc.mean(c.axes, keepdim=True)
            mean_dx_xhat = (dxc * c.x_hat).mean(c.axes, keepdim=True)
            dx_hat = c.inv_std * (dxc - mean_dx - c.x_hat * mean_dx_xhat)
            dy = dx_hat if weight is None else weight.reshape(bshape) * dx_hat
        if dweight is not None:
            term = dweight.reshape(bshape) * c.x_hat
            dy = term if dy is None else dy + term
        if dbias is not None:
            term = dbias.reshape(bshape).expand(c.x_hat.shape)
            dy = term if dy is None else dy + term
        return (None if dy is None else dy.to(x.dtype)), None, None


def _normalize(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    axes: tuple[int, ...],
    eps: float,
    param_axes: tuple[int, ...],
) -> tuple[Tensor, Tensor, Tensor]:
    """``NormalizeFunction.apply`` with its types spelled out."""
    out: tuple[Tensor, Tensor, Tensor] = NormalizeFunction.apply(  # type: ignore[no-untyped-call]
        x, weight, bias, axes, eps, param_axes
    )
    return out


def _check_floating(x: Tensor, what: str) -> None:
    if not x.is_floating_point():
        raise NotImplementedError(
            f"{what} is not implemented for {x.dtype} input (floating point only)"
        )


def _check_momentum(momentum: object) -> None:
    if momentum is not None and (
        isinstance(momentum, bool) or not isinstance(momentum, (int, float))
    ):
        raise TypeError(
            f"momentum must be a float in [0, 1] or None, got {type(momentum).__name__} "
            f"{momentum!r}"
        )


class GroupNorm(torch.nn.GroupNorm):
    """Group normalisation (Wu & He, 2018), a drop-in for :class:`torch.nn.GroupNorm`.

    The ``C`` channels are split into ``num_groups`` consecutive groups; each
    example's values in a group (``C/G`` channels times all spatial positions)
    share one mean and variance. Computed as :func:`bnlib.functional.normalize_forward`
    on the input viewed as ``(N, G, C/G, H·W)``: ``axes=(2, 3)``,
    ``param_axes=(1, 2)``, so the per-channel ``weight`` of shape ``(C,)`` is
    read as ``(G, C/G)``. Same constructor, parameters and ``state_dict`` as torch.
    ``num_groups=1`` is layer normalisation over ``(C, H, W)`` with a
    per-channel affine; ``num_groups=C`` is instance normalisation.
    """

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() < 2:
            raise RuntimeError(
                f"Expected at least 2 dimensions for input tensor but received {input.dim()}"
            )
        _check_floating(input, "group_norm")
        N, C = input.shape[0], input.shape[1]
        if C != self.num_channels:
            raise RuntimeError(
                f"expected input with {self.num_channels} channels (num_channels), got {C} "
                f"(input shape {list(input.shape)})"
            )
        if input.numel() == 0:
            return input.clone()
        G = self.num_groups
        grouped = input.reshape(N, G, C // G, math.prod(input.shape[2:]))
        y, _, _ = _normalize(grouped, self.weight, self.bias, (2, 3), self.eps, (1, 2))
        return y.reshape(input.shape)


class LayerNorm(torch.nn.LayerNorm):
    """Layer normalisation (Ba et al., 2016), a drop-in for :class:`torch.nn.LayerNorm`.

    Each example is normalised over its last ``len(normalized_shape)`` axes,
    with one (γ, β) per element of ``normalized_shape``:
    :func:`bnlib.functional.normalize_forward` with ``axes = param_axes`` = the
    trailing axes. No batch statistics, so training and eval compute the same
    function. Same constructor, parameters and ``state_dict`` as torch.
    """

    def forward(self, input: Tensor) -> Tensor:
        k = len(self.normalized_shape)
        if input.dim() < k or tuple(input.shape[input.dim() - k :]) != self.normalized_shape:
            raise RuntimeError(
                f"Given normalized_shape={list(self.normalized_shape)}, expected input with "
                f"shape [*, {', '.join(map(str, self.normalized_shape))}], but got input of "
                f"size {list(input.shape)}"
            )
        _check_floating(input, "layer_norm")
        if input.numel() == 0:
            return input.clone()
        axes = tuple(range(input.dim() - k, input.dim()))
        y, _, _ = _normalize(input, self.weight, self.bias, axes, self.eps, axes)
        return y


class _InstanceNormMixin(torch.nn.modules.instancenorm._InstanceNorm):
    """bnlib's arithmetic inside torch's ``_InstanceNorm`` (whose ``forward`` checks
    the rank and handles unbatched input, then calls ``_apply_instance_norm``)."""

    def _apply_instance_norm(self, input: Tensor) -> Tensor:
        _check_floating(input, "instance_norm")
        use_input_stats = self.training or not self.track_running_stats
        C = input.shape[1]
        if self.track_running_stats and C != self.num_features:
            raise RuntimeError(
                f"expected input with {self.num_features} channels (num_features), got {C} "
                f"(input shape {list(input.shape)})"
            )
        if not use_input_stats:
            y: Tensor = F.batch_norm_inference(
                input, self.weight, self.bias, self.running_mean, self.running_var, self.eps
            )
            return y
        m = math.prod(input.shape[2:])
        if m <= 1:
            raise ValueError(
                f"Expected more than 1 spatial element when training, got input size "
                f"{list(input.shape)}"
            )
        update = self.training and self.track_running_stats
        if update:
            _check_momentum(self.momentum)
        if input.numel() == 0:
            return input.clone()
        axes = tuple(range(2, input.dim()))
        y, mean, var = _normalize(input, self.weight, self.bias, axes, self.eps, (1,))
        if update:
            # as torch: the running statistics move towards the batch average of the
            # per-instance means and unbiased variances; momentum None means 0 (no update)
            # and num_batches_tracked is not counted
            factor = 0.0 if self.momentum is None else self.momentum
            rm, rv = self.running_mean, self.running_var
            assert rm is not None and rv is not None
            with torch.no_grad():
                mean_c = mean.mean(0).reshape(-1).to(rm.dtype)
                var_c = (var * (m / (m - 1))).mean(0).reshape(-1).to(rv.dtype)
                rm.copy_(F.running_average(rm, mean_c, factor))
                rv.copy_(F.running_average(rv, var_c, factor))
        return y


class InstanceNorm1d(_InstanceNormMixin, torch.nn.InstanceNorm1d):
    """Instance normalisation (Ulyanov et al., 2016) of ``(N, C, L)`` or ``(C, L)`` input.

    A drop-in for :class:`torch.nn.InstanceNorm1d` (defaults ``affine=False``,
    ``track_running_stats=False``): each example's channel is normalised over
    its own ``L`` positions, :func:`bnlib.functional.normalize_forward` with
    ``axes`` = the spatial axes and ``param_axes=(1,)``. With
    ``track_running_stats=True``, training updates ``running_mean`` and
    ``running_var`` towards the batch average of the per-instance statistics
    and eval normalises with them, as torch does.
    """


class InstanceNorm2d(_InstanceNormMixin, torch.nn.InstanceNorm2d):
    """Instance normalisation of ``(N, C, H, W)`` or ``(C, H, W)`` input; see
    :class:`InstanceNorm1d`. A drop-in for :class:`torch.nn.InstanceNorm2d`."""


class InstanceNorm3d(_InstanceNormMixin, torch.nn.InstanceNorm3d):
    """Instance normalisation of ``(N, C, D, H, W)`` or ``(C, D, H, W)`` input; see
    :class:`InstanceNorm1d`. A drop-in for :class:`torch.nn.InstanceNorm3d`."""


class _BatchNormFamily(_TorchBatchNorm):
    """Shared checks and running-statistics update of Batch Renorm and Ghost BN."""

    def _check_family_input(self, input: Tensor, what: str) -> None:
        self._check_input_dim(input)  # type: ignore[no-untyped-call]
        _check_floating(input, what)
        if input.shape[1] != self.num_features:
            raise RuntimeError(
                f"expected input with {self.num_features} channels (num_features), "
                f"got {input.shape[1]} channels (input shape {list(input.shape)})"
            )

    def _inference(self, input: Tensor) -> Tensor:
        y: Tensor = F.batch_norm_inference(
            input, self.weight, self.bias, self.running_mean, self.running_var, self.eps
        )
        return y

    @torch.no_grad()
    def _update_running(self, mean: Tensor, unbiased_var: Tensor) -> None:
        """One BN update: ``running ← running + factor·(batch − running)``."""
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = float(self.momentum)
        rm, rv = self.running_mean, self.running_var
        rm.copy_(F.running_average(rm, mean.reshape(-1).to(rm.dtype), factor))
        rv.copy_(F.running_average(rv, unbiased_var.reshape(-1).to(rv.dtype), factor))


class _BatchRenorm(_BatchNormFamily):
    """Batch Renormalization (Ioffe, 2017); see :class:`BatchRenorm2d`."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        r_max: float = 3.0,
        d_max: float = 5.0,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, True, device, dtype)
        self.r_max = r_max
        self.d_max = d_max

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, r_max={self.r_max}, d_max={self.d_max}"
        )

    def forward(self, input: Tensor) -> Tensor:
        self._check_family_input(input, "batch_renorm")
        if not self.training:
            return self._inference(input)
        F._check_training_batch(tuple(input.shape), 1)
        _check_momentum(self.momentum)
        if not self.r_max >= 1 or not self.d_max >= 0:
            raise ValueError(f"need r_max >= 1 and d_max >= 0, got {self.r_max}, {self.d_max}")
        assert self.running_mean is not None and self.running_var is not None
        axes = (0, *range(2, input.dim()))
        x_hat, mean, var = _normalize(input, None, None, axes, self.eps, (1,))
        with (
            torch.no_grad()
        ):  # r and d: constants for backprop, from the statistics before this step
            shape = mean.shape
            sigma_b = torch.sqrt(var + self.eps)
            sigma = torch.sqrt(self.running_var.reshape(shape).to(var.dtype) + self.eps)
            mu = self.running_mean.reshape(shape).to(mean.dtype)
            r = torch.clamp(sigma_b / sigma, 1.0 / self.r_max, self.r_max)
            d = torch.clamp((mean - mu) / sigma, -self.d_max, self.d_max)
        y = x_hat * r.to(x_hat.dtype) + d.to(x_hat.dtype)
        if self.weight is not None:
            y = y * self.weight.reshape(shape)
        if self.bias is not None:
            y = y + self.bias.reshape(shape)
        m = input.numel() // input.shape[1]
        self._update_running(mean, var * (m / (m - 1)))
        return y


class BatchRenorm1d(_BatchRenorm, torch.nn.BatchNorm1d):
    """Batch Renormalization of ``(N, C)`` or ``(N, C, L)`` input; see :class:`BatchRenorm2d`."""


class BatchRenorm2d(_BatchRenorm, torch.nn.BatchNorm2d):
    """Batch Renormalization (Ioffe, 2017) of ``(N, C, H, W)`` input.

    In training, with the batch mean :math:`\\mu_B`, the biased batch variance
    :math:`\\sigma_B^2`, :math:`\\sigma_B = \\sqrt{\\sigma_B^2+\\epsilon}`,
    :math:`\\hat x = (x-\\mu_B)/\\sigma_B`, and the running statistics *before*
    this step's update, :math:`\\mu` = ``running_mean`` and
    :math:`\\sigma = \\sqrt{\\text{running\\_var}+\\epsilon}`:

    .. math::

        r = \\operatorname{clip}(\\sigma_B/\\sigma, 1/r_{max}, r_{max}), \\quad
        d = \\operatorname{clip}((\\mu_B-\\mu)/\\sigma, -d_{max}, d_{max}), \\quad
        y = \\gamma(\\hat x\\, r + d) + \\beta,

    with ``r`` and ``d`` treated as constants by backprop. The running
    statistics are then updated exactly as BatchNorm updates them, and eval mode
    is BatchNorm's. With ``r = 1`` and ``d = 0`` (``r_max = 1``, ``d_max = 0``,
    the paper's start) this is BatchNorm; ``r_max`` and ``d_max`` are plain
    attributes a training loop may raise over time.

    A subclass of :class:`torch.nn.BatchNorm2d` (parameters, buffers and
    ``state_dict`` keys are BatchNorm's), so code that looks for BatchNorm
    finds it; note that such code (``SyncBatchNorm.convert_sync_batchnorm``,
    fusion) then treats it as plain BatchNorm.
    """


class BatchRenorm3d(_BatchRenorm, torch.nn.BatchNorm3d):
    """Batch Renormalization of ``(N, C, D, H, W)`` input; see :class:`BatchRenorm2d`."""


class _GhostBatchNorm(_BatchNormFamily):
    """Ghost Batch Normalization (Hoffer et al., 2017); see :class:`GhostBatchNorm2d`."""

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int):
            raise TypeError(
                f"virtual_batch_size must be an int, got {type(virtual_batch_size).__name__}"
            )
        if virtual_batch_size < 1:
            raise ValueError(f"virtual_batch_size must be at least 1, got {virtual_batch_size}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.virtual_batch_size = virtual_batch_size

    def extra_repr(self) -> str:
        base: str = super().extra_repr()  # type: ignore[no-untyped-call]
        return f"{base}, virtual_batch_size={self.virtual_batch_size}"

    def forward(self, input: Tensor) -> Tensor:
        self._check_family_input(input, "ghost_batch_norm")
        if not self.training and self.track_running_stats:
            return self._inference(input)
        F._check_training_batch(tuple(input.shape), 1)
        chunks = torch.split(input, self.virtual_batch_size, dim=0)
        last = chunks[-1]
        if last.numel() // last.shape[1] == 1:
            raise ValueError(
                f"the last ghost batch has a single value per channel (batch of "
                f"{input.shape[0]}, virtual_batch_size {self.virtual_batch_size}): choose a "
                "virtual_batch_size that leaves at least 2 examples in the last chunk"
            )
        update = self.training and self.track_running_stats
        if update:
            _check_momentum(self.momentum)
        axes = (0, *range(2, input.dim()))
        outs, means, unbiased_vars, sizes = [], [], [], []
        for chunk in chunks:
            y, mean, var = _normalize(chunk, self.weight, self.bias, axes, self.eps, (1,))
            m = chunk.numel() // chunk.shape[1]
            outs.append(y)
            means.append(mean)
            unbiased_vars.append(var * (m / (m - 1)))
            sizes.append(chunk.shape[0])
        if update:
            w = [n / input.shape[0] for n in sizes]  # each chunk's share of the examples
            zero = torch.zeros_like(means[0])
            self._update_running(
                sum((wi * mi for wi, mi in zip(w, means, strict=True)), start=zero),
                sum((wi * vi for wi, vi in zip(w, unbiased_vars, strict=True)), start=zero),
            )
        return torch.cat(outs, dim=0)


class GhostBatchNorm1d(_GhostBatchNorm, torch.nn.BatchNorm1d):
    """Ghost Batch Normalization of ``(N, C)`` or ``(N, C, L)`` input; see
    :class:`GhostBatchNorm2d`."""


class GhostBatchNorm2d(_GhostBatchNorm, torch.nn.BatchNorm2d):
    """Ghost Batch Normalization (Hoffer et al., 2017) of ``(N, C, H, W)`` input.

    In training, the batch is cut along ``N`` into consecutive chunks of
    ``virtual_batch_size`` examples (the last may be smaller) and each chunk is
    batch-normalised with its own statistics (the same γ, β for all). Eval mode
    is BatchNorm's: running statistics, or, with ``track_running_stats=False``,
    the chunk statistics as in training.

    **Running statistics: one update per call**, with the chunk statistics
    averaged, each chunk weighted by its share of the examples:
    ``mean = Σ (n_i/N) μ_i`` (the full batch's mean) and
    ``var = Σ (n_i/N) s_i²`` with ``s_i²`` chunk ``i``'s unbiased variance.
    Why: ``momentum`` then keeps BatchNorm's meaning (one update per training
    step, whatever the number of chunks), and each unbiased chunk variance
    estimates the population variance, as BatchNorm's running variance does,
    rather than the spread of the chunk means. ``virtual_batch_size >= N``
    gives exactly BatchNorm. A subclass of :class:`torch.nn.BatchNorm2d`.
    """


class GhostBatchNorm3d(_GhostBatchNorm, torch.nn.BatchNorm3d):
    """Ghost Batch Normalization of ``(N, C, D, H, W)`` input; see
    :class:`GhostBatchNorm2d`."""
