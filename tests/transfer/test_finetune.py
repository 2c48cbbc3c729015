"""Fine-tuning parts: layer-decay groups (MAE's rule, hand-computed), the lr schedule, one step, resuming."""
import argparse
import math

import numpy as np
import pytest
import torch
from PIL import Image

from bam import build_backbone
from pretrain.data import EvalImageFolder
from transfer import finetune_task
from transfer.finetune import Classifier, layer_decay_groups, lr_at

from ..conftest import TINY_VIT


def _scales(groups):
    return {name: (g["lr_scale"], g["weight_decay"]) for g in groups for name in g["names"]}


def test_vit_layer_decay_follows_mae():
    """depth 2, decay 0.5: stem 0.5^3, block 0 0.5^2, block 1 0.5^1, final norm / fc_norm / head 1."""
    torch.manual_seed(0)
    model = Classifier(build_backbone("vit_small_patch16_224", **TINY_VIT), 5, pool="avg")
    scales = _scales(layer_decay_groups(model, model.backbone, weight_decay=0.05, layer_decay=0.5))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(scales) == trainable  # every trainable parameter exactly once
    assert sum(len(g["params"]) for g in layer_decay_groups(model, model.backbone, 0.05, 0.5)) == len(trainable)
    b = "backbone.model."
    assert scales[b + "cls_token"] == (0.125, 0.0) and scales[b + "pos_embed"] == (0.125, 0.0)
    assert scales[b + "patch_embed.proj.weight"] == (0.125, 0.05)
    assert scales[b + "blocks.0.attn.qkv.weight"] == (0.25, 0.05)
    assert scales[b + "blocks.0.norm1.weight"] == (0.25, 0.0) and scales[b + "blocks.0.mlp.fc1.bias"] == (0.25, 0.0)
    assert scales[b + "blocks.1.mlp.fc2.weight"] == (0.5, 0.05)
    assert scales[b + "norm.weight"] == (1.0, 0.0)
    assert scales["fc_norm.weight"] == (1.0, 0.0) and scales["head.weight"] == (1.0, 0.05)
    assert scales["head.bias"] == (1.0, 0.0)


def test_frozen_positions_are_left_out_and_cnn_uses_timm_stages():
    mocov3 = Classifier(build_backbone("vit_small_mocov3_patch16_224", **{**TINY_VIT, "num_heads": 2}), 3)
    assert "backbone.model.pos_embed" not in _scales(layer_decay_groups(mocov3, mocov3.backbone, 0.05, 0.75))
    resnet = Classifier(build_backbone("resnet18"), 3)
    scales = _scales(layer_decay_groups(resnet, resnet.backbone, 0.05, 0.5))
    assert scales["head.weight"] == (1.0, 0.05)
    assert scales["backbone.model.conv1.weight"][0] < scales["backbone.model.layer1.0.conv1.weight"][0] \
        < scales["backbone.model.layer4.1.conv2.weight"][0] <= 1.0
    assert scales["backbone.model.bn1.weight"][1] == 0.0


def test_lr_schedule_by_hand():
    assert lr_at(0, 100, 10, 1.0, 0.0) == 0.0
    assert lr_at(5, 100, 10, 1.0, 0.0) == 0.5
    assert lr_at(10, 100, 10, 1.0, 0.1) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)


def test_randaugment_posterize_survives_zero_bits():
    """timm 1.0's increasing posterize reaches 0 bits at magnitude 10, which Pillow 13 rejects."""
    img = Image.new("RGB", (8, 8), (200, 100, 50))
    assert not np.asarray(finetune_task._posterize(img, 0)).any()
    assert finetune_task._posterize(img, 8) is img
    args = argparse.Namespace(image_size=32, auto_augment="rand-m10-mstd0.5-inc1", reprob=0.25)
    transform = finetune_task.train_transform(args)
    ops = [op for t in transform.transforms for op in getattr(t, "ops", [])]
    assert any(op.aug_fn is finetune_task._posterize for op in ops)
    for _ in range(200):
        transform(img.resize((40, 40)))


def _args(**kw):
    base = dict(finetune_task.DEFAULTS, epochs=2, warmup_epochs=1, batch_size=8, blr=1e-3, image_size=32,
                num_workers=0, drop_path=0.1, seed=0)
    return argparse.Namespace(**{**base, **kw})


def test_finetune_steps_and_resumes(digit_folders, tmp_path, tiny_vit, caplog):
    args = _args()
    train = finetune_task.train_dataset(digit_folders / "train", args)
    val = EvalImageFolder(digit_folders / "val", 32)
    before = {k: v.clone() for k, v in tiny_vit.state_dict().items()}
    out = finetune_task.finetune(tiny_vit, train, val, 3, args, torch.device("cpu"), tmp_path, {"run": 1})
    assert len(out["history"]) == 2 and out["steps"] == 2 * (36 // 8) and out["lr"] == pytest.approx(1e-3 * 8 / 256)
    assert 0.0 <= out["top1"] <= 100.0 and all(math.isfinite(h["train_loss"]) for h in out["history"])
    state = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert state["epoch"] == 1
    assert any(not torch.equal(before[k], state["model"][f"backbone.{k}"]) for k in before)  # the backbone trained
    assert {k: v for k, v in tiny_vit.state_dict().items()}.keys() == before.keys()
    caplog.clear()
    again = finetune_task.finetune(tiny_vit, train, val, 3, args, torch.device("cpu"), tmp_path, {"run": 1})
    assert "resuming fine-tuning" in caplog.text and again["history"] == out["history"]
    caplog.clear()
    finetune_task.finetune(tiny_vit, train, val, 3, _args(epochs=1), torch.device("cpu"), tmp_path, {"run": 2})
    assert "belongs to another run" in caplog.text
