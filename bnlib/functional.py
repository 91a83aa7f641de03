"""The mathematics of Batch Normalization and its family, for any array-API array.

Every function here takes NumPy arrays or torch tensors (CPU or CUDA) and
returns the same kind of array, on the same device, in the same dtype. One code
path serves them all through ``array_api_compat``.

Notation (the book's): for one channel, the mini-batch holds ``m`` values
:math:`x_1, \\dots, x_m` (every axis but the channel axis is reduced), and

.. math::

    \\mu = \\frac{1}{m}\\sum_i x_i, \\qquad
    \\sigma^2 = \\frac{1}{m}\\sum_i (x_i - \\mu)^2,

    \\hat x_i = \\frac{x_i - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}}, \\qquad
    y_i = \\gamma \\hat x_i + \\beta .

The backward pass, derived step by step in the chapter *Backpropagation
through BN*, is

.. math::

    \\frac{\\partial L}{\\partial \\beta} = \\sum_i g_i, \\qquad
    \\frac{\\partial L}{\\partial \\gamma} = \\sum_i g_i \\hat x_i,

    \\frac{\\partial L}{\\partial x_i} = \\frac{\\gamma}{m\\sqrt{\\sigma^2+\\epsilon}}
        \\Big(m g_i - \\sum_j g_j - \\hat x_i \\sum_j g_j \\hat x_j\\Big),

with :math:`g_i = \\partial L / \\partial y_i`. :func:`batch_norm_backward`
implements exactly this line; :func:`batch_norm_backward_naive` walks the
computational graph node by node instead.

**The family.** Batch, layer, instance and group normalisation differ only in
*which* values share a mean and a variance (the reduced ``axes``) and in the
shape of the affine parameters (the ``param_axes`` they index).
:func:`normalize_forward` and :func:`normalize_backward` take both as
arguments; the backward is the line above applied to
:math:`\\partial L/\\partial \\hat x = \\gamma g`, with ``m`` the number of
values reduced together:

.. math::

    \\frac{\\partial L}{\\partial x} = \\frac{1}{m\\sqrt{\\sigma^2+\\epsilon}}
        \\Big(m\\,\\gamma g - \\textstyle\\sum \\gamma g
        - \\hat x \\sum \\gamma g \\hat x\\Big),

sums over the reduced axes. :func:`batch_norm_forward` is the special case
"reduce every axis but the channel axis, one parameter per channel".

**Input checks.** Arrays must have a real floating-point dtype; per-channel
vectors must be arrays of ``x``'s library (NumPy with NumPy, torch with torch,
on ``x``'s device) or Python lists/tuples of numbers, which are converted; a
gradient must have exactly the input's shape. Each violation raises an error
that says what to change.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from array_api_compat import array_namespace
from array_api_compat import device as array_device

__all__ = [
    "BNCache",
    "NormCache",
    "batch_norm_forward",
    "batch_norm_backward",
    "batch_norm_backward_naive",
    "batch_norm_inference",
    "normalize_forward",
    "normalize_backward",
    "running_average",
]

Array = Any  # any array-API array: numpy.ndarray, torch.Tensor, ...
Namespace = Any  # the array-API namespace of an array (array_api_compat.numpy, ...torch)


class BNCache(NamedTuple):
    """What the training-mode forward pass keeps for the backward pass.

    Per-channel fields have the *broadcast shape*: the input's shape with every
    reduced axis set to 1 (e.g. ``(1, C, 1, 1)`` for an ``(N, C, H, W)`` input),
    so they combine with input-sized arrays without reshaping.

    Attributes
    ----------
    x_hat : array, shape like the input
        The normalised input :math:`\\hat x = (x - \\mu)/\\sqrt{\\sigma^2+\\epsilon}`,
        in the compute dtype (float32 for float16/bfloat16 inputs).
    mean : array, broadcast shape
        Per-channel batch mean :math:`\\mu`.
    var : array, broadcast shape
        Per-channel *biased* batch variance :math:`\\sigma^2` (divided by ``m``).
    inv_std : array, broadcast shape
        :math:`1/\\sqrt{\\sigma^2+\\epsilon}`.
    gamma : array or None, broadcast shape
        The scale used in the forward pass (``None`` means 1: no affine scale).
    eps : float
        The :math:`\\epsilon` of the forward pass.
    axes : tuple of int
        The reduced axes (every axis except the channel axis).
    m : int
        Number of values per channel, ``numel // C``.
    """

    x_hat: Array
    mean: Array
    var: Array
    inv_std: Array
    gamma: Array | None
    eps: float
    axes: tuple[int, ...]
    m: int


class NormCache(NamedTuple):
    """What :func:`normalize_forward` keeps for :func:`normalize_backward`.

    The fields of :class:`BNCache`, generalised, plus ``param_axes``. ``mean``,
    ``var`` and ``inv_std`` have the input's shape with the reduced ``axes``
    set to 1; ``gamma`` has the input's shape with every axis *not* in
    ``param_axes`` set to 1.

    Attributes
    ----------
    x_hat : array, shape like the input
        :math:`\\hat x`, in the compute dtype.
    mean, var, inv_std : array
        Statistics of each group of values reduced together (biased variance).
    gamma : array or None
        The scale of the forward pass, in broadcast shape (``None``: no scale).
    eps : float
    axes : tuple of int
        The reduced axes, non-negative and sorted.
    m : int
        Number of values in each reduced group (product of the ``axes`` sizes).
    param_axes : tuple of int
        The axes the affine parameters index, non-negative and sorted.
    """

    x_hat: Array
    mean: Array
    var: Array
    inv_std: Array
    gamma: Array | None
    eps: float
    axes: tuple[int, ...]
    m: int
    param_axes: tuple[int, ...]


# ---------------------------------------------------------------------------
# helpers: input checks
# ---------------------------------------------------------------------------


def _library(a: object) -> str:
    """'numpy', 'torch', ...: the top-level package of an array's type."""
    return type(a).__module__.split(".", 1)[0]


