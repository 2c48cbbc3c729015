"""Position embeddings at any input size, each ViT family by its own source's rule.

A checkpoint is only faithful at a new resolution if its position embeddings are interpolated the way its source
model does it; a 1-pixel offset or an antialias flag moves the features by a tenth of their norm. Rules, chosen by
the converter and stored in the backbone's ``arch_kwargs["pos_embed_rule"]``:

``timm``       timm's ``_pos_embed``: ``resample_abs_pos_embed`` to the exact grid (bicubic, antialias).
``dino``       DINO / iBOT ``interpolate_pos_encoding``: the stored table when the input is square with the stored
               number of patches, else bicubic with ``scale_factor = (grid + 0.1) / stored grid`` per axis.
``dinov2``     DINOv2 without registers (``interpolate_offset=0.1``, ``interpolate_antialias=False``): as ``dino``,
               computed in float32.
``dinov2_reg`` DINOv2 hub models with registers (``interpolate_offset=0.0``, ``interpolate_antialias=True``):
               bicubic to the exact ``size`` with antialias.
``msn``        MSN ``interpolate_pos_encoding``: the stored table for the stored number of patches, else bicubic
               with one ``scale_factor = sqrt(n_patches / N)`` (square grids); MSN's ``forward`` cannot run on other
               non-square grids, so those follow its ``forward_selfattention`` (per axis ``grid / stored grid``).
``sincos``     I-JEPA: a fixed 2-D sin-cos table. Its own ``interpolate_pos_encoding`` cannot run at another size
               (it takes the first patch for a class token), so other grids get the same sin-cos formula.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

RULES = ("timm", "dino", "dinov2", "dinov2_reg", "msn", "sincos")


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ValueError(f"unknown pos_embed_rule {rule!r}; known: {', '.join(RULES)}")
    return rule


def sincos_pos_embed_2d(grid_hw: tuple[int, int], dim: int, n_prefix: int = 1, temperature: float = 10000.0
                        ) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (MoCo v3, MAE, I-JEPA): ``[1, n_prefix + h*w, dim]``, zeros for prefix
    tokens; the first half of the channels encodes the column, the second half the row."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {dim}")
    h, w = grid_hw
    gy, gx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ox, oy = gx.flatten()[:, None] * omega, gy.flatten()[:, None] * omega
    pe = torch.cat([ox.sin(), ox.cos(), oy.sin(), oy.cos()], dim=1)
    return torch.cat([torch.zeros(n_prefix, dim, dtype=torch.float64), pe]).unsqueeze(0).float()


def resample_patch_pos(rule: str, pos: torch.Tensor, grid_hw: tuple[int, int], pixel_hw: tuple[int, int]
                       ) -> torch.Tensor:
    """The patch position embeddings ``pos: [1, G*G, D]`` (a square stored grid) for an input of ``pixel_hw``
    pixels whose patch grid is ``grid_hw``, by ``rule`` (not ``timm``: timm resamples inside its own model).
    Returns ``[1, gh*gw, D]``."""
    n_stored, dim = pos.shape[1], pos.shape[2]
    side = math.isqrt(n_stored)
    if side * side != n_stored:
        raise ValueError(f"stored position embeddings of {n_stored} patches are not a square grid")
    (gh, gw), (height, width) = grid_hw, pixel_hw
    table = pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if rule in ("dino", "dinov2", "dinov2_reg"):
        if gh * gw == n_stored and height == width:
            return pos
        if rule == "dino":
            out = F.interpolate(table, scale_factor=((gh + 0.1) / side, (gw + 0.1) / side), mode="bicubic")
        elif rule == "dinov2":
            out = F.interpolate(table.float(), scale_factor=((gh + 0.1) / side, (gw + 0.1) / side), mode="bicubic",
                                antialias=False).to(pos.dtype)
        else:
            out = F.interpolate(table.float(), size=(gh, gw), mode="bicubic", antialias=True).to(pos.dtype)
    elif rule == "msn":
        if gh * gw == n_stored:  # MSN checks the patch count only (a 4x16 input keeps an 8x8 table, as in MSN)
            return pos
        scale = math.sqrt(gh * gw / n_stored) if gh == gw else (gh / side, gw / side)
        out = F.interpolate(table, scale_factor=scale, mode="bicubic")
    elif rule == "sincos":
        if (gh, gw) == (side, side):
            return pos
        return sincos_pos_embed_2d((gh, gw), dim, n_prefix=0).to(pos)
    else:
        raise ValueError(f"pos_embed_rule {rule!r} is not resampled here; known: {', '.join(RULES[1:])}")
    if tuple(out.shape[-2:]) != (gh, gw):  # the source's own assert (or shape error) at this size
        raise ValueError(f"the {rule} position-embedding rule gives a {tuple(out.shape[-2:])} grid for a "
                         f"{height}x{width} input, not {(gh, gw)}; use another input size")
    return out.permute(0, 2, 3, 1).reshape(1, gh * gw, dim)


def pos_prefix_count(model: nn.Module) -> int:
    """How many leading rows of a timm ViT's ``pos_embed`` belong to prefix tokens (class, registers)."""
    return 0 if model.no_embed_class else model.num_prefix_tokens


def embed_tokens(model: nn.Module, x: torch.Tensor, rule: str) -> torch.Tensor:
    """A timm ViT's input tokens ``[B, n_prefix + h*w, D]`` for images ``x: [B, 3, H, W]``, position embeddings
    by ``rule``: what timm's ``patch_embed`` + ``_pos_embed`` + ``patch_drop`` + ``norm_pre`` compute for ``timm``."""
    if rule == "timm":
        tokens = model._pos_embed(model.patch_embed(x))  # [B, h, w, D] in: built with dynamic_img_size
    else:
        # the sources' strided convolution drops the pixels past the last whole patch; timm asserts instead
        p_h, p_w = model.patch_embed.patch_size
        patches = model.patch_embed(x[..., :x.shape[-2] // p_h * p_h, :x.shape[-1] // p_w * p_w])
        b, gh, gw, dim = patches.shape
        n_pos_prefix = pos_prefix_count(model)
        pos = model.pos_embed
        patch_pos = resample_patch_pos(rule, pos[:, n_pos_prefix:], (gh, gw), tuple(x.shape[-2:]))
        prefix = [t.expand(b, -1, -1) for t in (model.cls_token, model.reg_token) if t is not None]
        tokens = patches.reshape(b, gh * gw, dim) + patch_pos
        if prefix:
            prefix_tokens = torch.cat(prefix, dim=1)
            if n_pos_prefix:
                prefix_tokens = prefix_tokens + pos[:, :n_pos_prefix]
            tokens = torch.cat([prefix_tokens, tokens], dim=1)
        tokens = model.pos_drop(tokens)
    return model.norm_pre(model.patch_drop(tokens))


def resample_stored(rule: str, pos_embed: torch.Tensor, n_pos_prefix: int, grid_hw: tuple[int, int],
                    patch_size: int) -> torch.Tensor:
    """A whole stored ``pos_embed`` moved to a new (square-input) grid by ``rule`` at load time: what the source
    model computes for a ``grid * patch_size`` input, so the loaded model equals the source at its new grid."""
    pixel_hw = (grid_hw[0] * patch_size, grid_hw[1] * patch_size)
    patch_pos = resample_patch_pos(rule, pos_embed[:, n_pos_prefix:], grid_hw, pixel_hw)
    return torch.cat([pos_embed[:, :n_pos_prefix], patch_pos], dim=1)
