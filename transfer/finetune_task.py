"""``python eval/run.py --task finetune``: end-to-end fine-tuning with the MAE/BEiT recipe (timm's parts).

AdamW with layer-wise lr decay, drop path, RandAugment, random erasing, Mixup/CutMix, label smoothing, warm-up +
cosine per step, AMP. Writes ``checkpoint.pth`` every epoch (atomic) and resumes from it when the same run is
started again; ``log.jsonl`` per epoch; ``results.json`` with the final validation top-1 / top-5.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageOps
from timm.data import Mixup, create_transform
from timm.data.auto_augment import posterize as timm_posterize
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from tqdm import tqdm

from bam.backbones import Backbone
from bam.checkpoint import latest_path, load_file, remove_stale_temporaries, save_atomic
from eval.context import TaskContext
from eval.options import number, resolve_defaults
from pretrain.data import MEAN, STD, labelled_folder
from pretrain.trainer import rng_state, set_rng_state
from transfer.finetune import Classifier, layer_decay_groups, lr_at, set_group_lrs, with_drop_path
from transfer.labelled_data import labelled_splits, photos_sample

logger = logging.getLogger(__name__)
HELP = "end-to-end fine-tuning (MAE/BEiT recipe: AdamW, layer decay, drop path, RandAugment, Mixup/CutMix)"
# MAE's ViT-B/16 recipe (facebookresearch/mae FINETUNE.md): 100 epochs, batch 1024, blr 5e-4, layer decay 0.65,
# wd 0.05, drop path 0.1, mixup 0.8, cutmix 1.0, smoothing 0.1, RandAugment m9, random erasing 0.25, global pool
DEFAULTS = {"epochs": 100, "warmup_epochs": 5, "batch_size": 1024, "blr": 5e-4, "min_lr": 1e-6, "layer_decay": 0.65,
            "weight_decay": 0.05, "drop_path": 0.1, "mixup": 0.8, "cutmix": 1.0, "smoothing": 0.1,
            "auto_augment": "rand-m9-mstd0.5-inc1", "reprob": 0.25, "pool": "avg", "image_size": 224,
            "clip_grad": 0.0, "amp": "none", "num_workers": 8}
PRESETS = {
    "vit_base": {},  # the defaults: MAE's ViT-B/16 recipe
    # no published BAM or MAE recipe for ViT-S/16: MAE's with the layer decay used for 12-block small ViTs
    "vit_small": {"layer_decay": 0.75},
}
# the built-in sample: 32x32 crops shown at 64 (4x4 patches), a few epochs on a CPU
SAMPLE = {"epochs": 6, "warmup_epochs": 1, "batch_size": 64, "blr": 2e-3, "image_size": 64, "num_workers": 2}


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--preset", default=None, choices=sorted(PRESETS),
                       help="vit_base (default values: MAE's ViT-B/16 recipe) or vit_small (layer decay 0.75)")
    group.add_argument("--epochs", type=number(int, ge=1), default=None, help="default 100")
    group.add_argument("--warmup-epochs", type=number(float, ge=0), default=None, help="default 5")
    group.add_argument("--batch-size", type=number(int, ge=1), default=None, help="global batch (default 1024)")
    group.add_argument("--blr", type=number(float, gt=0), default=None,
                       help="base lr; lr = blr * batch / 256 (default 5e-4)")
    group.add_argument("--min-lr", type=number(float, ge=0), default=None, help="cosine floor (default 1e-6)")
    group.add_argument("--layer-decay", type=number(float, gt=0, le=1), default=None,
                       help="layer-wise lr decay (default 0.65)")
    group.add_argument("--weight-decay", type=number(float, ge=0), default=None,
                       help="AdamW weight decay (default 0.05)")
    group.add_argument("--drop-path", type=number(float, ge=0, lt=1), default=None,
                       help="stochastic depth rate (default 0.1)")
    group.add_argument("--mixup", type=number(float, ge=0), default=None, help="Mixup alpha, 0 = off (default 0.8)")
    group.add_argument("--cutmix", type=number(float, ge=0), default=None, help="CutMix alpha, 0 = off (default 1.0)")
    group.add_argument("--smoothing", type=number(float, ge=0, lt=1), default=None,
                       help="label smoothing (default 0.1)")
    group.add_argument("--auto-augment", default=None, help="timm RandAugment policy, 'none' = off "
                       "(default rand-m9-mstd0.5-inc1)")
    group.add_argument("--reprob", type=number(float, ge=0, le=1), default=None,
                       help="random erasing probability (default 0.25)")
    group.add_argument("--pool", default=None, choices=["cls", "avg"],
                       help="head on [CLS] or on the LayerNorm'd mean patch token (default avg, as MAE)")
    group.add_argument("--image-size", type=number(int, ge=1), default=None, help="default 224")
    group.add_argument("--clip-grad", type=number(float, ge=0), default=None,
                       help="gradient norm clip, 0 = off (default 0)")
    group.add_argument("--amp", default=None, choices=["none", "bf16", "fp16"],
                       help="autocast dtype (fp16 with a grad scaler, CUDA only; default none)")
    group.add_argument("--num-workers", type=number(int, ge=0), default=None, help="DataLoader workers (default 8)")


def builtin_sample(cache_dir: Path) -> Path:
    return photos_sample(cache_dir)


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, with 0 bits kept giving a black image as TensorFlow's and Pillow < 13's did (Pillow 13
    raises for 0, which timm 1.0's increasing-posterize level reaches at magnitude 10)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def train_transform(args: argparse.Namespace):
    """timm's training transform: random resized crop (bicubic), flip, RandAugment, normalise, random erasing."""
    aa = None if str(args.auto_augment).lower() in ("none", "", "off") else args.auto_augment
    transform = create_transform(args.image_size, is_training=True, color_jitter=None, auto_augment=aa,
                                 interpolation="bicubic", re_prob=args.reprob, re_mode="pixel", re_count=1,
                                 mean=MEAN, std=STD)
    for t in transform.transforms:
        for op in getattr(t, "ops", []):
            if getattr(op, "aug_fn", None) is timm_posterize:
                op.aug_fn = _posterize
    return transform


