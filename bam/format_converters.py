"""Third-party checkpoint layouts -> backbone weights in timm's names: one pure ``dict -> Converted`` per source.

Each converter strips its source's prefixes (never substrings), drops exactly what the source saves besides the
backbone (heads, predictors, momentum encoders, queues) and refuses keys it does not know. The layouts are those
the sources' own code writes; each docstring names the file. Converters never build models: arch inference and
the exact key check against the model happen in :mod:`bam.formats`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from bam.backbones import ARCHS
from bam.pos_embed import sincos_pos_embed_2d

StateDict = dict[str, torch.Tensor]


@dataclass
class Converted:
    state_dict: StateDict  # backbone weights in timm's names
    fmt: str
    arch: str | None = None  # when the file names its arch
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    vit_family: str = "timm"  # "timm" | "mocov3" (12 heads, sin-cos) | "dinov2": picks defaults the weights can't tell
    pos_embed_rule: str = "timm"  # how the source model interpolates position embeddings (bam.pos_embed.RULES)
    notes: list[str] = field(default_factory=list)  # what the file cannot tell for sure; logged by load_backbone


def strip_prefix(sd: dict, prefix: str) -> dict:
    """The entries whose key starts with ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def drop(sd: dict, prefixes: tuple[str, ...] = (), keys: tuple[str, ...] = ()) -> dict:
    return {k: v for k, v in sd.items() if k not in keys and not k.startswith(prefixes)}


def has_prefix(sd: dict, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in sd)


def require_only(sd: dict, where: str, prefixes: tuple[str, ...] = (), keys: tuple[str, ...] = ()) -> None:
    """Refuse keys the format does not save (a different format, or a file edited by hand)."""
    other = sorted(drop(sd, prefixes, keys))
    if other:
        known = ", ".join([f"{p}*" for p in prefixes] + list(keys))
        raise ValueError(f"{where} holds {len(other)} keys besides {known}: {other[:4]}"
                         f"{' ...' if len(other) > 4 else ''}")


def _unprefixed(sd: dict, prefix: str) -> dict:
    return strip_prefix(sd, prefix) if sd and all(k.startswith(prefix) for k in sd) else sd


_LAYER_SCALE = re.compile(r"^(blocks\.\d+\.)gamma_([12])$")


def _dino_names(sd: StateDict) -> StateDict:
    """DINO/iBOT's ViT in timm's names: only iBOT's layer scale differs (``gamma_1`` -> ``ls1.gamma``)."""
    return {_LAYER_SCALE.sub(r"\1ls\2.gamma", k): v for k, v in sd.items()}


# ----------------------------------------------------------------------------------------------- ours, BAM
def convert_ours(ckpt: dict) -> Converted:
    sd = ckpt.get("teacher_backbone") or ckpt["backbone"]
    kwargs = dict(ckpt.get("arch_kwargs", {}))
    return Converted(dict(sd), "bam", ckpt["arch"], kwargs, pos_embed_rule=kwargs.get("pos_embed_rule", "timm"))


OFFICIAL_BAM_PREFIXES = ("teacher.module.backbone.", "teacher.backbone.", "student.module.backbone.",
                         "student.backbone.", "module.backbone.", "backbone.")
_OFFICIAL_BAM_ARCHS = {"vit_small": "vit_small_mocov3_patch16_224", "vit_base": "vit_base_mocov3_patch16_224"}


def convert_bam_official(ckpt: dict) -> Converted:
    """DanielShalam/BAM ``main_pretrain.py``: ``{"model": wrapper state dict, "args": Namespace, ...}``."""
    model = ckpt["model"]
    prefix = next((p for p in OFFICIAL_BAM_PREFIXES if has_prefix(model, p)), None)
    if prefix is None:
        raise ValueError(f"no backbone weights under any of {list(OFFICIAL_BAM_PREFIXES)} in 'model'")
    args = ckpt.get("args")
    arch = _OFFICIAL_BAM_ARCHS.get(getattr(args, "arch", None)) if args is not None else None
    kwargs = {"patch_size": int(args.patch_size)} if arch and hasattr(args, "patch_size") else {}
    return Converted(strip_prefix(model, prefix), f"bam_official[{prefix[:-1]}]", arch, kwargs, "mocov3")


# ----------------------------------------------------------------------------------------------- DINO, iBOT
def convert_dino(ckpt: dict) -> Converted:
    """DINO ``main_dino.py``: ``{"student", "teacher": {"backbone.*", "head.*"}, "optimizer", "epoch", "args",
    "dino_loss"}`` (the teacher has ``module.`` only when it holds batch norms)."""
    teacher = _unprefixed(ckpt["teacher"], "module.")
    require_only(teacher, "'teacher'", ("backbone.", "head."))
    if has_prefix(teacher, "head.last_layer2.") or has_prefix(teacher, "head.mlp2."):
        raise ValueError("'teacher' has iBOT's patch head (head.last_layer2 / head.mlp2)")
    return Converted(_dino_names(strip_prefix(teacher, "backbone.")), "dino", pos_embed_rule="dino")


