"""Third-party ViTs at any input size equal their source model's own forward.

Each reference below re-implements the source's token preparation from its code (DINO/iBOT
``vision_transformer.py`` ``interpolate_pos_encoding``, DINOv2 ``models/vision_transformer.py`` with the hub's
offset/antialias settings, MSN ``src/deit.py``, I-JEPA ``src/models/vision_transformer.py``) with
``F.interpolate`` and numpy, and only borrows the timm model's patch projection, blocks and final norm.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from bam import build_backbone, load_backbone
from bam.formats import backbone_checkpoint

DIM = 32


def _model(**kw):
    """A tiny timm ViT with rough position embeddings (so interpolation differences show) and unit layer scales."""
    torch.manual_seed(0)
    model = build_backbone("vit_small_patch16_224", **{"depth": 2, "embed_dim": DIM, "num_heads": 2, **kw}).model
    with torch.no_grad():
        model.pos_embed.normal_()
        for name, p in model.named_parameters():
            if name in ("cls_token", "reg_token"):
                p.normal_()
            if name.endswith(".gamma"):
                p.fill_(1.0)
    return model.eval()


def _run_blocks(model, tokens):
    for block in model.blocks:
        tokens = block(tokens)
    return model.norm(tokens)


def _patches(model, x):
    return model.patch_embed.proj(x).flatten(2).transpose(1, 2)


def dino_like_reference(model, x, cls, pos, offset=0.1, antialias=False, float32=False, registers=None):
    """DINO/iBOT ``prepare_tokens`` (offset 0.1) and DINOv2 ``prepare_tokens_with_masks`` (offset / antialias as
    configured; offset 0 means an exact ``size``), then the blocks. ``B, nc, w, h = x.shape`` as in the sources."""
    b, _, w, h = x.shape
    p = model.patch_embed.proj.kernel_size[0]
    tokens = torch.cat([cls.expand(b, -1, -1), _patches(model, x)], dim=1)
    npatch, n = tokens.shape[1] - 1, pos.shape[1] - 1
    if npatch == n and w == h:
        pe = pos
    else:
        m = int(math.sqrt(n))
        table = pos[:, 1:].reshape(1, m, m, DIM).permute(0, 3, 1, 2)
        table = table.float() if float32 else table
        w0, h0 = w // p, h // p
        if offset:
            kwargs = {"scale_factor": (float(w0 + offset) / m, float(h0 + offset) / m)}
        else:
            kwargs = {"size": (w0, h0)}
        patch_pe = F.interpolate(table, mode="bicubic", antialias=antialias, **kwargs)
        assert tuple(patch_pe.shape[-2:]) == (w0, h0)
        pe = torch.cat([pos[:, :1], patch_pe.permute(0, 2, 3, 1).reshape(1, -1, DIM)], dim=1)
    tokens = tokens + pe
    if registers is not None:
        tokens = torch.cat([tokens[:, :1], registers.expand(b, -1, -1), tokens[:, 1:]], dim=1)
    return _run_blocks(model, tokens)


def msn_reference(model, x):
    """MSN ``forward_features`` (the stored table for N patches, else one ``scale_factor = sqrt(npatch / N)``) for
    square grids; its ``forward_selfattention`` interpolation (per axis, no offset) for the non-square grids where
    ``forward`` cannot run."""
    b, _, w, h = x.shape
    p = model.patch_embed.proj.kernel_size[0]
    tokens = torch.cat([model.cls_token.expand(b, -1, -1), _patches(model, x)], dim=1)
    pos = model.pos_embed
    npatch, n = tokens.shape[1] - 1, pos.shape[1] - 1
    table = pos[:, 1:].reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), DIM).permute(0, 3, 1, 2)
    if npatch == n:
        pe = pos
    elif w // p == h // p:
        patch_pe = F.interpolate(table, scale_factor=math.sqrt(npatch / n), mode="bicubic")
        pe = torch.cat([pos[:, :1], patch_pe.permute(0, 2, 3, 1).reshape(1, -1, DIM)], dim=1)
    else:
        scale = ((w // p) / math.sqrt(n), (h // p) / math.sqrt(n))
        patch_pe = F.interpolate(table, scale_factor=scale, mode="bicubic")
        pe = torch.cat([pos[:, :1], patch_pe.permute(0, 2, 3, 1).reshape(1, -1, DIM)], dim=1)
    return _run_blocks(model, tokens + pe)


def ijepa_sincos(dim, gh, gw):
    """I-JEPA's ``get_2d_sincos_pos_embed`` (numpy, ``meshgrid(grid_w, grid_h)``: the first half encodes the
    column), for a ``gh x gw`` grid."""
    grid = np.stack(np.meshgrid(np.arange(gw, dtype=float), np.arange(gh, dtype=float)), axis=0)

    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=float) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return torch.from_numpy(np.concatenate([one(dim // 2, grid[0]), one(dim // 2, grid[1])], axis=1)).float()[None]


def _ours(bb, x):
    with torch.no_grad():
        out = bb.eval().forward_features(x)
    return out


def _all_tokens(out):
    return torch.cat([out["cls"][:, None], out["patch"]], dim=1)


def _x(h, w):
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h * 1000 + w))


# DINO/iBOT tiny: patch 8, stored 8x8 grid (64 px). Sizes: native, smaller, non-square, larger, and non-square
# inputs with the stored number of patches (DINO interpolates them: its identity needs w == h); DINO's patch
# convolution drops the pixels past the last whole patch (70 -> 8 patches).
DINO_SIZES = [(64, 64), (40, 40), (48, 80), (96, 96), (64, 70), (32, 128)]


@pytest.mark.parametrize("hw", DINO_SIZES, ids=[f"{h}x{w}" for h, w in DINO_SIZES])
@pytest.mark.parametrize("layout", ["dino_backbone", "ibot"])
def test_dino_and_ibot_follow_dino_interpolate_pos_encoding(tmp_path, hw, layout):
    model = _model(patch_size=8, img_size=64)
    sd = model.state_dict()
    ckpt = sd if layout == "dino_backbone" else {"state_dict": sd}  # iBOT's extract_backbone_weights.py
    torch.save(ckpt, tmp_path / "c.pth")
    got = load_backbone(tmp_path / "c.pth", num_heads=2)
    assert got.checkpoint_format == layout and got.pos_embed_rule == "dino"
    x = _x(*hw)
    with torch.no_grad():
        ref = dino_like_reference(model, x, model.cls_token, model.pos_embed)
    assert torch.allclose(_all_tokens(_ours(got, x)), ref, atol=1e-5)


DINOV2_SIZES = [(84, 84), (56, 56), (56, 98), (126, 126), (56, 126)]  # patch 14, stored 6x6; 4x9 = 36 patches


@pytest.mark.parametrize("hw", DINOV2_SIZES, ids=[f"{h}x{w}" for h, w in DINOV2_SIZES])
def test_dinov2_hub_follows_dinov2_offset_rule(tmp_path, hw):
    model = _model(patch_size=14, img_size=84, init_values=1e-5)
    torch.save({**model.state_dict(), "mask_token": torch.zeros(1, DIM)}, tmp_path / "c.pth")
    got = load_backbone(tmp_path / "c.pth", num_heads=2)
    assert got.checkpoint_format == "dinov2" and got.pos_embed_rule == "dinov2"
    x = _x(*hw)
    with torch.no_grad():
        ref = dino_like_reference(model, x, model.cls_token, model.pos_embed, offset=0.1, float32=True)
        timm_way = model.forward_features(x)
    assert torch.allclose(_all_tokens(_ours(got, x)), ref, atol=1e-5)
    if hw != (84, 84):  # the difference the rule makes (timm resamples to the exact size, with antialias)
        assert (timm_way - ref).abs().max() > 1e-3


@pytest.mark.parametrize("hw", DINOV2_SIZES, ids=[f"{h}x{w}" for h, w in DINOV2_SIZES])
def test_dinov2_hub_with_registers_follows_antialiased_exact_size_rule(tmp_path, hw):
    model = _model(patch_size=14, img_size=84, init_values=1e-5, reg_tokens=4, no_embed_class=True)
    torch.manual_seed(3)
    # the hub's layout: a class token and a position table with a class row, registers apart
    cls, pos, regs = torch.randn(1, 1, DIM), torch.randn(1, 1 + 36, DIM), torch.randn(1, 4, DIM)
    hub = {k: v for k, v in model.state_dict().items() if k not in ("cls_token", "reg_token", "pos_embed")}
    hub.update(cls_token=cls, pos_embed=pos, register_tokens=regs, mask_token=torch.zeros(1, DIM))
    torch.save(hub, tmp_path / "c.pth")
    got = load_backbone(tmp_path / "c.pth", num_heads=2)
    assert got.pos_embed_rule == "dinov2_reg" and got.num_prefix_tokens == 5
    x = _x(*hw)
    with torch.no_grad():
        ref = dino_like_reference(model, x, cls, pos, offset=0.0, antialias=True, float32=True, registers=regs)
    out = _ours(got, x)
    assert torch.allclose(out["cls"], ref[:, 0], atol=1e-5)
    assert torch.allclose(out["patch"], ref[:, 5:], atol=1e-5)


MSN_SIZES = [(64, 64), (40, 40), (48, 48), (40, 64), (32, 128), (40, 47)]


@pytest.mark.parametrize("hw", MSN_SIZES, ids=[f"{h}x{w}" for h, w in MSN_SIZES])
def test_msn_follows_its_own_interpolation(tmp_path, hw):
    model = _model(patch_size=8, img_size=64)
    target = {"module." + k: v for k, v in model.state_dict().items()}
    head = {"module.fc.fc1.weight": torch.ones(8, DIM), "module.fc.fc1.bias": torch.ones(8),
            "module.fc.bn1.weight": torch.ones(8), "module.fc.bn1.bias": torch.ones(8),
            "module.fc.bn1.running_mean": torch.ones(8), "module.fc.bn1.running_var": torch.ones(8),
            "module.fc.bn1.num_batches_tracked": torch.tensor(3), "module.fc.fc3.weight": torch.ones(4, 8)}
    ckpt = {"encoder": {**target, **head}, "opt": {}, "prototypes": torch.randn(16, 4),
            "target_encoder": {**target, **head}, "epoch": 1, "loss": 0.5, "batch_size": 8, "world_size": 1,
            "lr": 0.001, "temperature": 0.1}
    torch.save(ckpt, tmp_path / "c.pth.tar")
    got = load_backbone(tmp_path / "c.pth.tar", num_heads=2)
    assert got.checkpoint_format == "msn" and got.pos_embed_rule == "msn"
    x = _x(*hw)
    with torch.no_grad():
        ref = msn_reference(model, x)
    assert torch.allclose(_all_tokens(_ours(got, x)), ref, atol=1e-5)


def _ijepa_checkpoint(tmp_path):
    model = _model(patch_size=8, img_size=64, class_token=False)
    with torch.no_grad():
        model.pos_embed.copy_(ijepa_sincos(DIM, 8, 8))  # I-JEPA's fixed table
    target = {"module." + k: v for k, v in model.state_dict().items()}
    ckpt = {"encoder": target, "predictor": {"module.predictor_embed.weight": torch.ones(16, DIM)},
            "target_encoder": target, "opt": {}, "scaler": None, "epoch": 300, "loss": 0.1, "batch_size": 8,
            "world_size": 1, "lr": 0.001}
    torch.save(ckpt, tmp_path / "IN1K-vit.h.14-300e.pth.tar")
    return model, tmp_path / "IN1K-vit.h.14-300e.pth.tar"


@pytest.mark.parametrize("hw", [(64, 64), (40, 40), (40, 64)], ids=["native", "40", "40x64"])
def test_ijepa_global_feature_is_the_mean_of_its_normalised_patch_tokens(tmp_path, hw):
    model, path = _ijepa_checkpoint(tmp_path)
    got = load_backbone(path, num_heads=2)
    assert got.checkpoint_format == "ijepa" and got.pos_embed_rule == "sincos" and got.num_prefix_tokens == 0
    x = _x(*hw)
    gh, gw = hw[0] // 8, hw[1] // 8
    with torch.no_grad():  # I-JEPA's forward: patches + sin-cos (its own table at the native grid), blocks, norm
        ref = _run_blocks(model, _patches(model, x) + ijepa_sincos(DIM, gh, gw))
    out = _ours(got, x)
    assert out["hw"] == (gh, gw)
    assert torch.allclose(out["patch"], ref, atol=1e-5)
    assert torch.allclose(out["cls"], ref.mean(dim=1), atol=1e-5)
    with torch.no_grad():
        layers = got.get_intermediate_layers(x, n=2)
    assert len(layers) == 2 and torch.allclose(layers[-1]["cls"], ref.mean(dim=1), atol=1e-5)


def test_timm_family_still_resamples_to_the_exact_size():
    bb = build_backbone("vit_small_patch16_224", depth=2, embed_dim=DIM, num_heads=2, patch_size=8, img_size=64)
    assert bb.pos_embed_rule == "timm" and "pos_embed_rule" not in bb.arch_kwargs
    model = bb.model.eval()
    x = _x(40, 88)
    with torch.no_grad():
        pos = resample_abs_pos_embed(model.pos_embed, new_size=[5, 11], old_size=[8, 8], num_prefix_tokens=1)
        tokens = torch.cat([model.cls_token.expand(2, -1, -1), _patches(model, x)], dim=1) + pos
        ref = _run_blocks(model, tokens)
        dino_way = dino_like_reference(model, x, model.cls_token, model.pos_embed)
    assert torch.allclose(_all_tokens(_ours(bb, x)), ref, atol=1e-5)
    assert (dino_way - ref).abs().max() > 1e-3


def test_the_rule_survives_our_checkpoint_and_a_rebuild(tmp_path):
    model = _model(patch_size=8, img_size=64)
    torch.save(model.state_dict(), tmp_path / "dino.pth")
    first = load_backbone(tmp_path / "dino.pth", num_heads=2)
    torch.save(backbone_checkpoint(first), tmp_path / "ours.pth")
    again = load_backbone(tmp_path / "ours.pth")
    assert again.checkpoint_format == "bam" and again.arch_kwargs["pos_embed_rule"] == "dino"
    rebuilt = build_backbone(again.arch, **{**again.arch_kwargs, "drop_path_rate": 0.1})  # as fine-tuning does
    rebuilt.model.load_state_dict(again.model.state_dict())
    x = _x(48, 80)
    with torch.no_grad():
        ref = dino_like_reference(model, x, model.cls_token, model.pos_embed)
    for bb in (first, again, rebuilt):
        assert torch.allclose(_all_tokens(_ours(bb, x)), ref, atol=1e-5)


def test_an_explicit_arch_keeps_the_stored_grid(tmp_path):
    model = _model(patch_size=8, img_size=64)
    torch.save(model.state_dict(), tmp_path / "dino.pth")
    # vit_small_patch8_224's own grid is 28x28: resampling there at load would change what DINO computes
    got = load_backbone(tmp_path / "dino.pth", arch="vit_small_patch8_224", embed_dim=DIM, depth=2, num_heads=2)
    assert tuple(got.model.patch_embed.grid_size) == (8, 8)
    x = _x(48, 80)
    with torch.no_grad():
        ref = dino_like_reference(model, x, model.cls_token, model.pos_embed)
    assert torch.allclose(_all_tokens(_ours(got, x)), ref, atol=1e-5)


def test_a_requested_grid_is_resampled_by_the_source_rule(tmp_path):
    model = _model(patch_size=14, img_size=84, init_values=1e-5)
    torch.save({**model.state_dict(), "mask_token": torch.zeros(1, DIM)}, tmp_path / "c.pth")
    got = load_backbone(tmp_path / "c.pth", num_heads=2, img_size=56)
    assert got.model.pos_embed.shape == (1, 1 + 4 * 4, DIM)
    x = _x(56, 56)  # at the new grid, what DINOv2 computes from the stored 6x6 table
    with torch.no_grad():
        ref = dino_like_reference(model, x, model.cls_token, model.pos_embed, offset=0.1, float32=True)
    assert torch.allclose(_all_tokens(_ours(got, x)), ref, atol=1e-5)


def test_intermediate_layers_use_the_same_rule(tmp_path):
    model = _model(patch_size=8, img_size=64)
    torch.save(model.state_dict(), tmp_path / "dino.pth")
    got = load_backbone(tmp_path / "dino.pth", num_heads=2).eval()
    x = _x(40, 72)
    with torch.no_grad():
        layers = got.get_intermediate_layers(x, n=2)
        ref = dino_like_reference(model, x, model.cls_token, model.pos_embed)
    assert len(layers) == 2 and layers[0]["patch"].shape == (2, 5 * 9, DIM)
    assert torch.allclose(layers[-1]["patch"], ref[:, 1:], atol=1e-5)
    assert torch.allclose(layers[-1]["cls"], ref[:, 0], atol=1e-5)


def test_unknown_rule_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown pos_embed_rule 'dino3'; known: timm, dino, dinov2"):
        build_backbone("vit_small_patch16_224", depth=1, pos_embed_rule="dino3")


def test_ijepa_and_msn_are_told_apart_and_selectable(tmp_path):
    _, path = _ijepa_checkpoint(tmp_path)
    assert load_backbone(path, fmt="ijepa", num_heads=2).checkpoint_format == "ijepa"
    with pytest.raises(ValueError, match="no cls_token; MSN's ViT has one .*use --format ijepa"):
        load_backbone(path, fmt="msn", num_heads=2)
