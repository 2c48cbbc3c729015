"""``eval/run.py --task ade20k`` on several processes and across a preemption, on the built-in sample with a tiny ViT:
2 gloo processes give the 1-process numbers; a run stopped by SIGUSR1 and rerun with the same command equals an
uninterrupted run; a checkpoint of another recipe is not resumed; a batch 2 processes cannot share is refused."""
import json
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from bam import build_backbone
from bam.formats import backbone_checkpoint
from eval.run import main

from ..conftest import TINY_VIT
from .test_run_coco import REPO, _torchrun

pytest.importorskip("mmseg", reason="the 'seg' extra: pip install -e '.[seg]'")
from eval.tasks import ade20k as ade20k_task  # noqa: E402
from transfer.ade20k import CONFIG_DIR  # noqa: E402

SAMPLE_RECIPE = CONFIG_DIR / "upernet_cpu_sample.py"
# The sample's recipe with every random draw taken out of the data and the model (a fixed resize instead of
# RandomResize / RandomCrop / RandomFlip / PhotoMetricDistortion, no dropout), so that 1 process and 2 processes see the
# same 4 images the same way. SGD: AdamW divides each gradient by its own running size, which turns the float noise
# of parameters whose true gradient is 0 (a conv bias ahead of a batch norm) into full-size steps of random sign.
EXACT_RECIPE = f"""_base_ = ['{SAMPLE_RECIPE}']
img_scale = (64, 32)
model = dict(decode_head=dict(dropout_ratio=0.0), auxiliary_head=dict(dropout_ratio=0.0))
train_dataloader = dict(dataset=dict(pipeline=[
    dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True), dict(type='PackSegInputs')]))
optim_wrapper = dict(_delete_=True, type='OptimWrapper', optimizer=dict(type='SGD', lr=0.02, momentum=0.9))
default_hooks = dict(checkpoint=dict(interval=-1, save_last=True))
"""
# the sample's own recipe (random augmentations, dropout), logging every iteration's losses
LOG_EVERY_ITERATION = f"""_base_ = ['{SAMPLE_RECIPE}']
default_hooks = dict(logger=dict(interval=1))
"""
FAST = ["--crop-size", "32", "--num-workers", "0"]


@pytest.fixture(scope="module")
def sample_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    ade20k_task.builtin_sample(cache)
    return cache


@pytest.fixture(scope="module")
def tiny_vit4_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    backbone = build_backbone("vit_small_patch16_224", **dict(TINY_VIT, depth=4))  # UperNet takes 4 blocks
    path = tmp_path_factory.mktemp("ckpt") / "tiny4.pth"
    torch.save(backbone_checkpoint(backbone), path)
    return path


def _argv(tmp_path, recipe, cache, checkpoint, *flags):
    config = tmp_path / "recipe.py"
    config.write_text(recipe)
    return ["--task", "ade20k", "--cache-dir", str(cache), "--checkpoint", str(checkpoint), "--seg-config",
            str(config), *FAST, *flags]


def _losses(out):
    """iteration -> the logged losses, over every log folder of a run (a resumed run has two)."""
    found = {}
    for scalars in sorted((out / "mmseg").glob("*/vis_data/scalars.json")):
        for entry in map(json.loads, scalars.read_text().splitlines()):
            if "loss" in entry:
                found[entry["step"]] = {k: entry[k] for k in ("loss", "decode.loss_ce", "aux.loss_ce", "lr")}
    return found


