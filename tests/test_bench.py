"""python -m bnlib.bench: a tiny run of every case kind, and the CLI's argument checks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bnlib import bench


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_tiny_run_json(capsys, keep_threads):
    argv = ["--repeats", "1", "--shape", "4x3x5x5", "--shape", "6x4", "--loops", "none"]
    rows = bench.main([*argv, "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["results"] == rows and out["loops"] == []
    assert out["info"]["repeats"] == 1
    # train and eval, for NCHW, NHWC and (N, D): three implementations each
    cases = {(tuple(r["shape"]), r["layout"], r["mode"]) for r in rows}
    assert len(cases) == 6
    for r in rows:
        assert r["median_ms"] > 0 and r["pct_roofline"] > 0 and r["copy_GBps"] > 0
        assert r["faults_per_call"] >= 0
        if r["implementation"] == bench.NATIVE:
            assert r["x_native"] == 1.0
    names = {r["implementation"] for r in rows}
    assert {"bnlib.nn", bench.NATIVE} <= names


def test_table(capsys, keep_threads):
    argv = ["--repeats", "1", "--threads", "1", "--mode", "eval", "--shape", "3x2x4"]
    bench.main([*argv, "--loops", "none"])
    out = capsys.readouterr().out
    assert "threads 1" in out and "% roofline" in out and "x native" in out
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--repeats", "0"], "must be >= 1, got 0"),
        (["--repeats", "-3"], "must be >= 1, got -3"),
        (["--threads", "0"], "must be >= 1, got 0"),
        (["--threads", "two"], "expected an integer >= 1, got 'two'"),
        (["--shape", "5"], "2 to 5 positive sizes"),
        (["--shape", "4xa"], "shape must look like"),
        (["--mode", "fast"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        bench.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("usage: python -m bnlib.bench")


def test_help_shows_defaults_and_the_module_name():
    out = subprocess.run(
        [sys.executable, "-m", "bnlib.bench", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert out.startswith("usage: python -m bnlib.bench")
    assert "(default: 15)" in out and "(default: both)" in out


def test_rows_carry_the_spread_and_the_reference(keep_threads):
    rows = bench.bench_case((4, 3, 5, 5), False, "train", repeats=5, warmup=1, reference_GBps=1.0)
    for r in rows:
        assert r["q1_ms"] <= r["median_ms"] <= r["q3_ms"]
        assert r["reference_GBps"] == 1.0 and isinstance(r["consistent"], bool)


def test_copy_bandwidth_median_between_its_quartiles():
    bw = bench.copy_bandwidth(numel=2**12, repeats=5)
    assert 0 < bw["q1_GBps"] <= bw["GBps"] <= bw["q3_GBps"]


def test_a_case_whose_copy_is_far_slower_than_the_reference_is_not_consistent(keep_threads):
    """A reference copy more than AGREE times faster than the case's own copy means the machine
    slowed down during the case: no row of it may count as a measurement to judge targets by.
    One repeat: quartiles equal, so only the reference decides."""
    slow = bench.bench_case((4, 3), False, "eval", repeats=1, warmup=1, reference_GBps=1e9)
    fine = bench.bench_case((4, 3), False, "eval", repeats=1, warmup=1, reference_GBps=1e-9)
    assert not any(r["consistent"] for r in slow)
    assert all(r["consistent"] for r in fine)


def test_table_marks_inconsistent_rows(capsys, monkeypatch, keep_threads):
    monkeypatch.setattr(
        bench, "copy_bandwidth", lambda **kw: dict.fromkeys(("GBps", "q1_GBps", "q3_GBps"), 1e9)
    )
    bench.main(["--repeats", "1", "--threads", "1", "--mode", "eval", "--shape", "3x2"])
    out = capsys.readouterr().out
    assert out.count(" !\n") == 3  # one row per implementation
    assert "do not judge a target from these rows" in out


@pytest.mark.parametrize("name", list(bench.LOOPS))
def test_loop_models_are_the_same_network(name):
    """The two loop models start from the same weights, differ only in their BN classes, and
    compute the same loss and gradients (so the loop rows time the same work)."""
    theirs, ours = bench.loop_models(name)
    bn = torch.nn.modules.batchnorm._BatchNorm
    bn_theirs = [m for m in theirs.modules() if isinstance(m, bn)]
    bn_ours = [m for m in ours.modules() if isinstance(m, bn)]
    assert bn_theirs and len(bn_theirs) == len(bn_ours)
    assert all(type(m).__module__ == "torch.nn.modules.batchnorm" for m in bn_theirs)
    assert all(type(m).__module__ == "bnlib.nn" for m in bn_ours)
    _, shape = bench.LOOPS[name]
    x = torch.randn((4, *shape[1:]), generator=torch.Generator().manual_seed(0))
    target = torch.arange(4) % 10
    losses, grads = [], []
    for model in (theirs, ours):
        loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    assert abs(losses[0] - losses[1]) < 1e-5
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-5)


def test_loop_rows(capsys, keep_threads):
    argv = ["--repeats", "1", "--threads", "1", "--mode", "train", "--shape", "3x2x4"]
    rows = bench.main([*argv, "--loops", "mlp 256x784"])
    loops = [r for r in rows if "loop" in r]
    assert [r["implementation"] for r in loops] == ["bnlib.nn", bench.NATIVE]
    assert all(r["median_ms"] > 0 and r["mode"] == "train" for r in loops)
    assert all(r["faults_per_call"] >= 0 for r in loops)
    assert loops[1]["x_native"] == 1.0
    assert "whole loop" in capsys.readouterr().out


def test_faults_count_fresh_pages():
    """The fault counter sees pages taken from the system: writing a new 64 MiB tensor (above
    glibc's largest mmap threshold, 32 MiB, so always fresh memory) faults at least 32 times
    (16384 with 4 KiB pages, 32 with 2 MiB huge pages)."""
    f0 = bench._faults()
    buf = torch.ones(1 << 24)
    assert bench._faults() - f0 >= 32
    del buf
