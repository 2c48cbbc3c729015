"""The plan check (eval/budget.py): its memory figure against torch's MemTracker, its FLOPs against timm's published
GMACs, the paper suite passing its own check, and steps that cannot fit failing the dry run in one line."""
import logging
import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

from bam.backbones import build_backbone
from eval.budget import probe
from eval.run import main

from ..conftest import assert_one_line_error


def test_live_bytes_equal_memtracker_and_flops_equal_timms_gmacs():
    """ViT-S/16, 8 images, forward + backward: the peak equals MemTracker's (another tracker of the same fake run,
    torch's own); the forward FLOPs per image are 2 x timm's 4.25 GMACs (its model card rounds to 4.3)."""
    peak, forward, backward, weights = probe("vit_small_patch16_224", (), ((1, 224, 224),), 8, True, "none", False)
    with torch.device("meta"):
        backbone = build_backbone("vit_small_patch16_224")
    backbone = backbone.to_empty(device="cpu").train()
    with FakeTensorMode(allow_non_fake_inputs=True):
        tracker = MemTracker()
        tracker.track_external(backbone)
        with tracker:
            backbone(torch.randn(8, 3, 224, 224)).float().sum().backward()
        reference = sum(v["Total"] for v in tracker.get_tracker_snapshot("peak").values())
    assert peak == pytest.approx(reference, rel=0.01)
    assert weights == sum(p.numel() for p in backbone.parameters()) == pytest.approx(21.7e6, rel=0.01)
    assert forward == pytest.approx(2 * 4.25e9, rel=0.01) and backward == pytest.approx(2 * forward, rel=0.01)
    frozen = probe("vit_small_patch16_224", (), ((1, 224, 224),), 8, False, "none", False)
    assert frozen[2] == 0 and frozen[0] < peak / 2  # no backward, no activations kept for it


def test_the_paper_suite_passes_its_own_check(capsys):
    assert main(["--suite", "paper", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "DOES NOT FIT" not in out and "total:" in out
    for step in ("pretrain_vit_base: 2x8 GPUs (16 processes), batch 4096 = 16 x 256, fp16",
                 "finetune_vit_base: 1x8 GPUs (8 processes), batch 1024 = 8 x 128, fp16",  # MAE's autocast
                 "linear_vit_base: 1x8 GPUs (8 processes), batch 1024 = 8 x 128",
                 "ade20k_vit_base: 1x8 GPUs (8 processes), batch 16 = 8 x 2"):
        assert step in out, step
    gpu_hours = float(out.split("total: ")[1].split(" GPU-hours")[0].replace(",", ""))
    assert 1000 < gpu_hours < 10_000


def _suite(tmp_path, step: str) -> str:
    path = tmp_path / "big.yaml"
    path.write_text("datasets: {imagenet: }\nsteps:\n  " + step + "\n")
    return str(path)


@pytest.mark.parametrize("step, message", [
    ("big: {task: finetune, profile: gpu-1, args: {data: '{imagenet}', arch: vit_base_patch16_224, batch_size: 4096}}",
     r"step big: needs about 2\d\d GiB per GPU, profile gpu-1 has 80; use more GPUs or --accum-iter N \(each forward "
     r"takes batch / \(GPUs x N\) images\)$"),  # MAE's fp16 already: no precision to lower
    ("big: {task: finetune, profile: gpu-1, args: {data: '{imagenet}', arch: vit_base_patch16_224, batch_size: 4096, "
     "amp: none}}",
     r"step big: needs about 4\d\d GiB per GPU, profile gpu-1 has 80; use more GPUs or --accum-iter N .* or "
     r"--amp bf16"),
    ("long: {task: finetune, profile: gpu-1x8, args: {data: '{imagenet}', arch: vit_base_patch16_224, epochs: 7000}}",
     r"step long: needs about 3\d\d.\d h, profile gpu-1x8 allows 288.0 h \(4320 min x 4\); give it more GPUs, a longer "
     r"time_min or more requeues \(max_num_timeout\)"),
    ("slow: {task: knn, profile: gpu-1, resources: {time_min: 10}, args: {data: '{imagenet}'}}",
     r"step slow: needs about 0.4 h, profile gpu-1 allows 0.2 h \(10 min x 1\); give it more GPUs, a longer time_min$"),
])
def test_a_step_that_cannot_fit_fails_the_dry_run_in_one_line(step, message, tmp_path, caplog, capsys):
    assert_one_line_error(main, ["--suite", _suite(tmp_path, step), "--dry-run"], caplog, "suite big: step ")
    error = next(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert re.search(message, error), error
    assert "DOES NOT FIT" in capsys.readouterr().out  # the plan is printed, the problem marked


def test_a_step_whose_model_cannot_take_its_inputs_fails_the_dry_run_in_one_line(tmp_path, caplog):
    """DAVIS at --short-side 120: frames of 120 x 192 (854 x 120 / 480 = 213, floored to a multiple of 64), which
    patches of 16 do not tile; timm's own message is kept."""
    step = "dv: {task: davis, profile: gpu-1, args: {data: '{imagenet}', arch: vit_small_patch16_224, short_side: 120}}"
    assert_one_line_error(main, ["--suite", _suite(tmp_path, step), "--dry-run"], caplog,
                          "step dv: vit_small_patch16_224 cannot run on its inputs (120 x 192): Input height (120) "
                          "should be divisible by patch size (16)")


def test_a_submission_is_checked_before_anything_is_submitted(tmp_path, caplog):
    step = "big: {task: finetune, profile: gpu-1, args: {data: '{imagenet}', arch: vit_base_patch16_224, " \
           "batch_size: 4096}}"
    assert_one_line_error(main, ["--suite", _suite(tmp_path, step), "--launcher", "slurm", "--dataset",
                                 f"imagenet={tmp_path}", "--output-dir", str(tmp_path / "o")], caplog,
                          "step big: needs about")
    assert not (tmp_path / "o").exists()
