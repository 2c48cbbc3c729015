"""Backbones through timm behind one interface that every downstream adapter uses.

``Backbone.forward_features(x)`` returns ``{"cls": [B, D], "patch": [B, N, D], "hw": (h, w)}`` for any input
size (ViT position embeddings are interpolated on the fly): ViTs give their normalised tokens, CNNs their last
feature map flattened to ``h*w`` tokens (stride ``feature_stride``) and its pooled vector as ``cls``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import timm
import torch
import torch.nn as nn

logger = logging.getLogger(__name__)


class Backbone(nn.Module):
    """A timm model behind the project's backbone interface. ``arch`` and ``arch_kwargs`` rebuild it."""

    def __init__(self, model: nn.Module, arch: str, arch_kwargs: dict[str, Any] | None = None):
        super().__init__()
        self.model = model
        self.arch = arch
        self.arch_kwargs = dict(arch_kwargs or {})
        self.checkpoint_format: str | None = None  # set by load_backbone
        self.is_vit = hasattr(model, "patch_embed") and hasattr(model, "blocks")
        self.embed_dim: int = model.num_features
        if self.is_vit:
            self.patch_size: int | None = model.patch_embed.patch_size[0]
            self.num_prefix_tokens: int = model.num_prefix_tokens
            self.feature_stride = self.patch_size
        else:
            self.patch_size = None
            self.num_prefix_tokens = 0
            self.feature_stride = model.feature_info[-1]["reduction"]

    def _split_tokens(self, tokens: torch.Tensor, hw: tuple[int, int]) -> dict[str, Any]:
        return {"cls": tokens[:, 0], "patch": tokens[:, self.num_prefix_tokens:], "hw": hw}

    def _split_map(self, fmap: torch.Tensor) -> dict[str, Any]:
        pooled = self.model.forward_head(fmap, pre_logits=True)
        return {"cls": pooled, "patch": fmap.flatten(2).transpose(1, 2), "hw": tuple(fmap.shape[-2:])}

    def grid(self, x: torch.Tensor) -> tuple[int, int]:
        return x.shape[-2] // self.feature_stride, x.shape[-1] // self.feature_stride

    def forward_features(self, x: torch.Tensor) -> dict[str, Any]:
        """``x: [B, 3, H, W]`` -> ``{"cls": [B, D], "patch": [B, h*w, D], "hw": (h, w)}``."""
        if self.is_vit:
            return self._split_tokens(self.model.forward_features(x), self.grid(x))
        return self._split_map(self.model.forward_features(x))

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[dict[str, Any]]:
        """The last ``n`` blocks (ViT, each through the final norm, as DINO) or stages (CNN), oldest first."""
        if self.is_vit:
            outs = self.model.forward_intermediates(x, indices=n, norm=True, output_fmt="NLC",
                                                    intermediates_only=True, return_prefix_tokens=True)
            return [{"cls": prefix[:, 0], "patch": patch, "hw": self.grid(x)} for patch, prefix in outs]
        maps = self.model.forward_intermediates(x, indices=n, intermediates_only=True)
        return [{"cls": m.mean(dim=(-2, -1)), "patch": m.flatten(2).transpose(1, 2), "hw": tuple(m.shape[-2:])}
                for m in maps]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)["cls"]


def sincos_pos_embed_2d(grid_hw: tuple[int, int], dim: int, n_prefix: int = 1, temperature: float = 10000.0
                        ) -> torch.Tensor:
    """MoCo v3's fixed 2-D sin-cos position embedding: ``[1, n_prefix + h*w, dim]``, zeros for prefix tokens."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {dim}")
    h, w = grid_hw
    gy, gx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ox, oy = gx.flatten()[:, None] * omega, gy.flatten()[:, None] * omega
    pe = torch.cat([ox.sin(), ox.cos(), oy.sin(), oy.cos()], dim=1)
    return torch.cat([torch.zeros(n_prefix, dim, dtype=torch.float64), pe]).unsqueeze(0).float()


def _timm_vit(timm_name: str) -> Callable[..., nn.Module]:
    def build(**kw: Any) -> nn.Module:
        return timm.create_model(timm_name, pretrained=False, num_classes=0, dynamic_img_size=True, **kw)
    return build


def _mocov3_vit(timm_name: str) -> Callable[..., nn.Module]:
    """The ViT of MoCo v3 and official BAM: 12 heads, fixed sin-cos position embedding."""
    def build(**kw: Any) -> nn.Module:
        kw = {"num_heads": 12, **kw}
        model = timm.create_model(timm_name, pretrained=False, num_classes=0, dynamic_img_size=True, **kw)
        grid = model.patch_embed.grid_size
        n_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        model.pos_embed.data.copy_(sincos_pos_embed_2d(grid, model.embed_dim, n_prefix))
        model.pos_embed.requires_grad_(False)
        return model
    return build


def _timm_cnn(timm_name: str) -> Callable[..., nn.Module]:
    def build(**kw: Any) -> nn.Module:
        return timm.create_model(timm_name, pretrained=False, num_classes=0, **kw)
    return build


ARCHS: dict[str, Callable[..., nn.Module]] = {
    "vit_tiny_patch16_224": _timm_vit("vit_tiny_patch16_224"),
    "vit_small_patch16_224": _timm_vit("vit_small_patch16_224"),
    "vit_small_patch8_224": _timm_vit("vit_small_patch8_224"),
    "vit_base_patch16_224": _timm_vit("vit_base_patch16_224"),
    "vit_base_patch8_224": _timm_vit("vit_base_patch8_224"),
    "vit_large_patch16_224": _timm_vit("vit_large_patch16_224"),
    "vit_small_patch14_dinov2": _timm_vit("vit_small_patch14_dinov2"),
    "vit_base_patch14_dinov2": _timm_vit("vit_base_patch14_dinov2"),
    "vit_large_patch14_dinov2": _timm_vit("vit_large_patch14_dinov2"),
    "vit_small_patch14_reg4_dinov2": _timm_vit("vit_small_patch14_reg4_dinov2"),
    "vit_base_patch14_reg4_dinov2": _timm_vit("vit_base_patch14_reg4_dinov2"),
    "vit_small_mocov3_patch16_224": _mocov3_vit("vit_small_patch16_224"),
    "vit_base_mocov3_patch16_224": _mocov3_vit("vit_base_patch16_224"),
    "resnet18": _timm_cnn("resnet18"),
    "resnet34": _timm_cnn("resnet34"),
    "resnet50": _timm_cnn("resnet50"),
    "resnet101": _timm_cnn("resnet101"),
    "caformer_s18": _timm_cnn("caformer_s18"),
    "caformer_s36": _timm_cnn("caformer_s36"),
    "caformer_m36": _timm_cnn("caformer_m36"),
    "caformer_b36": _timm_cnn("caformer_b36"),
}


def build_backbone(name: str, **kwargs: Any) -> Backbone:
    """Build a randomly initialised backbone by name; ``kwargs`` go to timm (e.g. ``depth=2`` for tests)."""
    if name not in ARCHS:
        raise ValueError(f"unknown arch {name!r}; known: {', '.join(sorted(ARCHS))}")
    return Backbone(ARCHS[name](**kwargs), name, kwargs)
