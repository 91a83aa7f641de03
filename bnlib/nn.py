"""PyTorch modules: bnlib's BatchNorm as true subclasses of ``torch.nn.BatchNorm1d/2d/3d``.

:class:`BatchNorm1d`, :class:`BatchNorm2d` and :class:`BatchNorm3d` subclass
torch's classes of the same name and override only ``forward``. Constructor,
parameters, buffers, ``state_dict``, ``repr`` and ``isinstance`` checks are
torch's own, so the ecosystem finds them: the freeze-BN idiom
(``isinstance(m, torch.nn.modules.batchnorm._BatchNorm)``),
``torch.nn.SyncBatchNorm.convert_sync_batchnorm``,
``torch.ao.quantization.fuse_modules`` (eval-mode fusion with a preceding
Conv/Linear), ``torch.fx.symbolic_trace`` (one ``call_module`` node per layer),
``torch.func`` transforms, ``torch.compile`` and ``torch.export``.

The arithmetic is bnlib's: torch's batch-norm kernels are never called. Every
tensor computation of BN goes through three functions, the *kernel seam*:
:func:`_train_forward`, :func:`_train_backward` (the closed-form gradient of
:func:`bnlib.functional.batch_norm_backward`) and :func:`_eval_forward`. In
training mode they are wired together by :class:`BatchNormFunction`.

Deliberate differences from torch:

- A call that raises changes nothing. Torch increments ``num_batches_tracked``
  before it validates the input; bnlib validates first.
- ``torch.jit.script`` raises a ``RuntimeError`` (TorchScript is in maintenance
  upstream; use ``torch.compile`` or ``torch.export``).
- In quantization-aware training, ``fuse_modules`` builds torch's ``ConvBn2d``
  etc., which accept torch's exact classes only; eval-mode fusion (which folds
  BN into the convolution) works.
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from . import kernels

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormFunction",
    "convert",
    "use_compiled",
]


_LOW_PRECISION = (torch.float16, torch.bfloat16)  # computed in float32, as torch does


# ---------------------------------------------------------------------------
# the kernel seam: all of BN's arithmetic, eager torch code
# ---------------------------------------------------------------------------


def _layout(x: Tensor) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """Reduction axes, the broadcast shape ``(1, C, 1, ...)`` of a per-channel
    vector, and ``m``, the number of values per channel."""
    axes = (0, *range(2, x.dim()))
    bshape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    return axes, bshape, x.numel() // x.shape[1]


def _compute(t: Tensor) -> Tensor:
    """``t`` in the compute dtype: float32 for float16/bfloat16, else unchanged."""
    return t.float() if t.dtype in _LOW_PRECISION else t


def _train_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode forward with batch statistics: ``(y, mean, var)``.

    ``mean`` and the *biased* ``var`` have shape ``(C,)`` and the compute
    dtype (float32 for float16/bfloat16 input); ``y`` has ``x``'s shape and dtype.

    The statistics come from the corrected two-pass algorithm: a first estimate
    ``mean0`` of the mean, the correction ``delta = mean(x - mean0)``, and the
    variance ``mean((x - mean0)**2) - delta**2``. When a channel's mean is large
    against its spread, ``x - mean0`` is exact in floating point (Sterbenz) and
    ``delta`` carries what ``mean0`` cannot represent, so neither the variance
    nor ``x_hat`` suffers cancellation: float32 results stay as accurate as
    torch's at ``x = 1e4 + N(0, 1)``. Plain reductions are also several times
    faster on the CPU than torch's Welford ``var_mean`` over non-trailing axes.

    The output is ``y = s * (x - mean0) + (beta - s * delta)`` with
    ``s = gamma / sqrt(var + eps)``, written into the centred copy of ``x``
    where that is safe (:func:`_plain`); out of place where autograd records
    (the double-backward path differentiates this function) or under a
    torch.func transform (an in-place update of an unbatched tensor by a
    batched one is not allowed).
    """
    if not _eager_required(x, weight, bias) and kernels.supports(x):
        return kernels.train_forward(x, weight, bias, eps)  # fused CPU kernels
    axes, bshape, m = _layout(x)
    xf = _compute(x)
    mean0 = xf.mean(axes, keepdim=True)
    xc = xf - mean0
    delta = xc.mean(axes, keepdim=True)
    var = torch.mul(xc, xc).sum(axes, keepdim=True).div_(m).sub_(delta * delta)
    inv_std = torch.rsqrt(var + eps)
    scale = inv_std if weight is None else inv_std * weight.reshape(bshape)
    shift = -scale * delta
    if bias is not None:
        shift = shift + bias.reshape(bshape)
    if _plain(xc, scale, shift):
        y = xc.mul_(scale).add_(shift)
    else:
        y = xc * scale + shift
    return y.to(x.dtype), (mean0 + delta).reshape(-1), var.reshape(-1)


