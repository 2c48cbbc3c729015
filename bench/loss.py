"""Benchmark the BAM loss: forward+backward time against baselines measured in the same run.

    python bench/loss.py                 # CPU: official per-GPU scale, a CPU scale, and the ViT-S/16 step fraction
    python bench/loss.py --device cuda   # the same on a GPU

Figures:
  1. official per-GPU scale (8 crops x 256 images, 4096-dim, 2 target crops): ours vs a straightforward
     implementation that loops over view pairs as the official code does;
  2. a CPU scale (8 crops x 64 images, 256-dim): ours vs the same loop version and vs the naive float64
     reference of the tests (pure Python loops; the correctness yardstick, timed once);
  3. the loss as a fraction of a ViT-S/16 training step (backbone + 3x4096 projector, 2x224 + 6x96 crops)
     on the same batch.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bam import build_backbone  # noqa: E402
from bam.loss import BAMLoss  # noqa: E402
from bam.projector import Projector  # noqa: E402
from bam.sinkhorn import self_optimal_transport  # noqa: E402
from tests.bam.reference import reference_bam_loss  # noqa: E402


def loop_loss(z, n_crops, n_large=2, n_tgt=2, reg=0.05, temperature=0.1, iters=3):
    """BAM as the official code computes it on one process: an explicit mask and a loop over view pairs."""
    b = z.shape[0] // n_crops
    z = F.normalize(z, dim=-1)
    scores = z @ z[: n_tgt * b].t()
    mask = torch.zeros(b, n_tgt * b, dtype=torch.bool, device=z.device)
    for i in range(b):
        mask[i, torch.arange(n_tgt, device=z.device) * b + i] = True
    mask = mask.repeat(n_crops, 1)
    with torch.no_grad():
        plan = self_optimal_transport(scores.detach(), reg, iters, mask, n_tgt)[: n_large * b].chunk(n_large)
    log_q = F.log_softmax((scores / temperature).masked_fill(mask, torch.finfo(z.dtype).min), -1).chunk(n_crops)
    keep = (~mask[:b]).to(z.dtype)
    loss = 0.0
    for v in range(n_large):
        sub = [-((plan[v] * log_q[u]) * keep).sum(-1).mean() for u in range(n_crops) if u != v]
        loss = loss + sum(sub) / len(sub)
    return loss / n_large


def timed(fn, device, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fwd_bwd(loss_fn, z):
    def run():
        z.grad = None
        loss_fn(z).backward()
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--step-batch", type=int, default=8, help="images for the ViT-S/16 step (256 on a GPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")

    ours = BAMLoss(n_crops=8)
    print("\n1. official per-GPU scale: z [8 x 256, 4096], 2 target crops")
    z = torch.randn(8 * 256, 4096, device=device, requires_grad=True)
    t_ours, t_loop = timed(fwd_bwd(ours, z), device, args.repeats), timed(fwd_bwd(lambda x: loop_loss(x, 8), z),
                                                                          device, args.repeats)
    print(f"   ours {t_ours * 1e3:8.1f} ms   loop version {t_loop * 1e3:8.1f} ms   speed-up x{t_loop / t_ours:.2f}")

    print("\n2. CPU scale: z [8 x 64, 256]")
    z = torch.randn(8 * 64, 256, device=device, requires_grad=True)
    t_ours, t_loop = timed(fwd_bwd(ours, z), device, args.repeats), timed(fwd_bwd(lambda x: loop_loss(x, 8), z),
                                                                          device, args.repeats)
    zd = z.detach().double().cpu().numpy()
    t0 = time.perf_counter()
    reference_bam_loss(zd, n_crops=8, n_large=2, n_tgt=2, reg=0.05, temp=0.1, iters=3, top_k=0, pm=True)
    t_ref = time.perf_counter() - t0
    print(f"   ours {t_ours * 1e3:8.2f} ms   loop version {t_loop * 1e3:8.2f} ms (x{t_loop / t_ours:.2f})   "
          f"naive reference (forward only) {t_ref * 1e3:8.0f} ms (x{t_ref / t_ours:.0f})")

    b = args.step_batch
    print(f"\n3. ViT-S/16 training step, {b} images x (2 x 224 + 6 x 96), projector 3 x 4096")
    backbone = build_backbone("vit_small_patch16_224").to(device)
    projector = Projector(384).to(device)
    params = list(backbone.parameters()) + list(projector.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    crops = [torch.randn(b, 3, 224, 224, device=device)] * 2 + [torch.randn(b, 3, 96, 96, device=device)] * 6

    def step():
        opt.zero_grad(set_to_none=True)
        feats = torch.cat([backbone(torch.cat(crops[:2])), backbone(torch.cat(crops[2:]))])
        z = projector(feats)
        ours(z).backward()
        opt.step()

    t_step = timed(step, device, max(2, args.repeats // 2))
    zb = torch.randn(8 * b, 4096, device=device, requires_grad=True)
    t_loss = timed(fwd_bwd(ours, zb), device, args.repeats)
    print(f"   step {t_step * 1e3:8.0f} ms ({8 * b / t_step:.1f} crops/s)   loss fwd+bwd {t_loss * 1e3:6.2f} ms   "
          f"= {100 * t_loss / t_step:.2f}% of the step")


if __name__ == "__main__":
    main()
