"""``python eval/run.py --task davis``: propagate first-frame masks through DAVIS-2017 videos and score them."""
from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path

from tqdm import tqdm

from bam.backbones import Backbone
from bam.cli import number
from bam.distributed import DistInfo, balanced_shards, broadcast_from_rank0, fail_together, get_dist_info
from bam.samples import davis as davis_sample
from bam.samples.cache import ensure_generated
from eval.budget import DAVIS_VAL_FRAMES, Workload
from eval.context import TaskContext
from eval.tasks import TaskSpec
from transfer.davis.data import (
    Sequence,
    frame_size,
    load_sequence,
    original_size,
    read_first_annotation,
    sequence_names,
    warn_about_id_gaps,
    write_overlay,
)
from transfer.davis.scoring import evaluate, write_csvs
from transfer.davis.video import propagate_sequence

logger = logging.getLogger(__name__)
HELP = "DAVIS-2017 semi-supervised video object segmentation by label propagation (J&F)"


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--set", default="val", choices=["val", "train"], help="ImageSets/2017/<set>.txt to run")
    group.add_argument("--sequences", default=None, help="comma-separated sequence names (default: the whole set)")
    group.add_argument("--predictions", default=None, help="score the indexed PNGs in this folder (<seq>/<frame>.png) "
                       "instead of propagating: any method's results, as the official evaluation_method.py")
    group.add_argument("--n-last-frames", type=number(int, ge=0), default=7,
                       help="predicted frames kept as context besides frame 0")
    group.add_argument("--size-mask-neighborhood", type=number(int, ge=0), default=12,
                       help="only propagate from patches at most this many rows/columns away (0: no restriction)")
    group.add_argument("--topk", type=number(int, ge=1), default=5, help="context patches kept per target patch")
    group.add_argument("--temperature", type=number(float, gt=0), default=0.1,
                       help="affinity exp(cosine / temperature)")
    group.add_argument("--n-blocks", type=number(int, ge=1), default=1,
                       help="concatenate the patch tokens of the last n blocks")
    group.add_argument("--short-side", type=number(int, ge=1), default=480,
                       help="frames are resized so the short side is this")
    group.add_argument("--long-multiple", type=number(int, ge=1), default=64,
                       help="... and the long side floored to this multiple")
    group.add_argument("--normalize", default="official", choices=["official", "imagenet"],
                       help="official: std (0.228, 0.224, 0.225) as DINO's and BAM's eval_video_segmentation.py; "
                       "imagenet: (0.229, 0.224, 0.225)")
    group.add_argument("--frames-per-batch", type=number(int, ge=1), default=4, help="frames per backbone forward pass")
    group.add_argument("--no-overlays", action="store_true", help="skip the per-sequence overlay images")


def builtin_sample(cache_dir: Path) -> Path:
    return ensure_generated(cache_dir / davis_sample.sample_dirname(), davis_sample.generate)


def run(ctx: TaskContext, args: argparse.Namespace) -> dict:
    """Under a process group each rank propagates its share of the sequences into the staging folder; rank 0 alone
    writes the overlays, scores, writes the CSVs and moves everything into place: one process's outputs, byte for
    byte. Every rank returns rank 0's outcome."""
    names = sequence_names(ctx.data_root, args.set, args.sequences.split(",") if args.sequences else None)
    # every rank checks every input before any work: bad input fails on every rank alike, before any collective
    sequences = [load_sequence(ctx.data_root, n) for n in names]
    if args.predictions and not Path(args.predictions).is_dir():
        raise FileNotFoundError(f"--predictions {args.predictions} is not a folder of <seq>/<frame>.png")
    backbone = None if args.predictions else ctx.load_backbone().to(ctx.device).eval()
    if backbone is not None:
        check_frame_sizes(args, sequences, backbone)
    first_labels = [read_first_annotation(s.first_annotation)[0] for s in sequences]
    info = get_dist_info()
    if info.is_main:
        for s, labels in zip(sequences, first_labels):
            warn_about_id_gaps(s.first_annotation, labels)
    # everything is written into a staging folder and moved into --output-dir once scored: a run that fails leaves
    # the earlier run's PNGs, overlays and CSVs as they were
    staging = ctx.output_dir / ".partial-davis"

    def discard() -> None:
        if info.is_main:
            shutil.rmtree(staging, ignore_errors=True)

    try:  # each step ends with every rank agreeing on its outcome: a rank that fails stops them all, none hangs
        with fail_together(discard):
            if info.is_main:  # the staging folder exists, empty, before any rank writes into it
                discard()  # a killed run's leftovers
                staging.mkdir(parents=True)
        with fail_together(discard):
            if not args.predictions:
                _propagate_share(ctx, args, backbone, sequences, staging, info)
        with fail_together(discard):
            outcome = _score_and_publish(ctx, args, sequences, staging) if info.is_main else None
    except BaseException:
        discard()  # also after Ctrl-C, on which the ranks do not agree
        raise
    return broadcast_from_rank0(outcome)


