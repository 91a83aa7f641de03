"""Batch Normalization across processes: synchronised statistics over ``torch.distributed``.

When a mini-batch is split over ``W`` processes (devices), rank ``r`` holds
``n_r`` values per channel. :class:`SyncBatchNorm` normalises every rank's
values with the statistics of the *global* batch, as if the ``W`` pieces had
been concatenated on one device. It works on any ``torch.distributed`` backend:
gloo on CPU (which ``torch.nn.SyncBatchNorm`` refuses) and NCCL on CUDA.

Forward pass, per channel. Each rank computes its count, mean and sum of
squared deviations, :math:`(n_r, \\mu_r, M_r)` with
:math:`M_r = \\sum_{i \\in r}(x_i - \\mu_r)^2`, by the same arithmetic as
:func:`bnlib.functional.batch_norm_forward` (``torch.var_mean``). One
``all_gather`` collects the ``W`` messages (per rank ``2C + 2`` numbers: the
``C`` means, the ``C`` values of ``M_r`` and the count, sent once and split in two
halves that float32 holds exactly; float32 unless the input is float64), and
every rank merges them in float64 with the formula of Chan, Golub and LeVeque
(:func:`merge_moments`), whose pairwise step is

.. math::

    n = n_a + n_b, \\qquad \\delta = \\mu_b - \\mu_a,

    \\mu = \\mu_a + \\delta\\,\\frac{n_b}{n}, \\qquad
    M = M_a + M_b + \\delta^2\\,\\frac{n_a n_b}{n} .

Folded over the ``W`` parts it is the closed form
:math:`M = \\sum_r M_r + \\sum_r n_r(\\mu_r-\\mu)^2`, computed as one vectorised
expression. The global biased variance is :math:`\\sigma^2 = M/n`, and the output is
:math:`y = \\gamma (x - \\mu)/\\sqrt{\\sigma^2 + \\epsilon} + \\beta`, the formula of
:mod:`bnlib.functional` with global statistics. A plain sum of squares
(:math:`\\sum x^2 - n\\mu^2`) is never formed: it cancels catastrophically when
the mean is large against the spread.

Backward pass. The closed form of :func:`bnlib.functional.batch_norm_backward`
needs two per-channel sums over the *global* batch, :math:`\\sum g` and
:math:`\\sum g \\hat x` (with :math:`g = \\partial L/\\partial y`); one
``all_reduce`` of the two local sums gives both, and then

.. math::

    \\frac{\\partial L}{\\partial x_i} = \\frac{\\gamma}{n\\sqrt{\\sigma^2+\\epsilon}}
        \\Big(n\\, g_i - \\textstyle\\sum g - \\hat x_i \\sum g \\hat x\\Big)

on every rank for its own :math:`x_i`. The weight and bias gradients each rank
returns are its *local* sums :math:`\\sum_{i\\in r} g_i \\hat x_i` and
:math:`\\sum_{i\\in r} g_i`; ``DistributedDataParallel`` reduces them across
ranks, as for ``torch.nn.SyncBatchNorm``.

Timeouts. A rank that never reaches a collective makes the others wait. The
wait is bounded by the process group's timeout: pass
``timeout=datetime.timedelta(seconds=...)`` to
``torch.distributed.init_process_group`` (or to ``new_group``). Every rank must
call the forward (and, when the input needs a gradient, the backward) of every
``SyncBatchNorm`` layer the same number of times, in the same order, even a
rank whose batch is empty.

:func:`run_world` starts a world of local processes (gloo on the loopback interface) and
collects what each returns; the tests and the book's chapter use it. On a GPU
cluster the same code runs under ``torchrun`` with the NCCL backend (not tested
here: the book's machines have no GPU).
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.multiprocessing.spawn import (
    ProcessExitedException,
    ProcessRaisedException,
    start_processes,
)
from torch.nn import Module
from torch.nn.modules.batchnorm import _BatchNorm

from . import functional as F
from .nn import _check_eps, _check_features

__all__ = [
    "SyncBatchNorm",
    "SyncBatchNormFunction",
    "convert_sync_batchnorm",
    "merge_moments",
    "run_world",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)  # computed in float32, as torch does


# ---------------------------------------------------------------------------
# moments
# ---------------------------------------------------------------------------


def merge_moments(count: Tensor, mean: Tensor, m2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Merge per-part moments into the moments of the union (Chan et al.'s update, all at once).

    Parameters
    ----------
    count, mean, m2 : Tensor, shape (W, C)
        For each of ``W`` parts and ``C`` channels: the number of values
        :math:`n_r`, their mean :math:`\\mu_r` and the sum of squared deviations
        from that mean :math:`M_r`. A part with ``count == 0`` is ignored
        (its mean and ``m2`` must be finite, e.g. 0).

    Returns
    -------
    count, mean, m2 : Tensor, shape (C,)
        The moments of all values together. ``m2 / count`` is the biased
        variance of the union.

    Notes
    -----
    Folding Chan's pairwise update
    :math:`\\mu = \\mu_a + \\delta\\, n_b/n`,
    :math:`M = M_a + M_b + \\delta^2 n_a n_b / n` over the parts gives the
    closed form computed here, one vectorised expression over the ``W`` parts
    (no Python loop over ranks):

    .. math::

        n = \\sum_r n_r, \\qquad \\mu = \\sum_r \\frac{n_r}{n}\\mu_r, \\qquad
        M = \\sum_r M_r + \\sum_r n_r (\\mu_r - \\mu)^2 .

    Every term of :math:`M` is non-negative and :math:`\\mu_r - \\mu` is a
    difference of two means, so nothing cancels the way
    :math:`\\sum x^2 - n\\mu^2` does.
    """
    if not (count.shape == mean.shape == m2.shape) or count.dim() != 2:
        raise ValueError(
            "count, mean and m2 must have the same 2D shape (parts, channels), got "
            f"{tuple(count.shape)}, {tuple(mean.shape)}, {tuple(m2.shape)}"
        )
    n = count.sum(0)
    weight = count / torch.clamp(n, min=1)  # n_r / n; 0 for an empty part (or an empty union)
    mu = (weight * mean).sum(0)
    deviation = mean - mu
    m2_total = m2.sum(0) + (count * deviation * deviation).sum(0)
    return n, mu, m2_total


