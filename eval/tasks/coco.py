"""``python eval/run.py --task coco``: COCO detection and instance segmentation (Mask R-CNN).

Engine ``torchvision`` (default, runs anywhere): torchvision's Mask R-CNN on our backbone (ViTDet's simple
feature pyramid for ViTs, FPN for ResNets), trained by iterations with warm-up and step decay, evaluated with
pycocotools' COCOeval. Engine ``detectron2``: our weights exported to detectron2's format and detectron2's own
trainer and evaluator on the repo's configs (``transfer/configs/detectron2``); ``--export-only`` writes the
weights file without detectron2.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from bam.cli import number, resolve_defaults
from bam.samples import coco as coco_sample
from bam.samples.cache import ensure_generated
from bam.training import amp_dtype
from eval.budget import COCO_VAL, Workload
from eval.context import TaskContext
from eval.tasks import TaskSpec
from transfer.classification.finetune import with_drop_path
from transfer.coco.data import CocoInstances, load_coco
from transfer.coco.detectron2_export import write_detectron2_weights
from transfer.coco.mask_rcnn import FPN_PROPOSALS, build_mask_rcnn, mask_rcnn_options
from transfer.coco.train import evaluate, train

logger = logging.getLogger(__name__)
HELP = "COCO detection + instance segmentation with Mask R-CNN (torchvision engine, or detectron2), COCOeval AP"
# Schedules (detectron2 model zoo: 1x = 90k iterations of 16 images, lr 0.02, steps at 60k / 80k, 1k warm-up;
# 3x = 270k, steps at 210k / 250k; ViTDet's COCO recipe: AdamW lr 1e-4, weight decay 0.1, layer decay 0.7,
# drop path 0.1, 64 images, 100 epochs = 184,375 iterations, steps at 163,889 / 177,546, 250 warm-up iterations)
PRESETS = {
    "1x": {"iters": 90_000, "batch_size": 16, "lr": 0.02, "optimizer": "sgd", "weight_decay": 1e-4,
           "steps": "60000,80000", "warmup_iters": 1000, "layer_decay": 1.0},
    "3x": {"iters": 270_000, "batch_size": 16, "lr": 0.02, "optimizer": "sgd", "weight_decay": 1e-4,
           "steps": "210000,250000", "warmup_iters": 1000, "layer_decay": 1.0},
    "vitdet_100ep": {"iters": 184_375, "batch_size": 64, "lr": 1e-4, "optimizer": "adamw", "weight_decay": 0.1,
                     "steps": "163889,177546", "warmup_iters": 250, "layer_decay": 0.7, "min_size": 1024,
                     "max_size": 1024},
}
DEFAULTS = {"preset": None, "iters": 90_000, "batch_size": 16, "lr": 0.02, "optimizer": "sgd", "weight_decay": 1e-4,
            "steps": "60000,80000", "warmup_iters": 1000, "layer_decay": 1.0, "min_size": 800, "max_size": 1333,
            "amp": "none", "clip_grad": 0.0, "num_workers": 4, "checkpoint_period": 5000, "eval_batch_size": 2,
            "proposals": FPN_PROPOSALS, "roi_batch": 512, "detections_per_image": 100, "drop_path": 0.1}
# the built-in sample: 256-pixel images, a few hundred iterations on a CPU
SAMPLE = {"iters": 200, "batch_size": 2, "lr": 2e-4, "optimizer": "adamw", "weight_decay": 0.05, "steps": "160",
          "warmup_iters": 20, "layer_decay": 0.75, "min_size": 256, "max_size": 256, "num_workers": 2,
          "checkpoint_period": 100, "proposals": "600,300,300,150", "roi_batch": 64, "detections_per_image": 20,
          "drop_path": 0.0}


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--engine", default="torchvision", choices=["torchvision", "detectron2"],
                       help="torchvision's Mask R-CNN (runs anywhere) or detectron2's trainer (install detectron2)")
    group.add_argument("--export-only", action="store_true",
                       help="write the backbone in detectron2's format (detectron2_weights.pkl) and stop")
    group.add_argument("--d2-model", default="fpn", choices=["fpn", "c4"],
                       help="detectron2 engine with a ResNet: Mask R-CNN R50-FPN or R50-C4 (ViTs: ViTDet)")
    group.add_argument("--preset", default=None, choices=sorted(PRESETS),
                       help="schedule: 1x / 3x (SGD, ResNets) or vitdet_100ep (AdamW + layer decay, ViTs)")
    group.add_argument("--iters", type=number(int, ge=1), default=None,
                       help="training iterations (the default is the 1x schedule)")
    group.add_argument("--batch-size", type=number(int, ge=1), default=None, help="images per iteration")
    group.add_argument("--lr", type=number(float, gt=0), default=None, help="peak learning rate")
    group.add_argument("--optimizer", default=None, choices=["sgd", "adamw"], help="sgd (momentum 0.9) or adamw")
    group.add_argument("--weight-decay", type=number(float, ge=0), default=None, help=None)
    group.add_argument("--steps", default=None, help="iterations where the lr drops x0.1")
    group.add_argument("--warmup-iters", type=number(int, ge=0), default=None,
                       help="linear warm-up from 0.001 x lr")
    group.add_argument("--layer-decay", type=number(float, gt=0, le=1), default=None,
                       help="ViT layer-wise lr decay, 1 = off")
    group.add_argument("--min-size", type=number(int, ge=1), default=None,
                       help="short side of training/test images")
    group.add_argument("--max-size", type=number(int, ge=1), default=None, help="cap on the long side")
    group.add_argument("--proposals", default=None, help="RPN proposals pre/post NMS in training, then in testing "
                       "(the default is detectron2's FPN values)")
    group.add_argument("--roi-batch", type=number(int, ge=1), default=None, help="sampled RoIs per image")
    group.add_argument("--detections-per-image", type=number(int, ge=1), default=None, help=None)
    group.add_argument("--drop-path", type=number(float, ge=0, lt=1), default=None,
                       help="ViT stochastic depth (ViTDet's)")
    group.add_argument("--amp", default=None, choices=["none", "bf16", "fp16"],
                       help="autocast (fp16 with a grad scaler, CUDA only)")
    group.add_argument("--clip-grad", type=number(float, ge=0), default=None,
                       help="gradient norm clip, 0 = off")
    group.add_argument("--checkpoint-period", type=number(int, ge=1), default=None,
                       help="iterations between checkpoints")
    group.add_argument("--eval-batch-size", type=number(int, ge=1), default=None,
                       help="images per test forward")
    group.add_argument("--train-split", default="train2017",
                       help="read <data>/<split>/ and <data>/annotations/instances_<split>.json")
    group.add_argument("--val-split", default="val2017", help="the evaluated split")
    group.add_argument("--num-workers", type=number(int, ge=0), default=None, help="DataLoader workers")


def builtin_sample(cache_dir: Path) -> Path:
    return ensure_generated(cache_dir / coco_sample.sample_dirname(), coco_sample.generate)


def run(ctx: TaskContext, args: argparse.Namespace) -> dict:
    resolve_defaults(args, DEFAULTS, PRESETS.get(args.preset), SAMPLE if ctx.is_sample else None)
    amp_dtype(args.amp, ctx.device)  # the one --amp rule, before anything is read or written
    if args.engine == "detectron2" and not args.export_only:
        from transfer.coco.detectron2_engine import require_detectron2
        require_detectron2()
    backbone = ctx.load_backbone()
    if args.engine == "detectron2" and not args.export_only and backbone.is_vit and args.clip_grad > 0:
        raise ValueError("--clip-grad: detectron2's ViTDet trainer (tools/lazyconfig_train_net.py) does not clip "
                         "gradients; use --engine torchvision, or --clip-grad 0")
    if args.export_only or args.engine == "detectron2":
        path = write_detectron2_weights(backbone, ctx.output_dir / "detectron2_weights.pkl")
        logger.info("wrote %s (detectron2's format)", path)
        if args.export_only:
            return {"metrics": {}, "detectron2_weights": str(path)}
        from transfer.coco.detectron2_engine import run_detectron2
        return run_detectron2(ctx.data_root, ctx.output_dir, ctx.device, args, backbone, path)
    root = ctx.data_root
    val_coco = load_coco(root / "annotations" / f"instances_{args.val_split}.json", root / args.val_split,
                         require_instances=False)
    train_coco = load_coco(root / "annotations" / f"instances_{args.train_split}.json", root / args.train_split)
    if sorted(train_coco.getCatIds()) != sorted(val_coco.getCatIds()):
        raise ValueError(f"{args.train_split} and {args.val_split} annotation files list different categories")
    train_set = CocoInstances(train_coco, root / args.train_split, train=True)
    val_set = CocoInstances(val_coco, root / args.val_split, train=False)
    if len(train_set) < args.batch_size:
        raise ValueError(f"--batch-size {args.batch_size} is larger than the {len(train_set)} training images with "
                         f"instances")
    torch.manual_seed(args.seed)
    if backbone.is_vit:
        backbone = with_drop_path(backbone, args.drop_path)
    model = build_mask_rcnn(backbone, len(train_set.cat_ids), args.min_size, args.max_size,
                            **mask_rcnn_options(args)).to(ctx.device)
    logger.info("Mask R-CNN on %s, %d categories, %d training images, %d iterations of %d", backbone.arch,
                len(train_set.cat_ids), len(train_set), args.iters, args.batch_size)
    train(model, train_set, args, ctx.device, ctx.output_dir,
          {"model": ctx.model_id(), "data": str(root.resolve()), "schedule": {k: getattr(args, k) for k in DEFAULTS}},
          backbone)
    metrics, n_dets = evaluate(model, val_set, ctx.device, args.eval_batch_size, args.num_workers)
    logger.info("bbox AP %.2f, segm AP %.2f (%d detections on %d images)", metrics["bbox/AP"], metrics["segm/AP"],
                n_dets, len(val_set))
    return {"metrics": metrics, "engine": "torchvision", "num_train": len(train_set), "num_val": len(val_set),
            "categories": [c["name"] for c in train_coco.loadCats(train_set.cat_ids)], "detections": n_dets}


def workload(args: argparse.Namespace, arch: str, world: int) -> Workload:
    resolve_defaults(args, DEFAULTS, PRESETS.get(args.preset))
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} is not a multiple of the {world} processes")
    size = ((1, args.min_size, args.max_size),)  # the longest images: the short side resized to min, long to max
    return Workload(arch, size, args.batch_size // world, 1, args.batch_size, images=args.iters * args.batch_size,
                    eval_images=COCO_VAL, trains=True, optimizer=args.optimizer, precision=args.amp, resumable=True,
                    memory_fixes=("more GPUs",) + (("--amp bf16",) if args.amp == "none" else ()),
                    note="the backbone only: the FPN, RPN and RoI heads add memory and FLOPs not counted here")


SPEC = TaskSpec(name="coco", help=HELP, headline="bbox/AP", add_arguments=add_arguments,
                builtin_sample=builtin_sample, run=run, workload=workload,
                distributed=True,  # torchrun / srun: DDP training, evaluation sharded over ranks
                defaults=DEFAULTS, presets=PRESETS, sample=SAMPLE, suite_dataset="coco", suite_profile="gpu-1x8")
