"""``python eval/run.py --task knn``: DINO's weighted k-NN on frozen [CLS] features of ``train/`` and ``val/``."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from bam.backbones import Backbone
from bam.distributed import all_gather_rows, get_dist_info
from eval.context import TaskContext
from pretrain.data import EvalImageFolder, check_image_folder
from transfer.knn import knn_classify
from transfer.samples import photos
from transfer.samples.cache import ensure_generated

logger = logging.getLogger(__name__)
HELP = "weighted k-NN classification on frozen features (DINO's protocol), top-1 / top-5 for several k"


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--k", default="10,20,100,200", help="comma-separated numbers of neighbours")
    group.add_argument("--knn-temperature", type=float, default=0.07, help="vote weight exp(cosine / T)")
    group.add_argument("--image-size", type=int, default=224, help="resize the short side to size*8/7, crop size")
    group.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    group.add_argument("--num-workers", type=int, default=2, help="DataLoader workers")


def builtin_sample(cache_dir: Path) -> Path:
    return ensure_generated(cache_dir / photos.sample_dirname(), photos.generate)


@torch.no_grad()
def extract(backbone: Backbone, dataset, device: torch.device, batch_size: int, workers: int,
            desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised [CLS] features ``[N, D]`` and labels ``[N]`` of a labelled dataset.

    Under a process group each rank extracts every world_size-th image and the rows are gathered (the order is
    then rank-interleaved, the same for features and labels).
    """
    info = get_dist_info()
    shard = Subset(dataset, range(info.rank, len(dataset), info.world_size)) if info.world_size > 1 else dataset
    loader = DataLoader(shard, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda")
    feats, labels = [], []
    for images, target in tqdm(loader, desc=desc, unit="batch", dynamic_ncols=True, disable=desc is None):
        feats.append(F.normalize(backbone(images.to(device, non_blocking=True)).float(), dim=1))
        labels.append(target.to(device))
    return all_gather_rows(torch.cat(feats)), all_gather_rows(torch.cat(labels))


def run(ctx: TaskContext, args: argparse.Namespace) -> dict:
    try:
        ks = sorted({int(k) for k in args.k.split(",")})
    except ValueError:
        raise ValueError(f"--k {args.k!r} must be comma-separated integers, e.g. 10,20,100,200") from None
    train_root = check_image_folder(ctx.data_root / "train", "--data (train/)")
    val_root = check_image_folder(ctx.data_root / "val", "--data (val/)")
    train_set, val_set = EvalImageFolder(train_root, args.image_size), EvalImageFolder(val_root, args.image_size)
    if train_set.classes != val_set.classes:
        raise ValueError(f"{train_root} and {val_root} hold different class folders; they must match")
    backbone = ctx.load_backbone().to(ctx.device).eval()
    train_feats, train_labels = extract(backbone, train_set, ctx.device, args.batch_size, args.num_workers, "train")
    val_feats, val_labels = extract(backbone, val_set, ctx.device, args.batch_size, args.num_workers, "val")
    metrics, per_k = {}, {}
    for k in ks:
        res = knn_classify(train_feats, train_labels, val_feats, val_labels, k=k, temperature=args.knn_temperature,
                           num_classes=len(train_set.classes))
        per_k[k] = res
        metrics[f"top1_k{k}"], metrics[f"top5_k{k}"] = res["top1"], res["top5"]
        logger.info("k=%d: top-1 %.2f%%, top-5 %.2f%%", k, res["top1"], res["top5"])
    return {"metrics": metrics, "num_train": len(train_set), "num_val": len(val_set),
            "classes": train_set.classes}
