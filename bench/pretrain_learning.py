"""Benchmark what the default pretraining run learns and how long it takes (several minutes on 2 CPU cores).

    python bench/pretrain_learning.py                # the default run, then the small run of the learning test
    python bench/pretrain_learning.py --skip-small   # the default run only

1. ``python pretrain/main.py`` with no flags (a small ViT on the built-in sample, 16 epochs), in a new process
   whose working folder and ``$BAM_CACHE`` are empty temporary folders, so nothing resumes and the sample is
   generated as on a first run. Printed: the k-NN top-1 of the random init (the baseline, measured by the run
   itself before training) and after training, and the wall time of the process, measured here.
2. The same for the smaller run of tests/pretrain/test_learning.py (``SMALL_RUN``), with the torch threads the
   test uses, so the test's margin can be read against its measured figures.

Wall times depend on what else the machine runs: the load average before and after each run is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.pretrain.test_learning import SMALL_RUN, SMALL_RUN_THREADS  # noqa: E402


def load() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def run(title: str, flags: list[str], env: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory(prefix="bench_pretrain_") as tmp:
        work = Path(tmp)
        command = [sys.executable, str(REPO / "pretrain" / "main.py"), *flags]
        shown = " ".join([*(f"{k}={v}" for k, v in env.items()), "python pretrain/main.py", shlex.join(flags)])
        print(f"{title}\n   command: {shown.strip()}", flush=True)
        before_load = load()
        start = time.perf_counter()
        done = subprocess.run(command, cwd=work, env={**os.environ, **env, "BAM_CACHE": str(work / "cache")})
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"the run failed with exit status {done.returncode}")
        out = work / (flags[flags.index("--output-dir") + 1] if "--output-dir" in flags else "outputs/pretrain")
        res = json.loads((out / "results.json").read_text())
    before, after = res["knn_top1_before"], res["knn_top1_after"]
    print(f"   k-NN top-1 (k=20, {res['config']['global_size']}px, 400 validation crops): random init {before:.2f}% "
          f"-> after {res['epochs']} epochs {after:.2f}%  ({after - before:+.2f} points)")
    print(f"   wall time of the process {wall:6.1f} s (training, k-NN, setup and imports; the run's own count "
          f"{res['seconds']:.1f} s)   load average before {before_load}, after {load()}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-small", action="store_true", help="only the default run")
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores, python {sys.version.split()[0]}")
    run("1. the default run, no flags", [], {})
    if not args.skip_small:
        threads = {"OMP_NUM_THREADS": str(SMALL_RUN_THREADS)}
        run(f"\n2. the learning test's small run ({SMALL_RUN_THREADS} torch thread)", SMALL_RUN, threads)


if __name__ == "__main__":
    main()
