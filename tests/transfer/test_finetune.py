"""Fine-tuning parts: layer-decay groups (MAE's rule, hand-computed), the lr schedule, one step, resuming."""
import argparse
import copy
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

from bam import build_backbone
from bam.images import EvalImageFolder
from eval.tasks import finetune as finetune_task
from transfer.classification import finetune as ft
from transfer.classification.finetune import Classifier, layer_decay_groups, lr_at

from ..conftest import TINY_VIT
from ..preemption import Preempted, sigusr1_at_call


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
    assert b + "norm.weight" not in scales  # MAE's global_pool: fc_norm replaces the final norm
    assert scales["fc_norm.weight"] == (1.0, 0.0) and scales["head.weight"] == (1.0, 0.05)
    assert scales["head.bias"] == (1.0, 0.0)
    cls_pool = Classifier(build_backbone("vit_small_patch16_224", **TINY_VIT), 5, pool="cls")
    assert _scales(layer_decay_groups(cls_pool, cls_pool.backbone, 0.05, 0.5))[b + "norm.weight"] == (1.0, 0.0)


def test_global_pool_is_maes_fc_norm_of_the_mean_unnormalised_patch_token():
    """MAE models_vit.py with global_pool: blocks, mean of x[:, 1:], fc_norm, head; the final norm is not used."""
    torch.manual_seed(0)
    vit = build_backbone("vit_small_patch16_224", **TINY_VIT).eval()
    model = Classifier(vit, 5, pool="avg").eval()
    torch.nn.init.normal_(model.head.weight)
    torch.nn.init.normal_(model.fc_norm.weight)
    x = torch.randn(2, 3, 32, 32)
    m = vit.model
    tokens = torch.cat([m.cls_token.expand(2, -1, -1), m.patch_embed(x).flatten(1, 2)], dim=1) + m.pos_embed
    for block in m.blocks:
        tokens = block(tokens)
    pooled = F.layer_norm(tokens[:, 1:].mean(dim=1), (32,), model.fc_norm.weight, model.fc_norm.bias, eps=1e-6)
    assert torch.allclose(model(x), pooled @ model.head.weight.t() + model.head.bias, atol=1e-5)
    assert "backbone.model.norm.weight" not in model.state_dict()


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
    assert not np.asarray(ft._posterize(img, 0)).any()
    assert ft._posterize(img, 8) is img
    args = argparse.Namespace(image_size=32, auto_augment="rand-m10-mstd0.5-inc1", reprob=0.25)
    transform = ft.train_transform(args)
    ops = [op for t in transform.transforms for op in getattr(t, "ops", [])]
    assert any(op.aug_fn is ft._posterize for op in ops)
    for _ in range(200):
        transform(img.resize((40, 40)))


def _args(**kw):
    base = dict(finetune_task.DEFAULTS, epochs=2, warmup_epochs=1, batch_size=8, blr=1e-3, image_size=32,
                num_workers=0, drop_path=0.1, seed=0, amp="none")  # the recipe's fp16 autocast needs CUDA
    return argparse.Namespace(**{**base, **kw})


def _finetune(backbone, folders, out, run_id=1, **kw):
    args = _args(**kw)
    train = ft.train_dataset(folders / "train", args)
    val = EvalImageFolder(folders / "val", 32)
    return ft.finetune(backbone, train, val, 3, args, torch.device("cpu"), out, {"run": run_id})


def test_the_evaluation_runs_under_the_training_autocast(digit_folders, tmp_path, tiny_vit, monkeypatch):
    """MAE evaluates under the autocast it trains with (engine_finetune.py:115, fp16 on CUDA): with --amp bf16 (the
    autocast a CPU has) the head's logits in the validation passes are bf16 (autocast runs a linear layer in bf16);
    with --amp none float32."""
    evaluate, seen = ft.evaluate, []

    def spied(model, *args, **kwargs):
        hook = model.head.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
        try:
            return evaluate(model, *args, **kwargs)
        finally:
            hook.remove()

    monkeypatch.setattr(ft, "evaluate", spied)
    for amp, dtype in (("bf16", torch.bfloat16), ("none", torch.float32)):
        seen.clear()
        out = _finetune(copy.deepcopy(tiny_vit), digit_folders, tmp_path / amp, epochs=1, amp=amp)
        assert set(seen) == {dtype} and math.isfinite(out["top1"]), amp


