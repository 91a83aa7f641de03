"""bnlib.distributed: SyncBatchNorm across gloo process groups equals one BN on the global batch.

Each world configuration (2, 3 and 4 processes on 127.0.0.1) is spawned once, by
:func:`bnlib.distributed.run_world` with a deadline and a collective timeout, and
runs every case (tests/_dist_worker.py); the results are compared here, in
float64 to 1e-10, with ``torch.nn.BatchNorm*d`` on the concatenated batch.
"""

from __future__ import annotations

import copy
import functools
import os

import _dist_worker
import pytest
import torch
from _dist_worker import CASES, global_batch
from _helpers import DEVICES, assert_close, assert_same_state, state_snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

import bnlib.nn
from bnlib.distributed import (
    SyncBatchNorm,
    SyncBatchNormFunction,
    convert_sync_batchnorm,
    merge_moments,
    run_world,
)

WORLDS = {
    2: {
        "sizes": {"uneven": [3, 5], "one-sample": [1, 4]},
        "gradcheck": [3, 2],
        "ddp": "digits",
        "demo": "demo digits",
        "hang": True,
    },
    3: {"sizes": {"uneven": [2, 4, 3], "empty-and-single": [4, 0, 1]}, "gradcheck": [3, 0, 1]},
    4: {"sizes": {"uneven": [2, 3, 4, 5], "mixed": [0, 1, 3, 0], "singles": [1, 1, 1, 1]}},
}

TORCH_BN = {
    2: torch.nn.BatchNorm1d,
    3: torch.nn.BatchNorm1d,
    4: torch.nn.BatchNorm2d,
    5: torch.nn.BatchNorm3d,
}


@functools.cache
def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float64) / 16, torch.tensor(data.target)


@functools.cache
def world_results(world: int) -> list:
    config = dict(WORLDS[world])
    if config.get("ddp"):
        config["ddp"] = digits()  # loaded once here, not in every process
    if config.get("demo"):
        from bnlib import _distributed_demo as demo

        config["demo"] = demo.digits()
    return run_world(_dist_worker.main, world, args=(config,), timeout=120, collective_timeout=20)


def reference(sizes, case, seed=0):
    """One torch BatchNorm (float64) on the concatenated global batch, same steps as run_case."""
    name, ndim, dtype, kwargs, channels_last, steps = case
    C = 3
    bn = TORCH_BN[ndim](C, dtype=torch.float64, **kwargs)
    if bn.affine:
        with torch.no_grad():
            bn.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
            bn.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
    out = []
    for step in range(steps):
        xg, vg = global_batch(seed + 100 * step, sizes, C, ndim, dtype)
        x = xg.double().requires_grad_(True)
        bn.zero_grad()
        y = bn(x)
        (y * vg.double()).sum().backward()
        rec = {"y": y.detach(), "dx": x.grad}
        if bn.affine:
            rec["dw"], rec["db"] = bn.weight.grad.clone(), bn.bias.grad.clone()
        if bn.track_running_stats:
            rec["rm"], rec["rv"] = bn.running_mean.clone(), bn.running_var.clone()
            rec["nbt"] = bn.num_batches_tracked.clone()
        out.append(rec)
    if not bn.track_running_stats:
        return {"steps": out, "eval": None}
    bn.eval()
    xg, _ = global_batch(seed + 7, sizes, C, ndim, dtype)
    return {"steps": out, "eval": bn(xg.double()).detach()}


def tolerance(dtype, ref: torch.Tensor) -> dict:
    scale = float(ref.abs().max()) if ref.numel() else 1.0
    if dtype == torch.float64:
        return {"atol": 1e-10 * max(scale, 1.0), "rtol": 1e-10}
    if dtype == torch.float32:
        return {"atol": 1e-5 * max(scale, 1.0), "rtol": 1e-5}
    return {"atol": 2e-2 * max(scale, 1.0), "rtol": 2e-2}  # bfloat16 outputs


