"""DAVIS-2017 semi-supervised scores, as the official davis2017-evaluation computes them, vectorised.

Per object: J = region IoU, F = boundary F-measure (boundaries dilated by a disk of radius
``ceil(0.008 * image diagonal)``), over every frame but the first and the last; Mean, Recall (> 0.5) and Decay
(first quarter minus last quarter, with the official binning). Global means are over all objects.
"""
from __future__ import annotations

import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from skimage.morphology import disk

logger = logging.getLogger(__name__)

GLOBAL_COLUMNS = ["J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"]


class DavisInputError(ValueError):
    """Bad DAVIS data or predictions; the message names the file and the fix."""


# ---------------------------------------------------------------------------------------------- the maths
def region_similarity(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """J per frame. ``gt, pred: bool [T, H, W]`` -> ``[T]``; 1 where both masks are empty."""
    inter = np.logical_and(gt, pred).sum(axis=(-2, -1))
    union = np.logical_or(gt, pred).sum(axis=(-2, -1))
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def boundary_map(seg: np.ndarray) -> np.ndarray:
    """1-pixel boundaries of ``seg: bool [..., H, W]``, as the official ``_seg2bmap`` (offset towards the origin)."""
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[..., :, :-1] = seg[..., :, 1:]
    s[..., :-1, :] = seg[..., 1:, :]
    se[..., :-1, :-1] = seg[..., 1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[..., -1, :] = seg[..., -1, :] ^ e[..., -1, :]
    b[..., :, -1] = seg[..., :, -1] ^ s[..., :, -1]
    b[..., -1, -1] = False
    return b


def boundary_radius(height: int, width: int, bound_th: float = 0.008) -> int:
    return int(bound_th) if bound_th >= 1 else int(np.ceil(bound_th * np.linalg.norm((height, width))))


def boundary_f_measure(gt: np.ndarray, pred: np.ndarray, bound_th: float = 0.008) -> np.ndarray:
    """F per frame. ``gt, pred: bool [T, H, W]`` -> ``[T]``.

    Only the window around both boundaries (padded by the radius) is dilated: the counts are the same as
    dilating whole frames, at a fraction of the cost.
    """
    radius = boundary_radius(*gt.shape[-2:], bound_th)
    kernel = disk(radius).astype(np.uint8)
    gt_b, pr_b = boundary_map(gt), boundary_map(pred)
    out = np.empty(len(gt))
    for t in range(len(gt)):
        n_gt, n_fg = int(gt_b[t].sum()), int(pr_b[t].sum())
        if n_fg == 0 or n_gt == 0:
            precision, recall = (1.0, 1.0) if n_fg == n_gt else ((1.0, 0.0) if n_fg == 0 else (0.0, 1.0))
        else:
            rows, cols = np.nonzero(gt_b[t] | pr_b[t])
            r0, r1 = max(rows.min() - radius, 0), min(rows.max() + radius + 1, gt.shape[-2])
            c0, c1 = max(cols.min() - radius, 0), min(cols.max() + radius + 1, gt.shape[-1])
            g, p = gt_b[t, r0:r1, c0:c1], pr_b[t, r0:r1, c0:c1]
            g_dil = cv2.dilate(g.astype(np.uint8), kernel).astype(bool)
            p_dil = cv2.dilate(p.astype(np.uint8), kernel).astype(bool)
            precision = np.logical_and(p, g_dil).sum() / n_fg
            recall = np.logical_and(g, p_dil).sum() / n_gt
        out[t] = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return out


def statistics(per_frame: np.ndarray) -> tuple[float, float, float]:
    """(Mean, Recall, Decay) of one object's per-frame scores, binned as the official ``db_statistics``."""
    per_frame = np.asarray(per_frame, dtype=np.float64)
    with warnings.catch_warnings():  # a sequence of <= 2 frames has nothing to score: NaN, as the official tool
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = float(np.nanmean(per_frame))
        recall = float(np.nanmean(per_frame > 0.5))
        ids = (np.round(np.linspace(1, len(per_frame), 5) + 1e-10) - 1).astype(int)
        bins = [per_frame[ids[i]:ids[i + 1] + 1] for i in range(4)]
        decay = float(np.nanmean(bins[0]) - np.nanmean(bins[3]))
    return mean, recall, decay


# ------------------------------------------------------------------------------------------------ reading
def read_index_png(path: Path, what: str) -> np.ndarray:
    """An indexed PNG's indices; a palette ('P') or grayscale ('L') PNG. Anything else is an error."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise DavisInputError(f"{path}: {what} must be an indexed (palette) PNG, found mode {im.mode}; "
                                      f"write object ids as palette indices")
            return np.array(im)
    except FileNotFoundError:
        raise DavisInputError(f"{path}: {what} is missing") from None
    except OSError as e:
        raise DavisInputError(f"{path}: cannot read {what} ({e})") from None


@dataclass
class SequenceScores:
    name: str
    j: np.ndarray  # [n_objects, n_frames]
    f: np.ndarray


def score_sequence(annotations: Path, predictions: Path, name: str, bound_th: float = 0.008) -> SequenceScores:
    """Score one sequence's prediction PNGs against its annotations (every frame but the first and last)."""
    ann_dir, pred_dir = annotations / name, predictions / name
    frames = sorted(p.stem for p in ann_dir.glob("*.png"))
    if not frames:
        raise DavisInputError(f"{ann_dir}: no annotation PNGs; check --data")
    first = read_index_png(ann_dir / f"{frames[0]}.png", "first-frame annotation")
    first = np.where(first == 255, 0, first)  # 255 is void; the semi-supervised protocol uses no void mask
    n_objects = int(first.max())
    frames = frames[1:-1]
    gt = np.stack([read_index_png(ann_dir / f"{f}.png", "annotation") for f in frames]) if frames else \
        np.zeros((0, *first.shape), np.uint8)
    gt = np.where(gt == 255, 0, gt)
    preds = []
    for f in frames:
        p = read_index_png(pred_dir / f"{f}.png", "prediction")
        if p.shape != gt.shape[1:]:
            raise DavisInputError(f"{pred_dir / f'{f}.png'}: prediction is {p.shape[1]}x{p.shape[0]}, the annotation "
                                  f"is {gt.shape[2]}x{gt.shape[1]} (width x height); predict at the original size")
        preds.append(p)
    pred = np.stack(preds) if preds else np.zeros_like(gt)
    if pred.size and int(pred.max()) > n_objects:
        raise DavisInputError(f"{pred_dir}: predictions hold object id {int(pred.max())} but {name} has {n_objects} "
                              f"objects (ids 1..{n_objects}); the official tool stops here too")
    j = np.zeros((n_objects, len(frames)))
    f = np.zeros((n_objects, len(frames)))
    for obj in range(1, n_objects + 1):
        g, p = gt == obj, pred == obj
        j[obj - 1] = region_similarity(g, p)
        f[obj - 1] = boundary_f_measure(g, p, bound_th)
    return SequenceScores(name, j, f)


# ------------------------------------------------------------------------------------------ whole data set
def evaluate(annotations: str | os.PathLike, predictions: str | os.PathLike, sequences: list[str],
             num_workers: int = 0) -> dict:
    """Score sequences; returns ``{"metrics": {name: value}, "per_object": {"<seq>_<obj>": {...}}}`` (0-1 scale).

    ``num_workers`` threads score sequences in parallel (decoding, NumPy and OpenCV release the GIL); 0 = one
    thread per core, at most 8.
    """
    annotations, predictions = Path(annotations), Path(predictions)
    workers = num_workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda s: score_sequence(annotations, predictions, s), sequences))
    per_object: dict[str, dict[str, float]] = {}
    for res in results:
        for i in range(len(res.j)):
            jm, jr, jd = statistics(res.j[i])
            fm, fr, fd = statistics(res.f[i])
            per_object[f"{res.name}_{i + 1}"] = {"J-Mean": jm, "J-Recall": jr, "J-Decay": jd,
                                                 "F-Mean": fm, "F-Recall": fr, "F-Decay": fd}
    if not per_object:
        raise DavisInputError(f"{annotations}: no objects to score in sequences {sequences}")
    col = {k: np.mean([o[k] for o in per_object.values()]) for k in next(iter(per_object.values()))}
    metrics = {"J&F-Mean": (col["J-Mean"] + col["F-Mean"]) / 2, **{k: float(col[k]) for k in GLOBAL_COLUMNS[1:]}}
    return {"metrics": {k: float(v) for k, v in metrics.items()}, "per_object": per_object}


def write_csvs(result: dict, output_dir: str | os.PathLike, subset: str = "val") -> tuple[Path, Path]:
    """``global_results-<set>.csv`` and ``per-sequence_results-<set>.csv``, formatted as the official tool."""
    out = Path(output_dir)
    g = out / f"global_results-{subset}.csv"
    s = out / f"per-sequence_results-{subset}.csv"
    m = result["metrics"]
    g.write_text(",".join(GLOBAL_COLUMNS) + "\n" + ",".join(f"{m[k]:.3f}" for k in GLOBAL_COLUMNS) + "\n")
    rows = [f"{name},{o['J-Mean']:.3f},{o['F-Mean']:.3f}" for name, o in result["per_object"].items()]
    s.write_text("Sequence,J-Mean,F-Mean\n" + "".join(r + "\n" for r in rows))
    return g, s

