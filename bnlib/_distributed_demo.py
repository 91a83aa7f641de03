"""The experiments of the book's chapter *BN across devices* (not part of bnlib's API).

They live in a module, not in the notebook, because the processes that
:func:`bnlib.distributed.run_world` starts must import the function they run.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from . import functional as F
from .distributed import SyncBatchNorm, convert_sync_batchnorm

__all__ = [
    "PerDeviceBatchNorm",
    "chapter_world",
    "digits",
    "layer_latency",
    "make_model",
    "sync_check",
    "train",
]


@functools.cache
def digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """sklearn's digits, float64 in [0, 1], split 1397 / 400 by a fixed permutation."""
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]

    data = load_digits()
    X = torch.tensor(data.data, dtype=torch.float64) / 16
    Y = torch.tensor(data.target)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    X, Y = X[perm], Y[perm]
    return X[:1397], Y[:1397], X[1397:], Y[1397:]


def make_model(seed: int) -> torch.nn.Sequential:
    """A 64-64-64-10 MLP with BatchNorm after each hidden linear layer (float64).

    The layers are ``torch.nn.BatchNorm1d``, as in any model one would take off
    the shelf; :func:`~bnlib.distributed.convert_sync_batchnorm` swaps them.
    """
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 64),
        torch.nn.BatchNorm1d(64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 64),
        torch.nn.BatchNorm1d(64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    ).double()


class PerDeviceBatchNorm(torch.nn.Module):
    """One process imitating ``devices`` processes that each run ``bn`` on their own slice.

    In training the batch is cut into ``devices`` equal slices, each normalised
    with its own statistics (:func:`bnlib.functional.batch_norm_forward`); only
    slice 0 (rank 0's) updates the running statistics, which is what rank 0 of
    DistributedDataParallel keeps. In eval it is ``bn``.
    """

    def __init__(self, bn: torch.nn.BatchNorm1d, devices: int) -> None:
        super().__init__()
        self.bn, self.devices = bn, devices

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.devices == 1:
            y: Tensor = self.bn(x)
            return y
        slices = x.chunk(self.devices)
        rest = [
            F.batch_norm_forward(s, self.bn.weight, self.bn.bias, self.bn.eps)[0]
            for s in slices[1:]
        ]
        return torch.cat([self.bn(slices[0]), *rest])


def _batches(seed: int, n_train: int, batch: int, steps: int) -> list[Tensor]:
    """The global batches (index tensors) of a run: epochs of a seeded permutation."""
    g = torch.Generator().manual_seed(1000 + seed)
    out: list[Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n_train, generator=g)
        out += [perm[i : i + batch] for i in range(0, n_train - batch + 1, batch)]
    return out[:steps]


def _first_bn(model: torch.nn.Sequential) -> _BatchNorm:
    layer = model[1]
    return cast(_BatchNorm, layer.bn if isinstance(layer, PerDeviceBatchNorm) else layer)


def _statistics_noise(
    X: Tensor, model: torch.nn.Sequential, per: int, devices: int, seed: int, draws: int
) -> tuple[float, float]:
    """RMS error of the first BN layer's batch mean (in population sd) and variance (relative).

    With momentum 1 the layer's running statistics are exactly the (rank 0)
    statistics it normalised with; the population values are those of the
    whole training set through the first linear layer, at initialisation.
    """
    bn = _first_bn(model)
    with torch.no_grad():
        pre = model[0](X)
        pop_mean, pop_var = pre.mean(0), pre.var(0)
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    bn.momentum = 1.0
    err_mean, err_var = [], []
    g = torch.Generator().manual_seed(2000 + seed)
    with torch.no_grad():
        for _ in range(draws):
            model(X[torch.randperm(len(X), generator=g)[: per * devices]])
            err_mean.append((bn.running_mean - pop_mean) / pop_var.sqrt())
            err_var.append(bn.running_var / pop_var - 1)
    bn.momentum = 0.1
    bn.load_state_dict(state)
    return (
        float(torch.stack(err_mean).pow(2).mean().sqrt()),
        float(torch.stack(err_var).pow(2).mean().sqrt()),
    )


def _recalibrated_accuracy(model: torch.nn.Sequential, X: Tensor, Xt: Tensor, Yt: Tensor) -> float:
    """Test accuracy after replacing every running statistic by its value on the training set.

    The trained parameters are kept; one training-mode pass over all of ``X``
    with ``momentum=None`` (a cumulative average over one batch) sets the
    running mean and unbiased variance of every BN layer to those of the
    training set. Comparing with the ordinary accuracy separates a failure of
    training from a failure of the running statistics. Restores nothing: call
    it last.
    """
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, PerDeviceBatchNorm):
                layer.devices = 1
        for layer in model.modules():
            if isinstance(layer, _BatchNorm):
                layer.reset_running_stats()
                layer.momentum = None
        model.train()
        model(X)
        model.eval()
        return float((model(Xt).argmax(1) == Yt).double().mean())


