"""Run nbval on every (CPU setting, notebook) pair, a few at a time.

`make nbval` used to start one pytest per setting, each over all notebooks. With two
settings on two cores the slower one (baseline, whose MKL_CBWR=COMPATIBLE is ~2.5x slower
on matrix products) ran on alone for minutes after the other had finished, one core idle.
Here every pair is its own job and `--workers` processes take the next job as soon as one
finishes, so the cores stay busy until the end. Jobs start with the notebooks that took
longest in the last run on this checkout (_build/nbval-durations.json), or, on a fresh
checkout, with the largest notebook files (the figures and long outputs come from the
long computations).

Usage: nbval_pool.py --workers 2 --setting NAME "VAR=VALUE ..." [--setting ...] NB... -- ARGS
ARGS, everything after `--`, are pytest's (nbval's flags).
Exit status 0 if every job passed. Per-job logs go to _build/nbval-<setting>-<notebook>.log.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BUILD = Path("_build")
DURATIONS = BUILD / "nbval-durations.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--setting", nargs=2, action="append", metavar=("NAME", "ENV"), default=[])
    parser.add_argument("notebooks", nargs="+")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args, pytest_args = parser.parse_args(argv[:cut]), argv[cut + 1 :]
    if not args.setting:
        parser.error("give at least one --setting")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    BUILD.mkdir(exist_ok=True)
    last = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}

    jobs = [(name, env, nb) for nb in args.notebooks for name, env in args.setting]

    def expected(job: tuple[str, str, str]) -> tuple[float, int]:
        name, _, nb = job
        return (last.get(f"{name} {nb}", -1.0), Path(nb).stat().st_size)

    jobs.sort(key=expected, reverse=True)

    def run(job: tuple[str, str, str]) -> tuple[str, str, int, float]:
        name, env, nb = job
        log = BUILD / f"nbval-{name}-{Path(nb).stem}.log"
        extra = dict(item.split("=", 1) for item in shlex.split(env))
        t0 = time.monotonic()
        with log.open("w") as out:
            rc = subprocess.call(
                [sys.executable, "-m", "pytest", *pytest_args, nb],
                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **extra},
            )  # fmt: skip
        seconds = time.monotonic() - t0
        print(f"[nbval {name} {nb}: exit {rc}, {seconds:.0f} s]", flush=True)
        return name, nb, rc, seconds

    with ThreadPoolExecutor(args.workers) as pool:
        results = list(pool.map(run, jobs))
    last.update({f"{n} {nb}": round(s, 1) for n, nb, _, s in results})
    DURATIONS.write_text(json.dumps(last, indent=1))
    failed = [(n, nb) for n, nb, rc, _ in results if rc != 0]
    for name, nb in failed:
        print(f"===== nbval [{name}] {nb} FAILED =====")
        print((BUILD / f"nbval-{name}-{Path(nb).stem}.log").read_text())
    for name, _ in args.setting:
        mine = [r for r in results if r[0] == name]
        print(f"[nbval {name}: {sum(r[2] != 0 for r in mine)} of {len(mine)} notebooks failed,"
              f" {sum(r[3] for r in mine):.0f} s in all]")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
