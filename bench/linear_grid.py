"""Benchmark the linear-probe grid: N heads trained in one pass vs N separate runs, each measured here.

    python bench/linear_grid.py                 # CPU
    python bench/linear_grid.py --device cuda

Figures:
  1. augmented training (DINO's protocol, the backbone runs on every batch): ViT-S/16 at 224, a few batches;
     one pass feeding all N heads vs N runs of one head (each N-th run measured once and multiplied by N, as the
     runs are identical in cost), and the heads' share of a grid step;
  2. cached features (``--task linear`` default): 52 heads (DINOv2's 13 lrs x {1, 4} blocks x avgpool) on
     50k x 5 x 384 feature slots, one epoch, vs 52 one-head runs on the same slots.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bam import build_backbone  # noqa: E402
from transfer.features import feature_slots  # noqa: E402
from transfer.linear import HeadSpec, LinearGrid, feature_batches, train_grid  # noqa: E402
from transfer.linear_task import DINOV2_LRS  # noqa: E402

LRS = [float(v) for v in DINOV2_LRS.split(",")]
SPECS = [HeadSpec(lr, n, p) for n in (1, 4) for p in (False, True) for lr in LRS]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_epoch(specs, dim: int, classes: int, batches, batch: int, device) -> float:
    """Seconds for one epoch of a grid of ``specs`` heads over ``batches``."""
    grid = LinearGrid(specs, dim, classes).to(device)
    sync(device)
    t0 = time.perf_counter()
    train_grid(grid, batches, 1, batch)
    sync(device)
    return time.perf_counter() - t0


def augmented(device, batches: int, batch: int, classes: int) -> None:
    backbone = build_backbone("vit_small_patch16_224").to(device).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(batch, 3, 224, 224, generator=g).to(device),
             torch.randint(0, classes, (batch,), generator=g).to(device)) for _ in range(batches)]

    def stream(epoch):
        for images, labels in data:
            with torch.no_grad():
                slots = feature_slots(backbone, images, 4)
            yield slots, labels  # outside no_grad: the heads train

    def run(specs):
        return timed_epoch(specs, backbone.embed_dim, classes, stream, batch, device)

    run(SPECS[:1])  # warm-up
    one = run(SPECS[:1])
    grid = run(SPECS)
    n = len(SPECS)
    print(f"augmented, ViT-S/16 224px, {batches} batches of {batch}, {n} heads, {device}:")
    print(f"  one pass, all {n} heads      {grid:8.2f} s")
    print(f"  {n} separate one-head runs    {one * n:8.2f} s  ({one:.2f} s each)  "
          f"-> x{one * n / grid:.1f} for the grid")
    print(f"  the {n} heads' share of a grid step: {max(grid - one, 0.0) / grid:.1%}")


def cached(device, n: int, classes: int, batch: int) -> None:
    g = torch.Generator().manual_seed(0)
    slots = torch.randn(n, 5, 384, generator=g).to(device)
    labels = torch.randint(0, classes, (n,), generator=g).to(device)
    batches = feature_batches(slots, labels, batch, seed=0, device=device)

    def run(specs):
        return timed_epoch(specs, 384, classes, batches, batch, device)

    run(SPECS[:2])  # warm-up
    grid = run(SPECS)
    separate = sum(run([s]) for s in SPECS)
    print(f"cached features, {n} x 5 x 384, batch {batch}, {classes} classes, one epoch, {len(SPECS)} heads:")
    print(f"  one pass, all heads          {grid:8.2f} s")
    print(f"  {len(SPECS)} separate runs             {separate:8.2f} s  -> x{separate / grid:.1f} for the grid")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--cached-images", type=int, default=50_000)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"{torch.get_num_threads()} threads")
    augmented(device, args.batches, args.batch_size, args.classes)
    cached(device, args.cached_images, args.classes, 1024)


if __name__ == "__main__":
    main()
