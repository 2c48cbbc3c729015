"""A straightforward per-frame label propagation, structured as DINO's eval_video_segmentation.py.

Independent of ``transfer/davis/propagation.py``: dense affinities, an element-wise neighbourhood mask built with loops,
a top-k threshold, a dense label product. Used by the tests as the reference and by bench/davis.py as the baseline.
"""
import time

import torch
import torch.nn.functional as F


def straightforward_propagation(features, first_labels, n_last_frames=7, size=12, topk=5, temperature=0.1):
    """``features [T, h, w, D]``, ``first_labels [C, h, w]`` -> (``[T, C, h, w]``, seconds spent on the mask)."""
    t_len, h, w, d = features.shape
    c = first_labels.shape[0]
    t0 = time.perf_counter()
    mask = torch.zeros(h, w, h, w)
    for i in range(h):
        for j in range(w):
            for p in range(2 * size + 1):
                for q in range(2 * size + 1):
                    ii, jj = i - size + p, j - size + q
                    if 0 <= ii < h and 0 <= jj < w:
                        mask[i, j, ii, jj] = 1
    mask = mask.reshape(h * w, h * w) if size > 0 else torch.ones(h * w, h * w)
    mask_seconds = time.perf_counter() - t0
    first = features[0].reshape(-1, d).T
    queue, out = [], [first_labels[None]]
    for t in range(1, t_len):
        tar = features[t].reshape(-1, d)
        feats = [first] + [q[0] for q in queue]
        segs = [first_labels[None]] + [q[1] for q in queue]
        n_ctx = len(feats)
        src = F.normalize(torch.stack(feats), dim=1, p=2)
        q = F.normalize(tar, dim=1, p=2).unsqueeze(0).repeat(n_ctx, 1, 1)
        aff = torch.exp(torch.bmm(q, src) / temperature)
        aff *= mask.unsqueeze(0)
        aff = aff.transpose(2, 1).reshape(-1, h * w)
        kth = aff.topk(topk, dim=0).values.min(dim=0).values
        aff[aff < kth] = 0
        aff = aff / aff.sum(dim=0, keepdim=True)
        seg = torch.cat(segs).reshape(n_ctx, c, -1).transpose(2, 1).reshape(-1, c).T
        seg_t = (seg @ aff).reshape(1, c, h, w)
        if len(queue) == n_last_frames:
            queue.pop(0)
        queue.append((tar.T, seg_t))
        out.append(seg_t)
    return torch.cat(out), mask_seconds