def compare(results_per_rank, sizes, case, ranks=None):
    """Concatenate ranks' outputs (in rank order) and sum their parameter gradients."""
    ranks = list(range(len(sizes))) if ranks is None else ranks
    dtype = case[2]
    ref = reference([sizes[r] for r in ranks], case)
    for step, rstep in enumerate(ref["steps"]):
        got = [results_per_rank[r]["steps"][step] for r in ranks]
        for key in ("y", "dx"):
            cat = torch.cat([g[key].double() for g in got])
            torch.testing.assert_close(
                cat,
                rstep[key],
                **tolerance(dtype, rstep[key]),
                msg=lambda m, k=key, s=step: f"{case[0]} step {s} {k}: {m}",
            )
        if case[4]:  # channels_last kept on non-empty ranks
            assert all(g["y_channels_last"] and g["dx_channels_last"] for g in got)
        for key in ("dw", "db"):
            if key in rstep:
                total = sum(g[key].double() for g in got)
                torch.testing.assert_close(total, rstep[key], **tolerance(dtype, rstep[key]))
        for key in ("rm", "rv"):
            if key in rstep:
                for g in got:  # every rank holds the global running statistics
                    torch.testing.assert_close(
                        g[key].double(), rstep[key], **tolerance(dtype, rstep[key])
                    )
        if "nbt" in rstep:
            assert all(int(g["nbt"]) == int(rstep["nbt"]) for g in got)
    if ref["eval"] is None:
        assert all(results_per_rank[r]["eval"] is None for r in ranks)
        return
    cat = torch.cat([results_per_rank[r]["eval"].double() for r in ranks])
    torch.testing.assert_close(cat, ref["eval"], **tolerance(dtype, ref["eval"]))


PARAMS = [(w, s, c) for w, cfg in WORLDS.items() for s in cfg["sizes"] for c in range(len(CASES))]


@pytest.mark.parametrize(
    ("world", "sizes_name", "case_index"),
    PARAMS,
    ids=[f"world{w}-{s}-{CASES[c][0]}" for w, s, c in PARAMS],
)
def test_matches_one_batchnorm_on_the_global_batch(world, sizes_name, case_index):
    results = world_results(world)
    case = CASES[case_index]
    compare(
        [r["cases"][(sizes_name, case[0])] for r in results],
        WORLDS[world]["sizes"][sizes_name],
        case,
    )


@pytest.mark.parametrize("world", sorted(WORLDS))
def test_process_group_pools_only_its_ranks(world):
    results = world_results(world)
    sizes = WORLDS[world]["sizes"]["uneven"]
    per_rank = [r["pairs"] for r in results]
    for first in range(0, world, 2):
        pair = list(range(first, min(first + 2, world)))
        compare(per_rank, sizes, CASES[2], ranks=pair)


@pytest.mark.parametrize("world", sorted(WORLDS))
def test_group_of_one_is_ordinary_batchnorm(world):
    results = world_results(world)
    sizes = WORLDS[world]["sizes"]["uneven"]
    for r in range(world):
        compare([res["single"] for res in results], sizes, CASES[0], ranks=[r])


@pytest.mark.parametrize("world", sorted(WORLDS))
def test_one_value_per_channel_in_the_world_raises_everywhere(world):
    for r in world_results(world):
        assert r["errors"]["one-value"].startswith("ValueError: Expected more than 1 value")
        assert r["errors"]["one-value-state-kept"]


