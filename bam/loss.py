"""The BAM objective: match each view's self-attention to a balanced (self optimal transport) target.

Semantics follow the official code (DanielShalam/BAM, ``bam/bam_loss.py``) without its bugs: top-k is applied
when ``top_k > 0``, ``sinkhorn_iters`` is honoured, and nothing assumes CUDA or a process group.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from bam.distributed import all_reduce_, gather_with_grad, get_dist_info
from bam.masks import positive_mask, top_k_mask
from bam.sinkhorn import ReduceFn, self_optimal_transport

GatherFn = Callable[[torch.Tensor], list]


def gather_targets(local: torch.Tensor, n_target_crops: int, gather_fn: GatherFn = gather_with_grad) -> torch.Tensor:
    """Gather the target views of every rank, crop-major over the global batch.

    ``local: [n_target_crops*B, D]`` -> ``[n_target_crops*B*W, D]`` ordered crop 0 of rank 0, crop 0 of rank 1,
    ..., crop 1 of rank 0, ...
    """
    per_rank = [g.chunk(n_target_crops) for g in gather_fn(local)]
    return torch.cat([chunks[c] for c in range(n_target_crops) for chunks in per_rank])


def _inv_norm(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``1 / max(||x_i||, eps)`` per row, as ``F.normalize`` divides."""
    return 1.0 / torch.linalg.vector_norm(x, dim=-1).clamp_min(eps)


def bam_loss(z: torch.Tensor, z_teacher: torch.Tensor | None = None, *, n_crops: int, n_large_crops: int = 2,
             n_target_crops: int | None = None, reg: float = 0.05, temperature: float = 0.1,
             sinkhorn_iters: int = 3, top_k: int = 0, positive_masking: bool = True, rank: int = 0,
             gather_fn: GatherFn = gather_with_grad, reduce_fn: ReduceFn = all_reduce_) -> torch.Tensor:
    """BAM loss of this rank's views (the mean of the ranks' losses is the loss of the global batch).

    Args:
        z: ``[n_crops*B, D]`` projector outputs (not normalised), crop-major: rows ``c*B:(c+1)*B`` are crop ``c``
            of images ``0..B-1``; the first ``n_large_crops`` crops are the global ones.
        z_teacher: optional ``[n_crops*B, D]`` outputs of an EMA teacher in the same layout; then the targets and
            the balanced plan come from the teacher, the source attention from ``z``.
        n_target_crops: crops whose views form the attention targets (default ``n_large_crops``).
        reg, sinkhorn_iters: Sinkhorn entropy regularisation and iterations for the balanced target.
        temperature: softmax temperature of the source attention.
        top_k: if > 0, keep only the ``top_k`` targets of each image's view-averaged plan.
        positive_masking: remove every comparison of an image with a view of itself.
        rank, gather_fn, reduce_fn: distributed state; the defaults are no-ops on one process.
    Returns:
        scalar loss (float32, or float64 for float64 inputs).
    """
    # Under autocast the products below would run in half precision, where the masked entries (the float32 minimum)
    # overflow to -inf and 0 * -inf poisons the sum: the loss always runs in float32 (float64 for float64 inputs).
    with torch.autocast(z.device.type, enabled=False):
        return _bam_loss(z, z_teacher, n_crops, n_large_crops, n_target_crops, reg, temperature, sinkhorn_iters,
                         top_k, positive_masking, rank, gather_fn, reduce_fn)


