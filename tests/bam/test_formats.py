"""Every checkpoint format, written in its own key layout from a tiny model, loads back to identical features."""
import argparse
import os
import re

import pytest
import torch
import torchvision

from bam import build_backbone, load_backbone
from bam.checkpoint import UnsafeCheckpointError
from bam.formats import backbone_checkpoint, detect_format

from ..conftest import TINY_VIT

X = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))


def _features(bb, x=X):
    with torch.no_grad():
        out = bb.eval().forward_features(x)
    return torch.cat([out["cls"][:, None], out["patch"]], dim=1)


def _save(tmp_path, obj, name="ckpt.pth"):
    torch.save(obj, tmp_path / name)
    return tmp_path / name


def _prefixed(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


def _tiny(**extra):
    torch.manual_seed(1)
    return build_backbone("vit_small_patch16_224", **{**TINY_VIT, **extra})


def _assert_same(src, path, fmt, x=X, **kw):
    got = load_backbone(path, **kw)
    assert got.checkpoint_format.split("[")[0] == fmt
    assert torch.allclose(_features(got, x), _features(src, x), atol=1e-6)
    return got


def test_ours_needs_no_arguments_and_prefers_the_teacher(tmp_path):
    src = _tiny()
    _assert_same(src, _save(tmp_path, backbone_checkpoint(src)), "bam")
    other = _tiny(init_values=None)
    torch.nn.init.normal_(other.model.cls_token)
    ckpt = backbone_checkpoint(other, teacher_backbone=src.model.state_dict())
    _assert_same(src, _save(tmp_path, ckpt), "bam")


def test_official_bam_vit_small_uses_12_heads_from_its_args(tmp_path):
    torch.manual_seed(0)
    src = build_backbone("vit_small_mocov3_patch16_224", depth=2)
    student = build_backbone("vit_small_mocov3_patch16_224", depth=2)
    model = {**_prefixed(student.model.state_dict(), "student.module.backbone."),
             "student.module.proj_head.mlp.0.weight": torch.randn(8, 384),
             **_prefixed(src.model.state_dict(), "teacher.backbone."), "teacher.proj_head.mlp.0.weight": torch.zeros(1)}
    args = argparse.Namespace(arch="vit_small", patch_size=16, reg=0.05, top_k_sink=128)
    path = _save(tmp_path, {"model": model, "args": args, "epoch": 3, "optimizer": {}})
    got = _assert_same(src, path, "bam_official", depth=2)
    assert got.model.blocks[0].attn.num_heads == 12


def test_dino_full_and_backbone_only(tmp_path):
    src = _tiny(pos_embed_rule="dino")  # DINO's own interpolation at X's 4x6 grid (checked in test_pos_embed.py)
    sd = src.model.state_dict()
    full = {"student": {**_prefixed(sd, "module.backbone."), "module.head.last_layer.weight_g": torch.ones(3)},
            "teacher": {**_prefixed(sd, "backbone."), "head.mlp.0.weight": torch.ones(3, 3)},
            "args": argparse.Namespace(arch="vit_small"), "epoch": 100, "dino_loss": {"center": torch.zeros(1, 3)}}
    _assert_same(src, _save(tmp_path, full, "full.pth"), "dino", num_heads=2)
    _assert_same(src, _save(tmp_path, sd, "backbone.pth"), "dino_backbone", num_heads=2)


def test_mocov3(tmp_path):
    src = _tiny()
    sd = src.model.state_dict()
    state = {**_prefixed(sd, "module.base_encoder."), "module.base_encoder.head.0.weight": torch.ones(4, 32),
             **_prefixed(sd, "module.momentum_encoder."), "module.predictor.0.weight": torch.ones(4, 4)}
    path = _save(tmp_path, {"epoch": 300, "arch": "vit_small", "state_dict": state, "optimizer": {}})
    _assert_same(src, path, "mocov3", num_heads=2)


def test_mae(tmp_path):
    src = _tiny()
    model = {**src.model.state_dict(), "mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.ones(16, 32),
             "decoder_pos_embed": torch.zeros(1, 17, 16), "decoder_blocks.0.norm1.weight": torch.ones(16),
             "decoder_norm.weight": torch.ones(16), "decoder_pred.weight": torch.ones(192, 16)}
    path = _save(tmp_path, {"model": model, "args": argparse.Namespace(model="mae_vit_small"), "epoch": 799})
    _assert_same(src, path, "mae", num_heads=2)


def test_ibot_release_and_training_checkpoint(tmp_path):
    src = _tiny(pos_embed_rule="dino")
    sd = src.model.state_dict()
    _assert_same(src, _save(tmp_path, {"state_dict": {**sd, "masked_embed": torch.zeros(32)}}, "a.pth"), "ibot",
                 num_heads=2)
    train = {"teacher": {**_prefixed(sd, "backbone."), "backbone.masked_embed": torch.zeros(32),
                         "head.mlp.0.weight": torch.ones(2, 2)}, "student": {}, "epoch": 1}
    _assert_same(src, _save(tmp_path, train, "b.pth"), "ibot", num_heads=2)


def test_dinov2_plain_and_with_registers(tmp_path):
    # at the native grid: timm's DINOv2 models interpolate position embeddings their own way at other sizes
    x = X[..., :32]
    src = _tiny(init_values=1e-5)
    _assert_same(src, _save(tmp_path, {**src.model.state_dict(), "mask_token": torch.zeros(1, 32)}, "a.pth"),
                 "dinov2", x=x, num_heads=2)

    src = _tiny(init_values=1e-5, reg_tokens=4, no_embed_class=True)
    # DINOv2 adds a position to the class token; timm folds it into the token. Dyadic values keep the fold exact.
    src.model.cls_token.data = torch.randint(-64, 64, (1, 1, 32)) / 64.0
    cls_pos = torch.randint(-64, 64, (1, 1, 32)) / 64.0
    sd = src.model.state_dict()
    hub = {k: v for k, v in sd.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    hub.update(register_tokens=sd["reg_token"], cls_token=sd["cls_token"] - cls_pos,
               pos_embed=torch.cat([cls_pos, sd["pos_embed"]], dim=1), mask_token=torch.zeros(1, 32))
    got = _assert_same(src, _save(tmp_path, hub, "b.pth"), "dinov2", x=x, num_heads=2)
    assert got.num_prefix_tokens == 5


def test_dinov2_position_embeddings_are_resampled_to_the_requested_grid(tmp_path):
    src = _tiny(init_values=1e-5, img_size=37 * 8)  # a 37x37 grid, as DINOv2's 518px / 14
    path = _save(tmp_path, {**src.model.state_dict(), "mask_token": torch.zeros(1, 32)})
    got = load_backbone(path, num_heads=2, img_size=32)
    assert got.model.pos_embed.shape == (1, 1 + 4 * 4, 32)
    assert torch.isfinite(_features(got)).all()


def test_timm_with_classifier(tmp_path):
    src = _tiny()
    path = _save(tmp_path, {**src.model.state_dict(), "head.weight": torch.ones(10, 32), "head.bias": torch.ones(10)})
    _assert_same(src, path, "timm", num_heads=2)


def _torchvision_features(model):
    model.fc = torch.nn.Identity()
    with torch.no_grad():
        return model.eval()(X)


def test_torchvision_resnet_matches_torchvision_itself(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18()
    path = _save(tmp_path, tv.state_dict())
    got = load_backbone(path)
    assert got.checkpoint_format == "torchvision" and got.arch == "resnet18"
    with torch.no_grad():
        ours = got.eval().forward_features(X)["cls"]
    assert torch.allclose(ours, _torchvision_features(tv), atol=1e-5)


def test_swav_resnet(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18()
    sd = {**_prefixed(tv.state_dict(), "module."), "module.projection_head.0.weight": torch.ones(4, 512),
          "module.prototypes.weight": torch.ones(30, 4)}
    got = load_backbone(_save(tmp_path, sd))
    assert got.checkpoint_format == "swav"
    with torch.no_grad():
        assert torch.allclose(got.eval().forward_features(X)["cls"], _torchvision_features(tv), atol=1e-5)


# ------------------------------------------------------------------------------------------------ bad input
def test_unknown_format_names_the_known_ones_and_the_keys_it_saw(tmp_path):
    path = _save(tmp_path, {"weights": {"a": torch.zeros(1)}, "step": 3})
    with pytest.raises(ValueError, match=r"unrecognised checkpoint format \(known: bam, .*\['step', 'weights'\]"):
        load_backbone(path)


def test_wrong_arch_lists_missing_and_unexpected_keys(tmp_path):
    path = _save(tmp_path, backbone_checkpoint(_tiny()))
    with pytest.raises(ValueError, match=r"missing \['bn1.bias'.*unexpected \['blocks.0"):
        load_backbone(path, arch="resnet18")


def test_explicit_format_that_does_not_fit(tmp_path):
    path = _save(tmp_path, _tiny().model.state_dict())
    with pytest.raises(ValueError, match="not a valid mocov3 checkpoint"):
        load_backbone(path, fmt="mocov3")
    with pytest.raises(ValueError, match="unknown format 'moco'"):
        load_backbone(path, fmt="moco")


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="--checkpoint"):
        load_backbone(tmp_path / "nope.pth")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pth"):
        load_backbone(tmp_path / "bad.pth")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path):
    marker = str(tmp_path / "code-ran")
    path = _save(tmp_path, {"model": _tiny().model.state_dict(), "evil": _Payload(marker)})
    with pytest.raises(UnsafeCheckpointError, match="--trust-checkpoint"):
        load_backbone(path)
    assert not os.path.exists(marker)
    # the user can vouch for a file; then (and only then) its pickle runs
    load_backbone(path, trust=True, num_heads=2)
    assert os.path.exists(marker)


def test_detect_format_on_an_unknown_object():
    with pytest.raises(ValueError, match="must be a dict"):
        detect_format([1, 2])


# ------------------------------------------------------------------------------------- one-line loading errors
def _one_line_error(path, match, **kw):
    with pytest.raises(ValueError) as info:
        load_backbone(path, **kw)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg, msg
    assert re.search(match, msg), msg
    return msg


def test_weights_that_do_not_fit_or_differ_in_shape_name_the_file(tmp_path):
    path = _save(tmp_path, backbone_checkpoint(_tiny()))
    _one_line_error(path, r"weights do not fit the model: missing \['bn1.bias'", arch="resnet18")
    _one_line_error(path, r"shapes differ from the model: \['cls_token: \(1, 1, 32\) vs model \(1, 1, 384\)",
                    arch="vit_small_patch8_224", depth=2, num_heads=2)


def test_empty_and_text_files_give_one_line_errors(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    _one_line_error(tmp_path / "empty.pth", r"is empty \(0 bytes\).*fetch or copy it again")
    (tmp_path / "notes.pth").write_text("hello, this is not a checkpoint\n")
    _one_line_error(tmp_path / "notes.pth", r"not a readable PyTorch checkpoint: it holds a text file starting "
                                            r"'hello, this is not a checkpoin'; check the path")


def test_missing_blocks_are_refused_not_built_shallower(tmp_path):
    sd = _tiny().model.state_dict()  # 2 blocks
    path = _save(tmp_path, sd, "two_blocks.pth")
    # a depth-12 arch requested (vit_small_patch8_224's default depth) for a file with 2 blocks
    _one_line_error(path, r"the file holds 2 blocks blocks \(blocks\.0-1\) where the model has 12 \(blocks\.0-11\)"
                          r": a truncated checkpoint or the wrong arch", arch="vit_small_patch8_224", embed_dim=32,
                    num_heads=2)
    # our format names its arch: a file with a block cut out is refused
    ckpt = backbone_checkpoint(_tiny(depth=3))
    ckpt["backbone"] = {k: v for k, v in ckpt["backbone"].items() if not k.startswith("blocks.2.")}
    _one_line_error(_save(tmp_path, ckpt, "cut.pth"), r"format bam, arch vit_small_patch16_224: the file holds 2 "
                                                      r"blocks blocks \(blocks\.0-1\) where the model has 3")
    # a gap in the blocks
    gap = {k: v for k, v in _tiny(depth=3).model.state_dict().items() if not k.startswith("blocks.1.")}
    _one_line_error(_save(tmp_path, gap, "gap.pth"), r"the weights hold blocks 0, 2: blocks 1 are missing",
                    num_heads=2)
    # a ViT-S (width 384) with 6 blocks: every released ViT-S has 12
    torch.manual_seed(0)
    six = build_backbone("vit_small_patch16_224", depth=6, img_size=32).model.state_dict()
    msg = _one_line_error(_save(tmp_path, six, "vits_6.pth"), r"the weights hold 6 blocks \(blocks\.0-5\) of a "
                                                              r"384-wide ViT, whose released models \(small\) have 12")
    assert "pass depth=6" in msg
    assert len(load_backbone(tmp_path / "vits_6.pth", depth=6).model.blocks) == 6