def _train_backward(
    dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, var: Tensor, eps: float
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Closed-form gradients of the training-mode forward: ``(dx, dweight, dbias)``.

    ``mean`` and ``var`` are :func:`_train_forward`'s. With
    :math:`s = \\gamma/\\sqrt{\\sigma^2+\\epsilon}` per channel, the formula of
    :func:`bnlib.functional.batch_norm_backward`,

    .. math::

        dx = \\frac{s}{m}\\Big(m\\,g - \\textstyle\\sum g - \\hat x \\sum g\\hat x\\Big),

    is regrouped, using :math:`\\hat x = (x-\\mu)/\\sqrt{\\sigma^2+\\epsilon}`, into
    :math:`dx = s\\,g + b\\,(x-\\mu) + c` with per-channel :math:`b, c`: the same
    formula in fewer passes over memory. ``x - mean`` is taken as
    ``(x - mean) - delta`` with ``delta = mean(x - mean)`` recomputed here (the
    corrected two pass of :func:`_train_forward`), so a float32 ``mean`` that
    cannot hold the exact mean of a large-offset channel costs no accuracy.

    ``dweight`` is ``None`` when ``weight`` is; ``dbias`` (``sum g``) is always
    returned, in ``weight``'s dtype (``dy``'s without weight): the caller drops
    it where there is no bias. The input-sized temporaries are updated in place
    only where that is safe (:func:`_plain`).
    """
    if not _eager_required(dy, x, weight, mean, var) and kernels.supports(x):
        return kernels.train_backward(dy, x, weight, mean, var, eps)
    axes, bshape, m = _layout(x)
    g = _compute(dy)
    xc = _compute(x) - mean.reshape(bshape)
    delta = xc.mean(axes, keepdim=True)
    inv_std = torch.rsqrt(var.reshape(bshape) + eps)
    dbeta = g.sum(axes, keepdim=True)  # sum g
    # sum g * x_hat = inv_std * (sum g * xc - delta * sum g)
    dgamma = (torch.mul(xc, g).sum(axes, keepdim=True) - delta * dbeta) * inv_std
    s = inv_std if weight is None else inv_std * weight.reshape(bshape)
    # dx = s/m * (m g - dbeta - x_hat dgamma),  x_hat = (xc - delta) inv_std
    b = -s * inv_std * dgamma / m
    c = -s * dbeta / m - b * delta
    if _plain(xc, b, c, g, s):
        dx = xc.mul_(b).add_(c).addcmul_(g, s)  # in the temporary xc's memory
    else:  # differentiable, and no in-place op for vmap to fall back on
        dx = xc * b + c + g * s
    param_dtype = dy.dtype if weight is None else weight.dtype
    dweight = None if weight is None else dgamma.reshape(-1).to(param_dtype)
    return dx.to(dy.dtype), dweight, dbeta.reshape(-1).to(param_dtype)


def _eval_forward(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """Normalisation with given statistics: ``y = (x - mean) * gamma / sqrt(var + eps) + beta``.

    An affine map per channel, differentiable in every argument; the result has
    ``x``'s dtype (computed in float32 for float16/bfloat16).
    """
    if not _eager_required(x, running_mean, running_var, weight, bias) and kernels.supports(x):
        return kernels.eval_forward(x, running_mean, running_var, weight, bias, eps)
    _, bshape, _ = _layout(x)
    xf = _compute(x)
    mean = running_mean.reshape(bshape).to(xf.dtype)
    scale = 1.0 / torch.sqrt(running_var.reshape(bshape).to(xf.dtype) + eps)
    if weight is not None:
        scale = scale * weight.reshape(bshape).to(xf.dtype)
    y = (xf - mean) * scale
    if bias is not None:
        y = y + bias.reshape(bshape).to(xf.dtype)
    return y.to(x.dtype)


def _plain(*tensors: Tensor | None) -> bool:
    """True when no tensor is recorded by autograd or wrapped by a torch.func
    transform (vmap, grad, jvp levels; ``is_grads_batched`` hands the backward a
    legacy batched ``dy`` while no transform is active): then in-place updates and opaque
    kernels are safe. False while torch.compile traces (it fuses out-of-place code
    anyway)."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    grad_on = torch.is_grad_enabled()
    functorch = torch._C._functorch
    for t in tensors:
        if t is None:
            continue
        if grad_on and t.requires_grad:
            return False
        if functorch.is_functorch_wrapped_tensor(t) or functorch.is_legacy_batchedtensor(t):
            return False
    return True


