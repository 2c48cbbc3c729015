"""The network that pretraining optimises: backbone + projector over multi-crop batches; its optimiser."""
from __future__ import annotations

import torch
import torch.nn as nn

from bam.backbones import Backbone
from bam.projector import Projector


class BAMModel(nn.Module):
    """Backbone + projector. ``forward(crops)`` returns ``[n_crops*B, D]``, crop-major as the loss expects.

    Consecutive crops of the same resolution go through the backbone together (2 global, then 6 local).
    """

    def __init__(self, backbone: Backbone, projector: Projector):
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        feats, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            feats.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        return self.projector(torch.cat(feats))


def param_groups(model: nn.Module) -> list[dict]:
    """Two groups: weights (decayed) and biases / norm parameters (ndim <= 1, never decayed), as DINO."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False, "weight_decay": 0.0}]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratios (You et al. 2017); 1-D parameters skip decay and adaptation."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 eta: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    p_norm, d_norm = torch.norm(p), torch.norm(dp)
                    ok = (p_norm > 0) & (d_norm > 0)
                    trust = torch.where(ok, g["eta"] * p_norm / d_norm, torch.ones_like(p_norm))
                    dp = dp.mul(trust)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"].mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


OPTIMIZERS = {
    "adamw": lambda groups: torch.optim.AdamW(groups, lr=0.0),
    "sgd": lambda groups: torch.optim.SGD(groups, lr=0.0, momentum=0.9),
    "lars": lambda groups: LARS(groups, lr=0.0),
}


def build_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    """lr and weight decay are set every step from the schedules."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](param_groups(model))


def set_lr_wd(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = float(lr)  # never a NumPy scalar: checkpoints must load with weights_only
        if g.get("apply_wd", True):
            g["weight_decay"] = float(wd)
