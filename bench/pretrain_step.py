"""Benchmark one BAM pretraining step of ViT-S/16 (2 x 224 + 6 x 96 crops, projector 3 x 4096, EMA teacher).

    python bench/pretrain_step.py [--batch 8] [--device cpu]

Prints images/s from the step time (the sum of the median times of its parts, each measured over --repeats steps
after a warm-up), the time split into data (multi-crop augmentation of real photographs, one process),
forward (student and teacher), loss, backward and optimizer (+ EMA), the achieved GFLOP/s of forward+backward
(FLOPs counted by torch.utils.flop_counter) and its ratio to a plain fp32 matmul measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image
from skimage import data as skdata
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bam import build_backbone  # noqa: E402
from bam.ema import ema_update_, make_teacher  # noqa: E402
from bam.loss import BAMLoss  # noqa: E402
from bam.projector import Projector  # noqa: E402
from pretrain.data import MultiCropAugmentation  # noqa: E402
from pretrain.model import BAMModel, build_optimizer  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_gflops(device, n=2048, repeats=10):
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0) / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="images per step (the recipe: 256 per GPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    photos = [Image.fromarray(np.asarray(f())).convert("RGB").resize((500, 375))
              for f in (skdata.astronaut, skdata.coffee, skdata.chelsea, skdata.rocket)]
    augment = MultiCropAugmentation(224, 96, (0.25, 1.0), (0.05, 0.25), 6)

    def make_batch():
        crops = [augment(photos[i % len(photos)]) for i in range(args.batch)]
        return [torch.stack([c[k] for c in crops]).to(device) for k in range(8)]

    model = BAMModel(build_backbone("vit_small_patch16_224"), Projector(384)).to(device)
    teacher = make_teacher(model)
    optimizer = build_optimizer("adamw", model)
    loss_fn = BAMLoss(8, top_k=128)
    times = {k: [] for k in ("data", "forward", "loss", "backward", "optimizer")}
    for rep in range(args.repeats + 1):  # the first is a warm-up
        t = [time.perf_counter()]
        crops = make_batch()
        t.append(time.perf_counter())
        z = model(crops)
        with torch.no_grad():
            zt = teacher(crops)
        sync(device)
        t.append(time.perf_counter())
        loss = loss_fn(z, zt)
        sync(device)
        t.append(time.perf_counter())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sync(device)
        t.append(time.perf_counter())
        optimizer.step()
        ema_update_(teacher, model, 0.996)
        sync(device)
        t.append(time.perf_counter())
        if rep:
            for k, a, b in zip(times, t, t[1:]):
                times[k].append(b - a)
    med = {k: statistics.median(v) for k, v in times.items()}
    total = sum(med.values())

    with FlopCounterMode(display=False) as counter:
        z = model(crops)
        with torch.no_grad():
            zt = teacher(crops)
        loss_fn(z, zt).backward()
    flops = counter.get_total_flops()
    compute = med["forward"] + med["loss"] + med["backward"]
    achieved = flops / compute / 1e9
    peak = matmul_gflops(device)

    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch} images "
          f"x (2 x 224 + 6 x 96)")
    no_data = args.batch / (total - med["data"])
    print(f"step (sum of the parts' medians) {total * 1e3:8.0f} ms   {args.batch / total:6.2f} images/s   "
          f"{no_data:6.2f} images/s over the parts other than data")
    for k, v in med.items():
        print(f"   {k:<10} {v * 1e3:8.0f} ms  {100 * v / total:5.1f}%")
    print(f"forward+loss+backward: {flops / 1e9:.0f} GFLOP in {compute:.2f} s = {achieved:.1f} GFLOP/s; "
          f"plain fp32 matmul (2048^3) {peak:.1f} GFLOP/s; ratio {achieved / peak:.2f}")


if __name__ == "__main__":
    main()