_COUNT_SPLIT = 2**24  # float32 holds every integer below 2**24 exactly


def _payload_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 input; float32 otherwise (the local moments are float32 already)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _local_payload(x: Tensor, axes: tuple[int, ...]) -> Tensor:
    """This rank's message: ``[mean (C), M2 (C), n_hi, n_lo]``, a ``(2C + 2,)`` tensor.

    ``torch.var_mean(correction=0)`` is what :mod:`bnlib.functional` uses for
    torch tensors; ``M2 = n * var``. The count is the same for every channel, so
    it is sent once, split as ``n = n_hi * 2**24 + n_lo`` so that both halves are
    exact in float32 for any count below ``2**48``. The dtype is that of the
    local moments (float64 for float64 input, else float32): sending float32
    moments in float64 would double the bytes and add no digit. An empty batch
    sends mean 0, M2 0, count 0.
    """
    C = x.shape[1]
    n = x.numel() // C
    payload = torch.zeros(2 * C + 2, dtype=_payload_dtype(x), device=x.device)
    if n > 0:
        var, mean = torch.var_mean(x, dim=axes, correction=0)
        payload[:C] = mean
        payload[C : 2 * C] = var.to(payload.dtype) * n
    payload[2 * C] = n // _COUNT_SPLIT
    payload[2 * C + 1] = n % _COUNT_SPLIT
    return payload


