"""Checkpoint formats: recognise a file by tell-tale keys, convert it to timm names, load it into a Backbone.

Each converter is a pure ``dict -> Converted`` function that strips known prefixes (never substrings) and drops
the exact keys its format carries besides the backbone (heads, decoders, momentum encoders). After conversion the
key set must equal the model's exactly; anything else is an error that lists the difference.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed

from bam.backbones import ARCHS, Backbone, build_backbone
from bam.checkpoint import FORMAT_TAG, FORMAT_VERSION, load_file

logger = logging.getLogger(__name__)
StateDict = dict[str, torch.Tensor]


@dataclass
class Converted:
    state_dict: StateDict  # backbone weights in timm's names
    fmt: str
    arch: str | None = None  # when the file names its arch
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    vit_family: str = "timm"  # "timm" | "mocov3" (12 heads, sin-cos) | "dinov2": picks defaults the weights can't tell


def strip_prefix(sd: dict, prefix: str) -> dict:
    """The entries whose key starts with ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def drop(sd: dict, prefixes: tuple[str, ...] = (), keys: tuple[str, ...] = ()) -> dict:
    return {k: v for k, v in sd.items() if k not in keys and not k.startswith(prefixes)}


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _has_prefix(sd: dict, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in sd)


_CLASSIFIERS = ("head.weight", "head.bias", "fc.weight", "fc.bias", "head.fc.weight", "head.fc.bias")


# ----------------------------------------------------------------------------------------------- converters
def convert_ours(ckpt: dict) -> Converted:
    sd = ckpt.get("teacher_backbone") or ckpt["backbone"]
    return Converted(dict(sd), "bam", ckpt["arch"], dict(ckpt.get("arch_kwargs", {})))


_OFFICIAL_BAM_PREFIXES = ("teacher.module.backbone.", "teacher.backbone.", "student.module.backbone.",
                          "student.backbone.", "module.backbone.", "backbone.")
_OFFICIAL_BAM_ARCHS = {"vit_small": "vit_small_mocov3_patch16_224", "vit_base": "vit_base_mocov3_patch16_224"}


def convert_bam_official(ckpt: dict) -> Converted:
    """DanielShalam/BAM ``main_pretrain.py``: ``{"model": wrapper state dict, "args": Namespace, ...}``."""
    model = ckpt["model"]
    prefix = next((p for p in _OFFICIAL_BAM_PREFIXES if _has_prefix(model, p)), None)
    if prefix is None:
        raise ValueError(f"no backbone weights under any of {list(_OFFICIAL_BAM_PREFIXES)} in 'model'")
    args = ckpt.get("args")
    arch = _OFFICIAL_BAM_ARCHS.get(getattr(args, "arch", None)) if args is not None else None
    kwargs = {"patch_size": int(args.patch_size)} if arch and hasattr(args, "patch_size") else {}
    return Converted(strip_prefix(model, prefix), f"bam_official[{prefix[:-1]}]", arch, kwargs, "mocov3")


def convert_dino(ckpt: dict) -> Converted:
    """DINO training checkpoint: ``{"teacher": {"backbone.*", "head.*"}, "student": ..., "args": ...}``."""
    teacher = ckpt["teacher"]
    teacher = strip_prefix(teacher, "module.") if _has_prefix(teacher, "module.") else teacher
    return Converted(strip_prefix(teacher, "backbone."), "dino")


def convert_plain_vit(ckpt: dict) -> Converted:
    """A ViT state dict already in timm's names (DINO's and iBOT's released backbones)."""
    return Converted(dict(ckpt), "dino_backbone")


def convert_ibot(ckpt: dict) -> Converted:
    """iBOT: a released ``{"state_dict": ...}`` backbone or a training ``{"teacher": ...}``; drop ``masked_embed``."""
    sd = ckpt["state_dict"] if "state_dict" in ckpt else ckpt["teacher"]
    sd = strip_prefix(sd, "module.") if _has_prefix(sd, "module.") else sd
    sd = strip_prefix(sd, "backbone.") if _has_prefix(sd, "backbone.") else drop(sd, prefixes=("head.",))
    return Converted(drop(sd, keys=("masked_embed",)), "ibot")


