"""Benchmark the linear-probe grid: 52 heads trained in one pass vs separate one-head runs on the same data.

    python bench/linear_grid.py                 # CPU
    python bench/linear_grid.py --device cuda
    python bench/linear_grid.py --batches 1 --cached-images 5000 --cached-separate 4   # a quick look

The grid is DINOv2's: 13 lrs x {1, 4} blocks x {with, without} avgpool = 52 heads, 4 head shapes of 13 heads each
(the lr does not change a head's cost).

Figures (every time printed is measured in this run, except the lines marked "estimate"):
  1. augmented training (DINO's protocol, the backbone runs on every batch): ViT-S/16 at 224, a few batches;
     one pass feeding all 52 heads, and ``--separate`` one-head runs measured one by one on the same batches (one
     per head shape, cycling); the 52 separate runs are not run: their time is an estimate, 13 x the measured time
     of one run of each head shape, and is printed as such, with the grid's ratio to it;
  2. cached features (``--task linear`` default): the 52 heads on 50k x 5 x 384 feature slots, one epoch, vs
     one-head runs on the same slots: all 52 measured by default (``--cached-separate 0``); with
     ``--cached-separate N`` only N are measured and the 52-run total is an estimate, printed as such.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bam import build_backbone  # noqa: E402
from eval.tasks.linear import DINOV2_LRS  # noqa: E402
from transfer.classification.linear import HeadSpec, LinearGrid, feature_batches, train_grid  # noqa: E402
from transfer.features import feature_slots  # noqa: E402

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


def separate_runs(run, count: int) -> tuple[list[float], float | None]:
    """Measure ``count`` one-head runs, cycling over the 4 head shapes; (their times, the 52-run estimate or None).

    The estimate is 13 x (one measured run of each shape), or None when not every shape was measured."""
    shapes = SPECS[::len(LRS)]  # one spec per (blocks, avgpool); SPECS is shape-major, 13 lrs each
    times = [run([shapes[i % len(shapes)]]) for i in range(count)]
    if count < len(shapes):
        return times, None
    return times, len(LRS) * sum(times[:len(shapes)])


def print_separate(times: list[float], estimate: float | None, grid: float) -> None:
    n = len(times)
    print(f"  {n} separate one-head runs, measured one by one   {sum(times):8.2f} s  "
          f"({', '.join(f'{t:.2f}' for t in times)} s)")
    print(f"  ratio: the measured {n} runs / the measured 52-head pass = x{sum(times) / grid:.2f}")
    if estimate is not None:
        print(f"  estimate, not measured: 52 separate runs = 13 x one measured run of each head shape = "
              f"{estimate:8.2f} s -> x{estimate / grid:.1f} for the grid")


def augmented(device, batches: int, batch: int, classes: int, n_separate: int) -> None:
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
    grid = run(SPECS)
    times, estimate = separate_runs(run, n_separate)
    print(f"augmented, ViT-S/16 224px, {batches} batches of {batch}, {device}:")
    print(f"  one pass, all {len(SPECS)} heads, measured                {grid:8.2f} s")
    print_separate(times, estimate, grid)
    one = min(times)
    print(f"  the heads' share of a grid pass, (grid - fastest one-head run) / grid: {max(grid - one, 0.0) / grid:.1%}")


def cached(device, n: int, classes: int, batch: int, n_separate: int) -> None:
    g = torch.Generator().manual_seed(0)
    slots = torch.randn(n, 5, 384, generator=g).to(device)
    labels = torch.randint(0, classes, (n,), generator=g).to(device)
    batches = feature_batches(slots, labels, batch, seed=0, device=device)

    def run(specs):
        return timed_epoch(specs, 384, classes, batches, batch, device)

    run(SPECS[:2])  # warm-up
    grid = run(SPECS)
    print(f"cached features, {n} x 5 x 384, batch {batch}, {classes} classes, one epoch:")
    print(f"  one pass, all {len(SPECS)} heads, measured                {grid:8.2f} s")
    if n_separate:
        times, estimate = separate_runs(run, n_separate)
        print_separate(times, estimate, grid)
    else:
        separate = sum(run([s]) for s in SPECS)
        print(f"  {len(SPECS)} separate one-head runs, measured one by one  {separate:8.2f} s  "
              f"-> x{separate / grid:.1f} for the grid")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--cached-images", type=int, default=50_000)
    parser.add_argument("--separate", type=int, default=4, help="one-head runs measured in figure 1 (>= 4 for the "
                        "52-run estimate: one per head shape)")
    parser.add_argument("--cached-separate", type=int, default=0, help="one-head runs measured in figure 2 (0: all 52)")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"{torch.get_num_threads()} threads")
    augmented(device, args.batches, args.batch_size, args.classes, args.separate)
    cached(device, args.cached_images, args.classes, 1024, args.cached_separate)


if __name__ == "__main__":
    main()
