"""End-to-end fine-tuning: the MAE/BEiT recipe with timm's parts.

Layer-wise lr decay follows MAE/BEiT for ViTs (patch embedding, [CLS] and positions: layer 0; block i: layer
i + 1; the final norm and the head: layer depth + 1; scale ``decay ** (depth + 1 - layer)``) and timm's
``param_groups_layer_decay`` (its ``group_matcher`` stages) for CNNs. No weight decay on biases, norms, [CLS]
and position embeddings. Per-step linear warm-up then cosine to ``min_lr``, each group at ``lr * lr_scale``.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
from timm.optim import param_groups_layer_decay

from bam.backbones import Backbone, build_backbone

_VIT_STEM = re.compile(r"^(cls_token|reg_token|dist_token|pos_embed|patch_embed)")
_VIT_BLOCK = re.compile(r"^blocks\.(\d+)\.")


class Classifier(nn.Module):
    """A backbone and a linear head on its [CLS] token (``pool="cls"``) or, for ViTs, on MAE's ``global_pool``
    (``pool="avg"``): the mean of the patch tokens as the last block leaves them, through a new ``fc_norm``. As
    in MAE's models_vit.py, the backbone's final norm is removed then (its pretrained weights go unused) and
    the prefix tokens are left out of the mean. The head starts at N(0, 2e-5) with zero bias, as in MAE."""

    def __init__(self, backbone: Backbone, num_classes: int, pool: str = "cls"):
        super().__init__()
        if pool not in ("cls", "avg"):
            raise ValueError(f"pool {pool!r} must be cls or avg")
        self.backbone, self.pool = backbone, pool
        self.global_pool = pool == "avg" and backbone.is_vit
        if self.global_pool:
            backbone.model.norm = nn.Identity()  # MAE: ``del self.norm`` with global_pool
        self.fc_norm = nn.LayerNorm(backbone.embed_dim, eps=1e-6) if self.global_pool else nn.Identity()
        self.head = nn.Linear(backbone.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.backbone.forward_features(x)
        feat = self.fc_norm(out["patch"].mean(dim=1)) if self.global_pool else out["cls"]
        return self.head(feat)


def vit_layer_id(name: str, depth: int) -> int:
    """MAE's ``get_layer_id_for_vit`` on a timm ViT parameter name."""
    if _VIT_STEM.match(name):
        return 0
    m = _VIT_BLOCK.match(name)
    return int(m.group(1)) + 1 if m else depth + 1


_NO_DECAY_TOKENS = {"cls_token", "reg_token", "dist_token", "pos_embed"}


def _no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim <= 1 or name in _NO_DECAY_TOKENS


def layer_decay_groups(model: nn.Module, backbone: Backbone, weight_decay: float, layer_decay: float) -> list[dict]:
    """Parameter groups ``{"params", "names", "weight_decay", "lr_scale"}`` for ``model``, which contains ``backbone``.

    The backbone's parameters get layer-wise scales; every other trainable parameter of ``model`` (heads, necks)
    gets 1. Frozen parameters (e.g. the fixed sin-cos positions of MoCo-v3-style ViTs) are left out.
    """
    timm_model = backbone.model
    in_backbone = {id(p) for p in timm_model.parameters()}
    full_names = {id(p): n for n, p in model.named_parameters()}
    groups: dict[tuple[float, float], dict] = {}

    def add(param: torch.Tensor, scale: float, no_decay: bool) -> None:
        wd = 0.0 if no_decay else weight_decay
        group = groups.setdefault((scale, wd), {"params": [], "names": [], "weight_decay": wd, "lr_scale": scale})
        group["params"].append(param)
        group["names"].append(full_names[id(param)])

    if backbone.is_vit:
        depth = len(timm_model.blocks)
        for name, param in timm_model.named_parameters():
            if param.requires_grad:
                add(param, layer_decay ** (depth + 1 - vit_layer_id(name, depth)), _no_decay(name, param))
    else:
        for g in param_groups_layer_decay(timm_model, weight_decay=weight_decay, layer_decay=layer_decay):
            for param in g["params"]:
                if param.requires_grad:
                    add(param, g["lr_scale"], g["weight_decay"] == 0.0)
    for name, param in model.named_parameters():
        if id(param) not in in_backbone and param.requires_grad:
            add(param, 1.0, _no_decay(name, param))
    return sorted(groups.values(), key=lambda g: (g["lr_scale"], g["weight_decay"]))


def lr_at(step: float, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """MAE's ``adjust_learning_rate`` per step: linear warm-up from 0, then half-cycle cosine to ``min_lr``."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_group_lrs(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def with_drop_path(backbone: Backbone, rate: float) -> Backbone:
    """The same weights in a backbone rebuilt with stochastic depth ``rate`` (timm's ``drop_path_rate``)."""
    if rate <= 0:
        return backbone
    rebuilt = build_backbone(backbone.arch, **{**backbone.arch_kwargs, "drop_path_rate": rate})
    rebuilt.model.load_state_dict(backbone.model.state_dict())
    rebuilt.checkpoint_format = backbone.checkpoint_format
    return rebuilt
