"""``python eval/run.py --task finetune``: end-to-end fine-tuning with the MAE/BEiT recipe (timm's parts).

AdamW with layer-wise lr decay, drop path, RandAugment, random erasing, Mixup/CutMix, label smoothing, warm-up +
cosine per step, AMP. Writes ``checkpoint.pth`` every epoch (atomic) and resumes from it when the same run is
started again; ``log.jsonl`` per epoch; ``results.json`` with the final validation top-1 / top-5.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from bam.cli import number, resolve_defaults
from bam.images import labelled_splits
from bam.samples.photos import photos_sample
from bam.training import amp_dtype
from eval.budget import IMAGENET_TRAIN, IMAGENET_VAL, Workload
from eval.context import TaskContext
from eval.tasks import TaskSpec
from transfer.classification.finetune import finetune, train_dataset

logger = logging.getLogger(__name__)
HELP = "end-to-end fine-tuning (MAE/BEiT recipe: AdamW, layer decay, drop path, RandAugment, Mixup/CutMix)"
# MAE's ViT-B/16 recipe (facebookresearch/mae). FINETUNE.md:71-77: 100 epochs, blr 5e-4, layer decay 0.65, wd 0.05,
# drop path 0.1, random erasing 0.25, mixup 0.8, cutmix 1.0, global batch 1024. main_finetune.py's defaults for the
# rest: accum_iter 1 (:47), input 224 (:54), no grad clipping (:61), min lr 1e-6 (:73), 5 warm-up epochs (:76),
# RandAugment m9 (:82), smoothing 0.1 (:84), global pool (:115). fp16: engine_finetune.py:55 and :115 run the training
# and the evaluation forward under torch.cuda.amp.autocast(), with main_finetune.py:288's loss scaler.
# tests/eval/test_finetune_recipe.py checks each value against these lines.
DEFAULTS = {"epochs": 100, "warmup_epochs": 5, "batch_size": 1024, "blr": 5e-4, "min_lr": 1e-6, "layer_decay": 0.65,
            "weight_decay": 0.05, "drop_path": 0.1, "mixup": 0.8, "cutmix": 1.0, "smoothing": 0.1,
            "auto_augment": "rand-m9-mstd0.5-inc1", "reprob": 0.25, "pool": "avg", "image_size": 224,
            "clip_grad": 0.0, "amp": "fp16", "num_workers": 8, "accum_iter": 1}
PRESETS = {
    "vit_base": {},  # the defaults: MAE's ViT-B/16 recipe
    # no published BAM or MAE recipe for ViT-S/16: MAE's with the layer decay used for 12-block small ViTs
    "vit_small": {"layer_decay": 0.75},
}
# the built-in sample: 32x32 crops shown at 64 (4x4 patches), a few epochs on a CPU (full precision: fp16 autocast
# needs CUDA)
SAMPLE = {"epochs": 6, "warmup_epochs": 1, "batch_size": 64, "blr": 2e-3, "image_size": 64, "num_workers": 2,
          "amp": "none"}


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--preset", default=None, choices=sorted(PRESETS),
                       help="vit_base (the defaults: MAE's ViT-B/16 recipe) or vit_small (layer decay 0.75)")
    group.add_argument("--epochs", type=number(int, ge=1), default=None, help="training epochs")
    group.add_argument("--warmup-epochs", type=number(float, ge=0), default=None, help="linear lr warm-up")
    group.add_argument("--batch-size", type=number(int, ge=1), default=None,
                       help="global batch of one optimizer step (the recipe's): processes x --accum-iter micro-batches")
    group.add_argument("--accum-iter", type=number(int, ge=1), default=None,
                       help="micro-batches whose gradients make one step (MAE's accum_iter): each forward takes "
                            "batch / accum-iter images, the recipe stays the same")
    group.add_argument("--blr", type=number(float, gt=0), default=None,
                       help="base lr; lr = blr * batch / 256")
    group.add_argument("--min-lr", type=number(float, ge=0), default=None, help="cosine floor")
    group.add_argument("--layer-decay", type=number(float, gt=0, le=1), default=None,
                       help="layer-wise lr decay")
    group.add_argument("--weight-decay", type=number(float, ge=0), default=None,
                       help="AdamW weight decay")
    group.add_argument("--drop-path", type=number(float, ge=0, lt=1), default=None,
                       help="stochastic depth rate")
    group.add_argument("--mixup", type=number(float, ge=0), default=None, help="Mixup alpha, 0 = off")
    group.add_argument("--cutmix", type=number(float, ge=0), default=None, help="CutMix alpha, 0 = off")
    group.add_argument("--smoothing", type=number(float, ge=0, lt=1), default=None,
                       help="label smoothing")
    group.add_argument("--auto-augment", default=None, help="timm RandAugment policy, 'none' = off")
    group.add_argument("--reprob", type=number(float, ge=0, le=1), default=None,
                       help="random erasing probability")
    group.add_argument("--pool", default=None, choices=["cls", "avg"],
                       help="head on [CLS] or on the LayerNorm'd mean patch token")
    group.add_argument("--image-size", type=number(int, ge=1), default=None, help="crop size")
    group.add_argument("--clip-grad", type=number(float, ge=0), default=None,
                       help="gradient norm clip, 0 = off")
    group.add_argument("--amp", default=None, choices=["none", "bf16", "fp16"],
                       help="autocast dtype of training and evaluation: fp16 (MAE's; with a grad scaler, CUDA "
                            "only), bf16, or none (float32)")
    group.add_argument("--num-workers", type=number(int, ge=0), default=None, help="DataLoader workers")


def builtin_sample(cache_dir: Path) -> Path:
    return photos_sample(cache_dir)


def recipe(args: argparse.Namespace) -> dict:
    keys = list(DEFAULTS) + ["seed"]
    return {k: getattr(args, k) for k in keys}


def run(ctx: TaskContext, args: argparse.Namespace) -> dict:
    resolve_defaults(args, DEFAULTS, PRESETS.get(args.preset), SAMPLE if ctx.is_sample else None)
    amp_dtype(args.amp, ctx.device)  # fp16 without CUDA: refused before any data is read
    train_eval, val_set = labelled_splits(ctx.data_root, args.image_size)
    train_set = train_dataset(Path(train_eval.root), args)
    backbone = ctx.load_backbone()
    torch.manual_seed(args.seed)
    out = finetune(backbone, train_set, val_set, len(train_eval.classes), args, ctx.device, ctx.output_dir,
                   {"model": ctx.model_id(), "recipe": recipe(args), "data": str(ctx.data_root.resolve())})
    return {"metrics": {"top1": out["top1"], "top5": out["top5"]}, "history": out["history"],
            "effective": {"batch_size": out["batch_size"], "accum_iter": out["accum_iter"],
                          "processes": out["world_size"], "lr": out["lr"], "steps": out["steps"]},
            "num_train": len(train_set), "num_val": len(val_set), "classes": train_eval.classes}


def workload(args: argparse.Namespace, arch: str, world: int, train_images: int = IMAGENET_TRAIN) -> Workload:
    resolve_defaults(args, DEFAULTS, PRESETS.get(args.preset))
    if args.batch_size % (world * args.accum_iter):
        raise ValueError(f"--batch-size {args.batch_size} does not split into {world} processes x --accum-iter "
                         f"{args.accum_iter}")
    fixes = ("more GPUs", "--accum-iter N (each forward takes batch / (GPUs x N) images)") + \
        (("--amp bf16",) if args.amp == "none" else ())
    return Workload(arch, ((1, args.image_size, args.image_size),), args.batch_size // (world * args.accum_iter),
                    args.accum_iter, args.batch_size, images=args.epochs * train_images,
                    eval_images=args.epochs * IMAGENET_VAL, trains=True, optimizer="adamw", precision=args.amp,
                    resumable=True, memory_fixes=fixes)


SPEC = TaskSpec(name="finetune", help=HELP, headline="top1", add_arguments=add_arguments,
                builtin_sample=builtin_sample, run=run,
                defaults=DEFAULTS, presets=PRESETS, sample=SAMPLE, workload=workload,
                distributed=True)  # DDP: --batch-size is the global batch, split over ranks x --accum-iter