@pytest.mark.parametrize("world", sorted(WORLDS))
def test_every_rank_empty(world):
    for r in world_results(world):
        shape, nbt, running_mean = r["all-empty"]
        assert shape == (0, 2, 5) and nbt == 1
        assert torch.equal(running_mean, torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("world", [w for w in sorted(WORLDS) if WORLDS[w].get("gradcheck")])
def test_gradcheck_across_processes(world):
    assert all(r["gradcheck"] for r in world_results(world))


def test_ddp_on_digits_equals_single_process_training():
    results = world_results(2)
    X, Y = digits()
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
    ).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    global_batch_size = 2 * 16
    for step in range(6):
        idx = torch.arange(step * global_batch_size, (step + 1) * global_batch_size)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X[idx]), Y[idx]).backward()
        opt.step()
    expected = model.state_dict()
    for r in results:
        assert r["ddp"].keys() == expected.keys()
        for k, v in expected.items():
            if v.is_floating_point():
                torch.testing.assert_close(r["ddp"][k], v, atol=1e-10, rtol=1e-10, msg=k)
            else:
                assert torch.equal(r["ddp"][k], v), k
    # the run moved the parameters (a test that cannot pass vacuously)
    torch.manual_seed(0)
    init = torch.nn.Linear(64, 32).double().weight
    assert (expected["0.weight"] - init).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["per-device", "sync"])
def test_chapter_single_process_equivalents_match_the_world_run(mode):
    """The book's experiment table runs in one process: PerDeviceBatchNorm for per-device BN
    in DDP, one BN on the whole batch for SyncBN. Both must equal the 2-process DDP runs
    (rank 0's parameters and buffers), and the returned state is the trained one, not the
    recalibrated one."""
    from bnlib import _distributed_demo as demo

    results = world_results(2)
    single = demo.train(0, 1, mode, seed=1, per=3, steps=4, devices=2, data=demo.digits())
    ranks = [r["demo"][mode]["tensors"] for r in results]
    fresh = demo.make_model(1)  # the same initialisation: the runs must have moved from it
    init = [t.detach() for t in (*fresh.parameters(), *fresh.buffers())]
    assert (
        max(float((a - b).abs().max()) for a, b in zip(single["tensors"], init, strict=True)) > 1e-3
    )
    for got, want in zip(ranks[0], single["tensors"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    if mode == "sync":  # every rank holds the same buffers without any broadcast
        for got, want in zip(ranks[1], single["tensors"], strict=True):
            torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    else:  # the buffer broadcast changes no parameter, and rank 0's buffers not at all
        quiet = results[0]["demo"]["per-device, no buffer sync"]["tensors"]
        for got, want in zip(quiet, single["tensors"], strict=True):
            torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def dist_nccl_available() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_nccl_available()


@pytest.mark.cuda
@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.device_count() >= 2 and dist_nccl_available()),
    reason="needs 2 GPUs and NCCL",
)
def test_nccl_world_on_cuda():
    results = run_world(_dist_worker.cuda_cases, 2, args=(WORLDS[2],), backend="nccl", timeout=300)
    sizes = WORLDS[2]["sizes"]["uneven"]
    for case in CASES:
        compare([r["cases"][("uneven", case[0])] for r in results], sizes, case)


def test_a_rank_that_skips_a_collective_fails_fast():
    results = world_results(2)
    err, seconds = results[0]["hang"]
    assert err is not None and seconds < 15, (err, seconds)
    assert results[1]["hang"][0] is None


def test_run_world_reports_the_failing_traceback():
    with pytest.raises(RuntimeError, match="rank 1 failed on purpose"):
        run_world(_dist_worker.fail, 2, timeout=60)


def test_run_world_deadline():
    with pytest.raises(TimeoutError, match="did not finish"):
        run_world(_dist_worker.hang_forever, 1, timeout=3)


# -- in one process, no process group --------------------------------------------------------


def make_pair(ndim, dtype=torch.float64, device="cpu", **kwargs):
    torch.manual_seed(0)
    ref = TORCH_BN[ndim](4, dtype=dtype, device=device, **kwargs)
    ours = SyncBatchNorm(4, dtype=dtype, device=device, **kwargs)
    if ref.affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-1, 1)
            ours.weight.copy_(ref.weight)
            ours.bias.copy_(ref.bias)
    return ref, ours