def _merge_payloads(gathered: Tensor, C: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(W, 2C + 2)`` messages -> global count (C,), mean (C,), M2 (C,), merged in float64."""
    parts = gathered.double()
    counts = parts[:, 2 * C] * _COUNT_SPLIT + parts[:, 2 * C + 1]  # (W,), exact
    return merge_moments(counts.unsqueeze(1).expand(-1, C), parts[:, :C], parts[:, C : 2 * C])


def _group_size(group: dist.ProcessGroup | None) -> int:
    """World size of ``group``, or 1 when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


# ---------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------


class SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode BN with statistics of the global batch, as an autograd node.

    ``forward(x, weight, bias, eps, group, sync=True)`` returns ``(y, mean, var, count)``:
    the output, the global per-channel mean and biased variance (float64, not
    differentiable) and the global count per channel. One ``all_gather`` in the
    forward pass, one ``all_reduce`` in the backward pass (when ``x`` needs a
    gradient); none when ``sync`` is false, the group has a single process or
    torch.distributed is not initialised. First derivatives only (no double backward).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        group: dist.ProcessGroup | None,
        sync: bool = True,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        axes = (0, *range(2, x.dim()))
        xf = x.float() if x.dtype in _LOW_PRECISION else x
        C = x.shape[1]
        local = _local_payload(xf, axes)
        world = _group_size(group) if sync else 1
        if world > 1:
            parts = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(parts, local, group=group)  # the forward's one collective
            gathered = torch.stack(parts)
        else:
            gathered = local.unsqueeze(0)
        count, mean, m2 = _merge_payloads(gathered, C)
        # The global count stays a tensor: reading it on the host would stall an accelerator's
        # stream once per layer. Only where that is free (one process: the local shape; or a
        # CPU tensor) is the degenerate global batch of one value per channel checked; on an
        # accelerator with several processes it is not, as in torch.nn.SyncBatchNorm.
        n_host = x.numel() // C if world == 1 else None
        if n_host is None and count.device.type == "cpu":
            n_host = int(count[0])
        if n_host == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got 1 value per "
                f"channel in the global batch (local input size {list(x.shape)})"
            )
        n = count[0]
        var = m2 / torch.clamp(n, min=1)
        bshape = [1] * x.dim()
        bshape[1] = x.shape[1]
        mean_c = mean.to(xf.dtype).reshape(bshape)
        inv_std = torch.rsqrt(var + eps).to(xf.dtype).reshape(bshape)
        x_hat = (xf - mean_c) * inv_std
        y = x_hat if weight is None else x_hat * weight.to(xf.dtype).reshape(bshape)
        if bias is not None:
            y = y + bias.to(xf.dtype).reshape(bshape)
        ctx.save_for_backward(x, weight, mean_c, inv_std, n.to(xf.dtype))
        ctx.group, ctx.has_bias, ctx.world = group, bias is not None, world
        ctx.mark_non_differentiable(mean, var, count)
        return y.to(x.dtype), mean, var, count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: Any, dy: Tensor, _dmean: Tensor, _dvar: Tensor, _dcount: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None, None]:
        x, weight, mean_c, inv_std, n = ctx.saved_tensors
        axes = (0, *range(2, x.dim()))
        low = x.dtype in _LOW_PRECISION
        xf = x.float() if low else x
        g = dy.float() if low else dy
        x_hat = (xf - mean_c) * inv_std
        sum_g = g.sum(axes)  # local sums; zeros for an empty batch
        sum_gx = (g * x_hat).sum(axes)
        dx = None
        if ctx.needs_input_grad[0]:
            # in the dtype of the forward's message: the local sums of a float32 input are
            # float32 numbers already, so float32 on the wire rounds nothing more away (the
            # sum of the W messages is rounded in float32, as torch.nn.SyncBatchNorm does)
            sums = torch.stack([sum_g, sum_gx]).to(_payload_dtype(xf))
            if ctx.world > 1:
                dist.all_reduce(sums, group=ctx.group)  # the backward's one collective
            bshape = mean_c.shape
            total_g = sums[0].to(xf.dtype).reshape(bshape)
            total_gx = sums[1].to(xf.dtype).reshape(bshape)
            scale = inv_std if weight is None else inv_std * weight.to(xf.dtype).reshape(bshape)
            # bnlib.functional.batch_norm_backward with global sums and the global count n
            dx = (scale / n) * (n * g - total_g - x_hat * total_gx)
            dx = dx.to(dy.dtype)
        dweight = None if weight is None else sum_gx.to(weight.dtype)
        dbias = None
        if ctx.has_bias:
            dbias = sum_g.to(weight.dtype if weight is not None else dy.dtype)
        return dx, dweight, dbias, None, None, None


# ---------------------------------------------------------------------------
# module
# ---------------------------------------------------------------------------


