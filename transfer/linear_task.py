"""``python eval/run.py --task linear``: a grid of linear probes on the frozen backbone, trained in one pass.

Grid: learning rates x last-n-blocks x with/without the mean patch token. The head reported as ``top1`` is the one
with the best accuracy on a class-balanced held-out part of the training set; ``top1_best_on_val`` (the best head
judged on the validation set itself, optimistic) is reported beside it, named as such.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import torch
import torchvision.transforms.v2 as T
from torch.utils.data import DataLoader, Subset

from bam.checkpoint import save_atomic
from eval.context import TaskContext
from eval.options import parse_list, resolve_defaults
from pretrain.data import MEAN, STD, labelled_folder
from transfer.features import cached_slots, feature_slots
from transfer.labelled_data import labelled_splits, photos_sample
from transfer.linear import HeadSpec, LinearGrid, evaluate_grid, feature_batches, select_head, train_grid
from transfer.splits import holdout_split

logger = logging.getLogger(__name__)
HELP = "linear probes on frozen features: a grid of lrs x {1,4} blocks x avgpool trained in one pass, " \
       "selected on held-out training images"
DINOV2_LRS = "1e-5,2e-5,5e-5,1e-4,2e-4,5e-4,1e-3,2e-3,5e-3,1e-2,2e-2,5e-2,0.1"
DEFAULTS = {"lrs": DINOV2_LRS, "n_blocks": "1,4", "avgpool": "off,on", "bn_head": False, "augment": False,
            "epochs": 100, "batch_size": 1024, "holdout_fraction": 0.1, "image_size": 224,
            "extract_batch_size": 64, "num_workers": 2}
# the official BAM probe (DanielShalam/BAM scripts/linear/linear.slurm: ViT-B/16, 8 GPUs x 128)
PRESETS = {"bam_vitb": {"lrs": "0.002", "n_blocks": "1", "avgpool": "on", "bn_head": True, "augment": True,
                        "epochs": 100, "batch_size": 1024}}


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--preset", default=None, choices=sorted(PRESETS),
                       help="bam_vitb: the official BAM probe (1 block + avgpool, BN head, lr 0.002, augmented, "
                            "100 epochs, batch 1024); explicit flags override it")
    group.add_argument("--lrs", default=None, help=f"comma-separated base lrs, scaled by batch/256 "
                       f"(default DINOv2's {DINOV2_LRS})")
    group.add_argument("--n-blocks", default=None, help="comma-separated numbers of last blocks' [CLS] tokens "
                       "(default 1,4)")
    group.add_argument("--avgpool", default=None, help="off,on (default): heads without / with the mean patch token")
    group.add_argument("--bn-head", default=None, action=argparse.BooleanOptionalAction,
                       help="BatchNorm (no affine) before each head (default off)")
    group.add_argument("--augment", default=None, action=argparse.BooleanOptionalAction,
                       help="train on RandomResizedCrop + flip views through the backbone every epoch (DINO's "
                            "protocol, one backbone pass per batch for all heads) instead of cached centre crops "
                            "(default off)")
    group.add_argument("--epochs", type=int, default=None, help="default 100 (cosine to 0)")
    group.add_argument("--batch-size", type=int, default=None, help="head training batch (default 1024)")
    group.add_argument("--holdout-fraction", type=float, default=None,
                       help="class-balanced part of train/ held out to select the head (default 0.1)")
    group.add_argument("--image-size", type=int, default=None, help="crop size (default 224)")
    group.add_argument("--extract-batch-size", type=int, default=None, help="images per forward pass (default 64)")
    group.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default 2)")


def builtin_sample(cache_dir: Path) -> Path:
    return photos_sample(cache_dir)


def head_specs(args: argparse.Namespace, is_vit: bool) -> list[HeadSpec]:
    lrs = parse_list(args.lrs, float, "--lrs")
    blocks = parse_list(args.n_blocks, int, "--n-blocks")
    pools = parse_list(args.avgpool, bool, "--avgpool")
    if not is_vit:
        if blocks != [1] or pools != [False]:
            logger.warning("a CNN has one pooled feature: the grid uses n_blocks 1 without avgpool")
        blocks, pools = [1], [False]
    if min(blocks) < 1:
        raise ValueError(f"--n-blocks {args.n_blocks!r}: block counts must be >= 1")
    return [HeadSpec(lr, n, p) for n in sorted(set(blocks)) for p in sorted(set(pools)) for lr in lrs]


def augmented_batches(backbone, root: Path, indices: list[int], n_blocks: int, args, device: torch.device):
    """DINO's probe training views, each batch through the frozen backbone once for every head."""
    transform = T.Compose([T.ToImage(), T.RandomResizedCrop(args.image_size, antialias=True), T.RandomHorizontalFlip(),
                           T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD)])
    dataset = Subset(labelled_folder(root, transform), indices)

    def batches(epoch: int):
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=len(dataset) > args.batch_size,
                            num_workers=args.num_workers, pin_memory=device.type == "cuda",
                            generator=torch.Generator().manual_seed(args.seed * 100003 + epoch))
        for images, labels in loader:
            with torch.no_grad():
                slots = feature_slots(backbone, images.to(device, non_blocking=True), n_blocks).float()
            yield slots, labels.to(device, non_blocking=True)
    return batches


