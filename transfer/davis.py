"""DAVIS-2017 video object segmentation by label propagation (the DINO / STC protocol, reimplemented).

Every frame's patch features come from the backbone; frame 0's ground truth is carried forward: each target
patch takes the labels of its ``topk`` most similar patches among the first frame and the last ``n_last_frames``
predicted frames, restricted to a square neighbourhood, weighted by ``exp(cosine / temperature)``.

The affinities depend only on features, never on predictions, so they are computed for a whole chunk of
frames at once; only the cheap weighted sum of labels runs frame by frame.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def neighbourhood_mask(h: int, w: int, size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """bool ``[h*w, h*w]``: True where two patches are at most ``size`` rows and ``size`` columns apart."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    return ((rows[:, None] - rows[None, :]).abs() <= size) & ((cols[:, None] - cols[None, :]).abs() <= size)


def context_frames(t: int, n_last_frames: int) -> list[int]:
    """Frame 0 and the last ``n_last_frames`` frames before ``t`` (the predicted ones)."""
    return [0, *range(max(1, t - n_last_frames), t)]


def top_affinities(features: torch.Tensor, targets: list[int], n_last_frames: int, mask: torch.Tensor | None,
                   topk: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For each target frame, its patches' ``topk`` context entries and their normalised weights.

    Args:
        features: ``[T, N, D]`` L2-normalised patch features of every frame.
        targets: frame indices, all with the same number of context frames.
        mask: optional bool ``[N, N]`` (target patch, source patch) neighbourhood.
    Returns:
        ``weights [len(targets), N, topk]`` (summing to 1 over the last axis) and ``index`` of the same shape into
        the flattened ``[n_context * N]`` context patches of each target.
    """
    ctx = torch.tensor([context_frames(t, n_last_frames) for t in targets], device=features.device)
    queries = features[targets]  # [B, N, D]
    sources = features[ctx]  # [B, n_ctx, N, D]
    sim = torch.einsum("bqd,bcsd->bqcs", queries, sources)  # [B, N (target), n_ctx, N (source)]
    if mask is not None:
        sim.masked_fill_(~mask[None, :, None, :], float("-inf"))
    values, index = sim.flatten(2).topk(topk, dim=-1)  # [B, N, topk] over all context frames jointly
    # exp(v / T) normalised over the kept entries is a softmax over them
    return torch.softmax(values / temperature, dim=-1), index


def propagate_labels(features: torch.Tensor, first_labels: torch.Tensor, n_last_frames: int = 7,
                     size_mask_neighborhood: int = 12, topk: int = 5, temperature: float = 0.1,
                     chunk: int = 8) -> torch.Tensor:
    """Propagate frame 0's labels through a video.

    Args:
        features: ``[T, h, w, D]`` patch features of every frame (normalised here).
        first_labels: ``[C, h, w]`` frame 0's one-hot labels at patch resolution (channel 0 = background).
        n_last_frames: predicted frames kept as context besides frame 0.
        size_mask_neighborhood: only source patches at most this many rows and columns away (0 = everywhere).
        topk: context entries kept per target patch, over all context frames jointly.
        temperature: affinity ``exp(cosine / temperature)``.
        chunk: target frames whose affinities are computed together (memory ~ chunk * 8 * N^2 floats).
    Returns:
        ``[T, C, h, w]`` soft labels at patch resolution (frame 0 = ``first_labels``); these are also what the
        context queue holds.
    """
    t_len, h, w, d = features.shape
    c = first_labels.shape[0]
    n = h * w
    feats = F.normalize(features.reshape(t_len, n, d).float(), dim=-1)
    mask = neighbourhood_mask(h, w, size_mask_neighborhood, feats.device) if size_mask_neighborhood > 0 else None
    labels = torch.zeros(t_len, c, n, device=feats.device)
    labels[0] = first_labels.reshape(c, n).to(feats.device, torch.float32)
    t = 1
    while t < t_len:
        # frames with the same context length batch together (all of them once t > n_last_frames)
        n_ctx = len(context_frames(t, n_last_frames))
        block = [s for s in range(t, min(t + chunk, t_len)) if len(context_frames(s, n_last_frames)) == n_ctx]
        weights, index = top_affinities(feats, block, n_last_frames, mask, min(topk, n_ctx * n), temperature)
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