def _namespace(x: object, name: str = "x") -> Namespace:
    """The array namespace of ``x``, which must be a real floating-point array."""
    try:
        xp = array_namespace(x)
    except TypeError:
        raise TypeError(
            f"{name} must be a NumPy array or a torch tensor, got {type(x).__name__}"
        ) from None
    if not xp.isdtype(x.dtype, "real floating"):  # type: ignore[attr-defined]
        raise TypeError(
            f"{name} has dtype {x.dtype} (not a real floating-point dtype): normalisation "  # type: ignore[attr-defined]
            "needs float16, bfloat16, float32 or float64; convert it first, "
            "e.g. x.astype(np.float64) or x.double()"
        )
    return xp


def _check_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def _check_real(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def _channel_axis(ndim: int, channel_axis: int) -> int:
    channel_axis = _check_int(channel_axis, "channel_axis")
    if ndim < 2:
        raise ValueError(f"expected at least 2D input (got {ndim}D input)")
    if not -ndim <= channel_axis < ndim:
        raise ValueError(f"channel_axis {channel_axis} is out of range for {ndim}D input")
    return channel_axis % ndim


def _axes(ndim: int, axes: Sequence[int], name: str) -> tuple[int, ...]:
    """Normalise a tuple of axes: ints, in range, no repeats; returned sorted, non-negative."""
    if isinstance(axes, (str, bytes)) or not isinstance(axes, Sequence):
        raise TypeError(f"{name} must be a tuple of ints, got {type(axes).__name__} {axes!r}")
    out = []
    for a in axes:
        a = _check_int(a, f"each entry of {name}")
        if not -ndim <= a < ndim:
            raise ValueError(f"{name} entry {a} is out of range for {ndim}D input")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{name} {tuple(axes)} names an axis twice")
    return tuple(sorted(out))


def _broadcast_shape(shape: tuple[int, ...], keep: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` with every axis not in ``keep`` set to 1."""
    return tuple(n if i in keep else 1 for i, n in enumerate(shape))


def _param(
    xp: Namespace, x: Array, v: object, name: str, shape: tuple[int, ...], dtype: Any
) -> Array:
    """Check a parameter or statistic vector and reshape it to broadcast against ``x``.

    ``None`` passes through as ``None``.

    ``shape`` is the broadcast shape; the vector must hold ``prod(shape)``
    values. Arrays of ``x``'s library on ``x``'s device and Python lists or
    tuples of numbers are accepted.
    """
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        v = xp.asarray(v, dtype=dtype, device=array_device(x))
    else:
        try:
            vxp = array_namespace(v)
        except TypeError:
            raise TypeError(
                f"{name} must be an array of x's library ({_library(x)}), a list of numbers "
                f"or None, got {type(v).__name__}"
            ) from None
        if vxp is not xp:
            raise TypeError(
                f"{name} is a {_library(v)} array but x is a {_library(x)} array: pass "
                f"{name} as a {_library(x)} array too (torch.as_tensor(v, device=x.device), "
                "or np.asarray(v))"
            )
        if not xp.isdtype(v.dtype, "real floating"):  # type: ignore[attr-defined]
            raise TypeError(
                f"{name} has dtype {v.dtype} (not a real floating-point dtype): "  # type: ignore[attr-defined]
                "convert it to x's dtype"
            )
        if array_device(v) != array_device(x):
            raise RuntimeError(
                f"{name} is on device {array_device(v)} but x is on {array_device(x)}: "
                "move it to x's device"
            )
    n = math.prod(shape)
    if math.prod(v.shape) != n:  # type: ignore[attr-defined]
        raise RuntimeError(
            f"{name} should contain {n} elements (one per channel), got shape {tuple(v.shape)}"  # type: ignore[attr-defined]
        )
    return xp.reshape(xp.astype(v, dtype), shape)


def _check_eps(eps: float, training: bool = True) -> float:
    eps = _check_real(eps, "eps")
    if training and not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if not training and not eps >= 0:
        raise ValueError(f"eps must be non-negative, got {eps}")
    return eps


def _check_gradient(dy: object, x_hat: Array) -> Namespace:
    """``dy`` must be a floating array of the forward input's library and exact shape."""
    xp = _namespace(dy, "dy")
    if array_namespace(x_hat) is not xp:
        raise TypeError(
            f"dy is a {_library(dy)} array but the forward input was a {_library(x_hat)} "
            "array: pass dy in the same library"
        )
    if tuple(dy.shape) != tuple(x_hat.shape):  # type: ignore[attr-defined]
        raise ValueError(
            f"dy has shape {tuple(dy.shape)} but the forward input had shape "  # type: ignore[attr-defined]
            f"{tuple(x_hat.shape)}: pass one gradient value per input value "
            "(broadcasting is not applied)"
        )
    return xp


# ---------------------------------------------------------------------------
# helpers: arithmetic
# ---------------------------------------------------------------------------


def _is_low_precision(x: Array) -> bool:
    return str(x.dtype).rsplit(".", 1)[-1] in ("float16", "bfloat16")


def _compute_dtype(xp: Namespace, x: Array) -> Any:
    """float16/bfloat16 accumulate in float32, as torch does; others keep their dtype."""
    return xp.float32 if _is_low_precision(x) else x.dtype


def _var_mean(xp: Namespace, x: Array, axes: tuple[int, ...]) -> tuple[Array, Array]:
    """Biased variance and mean over ``axes``, keeping dims; numerically stable.

    Never E[x^2] - E[x]^2: torch's fused ``var_mean`` uses Welford's update and
    NumPy's ``var`` subtracts the mean first (two passes).
    """
    if _library(x) == "torch":  # one fused pass over memory
        import torch

        var, mean = torch.var_mean(x, dim=axes, correction=0, keepdim=True)
        return var, mean
    mean = xp.mean(x, axis=axes, keepdims=True)
    centred = x - mean
    var = xp.mean(centred * centred, axis=axes, keepdims=True)
    return var, mean


# ---------------------------------------------------------------------------
# the general routine: normalise over given axes, affine over given axes
# ---------------------------------------------------------------------------


def normalize_forward(
    x: Array,
    gamma: Array | None,
    beta: Array | None,
    axes: Sequence[int],
    eps: float = 1e-5,
    param_axes: Sequence[int] | None = None,
) -> tuple[Array, NormCache]:
    """Normalise ``x`` over ``axes``, then apply an affine map indexed by ``param_axes``.

    Every group of values that share all their indices outside ``axes`` is
    normalised with its own mean and biased variance; then
    :math:`y = \\gamma \\hat x + \\beta`, where ``gamma`` and ``beta`` hold one
    value per position along ``param_axes``. The members of the family:

    ==================  ==========================  ==============================
    method              ``axes`` (for N, C, H, W)   ``param_axes``
    ==================  ==========================  ==============================
    batch norm          ``(0, 2, 3)``               ``(1,)``
    layer norm          ``(1, 2, 3)``               ``(1, 2, 3)`` (per element)
    instance norm       ``(2, 3)``                  ``(1,)``
    group norm          on x reshaped to            ``(1, 2)``: ``gamma`` of
                        ``(N, G, C/G, H·W)``:       shape ``(C,)`` is read as
                        ``(2, 3)``                  ``(G, C/G)``
    ==================  ==========================  ==============================

    Parameters
    ----------
    x : array
        Input, real floating point.
    gamma, beta : array, list or None
        Scale and shift with ``prod(x.shape[a] for a in param_axes)`` values
        (any shape with that many elements, read in row-major order); ``None``
        means no scale (1) or no shift (0).
    axes : sequence of int
        The axes reduced together; ``m`` is the product of their sizes.
    eps : float, default 1e-5
        Added to the variance; must be positive.
    param_axes : sequence of int, optional
        The axes the affine parameters index; default: every axis not in
        ``axes`` (batch normalisation's choice).

    Returns
    -------
    y : array, same shape, dtype and device as ``x``
    cache : NormCache
        What :func:`normalize_backward` needs.

    Raises
    ------
    TypeError
        ``x``, ``gamma`` or ``beta`` is not a real floating-point array of one
        library; ``axes`` or ``eps`` has the wrong type.
    ValueError
        ``x`` is empty, an axis is out of range or repeated, or ``eps <= 0``.
    RuntimeError
        ``gamma`` or ``beta`` has the wrong number of elements, or is on another
        device.
    """
    xp = _namespace(x)
    shape = tuple(x.shape)
    axes = _axes(x.ndim, axes, "axes")
    if param_axes is None:
        param_axes = tuple(i for i in range(x.ndim) if i not in axes)
    param_axes = _axes(x.ndim, param_axes, "param_axes")
    pshape = _broadcast_shape(shape, param_axes)
    cdtype = _compute_dtype(xp, x)
    g = _param(xp, x, gamma, "weight (gamma)", pshape, cdtype)
    b = _param(xp, x, beta, "bias (beta)", pshape, cdtype)
    eps = _check_eps(eps)
    if math.prod(shape) == 0:
        raise ValueError(
            f"cannot normalise an empty array (shape {list(shape)}): there are no values "
            "to take statistics of; pass a non-empty batch"
        )
    m = math.prod(shape[a] for a in axes)

    xc = xp.astype(x, cdtype, copy=False)
    var, mean = _var_mean(xp, xc, axes)
    inv_std = 1.0 / xp.sqrt(var + eps)
    x_hat = (xc - mean) * inv_std
    y = x_hat
    if g is not None:
        y = y * g
    if b is not None:
        y = y + b
    y = xp.astype(y, x.dtype, copy=False)
    return y, NormCache(x_hat, mean, var, inv_std, g, eps, axes, m, param_axes)


def normalize_backward(dy: Array, cache: NormCache) -> tuple[Array, Array, Array]:
    """Gradients of :func:`normalize_forward`, in the compact closed form.

    With :math:`g = \\partial L/\\partial y` and sums over the reduced axes,

    .. math::

        \\frac{\\partial L}{\\partial x} = \\frac{1}{m\\sqrt{\\sigma^2+\\epsilon}}
        \\Big(m\\, \\gamma g - \\textstyle\\sum \\gamma g
        - \\hat x \\sum \\gamma g \\hat x\\Big):

    batch normalisation's formula, applied to :math:`\\partial L/\\partial \\hat x
    = \\gamma g` (``gamma`` may vary inside a reduced group, as in layer norm).
    The parameter gradients sum over every axis that is not a parameter axis.

    Parameters
    ----------
    dy : array, exactly the input's shape
    cache : NormCache
        From :func:`normalize_forward`.

    Returns
    -------
    dx : array, shape and dtype of ``dy``
    dgamma : array, shape ``tuple(x.shape[a] for a in param_axes)``, compute dtype
        :math:`\\sum g \\hat x` (returned even when the forward had no gamma).
    dbeta : array, same shape
        :math:`\\sum g`.
    """
    xp = _check_gradient(dy, cache.x_hat)
    x_hat, inv_std, gamma, axes, m = cache.x_hat, cache.inv_std, cache.gamma, cache.axes, cache.m
    pshape = tuple(x_hat.shape[a] for a in cache.param_axes)
    shared = tuple(i for i in range(x_hat.ndim) if i not in cache.param_axes)
    g = xp.astype(dy, x_hat.dtype, copy=False)
    dbeta = xp.sum(g, axis=shared, keepdims=True)
    dgamma = xp.sum(g * x_hat, axis=shared, keepdims=True)
    dx_hat = g if gamma is None else gamma * g
    sum_dx_hat = xp.sum(dx_hat, axis=axes, keepdims=True)
    sum_dx_hat_x_hat = xp.sum(dx_hat * x_hat, axis=axes, keepdims=True)
    dx = inv_std / m * (m * dx_hat - sum_dx_hat - x_hat * sum_dx_hat_x_hat)
    return (
        xp.astype(dx, dy.dtype, copy=False),
        xp.reshape(dgamma, pshape),
        xp.reshape(dbeta, pshape),
    )


def running_average(running: Array, batch: Array, momentum: float) -> Array:
    """The exponential moving average BN keeps: ``(1 - momentum)·running + momentum·batch``.

    Parameters
    ----------
    running, batch : array of the same shape and library
    momentum : float in [0, 1]
        Weight of the new value (PyTorch's convention; Keras's ``momentum`` is
        ``1 -`` this).

    Returns
    -------
    array
        A new array; the inputs are not modified.

    Raises
    ------
    TypeError
        ``momentum`` is not a real number.
    ValueError
        ``momentum`` is outside [0, 1] (or NaN).
    """
    momentum = _check_real(momentum, "momentum")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    return running + momentum * (batch - running)


# ---------------------------------------------------------------------------
# batch normalisation: the special case
# ---------------------------------------------------------------------------


def _check_training_batch(shape: tuple[int, ...], axis: int) -> None:
    C = shape[axis]
    if math.prod(shape) == 0:
        raise ValueError(
            f"got an empty batch (input shape {list(shape)}): batch statistics need at least "
            "2 values per channel; skip empty batches, or use batch_norm_inference with "
            "fixed statistics"
        )
    if math.prod(shape) // C == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {list(shape)}"
        )


def batch_norm_forward(
    x: Array,
    gamma: Array | None,
    beta: Array | None,
    eps: float = 1e-5,
    channel_axis: int = 1,
) -> tuple[Array, BNCache]:
    """Training-mode batch normalisation (Algorithm 1 of Ioffe & Szegedy, 2015).

    Statistics are taken over every axis except ``channel_axis``, so ``(N, D)``,
    ``(N, C, L)``, ``(N, C, H, W)`` and ``(N, C, D, H, W)`` inputs all work, with
    ``m = x.size // C`` values per channel. The variance is the biased one.
    This is :func:`normalize_forward` with ``axes`` = every axis but the channel
    axis and ``param_axes = (channel_axis,)``.

    Parameters
    ----------
    x : array, shape (N, C, *spatial) or (N, D)
        Input mini-batch, real floating point.
    gamma : array of shape (C,), list, or None
        Scale :math:`\\gamma`; ``None`` means no scale (1).
    beta : array of shape (C,), list, or None
        Shift :math:`\\beta`; ``None`` means no shift (0).
    eps : float, default 1e-5
        Added to the variance; must be positive.
    channel_axis : int, default 1
        The axis that indexes channels (features). Use ``-1`` for channels-last.

    Returns
    -------
    y : array, same shape, dtype and device as ``x``
        :math:`\\gamma \\hat x + \\beta`.
    cache : BNCache
        What :func:`batch_norm_backward` needs.

    Raises
    ------
    TypeError
        ``x`` is not a real floating-point array; ``gamma``/``beta`` is an array
        of another library or dtype; ``channel_axis`` is not an int; ``eps`` is
        not a number.
    ValueError
        ``x`` has fewer than 2 dimensions, is empty, has only one value per
        channel, or ``eps <= 0``.
    RuntimeError
        ``gamma`` or ``beta`` does not have one entry per channel.
    """
    _namespace(x)
    axis = _channel_axis(x.ndim, channel_axis)
    axes = tuple(i for i in range(x.ndim) if i != axis)
    _check_training_batch(tuple(x.shape), axis)
    y, c = normalize_forward(x, gamma, beta, axes, eps, param_axes=(axis,))
    return y, BNCache(c.x_hat, c.mean, c.var, c.inv_std, c.gamma, c.eps, c.axes, c.m)


def batch_norm_inference(
    x: Array,
    gamma: Array | None,
    beta: Array | None,
    running_mean: Array,
    running_var: Array,
    eps: float = 1e-5,
    channel_axis: int = 1,
) -> Array:
    """Inference-mode batch normalisation with fixed (running) statistics.

    :math:`y = \\gamma (x - \\mu_{run}) / \\sqrt{\\sigma^2_{run} + \\epsilon} + \\beta`,
    an affine map per channel: every example is normalised independently of
    the others in its batch (an empty batch gives an empty output).

    Parameters
    ----------
    x : array, shape (N, C, *spatial) or (N, D)
    gamma, beta : array of shape (C,), list, or None
    running_mean, running_var : array of shape (C,), or list
        Population estimates, e.g. the running averages kept during training.
    eps : float, default 1e-5
        Must be non-negative (0 is allowed here, as in torch's eval mode).
    channel_axis : int, default 1

    Returns
    -------
    y : array, same shape, dtype and device as ``x``

    Raises
    ------
    TypeError
        As :func:`batch_norm_forward`.
    ValueError
        ``x`` has fewer than 2 dimensions, or ``eps < 0``.
    RuntimeError
        A running statistic is ``None`` (as torch: "running_mean must be
        defined in evaluation mode"), or a per-channel vector does not have one
        entry per channel.
    """
    xp = _namespace(x)
    axis = _channel_axis(x.ndim, channel_axis)
    eps = _check_eps(eps, training=False)
    for name, v in (("running_mean", running_mean), ("running_var", running_var)):
        if v is None:
            raise RuntimeError(
                f"{name} is None: batch_norm_inference normalises with fixed statistics, so "
                "pass running_mean and running_var (e.g. a module's buffers), or use "
                "batch_norm_forward to normalise with the batch's own statistics"
            )
    bshape = _broadcast_shape(tuple(x.shape), (axis,))
    cdtype = _compute_dtype(xp, x)
    mean = _param(xp, x, running_mean, "running_mean", bshape, cdtype)
    var = _param(xp, x, running_var, "running_var", bshape, cdtype)
    g = _param(xp, x, gamma, "weight (gamma)", bshape, cdtype)
    b = _param(xp, x, beta, "bias (beta)", bshape, cdtype)
    scale = 1.0 / xp.sqrt(var + eps)
    if g is not None:
        scale = scale * g
    y = (xp.astype(x, cdtype, copy=False) - mean) * scale
    if b is not None:
        y = y + b
    return xp.astype(y, x.dtype, copy=False)


# ---------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------


def _vector(xp: Namespace, v: Array) -> Array:
    return xp.reshape(v, (-1,))


def batch_norm_backward(dy: Array, cache: BNCache) -> tuple[Array, Array, Array]:
    """Gradients of the training-mode transform, in the compact closed form.

    .. math::

        \\frac{\\partial L}{\\partial x} = \\frac{\\gamma}{m\\sqrt{\\sigma^2+\\epsilon}}
        \\Big(m\\, g - \\textstyle\\sum g - \\hat x \\sum g \\hat x\\Big)

    where :math:`g = \\partial L/\\partial y` and sums run over the reduced axes.

    Parameters
    ----------
    dy : array, shape like the input
        Upstream gradient :math:`\\partial L / \\partial y`.
    cache : BNCache
        From :func:`batch_norm_forward`.

    Returns
    -------
    dx : array, shape and dtype of ``dy``
    dgamma : array, shape (C,), compute dtype
        :math:`\\sum g \\hat x` (returned even when the forward had no gamma).
    dbeta : array, shape (C,), compute dtype
        :math:`\\sum g`.
    """
    xp = array_namespace(dy)
    x_hat, inv_std, gamma, axes, m = cache.x_hat, cache.inv_std, cache.gamma, cache.axes, cache.m
    g = xp.astype(dy, x_hat.dtype, copy=False)
    dbeta = xp.sum(g, axis=axes, keepdims=True)
    dgamma = xp.sum(g * x_hat, axis=axes, keepdims=True)
    k = inv_std / m if gamma is None else gamma * inv_std / m
    dx = k * (m * g - dbeta - x_hat * dgamma)
    return xp.astype(dx, dy.dtype, copy=False), _vector(xp, dgamma), _vector(xp, dbeta)


def batch_norm_backward_naive(dy: Array, cache: BNCache) -> tuple[Array, Array, Array]:
    """Gradients by backpropagating through the computational graph, node by node.

    The forward graph, one node per line::

        mu      = mean(x)                 # per channel
        xc      = x - mu
        var     = mean(xc ** 2)
        std     = sqrt(var + eps)
        inv_std = 1 / std
        x_hat   = xc * inv_std
        y       = gamma * x_hat + beta

    This function visits the nodes in reverse order and applies the chain rule
    at each. It gives the same result as :func:`batch_norm_backward` (to
    rounding) but makes more passes over memory; it is kept for teaching and
    for cross-checking.

    Parameters
    ----------
    dy : array, shape like the input
    cache : BNCache
        From :func:`batch_norm_forward`.

    Returns
    -------
    dx : array, shape and dtype of ``dy``
    dgamma, dbeta : array, shape (C,)
    """
    xp = array_namespace(dy)
    x_hat, axes, m = cache.x_hat, cache.axes, cache.m
    # forward intermediates, recovered from the cache
    std = xp.sqrt(cache.var + cache.eps)
    inv_std = cache.inv_std
    xc = x_hat * std
    gamma = cache.gamma if cache.gamma is not None else xp.ones_like(inv_std)

    g = xp.astype(dy, x_hat.dtype, copy=False)
    # y = gamma * x_hat + beta
    dbeta = xp.sum(g, axis=axes, keepdims=True)
    dgamma = xp.sum(g * x_hat, axis=axes, keepdims=True)
    dx_hat = g * gamma
    # x_hat = xc * inv_std              (xc feeds two nodes: here and var)
    dinv_std = xp.sum(dx_hat * xc, axis=axes, keepdims=True)
    dxc = dx_hat * inv_std
    # inv_std = 1 / std
    dstd = -dinv_std / (std * std)
    # std = sqrt(var + eps)
    dvar = dstd / (2.0 * std)
    # var = mean(xc ** 2)
    dxc = dxc + dvar * 2.0 * xc / m
    # xc = x - mu                       (x feeds two nodes: here and mu)
    dmu = -xp.sum(dxc, axis=axes, keepdims=True)
    dx = dxc
    # mu = mean(x)
    dx = dx + dmu / m
    return xp.astype(dx, dy.dtype, copy=False), _vector(xp, dgamma), _vector(xp, dbeta)


# The input checks of the two BN backward functions are applied here, after their
# definitions, so that their bodies stay exactly the formulas the chapter on
# backpropagation prints (``inspect.getsource`` shows the unwrapped function).
_Backward = Callable[[Array, BNCache], tuple[Array, Array, Array]]


def _checks_gradient(backward: _Backward) -> _Backward:
    @functools.wraps(backward)
    def checked(dy: Array, cache: BNCache) -> tuple[Array, Array, Array]:
        _check_gradient(dy, cache.x_hat)
        return backward(dy, cache)

    return checked


batch_norm_backward = _checks_gradient(batch_norm_backward)  # type: ignore[assignment]
batch_norm_backward_naive = _checks_gradient(batch_norm_backward_naive)  # type: ignore[assignment]