def convert_plain_vit(ckpt: dict) -> Converted:
    """A ViT state dict already in timm's names, as DINO releases its backbones (``dino_deitsmall16_pretrain.pth``)."""
    return Converted(_dino_names(dict(ckpt)), "dino_backbone", pos_embed_rule="dino", notes=[
        "a plain ViT state dict: DINO's released-backbone layout (iBOT's evaluation/classification_layer_decay "
        "extractor writes the same; DINO and iBOT share the network and the position-embedding rule)"])


IBOT_HEAD_PREFIXES = ("head.last_layer2.", "head.mlp2.")


def convert_ibot(ckpt: dict) -> Converted:
    """iBOT. ``main_ibot.py`` saves ``{"student", "teacher": {"backbone.*", "head.*"}, "optimizer", "epoch",
    "args", "ibot_loss"}``; the iBOTHead always holds ``head.last_layer2`` (or ``head.mlp2``), even shared.
    ``extract_backbone_weights.py`` writes ``{"state_dict": backbone}`` (the student's keeps ``masked_embed``;
    ``--with_head`` keeps the head keys as they were)."""
    notes = []
    if "state_dict" in ckpt:
        whole = _unprefixed(ckpt["state_dict"], "module.")
        sd = _unprefixed(drop(whole, prefixes=("head.", "module.head.")), "backbone.")
        if sd.keys() == whole.keys() and "masked_embed" not in sd:
            notes.append("recognised as iBOT by extract_backbone_weights.py's {'state_dict': ...} wrapper alone (no "
                         "masked_embed, no iBOT head): the weights are a DINO-layout ViT and load the same either way")
    else:
        teacher = _unprefixed(ckpt["teacher"], "module.")
        require_only(teacher, "'teacher'", ("backbone.", "head."))
        sd = strip_prefix(teacher, "backbone.")
    return Converted(_dino_names(drop(sd, keys=("masked_embed",))), "ibot", pos_embed_rule="dino", notes=notes)


# ------------------------------------------------------------------------------------------------------ MoCo
def convert_mocov3(ckpt: dict) -> Converted:
    """MoCo v3: ``{"state_dict": {"module.base_encoder.*", "module.momentum_encoder.*", "module.predictor.*"}}``."""
    sd = strip_prefix(ckpt["state_dict"], "module.base_encoder.")
    return Converted(drop(sd, prefixes=("head.", "fc.")), "mocov3", vit_family="mocov3")


_MOCO_HEADS = {"mocov2": ("fc.0.weight", "fc.0.bias", "fc.2.weight", "fc.2.bias"), "mocov1": ("fc.weight", "fc.bias")}


def _convert_moco(ckpt: dict, version: str) -> Converted:
    """MoCo v1/v2 ``main_moco.py``: ``{"epoch", "arch", "state_dict": {"module.encoder_q.*", "module.encoder_k.*",
    "module.queue", "module.queue_ptr"}, "optimizer"}``; v2's ``--mlp`` head is ``encoder_q.fc.0`` / ``fc.2``,
    v1's ``fc`` one layer."""
    sd = ckpt["state_dict"]
    require_only(sd, "'state_dict'", ("module.encoder_q.", "module.encoder_k."), ("module.queue", "module.queue_ptr"))
    query = strip_prefix(sd, "module.encoder_q.")
    found = next((v for v, keys in _MOCO_HEADS.items() if all(k in query for k in keys)), None)
    if found != version:
        raise ValueError(f"encoder_q's head is {'none of fc / fc.0+fc.2' if found is None else found + ' style'}, "
                         f"not {version}'s")
    arch = ckpt.get("arch") if ckpt.get("arch") in ARCHS else None
    return Converted(drop(query, keys=_MOCO_HEADS[version]), version, arch)


def convert_mocov2(ckpt: dict) -> Converted:
    return _convert_moco(ckpt, "mocov2")


def convert_mocov1(ckpt: dict) -> Converted:
    return _convert_moco(ckpt, "mocov1")


# ------------------------------------------------------------------------------------------------ MAE, MSN, I-JEPA
def convert_mae(ckpt: dict) -> Converted:
    """MAE pretraining: ``{"model": encoder + ``decoder_*`` + ``mask_token``}``."""
    return Converted(drop(ckpt["model"], prefixes=("decoder_",), keys=("mask_token",)), "mae")


def convert_msn(ckpt: dict) -> Converted:
    """MSN ``src/msn_train.py``: ``{"encoder", "opt", "prototypes", "target_encoder", "epoch", ...}``; the target
    encoder is a DDP state dict (``module.``) of ``src/deit.py``'s ViT plus its ``fc`` projection head
    (``fc.fc1``, ``fc.bn1``, ``fc.fc2``, ``fc.bn2``, ``fc.fc3``), dropped here."""
    sd = _unprefixed(ckpt["target_encoder"], "module.")
    if "cls_token" not in sd:
        raise ValueError("'target_encoder' has no cls_token; MSN's ViT has one (I-JEPA's has none)")
    return Converted(drop(sd, prefixes=("fc.",)), "msn", pos_embed_rule="msn")


