"""Time bnlib's benchmark under Numba's threading layers: is a second OpenMP pool in the way?

torch brings its own OpenMP runtime (torch/lib/libgomp.so.1); Numba's "omp" threading layer,
which bnlib.kernels uses by default, loads the system's libgomp, a second copy with a second
pool of threads. Idle threads of one pool that spin can slow the other's work. This script runs
`bnlib.bench` (2 threads, train and eval, two shapes) in a fresh process for each of

- ``default``: Numba's choice (OpenMP where available), both runtimes spinning as they like;
- ``workqueue``: ``NUMBA_THREADING_LAYER=workqueue``, Numba's own pool, no second OpenMP;
- ``passive``: ``OMP_WAIT_POLICY=PASSIVE``, both OpenMP runtimes put idle threads to sleep,

and prints the median times side by side, with the OpenMP libraries each process had loaded.
Usage: ``python tools/threading_layers.py [--repeats 15] [--threads 2]`` (Linux).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CONFIGS = {
    "default": {},
    "workqueue": {"NUMBA_THREADING_LAYER": "workqueue"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
}
SHAPES = ["64x64x32x32", "256x1024"]

CHILD = """
import json, sys
import numba
from bnlib import bench
rows = bench.main(sys.argv[1:] + ["--json"])
libs = sorted({line.split()[-1].rsplit("/", 2)[-2] + "/" + line.split()[-1].rsplit("/", 1)[-1]
               for line in open("/proc/self/maps") if "gomp" in line or "libiomp" in line})
print(json.dumps({"layer": numba.threading_layer(), "openmp": libs}))
"""


def run(config: dict[str, str], argv: list[str]) -> tuple[list[dict], dict]:
    env = {**os.environ, **config}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, *argv], env=env, capture_output=True, text=True, check=True
    ).stdout
    bench_json, info = out.rsplit("\n{", 1)  # the bench's JSON, then this script's line
    return json.loads(bench_json)["results"], json.loads("{" + info)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    argv = ["--repeats", str(args.repeats), "--threads", str(args.threads)]
    for s in SHAPES:
        argv += ["--shape", s]
    results = {}
    for name, config in CONFIGS.items():
        rows, info = run(config, argv)
        results[name] = {
            (r["mode"], "x".join(map(str, r["shape"])), r["layout"], r["implementation"]): r
            for r in rows
        }
        print(f"{name:9}: Numba layer {info['layer']}, OpenMP loaded: {', '.join(info['openmp'])}")
    keys = list(results["default"])
    head = (
        f"{'mode':5} {'shape':12} {'layout':13} {'implementation':17}"
        + "".join(f" {n + ' ms':>13}" for n in CONFIGS)
        + "".join(f" {n[:7] + ' copy':>12}" for n in CONFIGS)
    )
    print(
        f"median times, {args.threads} threads, {args.repeats} repeats;"
        " copy in GB/s ('!': an inconsistent case)"
    )
    print(head)
    print("-" * len(head))
    for k in keys:
        cells = "".join(f" {results[n][k]['median_ms']:13.3f}" for n in CONFIGS)
        copies = "".join(
            f" {results[n][k]['copy_GBps']:10.1f}" + ("  " if results[n][k]["consistent"] else " !")
            for n in CONFIGS
        )
        print(f"{k[0]:5} {k[1]:12} {k[2]:13} {k[3]:17}{cells}{copies}")


if __name__ == "__main__":
    main()
