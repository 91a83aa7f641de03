"""Worker functions for tests/test_distributed.py, run in spawned processes by run_world.

Each worker runs many cases in one process-group lifetime and returns plain
tensors; the test process compares them with one BatchNorm on the global batch.
"""

from __future__ import annotations

import datetime
import time
import traceback

import torch
import torch.distributed as dist

from bnlib.distributed import SyncBatchNorm

SHAPES = {2: (), 3: (3,), 4: (2, 3), 5: (2, 1, 2)}


def global_batch(seed: int, sizes, C: int, ndim: int, dtype=torch.float64):
    """The global input and upstream gradient, identical in every process."""
    g = torch.Generator().manual_seed(seed)
    N = sum(sizes)
    shape = (N, C, *SHAPES[ndim])
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 5).to(dtype)
    v = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, v


def my_slice(rank: int, sizes) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


CASES = [  # (name, ndim, dtype, kwargs, channels_last, steps)
    ("2d-f64", 2, torch.float64, {}, False, 2),
    ("3d-f64", 3, torch.float64, {}, False, 1),
    ("4d-f64", 4, torch.float64, {}, False, 2),
    ("4d-f64-channels_last", 4, torch.float64, {}, True, 1),
    ("5d-f64", 5, torch.float64, {}, False, 1),
    ("2d-f64-momentum-None", 2, torch.float64, {"momentum": None}, False, 3),
    ("4d-f64-no-affine", 4, torch.float64, {"affine": False}, False, 1),
    ("2d-f64-no-running-stats", 2, torch.float64, {"track_running_stats": False}, False, 1),
    ("4d-f32", 4, torch.float32, {}, False, 1),
    ("4d-bf16", 4, torch.bfloat16, {}, False, 1),
]


