"""Benchmark every task on 2 processes against 1, and the cost of the save a preemption signal asks for.

    python bench/distributed.py                    # every task on its built-in sample (tens of minutes on 2 cores)
    python bench/distributed.py --quick            # the tests' few-second settings (tests/eval/test_task_contract.py)
    python bench/distributed.py --tasks knn,linear

Figures:
  - per task, the wall time of ``eval/run.py --task T`` in one process and under ``torchrun --nproc_per_node 2``
    (gloo), both as new Python processes (imports included) with one thread per process (torchrun's setting), and
    their ratio. On a 2-core machine that is 1 core against 2: the ratio shows what the distributed paths cost and
    save on CPUs, not the speed-up 2 GPUs give;
  - the checkpoint at a signal: the time of one fine-tuning save (``bam.checkpoint.save_atomic`` of the training
    state: weights, AdamW state, generators) of a ViT-S/16 classifier, against the time of one training step of it
    (a batch of 32 at 224 pixels): the per-step overhead of a signal is that save, once; the per-step cost of
    watching for one (``SaveNow.due()``) is also measured, with and without a process group.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bam import training  # noqa: E402
from bam.backbones import build_backbone  # noqa: E402
from bam.checkpoint import save_atomic  # noqa: E402
from eval.tasks import TASKS  # noqa: E402
from tests.eval.test_task_contract import TINY  # noqa: E402
from transfer.classification.finetune import Classifier  # noqa: E402


def run_task(task: str, extra: list[str], out: Path, cache: Path, processes: int) -> float:
    argv = ["--task", task, "--output-dir", str(out), "--cache-dir", str(cache), *extra]
    if processes == 1:
        cmd = [sys.executable, str(REPO / "eval" / "run.py"), *argv]
    else:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
               str(port), str(REPO / "eval" / "run.py"), *argv]
    start = time.perf_counter()  # one thread per process, as torchrun sets it: the ratio compares like with like
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{task} on {processes} process(es) failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def signal_overhead() -> dict[str, float]:
    torch.manual_seed(0)
    model = Classifier(build_backbone("vit_small_patch16_224"), 1000, "avg")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images, labels = torch.randn(32, 3, 224, 224), torch.randint(0, 1000, (32,))
    step_times = []
    for _ in range(3):
        start = time.perf_counter()
        training.optimizer_step(torch.nn.functional.cross_entropy(model(images), labels), optimizer)
        step_times.append(time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as tmp:
        saves = []
        for _ in range(3):
            start = time.perf_counter()
            save_atomic(training.training_state(model, optimizer, None, epoch=0, iteration=1), Path(tmp) / "c.pth")
            saves.append(time.perf_counter() - start)
        size = (Path(tmp) / "c.pth").stat().st_size
    with training.SaveNow() as save_now:
        start = time.perf_counter()
        for _ in range(10_000):
            save_now.due()
        due = (time.perf_counter() - start) / 10_000
    return {"step_s": min(step_times), "save_s": min(saves), "checkpoint_mb": size / 2**20, "due_s": due}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks")
    parser.add_argument("--quick", action="store_true", help="the tests' tiny settings instead of the sample's")
    parser.add_argument("--no-signal", action="store_true", help="skip the checkpoint-at-a-signal figures")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        for task in args.tasks.split(","):
            extra = TINY[task] if args.quick else []
            run_task(task, extra, Path(tmp) / f"{task}-warm", cache, 1)  # generates the sample (not timed)
            one = run_task(task, extra, Path(tmp) / f"{task}-1", cache, 1)
            two = run_task(task, extra, Path(tmp) / f"{task}-2", cache, 2)
            print(f"{task:9s} 1 process {one:7.1f} s   2 processes {two:7.1f} s   2/1 = {two / one:.2f}", flush=True)
    if not args.no_signal:
        s = signal_overhead()
        print(f"signal checkpoint (ViT-S/16 classifier + AdamW, {s['checkpoint_mb']:.0f} MB): save {s['save_s']:.2f} s "
              f"= {s['save_s'] / s['step_s']:.2f} x one training step of 32 images ({s['step_s']:.2f} s), once per "
              f"signal; watching for a signal: {s['due_s'] * 1e6:.1f} us per step (one process)")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