def _bam_loss(z, z_teacher, n_crops, n_large_crops, n_target_crops, reg, temperature, sinkhorn_iters, top_k,
              positive_masking, rank, gather_fn, reduce_fn) -> torch.Tensor:
    n_target_crops = n_large_crops if n_target_crops is None else n_target_crops
    if z.ndim != 2 or z.shape[0] % n_crops:
        raise ValueError(f"z must be [n_crops*B, D] with n_crops={n_crops}; got shape {tuple(z.shape)}")
    if not 1 <= n_large_crops <= n_crops or not 1 <= n_target_crops <= n_crops:
        raise ValueError(f"need 1 <= n_large_crops, n_target_crops <= n_crops={n_crops}")
    if z_teacher is not None and z_teacher.shape != z.shape:
        raise ValueError(f"z_teacher {tuple(z_teacher.shape)} must have the shape of z {tuple(z.shape)}")
    b = z.shape[0] // n_crops
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32  # never half precision here

    z = z.to(dtype)
    zt = z_teacher.to(dtype) if z_teacher is not None else z
    targets = gather_targets(zt[: n_target_crops * b], n_target_crops, gather_fn)
    world_size = targets.shape[0] // (n_target_crops * b)
    # Cosine similarities. Scaling the [rows, targets] product by inverse norms, instead of normalising the
    # [rows, D] inputs, keeps the element-wise work (and its backward) off the large D-wide tensors.
    inv_targets = _inv_norm(targets)[None, :]
    scores = (z @ targets.t()) * _inv_norm(z)[:, None] * inv_targets  # [n_crops*B, n_target_crops*B_global]

    mask = positive_mask(b, n_crops, n_target_crops, rank, world_size, z.device) if positive_masking else None
    with torch.no_grad():
        plan_scores = scores if z_teacher is None else (zt @ targets.t()) * _inv_norm(zt)[:, None] * inv_targets
        plan = self_optimal_transport(plan_scores.detach(), reg, sinkhorn_iters, mask,
                                      n_target_crops if positive_masking else 0, reduce_fn)
        plan = plan[: n_large_crops * b]
        if top_k > 0:
            keep = top_k_mask(plan.view(n_large_crops, b, -1).mean(0), top_k).repeat(n_large_crops, 1)
            plan = plan * keep
            plan = plan / plan.sum(dim=-1, keepdim=True)

    logits = scores / temperature
    if mask is not None:
        logits = logits.masked_fill(mask, torch.finfo(dtype).min)
    log_q = F.log_softmax(logits, dim=-1)
    if mask is not None:
        plan = plan * (~mask[:b]).to(dtype).repeat(n_large_crops, 1)

    # cross[v, u] = batch mean of -sum_j P_v[i, j] log Q_u[i, j], for every global view v and every view u.
    cross = -torch.einsum("vbk,ubk->vu", plan.view(n_large_crops, b, -1), log_q.view(n_crops, b, -1)) / b
    if n_crops == 1:
        return cross[0, 0]
    off_diagonal = 1.0 - torch.eye(n_large_crops, n_crops, dtype=dtype, device=z.device)
    return ((cross * off_diagonal).sum(dim=1) / (n_crops - 1)).mean()


class BAMLoss(nn.Module):
    """Thin wrapper that holds BAM's hyper-parameters; ``reg`` may be changed between steps (a schedule)."""

    def __init__(self, n_crops: int, n_large_crops: int = 2, n_target_crops: int | None = None, reg: float = 0.05,
                 temperature: float = 0.1, sinkhorn_iters: int = 3, top_k: int = 0, positive_masking: bool = True):
        super().__init__()
        self.n_crops = n_crops
        self.n_large_crops = n_large_crops
        self.n_target_crops = n_large_crops if n_target_crops is None else n_target_crops
        self.reg = reg
        self.temperature = temperature
        self.sinkhorn_iters = sinkhorn_iters
        self.top_k = top_k
        self.positive_masking = positive_masking

    def forward(self, z: torch.Tensor, z_teacher: torch.Tensor | None = None) -> torch.Tensor:
        return bam_loss(z, z_teacher, n_crops=self.n_crops, n_large_crops=self.n_large_crops,
                        n_target_crops=self.n_target_crops, reg=self.reg, temperature=self.temperature,
                        sinkhorn_iters=self.sinkhorn_iters, top_k=self.top_k,
                        positive_masking=self.positive_masking, rank=get_dist_info().rank)

    def extra_repr(self) -> str:
        return (f"n_crops={self.n_crops}, n_large_crops={self.n_large_crops}, n_target_crops={self.n_target_crops}, "
                f"reg={self.reg}, temperature={self.temperature}, sinkhorn_iters={self.sinkhorn_iters}, "
                f"top_k={self.top_k}, positive_masking={self.positive_masking}")
