"""Backbones through timm behind one interface that every downstream adapter uses.

``Backbone.forward_features(x)`` returns ``{"cls": [B, D], "patch": [B, N, D], "hw": (h, w)}`` for any input
size: ViTs give their normalised tokens, with position embeddings interpolated by their family's own rule
(:mod:`bam.pos_embed`, ``arch_kwargs["pos_embed_rule"]``, timm's by default); CNNs their last feature map flattened
to ``h*w`` tokens (stride ``feature_stride``) and its pooled vector as ``cls``. A ViT without a class token
(I-JEPA) gives the mean of its normalised patch tokens as ``cls``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import timm
import torch
import torch.nn as nn
from timm.layers import SwiGLUPacked
from torch.utils.checkpoint import checkpoint

from bam.pos_embed import check_rule, embed_tokens, pos_prefix_count, sincos_pos_embed_2d

logger = logging.getLogger(__name__)

__all__ = ["ARCHS", "Backbone", "build_backbone", "sincos_pos_embed_2d"]


class Backbone(nn.Module):
    """A timm model behind the project's backbone interface. ``arch`` and ``arch_kwargs`` rebuild it."""

    def __init__(self, model: nn.Module, arch: str, arch_kwargs: dict[str, Any] | None = None):
        super().__init__()
        self.model = model
        self.arch = arch
        self.arch_kwargs = dict(arch_kwargs or {})
        self.checkpoint_format: str | None = None  # set by load_backbone
        self.is_vit = hasattr(model, "patch_embed") and hasattr(model, "blocks")
        self.pos_embed_rule = check_rule(self.arch_kwargs.get("pos_embed_rule", "timm"))
        self.embed_dim: int = model.num_features
        if self.is_vit:
            self.patch_size: int | None = model.patch_embed.patch_size[0]
            self.num_prefix_tokens: int = model.num_prefix_tokens
            self.has_class_token = model.cls_token is not None
            self.feature_stride = self.patch_size
        else:
            if self.pos_embed_rule != "timm":
                raise ValueError(f"pos_embed_rule={self.pos_embed_rule!r} is for ViTs; {arch} has no position "
                                 f"embedding")
            self.patch_size = None
            self.num_prefix_tokens = 0
            self.has_class_token = False
            self.feature_stride = model.feature_info[-1]["reduction"]

    def _split_tokens(self, tokens: torch.Tensor, hw: tuple[int, int]) -> dict[str, Any]:
        patch = tokens[:, self.num_prefix_tokens:]
        return {"cls": tokens[:, 0] if self.has_class_token else patch.mean(dim=1), "patch": patch, "hw": hw}

    def _split_map(self, fmap: torch.Tensor) -> dict[str, Any]:
        pooled = self.model.forward_head(fmap, pre_logits=True)
        return {"cls": pooled, "patch": fmap.flatten(2).transpose(1, 2), "hw": tuple(fmap.shape[-2:])}

    def grid(self, x: torch.Tensor) -> tuple[int, int]:
        return x.shape[-2] // self.feature_stride, x.shape[-1] // self.feature_stride

    def _vit_blocks(self, x: torch.Tensor, n: int) -> list[torch.Tensor]:
        """The last ``n`` blocks' tokens through the final norm, for a source position-embedding rule."""
        model = self.model
        tokens = embed_tokens(model, x, self.pos_embed_rule)
        outs, depth = [], len(model.blocks)
        for i, block in enumerate(model.blocks):
            if model.grad_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, use_reentrant=False)
            else:
                tokens = block(tokens)
            if i >= depth - n:
                outs.append(model.norm(tokens))
        return outs

    def forward_features(self, x: torch.Tensor) -> dict[str, Any]:
        """``x: [B, 3, H, W]`` -> ``{"cls": [B, D], "patch": [B, h*w, D], "hw": (h, w)}``."""
        if not self.is_vit:
            return self._split_map(self.model.forward_features(x))
        if self.pos_embed_rule == "timm":
            return self._split_tokens(self.model.forward_features(x), self.grid(x))
        return self._split_tokens(self._vit_blocks(x, 1)[-1], self.grid(x))

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[dict[str, Any]]:
        """The last ``n`` blocks (ViT, each through the final norm, as DINO) or stages (CNN), oldest first."""
        if self.is_vit and self.pos_embed_rule != "timm":
            return [self._split_tokens(tokens, self.grid(x)) for tokens in self._vit_blocks(x, n)]
        if self.is_vit:
            outs = self.model.forward_intermediates(x, indices=n, norm=True, output_fmt="NLC",
                                                    intermediates_only=True, return_prefix_tokens=True)
            if not self.num_prefix_tokens:
                return [{"cls": patch.mean(dim=1), "patch": patch, "hw": self.grid(x)} for patch in outs]
            return [{"cls": prefix[:, 0] if self.has_class_token else patch.mean(dim=1), "patch": patch,
                     "hw": self.grid(x)} for patch, prefix in outs]
        maps = self.model.forward_intermediates(x, indices=n, intermediates_only=True)
        return [{"cls": m.mean(dim=(-2, -1)), "patch": m.flatten(2).transpose(1, 2), "hw": tuple(m.shape[-2:])}
                for m in maps]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)["cls"]