class SyncBatchNorm(_BatchNorm):
    """Batch normalisation with statistics synchronised across a process group.

    The signature of :class:`torch.nn.SyncBatchNorm`; it works on CPU (gloo) as
    well as on CUDA (NCCL). In training mode every rank normalises its part of
    the batch with the mean and variance of the global batch (all ranks of
    ``process_group`` together): concatenated, the ranks' outputs, input
    gradients, summed weight and bias gradients and running statistics equal
    those of one BatchNorm layer on the concatenated batch. Ranks may hold
    different numbers of examples, one example, or none.

    Subclass of ``torch.nn.modules.batchnorm._BatchNorm``, the base of every
    torch BatchNorm, so that code which recognises BatchNorm layers by
    ``isinstance`` (weight-decay filters, freezing, fusion) treats it as one.

    Parameters
    ----------
    num_features : int
        ``C``, the number of channels (dimension 1 of the input).
    eps : float, default 1e-5
    momentum : float or None, default 0.1
        Weight of the new batch in the running averages; ``None`` for a
        cumulative average.
    affine : bool, default True
        Learn a per-channel scale ``weight`` and shift ``bias``.
    track_running_stats : bool, default True
    process_group : torch.distributed.ProcessGroup, optional
        The ranks whose batches are pooled; default: the whole world.
    device, dtype : optional
        Where and in which dtype to create parameters and buffers.

    Notes
    -----
    Without an initialised process group, or with a group of one process, it
    computes ordinary BatchNorm. In eval mode it uses the running statistics
    and communicates nothing; in eval mode without running statistics it
    normalises each rank's batch on its own (as torch does).

    Inputs ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``,
    in any memory format (``channels_last`` included); float16 and bfloat16 are
    computed in float32.

    A global batch of one value per channel raises ``ValueError`` with one process
    or on CPU; on an accelerator with several processes the check would need a
    host read of the merged count (a stream stall per layer), so there, as in
    :class:`torch.nn.SyncBatchNorm`, it is not made.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if not 2 <= input.dim() <= 5:
            raise ValueError(f"expected 2D to 5D input (got {input.dim()}D input)")

    def _check_input(self, x: Tensor, batch_stats: bool) -> None:
        """Every local check that can fail, before any state is touched or any message sent."""
        self._check_input_dim(x)
        _check_features(x, self.num_features)
        _check_eps(self.eps, batch_stats)

    def forward(self, input: Tensor) -> Tensor:
        use_batch_stats = self.training or self.running_mean is None
        self._check_input(input, use_batch_stats)
        if not use_batch_stats:
            assert self.running_mean is not None and self.running_var is not None
            y: Tensor = F.batch_norm_inference(
                input, self.weight, self.bias, self.running_mean, self.running_var, self.eps
            )
            return y
        # eval without running statistics: each rank on its own, as torch.nn.SyncBatchNorm
        y, mean, var, count = SyncBatchNormFunction.apply(  # type: ignore[no-untyped-call]
            input, self.weight, self.bias, self.eps, self.process_group, self.training
        )
        if self.training and self.track_running_stats:
            self._update_running_stats(mean, var, count[0])
        return y

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, n: Tensor) -> None:
        """Running averages with the global count ``n`` (a tensor: no host read, no CUDA sync).

        As torch's BatchNorm does, ``num_batches_tracked`` counts every training forward,
        an all-empty global batch included (which leaves the averages unchanged), so with
        ``momentum=None`` such a step still lowers the weight of later batches. Float16
        or bfloat16 buffers receive the update rounded to their precision.
        """
        assert self.num_batches_tracked is not None
        assert self.running_mean is not None and self.running_var is not None
        self.num_batches_tracked.add_(1)
        dtype = self.running_mean.dtype
        present = (n > 0).to(dtype)  # every rank empty (n = 0): weight 0, no change (as torch)
        if self.momentum is None:  # cumulative average
            weight = present / self.num_batches_tracked.to(dtype)
        else:
            weight = present * self.momentum
        unbiased_var = var * n / torch.clamp(n - 1, min=1)  # the global count
        self.running_mean.lerp_(mean.to(dtype), weight)
        self.running_var.lerp_(unbiased_var.to(dtype), weight)


def convert_sync_batchnorm(
    module: Module, process_group: dist.ProcessGroup | None = None
) -> Module:
    """Replace every BatchNorm layer in ``module`` with :class:`SyncBatchNorm`.

    Every instance of ``torch.nn.modules.batchnorm._BatchNorm`` (torch's and
    bnlib's ``BatchNorm1d/2d/3d``, ``torch.nn.SyncBatchNorm``) is replaced. The
    new layer holds the *same* parameter and buffer objects as the old one
    (optimisers and other references keep working), its hyperparameters and its
    training flag. A layer that appears several times in the tree is replaced
    by one new layer, so shared layers stay shared. Replacement is in place;
    the root is returned (the new layer if ``module`` itself is a BatchNorm).

    Parameters
    ----------
    module : torch.nn.Module
    process_group : torch.distributed.ProcessGroup, optional
        Passed to every new layer; default: the whole world.

    Returns
    -------
    torch.nn.Module
    """
    return _convert(module, process_group, {})


def _convert(module: Module, group: dist.ProcessGroup | None, memo: dict[int, Module]) -> Module:
    if id(module) in memo:
        return memo[id(module)]
    new = module
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        new = SyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group=group,
            device="meta",
        )
        for name in ("weight", "bias"):  # the very same Parameter objects (or None)
            new._parameters[name] = module._parameters.get(name)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            new._buffers[name] = module._buffers.get(name)
        new.train(module.training)
        if hasattr(module, "qconfig"):
            new.qconfig = module.qconfig
    memo[id(module)] = new
    for name, child in list(new._modules.items()):
        if child is not None:
            new._modules[name] = _convert(child, group, memo)
    return new


# ---------------------------------------------------------------------------
# launching a local world
# ---------------------------------------------------------------------------


def _loopback_interface() -> str:
    """The loopback interface's name, which gloo's sockets are pinned to: ``lo0`` on macOS."""
    return "lo0" if sys.platform == "darwin" else "lo"


def _entry(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    store_file: str,
    collective_timeout: float,
    out_dir: str,
    args: tuple[Any, ...],
    backend: str,
) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", _loopback_interface())
    torch.set_num_threads(1)
    if backend == "nccl":  # one GPU per rank
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(
        backend,
        init_method=f"file://{store_file}",  # rendezvous in a file: no port to race for
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=collective_timeout),
    )
    try:
        try:
            result = fn(rank, world_size, *args)
        except BaseException:
            with open(os.path.join(out_dir, f"rank{rank}.err"), "w", encoding="utf-8") as f:
                f.write(traceback.format_exc())
            raise
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _tracebacks(out_dir: str, error: Exception) -> str:
    """The tracebacks of the ranks whose ``fn`` raised, else the launcher's error."""
    names = sorted(n for n in os.listdir(out_dir) if n.endswith(".err"))
    texts = []
    for name in names:
        with open(os.path.join(out_dir, name), encoding="utf-8") as f:
            texts.append(f"-- {name[:-4]}:\n{f.read()}")
    return "\n".join(texts) if texts else str(error)


def run_world(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    timeout: float = 120.0,
    collective_timeout: float = 30.0,
    start_method: str | None = None,
    backend: str = "gloo",
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` local processes; return their results.

    Each process joins a process group (gloo by default, on the loopback interface; the
    rendezvous is a file in a fresh temporary directory, so no port is chosen and none can be
    taken by another program in between) with
    collective timeout ``collective_timeout`` seconds, runs with one thread, and
    returns a value that ``torch.save`` can store. ``fn`` must be importable by
    the new processes: a function defined in a module, not in a notebook.

    Parameters
    ----------
    fn : callable
    world_size : int
    args : sequence
        Extra arguments, the same for every rank.
    timeout : float, default 120
        Seconds for the whole run; after that the processes are terminated.
    collective_timeout : float, default 30
        Seconds a collective may wait for the other ranks.
    start_method : str, optional
        ``"forkserver"`` (the default where it exists: a server process imports
        torch and ``fn``'s module once and forks every worker from it, which
        saves each worker the import) or ``"spawn"`` (a fresh interpreter per
        worker; the default elsewhere).
    backend : str, default "gloo"
        ``"gloo"`` (CPU, and CUDA tensors for some collectives) or ``"nccl"``
        (rank ``r`` uses GPU ``r``; needs one GPU per rank; untested on the
        book's machines, which have no GPU).

    Returns
    -------
    list
        ``[result of rank 0, result of rank 1, ...]``.

    Raises
    ------
    RuntimeError
        A process failed; the message holds its traceback.
    TimeoutError
        The run took longer than ``timeout``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if start_method is None:
        methods = multiprocessing.get_all_start_methods()
        start_method = "forkserver" if "forkserver" in methods else "spawn"
    if start_method == "forkserver":  # takes effect when the server starts (once)
        multiprocessing.set_forkserver_preload(["torch", __name__, fn.__module__])
    with tempfile.TemporaryDirectory() as out_dir:
        store_file = os.path.join(out_dir, "rendezvous")
        context = start_processes(  # type: ignore[no-untyped-call]
            _entry,
            args=(fn, world_size, store_file, collective_timeout, out_dir, tuple(args), backend),
            nprocs=world_size,
            join=False,
            start_method=start_method,
        )
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=0.05):
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"run_world: {world_size} processes did not finish within {timeout} s"
                    )
        except (ProcessRaisedException, ProcessExitedException) as e:
            raise RuntimeError(f"run_world: a process failed.\n{_tracebacks(out_dir, e)}") from None
        finally:
            for p in context.processes:
                if p.is_alive():
                    p.terminate()
                    p.join(5)
        return [
            torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
            for r in range(world_size)
        ]
