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