def host(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy (never a view of a tensor that later steps update in place)."""
    return t.detach().to("cpu", copy=True)


def run_case(rank, sizes, case, group=None, seed=0, device="cpu"):
    """One SyncBatchNorm on this rank's slice: outputs, gradients, buffers per step (on CPU)."""
    name, ndim, dtype, kwargs, channels_last, steps = case
    C = 3
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    bn = SyncBatchNorm(C, process_group=group, dtype=pdtype, device=device, **kwargs)
    if bn.affine:
        with torch.no_grad():
            bn.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
            bn.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
    out = []
    for step in range(steps):
        xg, vg = global_batch(seed + 100 * step, sizes, C, ndim, dtype)
        x = xg[my_slice(rank, sizes)].clone().to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        bn.zero_grad()
        y = bn(x)
        (y.double() * vg[my_slice(rank, sizes)].double().to(device)).sum().backward()
        rec = {
            "y": host(y),
            "dx": host(x.grad),
            "y_channels_last": y.is_contiguous(memory_format=torch.channels_last),
            "dx_channels_last": x.grad.is_contiguous(memory_format=torch.channels_last),
        }
        if bn.affine:
            rec["dw"], rec["db"] = host(bn.weight.grad), host(bn.bias.grad)
        if bn.track_running_stats:
            rec["rm"] = host(bn.running_mean)
            rec["rv"] = host(bn.running_var)
            rec["nbt"] = host(bn.num_batches_tracked)
        out.append(rec)
    if not bn.track_running_stats:  # eval would use each rank's own batch (tested apart)
        return {"steps": out, "eval": None}
    bn.eval()  # ordinary inference with the (synchronised) running statistics
    xg, _ = global_batch(seed + 7, sizes, C, ndim, dtype)
    eval_y = bn(xg[my_slice(rank, sizes)].to(device))
    return {"steps": out, "eval": host(eval_y)}


def _error(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - reported to the test process
        return f"{type(e).__name__}: {e}"
    return None


def gradcheck_world(rank: int, world: int, sizes) -> bool:
    """torch.autograd.gradcheck of the global map (x, weight, bias) -> y, run in lockstep.

    Every rank holds the whole global input (replicated); ``_Replicated`` slices
    this rank's part in the forward pass and sums the ranks' gradients in the
    backward pass (DDP's role for parameters); ``_SumOverRanks`` assembles the
    global output on every rank (its backward is the identity because every
    rank back-propagates the same upstream gradient).
    """

    class _Replicated(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            g = g.clone()
            dist.all_reduce(g)
            return g

    class _SumOverRanks(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            t = t.clone()
            dist.all_reduce(t)
            return t

        @staticmethod
        def backward(ctx, g):
            return g

    bn = SyncBatchNorm(2, dtype=torch.float64)
    sl = my_slice(rank, sizes)

    def f(x, w, b):
        xr, wr, br = _Replicated.apply(x), _Replicated.apply(w), _Replicated.apply(b)
        bn.weight, bn.bias = wr, br  # plain tensors in the parameters' place
        y_local = bn(xr[sl])
        full = torch.zeros_like(x).index_copy(0, torch.arange(sl.start, sl.stop), y_local)
        return _SumOverRanks.apply(full)

    del bn.weight, bn.bias
    g = torch.Generator().manual_seed(3)
    x = torch.randn(sum(sizes), 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([1.3, -0.7], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.2, 0.1], dtype=torch.float64, requires_grad=True)
    return bool(torch.autograd.gradcheck(f, (x, w, b), check_undefined_grad=False))


def ddp_digits(rank: int, world: int, X, Y, steps: int = 6, per_rank: int = 16):
    """A few SGD steps of DDP on sklearn digits (X, Y) with SyncBatchNorm; final state."""
    from bnlib.distributed import convert_sync_batchnorm

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
    ).double()
    model = convert_sync_batchnorm(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5, momentum=0.9)
    for step in range(steps):
        idx = torch.arange(step * per_rank * world, (step + 1) * per_rank * world)
        mine = idx[rank * per_rank : (rank + 1) * per_rank]
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(ddp(X[mine]), Y[mine])
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def main(rank: int, world: int, config: dict):
    """All cases of one world configuration; returns a dict of per-case results."""
    results: dict = {"cases": {}, "errors": {}}
    for sizes_name, sizes in config["sizes"].items():
        for case in CASES:
            results["cases"][(sizes_name, case[0])] = run_case(rank, sizes, case)

    # process_group: pairs of ranks ({0,1}, {2,3}, ...) each pool their own batch
    if world >= 2:
        pairs = [list(range(i, min(i + 2, world))) for i in range(0, world, 2)]
        groups = [dist.new_group(p) for p in pairs]
        mine = groups[rank // 2]
        sizes = config["sizes"]["uneven"]
        pair = pairs[rank // 2]  # the pair's own global batch, split over its ranks
        results["pairs"] = run_case(pair.index(rank), [sizes[r] for r in pair], CASES[2], mine)
        # a group of one process: ordinary BatchNorm on this rank's batch
        singles = [dist.new_group([r]) for r in range(world)]
        results["single"] = run_case(0, [sizes[rank]], CASES[0], group=singles[rank])

    # bad input: one value per channel in the whole world -> every rank raises
    ones = [1] + [0] * (world - 1)
    bn = SyncBatchNorm(2, dtype=torch.float64)
    x = torch.randn(ones[rank], 2, dtype=torch.float64)
    before = (bn.running_mean.clone(), bn.num_batches_tracked.clone())
    results["errors"]["one-value"] = _error(lambda: bn(x))
    results["errors"]["one-value-state-kept"] = bool(
        torch.equal(before[0], bn.running_mean) and torch.equal(before[1], bn.num_batches_tracked)
    )
    # every rank empty: empty output, counter incremented, statistics unchanged
    bn = SyncBatchNorm(2, dtype=torch.float64)
    y = bn(torch.randn(0, 2, 5, dtype=torch.float64))
    results["all-empty"] = (tuple(y.shape), int(bn.num_batches_tracked), bn.running_mean.clone())

    if config.get("gradcheck"):
        results["gradcheck"] = gradcheck_world(rank, world, config["gradcheck"])
    if config.get("ddp"):
        results["ddp"] = ddp_digits(rank, world, *config["ddp"])
    if config.get("demo"):
        # the book's experiment code: DDP with per-device BN / SyncBN, and the per-device BN
        # run again without DDP's buffer broadcast
        from bnlib import _distributed_demo as demo

        kw = dict(seed=1, per=3, steps=4, devices=world, data=config["demo"])
        results["demo"] = {
            "per-device": demo.train(rank, world, "per-device", **kw),
            "per-device, no buffer sync": demo.train(
                rank, world, "per-device", sync_buffers=False, **kw
            ),
            "sync": demo.train(rank, world, "sync", **kw),
        }
    if config.get("hang"):
        # a rank that skips a collective: the other fails after the group's timeout
        group = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=1))
        t0 = time.monotonic()
        err = None
        if rank == 0:
            try:
                SyncBatchNorm(2, process_group=group)(torch.randn(4, 2))
            except Exception:  # noqa: BLE001
                err = traceback.format_exc(limit=1)
        results["hang"] = (err, time.monotonic() - t0)
        dist.barrier()
    return results


def cuda_cases(rank: int, world: int, config: dict):
    """The cases of one size configuration with CUDA tensors (NCCL world, one GPU per rank)."""
    sizes = config["sizes"]["uneven"]
    return {"cases": {("uneven", c[0]): run_case(rank, sizes, c, device="cuda") for c in CASES}}


def hang_forever(rank: int, world: int):
    """For the launcher's timeout test: never returns."""
    time.sleep(3600)


def fail(rank: int, world: int):
    """For the launcher's error test: rank 1 raises."""
    if rank == 1:
        raise ArithmeticError("rank 1 failed on purpose")
    return rank