def train(
    rank: int,
    world: int,
    mode: str,
    seed: int,
    per: int,
    steps: int,
    devices: int = 4,
    sync_buffers: bool = True,
    lr: float = 0.1,
    noise_draws: int = 0,
    data: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
    perturb: float = 0.0,
) -> dict[str, Any]:
    """Train the MLP on digits with global batches of ``per * devices`` examples.

    With ``world == devices`` processes (DistributedDataParallel), each rank
    takes ``per`` examples of every global batch; ``mode`` ``"per-device"``
    keeps ordinary BN (each rank its own statistics), ``"sync"`` converts it to
    :class:`~bnlib.distributed.SyncBatchNorm`. With ``world == 1`` the same
    training runs in one process: ``"per-device"`` through
    :class:`PerDeviceBatchNorm`, ``"sync"`` as one BN on the whole batch.
    ``sync_buffers`` is DDP's ``forward_sync_buffers`` (``broadcast_buffers``
    before torch 2.13). ``data`` is :func:`digits`'s tuple (loaded here if None).
    ``perturb`` multiplies every initial parameter by ``1 + perturb * N(0, 1)``
    (its own generator), for testing how much the trained state depends on tiny
    changes such as another CPU's rounding.
    """
    X, Y, Xt, Yt = digits() if data is None else data
    model = make_model(seed)
    if perturb:
        gen = torch.Generator().manual_seed(99)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + perturb * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    if mode == "sync" and world > 1:
        convert_sync_batchnorm(model)
    if mode == "per-device" and world == 1:
        for i in (1, 4):
            model[i] = PerDeviceBatchNorm(cast(torch.nn.BatchNorm1d, model[i]), devices)
    noise = _statistics_noise(X, model, per, devices, seed, noise_draws) if noise_draws else None
    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, forward_sync_buffers=sync_buffers)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    for idx in _batches(seed, len(X), per * devices, steps):
        mine = idx[rank * per : (rank + 1) * per] if world > 1 else idx
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(X[mine]), Y[mine])
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(Xt).argmax(1) == Yt).double().mean())
    # the trained state, taken before the recalibration below overwrites the buffers
    tensors = [t.detach().clone() for t in (*model.parameters(), *model.buffers())]
    running_mean = _first_bn(model).running_mean
    assert running_mean is not None
    running_mean = running_mean.clone()
    recalibrated = _recalibrated_accuracy(model, X, Xt, Yt) if world == 1 else None
    return {
        "accuracy": accuracy,
        "accuracy_recalibrated": recalibrated,
        "noise": noise,
        "tensors": tensors,
        "running_mean": running_mean,
    }


def sync_check(rank: int, sizes: list[int]) -> dict[str, Tensor]:
    """One SyncBatchNorm step on this rank's slice of a fixed global batch (float64)."""
    g = torch.Generator().manual_seed(0)
    x_all = torch.randn(sum(sizes), 3, 4, 4, generator=g, dtype=torch.float64) * 2 + 3
    v_all = torch.randn(x_all.shape, generator=g, dtype=torch.float64)
    start = sum(sizes[:rank])
    x = x_all[start : start + sizes[rank]].clone().requires_grad_(True)
    bn = SyncBatchNorm(3, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
    y = bn(x)
    loss = (y * v_all[start : start + sizes[rank]]).sum()
    loss.backward()
    assert x.grad is not None and bn.weight.grad is not None and bn.bias.grad is not None
    assert bn.running_mean is not None and bn.running_var is not None
    return {
        "y": y.detach(),
        "dx": x.grad,
        "dweight": bn.weight.grad,
        "dbias": bn.bias.grad,
        "running_mean": bn.running_mean.clone(),
        "running_var": bn.running_var.clone(),
    }


def layer_latency(reps: int = 100, channels: int = 64, per: int = 8) -> dict[str, float]:
    """Median seconds per training forward of one small BN layer: SyncBatchNorm against
    ``torch.nn.BatchNorm1d`` on the same ``(per, channels)`` input, and one bare ``all_gather``
    of SyncBatchNorm's message (``2 * channels + 2`` float32 numbers). Timing: vary with the
    machine; the chapter prints them in a cell whose output is not compared."""
    x = torch.randn(per, channels, generator=torch.Generator().manual_seed(0))
    sync, local = SyncBatchNorm(channels), torch.nn.BatchNorm1d(channels)
    message = torch.zeros(2 * channels + 2)
    parts = [torch.empty_like(message) for _ in range(dist.get_world_size())]

    def median_time(step: Any) -> float:
        times = []
        for i in range(reps + 20):
            dist.barrier()  # every rank starts the call together
            t0 = time.perf_counter()
            step()
            if i >= 20:  # the first calls warm up
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return {
        "sync": median_time(lambda: sync(x)),
        "local": median_time(lambda: local(x)),
        "all_gather": median_time(lambda: dist.all_gather(parts, message)),
    }


def chapter_world(rank: int, world: int, config: dict[str, Any]) -> dict[str, Any]:
    """Everything the chapter runs in its world of processes, in one launch."""
    out: dict[str, Any] = {
        "world": dist.get_world_size(),
        "check": sync_check(rank, config["sizes"]),
    }
    try:  # torch's own SyncBatchNorm, on CPU tensors in an initialised process group
        torch.nn.SyncBatchNorm(3)(torch.randn(4, 3))
        out["torch_sync"] = "ran"
    except ValueError as e:
        out["torch_sync"] = f"ValueError: {e}"
    per, steps, seed, data = config["per"], config["steps"], config["seed"], config["data"]
    out["per-device"] = train(rank, world, "per-device", seed, per, steps, world, data=data)
    out["per-device, no buffer sync"] = train(
        rank, world, "per-device", seed, per, steps, world, sync_buffers=False, data=data
    )
    out["sync"] = train(rank, world, "sync", seed, per, steps, world, data=data)
    out["latency"] = layer_latency()
    return out