def test_finetune_steps_and_a_run_killed_mid_way_resumes_to_the_uninterrupted_weights(digit_folders, tmp_path,
                                                                                     tiny_vit, caplog, monkeypatch):
    """3 epochs uninterrupted vs killed during epoch 2 (after epoch 1's checkpoint) and run again."""
    import copy

    before = {k: v.clone() for k, v in tiny_vit.state_dict().items()}
    out = _finetune(copy.deepcopy(tiny_vit), digit_folders, tmp_path / "whole", epochs=3)
    assert len(out["history"]) == 3 and out["steps"] == 3 * (36 // 8) and out["lr"] == pytest.approx(1e-3 * 8 / 256)
    assert 0.0 <= out["top1"] <= 100.0 and all(math.isfinite(h["train_loss"]) for h in out["history"])
    whole = torch.load(tmp_path / "whole" / "checkpoint.pth", weights_only=True)
    assert whole["epoch"] == 2
    assert any(not torch.equal(before[k], whole["model"][f"backbone.{k}"]) for k in before)  # the backbone trained

    evaluate, calls = ft.evaluate, []

    def killed_in_epoch_two(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a kill after epoch 2's steps, before its checkpoint
        return evaluate(*a, **kw)

    monkeypatch.setattr(ft, "evaluate", killed_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        _finetune(copy.deepcopy(tiny_vit), digit_folders, tmp_path / "resumed", epochs=3)
    assert torch.load(tmp_path / "resumed" / "checkpoint.pth", weights_only=True)["epoch"] == 0
    monkeypatch.setattr(ft, "evaluate", evaluate)
    torch.manual_seed(123)  # the process that resumes starts with other random state
    caplog.clear()
    again = _finetune(copy.deepcopy(tiny_vit), digit_folders, tmp_path / "resumed", epochs=3)
    assert "resuming fine-tuning" in caplog.text and "(epoch 1 done)" in caplog.text
    resumed = torch.load(tmp_path / "resumed" / "checkpoint.pth", weights_only=True)
    assert again["history"] == out["history"]
    assert all(torch.equal(whole["model"][k], resumed["model"][k]) for k in whole["model"])
    caplog.clear()
    _finetune(copy.deepcopy(tiny_vit), digit_folders, tmp_path / "resumed", run_id=2, epochs=1)
    assert "belongs to another run" in caplog.text


def test_accumulated_micro_batches_make_the_gradient_of_the_global_batch(digit_folders, tmp_path, tiny_vit,
                                                                         monkeypatch):
    """--accum-iter 4: a step's 16 images go through in 4 forwards of 4 whose gradients add up to the mean over the
    16 (MAE's accum_iter): from the same weights, the first step's gradient equals the one-forward run's up to float
    rounding, and both runs take the same number of steps. (Later weights are not compared: AdamW turns the rounding
    of near-zero gradients into whole lr-sized steps.) Deterministic setting: no Mixup, drop path, smoothing or
    erasing; the same crops and flips."""
    import copy

    step, grads = torch.optim.AdamW.step, []

    def recording_step(self, *args, **kwargs):
        grads[-1].append([p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    plain = dict(mixup=0.0, cutmix=0.0, smoothing=0.0, drop_path=0.0, reprob=0.0, auto_augment="none",
                 batch_size=16, epochs=1)
    runs = {}
    for name, accum in (("whole", 1), ("accum", 4)):
        grads.append([])
        runs[name] = _finetune(copy.deepcopy(tiny_vit), digit_folders, tmp_path / name, accum_iter=accum, **plain)
    whole, accum = grads
    assert len(whole) == len(accum) == runs["whole"]["steps"] > 1 and runs["accum"]["accum_iter"] == 4
    first_whole, first_accum = whole[0], accum[0]  # the same weights and images: the gradients must agree
    assert len(first_whole) == len(first_accum)
    for a, b in zip(first_whole, first_accum):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7), (a - b).abs().max()
    assert runs["accum"]["history"][0]["train_loss"] == pytest.approx(runs["whole"]["history"][0]["train_loss"],
                                                                      rel=1e-3)
    with pytest.raises(ValueError, match=r"--batch-size 16 must be a multiple of 1 process\(es\) x --accum-iter 3"):
        _finetune(copy.deepcopy(tiny_vit), digit_folders, tmp_path / "bad", accum_iter=3, **plain)


def test_a_signal_mid_epoch_saves_after_the_step_and_the_rerun_ends_with_the_uninterrupted_weights(
        digit_folders, tmp_path, tiny_vit, monkeypatch, caplog):
    """Full recipe (RandAugment, Mixup/CutMix, drop path, erasing): SIGUSR1 during step 2 of epoch 2 saves after
    that step and passes the signal on; the same call again resumes at step 3 of epoch 2 and ends bit-equal."""
    whole = _finetune(copy.deepcopy(tiny_vit), digit_folders, tmp_path / "whole", epochs=2)
    with sigusr1_at_call(monkeypatch, torch.optim.AdamW, "step", 4 + 2) as calls, pytest.raises(Preempted):
        _finetune(copy.deepcopy(tiny_vit), digit_folders, tmp_path / "resumed", epochs=2)  # 4 steps per epoch
    saved = torch.load(tmp_path / "resumed" / "checkpoint.pth", weights_only=True)
    assert (saved["epoch"], saved["iteration"], len(calls)) == (0, 2, 6)  # epoch 1 done, 2 steps of epoch 2
    torch.manual_seed(123)  # the process that resumes starts with other random state
    again = _finetune(copy.deepcopy(tiny_vit), digit_folders, tmp_path / "resumed", epochs=2)
    assert "(epoch 1 done, 2 steps into epoch 2)" in caplog.text
    assert again["history"] == whole["history"]
    a, b = (torch.load(tmp_path / n / "checkpoint.pth", weights_only=True)["model"] for n in ("whole", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


class _Float64(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, label = self.dataset[i]
        return image.double(), label


def _float64_finetune(backbone_state, folders, out, **kw):
    """The fine-tuning of a tiny ViT in float64 (the rounding of a split sum stays far below the tolerance)."""
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    backbone = build_backbone("vit_small_patch16_224", **TINY_VIT)
    backbone.model.load_state_dict(backbone_state)
    args = _args(epochs=2, **kw)
    train = _Float64(ft.train_dataset(folders / "train", args))
    val = _Float64(EvalImageFolder(folders / "val", 32))
    return ft.finetune(backbone, train, val, 3, args, torch.device("cpu"), out, {"run": 1})


def _ddp_worker(rank, port, state, folders, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        result = _float64_finetune(state, folders, out, accum_iter=1)
        torch.save({"history": result["history"], "world_size": result["world_size"]}, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_train_the_weights_of_one_process_accumulating_two_micro_batches(digit_folders, tmp_path,
                                                                                        tiny_vit):
    """The full recipe (RandAugment, Mixup/CutMix, drop path, erasing), a global batch of 8: DDP over 2 gloo processes
    x 4 images equals 1 process x 2 accumulated micro-batches of 4 (the same views, Mixup pairs and drop-path masks
    by their place in the epoch), weights to 1e-9 after 2 epochs in float64; validation figures equal."""
    state = {k: v.double() for k, v in tiny_vit.model.state_dict().items()}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (tmp_path / "two").mkdir()
    mp.spawn(_ddp_worker, args=(port, state, digit_folders, tmp_path / "two"), nprocs=2, join=True)
    dtype = torch.get_default_dtype()
    try:
        one = _float64_finetune(state, digit_folders, tmp_path / "one", accum_iter=2)
    finally:
        torch.set_default_dtype(dtype)
    a, b = (torch.load(tmp_path / n / "checkpoint.pth", weights_only=True)["model"] for n in ("one", "two"))
    assert a.keys() == b.keys() and all(v.dtype == torch.float64 for v in a.values())
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-9, rtol=0), (k, (a[k] - b[k]).abs().max())
    assert not torch.equal(a["head.weight"], torch.zeros_like(a["head.weight"]))
    for rank in range(2):
        got = torch.load(tmp_path / "two" / f"rank{rank}.pt", weights_only=True)
        assert got["world_size"] == 2
        for h, g in zip(one["history"], got["history"]):
            assert (h["val_top1"], h["val_top5"]) == (g["val_top1"], g["val_top5"])
            assert h["train_loss"] == pytest.approx(g["train_loss"], abs=1e-9)
