"""``python eval/run.py --task knn``: DINO's weighted k-NN on frozen [CLS] features of ``train/`` and ``val/``."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch.nn.functional as F

from bam.cli import number, number_list
from bam.images import labelled_splits
from bam.samples.photos import photos_sample
from eval.budget import IMAGENET_TRAIN, IMAGENET_VAL, Workload
from eval.context import TaskContext
from eval.tasks import TaskSpec
from transfer.classification.knn import BACKENDS, knn_classify
from transfer.features import cached_slots

logger = logging.getLogger(__name__)
HELP = "weighted k-NN classification on frozen features (DINO's protocol), top-1 / top-5 for several k"


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--k", type=number_list(int, ge=1), default="10,20,100,200",
                       help="comma-separated numbers of neighbours")
    group.add_argument("--knn-temperature", type=number(float, gt=0), default=0.07, help="vote weight exp(cosine / T)")
    group.add_argument("--knn-backend", default="torch", choices=BACKENDS,
                       help="exact search by blocked matmul (torch) or faiss's IndexFlatIP (extra 'faiss')")
    group.add_argument("--image-size", type=number(int, ge=1), default=224,
                       help="resize the short side to size*8/7, crop size")
    group.add_argument("--batch-size", type=number(int, ge=1), default=64, help="images per forward pass")
    group.add_argument("--num-workers", type=number(int, ge=0), default=2, help="DataLoader workers")


def builtin_sample(cache_dir: Path) -> Path:
    return photos_sample(cache_dir)


def run(ctx: TaskContext, args: argparse.Namespace) -> dict:
    try:
        ks = sorted({int(k) for k in args.k.split(",")})
    except ValueError:
        raise ValueError(f"--k {args.k!r} must be comma-separated integers, e.g. 10,20,100,200") from None
    train_set, val_set = labelled_splits(ctx.data_root, args.image_size)
    backbone = ctx.load_backbone().to(ctx.device).eval()
    feats = {}
    for name, dataset in (("train", train_set), ("val", val_set)):
        slots, labels = cached_slots(ctx.feature_cache, ctx.model_id(), backbone, dataset, ctx.device,
                                     args.batch_size, args.num_workers, 1, name)
        feats[name] = F.normalize(slots[:, 0].to(ctx.device), dim=1), labels.to(ctx.device)
    metrics, per_class = {}, {}
    for k in ks:
        res = knn_classify(*feats["train"], *feats["val"], k=k, temperature=args.knn_temperature,
                           num_classes=len(train_set.classes), backend=args.knn_backend)
        metrics[f"top1_k{k}"], metrics[f"top5_k{k}"] = res["top1"], res["top5"]
        per_class[k] = dict(zip(train_set.classes, res["per_class_top1"]))
        logger.info("k=%d: top-1 %.2f%%, top-5 %.2f%%", k, res["top1"], res["top5"])
    shown = 20 if 20 in ks else ks[0]  # DINO's k
    return {"metrics": metrics, "num_train": len(train_set), "num_val": len(val_set), "classes": train_set.classes,
            "per_class_k": shown, "per_class_top1": per_class[shown]}


def workload(args: argparse.Namespace, arch: str, world: int) -> Workload:
    return Workload(arch, ((1, args.image_size, args.image_size),), args.batch_size, 1, args.batch_size * world,
                    images=IMAGENET_TRAIN + IMAGENET_VAL, note="frozen: one pass over train/ and val/ (not resumed); "
                    "the votes are not counted")


SPEC = TaskSpec(name="knn", help=HELP, headline="top1_k20", add_arguments=add_arguments,
                builtin_sample=builtin_sample, run=run, suite_args={"cache_features": True}, workload=workload,
                distributed=True)  # torchrun / srun: features extracted by every rank for its share of the images