def _eager_required(*tensors: Tensor | None) -> bool:
    """True where only the eager seam code may run: while torch.compile or
    torch.export traces, while autograd records (a graph of the computation is
    wanted), or when a tensor is a torch.func wrapper.

    A fused kernel (see SEAM.md) is an opaque, non-differentiable function of
    plain tensors; a seam function may call one only where this is False.
    """
    return not _plain(*tensors)


def _is_batched(t: Tensor) -> bool:
    """Whether ``t`` is batched by some enclosing ``torch.func.vmap``."""
    if torch.compiler.is_compiling():
        return False
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False


# ---------------------------------------------------------------------------
# the autograd Function
# ---------------------------------------------------------------------------

_compiled_kernels: tuple[Any, Any] | None = None  # (forward, backward) in use, or None
_compiled_cache: tuple[Any, Any] | None = None


def _forward_impl() -> Any:
    if _compiled_kernels is not None and not torch.compiler.is_compiling():
        return _compiled_kernels[0]
    return _train_forward


def _backward_impl() -> Any:
    if _compiled_kernels is not None and not torch.compiler.is_compiling():
        return _compiled_kernels[1]
    return _train_backward


def _batch_first(t: Tensor, bdim: int | None, size: int) -> Tensor:
    """``t`` with its vmapped dimension first (broadcast to ``size`` if it has none)."""
    if bdim is None:
        return t.expand(size, *t.shape)
    return t.movedim(bdim, 0)


class _TrainingFunction(torch.autograd.Function):
    """:class:`BatchNormFunction` without its ``jvp`` rule, for torch.compile and
    torch.export: dynamo cannot trace an ``autograd.Function`` with a custom ``jvp``
    (a graph break), and traces this one whole."""

    @staticmethod
    def forward(
        x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        y, mean, var = _forward_impl()(x, weight, bias, eps)
        return y, mean, var

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
        x, weight, bias, eps = inputs
        _, mean, var = output
        ctx.mark_non_differentiable(mean, var)
        ctx.save_for_backward(x, weight, mean, var)
        ctx.save_for_forward(x, weight, mean, var)
        ctx.eps = eps
        ctx.bias_dtype = None if bias is None else bias.dtype

    @staticmethod
    def backward(ctx: Any, dy: Tensor, _dmean: Any, _dvar: Any) -> tuple[Any, ...]:
        x, weight, mean, var = ctx.saved_tensors
        backward = _backward_impl()
        if torch.is_grad_enabled():
            # a graph of the gradient is wanted (double backward): recompute the
            # statistics from x, recorded by autograd, and use the eager seam code
            _, mean, var = _train_forward(x, weight, None, ctx.eps)
            backward = _train_backward
        dx, dweight, dbias = backward(dy, x, weight, mean, var, ctx.eps)
        if ctx.bias_dtype is None:
            dbias = None
        elif dbias is not None:
            dbias = dbias.to(ctx.bias_dtype)
        return dx, dweight, dbias, None

    @staticmethod
    def vmap(
        info: Any,
        in_dims: tuple[int | None, ...],
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
    ) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[int, int | None, int | None]]:
        size = info.batch_size
        xb = _batch_first(x, in_dims[0], size)  # (B, N, C, *S); copies if x is unbatched
        n, c, spatial = xb.shape[1], xb.shape[2], xb.shape[3:]
        folded = xb.movedim(0, 1).reshape(n, size * c, *spatial)  # (N, B*C, *S)
        vectors = [
            None if v is None else _batch_first(v, d, size).reshape(size * c)
            for v, d in ((weight, in_dims[1]), (bias, in_dims[2]))
        ]
        y, mean, var = _apply(BatchNormFunction, folded, vectors[0], vectors[1], eps)
        y = y.reshape(n, size, c, *spatial)
        if in_dims[0] is None:  # the statistics of an unbatched x are unbatched too
            return (y, mean[:c], var[:c]), (1, None, None)
        return (y, mean.reshape(size, c), var.reshape(size, c)), (1, 0, 0)