def convert_mocov3(ckpt: dict) -> Converted:
    """MoCo v3: ``{"state_dict": {"module.base_encoder.*", "module.momentum_encoder.*", "module.predictor.*"}}``."""
    sd = strip_prefix(ckpt["state_dict"], "module.base_encoder.")
    return Converted(drop(sd, prefixes=("head.", "fc.")), "mocov3", vit_family="mocov3")


def convert_mae(ckpt: dict) -> Converted:
    """MAE pretraining: ``{"model": encoder + ``decoder_*`` + ``mask_token``}``."""
    return Converted(drop(ckpt["model"], prefixes=("decoder_",), keys=("mask_token",)), "mae")


def convert_dinov2(ckpt: dict) -> Converted:
    """DINOv2 hub weights: drop ``mask_token``; registers become timm's ``reg_token`` with no position embedding."""
    sd = drop(ckpt, keys=("mask_token",))
    if "register_tokens" in sd:
        # timm's register models add no position embedding to prefix tokens, so fold the cls position into the token.
        sd["reg_token"] = sd.pop("register_tokens")
        sd["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, :1]
        sd["pos_embed"] = sd["pos_embed"][:, 1:]
    return Converted(sd, "dinov2", vit_family="dinov2")


def convert_timm(ckpt: dict) -> Converted:
    return Converted(drop(ckpt, keys=_CLASSIFIERS), "timm")


def convert_torchvision(ckpt: dict) -> Converted:
    return Converted(drop(ckpt, keys=("fc.weight", "fc.bias")), "torchvision")


def convert_swav(ckpt: dict) -> Converted:
    """SwAV ResNet-50: ``module.`` prefix, a projection head and prototypes."""
    sd = strip_prefix(ckpt, "module.") if _has_prefix(ckpt, "module.") else ckpt
    return Converted(drop(sd, prefixes=("projection_head.", "prototypes."), keys=("fc.weight", "fc.bias")), "swav")


CONVERTERS: dict[str, Callable[[dict], Converted]] = {
    "bam": convert_ours, "bam_official": convert_bam_official, "dino": convert_dino, "dino_backbone":
    convert_plain_vit, "ibot": convert_ibot, "mocov3": convert_mocov3, "mae": convert_mae, "dinov2": convert_dinov2,
    "timm": convert_timm, "torchvision": convert_torchvision, "swav": convert_swav,
}


def _unwrap_plain(ckpt: dict) -> dict:
    for key in ("state_dict", "model", "state_dict_ema"):
        if key in ckpt and _is_state_dict(ckpt[key]):
            return ckpt[key]
    return ckpt


def detect_format(ckpt: Any) -> str:
    """Name the format of a loaded checkpoint by its tell-tale keys; raise ValueError when none fits."""
    if not isinstance(ckpt, dict):
        raise ValueError(f"a checkpoint must be a dict, got {type(ckpt).__name__}")
    if ckpt.get("format") == FORMAT_TAG:
        return "bam"
    model = ckpt.get("model")
    if isinstance(model, dict) and any(_has_prefix(model, p) for p in _OFFICIAL_BAM_PREFIXES[:5]):
        return "bam_official"
    for key in ("state_dict", "teacher"):
        if isinstance(ckpt.get(key), dict) and any(k.endswith("masked_embed") for k in ckpt[key]):
            return "ibot"
    if isinstance(ckpt.get("teacher"), dict) and "student" in ckpt:
        return "dino"
    if isinstance(ckpt.get("state_dict"), dict) and _has_prefix(ckpt["state_dict"], "module.base_encoder."):
        return "mocov3"
    if isinstance(model, dict) and (_has_prefix(model, "decoder_") or "mask_token" in model):
        return "mae"
    sd = _unwrap_plain(ckpt)
    if not _is_state_dict(sd):
        raise _unrecognised(ckpt)
    if _has_prefix(sd, "prototypes.") or _has_prefix(sd, "projection_head.") or "module.conv1.weight" in sd:
        return "swav"
    if "register_tokens" in sd or ("mask_token" in sd and "blocks.0.attn.qkv.weight" in sd):
        return "dinov2"
    if "layer1.0.conv1.weight" in sd and "conv1.weight" in sd:
        return "torchvision"
    if "cls_token" in sd and "blocks.0.attn.qkv.weight" in sd and "head.weight" not in sd:
        return "dino_backbone"
    if "patch_embed.proj.weight" in sd or "stem.conv.weight" in sd or "conv1.weight" in sd:
        return "timm"
    raise _unrecognised(ckpt)


def _unrecognised(ckpt: dict) -> ValueError:
    return ValueError(f"unrecognised checkpoint format (known: {', '.join(CONVERTERS)}); "
                      f"top-level keys: {sorted(map(str, ckpt))[:12]}")


def convert(ckpt: dict, fmt: str = "auto") -> Converted:
    """Convert a loaded checkpoint to backbone weights in timm's names."""
    if fmt == "auto":
        fmt = detect_format(ckpt)
    if fmt not in CONVERTERS:
        raise ValueError(f"unknown format {fmt!r}; known: auto, {', '.join(CONVERTERS)}")
    needs_unwrap = fmt in ("dino_backbone", "dinov2", "timm", "torchvision", "swav")
    return CONVERTERS[fmt](_unwrap_plain(ckpt) if needs_unwrap else ckpt)


# ------------------------------------------------------------------------------------------- arch inference
_VIT_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large"}
_RESNETS = {((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34",
            ((3, 4, 6, 3), True): "resnet50", ((3, 4, 23, 3), True): "resnet101"}
_CAFORMERS = {(64, 9): "caformer_s18", (64, 18): "caformer_s36", (96, 18): "caformer_m36", (128, 18): "caformer_b36"}


def _count(sd: dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def infer_vit(sd: StateDict, family: str = "timm") -> tuple[str, dict[str, Any], list[str]]:
    """Name and timm kwargs of the ViT that ``sd`` fits; also the choices the weights could not tell."""
    dim, _, patch, _ = sd["patch_embed.proj.weight"].shape
    reg = sd["reg_token"].shape[1] if "reg_token" in sd else 0
    n_prefix = int("cls_token" in sd) + reg
    n_pos = sd["pos_embed"].shape[1]
    no_embed_class = n_prefix > 0 and math.isqrt(n_pos) ** 2 == n_pos
    grid = math.isqrt(n_pos if no_embed_class else n_pos - n_prefix)
    kw: dict[str, Any] = {
        "embed_dim": dim, "depth": _count(sd, "blocks."), "patch_size": patch, "img_size": grid * patch,
        "mlp_ratio": sd["blocks.0.mlp.fc1.weight"].shape[0] / dim, "qkv_bias": "blocks.0.attn.qkv.bias" in sd,
        "class_token": "cls_token" in sd, "reg_tokens": reg, "no_embed_class": no_embed_class,
        "init_values": 1e-5 if "blocks.0.ls1.gamma" in sd else None,
    }
    size = _VIT_SIZES.get(dim, "small")
    heads_default = 12 if family == "mocov3" else max(dim // 64, 1)
    kw["num_heads"] = heads_default
    guessed = [f"num_heads={heads_default} (the {family} default for embed_dim {dim})"]
    if family == "dinov2":
        name = f"vit_{size}_patch14{'_reg4' if reg else ''}_dinov2"
    elif family == "mocov3":
        name = f"vit_{size}_mocov3_patch16_224"
    else:
        name = f"vit_{size}_patch{patch}_224"
    return (name if name in ARCHS else "vit_small_patch16_224"), kw, guessed


def infer_arch(conv: Converted) -> tuple[str, dict[str, Any], list[str]]:
    """(arch, kwargs, guesses) for converted weights whose file does not name its arch."""
    sd = conv.state_dict
    if "patch_embed.proj.weight" in sd:
        return infer_vit(sd, conv.vit_family)
    if "layer1.0.conv1.weight" in sd:
        depths = tuple(_count(sd, f"layer{i}.") for i in range(1, 5))
        name = _RESNETS.get((depths, "layer1.0.conv3.weight" in sd))
        if name:
            return name, {}, []
        raise ValueError(f"a ResNet with blocks {depths} is none of {sorted(set(_RESNETS.values()))}; pass --arch")
    if "stem.conv.weight" in sd and "stages.2.blocks.0.norm1.weight" in sd:
        key = (sd["stem.conv.weight"].shape[0], _count(sd, "stages.2.blocks."))
        if key in _CAFORMERS:
            return _CAFORMERS[key], {}, []
        return "caformer_m36", {}, ["caformer_m36 (weights match no known CAFormer size)"]
    raise ValueError(f"cannot tell the architecture from the weights of format {conv.fmt}; pass --arch")


# ---------------------------------------------------------------------------------------------------- loading
def fit_state_dict(sd: StateDict, model: torch.nn.Module, fmt: str) -> StateDict:
    """Check ``sd`` against ``model`` key by key; resample the position embedding to the model's grid."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ValueError(f"format {fmt}: weights do not fit the model: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''} ({len(missing)}), unexpected {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)}); check --arch / --format")
    sd = dict(sd)
    if "pos_embed" in sd and sd["pos_embed"].shape != own["pos_embed"].shape:
        n_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        old = math.isqrt(sd["pos_embed"].shape[1] - n_prefix)
        logger.info("resampling position embeddings from %dx%d to %s", old, old, list(model.patch_embed.grid_size))
        sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], list(model.patch_embed.grid_size),
                                                 [old, old], num_prefix_tokens=n_prefix)
    bad = [f"{k}: {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in sd.items() if v.shape != own[k].shape]
    if bad:
        raise ValueError(f"format {fmt}: shapes differ from the model: {bad[:5]}; check --arch")
    return sd


def load_backbone(path: str | os.PathLike, arch: str | None = None, fmt: str = "auto", trust: bool = False,
                  **arch_kwargs: Any) -> Backbone:
    """Build a Backbone from any supported checkpoint file.

    ``arch`` (and ``arch_kwargs``, e.g. ``num_heads``) override what the file says or what its weights imply.
    The detected format is stored on the result as ``backbone.checkpoint_format``.
    """
    ckpt = load_file(path, trust=trust)
    try:
        conv = convert(ckpt, fmt)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    except KeyError as e:
        raise ValueError(f"{path}: not a valid {fmt} checkpoint (no key {e}); try --format auto") from None
    if arch is not None:
        name, kwargs, guessed = arch, {}, []
    elif conv.arch is not None:
        name, kwargs, guessed = conv.arch, dict(conv.arch_kwargs), []
    else:
        name, kwargs, guessed = infer_arch(conv)
    kwargs.update(arch_kwargs)
    guessed = [g for g in guessed if g.split("=")[0] not in arch_kwargs]
    if guessed:
        logger.warning("%s: the weights do not tell %s; using %s", path, ", ".join(g.split("=")[0] for g in guessed),
                       "; ".join(guessed))
    backbone = build_backbone(name, **kwargs)
    backbone.model.load_state_dict(fit_state_dict(conv.state_dict, backbone.model, conv.fmt))
    backbone.checkpoint_format = conv.fmt
    logger.info("loaded %s (format %s) as %s", path, conv.fmt, name)
    return backbone


def backbone_checkpoint(backbone: Backbone, **extra: Any) -> dict[str, Any]:
    """Our format for a bare backbone: a plain dict that loads with ``weights_only=True``."""
    return {"format": FORMAT_TAG, "format_version": FORMAT_VERSION, "arch": backbone.arch,
            "arch_kwargs": dict(backbone.arch_kwargs), "backbone": backbone.model.state_dict(), **extra}