def check_frame_sizes(args: argparse.Namespace, sequences: list[Sequence], backbone: Backbone) -> None:
    """The frames resized by --short-side and --long-multiple (the first frame's size stands for its sequence's) are
    at least a pixel on each side and, for a ViT, tiled by its patches: a one-line error naming the flags and sizes
    that work, before any frame is read. A CNN's last feature map floors any size by its stride."""
    patch = backbone.feature_stride
    for s in sequences:
        h, w = original_size(s.frames[0])
        height, width = frame_size(h, w, args.short_side, args.long_multiple)
        long_side = args.short_side * max(h, w) // min(h, w)
        if min(height, width) < 1:
            raise ValueError(f"--long-multiple {args.long_multiple} floors the long side of {s.name}'s frames "
                             f"({long_side} at --short-side {args.short_side}) to 0: give at most {long_side}")
        if backbone.is_vit and (height % patch or width % patch):
            raise ValueError(
                f"--short-side {args.short_side} --long-multiple {args.long_multiple} resize the frames of {s.name} "
                f"to height {height}, width {width}, which the patches ({patch} x {patch}) of {backbone.arch} do not "
                f"tile: give multiples of {patch} (e.g. --short-side {max(patch, args.short_side // patch * patch)} "
                f"--long-multiple {-(-args.long_multiple // patch) * patch})")


def _propagate_share(ctx: TaskContext, args: argparse.Namespace, backbone: Backbone, sequences: list[Sequence],
                     staging: Path, info: DistInfo) -> None:
    """Write ``staging/<seq>/<frame>.png`` for this rank's sequences. The sequences are balanced over ranks by frame
    count, since a sequence costs about its number of frames and DAVIS's range from a few dozen to about a hundred."""
    shard = balanced_shards([len(s.frames) for s in sequences], info.world_size)
    mine = [sequences[i] for i in shard[info.rank]]
    if info.is_main and info.world_size > 1:
        logger.info("%d sequences (%d frames) over %d processes, balanced by frame count (%s frames)",
                    len(sequences), sum(len(s.frames) for s in sequences), info.world_size,
                    " + ".join(str(sum(len(sequences[i].frames) for i in part)) for part in shard))
    if not mine:  # more processes than sequences
        return
    if info.is_main and not backbone.is_vit:
        logger.warning("%s has no patch tokens: propagating its last feature map (stride %d) instead",
                       backbone.arch, backbone.feature_stride)
    with tqdm(total=sum(len(s.frames) for s in mine), desc="davis frames", unit="frame", dynamic_ncols=True,
              disable=not info.is_main) as bar:
        for s in mine:
            bar.set_postfix_str(s.name)
            propagate_sequence(backbone, s, staging, args, ctx.device, bar)


def _score_and_publish(ctx: TaskContext, args: argparse.Namespace, sequences: list[Sequence],
                       staging: Path) -> dict:
    """Overlays, scores and CSVs of the predictions (the propagated ones in ``staging``, or --predictions), then
    everything in ``staging`` moved into --output-dir."""
    annotations = ctx.data_root / "Annotations" / "480p"
    pred_dir = Path(args.predictions) if args.predictions else staging
    if not args.predictions and not args.no_overlays:
        for s in sequences:
            mid = s.frames[len(s.frames) // 2]
            write_overlay(staging / "overlays" / f"{s.name}.png", mid, annotations / s.name / f"{mid.stem}.png",
                          pred_dir / s.name / f"{mid.stem}.png", read_first_annotation(s.first_annotation)[1])
    names = [s.name for s in sequences]
    result = evaluate(annotations, pred_dir, names)
    write_csvs(result, staging, args.set)
    for entry in [p for p in staging.rglob("*") if p.is_file()]:
        dest = ctx.output_dir / entry.relative_to(staging)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(entry, dest)
    shutil.rmtree(staging, ignore_errors=True)
    global_csv, seq_csv = (ctx.output_dir / f"{kind}_results-{args.set}.csv" for kind in ("global", "per-sequence"))
    logger.info("wrote %s and %s", global_csv, seq_csv)
    return {"metrics": result["metrics"], "per_object": result["per_object"],
            "predictions": str(pred_dir if args.predictions else ctx.output_dir), "sequences": names}


def workload(args: argparse.Namespace, arch: str, world: int) -> Workload:
    long = 854 * args.short_side // 480 // args.long_multiple * args.long_multiple  # DAVIS 480p frames: 854 x 480
    return Workload(arch, ((1, args.short_side, long),), args.frames_per_batch, 1, args.frames_per_batch * world,
                    images=DAVIS_VAL_FRAMES, memory_fixes=("a smaller --frames-per-batch",),
                    note="frozen: every frame once (not resumed); the propagation's affinities are not counted")


SPEC = TaskSpec(name="davis", help=HELP, headline="J&F-Mean", add_arguments=add_arguments,
                builtin_sample=builtin_sample, run=run, workload=workload,
                headline_scale=100.0,  # J&F as the official CSVs write it: a fraction
                suite_dataset="davis",
                distributed=True)  # torchrun / srun: every rank propagates its share of the sequences
