"""Benchmark DAVIS propagation and scoring against baselines measured in the same run.

    python bench/davis.py [--frames 30] [--sequences 30]

1. Propagation frames/s from precomputed ViT-S/16 features at 480p (30 x 52 patches, D=384), both in this process
   with the same torch threads: ours against our own straightforward per-frame rewrite of the same algorithm
   (tests/transfer/reference_propagation.py, not the official code; it keeps the structure of
   eval_video_segmentation.py of DINO, copied in DanielShalam/BAM: dense affinities, an element-wise neighbourhood
   mask built with loops once per video, top-k threshold, a dense label product). A second baseline figure is the
   rewrite's measured time less its measured mask build. Both must give the same masks.
2. Scoring 30 sequences of 480p masks, like for like in two configurations, each measured in this run: ours with
   1 thread against vos-benchmark with 1 worker process, and ours with W threads against vos-benchmark with W
   worker processes (W = min(8, cores), ours' default). Both must give the same J-Mean per object.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.transfer.reference_propagation import straightforward_propagation  # noqa: E402
from transfer.davis.propagation import propagate_labels  # noqa: E402
from transfer.davis.scoring import evaluate  # noqa: E402


def smooth_features(t_len, h, w, d, seed=0):
    """Features with spatial and temporal structure (so propagation is not arbitrary): a drifting random field."""
    g = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.randn(1, d, h // 3 + 2, w // 3 + 2, generator=g), size=(h + 8, w + 8), mode="bilinear")
    frames = [base[0, :, (t // 4) % 8:(t // 4) % 8 + h, (t // 3) % 8:(t // 3) % 8 + w] for t in range(t_len)]
    noise = 0.1 * torch.randn(t_len, d, h, w, generator=g)
    return (torch.stack(frames) + noise).permute(0, 2, 3, 1).contiguous()


def bench_propagation(n_frames):
    h, w, d = 30, 52, 384
    feats = smooth_features(n_frames, h, w, d)
    first = torch.zeros(4, h, w)
    first[0] = 1
    for k, (r, cc) in enumerate([(5, 8), (15, 30), (22, 12)], start=1):
        first[:, r:r + 6, cc:cc + 9] = 0
        first[k, r:r + 6, cc:cc + 9] = 1
    t0 = time.perf_counter()
    ours = propagate_labels(feats, first)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref, t_mask = straightforward_propagation(feats, first)
    t_ref = time.perf_counter() - t0
    agree = (ours.argmax(1) == ref.argmax(1)).float().mean().item()
    fps_ours, fps_ref = (n_frames - 1) / t_ours, (n_frames - 1) / t_ref
    fps_ref_nomask = (n_frames - 1) / (t_ref - t_mask)
    print(f"1. propagation, {n_frames} frames of 30x52 patches, D=384, 3 objects")
    print(f"   ours {fps_ours:6.1f} frames/s   straightforward rewrite {fps_ref:5.1f} frames/s "
          f"(x{fps_ours / fps_ref:.1f}); its time less its per-video mask build {fps_ref_nomask:5.1f} frames/s "
          f"(x{fps_ours / fps_ref_nomask:.1f})")
    # near-ties at the top-k boundary may pick a different 5th entry after different float rounding
    print(f"   same masks: {agree * 100:.2f}% of patch labels agree; max |soft label difference| "
          f"{(ours - ref).abs().max().item():.1e}")


def bench_scoring(n_sequences, n_frames):
    from vos_benchmark.benchmark import benchmark

    from tests.eval.davis_fixtures import moving_ellipses, write_sequence

    tmp = Path(tempfile.mkdtemp(prefix="bench_davis_"))
    rng = np.random.default_rng(0)
    names = []
    for i in range(n_sequences):
        n_obj = 1 + i % 3
        gt = moving_ellipses(480, 854, n_frames, n_obj, np.random.default_rng(i))
        pred = moving_ellipses(480, 854, n_frames, n_obj, np.random.default_rng(i), jitter=4)
        pred = [np.where(rng.random(p.shape) < 0.001, 0, p).astype(np.uint8) for p in pred]
        write_sequence(tmp / "ann", f"s{i:02d}", gt)
        write_sequence(tmp / "pred", f"s{i:02d}", pred)
        names.append(f"s{i:02d}")
    workers = min(8, os.cpu_count() or 1)  # evaluate()'s default thread count
    print(f"\n2. scoring {n_sequences} sequences x {n_frames} frames at 480x854; {os.cpu_count()} cores")
    results = []
    for n in sorted({1, workers}):
        t0 = time.perf_counter()
        ours = evaluate(tmp / "ann", tmp / "pred", names, num_workers=n)
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        *_, (theirs,) = benchmark([str(tmp / "ann")], [str(tmp / "pred")], num_processes=n, verbose=False)
        t_vos = time.perf_counter() - t0
        diff = max(abs(ours["per_object"][f"{s}_{o}"]["J-Mean"] * 100 - iou[o]) for s, (iou, _) in theirs.items()
                   for o in iou)
        results.append(ours["metrics"])
        print(f"   ours, {n} thread{'s' if n > 1 else ''} {t_ours:6.2f} s   vos-benchmark, {n} worker "
              f"process{'es' if n > 1 else ''} {t_vos:6.2f} s   ratio x{t_vos / t_ours:.1f}   "
              f"max |J-Mean difference| {diff:.1e}")
    assert all(r == results[0] for r in results)
    shutil.rmtree(tmp)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=30, help="frames per video for the propagation figure")
    parser.add_argument("--sequences", type=int, default=30)
    parser.add_argument("--score-frames", type=int, default=20, help="frames per sequence for the scoring figure")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads")
    bench_propagation(args.frames)
    bench_scoring(args.sequences, args.score_frames)


if __name__ == "__main__":
    main()