@pytest.mark.parametrize("ndim", [2, 3, 4, 5])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("device", DEVICES)
def test_without_process_group_it_is_batchnorm(ndim, momentum, device):
    ref, ours = make_pair(ndim, momentum=momentum, device=device)
    shape = (6, 4, *(3,) * (ndim - 2))
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1).to(device)
        xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        v = torch.randn(shape, dtype=torch.float64).to(device)
        yr, yo = ref(xr), ours(xo)
        (yr * v).sum().backward()
        (yo * v).sum().backward()
        assert_close(yo, yr)
        assert_close(xo.grad, xr.grad)
        assert_close(ours.weight.grad, ref.weight.grad)
        assert_close(ours.bias.grad, ref.bias.grad)
        assert_close(ours.running_mean, ref.running_mean)
        assert_close(ours.running_var, ref.running_var)
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)
    ref.eval(), ours.eval()
    assert_close(ours(x), ref(x))


def test_eval_without_running_stats_uses_the_local_batch():
    ref, ours = make_pair(2, track_running_stats=False)
    ref.eval(), ours.eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    assert_close(ours(x), ref(x))


def test_gradcheck_single_process():
    x = torch.randn(5, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: SyncBatchNormFunction.apply(x, w, b, 1e-5, None, True)[0], (x, w, b)
    )


def test_is_a_torch_batchnorm_and_repr():
    bn = SyncBatchNorm(3)
    assert isinstance(bn, torch.nn.modules.batchnorm._BatchNorm)
    assert "track_running_stats=True" in repr(bn)
    assert set(bn.state_dict()) == set(torch.nn.BatchNorm1d(3).state_dict())


@pytest.mark.parametrize(
    ("make_input", "exc", "match"),
    [
        (lambda: torch.randn(4), ValueError, "expected 2D to 5D input"),
        (lambda: torch.randn(2, 3, 1, 1, 1, 1), ValueError, "expected 2D to 5D input"),
        (lambda: torch.randn(4, 5), RuntimeError, "expected input with 3 channels"),
        (lambda: torch.ones(4, 3, dtype=torch.long), NotImplementedError, "floating point"),
        (lambda: torch.randn(1, 3), ValueError, "more than 1 value per channel"),
    ],
)
def test_bad_input_raises_and_keeps_state(make_input, exc, match):
    bn = SyncBatchNorm(3)
    bn(torch.randn(4, 3))
    before = state_snapshot(bn)
    with pytest.raises(exc, match=match):
        bn(make_input())
    assert_same_state(before, state_snapshot(bn))


def test_negative_eps_raises():
    bn = SyncBatchNorm(3, eps=-1.0)
    with pytest.raises(ValueError, match="eps must be positive"):
        bn(torch.randn(4, 3))


# -- merge_moments --------------------------------------------------------------------------


def _part_moments(parts, dtype):
    z = torch.zeros(2, dtype=dtype)
    count = torch.tensor([[float(len(p))] * 2 for p in parts], dtype=dtype)
    mean = torch.stack([p.mean(0) if len(p) else z for p in parts])
    m2 = torch.stack([((p - p.mean(0)) ** 2).sum(0) if len(p) else z for p in parts])
    return count, mean, m2


