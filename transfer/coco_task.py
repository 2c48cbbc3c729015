"""``python eval/run.py --task coco``: COCO detection and instance segmentation (Mask R-CNN).

Engine ``torchvision`` (default, runs anywhere): torchvision's Mask R-CNN on our backbone (ViTDet's simple
feature pyramid for ViTs, FPN for ResNets), trained by iterations with warm-up and step decay, evaluated with
pycocotools' COCOeval. Engine ``detectron2``: our weights exported to detectron2's format and detectron2's own
trainer and evaluator on the repo's configs (``transfer/configs/detectron2``); ``--export-only`` writes the
weights file without detectron2.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from bam.checkpoint import latest_path, load_file, remove_stale_temporaries, save_atomic
from bam.distributed import get_dist_info
from eval.context import TaskContext
from eval.options import number, resolve_defaults
from transfer.coco_data import CocoInstances, coco_metrics, collate, load_coco, to_coco_results
from transfer.detection import build_mask_rcnn
from transfer.detectron2_export import write_detectron2_weights
from transfer.finetune import layer_decay_groups, set_group_lrs, with_drop_path
from transfer.samples import coco as coco_sample
from transfer.samples.cache import ensure_generated

logger = logging.getLogger(__name__)
DISTRIBUTED = True  # torchrun / srun: DDP training, evaluation sharded over ranks
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
            "amp": "none", "num_workers": 4, "checkpoint_period": 5000, "eval_batch_size": 2,
            "proposals": "2000,1000,1000,1000", "roi_batch": 512, "detections_per_image": 100, "drop_path": 0.1}
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
                       help="training iterations (default 90000, the 1x)")
    group.add_argument("--batch-size", type=number(int, ge=1), default=None, help="images per iteration (default 16)")
    group.add_argument("--lr", type=number(float, gt=0), default=None, help="peak learning rate (default 0.02)")
    group.add_argument("--optimizer", default=None, choices=["sgd", "adamw"], help="default sgd (momentum 0.9)")
    group.add_argument("--weight-decay", type=number(float, ge=0), default=None, help="default 1e-4")
    group.add_argument("--steps", default=None, help="iterations where the lr drops x0.1 (default 60000,80000)")
    group.add_argument("--warmup-iters", type=number(int, ge=0), default=None,
                       help="linear warm-up from 0.001 x lr (default 1000)")
    group.add_argument("--layer-decay", type=number(float, gt=0, le=1), default=None,
                       help="ViT layer-wise lr decay, 1 = off (default 1)")
    group.add_argument("--min-size", type=number(int, ge=1), default=None,
                       help="short side of training/test images (default 800)")
    group.add_argument("--max-size", type=number(int, ge=1), default=None, help="cap on the long side (default 1333)")
    group.add_argument("--proposals", default=None, help="RPN proposals pre/post NMS in training, then in testing "
                       "(default 2000,1000,1000,1000: detectron2's FPN values)")
    group.add_argument("--roi-batch", type=number(int, ge=1), default=None, help="sampled RoIs per image (default 512)")
    group.add_argument("--detections-per-image", type=number(int, ge=1), default=None, help="default 100")
    group.add_argument("--drop-path", type=number(float, ge=0, lt=1), default=None,
                       help="ViT stochastic depth (default 0.1, ViTDet)")
    group.add_argument("--amp", default=None, choices=["none", "bf16", "fp16"], help="autocast (default none)")
    group.add_argument("--checkpoint-period", type=number(int, ge=1), default=None,
                       help="iterations between checkpoints "
                       "(default 5000)")
    group.add_argument("--eval-batch-size", type=number(int, ge=1), default=None,
                       help="images per test forward (default 2)")
    group.add_argument("--train-split", default="train2017",
                       help="read <data>/<split>/ and <data>/annotations/instances_<split>.json")
    group.add_argument("--val-split", default="val2017", help="the evaluated split")
    group.add_argument("--num-workers", type=number(int, ge=0), default=None, help="DataLoader workers (default 4)")


def builtin_sample(cache_dir: Path) -> Path:
    return ensure_generated(cache_dir / coco_sample.sample_dirname(), coco_sample.generate)


def lr_factor(it: int, warmup: int, steps: list[int]) -> float:
    """detectron2's WarmupMultiStepLR: linear warm-up from 0.001, then x0.1 at each step."""
    warm = 0.001 + (1 - 0.001) * it / warmup if it < warmup else 1.0
    return warm * 0.1 ** sum(it >= s for s in steps)


def mask_rcnn_options(args: argparse.Namespace) -> dict:
    try:
        pre_train, post_train, pre_test, post_test = (int(v) for v in str(args.proposals).split(","))
    except ValueError:
        raise ValueError(f"--proposals {args.proposals!r} must be four integers: pre/post NMS in training, "
                         f"then in testing") from None
    return {"rpn_pre_nms_top_n_train": pre_train, "rpn_post_nms_top_n_train": post_train,
            "rpn_pre_nms_top_n_test": pre_test, "rpn_post_nms_top_n_test": post_test,
            "box_batch_size_per_image": args.roi_batch, "box_detections_per_img": args.detections_per_image}


