"""``python eval/run.py --task linear``: a grid of linear probes on the frozen backbone, trained in one pass.

Grid: learning rates x last-n-blocks x with/without the mean patch token. The head reported as ``top1`` is the one
with the best accuracy on a class-balanced held-out part of the training set; ``top1_best_on_val`` (the best head
judged on the validation set itself, optimistic) is reported beside it, named as such.

``--select best_epoch_on_val`` (the ``bam_vitb`` preset) is the official probe's rule instead (DanielShalam/BAM
eval_linear.py:219-223, DINO's too): train on all of ``train/``, evaluate on ``val/`` after every epoch and report
the best of those accuracies, as ``top1_best_epoch_on_val`` with its ``best_epoch``.

The heads, their optimizer and schedule are saved to ``checkpoint.pth`` after every epoch and at a preemption signal
(after the step under way); the same command resumes from it and ends with the uninterrupted run's heads. Under
torchrun / SLURM tasks each rank extracts (or, with ``--augment``, sends through the backbone) its share of the
images and every rank steps the heads on the gathered batch: the numbers of one process.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path

import torch
import torchvision.transforms.v2 as T
from torch.utils.data import DataLoader, Subset

from bam.checkpoint import load_file, remove_stale_temporaries, save_atomic
from bam.cli import number, number_list, parse_list, resolve_defaults
from bam.distributed import all_gather_rows, barrier, get_dist_info
from bam.images import MEAN, STD, labelled_folder, labelled_splits
from bam.samples.photos import photos_sample
from bam.training import GlobalBatches, SeededSamples, derived_seed, keep_signals_for_the_main_process
from eval.budget import IMAGENET_TRAIN, IMAGENET_VAL, Workload
from eval.context import TaskContext
from eval.tasks import TaskSpec
from transfer.classification.linear import HeadSpec, LinearGrid, evaluate_grid, feature_batches, select_head, train_grid
from transfer.classification.splits import holdout_split
from transfer.features import cached_slots, feature_slots

logger = logging.getLogger(__name__)
HELP = "linear probes on frozen features: a grid of lrs x {1,4} blocks x avgpool trained in one pass, " \
       "selected on held-out training images"
DINOV2_LRS = "1e-5,2e-5,5e-5,1e-4,2e-4,5e-4,1e-3,2e-3,5e-3,1e-2,2e-2,5e-2,0.1"
DEFAULTS = {"lrs": DINOV2_LRS, "n_blocks": "1,4", "avgpool": "off,on", "bn_head": False, "augment": False,
            "epochs": 100, "batch_size": 1024, "holdout_fraction": 0.1, "select": "holdout", "image_size": 224,
            "extract_batch_size": 64, "num_workers": 2}
# The official BAM probe: DanielShalam/BAM scripts/linear/linear.slurm (L:line) run through eval_linear.py (E:line).
PRESETS = {"bam_vitb": {
    "lrs": "0.002",  # L:33 --lr 0.002, scaled by the global batch / 256 (E:176)
    "n_blocks": "1",  # L:36 --n_last_blocks 1
    "avgpool": "on",  # L:37 --avgpool_patchtokens true
    "bn_head": True,  # L:35 --bn_head true
    "augment": True,  # E:61-62 RandomResizedCrop(224) + RandomHorizontalFlip for training
    "epochs": 100,  # L:32 --epochs 100
    "batch_size": 1024,  # L:7-8 8 GPUs x L:34 --batch_size_per_gpu 128
    "holdout_fraction": 0.0,  # E:74-75 ImageFolder(train/): every training image trains the probe
    "select": "best_epoch_on_val",  # L:38 --val_freq 1, E:219-223 best_acc = max(best_acc, val acc1)
}}


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--preset", default=None, choices=sorted(PRESETS),
                       help="bam_vitb: the official BAM probe (1 block + avgpool, BN head, lr 0.002, augmented, "
                            "100 epochs, batch 1024, all of train/, best validation epoch); explicit flags override "
                            "it")
    group.add_argument("--lrs", type=number_list(float, gt=0), default=None,
                       help="comma-separated base lrs, scaled by batch/256 (the default is DINOv2's grid)")
    group.add_argument("--n-blocks", type=number_list(int, ge=1), default=None,
                       help="comma-separated numbers of last blocks' [CLS] tokens")
    group.add_argument("--avgpool", default=None, help="heads without (off) / with (on) the mean patch token")
    group.add_argument("--bn-head", default=None, action=argparse.BooleanOptionalAction,
                       help="BatchNorm (no affine) before each head")
    group.add_argument("--augment", default=None, action=argparse.BooleanOptionalAction,
                       help="train on RandomResizedCrop + flip views through the backbone every epoch (DINO's "
                            "protocol, one backbone pass per batch for all heads) instead of cached centre crops")
    group.add_argument("--epochs", type=number(int, ge=1), default=None, help="cosine annealing to 0 over them")
    group.add_argument("--batch-size", type=number(int, ge=1), default=None, help="head training batch")
    group.add_argument("--holdout-fraction", type=number(float, ge=0, lt=1), default=None,
                       help="class-balanced part of train/ held out to select the head")
    group.add_argument("--select", default=None, choices=["holdout", "best_epoch_on_val"],
                       help="holdout: the head with the best held-out accuracy after the last epoch; "
                            "best_epoch_on_val: the official probe's best validation accuracy over epochs")
    group.add_argument("--image-size", type=number(int, ge=1), default=None, help="crop size")
    group.add_argument("--extract-batch-size", type=number(int, ge=1), default=None,
                       help="images per forward pass")
    group.add_argument("--num-workers", type=number(int, ge=0), default=None, help="DataLoader workers")


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


def augmented_batches(backbone, root: Path, indices: list[int], n_blocks: int, batch: int, args, device: torch.device):
    """DINO's probe training views, each batch through the frozen backbone once for every head.

    Under a process group each rank sends its share of every global batch (:class:`bam.training.GlobalBatches`)
    through the backbone and the shares are gathered: every rank steps the heads on the whole batch, as one process
    would (BatchNorm heads see the global batch's statistics, as the official probe's SyncBatchNorm). Each view is
    seeded by its image and the epoch, whichever rank draws it.
    """
    transform = T.Compose([T.ToImage(), T.RandomResizedCrop(args.image_size, antialias=True), T.RandomHorizontalFlip(),
                           T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD)])
    dataset = Subset(labelled_folder(root, transform), indices)
    info, dtype = get_dist_info(), next(backbone.parameters()).dtype

    def batches(epoch: int, first: int = 0):
        sampler = GlobalBatches(len(dataset), batch, args.seed * 100003 + epoch, info.rank, info.world_size,
                                first_step=first)
        loader = DataLoader(SeededSamples(dataset, derived_seed(args.seed, epoch)), batch_sampler=sampler,
                            worker_init_fn=keep_signals_for_the_main_process,
                            num_workers=args.num_workers, pin_memory=device.type == "cuda")
        for images, labels in loader:
            with torch.no_grad():
                slots = feature_slots(backbone, images.to(device, dtype, non_blocking=True), n_blocks)
            yield all_gather_rows(slots), all_gather_rows(labels.to(device, non_blocking=True))
    return batches


def recipe(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in [*DEFAULTS, "seed"] if k not in ("extract_batch_size", "num_workers")}


def run(ctx: TaskContext, args: argparse.Namespace) -> dict:
    resolve_defaults(args, DEFAULTS, PRESETS.get(args.preset))
    if not 0.0 <= args.holdout_fraction < 1.0:
        raise ValueError(f"--holdout-fraction {args.holdout_fraction} must be in [0, 1)")
    info = get_dist_info()  # under torchrun: every rank extracts its share, rank 0 writes
    train_set, val_set = labelled_splits(ctx.data_root, args.image_size)
    backbone = ctx.load_backbone().to(ctx.device).eval().requires_grad_(False)
    specs = head_specs(args, backbone.is_vit)
    n_blocks = max(s.n_blocks for s in specs)
    train_idx, hold_idx = holdout_split(train_set.targets, args.holdout_fraction, args.seed)
    if args.holdout_fraction > 0 and not hold_idx:
        raise ValueError("--holdout-fraction leaves no held-out image; raise it or use 0 (select on val)")
    batch = args.batch_size
    if args.augment and len(train_idx) < batch:  # the global batch, split over the ranks
        batch = len(train_idx) - len(train_idx) % info.world_size
        logger.warning("only %d training images: batch size %d instead of %d", len(train_idx), batch, args.batch_size)
    if args.augment and batch % info.world_size:
        raise ValueError(f"--batch-size {batch} must be a multiple of the {info.world_size} processes (each sends "
                         "its share of the global batch through the backbone)")

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
        batches = augmented_batches(backbone, Path(train_set.root), train_idx, n_blocks, batch, args, ctx.device)
    else:
        train_slots, train_labels = frozen(train_set, "train")
        held_slots = (train_slots[hold_idx], train_labels[hold_idx]) if hold_idx else None
        batches = feature_batches(train_slots[train_idx], train_labels[train_idx], batch, args.seed, ctx.device)
    per_epoch = args.select == "best_epoch_on_val"
    val_on_device = [t.to(ctx.device) for t in val_slots]
    val_history: list[list[dict[str, float]]] = []
    records: list[dict] = []  # log.jsonl once trained: a failed run keeps the old one
    log_path = ctx.output_dir / ".log.jsonl.partial"
    ckpt_path, run_id = ctx.output_dir / "checkpoint.pth", json.loads(json.dumps(
        {"model": ctx.model_id(), "recipe": recipe(args), "data": str(ctx.data_root.resolve())}, default=str))
    resume = None
    if info.is_main:
        remove_stale_temporaries(ctx.output_dir)
    if ckpt_path.is_file():
        state = load_file(ckpt_path)
        if state.get("run_id") == run_id:
            resume, val_history, records = state["loop"], state["val_history"], state["records"]
            logger.info("resuming the linear probes from %s (epoch %d, step %d)", ckpt_path, resume["epoch"] + 1,
                        resume["iteration"])
        else:
            logger.warning("%s belongs to another run (other weights or recipe): starting over", ckpt_path)
    if info.is_main:
        log_path.write_text("".join(json.dumps(r) + "\n" for r in records))

    def on_epoch(epoch: int, loss: float) -> None:
        records.append({"epoch": epoch, "mean_head_loss": loss})
        if per_epoch:  # the official probe validates after every epoch
            val_history.append(evaluate_grid(grid, *val_on_device))
            records[-1]["val_top1"] = [r["top1"] for r in val_history[-1]]
        if info.is_main:
            with open(log_path, "a") as f:
                f.write(json.dumps(records[-1]) + "\n")
        if epoch % max(1, args.epochs // 10) == 0 or epoch == args.epochs - 1:
            logger.info("epoch %d/%d: mean head loss %.4f", epoch + 1, args.epochs, loss)

    def save(loop: dict) -> None:  # the heads are the same on every rank: rank 0 writes them
        if info.is_main:
            save_atomic({"loop": loop, "val_history": val_history, "records": records, "run_id": run_id}, ckpt_path)
        barrier()

    train_grid(grid, batches, args.epochs, batch, on_epoch, resume, save)
    if info.is_main:
        os.replace(log_path, ctx.output_dir / "log.jsonl")
    if per_epoch:
        chosen, outcome = _best_epoch_outcome(val_history, specs, train_set, len(train_idx), len(val_set))
        if info.is_main:
            _save_head(grid, specs, chosen, args, train_set.classes, backbone.arch, ctx.output_dir)  # as trained
        return outcome

    val = evaluate_grid(grid, *val_on_device)
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
    if info.is_main:
        _save_head(grid, specs, chosen, args, train_set.classes, backbone.arch, ctx.output_dir)
    logger.info("selected %s: held-out top-1 %s, val top-1 %.2f%% (best head on val: %s, %.2f%%)",
                specs[chosen].name, f"{held[chosen]['top1']:.2f}%" if held else "n/a", val[chosen]["top1"],
                specs[best_val].name, val[best_val]["top1"])
    metrics = {"top1": val[chosen]["top1"], "top5": val[chosen]["top5"],
               "holdout_top1": held[chosen]["top1"] if held else None,
               "top1_best_on_val": val[best_val]["top1"]}
    return {"metrics": metrics, "selected_head": specs[chosen].name, "selected_on": "holdout" if held else "val",
            "best_on_val_head": specs[best_val].name, "heads": heads, "num_train": len(train_idx),
            "num_holdout": len(hold_idx), "num_val": len(val_set), "batch_size": batch, "classes": train_set.classes}


def _save_head(grid: LinearGrid, specs: list[HeadSpec], chosen: int, args: argparse.Namespace, classes: list[str],
               arch: str, output_dir: Path) -> None:
    save_atomic({"spec": dataclasses.asdict(specs[chosen]), "bn_head": args.bn_head, "classes": classes, "arch": arch,
                 "state_dict": grid.heads[chosen].state_dict()}, output_dir / "linear_head.pth")


def _best_epoch_outcome(history: list[list[dict[str, float]]], specs: list[HeadSpec], train_set, num_train: int,
                        num_val: int) -> tuple[int, dict]:
    """The official probe's number: the best validation top-1 over epochs (and heads), with where it was reached."""
    epoch, head = max(((e, h) for e in range(len(history)) for h in range(len(specs))),
                      key=lambda eh: (history[eh[0]][eh[1]]["top1"], -eh[0], -eh[1]))
    best = history[epoch][head]
    logger.info("best validation epoch: %d (%s): top-1 %.2f%% (last epoch: %.2f%%)", epoch + 1, specs[head].name,
                best["top1"], history[-1][head]["top1"])
    metrics = {"top1_best_epoch_on_val": best["top1"], "top5_at_best_epoch": best["top5"], "best_epoch": epoch + 1,
               "top1_last_epoch": history[-1][head]["top1"]}
    heads = [{"name": s.name, "lr": s.lr, "n_blocks": s.n_blocks, "avgpool": s.avgpool,
              "val_top1_per_epoch": [h[i]["top1"] for h in history]} for i, s in enumerate(specs)]
    return head, {"metrics": metrics, "selected_head": specs[head].name, "selected_on": "best_epoch_on_val",
                  "heads": heads, "num_train": num_train, "num_holdout": 0, "num_val": num_val,
                  "classes": train_set.classes}


