"""DAVIS-2017 video object segmentation by label propagation (the DINO / STC protocol, reimplemented).

Every frame's patch features come from the backbone; frame 0's ground truth is carried forward: each target
patch takes the labels of its ``topk`` most similar patches among the first frame and the last ``n_last_frames``
predicted frames, restricted to a square neighbourhood, weighted by ``exp(cosine / temperature)``.

The affinities depend only on features, never on predictions, so they are computed for a whole chunk of
frames at once; only the cheap weighted sum of labels runs frame by frame.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def near(targets: torch.Tensor, sources: torch.Tensor, w: int, size: int) -> torch.Tensor:
    """bool ``[len(targets), len(sources)]``: patches (flat indices on a grid of width ``w``) at most ``size`` rows
    and ``size`` columns apart."""
    dy = (targets[:, None].div(w, rounding_mode="floor") - sources[None].div(w, rounding_mode="floor")).abs()
    dx = (targets[:, None] % w - sources[None] % w).abs()
    return (dy <= size) & (dx <= size)


def neighbourhood_mask(h: int, w: int, size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """bool ``[h*w, h*w]``: the square neighbourhood of every patch (the dense form of :func:`near`)."""
    every = torch.arange(h * w, device=device)
    return near(every, every, w, size)


def context_frames(t: int, n_last_frames: int) -> list[int]:
    """Frame 0 and the last ``n_last_frames`` frames before ``t`` (the predicted ones)."""
    return [0, *range(max(1, t - n_last_frames), t)]


def _spans(length: int, tile: int, size: int):
    """Tiles ``[a, b)`` of one grid axis and the window ``[lo, hi)`` of sources within ``size`` of each."""
    for a in range(0, length, tile):
        b = min(length, a + tile)
        yield a, b, max(0, a - size), min(length, b + size)


@dataclass(frozen=True)
class Tile:
    """A block of target patches and the window of source patches within their reach."""
    rows: tuple[int, int]  # target rows [i0, i1)
    cols: tuple[int, int]  # target columns [j0, j1)
    src_rows: tuple[int, int]  # reachable rows [r0, r1)
    src_cols: tuple[int, int]  # reachable columns [c0, c1)
    targets: torch.Tensor  # flat indices of the target patches, row-major
    window: torch.Tensor  # flat indices of the reachable patches, row-major
    bias: torch.Tensor | None  # [targets, window]: 0 inside the square neighbourhood, -inf outside


def plan_tiles(h: int, w: int, size: int, tile: int, device: torch.device | str | None = None) -> list[Tile]:
    """Cut the ``h x w`` grid into ``tile x tile`` target blocks (once per resolution).

    With a neighbourhood each block is compared only with the sources within reach: about half the multiply-adds
    of the dense product at DAVIS's 30x52 patches. Without one (``size <= 0``) there is a single block.
    """
    flat = torch.arange(h * w, device=device).view(h, w)
    if size <= 0:
        return [Tile((0, h), (0, w), (0, h), (0, w), flat.flatten(), flat.flatten(), None)]
    plan = []
    for i0, i1, r0, r1 in _spans(h, tile, size):
        for j0, j1, c0, c1 in _spans(w, tile, size):
            targets, window = flat[i0:i1, j0:j1].flatten(), flat[r0:r1, c0:c1].flatten()
            reach = near(targets, window, w, size)
            bias = torch.zeros(reach.shape, device=device).masked_fill_(~reach, float("-inf"))
            plan.append(Tile((i0, i1), (j0, j1), (r0, r1), (c0, c1), targets, window, bias))
    return plan


def column_bands(features: torch.Tensor, plan: list[Tile]) -> dict[tuple[int, int], torch.Tensor]:
    """``features[:, :, c0:c1]`` made contiguous once per video, for every column window of the plan.

    Within a band every row window of a frame is one contiguous block, so the products need no copies.
    """
    return {t.src_cols: features[:, :, t.src_cols[0]:t.src_cols[1]].contiguous() for t in plan}


def _frames(band: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """``band[frames]``, as a view when the frames are all the same (frame 0) or consecutive."""
    first, last = int(frames[0]), int(frames[-1])
    if first == last:
        return band[first].expand(len(frames), *band.shape[1:])
    if last - first == len(frames) - 1 and bool((frames.diff() == 1).all()):
        return band[first:last + 1]
    return band.index_select(0, frames)


def top_affinities(bands: dict[tuple[int, int], torch.Tensor], plan: list[Tile], targets: list[int],
                   n_last_frames: int, topk: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For each target frame, its patches' ``topk`` context entries and their normalised weights.

    Args:
        bands: :func:`column_bands` of the ``[T, h, w, D]`` L2-normalised patch features.
        plan: :func:`plan_tiles` of the grid.
        targets: frame indices, all with the same number of context frames.
    Returns:
        ``weights [len(targets), h*w, k]`` (summing to 1 over the last axis) and ``index`` of the same shape into
        the flattened ``[n_context * h * w]`` context patches of each target.
    """
    n = sum(len(t.targets) for t in plan)
    device = plan[0].targets.device
    ctx = torch.tensor([context_frames(t, n_last_frames) for t in targets], device=device)
    n_ctx = ctx.shape[1]
    k = min(topk, n_ctx * min(len(t.window) for t in plan))
    weights = torch.empty(len(targets), n, k, device=device)
    index = torch.empty(len(targets), n, k, dtype=torch.long, device=device)
    for tile in plan:
        band, c0 = bands[tile.src_cols], tile.src_cols[0]
        (i0, i1), (j0, j1), (r0, r1) = tile.rows, tile.cols, tile.src_rows
        q = band[targets, i0:i1, j0 - c0:j1 - c0].flatten(1, 2)  # [B, tn, D]
        sim = torch.stack([torch.bmm(q, _frames(band, ctx[:, c])[:, r0:r1].flatten(1, 2).transpose(1, 2))
                           for c in range(n_ctx)], dim=2)  # [B, tn, n_ctx, wn]
        if tile.bias is not None:
            sim += tile.bias[:, None]
        values, local = sim.flatten(2).topk(k, dim=-1)  # jointly over all context frames
        # exp(v / T) normalised over the kept entries is a softmax over them (entries out of reach get 0)
        weights[:, tile.targets] = torch.softmax(values / temperature, dim=-1)
        index[:, tile.targets] = (local // len(tile.window)) * n + tile.window[local % len(tile.window)]
    return weights, index


def propagate_labels(features: torch.Tensor, first_labels: torch.Tensor, n_last_frames: int = 7,
                     size_mask_neighborhood: int = 12, topk: int = 5, temperature: float = 0.1,
                     chunk: int = 8, tile: int | None = None) -> torch.Tensor:
    """Propagate frame 0's labels through a video.

    Args:
        features: ``[T, h, w, D]`` patch features of every frame (normalised here).
        first_labels: ``[C, h, w]`` frame 0's one-hot labels at patch resolution (channel 0 = background).
        n_last_frames: predicted frames kept as context besides frame 0.
        size_mask_neighborhood: only source patches at most this many rows and columns away (0 = everywhere).
        topk: context entries kept per target patch, over all context frames jointly.
        temperature: affinity ``exp(cosine / temperature)``.
        chunk: target frames whose affinities are computed together (memory ~ chunk * 8 * N^2 / 2 floats).
        tile: target tile side in patches (default ``max(8, size_mask_neighborhood)``).
    Returns:
        ``[T, C, h, w]`` soft labels at patch resolution (frame 0 = ``first_labels``); these are also what the
        context queue holds.
    """
    t_len, h, w, d = features.shape
    c = first_labels.shape[0]
    n = h * w
    feats = F.normalize(features.float(), dim=-1)
    plan = plan_tiles(h, w, size_mask_neighborhood, tile or max(8, size_mask_neighborhood), feats.device)
    bands = column_bands(feats, plan)
    labels = torch.zeros(t_len, c, n, device=feats.device)
    labels[0] = first_labels.reshape(c, n).to(feats.device, torch.float32)
    t = 1
    while t < t_len:
        # frames with the same context length batch together (all of them once t > n_last_frames)
        n_ctx = len(context_frames(t, n_last_frames))
        block = [s for s in range(t, min(t + chunk, t_len)) if len(context_frames(s, n_last_frames)) == n_ctx]
        weights, index = top_affinities(bands, plan, block, n_last_frames, topk, temperature)
        for b, s in enumerate(block):
            ctx_labels = labels[context_frames(s, n_last_frames)].transpose(0, 1).reshape(c, -1)  # [C, n_ctx*N]
            labels[s] = (ctx_labels[:, index[b]] * weights[b]).sum(-1)
        t = block[-1] + 1
    return labels.reshape(t_len, c, h, w)


def pil_nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output pixel in PIL's ``resize(..., NEAREST)`` (its accumulated float64 steps).

    PIL walks ``x = scale/2, x += scale`` and truncates; torch's "nearest" and "nearest-exact" round differently
    on some sizes. Indices past the input (possible through rounding) are -1: PIL fills them with 0.
    """
    scale = n_in / n_out
    steps = np.full(n_out, scale)
    steps[0] = scale * 0.5
    idx = np.cumsum(steps).astype(np.int64)
    return np.where(idx < n_in, idx, -1)


def pil_nearest_resize(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``labels [..., h, w]`` resized to ``size (H, W)`` exactly as PIL's NEAREST does."""
    h, w = labels.shape[-2:]
    rows = torch.from_numpy(pil_nearest_index(h, size[0])).to(labels.device)
    cols = torch.from_numpy(pil_nearest_index(w, size[1])).to(labels.device)
    out = labels[..., rows.clamp_min(0), :][..., cols.clamp_min(0)]
    return out.masked_fill((rows[:, None] < 0) | (cols[None, :] < 0), 0)


def soft_to_mask(soft: torch.Tensor, patch_size: int, size: tuple[int, int]) -> torch.Tensor:
    """Soft labels ``[C, h, w]`` -> label map ``LongTensor [H, W]`` at the original ``size (H, W)``.

    Upsample by the patch size (bilinear, align_corners=False), min-max normalise each channel whose maximum is
    positive (as DINO), take the argmax, then resize with PIL's nearest-neighbour sampling.
    """
    up = F.interpolate(soft[None].float(), scale_factor=patch_size, mode="bilinear", align_corners=False)[0]
    flat = up.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    span = (hi - lo).clamp_min(torch.finfo(up.dtype).tiny)  # a constant positive channel becomes 0, not NaN
    norm = torch.where(hi > 0, (flat - lo) / span, flat).view_as(up)
    return pil_nearest_resize(norm.argmax(0), size)
