"""ContrastiveCrop boxes: where each image's object is, from the last block's [CLS] attention (ViTs)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bam.backbones import Backbone


@torch.no_grad()
def cls_attention(backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
    """``[B, h, w]``: the last block's [CLS]-to-patch attention, summed over heads."""
    if not backbone.is_vit:
        raise ValueError(f"ContrastiveCrop needs a ViT's attention; {backbone.arch} has none (set ccrop_alpha: null)")
    block = backbone.model.blocks[-1]
    captured = {}
    handle = block.norm1.register_forward_hook(lambda m, i, o: captured.__setitem__("x", o))
    try:
        backbone.model.forward_features(images)
    finally:
        handle.remove()
    x = captured["x"]
    attn = block.attn
    b, n, d = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, d // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    weights = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(-1)  # [B, heads, 1, n]
    h, w = backbone.grid(images)
    return weights[:, :, 0, backbone.num_prefix_tokens:].sum(1).reshape(b, h, w)


def boxes_from_attention(attn: torch.Tensor, size: tuple[int, int], threshold: float = 0.1) -> torch.Tensor:
    """``[B, 4]`` boxes ``(h_min, w_min, h_max, w_max)`` in [0, 1]: where the min-max scaled, upsampled attention
    exceeds ``threshold`` (as the official ContrastiveCrop)."""
    b = attn.shape[0]
    flat = attn.reshape(b, -1)
    flat = flat - flat.min(1, keepdim=True).values
    flat = flat / (flat.max(1, keepdim=True).values + 1e-5)
    maps = F.interpolate(flat.reshape(b, 1, *attn.shape[1:]), size=size, mode="bilinear")[:, 0]
    boxes = []
    for m in maps:
        rows = torch.nonzero(m.max(1).values > threshold).flatten()
        cols = torch.nonzero(m.max(0).values > threshold).flatten()
        if len(rows) == 0 or len(cols) == 0:
            boxes.append(torch.tensor([0.0, 0.0, 1.0, 1.0]))
            continue
        boxes.append(torch.tensor([rows[0] / size[0], cols[0] / size[1], rows[-1] / size[0], cols[-1] / size[1]]))
    return torch.stack(boxes)