def workload(args: argparse.Namespace, arch: str, world: int) -> Workload:
    resolve_defaults(args, DEFAULTS, PRESETS.get(args.preset))
    size = ((1, args.image_size, args.image_size),)
    if args.augment:  # every epoch's views through the frozen backbone; the heads' steps are not counted
        if args.batch_size % world:
            raise ValueError(f"--batch-size {args.batch_size} is not a multiple of the {world} processes")
        return Workload(arch, size, args.batch_size // world, 1, args.batch_size, images=args.epochs * IMAGENET_TRAIN,
                        eval_images=IMAGENET_VAL, resumable=True, memory_fixes=("more GPUs",),
                        note="augmented views through the frozen backbone every epoch; the heads are not counted")
    return Workload(arch, size, args.extract_batch_size, 1, args.batch_size, images=IMAGENET_TRAIN + IMAGENET_VAL,
                    memory_fixes=("a smaller --extract-batch-size",),
                    note="one pass extracts the features (not resumed); the heads then train on them in minutes")


SPEC = TaskSpec(name="linear", help=HELP, headline="top1", add_arguments=add_arguments,
                builtin_sample=builtin_sample, run=run,
                defaults=DEFAULTS, presets=PRESETS, suite_args={"cache_features": True}, workload=workload,
                distributed=True)  # extraction (or the augmented views' forward) sharded over ranks