class BatchNormFunction(_TrainingFunction):
    """Training-mode BN as an autograd node whose backward is bnlib's closed form.

    ``BatchNormFunction.apply(x, weight, bias, eps)`` returns ``(y, mean, var)``:
    the output and the per-channel batch mean and biased variance (the last two
    are not differentiable; the module uses them for its running statistics).
    Forward and backward are :func:`_train_forward` and :func:`_train_backward`.

    Saved for backward: the input ``x`` (the one input-sized tensor, as in
    torch's native kernel) and the per-channel ``weight``, ``mean`` and ``var``.

    Function transforms. The class has the pieces ``torch.func`` needs:

    - ``setup_context`` (separate from ``forward``), so ``torch.func.grad``,
      ``vjp`` and ``jacrev`` work;
    - a ``vmap`` rule that folds the vmapped dimension into the channels
      (``B`` problems of ``C`` channels are one problem of ``B*C`` channels),
      so ``torch.func.vmap`` runs one batched BN, not a loop;
    - a ``jvp`` rule for forward-mode AD (``torch.func.jvp``, ``jacfwd``,
      ``torch.autograd.forward_ad``). BN's Jacobian in ``x`` is symmetric, so
      the ``x`` part of the tangent is :func:`_train_backward` applied to the
      tangent, and the ``weight`` part is :func:`_train_forward` with the
      weight's tangent as the scale;
    - a backward made of out-of-place or vmap-safe operations, so batched
      gradients (``is_grads_batched=True``, ``jacobian(vectorize=True)``,
      ``gradcheck(check_batched_grad=True)``) work;
    - double backward: when a graph of the backward is requested
      (``create_graph=True``), the statistics are recomputed from ``x`` with
      autograd recording, so the gradients are differentiable themselves.

    Under ``torch.compile`` and ``torch.export`` the module uses the same Function
    without its ``jvp`` rule (:class:`_TrainingFunction`): dynamo cannot trace a
    custom ``jvp`` and would break the graph there.

    Why an ``autograd.Function`` and not a ``torch.library.custom_op``: coverage
    and speed, both measured by ``tools/function_vs_custom_op.py``. A custom op
    has no forward-mode AD rule: ``forward_ad`` gives no tangent, and
    ``torch.func.jvp`` runs but returns a wrong tangent. In eager mode the custom
    op is also slower per call (the dispatcher, and outputs that may not alias).
    The Function's own overhead is a few microseconds of ``inspect`` binding per
    call, which torch adds to every Function with ``setup_context``.
    """

    @staticmethod
    def jvp(
        ctx: Any, x_t: Tensor | None, weight_t: Tensor | None, bias_t: Tensor | None, _eps_t: Any
    ) -> tuple[Tensor | None, None, None]:
        x, weight, mean, var = ctx.saved_tensors
        terms: list[Tensor] = []
        if x_t is not None:  # J_x is symmetric: J_x x_t = J_x^T x_t
            terms.append(_train_backward(x_t, x, weight, mean, var, ctx.eps)[0])
        if weight_t is not None:  # d/dgamma: x_hat * gamma_t (plus beta_t, if any)
            terms.append(_train_forward(x, weight_t, bias_t, ctx.eps)[0])
        elif bias_t is not None:
            bshape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
            terms.append(bias_t.reshape(bshape).to(x.dtype).expand(x.shape))
        y_t = None
        for t in terms:
            y_t = t if y_t is None else y_t + t
        return y_t, None, None