def test_merge_moments_is_exact_in_float64():
    sizes = [5, 0, 1, 12, 3]
    x = (
        torch.randn(sum(sizes), 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        + 1e4
    )
    n, mu, M = merge_moments(*_part_moments(torch.split(x, sizes), torch.float64))
    assert torch.equal(n, torch.full((2,), float(sum(sizes)), dtype=torch.float64))
    assert_close(mu, x.mean(0))
    assert_close(M / n, x.var(0, correction=0))


def test_merge_moments_float32_beats_the_sum_of_squares():
    """At mean 1e3 and sd 1 in float32: Chan's merge to ~1e-5, the naive merge far off."""
    sizes = [5, 0, 1, 12, 3]
    x = (
        torch.randn(sum(sizes), 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        + 1e3
    ).float()
    parts = torch.split(x, sizes)
    truth = x.double().var(0, correction=0)
    n, mu, M = merge_moments(*_part_moments(parts, torch.float32))
    chan_error = ((M / n).double() / truth - 1).abs().max()
    s1 = sum(p.sum(0) for p in parts)
    s2 = sum((p * p).sum(0) for p in parts)
    naive_error = (((s2 - s1 * s1 / n) / n).double() / truth - 1).abs().max()
    assert chan_error < 1e-4 and naive_error > 1e-2, (chan_error, naive_error)


@settings(
    max_examples=int(os.environ.get("BN_HYPOTHESIS_EXAMPLES", "40")), deadline=None, database=None
)
@given(
    sizes=st.lists(st.integers(0, 6), min_size=1, max_size=6).filter(lambda s: sum(s) > 0),
    channels=st.integers(1, 3),
    offset=st.floats(-1e3, 1e3),
    scale=st.floats(1e-2, 1e2),
    seed=st.integers(0, 2**16),
)
def test_merge_moments_property(sizes, channels, offset, scale, seed):
    """Any partition (empty parts included) merges to the moments of the whole, in float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), channels, generator=g, dtype=torch.float64) * scale + offset
    parts = torch.split(x, sizes)
    z = torch.zeros(channels, dtype=torch.float64)
    count = torch.tensor([[float(len(p))] * channels for p in parts], dtype=torch.float64)
    mean = torch.stack([p.mean(0) if len(p) else z for p in parts])
    m2 = torch.stack([((p - p.mean(0)) ** 2).sum(0) if len(p) else z for p in parts])
    n, mu, M = merge_moments(count, mean, m2)
    assert torch.equal(n, torch.full((channels,), float(sum(sizes)), dtype=torch.float64))
    # tolerances relative to the data's magnitude (|offset| + scale), as rounding allows
    size = abs(offset) + scale
    torch.testing.assert_close(mu, x.mean(0), atol=1e-12 * size, rtol=0)
    var = x.var(0, correction=0)
    torch.testing.assert_close(M / n, var, atol=1e-10 * size * scale, rtol=1e-10)


def test_merge_moments_shape_error():
    with pytest.raises(ValueError, match="same 2D shape"):
        merge_moments(torch.ones(2, 3), torch.ones(2, 3), torch.ones(3))


# -- convert_sync_batchnorm ------------------------------------------------------------------


def test_convert_keeps_objects_and_sharing():
    shared = torch.nn.BatchNorm2d(4)
    inner = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), shared)
    model = torch.nn.Sequential(
        inner,
        shared,
        torch.nn.BatchNorm1d(2, affine=False),
        torch.nn.BatchNorm3d(5, track_running_stats=False),
    )
    model[2].eval()
    model[0][1].weight.requires_grad_(False)
    params = {n: p for n, p in shared.named_parameters()}
    buffers = {n: b for n, b in shared.named_buffers()}
    before = copy.deepcopy(model.state_dict())
    out = convert_sync_batchnorm(model)
    assert out is model
    new = model[1]
    assert isinstance(new, SyncBatchNorm) and model[0][1] is new  # shared stays shared
    for n, p in new.named_parameters():
        assert p is params[n]
    for n, b in new.named_buffers():
        assert b is buffers[n]
    assert not new.weight.requires_grad
    assert isinstance(model[2], SyncBatchNorm) and not model[2].training
    assert model[2].weight is None and not model[2].affine
    assert isinstance(model[3], SyncBatchNorm) and model[3].running_mean is None
    assert model.state_dict().keys() == before.keys()
    for k in before:
        assert torch.equal(model.state_dict()[k], before[k])
    root = torch.nn.BatchNorm1d(3)
    converted = convert_sync_batchnorm(root)
    assert isinstance(converted, SyncBatchNorm) and converted.weight is root.weight


def test_convert_bnlib_layers():
    # bnlib.nn's layers subclass torch's BatchNorm, so they are converted like torch's
    assert issubclass(bnlib.nn.BatchNorm2d, torch.nn.modules.batchnorm._BatchNorm)
    model = torch.nn.Sequential(bnlib.nn.BatchNorm2d(3, dtype=torch.float64))
    weight, running_var = model[0].weight, model[0].running_var
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    y_before = copy.deepcopy(model)(x)
    convert_sync_batchnorm(model)
    assert isinstance(model[0], SyncBatchNorm) and model[0].weight is weight
    assert model[0].running_var is running_var
    assert_close(model(x), y_before)


def test_api_page_lists_every_public_name(repo_root):
    import re

    import bnlib.distributed

    text = (repo_root / "book" / "api.md").read_text(encoding="utf-8")
    section = text.split(".. currentmodule:: bnlib.distributed", 1)[1].split("```", 1)[0]
    listed = re.findall(r"^   (\w+)$", section, flags=re.MULTILINE)
    assert sorted(listed) == sorted(bnlib.distributed.__all__)
    assert ".. automodule:: bnlib.distributed" in section


@pytest.mark.parametrize("offset", [0.0, 1e2, 1e4])
def test_float32_accuracy_matches_torch(offset):
    """float32 at x = offset + N(0, 1): errors against float64 no worse than 2x torch's own."""
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(64, 4, 5, 5, generator=g, dtype=torch.float64) + offset
    v = torch.randn(x64.shape, generator=g, dtype=torch.float64)

    def run(module, x):
        x = x.clone().requires_grad_()
        y = module(x)
        (y * v.to(x.dtype)).sum().backward()
        return y.double(), x.grad.double()

    y_ref, dx_ref = run(torch.nn.BatchNorm2d(4).double(), x64)
    y_torch, dx_torch = run(torch.nn.BatchNorm2d(4), x64.float())
    y_ours, dx_ours = run(SyncBatchNorm(4), x64.float())
    for ours, theirs, ref in [(y_ours, y_torch, y_ref), (dx_ours, dx_torch, dx_ref)]:
        assert (ours - ref).abs().max() <= 2 * (theirs - ref).abs().max() + 1e-7


def test_one_collective_per_forward_and_per_backward(monkeypatch):
    """A simulated world of two identical ranks: one all_gather per forward, one all_reduce per
    backward, and the result is BN on the batch seen twice."""
    import bnlib.distributed as bd

    calls: list[str] = []

    def all_gather(parts, local, group=None):
        calls.append("all_gather")
        for p in parts:
            p.copy_(local)

    def all_reduce(t, group=None):
        calls.append("all_reduce")
        t.mul_(2)

    monkeypatch.setattr(bd, "_group_size", lambda group: 2)
    monkeypatch.setattr(bd.dist, "all_gather", all_gather)
    monkeypatch.setattr(bd.dist, "all_reduce", all_reduce)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 2, 4, generator=g, dtype=torch.float64)
    bn = SyncBatchNorm(2, dtype=torch.float64)
    y = bn(x)
    (y * v).sum().backward()
    assert calls == ["all_gather", "all_reduce"]

    ref = torch.nn.BatchNorm1d(2, dtype=torch.float64)
    x2 = torch.cat([x.detach(), x.detach()]).requires_grad_(True)
    y2 = ref(x2)
    (y2 * torch.cat([v, v])).sum().backward()
    assert_close(y.detach(), y2[:3].detach())
    assert x.grad is not None and x2.grad is not None
    assert_close(x.grad, x2.grad[:3])
    assert_close(bn.running_var, ref.running_var)


def test_chapter_train_perturb_changes_the_start_by_the_given_relative_amount():
    """``perturb`` is the chapter's sensitivity test: every initial parameter is scaled by
    1 + perturb * N(0, 1). Zero steps keep the initial state, so the change is measurable
    directly; perturb=0 must leave the run bit for bit as it was."""
    from bnlib import _distributed_demo as demo

    data = demo.digits()
    kw = {"seed": 2, "per": 2, "steps": 0, "devices": 2, "data": data}
    plain = demo.train(0, 1, "sync", **kw)["tensors"]
    same = demo.train(0, 1, "sync", perturb=0.0, **kw)["tensors"]
    moved = demo.train(0, 1, "sync", perturb=1e-6, **kw)["tensors"]
    assert all(torch.equal(a, b) for a, b in zip(plain, same, strict=True))
    weight, again = plain[0], moved[0]  # the first linear layer's weight
    rel = ((again - weight) / weight).abs()
    assert 1e-8 < float(rel.max()) < 1e-5 and float(rel.median()) > 1e-8
    assert torch.equal(plain[-1], moved[-1])  # buffers (num_batches_tracked) untouched


@pytest.mark.parametrize(
    ("dtype", "payload_dtype"),
    [
        (torch.float64, torch.float64),
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
    ],
)
def test_forward_message_is_2c_plus_2_numbers_in_the_moments_dtype(
    monkeypatch, dtype, payload_dtype
):
    """The all_gather sends C means, C values of M2 and the count once (two exact halves): 2C + 2
    numbers, float32 unless the input is float64; the all_reduce sends 2C in the same dtype."""
    import bnlib.distributed as bd

    sent: list[tuple[str, int, torch.dtype]] = []

    def all_gather(parts, local, group=None):
        sent.append(("all_gather", local.numel(), local.dtype))
        for p in parts:
            p.copy_(local)

    def all_reduce(t, group=None):
        sent.append(("all_reduce", t.numel(), t.dtype))
        t.mul_(2)

    monkeypatch.setattr(bd, "_group_size", lambda group: 2)
    monkeypatch.setattr(bd.dist, "all_gather", all_gather)
    monkeypatch.setattr(bd.dist, "all_reduce", all_reduce)
    C = 5
    x = torch.randn(4, C, 3, generator=torch.Generator().manual_seed(0)).to(dtype)
    x.requires_grad_(True)
    SyncBatchNorm(C)(x).sum().backward()
    assert sent == [("all_gather", 2 * C + 2, payload_dtype), ("all_reduce", 2 * C, payload_dtype)]


def test_count_beyond_float32_integers_is_exact():
    """A float32 message carries counts above 2**24 (not all exact in one float32) without loss."""
    import bnlib.distributed as bd

    C = 2
    n_big = 2**24 + 1  # float32(2**24 + 1) == 2**24
    parts = torch.zeros(2, 2 * C + 2, dtype=torch.float32)
    for r, n in enumerate((n_big, 3)):
        parts[r, 2 * C] = n // bd._COUNT_SPLIT
        parts[r, 2 * C + 1] = n % bd._COUNT_SPLIT
    count, _, _ = bd._merge_payloads(parts, C)
    assert count.dtype == torch.float64
    assert count.tolist() == [float(n_big + 3)] * C


def test_training_step_reads_no_tensor_on_the_host(monkeypatch):
    """No .item() / int(tensor) in forward, backward or the running-statistics update: on CUDA
    each would stall the stream once per layer. (Before, the global count was read twice.)"""

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was read on the host")

    x = torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
    for momentum in (0.1, None):
        bn = SyncBatchNorm(3, momentum=momentum)
        with monkeypatch.context() as m:
            for name in ("item", "__int__", "__float__", "__index__"):
                m.setattr(torch.Tensor, name, refuse)
            bn(x).sum().backward()
        ref = torch.nn.BatchNorm1d(3, momentum=momentum)
        ref(x.detach())
        torch.testing.assert_close(bn.running_mean, ref.running_mean)
        torch.testing.assert_close(bn.running_var, ref.running_var)


@pytest.mark.parametrize(("platform", "name"), [("linux", "lo"), ("darwin", "lo0")])
def test_gloo_is_pinned_to_the_platforms_loopback(monkeypatch, platform, name):
    import bnlib.distributed as bd

    monkeypatch.setattr(bd.sys, "platform", platform)
    assert bd._loopback_interface() == name