def run(ctx: TaskContext, args: argparse.Namespace) -> dict:
    resolve_defaults(args, DEFAULTS, PRESETS.get(args.preset))
    if not 0.0 <= args.holdout_fraction < 1.0:
        raise ValueError(f"--holdout-fraction {args.holdout_fraction} must be in [0, 1)")
    train_set, val_set = labelled_splits(ctx.data_root, args.image_size)
    backbone = ctx.load_backbone().to(ctx.device).eval().requires_grad_(False)
    specs = head_specs(args, backbone.is_vit)
    n_blocks = max(s.n_blocks for s in specs)
    train_idx, hold_idx = holdout_split(train_set.targets, args.holdout_fraction, args.seed)
    if args.holdout_fraction > 0 and not hold_idx:
        raise ValueError("--holdout-fraction leaves no held-out image; raise it or use 0 (select on val)")

    def frozen(dataset, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return cached_slots(ctx.feature_cache, ctx.model_id(), backbone, dataset, ctx.device, args.extract_batch_size,
                            args.num_workers, n_blocks, name)

    val_slots = frozen(val_set, "val")
    torch.manual_seed(args.seed)
    grid = LinearGrid(specs, backbone.embed_dim, len(train_set.classes), bn=args.bn_head).to(ctx.device)
    logger.info("training %d linear heads together for %d epochs on %d images (%d held out)%s", len(specs),
                args.epochs, len(train_idx), len(hold_idx), ", augmented views" if args.augment else "")
    if args.augment:  # training sees augmented views: only the held-out images need frozen features
        held_slots = frozen(Subset(train_set, hold_idx), "held-out") if hold_idx else None
        batches = augmented_batches(backbone, Path(train_set.root), train_idx, n_blocks, args, ctx.device)
    else:
        train_slots, train_labels = frozen(train_set, "train")
        held_slots = (train_slots[hold_idx], train_labels[hold_idx]) if hold_idx else None
        batches = feature_batches(train_slots[train_idx], train_labels[train_idx], args.batch_size, args.seed,
                                  ctx.device)
    log_path = ctx.output_dir / "log.jsonl"
    log_path.unlink(missing_ok=True)

    def on_epoch(epoch: int, loss: float) -> None:
        with open(log_path, "a") as f:
            f.write(json.dumps({"epoch": epoch, "mean_head_loss": loss}) + "\n")
        if epoch % max(1, args.epochs // 10) == 0 or epoch == args.epochs - 1:
            logger.info("epoch %d/%d: mean head loss %.4f", epoch + 1, args.epochs, loss)

    train_grid(grid, batches, args.epochs, args.batch_size, on_epoch)

    val = evaluate_grid(grid, *(t.to(ctx.device) for t in val_slots))
    if held_slots is not None:
        held = evaluate_grid(grid, *(t.to(ctx.device) for t in held_slots))
        chosen = select_head(held)
    else:
        logger.warning("--holdout-fraction 0: the head is selected on the validation set (optimistic)")
        held, chosen = None, select_head(val)
    best_val = select_head(val)
    heads = [{"name": s.name, "lr": s.lr, "n_blocks": s.n_blocks, "avgpool": s.avgpool,
              "holdout_top1": held[i]["top1"] if held else None, "val_top1": val[i]["top1"],
              "val_top5": val[i]["top5"]} for i, s in enumerate(specs)]
    save_atomic({"spec": dataclasses.asdict(specs[chosen]),
                 "bn_head": args.bn_head, "classes": train_set.classes, "arch": backbone.arch,
                 "state_dict": grid.heads[chosen].state_dict()}, ctx.output_dir / "linear_head.pth")
    logger.info("selected %s: held-out top-1 %s, val top-1 %.2f%% (best head on val: %s, %.2f%%)",
                specs[chosen].name, f"{held[chosen]['top1']:.2f}%" if held else "n/a", val[chosen]["top1"],
                specs[best_val].name, val[best_val]["top1"])
    metrics = {"top1": val[chosen]["top1"], "top5": val[chosen]["top5"],
               "holdout_top1": held[chosen]["top1"] if held else None,
               "top1_best_on_val": val[best_val]["top1"]}
    return {"metrics": metrics, "selected_head": specs[chosen].name, "selected_on": "holdout" if held else "val",
            "best_on_val_head": specs[best_val].name, "heads": heads, "num_train": len(train_idx),
            "num_holdout": len(hold_idx), "num_val": len(val_set), "classes": train_set.classes}
