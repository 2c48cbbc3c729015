import functools
import math

import pytest
import torch

from bam import Backbone, build_backbone
from bam.backbones import sincos_pos_embed_2d

# (id, name, tiny kwargs, embed dim, feature stride)
ARCHS = [
    ("vit_small_patch16_224", "vit_small_patch16_224", dict(depth=1), 384, 16),
    ("vit_base_patch16_224", "vit_base_patch16_224", dict(depth=1), 768, 16),
    ("vit_small_patch8_224", "vit_small_patch8_224", dict(depth=1), 384, 8),
    ("vit_small_mocov3_patch16_224", "vit_small_mocov3_patch16_224", dict(depth=1), 384, 16),
    ("vit_small_patch14_dinov2", "vit_small_patch14_dinov2", dict(depth=2), 384, 14),
    ("vit_small_patch14_reg4_dinov2", "vit_small_patch14_reg4_dinov2", dict(depth=2), 384, 14),
    # DINOv2 checkpoints load with DINOv2's own interpolation; DINO/iBOT with DINO's; I-JEPA: no [CLS], sin-cos
    ("dinov2[dinov2 rule]", "vit_small_patch14_dinov2", dict(depth=2, pos_embed_rule="dinov2"), 384, 14),
    ("dinov2_reg4[dinov2_reg rule]", "vit_small_patch14_reg4_dinov2", dict(depth=2, pos_embed_rule="dinov2_reg"),
     384, 14),
    ("vit_small[dino rule]", "vit_small_patch16_224", dict(depth=1, pos_embed_rule="dino"), 384, 16),
    ("vit_small[msn rule]", "vit_small_patch16_224", dict(depth=1, pos_embed_rule="msn"), 384, 16),
    ("vit_small[no cls, sincos rule]", "vit_small_patch16_224",
     dict(depth=1, class_token=False, pos_embed_rule="sincos"), 384, 16),
    ("vit_small[no cls]", "vit_small_patch16_224", dict(depth=1, class_token=False), 384, 16),
    ("resnet50", "resnet50", dict(layers=(1, 1, 1, 1)), 2048, 32),
    ("caformer_m36", "caformer_m36", {}, 576, 32),
]
# 224, about 96 (a multiple of the patch: timm's patch embedding asserts it), non-square
SIZES = {14: [(224, 224), (98, 98), (70, 112)]}
DEFAULT_SIZES = [(224, 224), (96, 96), (64, 112)]


@functools.cache
def _built(arch_id):  # each arch once for its three sizes
    _, name, kw, _, _ = next(a for a in ARCHS if a[0] == arch_id)
    return build_backbone(name, **kw).eval()


@pytest.mark.parametrize("arch_id,name,kw,dim,stride", ARCHS, ids=[a[0] for a in ARCHS])
@pytest.mark.parametrize("size", [0, 1, 2], ids=["224", "96", "non-square"])
def test_backbone_interface_at_any_size(arch_id, name, kw, dim, stride, size):
    hw = SIZES.get(stride, DEFAULT_SIZES)[size]
    bb = _built(arch_id)
    assert isinstance(bb, Backbone) and bb.embed_dim == dim and bb.feature_stride == stride
    assert bb.patch_size == (stride if "vit" in name else None)
    with torch.no_grad():
        out = bb.forward_features(torch.randn(1, 3, *hw))
    # ViT patches floor the size; padded CNN strides round up (112 -> 56 -> 28 -> 14 -> 7 -> 4)
    rnd = (lambda v: v // stride) if "vit" in name else (lambda v: math.ceil(v / stride))
    h, w = rnd(hw[0]), rnd(hw[1])
    assert out["hw"] == (h, w)
    assert out["cls"].shape == (1, dim)
    assert out["patch"].shape == (1, h * w, dim)
    assert torch.isfinite(out["patch"]).all()
    if bb.is_vit:
        with torch.no_grad():
            last = bb.get_intermediate_layers(torch.randn(1, 3, *hw), n=1)[-1]
        assert last["patch"].shape == (1, h * w, dim) and last["cls"].shape == (1, dim)


def test_get_intermediate_layers_last_block_is_forward_features(tiny_vit):
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        layers = tiny_vit.get_intermediate_layers(x, n=2)
        final = tiny_vit.forward_features(x)
    assert len(layers) == 2 and layers[0]["patch"].shape == (2, 4 * 6, 32)
    assert torch.allclose(layers[-1]["patch"], final["patch"], atol=1e-6)
    assert torch.allclose(layers[-1]["cls"], final["cls"], atol=1e-6)


def test_mocov3_vit_has_12_heads_and_fixed_sincos_position_embedding():
    bb = build_backbone("vit_small_mocov3_patch16_224", depth=1)
    assert bb.model.blocks[0].attn.num_heads == 12
    pe = bb.model.pos_embed
    assert not pe.requires_grad and pe.shape == (1, 1 + 14 * 14, 384)
    assert torch.equal(pe[0, 0], torch.zeros(384))  # the class token gets no position
    # patch (row 2, col 5): first quarter sin(5 * omega_k), third quarter sin(2 * omega_k); omega_0 = 1
    p = pe[0, 1 + 2 * 14 + 5]
    assert p[0].item() == pytest.approx(math.sin(5.0), abs=1e-6)
    assert p[96].item() == pytest.approx(math.cos(5.0), abs=1e-6)
    assert p[192].item() == pytest.approx(math.sin(2.0), abs=1e-6)
    assert p[193].item() == pytest.approx(math.sin(2.0 / 10000 ** (1 / 96)), abs=1e-6)
    assert torch.equal(sincos_pos_embed_2d((14, 14), 384), pe.detach())


def test_timm_small_vit_keeps_its_6_heads():
    assert build_backbone("vit_small_patch16_224", depth=1).model.blocks[0].attn.num_heads == 6


def test_unknown_arch_lists_known_ones():
    with pytest.raises(ValueError, match="unknown arch 'vit_huge'.*vit_small_patch16_224"):
        build_backbone("vit_huge")