def train_dataset(root: Path, args: argparse.Namespace) -> ImageFolder:
    transform = train_transform(args)
    return labelled_folder(root, transform)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int, workers: int
             ) -> dict[str, float]:
    model.eval()
    hits1 = hits5 = n = 0
    for images, labels in DataLoader(dataset, batch_size=batch_size, num_workers=workers):
        logits = model(images.to(device)).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu() == labels[:, None]
        hits1, hits5, n = hits1 + top[:, 0].sum().item(), hits5 + top.any(dim=1).sum().item(), n + len(labels)
    return {"top1": 100.0 * hits1 / n, "top5": 100.0 * hits5 / n}


def finetune(backbone: Backbone, train_set: Dataset, val_set: Dataset, num_classes: int, args: argparse.Namespace,
             device: torch.device, output_dir: Path, run_id: dict) -> dict:
    """Fine-tune ``backbone`` with a new head on ``train_set``; evaluate on ``val_set`` every epoch.

    ``run_id`` (the weights' identity and the recipe) guards resuming: ``output_dir/checkpoint.pth`` is resumed
    only when it was written by the same run; otherwise the run starts over.
    """
    for seed in (torch.manual_seed, random.seed, np.random.seed):  # Mixup, RandAugment, erasing, drop path, head
        seed(args.seed)
    batch = args.batch_size
    mixing = args.mixup > 0 or args.cutmix > 0
    if len(train_set) < batch:
        batch = max(2, len(train_set) - len(train_set) % 2) if mixing else len(train_set)
        logger.warning("only %d training images: batch size %d instead of %d", len(train_set), batch, args.batch_size)
    if mixing and batch % 2:
        raise ValueError(f"--batch-size {batch} must be even with Mixup/CutMix (timm pairs images)")
    model = Classifier(with_drop_path(backbone, args.drop_path), num_classes, args.pool).to(device)
    lr = args.blr * batch / 256.0
    optimizer = torch.optim.AdamW(layer_decay_groups(model, model.backbone, args.weight_decay, args.layer_decay), lr=lr,
                                  betas=(0.9, 0.999))
    if args.amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs CUDA; use --amp bf16 on CPU")
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                  num_classes=num_classes) if mixing else None
    criterion = SoftTargetCrossEntropy() if mixing else \
        LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing > 0 else nn.CrossEntropyLoss()

    ckpt_path, start_epoch, history = latest_path(output_dir), 0, []
    remove_stale_temporaries(output_dir)
    if ckpt_path.is_file():
        state = load_file(ckpt_path)
        if state.get("run_id") == json.loads(json.dumps(run_id, default=str)):
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            start_epoch, history = state["epoch"] + 1, state["history"]
            set_rng_state(state["rng"])  # Mixup, RandAugment and drop path draw from the global generators
            logger.info("resuming fine-tuning from %s (epoch %d done)", ckpt_path, state["epoch"] + 1)
        else:
            logger.warning("%s belongs to another run (other weights or recipe): starting over", ckpt_path)

    loader_kw = {"batch_size": batch, "drop_last": True, "num_workers": args.num_workers,
                 "pin_memory": device.type == "cuda", "persistent_workers": False}
    steps_per_epoch = len(train_set) // batch
    total, warmup = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    for epoch in range(start_epoch, args.epochs):
        model.train()
        loader = DataLoader(train_set, shuffle=True, generator=torch.Generator().manual_seed(args.seed * 1009 + epoch),
                            **loader_kw)
        running = 0.0
        for it, (images, labels) in enumerate(tqdm(loader, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True)):
            set_group_lrs(optimizer, lr_at(epoch * steps_per_epoch + it, total, warmup, lr, args.min_lr))
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if mixup is not None:
                images, labels = mixup(images, labels)
            with autocast:
                loss = criterion(model(images).float(), labels)
            if not math.isfinite(loss.item()):
                raise ValueError(f"fine-tuning loss is {loss.item()} at epoch {epoch}, step {it}; lower --blr "
                                 f"(the last good checkpoint is {ckpt_path})")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if args.clip_grad > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            running += loss.item()
        val = evaluate(model, val_set, device, batch, args.num_workers)
        history.append({"epoch": epoch, "train_loss": running / max(steps_per_epoch, 1), **{f"val_{k}": v for k, v
                        in val.items()}, "lr": optimizer.param_groups[-1]["lr"]})
        logger.info("epoch %d/%d: train loss %.4f, val top-1 %.2f%%", epoch + 1, args.epochs,
                    history[-1]["train_loss"], val["top1"])
        save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                     "epoch": epoch, "history": history, "rng": rng_state(),
                     "run_id": json.loads(json.dumps(run_id, default=str)),
                     "arch": backbone.arch, "num_classes": num_classes, "pool": args.pool}, ckpt_path)
    with open(output_dir / "log.jsonl", "w") as f:
        f.writelines(json.dumps(h) + "\n" for h in history)
    if not history:
        raise ValueError(f"--epochs {args.epochs}: nothing to train")
    last = history[-1]
    return {"top1": last["val_top1"], "top5": last["val_top5"], "history": history, "batch_size": batch, "lr": lr,
            "steps": total}


def recipe(args: argparse.Namespace) -> dict:
    keys = list(DEFAULTS) + ["seed"]
    return {k: getattr(args, k) for k in keys}


def run(ctx: TaskContext, args: argparse.Namespace) -> dict:
    resolve_defaults(args, DEFAULTS, PRESETS.get(args.preset), SAMPLE if ctx.is_sample else None)
    train_eval, val_set = labelled_splits(ctx.data_root, args.image_size)
    train_set = train_dataset(Path(train_eval.root), args)
    backbone = ctx.load_backbone()
    torch.manual_seed(args.seed)
    out = finetune(backbone, train_set, val_set, len(train_eval.classes), args, ctx.device, ctx.output_dir,
                   {"model": ctx.model_id(), "recipe": recipe(args), "data": str(ctx.data_root.resolve())})
    return {"metrics": {"top1": out["top1"], "top5": out["top5"]}, "history": out["history"],
            "effective": {"batch_size": out["batch_size"], "lr": out["lr"], "steps": out["steps"]},
            "num_train": len(train_set), "num_val": len(val_set), "classes": train_eval.classes}

