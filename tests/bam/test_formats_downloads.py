"""Checkpoints users download, in the exact key layouts their sources' code saves (issue 12): MoCo v1/v2, DINOv2
training teacher and hub linear classifier, DINOv2's SwiGLU, iBOT's training and extracted files, safetensors.
MSN and I-JEPA (and every format's interpolation at other sizes) are in test_pos_embed.py."""
import argparse

import pytest
import torch
import torchvision

from bam import build_backbone, load_backbone

from ..conftest import TINY_VIT
from .test_formats import X, _assert_same, _one_line_error, _prefixed, _save, _tiny, _torchvision_features


def _resnet50_moco_state(v2):
    """MoCo's ``model.state_dict()`` under DDP: encoder_q with its head, encoder_k, the queue (moco/builder.py)."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet50(num_classes=16)
    q = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    if v2:  # --mlp: fc = Sequential(Linear(2048, 2048), ReLU, Linear(2048, dim))
        q.update({"fc.0.weight": torch.randn(2048, 2048), "fc.0.bias": torch.zeros(2048),
                  "fc.2.weight": torch.randn(16, 2048), "fc.2.bias": torch.zeros(16)})
    else:
        q.update({"fc.weight": torch.randn(16, 2048), "fc.bias": torch.zeros(16)})
    state = {**_prefixed(q, "module.encoder_q."), **_prefixed(q, "module.encoder_k."),
             "module.queue": torch.randn(16, 64), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    return tv, state


@pytest.mark.parametrize("version", ["mocov2", "mocov1"])
def test_moco_v1_v2_resnet50_match_torchvision(tmp_path, version):
    tv, state = _resnet50_moco_state(version == "mocov2")
    path = _save(tmp_path, {"epoch": 200, "arch": "resnet50", "state_dict": state, "optimizer": {}},
                 "checkpoint_0199.pth.tar")
    got = load_backbone(path)
    assert got.checkpoint_format == version and got.arch == "resnet50"
    with torch.no_grad():
        assert torch.allclose(got.eval().forward_features(X)["cls"], _torchvision_features(tv), atol=1e-4)
    other = "mocov1" if version == "mocov2" else "mocov2"
    with pytest.raises(ValueError, match=f"not {other}'s; the file looks like {version}: use --format {version}"):
        load_backbone(path, fmt=other)


def _dinov2_backbone_state(src, chunks=0):
    """DinoVisionTransformer's state dict: ``mask_token``, and ``blocks.C.N`` when ``block_chunks`` > 0 (BlockChunk
    keeps the global block index N; the Identity padding holds no weights)."""
    sd = {**src.model.state_dict(), "mask_token": torch.zeros(1, 32)}
    if chunks:
        depth = len(src.model.blocks)
        per = depth // chunks
        sd = {(f"blocks.{int(k.split('.')[1]) // per}.{k[len('blocks.'):]}" if k.startswith("blocks.") else k): v
              for k, v in sd.items()}
    return sd


@pytest.mark.parametrize("chunks", [0, 2], ids=["not_chunked", "block_chunks_2"])
def test_dinov2_training_teacher_checkpoint(tmp_path, chunks):
    src = _tiny(init_values=1e-5, depth=4)
    backbone = _dinov2_backbone_state(src, chunks)
    if chunks:
        assert "blocks.1.3.mlp.fc1.weight" in backbone and "blocks.0.1.norm1.weight" in backbone
    teacher = {**_prefixed(backbone, "backbone."), "dino_head.mlp.0.weight": torch.ones(16, 32),
               "dino_head.last_layer.weight_g": torch.ones(10, 1), "dino_head.last_layer.weight_v": torch.ones(10, 8),
               "ibot_head.mlp.0.weight": torch.ones(16, 32), "ibot_head.last_layer.weight_g": torch.ones(10, 1)}
    path = _save(tmp_path, {"teacher": teacher}, "teacher_checkpoint.pth")
    got = _assert_same(src, path, "dinov2_teacher", x=X[..., :32], num_heads=2)
    assert got.pos_embed_rule == "dinov2" and len(got.model.blocks) == 4


def test_dinov2_teacher_with_registers_says_which_interpolation_it_assumes(tmp_path, caplog):
    src = _tiny(init_values=1e-5, reg_tokens=4, no_embed_class=True)
    sd = src.model.state_dict()
    hub = {k: v for k, v in sd.items() if k not in ("reg_token", "pos_embed")}
    hub.update(register_tokens=sd["reg_token"], pos_embed=torch.cat([torch.zeros(1, 1, 32), sd["pos_embed"]], 1),
               mask_token=torch.zeros(1, 32))
    path = _save(tmp_path, {"teacher": {**_prefixed(hub, "backbone."), "dino_head.mlp.0.weight": torch.ones(2, 2)}})
    got = _assert_same(src, path, "dinov2_teacher", x=X[..., :32], num_heads=2)
    assert got.pos_embed_rule == "dinov2_reg" and "pos_embed_rule='dinov2'" in caplog.text


def test_dinov2_hub_linear_classifier(tmp_path):
    src = _tiny(init_values=1e-5)
    sd = {**_prefixed(_dinov2_backbone_state(src), "backbone."), "linear_head.weight": torch.ones(1000, 5 * 32),
          "linear_head.bias": torch.zeros(1000)}
    got = _assert_same(src, _save(tmp_path, sd, "dinov2_vits14_linear4.pth"), "dinov2_linear", x=X[..., :32],
                       num_heads=2)
    assert got.pos_embed_rule == "dinov2"


def test_dinov2_swiglu_ffn_loads_as_packed_swiglu(tmp_path):
    torch.manual_seed(0)
    src = build_backbone("vit_small_patch16_224", **{**TINY_VIT, "ffn": "swiglu", "init_values": 1e-5,
                                                     "mlp_ratio": 2.0})
    sd = _dinov2_backbone_state(src)  # DINOv2's SwiGLUFFN names: w12 (both halves) and w3
    sd = {k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3."): v for k, v in sd.items()}
    got = _assert_same(src, _save(tmp_path, sd), "dinov2", x=X[..., :32], num_heads=2)
    assert got.arch_kwargs["ffn"] == "swiglu"


def test_ibot_training_checkpoint_is_ibot_by_its_heads_and_loss(tmp_path):
    src = _tiny(pos_embed_rule="dino")
    sd = src.model.state_dict()
    head = {"mlp.0.weight": torch.ones(16, 32), "mlp.0.bias": torch.ones(16), "mlp.2.weight": torch.ones(8, 16),
            "last_layer.weight_g": torch.ones(10, 1), "last_layer.weight_v": torch.ones(10, 8)}
    # main_ibot.py: the teacher's iBOTHead shares last_layer as last_layer2 (state_dict lists it twice)
    teacher_head = {**head, "last_layer2.weight_g": head["last_layer.weight_g"],
                    "last_layer2.weight_v": head["last_layer.weight_v"]}
    student_head = {**head, "last_layer2.weight_g": torch.ones(12, 1), "last_layer2.weight_v": torch.ones(12, 8)}
    full = {"student": {**_prefixed(sd, "module.backbone."), "module.backbone.masked_embed": torch.zeros(1, 32),
                        **_prefixed(student_head, "module.head.")},
            "teacher": {**_prefixed(sd, "backbone."), **_prefixed(teacher_head, "head.")},
            "optimizer": {}, "epoch": 100, "args": argparse.Namespace(arch="vit_small"),
            "ibot_loss": {"center": torch.zeros(1, 10), "center2": torch.zeros(1, 1, 12)}}
    _assert_same(src, _save(tmp_path, full, "checkpoint.pth"), "ibot", num_heads=2)
    # extract_backbone_weights.py --checkpoint_key teacher (the released "backbone (t)"), with and without head
    _assert_same(src, _save(tmp_path, {"state_dict": sd}, "checkpoint_teacher.pth"), "ibot", num_heads=2)
    with_head = {"state_dict": {**sd, **_prefixed(teacher_head, "head.")}}
    _assert_same(src, _save(tmp_path, with_head, "with_head.pth"), "ibot", num_heads=2)
    with pytest.raises(ValueError, match="iBOT's patch head.*use --format ibot"):
        load_backbone(tmp_path / "checkpoint.pth", fmt="dino", num_heads=2)


def test_safetensors_are_read_by_the_safetensors_library(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    src = _tiny()
    save_file({**src.model.state_dict(), "head.weight": torch.ones(10, 32), "head.bias": torch.ones(10)},
              str(tmp_path / "model.safetensors"))

    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load was called on a safetensors file")

    monkeypatch.setattr(torch, "load", no_torch_load)
    _assert_same(src, tmp_path / "model.safetensors", "timm", num_heads=2)


def test_every_format_is_selectable_by_name(tmp_path):
    from bam.formats import CONVERTERS

    assert {"mocov1", "mocov2", "dinov2_teacher", "dinov2_linear", "msn", "ijepa", "ibot"} <= set(CONVERTERS)
    src = _tiny(init_values=1e-5)
    path = _save(tmp_path, {"teacher": _prefixed(_dinov2_backbone_state(src, 2), "backbone.")})
    assert load_backbone(path, fmt="dinov2_teacher", num_heads=2).checkpoint_format == "dinov2_teacher"


def test_format_dino_on_a_dinov2_training_checkpoint_names_the_right_format(tmp_path):
    src = _tiny(init_values=1e-5, depth=4)
    teacher = {**_prefixed(_dinov2_backbone_state(src, 2), "backbone."), "dino_head.mlp.0.weight": torch.ones(2, 2)}
    path = _save(tmp_path, {"teacher": teacher}, "teacher_checkpoint.pth")
    _one_line_error(path, r"'teacher' holds 1 keys besides backbone\.\*, head\.\*: \['dino_head\.mlp\.0\.weight'\]"
                          r"; the file looks like dinov2_teacher: use --format dinov2_teacher", fmt="dino")