@torch.no_grad()
def evaluate(model, dataset: CocoInstances, device: torch.device, batch_size: int, workers: int) -> tuple[dict, int]:
    """COCOeval of ``model`` on ``dataset``; under a process group each rank runs every world_size-th image and
    the detections are gathered before scoring (every rank returns the same metrics)."""
    info = get_dist_info()
    model.eval()
    shard = Subset(dataset, range(info.rank, len(dataset), info.world_size)) if info.world_size > 1 else dataset
    results = []
    loader = DataLoader(shard, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    for images, targets in tqdm(loader, desc="coco eval", leave=False, dynamic_ncols=True, disable=info.rank > 0):
        outputs = model([im.to(device) for im in images])
        results += to_coco_results(outputs, [t["image_id"] for t in targets], dataset.cat_ids)
    if info.world_size > 1:
        parts: list = [None] * info.world_size
        torch.distributed.all_gather_object(parts, results)
        results = [r for part in parts for r in part]
    return coco_metrics(dataset.coco, results), len(results)


def train(model, train_set: CocoInstances, args: argparse.Namespace, device: torch.device, output_dir: Path,
          run_id: dict, backbone) -> None:
    """Train ``model`` in place; under a process group with DDP, each rank taking batch_size / world_size images
    of every global batch (DistributedSampler), rank 0 writing the log and the checkpoint."""
    info = get_dist_info()
    if args.batch_size % info.world_size:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of the {info.world_size} processes")
    groups = layer_decay_groups(model, backbone, args.weight_decay, args.layer_decay)
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999))
    if args.amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs CUDA; use --amp bf16 on CPU")
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    steps = [int(s) for s in str(args.steps).split(",") if s.strip()]
    ckpt_path, start = latest_path(output_dir), 0
    if info.rank == 0:
        remove_stale_temporaries(output_dir)
    run_id = {**json.loads(json.dumps(run_id, default=str)), "world_size": info.world_size}
    if ckpt_path.is_file():
        state = load_file(ckpt_path)
        if state.get("run_id") == run_id:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            start = state["iter"]
            logger.info("resuming detection training from %s (iteration %d)", ckpt_path, start)
        else:
            logger.warning("%s belongs to another run (other weights, data or schedule): starting over", ckpt_path)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if info.world_size > 1 else model
    sampler = DistributedSampler(train_set, info.world_size, info.rank, shuffle=True, seed=args.seed, drop_last=True)
    log_path = output_dir / "log.jsonl" if info.rank == 0 else Path(os.devnull)
    with open(log_path, "a" if start else "w") as log:
        it, epoch = start, 0
        bar = tqdm(total=args.iters, initial=start, desc="coco train", dynamic_ncols=True, disable=info.rank > 0)
        model.train()
        while it < args.iters:
            sampler.set_epoch(epoch)
            loader = DataLoader(train_set, batch_size=args.batch_size // info.world_size, sampler=sampler,
                                drop_last=True, collate_fn=collate, num_workers=args.num_workers)
            for images, targets in loader:
                if it >= args.iters:
                    break
                set_group_lrs(optimizer, args.lr * lr_factor(it, args.warmup_iters, steps))
                images = [im.to(device, non_blocking=True) for im in images]
                targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
                with autocast:
                    losses = net(images, targets)
                loss = sum(losses.values())
                if not math.isfinite(loss.item()):
                    raise ValueError(f"detection loss is {loss.item()} at iteration {it}; lower --lr (the last good "
                                     f"checkpoint is {ckpt_path})")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                it += 1
                bar.update()
                if it % 20 == 0 or it == args.iters:
                    log.write(json.dumps({"iter": it, "loss": loss.item(), **{k: v.item() for k, v in losses.items()},
                                          "lr": optimizer.param_groups[-1]["lr"]}) + "\n")
                    log.flush()
                    bar.set_postfix(loss=f"{loss.item():.3f}")
                if (it % args.checkpoint_period == 0 or it == args.iters) and info.rank == 0:
                    save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                 "scaler": scaler.state_dict(), "iter": it, "run_id": run_id}, ckpt_path)
            epoch += 1
        bar.close()


def run(ctx: TaskContext, args: argparse.Namespace) -> dict:
    resolve_defaults(args, DEFAULTS, PRESETS.get(args.preset), SAMPLE if ctx.is_sample else None)
    if args.engine == "detectron2" and not args.export_only:
        from transfer.detectron2_engine import require_detectron2
        require_detectron2()
    backbone = ctx.load_backbone()
    if args.export_only or args.engine == "detectron2":
        path = write_detectron2_weights(backbone, ctx.output_dir / "detectron2_weights.pkl")
        logger.info("wrote %s (detectron2's format)", path)
        if args.export_only:
            return {"metrics": {}, "detectron2_weights": str(path)}
        from transfer.detectron2_engine import run_detectron2
        return run_detectron2(ctx, args, backbone, path)
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