def _vit_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    """Our plain-value ViT options in timm's terms (checkpoints keep plain values, never classes)."""
    kw = dict(kw)
    ffn = kw.pop("ffn", "mlp")
    if ffn == "swiglu":  # DINOv2's SwiGLUFFN: fc1 packs both halves, silu(first) * second
        kw.update(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
    elif ffn != "mlp":
        raise ValueError(f"unknown ffn {ffn!r}; known: mlp, swiglu")
    if kw.get("class_token") is False:  # I-JEPA: no [CLS]; the final norm stays on the tokens
        kw.setdefault("global_pool", "avg")
        kw.setdefault("fc_norm", False)
    return kw


def _timm_vit(timm_name: str) -> Callable[..., nn.Module]:
    def build(**kw: Any) -> nn.Module:
        return timm.create_model(timm_name, pretrained=False, num_classes=0, dynamic_img_size=True,
                                 **_vit_kwargs(kw))
    return build


def _mocov3_vit(timm_name: str) -> Callable[..., nn.Module]:
    """The ViT of MoCo v3 and official BAM: 12 heads, fixed sin-cos position embedding."""
    def build(**kw: Any) -> nn.Module:
        kw = {"num_heads": 12, **kw}
        model = timm.create_model(timm_name, pretrained=False, num_classes=0, dynamic_img_size=True,
                                  **_vit_kwargs(kw))
        model.pos_embed.data.copy_(sincos_pos_embed_2d(model.patch_embed.grid_size, model.embed_dim,
                                                       pos_prefix_count(model)))
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
    "vit_huge_patch14_224": _timm_vit("vit_huge_patch14_224"),
    "vit_giant_patch14_224": _timm_vit("vit_giant_patch14_224"),
    "vit_small_patch14_dinov2": _timm_vit("vit_small_patch14_dinov2"),
    "vit_base_patch14_dinov2": _timm_vit("vit_base_patch14_dinov2"),
    "vit_large_patch14_dinov2": _timm_vit("vit_large_patch14_dinov2"),
    "vit_small_patch14_reg4_dinov2": _timm_vit("vit_small_patch14_reg4_dinov2"),
    "vit_giant_patch14_dinov2": _timm_vit("vit_giant_patch14_dinov2"),
    "vit_base_patch14_reg4_dinov2": _timm_vit("vit_base_patch14_reg4_dinov2"),
    "vit_large_patch14_reg4_dinov2": _timm_vit("vit_large_patch14_reg4_dinov2"),
    "vit_giant_patch14_reg4_dinov2": _timm_vit("vit_giant_patch14_reg4_dinov2"),
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
    """Build a randomly initialised backbone by name; ``kwargs`` go to timm (e.g. ``depth=2`` for tests), except
    ``pos_embed_rule`` (:data:`bam.pos_embed.RULES`), which the Backbone keeps, and ``ffn`` ("mlp" | "swiglu")."""
    if name not in ARCHS:
        raise ValueError(f"unknown arch {name!r}; known: {', '.join(sorted(ARCHS))}")
    check_rule(kwargs.get("pos_embed_rule", "timm"))
    timm_kwargs = {k: v for k, v in kwargs.items() if k != "pos_embed_rule"}
    return Backbone(ARCHS[name](**timm_kwargs), name, kwargs)
