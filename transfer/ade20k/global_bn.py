"""Batch normalisation over the global batch when a segmentor trains on several processes.

mmseg's recipes normalise over the whole batch of 16 images (SyncBN over 8 GPUs x 2 or 4 x 4). One process holding
the 16 images gets that from a plain ``BatchNorm2d``; N processes holding 16 / N each need the statistics summed over
ranks. torch's ``SyncBatchNorm`` refuses CPU tensors (so a gloo run could not have it) and mmcv's needs compiled ops
mmcv-lite lacks, hence this one: two differentiable all-reduces per layer, on any device and backend.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from bam.distributed import is_dist


class _SumOverRanks(torch.autograd.Function):
    """all_reduce (sum) whose backward sums the gradients over ranks too (every rank's loss depends on the sum).
    torch.distributed.nn.functional.all_reduce does the same but is deprecated for a private module's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def global_batch_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x: [B, C, ...]`` on this rank -> ``(normalised x [B, C, ...], mean [C], biased var [C], count [])`` with the
    mean and variance over every rank's ``B x ...`` positions (differentiable: each rank's gradient includes what the
    other ranks' losses owe to the shared statistics, as SyncBatchNorm's backward)."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    count = torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device)
    sums = _SumOverRanks.apply(torch.cat([x.sum(dims), count]))
    count = sums[-1].detach()
    mean = sums[:-1] / count
    centred = x - mean.view(shape)  # the second pass: E[(x - mean)^2] is steadier than E[x^2] - mean^2
    var = _SumOverRanks.apply((centred * centred).sum(dims)) / count
    return centred * torch.rsqrt(var + eps).view(shape), mean, var, count


class GlobalBatchNorm(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training statistics span the global batch under a process group; without one, or in
    eval mode (running statistics), it is ``BatchNorm2d`` itself. Same parameters, buffers and state-dict keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_dist() and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        y, mean, var, count = global_batch_stats(x, self.eps)
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            with torch.no_grad():  # as BatchNorm2d: the unbiased variance goes into the running estimate
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(var.detach() * count / (count - 1).clamp(min=1), factor)
        if self.affine:
            shape = [1, -1] + [1] * (x.dim() - 2)
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_to_global_bn(module: nn.Module) -> nn.Module:
    """``module`` with every ``BatchNorm2d`` (and ``SyncBatchNorm``) replaced by a :class:`GlobalBatchNorm` that
    holds the same parameter objects and buffers; returns the converted module (a new object only when ``module``
    is itself a batch norm)."""
    if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        if module.track_running_stats:
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        return out
    for name, child in module.named_children():
        converted = convert_to_global_bn(child)
        if converted is not child:
            setattr(module, name, converted)
    return module
