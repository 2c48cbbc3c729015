"""Benchmark the launch path: what a job costs on top of the same run in this process, and a requeue's turnaround.

    slurm/local_cluster.sh up && python bench/launch.py      # SLURM figures need a cluster; without one, local only

Figures (wall seconds, and the ratio to the in-process baseline measured in the same run):
  - baseline: a tiny k-NN evaluation (3 digit classes, a 2-block ViT) run in this process by ``eval.run.main``;
  - the same command through ``--launcher local`` (submitit's local executor: a new Python process) and
    ``--launcher slurm --wait`` (sbatch, scheduling, the job, submitit's result file);
  - requeue turnaround on SLURM: a tiny pretraining job is signalled as preempted once its first checkpoint is
    on disk; the figures are the time from the signal until the requeued job runs again, and the time from
    submission until the job (preempted once) has finished.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bam import build_backbone  # noqa: E402
from bam.formats import backbone_checkpoint  # noqa: E402
from eval.run import main as eval_main  # noqa: E402
from slurm.launch import submit, wait_for  # noqa: E402
from slurm.profiles import load_profile  # noqa: E402
from tests.conftest import TINY_VIT, make_digit_folders, tiny_args  # noqa: E402


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the front door's own table
        assert eval_main(argv) == 0
    return time.perf_counter() - start


def cluster_answers() -> bool:
    try:
        done = subprocess.run(["sinfo", "-h", "-o", "%a"], capture_output=True, text=True, timeout=10)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and "up" in done.stdout


def requeue_turnaround(work: Path, images: Path) -> tuple[float, float]:
    out = work / "requeue"
    start = time.perf_counter()
    jobs = submit("pretrain", tiny_args(images, out, epochs=8), out, "slurm", load_profile("local", time_min=30))
    while not (out / "checkpoint.pth").is_file():
        time.sleep(0.05)
    signalled = time.perf_counter()
    jobs[0]._interrupt()
    running_again = None
    while running_again is None:
        state = subprocess.run(["squeue", "-h", "-j", jobs[0].job_id, "-o", "%T"], capture_output=True,
                               text=True).stdout.strip()
        log = jobs[0].stdout() or ""
        if state == "RUNNING" and log.count("Starting with JobEnvironment") >= 2:
            running_again = time.perf_counter()
        time.sleep(0.2)
    assert wait_for(jobs) == [None]
    return running_again - signalled, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = make_digit_folders(work / "digits")
        torch.manual_seed(0)
        torch.save(backbone_checkpoint(build_backbone("vit_small_patch16_224", **TINY_VIT)), work / "tiny.pth")
        argv = ["--task", "knn", "--data", str(data), "--checkpoint", str(work / "tiny.pth"), "--image-size", "32",
                "--k", "5,20", "--num-workers", "0"]
        ways = {"in-process (baseline)": [], "--launcher local": ["--launcher", "local"]}
        if cluster_answers():
            ways["--launcher slurm --wait"] = ["--launcher", "slurm", "--wait", "--profile", "local"]
        times = {name: [] for name in ways}
        for r in range(args.repeats):
            for name, extra in ways.items():
                out = work / f"{name.split()[0].strip('-')}{r}"
                times[name].append(timed([*argv, "--output-dir", str(out), *extra]))
        base = min(times["in-process (baseline)"])
        print(f"tiny k-NN evaluation, best of {args.repeats}:")
        for name, t in times.items():
            print(f"  {name:28s} {min(t):6.2f} s   x{min(t) / base:.1f}")
        if "--launcher slurm --wait" in ways:
            back, total = requeue_turnaround(work, data / "train")  # pretraining ignores the class folders
            print(f"SLURM requeue: {back:.1f} s from the preemption signal to the job running again; "
                  f"{total:.1f} s from submission to the end of the whole 8-epoch job")
        else:
            print("no SLURM cluster answers: SLURM figures skipped (slurm/local_cluster.sh up)")


if __name__ == "__main__":
    main()
