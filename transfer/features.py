"""Frozen features for the frozen-backbone protocols (k-NN, linear grid, logistic regression), and their disk cache.

One forward pass gives every feature a protocol may ask for, stacked as ``[N, K, D]`` "slots":
for a ViT, the [CLS] token of each of the last ``n_blocks`` blocks (oldest first, each through the final norm, as
DINO) followed by the mean patch token of the last block; for a CNN, one slot, the globally pooled last stage.
``slots[:, n_blocks - 1]`` is what ``backbone(x)`` returns.

The cache key covers the checkpoint's sha256 (or the random-init seed), arch, the list of image files with the
sha256 of their bytes, the transform and the slot layout, so a changed input never reuses stale features.
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
from bam.distributed import all_gather_rows, broadcast_from_rank0, get_dist_info

logger = logging.getLogger(__name__)
CACHE_VERSION = 2  # 2: images keyed by the sha256 of their bytes
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

    Under a process group each rank extracts every world_size-th image; every rank gets all rows back in the
    dataset's order (what one process would return, up to the float rounding of other batch compositions).
    """
    info = get_dist_info()
    shard = Subset(dataset, range(info.rank, len(dataset), info.world_size)) if info.world_size > 1 else dataset
    loader = DataLoader(shard, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda")
    feats, labels = [], []
    for images, target in tqdm(loader, desc=desc, unit="batch", dynamic_ncols=True,
                               disable=desc is None or info.rank > 0):
        feats.append(feature_slots(backbone, images.to(device, non_blocking=True), n_blocks).float())
        labels.append(target.to(device))
    if not feats:  # a rank with no image (fewer images than ranks)
        probe = feature_slots(backbone, dataset[0][0][None].to(device), n_blocks).float()
        feats, labels = [probe[:0]], [torch.zeros(0, dtype=torch.long, device=device)]
    slots, targets = all_gather_rows(torch.cat(feats)), all_gather_rows(torch.cat(labels))
    if info.world_size > 1:  # rank r held images r, r + W, ...: put every row back at its image's place
        order = torch.cat([torch.arange(r, len(dataset), info.world_size) for r in range(info.world_size)])
        slots[order.to(slots.device)], targets[order.to(targets.device)] = slots.clone(), targets.clone()
    return slots, targets


def extract(backbone: Backbone, dataset: Dataset, device: torch.device, batch_size: int, workers: int,
            desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised [CLS] features ``[N, D]`` (what ``backbone(x)`` returns) and labels ``[N]``."""
    slots, labels = extract_slots(backbone, dataset, device, batch_size, workers, 1, desc)
    return F.normalize(slots[:, 0], dim=1), labels


class FileDigests:
    """sha256 of image files, each streamed once: kept in ``<root>/file_digests.json`` by absolute path with the
    size and mtime it was computed for, and computed again when either changes."""

    def __init__(self, root: Path):
        self.path = root / "file_digests.json"
        self.table: dict[str, list] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.changed = False

    def __call__(self, path: str) -> str:
        st = os.stat(path)
        key = os.path.abspath(path)
        known = self.table.get(key)
        if known and known[0] == st.st_size and known[1] == st.st_mtime_ns:
            return known[2]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        self.table[key] = [st.st_size, st.st_mtime_ns, h.hexdigest()]
        self.changed = True
        return self.table[key][2]

    def save(self) -> None:
        if self.changed:
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.table))
            os.replace(tmp, self.path)
            self.changed = False


def dataset_fingerprint(dataset: Any, digest) -> str:
    """sha256 over an ImageFolder's (relative path, label, sha256 of the file's bytes) list (a Subset: its chosen
    samples): two data sets with the same names and sizes but other pixels never share features."""
    indices = None
    while isinstance(dataset, Subset):
        indices = [dataset.indices[i] for i in indices] if indices is not None else list(dataset.indices)
        dataset = dataset.dataset
    samples = dataset.samples if indices is None else [dataset.samples[i] for i in indices]
    h = hashlib.sha256()
    for path, label in samples:
        h.update(f"{os.path.relpath(path, dataset.root)}\0{label}\0{digest(path)}\n".encode())
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
        self.root.mkdir(parents=True, exist_ok=True)
        digests = FileDigests(self.root)
        parts = {**parts, "data": dataset_fingerprint(parts["data"], digests)}
        if get_dist_info().rank == 0:
            digests.save()
        path = self.root / f"{self.key(parts)}.pt"
        if broadcast_from_rank0(path.is_file()):  # every rank loads, or every rank extracts its share
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
    # "data" is fingerprinted by content, and only when the cache is on (it reads every file once)
    parts = {"model": model_id, "data": dataset, "transform": repr(base.transform),
             "n_blocks": n_extract, "slots": slot_count(backbone, n_extract)}
    slots, labels = cache.get_or_compute(
        parts, lambda: extract_slots(backbone, dataset, device, batch_size, workers, n_extract, desc))
    finite = torch.isfinite(slots).flatten(1).all(dim=1)
    if not finite.all():
        raise ValueError(f"the backbone gave non-finite features (NaN/inf) for {int((~finite).sum())} of the "
                         f"{len(finite)} {desc} images; its weights or the input images are broken")
    if backbone.is_vit and n_extract > n_blocks:  # the last n_blocks [CLS] slots, then the patch mean
        slots = torch.cat([slots[:, n_extract - n_blocks:n_extract], slots[:, -1:]], dim=1)
    return slots.cpu(), labels.cpu()