class _EagerBatchNormFunction(BatchNormFunction):
    """:class:`BatchNormFunction` in the old style (``forward(ctx, ...)``, no
    ``setup_context``), for plain eager calls only: ``Function.apply`` then skips the
    default-argument binding it does for every call of a Function with ``setup_context``
    (measured on an (8, 4) input: 33 to 17 microseconds per ``apply``).
    Same forward, backward and ``jvp``; the module uses it only where no ``torch.func``
    transform is active and nothing is being compiled (those need ``setup_context``)."""

    setup_context = torch.autograd.function._SingleLevelFunction.setup_context

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        y, mean, var = _forward_impl()(x, weight, bias, eps)
        ctx.mark_non_differentiable(mean, var)
        ctx.save_for_backward(x, weight, mean, var)
        ctx.save_for_forward(x, weight, mean, var)
        ctx.eps = eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y, mean, var


# Function.apply binds default arguments with inspect.signature on every call when
# setup_context is defined (tens of microseconds per call); a precomputed signature,
# which inspect.signature returns as it is, makes that cheap.
_TrainingFunction.forward.__dict__["__signature__"] = inspect.signature(_TrainingFunction.forward)


def _apply(
    function: type[_TrainingFunction],
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``function.apply(x, weight, bias, eps)``, typed."""
    apply: Any = function.apply
    y, mean, var = apply(x, weight, bias, eps)
    return y, mean, var


def use_compiled(enabled: bool = True) -> None:
    """Run :class:`BatchNormFunction`'s forward and backward through ``torch.compile``.

    The compiled functions compute the same formulas (:func:`_train_forward`,
    :func:`_train_backward`), fused into a few loops, at the cost of a
    compilation (tens of seconds on the first call of each input shape, and a C++
    compiler on the CPU). Off by default. Ignored inside a model compiled with
    ``torch.compile`` (which compiles the eager code itself) and for double backward.

    Parameters
    ----------
    enabled : bool, default True
        Switch the compiled functions on (True) or back to eager (False).
    """
    global _compiled_kernels, _compiled_cache
    if enabled and _compiled_cache is None:
        _compiled_cache = (torch.compile(_train_forward), torch.compile(_train_backward))
    _compiled_kernels = _compiled_cache if enabled else None


# ---------------------------------------------------------------------------
# the modules
# ---------------------------------------------------------------------------

_SCRIPT_MESSAGE = (
    "bnlib's {name} cannot be compiled by torch.jit.script: its training mode is a Python "
    "torch.autograd.Function, which TorchScript does not support, and TorchScript is in "
    "maintenance mode upstream. Use torch.compile(model) to optimise, or "
    "torch.export.export(model, args) to obtain a graph for deployment; both support bnlib."
)


class _BatchNorm(_TorchBatchNorm):
    """Common base of :class:`BatchNorm1d`, :class:`BatchNorm2d`, :class:`BatchNorm3d`.

    A subclass of ``torch.nn.modules.batchnorm._BatchNorm`` that replaces
    ``forward``; everything else (constructor, buffers, state dict, repr) is torch's.
    """

    _input_dims: tuple[int, ...] = ()
    _dims_text: str = ""

    def _check_input(self, x: Tensor, batch_stats: bool) -> None:
        """Every check that can fail, before any state is touched."""
        if x.dim() not in self._input_dims:
            raise ValueError(f"expected {self._dims_text} input (got {x.dim()}D input)")
        _check_features(x, self.num_features)
        if batch_stats:
            values_per_channel = x.shape[0] * math.prod(x.shape[2:])
            if values_per_channel == 1:
                raise ValueError(
                    "Expected more than 1 value per channel when training, "
                    f"got input size {x.shape}"
                )
        _check_eps(self.eps, batch_stats)
        if batch_stats and self.training and self.track_running_stats:
            _check_momentum(self.momentum)  # before num_batches_tracked is counted

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, torch.fx.Proxy):
            # torch.fx keeps torch.nn's own modules as leaves (by module path); record
            # bnlib's as one call_module node too, instead of tracing into forward
            tracer = input.tracer
            path = tracer.path_of_module(self)
            if not path:  # the root itself: torch's BatchNorm cannot be traced alone either
                raise torch.fx.proxy.TraceError(
                    f"torch.fx cannot trace a lone {type(self).__name__} (nor torch's): "
                    "trace a model that contains it, e.g. torch.nn.Sequential(bn)"
                )
            node: Tensor = tracer.create_proxy("call_module", path, (input,), {})
            return node
        running_mean, running_var = self.running_mean, self.running_var
        # batch statistics in training, and in eval when there are no running statistics
        use_batch_stats = self.training or running_mean is None or running_var is None
        self._check_input(input, use_batch_stats)

        if not use_batch_stats:
            assert running_mean is not None and running_var is not None
            return _eval_forward(input, running_mean, running_var, self.weight, self.bias, self.eps)
        update_stats = self.training and self.track_running_stats
        if input.numel() == 0:  # empty batch, as torch: empty output, statistics unchanged
            if update_stats:
                self._count_batch()
            C = self.num_features
            zeros, ones = input.new_zeros(C), input.new_ones(C)
            return _eval_forward(input, zeros, ones, self.weight, self.bias, self.eps)

        if torch.compiler.is_compiling():
            function: type[_TrainingFunction] = _TrainingFunction
        elif torch._C._are_functorch_transforms_active():
            function = BatchNormFunction
        else:
            function = _EagerBatchNormFunction
        y, mean, var = _apply(function, input, self.weight, self.bias, self.eps)
        if update_stats:
            self._update_running_stats(mean, var, input.numel() // input.shape[1])
        return y

    def _count_batch(self) -> Tensor:
        count = self.num_batches_tracked
        assert count is not None
        return count.add_(1)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, m: int) -> None:
        running_mean, running_var = self.running_mean, self.running_var
        assert running_mean is not None and running_var is not None
        if _is_batched(mean) and not (_is_batched(running_mean) and _is_batched(running_var)):
            raise RuntimeError(
                f"{type(self).__name__} under torch.func.vmap: the batch statistics are "
                "batched but running_mean/running_var, which training updates in place, "
                "are not. Use track_running_stats=False, "
                "torch.func.replace_all_batch_norm_modules_(model), eval mode, or pass "
                "batched buffers (torch.func.functional_call)."
            )
        count = self._count_batch()
        factor = 1.0 / float(count) if self.momentum is None else self.momentum
        unbiased_var = var * (m / (m - 1))
        running_mean.lerp_(mean.to(running_mean.dtype), factor)
        running_var.lerp_(unbiased_var.to(running_var.dtype), factor)

    def __prepare_scriptable__(self) -> Module:
        """Called by ``torch.jit.script``: refuse, naming the alternatives."""
        raise RuntimeError(_SCRIPT_MESSAGE.format(name=type(self).__name__))


_PARAMETERS_DOC = """
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
"""


class BatchNorm1d(_BatchNorm, torch.nn.BatchNorm1d):
    __doc__ = (
        """Batch normalisation over a 2D ``(N, C)`` or 3D ``(N, C, L)`` input.

    A subclass of :class:`torch.nn.BatchNorm1d` computed by bnlib (a drop-in
    replacement: same constructor, state dict and repr).
"""
        + _PARAMETERS_DOC
        + """
    Shape
    -----
    Input ``(N, C)`` or ``(N, C, L)``; output the same.
    """
    )

    _input_dims = (2, 3)
    _dims_text = "2D or 3D"


class BatchNorm2d(_BatchNorm, torch.nn.BatchNorm2d):
    __doc__ = (
        """Batch normalisation over a 4D ``(N, C, H, W)`` input, one (γ, β) per channel.

    A subclass of :class:`torch.nn.BatchNorm2d` computed by bnlib (a drop-in
    replacement). Statistics are taken over ``N``, ``H`` and ``W``: ``m = N·H·W``
    values per channel.
"""
        + _PARAMETERS_DOC
        + """
    Shape
    -----
    Input ``(N, C, H, W)``; output the same.
    """
    )

    _input_dims = (4,)
    _dims_text = "4D"


class BatchNorm3d(_BatchNorm, torch.nn.BatchNorm3d):
    __doc__ = (
        """Batch normalisation over a 5D ``(N, C, D, H, W)`` input.

    A subclass of :class:`torch.nn.BatchNorm3d` computed by bnlib (a drop-in
    replacement).
"""
        + _PARAMETERS_DOC
        + """
    Shape
    -----
    Input ``(N, C, D, H, W)``; output the same.
    """
    )

    _input_dims = (5,)
    _dims_text = "5D"


_REPLACEMENTS: dict[type[Module], type[_BatchNorm]] = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}


def _register_fusers() -> None:
    """Let ``torch.ao.quantization.fuse_modules`` fold bnlib BN into a preceding
    Conv/ConvTranspose/Linear, as it does torch's. Its fuser table is keyed by
    exact module types, so bnlib's classes are added beside torch's (the same
    fuser functions: they only read the BN's parameters and running statistics)."""
    from torch.ao.quantization import fuser_method_mappings as fmm

    table = fmm._DEFAULT_OP_LIST_TO_FUSER_METHOD
    folding = {fmm.fuse_conv_bn, fmm.fuse_conv_bn_relu, fmm.fuse_linear_bn}
    folding.add(fmm.fuse_convtranspose_bn)
    for ops, fuser in list(table.items()):
        if fuser in folding:
            ours = tuple(_REPLACEMENTS.get(op, op) for op in ops)
            table.setdefault(ours, fuser)


_register_fusers()


def convert(module: Module) -> Module:
    """Make every ``torch.nn.BatchNorm1d/2d/3d`` in ``module`` a bnlib BatchNorm, in place.

    Each such module's class is changed to bnlib's subclass (as torch's lazy
    modules change class when they materialise). Nothing else changes: the
    module objects, their Parameter and buffer objects (an optimizer built
    before ``convert`` keeps updating them), hooks, attributes, training flags,
    devices and dtypes all stay. A module shared by several parents, or
    registered under several names, is the same object afterwards, converted
    once.

    What is left as it is:

    - bnlib's own modules;
    - subclasses of torch's BatchNorm classes (user subclasses may override
      ``forward`` or add state) and ``torch.nn.SyncBatchNorm`` (bnlib has no
      cross-process statistics): left as torch's, with a ``UserWarning``
      naming each;
    - other normalisation layers (``InstanceNorm``, ``LayerNorm``, ...).

    An uninitialised ``torch.nn.LazyBatchNorm1d/2d/3d`` raises a ``ValueError``
    before anything is changed: run one forward pass first (the lazy module then
    becomes a plain ``torch.nn.BatchNorm*d``, which ``convert`` handles).

    Parameters
    ----------
    module : torch.nn.Module

    Returns
    -------
    torch.nn.Module
        ``module`` itself (now a bnlib BatchNorm if it was a torch one).
    """
    targets: list[Module] = []
    skipped: list[str] = []
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.modules.lazy.LazyModuleMixin) and isinstance(
            m, torch.nn.modules.batchnorm._NormBase
        ):
            if m.has_uninitialized_params():
                raise ValueError(
                    f"convert: {name or 'the module'} is an uninitialised "
                    f"{type(m).__name__}; call the model once on an example input so "
                    "that it materialises, then convert"
                )
        if type(m) in _REPLACEMENTS:
            targets.append(m)
        elif isinstance(m, _TorchBatchNorm) and not isinstance(m, _BatchNorm):
            skipped.append(f"{name or '(root)'} ({type(m).__module__}.{type(m).__qualname__})")
    if skipped:
        warnings.warn(
            "convert left these BatchNorm modules as they are (subclasses of torch's "
            "BatchNorm and SyncBatchNorm are not converted): " + ", ".join(skipped),
            UserWarning,
            stacklevel=2,
        )
    for m in targets:
        m.__class__ = _REPLACEMENTS[type(m)]
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

from . import functional as F  # noqa: E402  (this section's arithmetic)


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


def _check_features(x: Tensor, num_features: int) -> None:
    """A floating-point input with ``num_features`` channels (axis 1), or torch's errors."""
    if not x.is_floating_point():
        raise NotImplementedError(
            f"batch_norm is not implemented for {x.dtype} input (floating point only)"
        )
    if x.dim() < 2 or x.shape[1] == 0:  # torch fails here with an IndexError deep inside
        raise ValueError(
            f"expected an input with at least one channel (dimension 1), got input of size "
            f"{list(x.shape)}"
        )
    if x.shape[1] != num_features:
        raise RuntimeError(
            f"expected input with {num_features} channels (num_features), "
            f"got {x.shape[1]} channels (input shape {list(x.shape)})"
        )


def _check_eps(eps: float, batch_stats: bool) -> None:
    """eps > 0 when batch statistics are used (training), eps >= 0 with running ones."""
    if batch_stats and not eps > 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if not batch_stats and not eps >= 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


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