def test_two_gloo_processes_give_the_one_process_numbers(tmp_path, sample_cache, tiny_vit4_checkpoint):
    argv = _argv(tmp_path, EXACT_RECIPE, sample_cache, tiny_vit4_checkpoint, "--iters", "3", "--batch-size", "4")
    assert main([*argv, "--output-dir", str(tmp_path / "one")]) == 0
    done = _torchrun([*argv, "--output-dir", str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("joined process group") == 2
    assert done.stdout.count("ade20k -- ") == 1 and done.stdout.count("Saving checkpoint at 3 iterations") == 1
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert two["world_size"] == 2 and "world_size" not in one
    assert (one["batch_per_process"], two["batch_per_process"]) == (4, 2) and two["config"]["batch_size"] == 4
    # the same 4 images per step, batch norm over all 4 (GlobalBatchNorm), gradients averaged by DDP: the same maths,
    # summed in another order, so the weights agree to float32 rounding and the scores (to 0.01) exactly
    assert two["metrics"] == one["metrics"] and two["per_class"] == one["per_class"]
    assert one["metrics"]["mIoU"] > 5  # not a degenerate model that predicts one class
    w1, w2 = (torch.load(tmp_path / d / "mmseg" / "iter_3.pth", weights_only=True)["state_dict"]
              for d in ("one", "two"))
    assert w1.keys() == w2.keys()
    bad = [k for k in w1 if not torch.allclose(w1[k].double(), w2[k].double(), rtol=1e-5, atol=1e-6)]
    assert not bad, bad


# eval/run.py in a subprocess that sends itself SIGUSR1 during its ``ITERATION``-th training iteration (deterministic,
# where a signal from outside, timed on the log, can land after the last of a few fast iterations)
SIGNALLED_RUN = """import os, signal, sys
from mmengine.runner import IterBasedTrainLoop
from eval.run import main
ITERATION, run_iter, calls = int(sys.argv[1]), IterBasedTrainLoop.run_iter, []
def signalled(self, data_batch):
    calls.append(1)
    if len(calls) == ITERATION:
        os.kill(os.getpid(), signal.SIGUSR1)
    return run_iter(self, data_batch)
IterBasedTrainLoop.run_iter = signalled
sys.exit(main(sys.argv[2:]))
"""


def _run_signalled_during(argv, log, iteration):
    """``eval/run.py argv`` in a subprocess, sent SIGUSR1 during training iteration ``iteration``: its return code."""
    with open(log, "w") as out:
        return subprocess.run([sys.executable, "-c", SIGNALLED_RUN, str(iteration), *argv], stdout=out,
                              stderr=subprocess.STDOUT, cwd=REPO, timeout=240).returncode


def test_a_signal_saves_and_the_same_command_resumes_exactly(tmp_path, sample_cache, tiny_vit4_checkpoint, caplog):
    argv = _argv(tmp_path, LOG_EVERY_ITERATION, sample_cache, tiny_vit4_checkpoint, "--iters", "6", "--batch-size",
                 "2")
    whole, stopped, other = tmp_path / "whole", tmp_path / "stopped", tmp_path / "other"
    assert main([*argv, "--output-dir", str(whole)]) == 0

    returncode = _run_signalled_during([*argv, "--output-dir", str(stopped)], tmp_path / "stopped.log", 3)
    log = (tmp_path / "stopped.log").read_text()
    assert returncode == -signal.SIGUSR1, log[-3000:]  # saved, then the signal's default action ended it
    assert "preemption signal: saved" in log and not (stopped / "results.json").exists()
    saved = stopped / "mmseg" / (stopped / "mmseg" / "last_checkpoint").read_text().strip().split("/")[-1]
    at = int(saved.stem.split("_")[1])
    assert saved.is_file() and at == 3  # after the iteration the signal came in, mid-run

    shutil.copytree(stopped, other)
    assert main([*argv, "--lr", "0.002", "--output-dir", str(other)]) == 0  # another recipe: not resumed
    assert "belongs to another run (other weights, recipe or seed): starting over" in caplog.text
    assert json.loads((other / "results.json").read_text())["resumed_iteration"] == 0

    assert main([*argv, "--output-dir", str(stopped)]) == 0  # the same command: resumed
    resumed, uninterrupted = (json.loads((d / "results.json").read_text()) for d in (stopped, whole))
    assert resumed["resumed_iteration"] == at and resumed["resumed_from"] == str(saved)
    # the random augmentations and dropout included: bit for bit (see transfer/ade20k/resume.py for why)
    assert resumed["metrics"] == uninterrupted["metrics"] and resumed["per_class"] == uninterrupted["per_class"]
    assert _losses(stopped) == _losses(whole) and sorted(_losses(whole)) == [1, 2, 3, 4, 5, 6]


def test_a_batch_two_processes_cannot_share_is_one_line_before_anything_is_written(tmp_path, sample_cache,
                                                                                     tiny_vit4_checkpoint):
    out = tmp_path / "out"
    done = _torchrun(["--task", "ade20k", "--cache-dir", str(sample_cache), "--checkpoint", str(tiny_vit4_checkpoint),
                      "--preset", "cpu_sample", "--batch-size", "3", "--output-dir", str(out)], timeout=120)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 2, done.stderr[-3000:]  # each rank: one line
    assert all("--batch-size 3 is the global batch and must be a multiple of the 2 processes" in e for e in errors)
    assert not out.exists()