def convert_ijepa(ckpt: dict) -> Converted:
    """I-JEPA ``src/train.py``: ``{"encoder", "predictor", "target_encoder", "opt", "scaler", "epoch", ...}``; the
    target encoder (``module.``) is a ViT with no [CLS] token and a fixed sin-cos ``pos_embed``. Its global feature
    is the mean of the normalised patch tokens (I-JEPA's linear probes average-pool the last layer)."""
    sd = _unprefixed(ckpt["target_encoder"], "module.")
    if "cls_token" in sd:
        raise ValueError("'target_encoder' has a cls_token; I-JEPA's ViT has none")
    conv = Converted(dict(sd), "ijepa", pos_embed_rule="sincos")
    pos = sd.get("pos_embed")
    side = int(round(pos.shape[1] ** 0.5)) if pos is not None else 0
    if pos is not None and side * side == pos.shape[1] and not torch.allclose(
            pos.float(), sincos_pos_embed_2d((side, side), pos.shape[2], n_prefix=0), atol=1e-5):
        conv.pos_embed_rule = "timm"
        conv.notes.append("pos_embed is not I-JEPA's fixed sin-cos table (fine-tuned?): other input sizes resample "
                          "it with timm's rule instead of recomputing sin-cos")
    return conv


# ---------------------------------------------------------------------------------------------------- DINOv2
_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+\.)")
_SWIGLU = re.compile(r"^(blocks\.\d+\.mlp\.)(w12|w3)\.")


def _dinov2_backbone(sd: StateDict, fmt: str) -> Converted:
    """A DINOv2 ``DinoVisionTransformer`` state dict in timm's names: chunked blocks ``blocks.C.N`` (FSDP's
    BlockChunk; N is the global index) unchunked, SwiGLU's ``w12``/``w3`` as ``fc1``/``fc2``, ``mask_token``
    dropped; registers become timm's ``reg_token``, which gets no position, so the class position is folded into
    the class token (DINOv2 adds both to the class token on every forward: the sum is the same)."""
    sd = {_SWIGLU.sub(lambda m: m[1] + ("fc1." if m[2] == "w12" else "fc2."), _CHUNKED.sub(r"blocks.\1", k)): v
          for k, v in sd.items()}
    sd = drop(sd, keys=("mask_token",))
    rule = "dinov2"
    if "register_tokens" in sd:
        sd["reg_token"] = sd.pop("register_tokens")
        sd["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, :1]
        sd["pos_embed"] = sd["pos_embed"][:, 1:]
        rule = "dinov2_reg"
    return Converted(sd, fmt, vit_family="dinov2", pos_embed_rule=rule)


def convert_dinov2(ckpt: dict) -> Converted:
    """DINOv2 hub weights (``dinov2_vits14_pretrain.pth``, ``*_reg4_pretrain.pth``): the backbone's state dict.
    The hub builds models with registers with ``interpolate_antialias=True, interpolate_offset=0.0``."""
    return _dinov2_backbone(dict(ckpt), "dinov2")


def convert_dinov2_teacher(ckpt: dict) -> Converted:
    """DINOv2 ``train.py`` ``do_test``: ``teacher_checkpoint.pth`` = ``{"teacher": {"backbone.*", "dino_head.*",
    ["ibot_head.*"]}}``, blocks chunked as ``backbone.blocks.C.N`` when ``block_chunks > 0``."""
    teacher = ckpt["teacher"]
    require_only(teacher, "'teacher'", ("backbone.", "dino_head.", "ibot_head."))
    conv = _dinov2_backbone(strip_prefix(teacher, "backbone."), "dinov2_teacher")
    if conv.pos_embed_rule == "dinov2_reg":
        conv.notes.append("a training checkpoint does not record interpolate_offset/antialias: with registers, "
                          "the values of DINOv2's reg4 configs (offset 0.0, antialias) are used; pass "
                          "pos_embed_rule='dinov2' for the training defaults (offset 0.1, no antialias)")
    return conv


def convert_dinov2_linear(ckpt: dict) -> Converted:
    """DINOv2 hub linear classifier (``dinov2_vits14_lc``) saved whole: ``{"backbone.*", "linear_head.weight",
    "linear_head.bias"}``; the linear head is dropped."""
    require_only(ckpt, "the file", ("backbone.",), ("linear_head.weight", "linear_head.bias"))
    return _dinov2_backbone(strip_prefix(ckpt, "backbone."), "dinov2_linear")


# ------------------------------------------------------------------------------------------- plain state dicts
CLASSIFIERS = ("head.weight", "head.bias", "fc.weight", "fc.bias", "head.fc.weight", "head.fc.bias")


def convert_timm(ckpt: dict) -> Converted:
    return Converted(drop(ckpt, keys=CLASSIFIERS), "timm")


def convert_torchvision(ckpt: dict) -> Converted:
    return Converted(drop(ckpt, keys=("fc.weight", "fc.bias")), "torchvision")


def convert_swav(ckpt: dict) -> Converted:
    """SwAV ResNet-50: ``module.`` prefix, a projection head and prototypes."""
    sd = _unprefixed(ckpt, "module.")
    return Converted(drop(sd, prefixes=("projection_head.", "prototypes."), keys=("fc.weight", "fc.bias")), "swav")
