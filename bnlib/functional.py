"""The mathematics of Batch Normalization, for any array-API array.

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
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from array_api_compat import array_namespace

__all__ = [
    "BNCache",
    "batch_norm_forward",
    "batch_norm_backward",
    "batch_norm_backward_naive",
    "batch_norm_inference",
]

Array = Any  # any array-API array: numpy.ndarray, torch.Tensor, ...


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


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def _is_low_precision(x: Array) -> bool:
    return str(x.dtype).rsplit(".", 1)[-1] in ("float16", "bfloat16")


def _compute_dtype(xp, x: Array):
    """float16/bfloat16 accumulate in float32, as torch does; others keep their dtype."""
    return xp.float32 if _is_low_precision(x) else x.dtype


def _channel_axis(ndim: int, channel_axis: int) -> int:
    if ndim < 2:
        raise ValueError(f"expected at least 2D input (got {ndim}D input)")
    if not -ndim <= channel_axis < ndim:
        raise ValueError(f"channel_axis {channel_axis} is out of range for {ndim}D input")
    return channel_axis % ndim


def _broadcast_shape(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    return tuple(n if i == axis else 1 for i, n in enumerate(shape))


def _per_channel(xp, v: Array | None, name: str, C: int, bshape, dtype) -> Array | None:
    """Check a per-channel vector (gamma, beta, running stats) and reshape it to broadcast."""
    if v is None:
        return None
    if math.prod(v.shape) != C:
        raise RuntimeError(
            f"{name} should contain {C} elements (one per channel), got shape {tuple(v.shape)}"
        )
    return xp.reshape(xp.astype(v, dtype), bshape)


def _var_mean(xp, x: Array, axes: tuple[int, ...]) -> tuple[Array, Array]:
    """Biased variance and mean per channel, keeping dims; numerically stable.

    Never E[x^2] - E[x]^2: torch's fused ``var_mean`` uses Welford's update and
    NumPy's ``var`` subtracts the mean first (two passes).
    """
    if type(x).__module__.startswith("torch"):  # one fused pass over memory
        import torch

        return torch.var_mean(x, dim=axes, correction=0, keepdim=True)
    mean = xp.mean(x, axis=axes, keepdims=True)
    centred = x - mean
    var = xp.mean(centred * centred, axis=axes, keepdims=True)
    return var, mean


def _check_training_batch(shape: tuple[int, ...], m: int) -> None:
    if m == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {list(shape)}"
        )


def _check_eps(eps: float) -> None:
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")


# ---------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------

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

    Parameters
    ----------
    x : array, shape (N, C, *spatial) or (N, D)
        Input mini-batch.
    gamma : array of shape (C,), or None
        Scale :math:`\\gamma`; ``None`` means no scale (1).
    beta : array of shape (C,), or None
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
    ValueError
        ``x`` has fewer than 2 dimensions, only one value per channel, or
        ``eps <= 0``.
    RuntimeError
        ``gamma`` or ``beta`` does not have one entry per channel.
    """
    xp = array_namespace(x)
    axis = _channel_axis(x.ndim, channel_axis)
    C = x.shape[axis]
    m = math.prod(x.shape) // C if C else 0
    bshape = _broadcast_shape(tuple(x.shape), axis)
    cdtype = _compute_dtype(xp, x)
    g = _per_channel(xp, gamma, "weight (gamma)", C, bshape, cdtype)
    b = _per_channel(xp, beta, "bias (beta)", C, bshape, cdtype)
    _check_training_batch(tuple(x.shape), m)
    _check_eps(eps)
    axes = tuple(i for i in range(x.ndim) if i != axis)

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
    return y, BNCache(x_hat, mean, var, inv_std, g, float(eps), axes, m)


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
    the others in its batch.

    Parameters
    ----------
    x : array, shape (N, C, *spatial) or (N, D)
    gamma, beta : array of shape (C,), or None
    running_mean, running_var : array of shape (C,)
        Population estimates, e.g. the running averages kept during training.
    eps : float, default 1e-5
    channel_axis : int, default 1

    Returns
    -------
    y : array, same shape, dtype and device as ``x``

    Raises
    ------
    ValueError
        ``x`` has fewer than 2 dimensions.
    RuntimeError
        A per-channel vector does not have one entry per channel.
    """
    xp = array_namespace(x)
    axis = _channel_axis(x.ndim, channel_axis)
    C = x.shape[axis]
    bshape = _broadcast_shape(tuple(x.shape), axis)
    cdtype = _compute_dtype(xp, x)
    mean = _per_channel(xp, running_mean, "running_mean", C, bshape, cdtype)
    var = _per_channel(xp, running_var, "running_var", C, bshape, cdtype)
    g = _per_channel(xp, gamma, "weight (gamma)", C, bshape, cdtype)
    b = _per_channel(xp, beta, "bias (beta)", C, bshape, cdtype)
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

def _vector(xp, v: Array) -> Array:
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
