"""The trainable evaluation tasks as tiny runs to stop part-way and resume: one command line each, run once
uninterrupted in the test's process and once stopped (SIGKILL: tests/eval/test_run_killed.py; a preempted SLURM job:
tests/slurm/test_real_cluster.py), then compared bit for bit."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

from bam.samples import coco as coco_sample

from ..conftest import make_digit_folders
from .test_run_coco import FAST

TRAINABLE = ("finetune", "linear", "semisup", "coco")
# 180 training digits in batches of 2: an epoch of 90 steps (semisup's half: 45) takes about a second on one thread;
# 3 epochs: a run stopped once its first checkpoint (epoch 1's) is written has two to go
DIGITS = {"train_per_class": 60, "val_per_class": 4}
EPOCHS = 3
FINETUNE = ["--epochs", str(EPOCHS), "--batch-size", "2", "--warmup-epochs", "1", "--image-size", "32",
            "--num-workers", "0", "--amp", "none"]  # MAE's fp16 (the default) needs CUDA
# "done": optimizer steps done at the checkpoint a "resuming" line names, from the line's numbers and steps per epoch
_FINETUNE_RESUMED = (r"resuming fine-tuning from \S+ \(epoch (\d+) done(?:, (\d+) steps into epoch \d+)?\)",
                     lambda m, per_epoch: int(m[1]) * per_epoch + int(m[2] or 0))


@dataclass(frozen=True)
class Trainable:
    """One task's tiny run: ``argv`` without ``--output-dir``; the file it resumes from, relative to the output
    folder; its length in optimizer steps."""

    task: str
    argv: list[str]
    checkpoint: str
    steps_per_epoch: int
    total_steps: int

    def command(self, out: Path) -> list[str]:
        return [*self.argv, "--output-dir", str(out)]

    def steps_done(self, state: dict) -> int:
        """Optimizer steps behind a checkpoint of this task."""
        if self.task == "coco":
            return state["iter"]
        if self.task == "linear":
            return state["loop"]["epoch"] * self.steps_per_epoch + state["loop"]["iteration"]
        return (state["epoch"] + 1) * self.steps_per_epoch + state.get("iteration", 0)

    def resumed_at(self, log: str) -> list[int]:
        """Steps done at each checkpoint that ``log`` says a run resumed from."""
        pattern, done = {
            "linear": (r"resuming the linear probes from \S+ \(epoch (\d+), step (\d+)\)",
                       lambda m, per_epoch: (int(m[1]) - 1) * per_epoch + int(m[2])),
            "coco": (r"resuming detection training from \S+ \(iteration (\d+)\)", lambda m, per_epoch: int(m[1])),
        }.get(self.task, _FINETUNE_RESUMED)
        return [done(m, self.steps_per_epoch) for m in re.finditer(pattern, log)]

    def weights(self, out: Path) -> dict[str, torch.Tensor]:
        """The trained weights in the run's last checkpoint (the linear heads for ``linear``)."""
        state = torch.load(out / self.checkpoint, weights_only=True)
        return state["loop"]["grid"] if self.task == "linear" else state["model"]

    def assert_same_outcome(self, whole: Path, resumed: Path) -> None:
        """Bit-equal weights, equal metrics and per-epoch figures, the same log."""
        a, b = self.weights(whole), self.weights(resumed)
        assert a.keys() == b.keys()
        for k, v in a.items():
            assert torch.equal(v, b[k]), k
        ra, rb = (json.loads((d / "results.json").read_text()) for d in (whole, resumed))
        for key in ("metrics", "history", "heads", "subsets"):
            assert ra.get(key) == rb.get(key), key
        log = Path(self.checkpoint).parent / "log.jsonl"
        assert (whole / log).read_text() == (resumed / log).read_text()


def trainable(task: str, root: Path, checkpoint: Path) -> Trainable:
    """``task``'s tiny run on data made under ``root`` (the tiny ViT ``checkpoint`` as its backbone)."""
    if task == "coco":
        data = root / "coco"
        # 6 training images in batches of 1: 6 iterations an epoch, a checkpoint every 2, 8 in all
        with mock.patch.dict(coco_sample.SPLITS, {"train2017": (6, 0), "val2017": (3, 1)}, clear=True):
            coco_sample.generate(data)
        argv = [*FAST, "--iters", "8", "--batch-size", "1", "--steps", "6", "--eval-batch-size", "3"]
        return Trainable(task, ["--task", task, "--data", str(data), "--checkpoint", str(checkpoint), *argv],
                         "checkpoint.pth", 6, 8)
    data = make_digit_folders(root / "digits", **DIGITS)
    n = 3 * DIGITS["train_per_class"]
    common = ["--task", task, "--data", str(data), "--checkpoint", str(checkpoint)]
    if task == "finetune":
        return Trainable(task, [*common, *FINETUNE], "checkpoint.pth", n // 2, EPOCHS * n // 2)
    if task == "semisup":
        return Trainable(task, [*common, "--protocol", "finetune", "--fractions", "0.5", *FINETUNE],
                         "50pct/checkpoint.pth", n // 4, EPOCHS * n // 4)
    if task == "linear":  # the official probe: augmented views through the backbone, a BatchNorm head
        return Trainable(task, [*common, "--preset", "bam_vitb", "--epochs", str(EPOCHS), "--batch-size", "2",
                                "--extract-batch-size", "12", "--image-size", "32", "--num-workers", "0"],
                         "checkpoint.pth", n // 2, EPOCHS * n // 2)
    raise ValueError(f"{task} is not one of {TRAINABLE}")
