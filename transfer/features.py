"""Frozen features for the frozen-backbone protocols (k-NN, linear grid, logistic regression), and their disk cache.

One forward pass gives every feature a protocol may ask for, stacked as ``[N, K, D]`` "slots":
for a ViT, the [CLS] token of each of the last ``n_blocks`` blocks (oldest first, each through the final norm, as
DINO) followed by the mean patch token of the last block; for a CNN, one slot, the globally pooled last stage.
``slots[:, n_blocks - 1]`` is what ``backbone(x)`` returns.

The cache key covers the checkpoint's sha256 (or the random-init seed), arch, the list of image files with their
sizes, the transform and the slot layout, so a changed input never reuses stale features.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from bam.backbones import Backbone
from bam.checkpoint import save_atomic
from bam.distributed import all_gather_rows, get_dist_info

logger = logging.getLogger(__name__)
CACHE_VERSION = 1
CACHED_BLOCKS = 4  # with the cache on, a ViT's last 4 blocks are stored (the linear grid's largest)


def feature_slots(backbone: Backbone, images: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """``[B, n_blocks + 1, D]`` for a ViT ([CLS] of the last n blocks, then the last block's mean patch token);
    ``[B, 1, D]`` for a CNN (its pooled features)."""
    if not backbone.is_vit:
        return backbone(images)[:, None]
    outs = backbone.get_intermediate_layers(images, n=n_blocks)
    return torch.stack([o["cls"] for o in outs] + [outs[-1]["patch"].mean(dim=1)], dim=1)


def slot_count(backbone: Backbone, n_blocks: int) -> int:
    return n_blocks + 1 if backbone.is_vit else 1


@torch.no_grad()
def extract_slots(backbone: Backbone, dataset: Dataset, device: torch.device, batch_size: int, workers: int,
                  n_blocks: int = 1, desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 feature slots ``[N, K, D]`` (see :func:`feature_slots`) and labels ``[N]`` of a labelled dataset.

    Under a process group each rank extracts every world_size-th image and the rows are gathered (the order is
    then rank-interleaved, the same for features and labels).
    """
    info = get_dist_info()
    shard = Subset(dataset, range(info.rank, len(dataset), info.world_size)) if info.world_size > 1 else dataset
    loader = DataLoader(shard, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda")
    feats, labels = [], []
    for images, target in tqdm(loader, desc=desc, unit="batch", dynamic_ncols=True, disable=desc is None):
        feats.append(feature_slots(backbone, images.to(device, non_blocking=True), n_blocks).float())
        labels.append(target.to(device))
    return all_gather_rows(torch.cat(feats)), all_gather_rows(torch.cat(labels))


def extract(backbone: Backbone, dataset: Dataset, device: torch.device, batch_size: int, workers: int,
            desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised [CLS] features ``[N, D]`` (what ``backbone(x)`` returns) and labels ``[N]``."""
    slots, labels = extract_slots(backbone, dataset, device, batch_size, workers, 1, desc)
    return F.normalize(slots[:, 0], dim=1), labels


def dataset_fingerprint(dataset: Any) -> str:
    """sha256 over an ImageFolder's (relative path, label, size in bytes) list (a Subset: its chosen samples)."""
    indices = None
    while isinstance(dataset, Subset):
        indices = [dataset.indices[i] for i in indices] if indices is not None else list(dataset.indices)
        dataset = dataset.dataset
    samples = dataset.samples if indices is None else [dataset.samples[i] for i in indices]
    h = hashlib.sha256()
    for path, label in samples:
        h.update(f"{os.path.relpath(path, dataset.root)}\0{label}\0{os.path.getsize(path)}\n".encode())
    return h.hexdigest()


class FeatureCache:
    """``<root>/<key>.pt`` files holding ``{"slots", "labels", "meta"}``; ``root=None`` disables caching."""

    def __init__(self, root: str | os.PathLike | None):
        self.root = Path(root) if root is not None else None

    @staticmethod
    def key(parts: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps({"v": CACHE_VERSION, **parts}, sort_keys=True, default=str).encode()) \
            .hexdigest()[:32]

    def get_or_compute(self, parts: dict[str, Any], compute) -> tuple[torch.Tensor, torch.Tensor]:
        if self.root is None:
            return compute()
        path = self.root / f"{self.key(parts)}.pt"
        if path.is_file():
            blob = torch.load(path, map_location="cpu", weights_only=True)
            logger.info("features from the cache: %s", path)
            return blob["slots"], blob["labels"]
        slots, labels = compute()
        if get_dist_info().rank == 0:
            save_atomic({"slots": slots.cpu(), "labels": labels.cpu(), "meta": json.loads(json.dumps(parts,
                        default=str))}, path)
            logger.info("features cached: %s (%.1f MB)", path, path.stat().st_size / 2**20)
        return slots, labels


def cached_slots(cache: FeatureCache, model_id: dict[str, Any], backbone: Backbone, dataset: Any,
                 device: torch.device, batch_size: int, workers: int, n_blocks: int, desc: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`extract_slots` through the cache, returned on the CPU (callers move what they use).

    With the cache on, a ViT's slots are stored for at least :data:`CACHED_BLOCKS` blocks, so every frozen
    protocol (k-NN: 1 block, linear: 1 and 4, logistic regression: 1) reuses one extraction; the returned slots
    hold the last ``n_blocks`` [CLS] tokens and the mean patch token either way. ``dataset`` must be an (optionally
    Subset of an) ImageFolder whose ``transform`` has a faithful ``repr`` (torchvision's do).
    """
    depth = len(backbone.model.blocks) if backbone.is_vit else 1
    if n_blocks > depth:
        raise ValueError(f"asked for the last {n_blocks} blocks but {backbone.arch} has {depth}")
    n_extract = min(max(n_blocks, CACHED_BLOCKS), depth) if cache.root is not None and backbone.is_vit else n_blocks
    base = dataset
    while isinstance(base, Subset):
        base = base.dataset
    parts = {"model": model_id, "data": dataset_fingerprint(dataset), "transform": repr(base.transform),
             "n_blocks": n_extract, "slots": slot_count(backbone, n_extract)}
    slots, labels = cache.get_or_compute(
        parts, lambda: extract_slots(backbone, dataset, device, batch_size, workers, n_extract, desc))
    if backbone.is_vit and n_extract > n_blocks:  # the last n_blocks [CLS] slots, then the patch mean
        slots = torch.cat([slots[:, n_extract - n_blocks:n_extract], slots[:, -1:]], dim=1)
    return slots.cpu(), labels.cpu()
