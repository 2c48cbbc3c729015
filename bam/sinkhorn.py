"""Self optimal transport: the balanced target of BAM, a few Sinkhorn iterations on a similarity matrix."""
from __future__ import annotations

from collections.abc import Callable

import torch

from bam.distributed import all_reduce_

ReduceFn = Callable[[torch.Tensor, str], torch.Tensor]


@torch.no_grad()
def self_optimal_transport(scores: torch.Tensor, reg: float, n_iters: int = 3, mask: torch.Tensor | None = None,
                           n_masked: int = 0, reduce_fn: ReduceFn = all_reduce_) -> torch.Tensor:
    """Balance ``exp(scores / reg)`` towards uniform marginals, as in the official BAM code.

    Args:
        scores: ``[n, k]``, this rank's ``n`` sample rows against all ``k`` targets (the targets are global,
            the samples are split over ranks).
        reg: entropy regularisation (a smaller value gives a sharper plan).
        n_iters: Sinkhorn iterations; each scales target rows, then sample columns.
        mask: optional bool ``[n, k]``; True entries get zero mass (positive masking).
        n_masked: masked entries per target row, removed from the target marginal: each target row is scaled to
            ``1 / (k - n_masked)``.
        reduce_fn: in-place all-reduce ``(tensor, "sum"|"max")`` over ranks; the identity on one process.

    Returns:
        ``[n, k]``: each sample row is a distribution over targets (sums to 1); zero where ``mask`` is True.
    """
    logits = scores / reg
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
    peak = reduce_fn(logits.max().clone(), "max")
    plan = torch.exp(logits - peak).t()  # [k targets, n samples]
    plan /= reduce_fn(plan.sum(), "sum")
    k, n = plan.shape
    n_total = int(reduce_fn(torch.tensor(float(n), device=plan.device, dtype=plan.dtype), "sum"))
    row_marginal = 1.0 / (k - n_masked)
    col_marginal = 1.0 / n_total
    for _ in range(n_iters):
        row_sums = reduce_fn(plan.sum(dim=1), "sum")
        plan *= (row_marginal / row_sums).unsqueeze(1)
        plan *= (col_marginal / plan.sum(dim=0)).unsqueeze(0)
    return (plan / plan.sum(dim=0, keepdim=True)).t()
