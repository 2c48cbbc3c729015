"""Masks over the similarity matrix of local views against the gathered target views."""
from __future__ import annotations

import torch


def positive_mask(batch_size: int, n_crops: int, n_target_crops: int, rank: int = 0, world_size: int = 1,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Which entries compare an image with a view of itself.

    Rows are this rank's views, crop-major: row ``c*B + i`` is crop ``c`` of local image ``i``, whose global
    index is ``rank*B + i``. Columns are the gathered target views, crop-major over the global batch:
    column ``t*B*W + j`` is target crop ``t`` of global image ``j``.

    Returns: bool ``[n_crops*B, n_target_crops*B*world_size]``, True where row and column are the same image.
    """
    rows = torch.arange(n_crops * batch_size, device=device) % batch_size + rank * batch_size
    cols = torch.arange(n_target_crops * batch_size * world_size, device=device) % (batch_size * world_size)
    return rows[:, None] == cols[None, :]


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """bool mask of the ``k`` largest entries of each row of ``scores: [n, m]`` (all of them when k >= m)."""
    if k >= scores.shape[-1]:
        return torch.ones_like(scores, dtype=torch.bool)
    idx = scores.topk(k, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)
