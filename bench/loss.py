"""Benchmark the BAM loss: forward+backward time against baselines measured in the same run.

    python bench/loss.py                 # CPU: the official recipe's per-GPU scale, a CPU scale, the step fraction
    python bench/loss.py --device cuda   # the same on a GPU

The baseline, ``view_pair_loop_loss`` below, is our own rewrite of the official per-view-pair loop, not the
official code (which needs torch.distributed, CUDA and the diffdist package): it follows the structure of
``BAMLoss.forward`` / ``BAMLoss.compute_loss`` in bam/bam_loss.py of DanielShalam/BAM (normalise, one
``[views, targets]`` product, a positive mask built by a Python loop over images as ``get_positive_mask`` in
bam/masks.py does and kept across calls as ``self.pos_mask`` is, then a cross-entropy per (target view, source
view) pair), on one process, without top-k (``top_k=0``), and with our Sinkhorn (``bam.sinkhorn``) in place of
the official ``distributed_sinkhorn``, so the two sides differ only in how the loss is laid out.

Figures:
  1. the per-GPU scale of the official ViT-S/16 recipe (scripts/pretrain/vit_small.slurm: 256 images per GPU, 2 + 6
     crops, 4096-dim projector, 2 target crops; top-k off on both sides here, the recipe uses 128): ours vs the
     rewrite of the official per-view-pair loop, forward + backward;
  2. a CPU scale (8 crops x 64 images, 256-dim): the same pair, and the naive float64 reference of the tests (pure
     Python loops; the correctness yardstick, one forward call) against our forward alone;
  3. the loss as a fraction of a ViT-S/16 training step (backbone + 3x4096 projector, 2x224 + 6x96 crops): the step
     and, timed alone, the loss forward + backward on a ``z`` of the step's shape.
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


def official_mask(b: int, n_crops: int, n_tgt: int, device) -> torch.Tensor:
    """The positive mask as bam/masks.py ``get_positive_mask`` builds it (one process): a loop over images, then the
    rows repeated for every crop; ``[n_crops*b, n_tgt*b]`` after the column slice ``compute_loss`` applies."""
    mask = torch.zeros(b, b * n_crops, dtype=torch.bool, device=device)
    starts = torch.arange(n_crops, device=device) * b
    for i in range(b):
        mask[i, starts + i] = True
    return mask.repeat(n_crops, 1)[:, : n_tgt * b]


def view_pair_loop_loss(z, mask, n_crops, n_large=2, n_tgt=2, reg=0.05, temperature=0.1, iters=3):
    """Our rewrite (not the official code) of the per-view-pair loop of ``BAMLoss`` in bam/bam_loss.py of
    DanielShalam/BAM, one process, ``top_k=0``. ``z: [n_crops*B, D]``; ``mask``: from ``official_mask``, built once
    (the official loss caches it)."""
    b = z.shape[0] // n_crops
    z = F.normalize(z, dim=-1)
    scores = z @ z[: n_tgt * b].t()
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


def ours_vs_loop(ours, z, repeats) -> tuple[float, float, float]:
    """(ours, the loop rewrite) forward + backward seconds on the same ``z``, and |loss difference|."""
    z = z.requires_grad_(True)
    mask = official_mask(z.shape[0] // 8, 8, 2, z.device)  # built once, outside the timing, as the official caches it

    def loop(x):
        return view_pair_loop_loss(x, mask, 8)

    diff = abs(ours(z).item() - loop(z).item())
    return timed(fwd_bwd(ours, z), z.device, repeats), timed(fwd_bwd(loop, z), z.device, repeats), diff


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
    label = "rewrite of the official per-view-pair loop"
    print("\n1. the official recipe's per-GPU scale: z [8 x 256, 4096], 2 target crops, forward + backward")
    t_ours, t_loop, diff = ours_vs_loop(ours, torch.randn(8 * 256, 4096, device=device), args.repeats)
    print(f"   ours {t_ours * 1e3:8.1f} ms   {label} {t_loop * 1e3:8.1f} ms   "
          f"ratio x{t_loop / t_ours:.2f}   |loss difference| {diff:.1e}")

    print("\n2. CPU scale: z [8 x 64, 256]")
    z = torch.randn(8 * 64, 256, device=device)
    t_ours, t_loop, diff = ours_vs_loop(ours, z, args.repeats)
    print(f"   forward + backward: ours {t_ours * 1e3:8.2f} ms   {label} {t_loop * 1e3:8.2f} ms   "
          f"ratio x{t_loop / t_ours:.2f}   |loss difference| {diff:.1e}")
    with torch.no_grad():
        t_fwd = timed(lambda: ours(z), device, args.repeats)
    zd = z.detach().double().cpu().numpy()
    t0 = time.perf_counter()
    reference_bam_loss(zd, n_crops=8, n_large=2, n_tgt=2, reg=0.05, temp=0.1, iters=3, top_k=0, pm=True)
    t_ref = time.perf_counter() - t0
    print(f"   forward only: ours {t_fwd * 1e3:8.2f} ms   naive float64 reference of the tests (one call) "
          f"{t_ref * 1e3:8.0f} ms   ratio x{t_ref / t_fwd:.0f}")

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
    print(f"   step {t_step * 1e3:8.0f} ms ({8 * b / t_step:.1f} crops/s)   loss fwd+bwd, timed alone on z [8 x {b}, "
          f"4096], {t_loss * 1e3:6.2f} ms = {100 * t_loss / t_step:.2f}% of the step")


if __name__ == "__main__":
    main()
