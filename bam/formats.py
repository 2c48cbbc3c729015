"""Checkpoint formats: recognise a file by tell-tale keys, convert it to timm names, load it into a Backbone.

Each converter (:mod:`bam.format_converters`) is a pure ``dict -> Converted`` function. After conversion the key
set must equal the model's exactly; anything else is an error that lists the difference. Every error from
:func:`load_backbone` is one line naming the file, what was found, and what to do.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed

from bam import format_converters as fc
from bam.arch_inference import block_mismatch, infer_arch, infer_vit, vit_grid
from bam.backbones import Backbone, build_backbone
from bam.checkpoint import FORMAT_TAG, FORMAT_VERSION, load_file
from bam.format_converters import Converted, StateDict, drop, has_prefix, strip_prefix
from bam.pos_embed import pos_prefix_count, resample_stored

logger = logging.getLogger(__name__)

__all__ = ["CONVERTERS", "Converted", "backbone_checkpoint", "convert", "detect_format", "drop", "fit_state_dict",
           "infer_arch", "infer_vit", "load_backbone", "strip_prefix"]

CONVERTERS: dict[str, Callable[[dict], Converted]] = {
    "bam": fc.convert_ours, "bam_official": fc.convert_bam_official, "dino": fc.convert_dino,
    "dino_backbone": fc.convert_plain_vit, "ibot": fc.convert_ibot, "mocov3": fc.convert_mocov3,
    "mocov2": fc.convert_mocov2, "mocov1": fc.convert_mocov1, "mae": fc.convert_mae, "msn": fc.convert_msn,
    "ijepa": fc.convert_ijepa, "dinov2": fc.convert_dinov2, "dinov2_teacher": fc.convert_dinov2_teacher,
    "dinov2_linear": fc.convert_dinov2_linear, "timm": fc.convert_timm, "torchvision": fc.convert_torchvision,
    "swav": fc.convert_swav,
}
_PLAIN = ("dino_backbone", "dinov2", "dinov2_linear", "timm", "torchvision", "swav")  # read a bare state dict


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap_plain(ckpt: dict) -> dict:
    for key in ("state_dict", "model", "state_dict_ema"):
        if key in ckpt and _is_state_dict(ckpt[key]):
            return ckpt[key]
    return ckpt


def _is_dino_vit(sd: dict) -> bool:
    return "cls_token" in sd and "blocks.0.attn.qkv.weight" in sd and "head.weight" not in sd


def _is_dinov2_vit(sd: dict) -> bool:
    return "register_tokens" in sd or ("mask_token" in sd and "blocks.0.attn.qkv.weight" in sd)


def _is_ibot(ckpt: dict) -> bool:
    """iBOT by what its files hold: its loss state (``ibot_loss``), its patch head (``head.last_layer2`` or
    ``head.mlp2``), the student's ``masked_embed``, or extract_backbone_weights.py's ``{"state_dict": ViT}``."""
    if "ibot_loss" in ckpt:
        return True
    heads = fc.IBOT_HEAD_PREFIXES + tuple("module." + p for p in fc.IBOT_HEAD_PREFIXES)
    for key in ("teacher", "student", "state_dict"):
        sd = ckpt.get(key)
        if isinstance(sd, dict) and any(k.endswith("masked_embed") or k.startswith(heads) for k in sd):
            return True
    sd = ckpt.get("state_dict")
    return set(ckpt) == {"state_dict"} and _is_state_dict(sd) and _is_dino_vit(sd) and not _is_dinov2_vit(sd)


def detect_format(ckpt: Any) -> str:
    """Name the format of a loaded checkpoint by its tell-tale keys; raise ValueError when none fits."""
    if not isinstance(ckpt, dict):
        raise ValueError(f"a checkpoint must be a dict, got {type(ckpt).__name__}")
    if ckpt.get("format") == FORMAT_TAG:
        return "bam"
    model = ckpt.get("model")
    if isinstance(model, dict) and any(has_prefix(model, p) for p in fc.OFFICIAL_BAM_PREFIXES[:5]):
        return "bam_official"
    if _is_ibot(ckpt):
        return "ibot"
    teacher = ckpt.get("teacher")
    if isinstance(teacher, dict) and (has_prefix(teacher, "dino_head.") or "backbone.mask_token" in teacher):
        return "dinov2_teacher"
    if isinstance(teacher, dict) and "student" in ckpt:
        return "dino"
    state = ckpt.get("state_dict")
    if isinstance(state, dict) and has_prefix(state, "module.encoder_q."):
        return "mocov2" if "module.encoder_q.fc.0.weight" in state else "mocov1"
    if isinstance(state, dict) and has_prefix(state, "module.base_encoder."):
        return "mocov3"
    target = ckpt.get("target_encoder")
    if isinstance(target, dict):
        return "ijepa" if "predictor" in ckpt or not any(k.endswith("cls_token") for k in target) else "msn"
    if isinstance(model, dict) and (has_prefix(model, "decoder_") or "mask_token" in model):
        return "mae"
    sd = _unwrap_plain(ckpt)
    if not _is_state_dict(sd):
        raise _unrecognised(ckpt)
    if "linear_head.weight" in sd and has_prefix(sd, "backbone."):
        return "dinov2_linear"
    if has_prefix(sd, "prototypes.") or has_prefix(sd, "projection_head.") or "module.conv1.weight" in sd:
        return "swav"
    if _is_dinov2_vit(sd):
        return "dinov2"
    if "layer1.0.conv1.weight" in sd and "conv1.weight" in sd:
        return "torchvision"
    if _is_dino_vit(sd):
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
    if not isinstance(ckpt, dict):
        raise ValueError(f"a {fmt} checkpoint is a dict, this file holds a {type(ckpt).__name__}")
    return CONVERTERS[fmt](_unwrap_plain(ckpt) if fmt in _PLAIN else ckpt)


# ---------------------------------------------------------------------------------------------------- loading
def fit_state_dict(sd: StateDict, model: torch.nn.Module, fmt: str, rule: str = "timm", arch: str | None = None
                   ) -> StateDict:
    """Check ``sd`` against ``model`` key by key; move the position embedding to the model's grid by ``rule``
    (timm's resampling, or the source model's own interpolation, so the model equals the source at its grid)."""
    own = model.state_dict()
    where = f"format {fmt}" + (f", arch {arch}" if arch else "")
    blocks = block_mismatch(sd, own)
    if blocks:
        raise ValueError(f"{where}: {blocks}: a truncated checkpoint or the wrong arch; pass the --arch (and depth) "
                         f"the file was trained with")
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ValueError(f"{where}: weights do not fit the model: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''} ({len(missing)}), unexpected {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)}); check --arch / --format")
    sd = dict(sd)
    if "pos_embed" in sd and sd["pos_embed"].shape != own["pos_embed"].shape:
        n_prefix = pos_prefix_count(model)
        grid = tuple(model.patch_embed.grid_size)
        old = vit_grid(sd)[0]
        logger.info("resampling position embeddings from %dx%d to %s (%s rule)", old, old, list(grid), rule)
        if rule == "timm":
            sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], list(grid), [old, old],
                                                     num_prefix_tokens=n_prefix)
        else:
            sd["pos_embed"] = resample_stored(rule, sd["pos_embed"], n_prefix, grid, model.patch_embed.patch_size[0])
    bad = [f"{k}: {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in sd.items() if v.shape != own[k].shape]
    if bad:
        raise ValueError(f"{where}: shapes differ from the model: {bad[:5]}; check --arch")
    return sd


def _resolve_arch(conv: Converted, arch: str | None, arch_kwargs: dict[str, Any]
                  ) -> tuple[str, dict[str, Any], list[str]]:
    if arch is not None:
        name, kwargs, guessed = arch, {}, []
    elif conv.arch is not None:
        name, kwargs, guessed = conv.arch, dict(conv.arch_kwargs), []
    else:
        name, kwargs, guessed = infer_arch(conv, arch_kwargs)
    kwargs.update(arch_kwargs)
    sd = conv.state_dict
    if "patch_embed.proj.weight" in sd and "pos_embed" in sd and name.startswith("vit"):
        if conv.pos_embed_rule != "timm":
            kwargs.setdefault("pos_embed_rule", conv.pos_embed_rule)
        if kwargs.get("pos_embed_rule", "timm") != "timm" and "img_size" not in kwargs:
            # keep the stored grid: a load-time resample would change what the source computes at other sizes
            kwargs["img_size"] = vit_grid(sd)[0] * sd["patch_embed.proj.weight"].shape[-1]
    return name, kwargs, [g for g in guessed if g.split("=")[0] not in arch_kwargs]


def _load(ckpt: Any, path: str | os.PathLike, arch: str | None, fmt: str, arch_kwargs: dict[str, Any]) -> Backbone:
    conv = convert(ckpt, fmt)
    for note in conv.notes:
        logger.info("%s: %s", path, note)
    name, kwargs, guessed = _resolve_arch(conv, arch, arch_kwargs)
    if guessed:
        logger.warning("%s: the weights do not tell %s; using %s", path, ", ".join(g.split("=")[0] for g in guessed),
                       "; ".join(guessed))
    try:
        backbone = build_backbone(name, **kwargs)
    except TypeError as e:  # timm's "unexpected keyword argument"
        raise ValueError(f"arch {name} cannot be built with {sorted(kwargs)}: {e}") from None
    fitted = fit_state_dict(conv.state_dict, backbone.model, conv.fmt, backbone.pos_embed_rule, name)
    backbone.model.load_state_dict(fitted)
    backbone.checkpoint_format = conv.fmt
    logger.info("loaded %s (format %s) as %s%s", path, conv.fmt, name,
                f" (position embeddings: {backbone.pos_embed_rule} rule)" if backbone.is_vit else "")
    return backbone


def _format_hint(ckpt: Any, fmt: str) -> str:
    """For a failed explicit ``--format``: the format the file looks like."""
    if fmt == "auto":
        return ""
    try:
        found = detect_format(ckpt)
    except ValueError:
        return "; try --format auto"
    return f"; the file looks like {found}: use --format {found} (or auto)" if found != fmt else ""


def load_backbone(path: str | os.PathLike, arch: str | None = None, fmt: str = "auto", trust: bool = False,
                  **arch_kwargs: Any) -> Backbone:
    """Build a Backbone from any supported checkpoint file.

    ``arch`` (and ``arch_kwargs``, e.g. ``num_heads``, ``depth`` or ``pos_embed_rule``) override what the file says
    or what its weights imply. The detected format is stored on the result as ``backbone.checkpoint_format``.
    Every error is a one-line ValueError (FileNotFoundError, UnsafeCheckpointError) naming ``path``.
    """
    ckpt = load_file(path, trust=trust)
    try:
        return _load(ckpt, path, arch, fmt, arch_kwargs)
    except ValueError as e:
        msg = f"{path}: {e}{_format_hint(ckpt, fmt)}"
    except (KeyError, TypeError, AttributeError) as e:  # a layout the converter did not expect
        shown = fmt
        if fmt == "auto":
            try:
                shown = detect_format(ckpt)
            except ValueError:
                pass
        found = f"no key {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        fix = _format_hint(ckpt, fmt) or "; the file may be incomplete, or another format: check --format / --arch"
        msg = f"{path}: not a valid {shown} checkpoint ({found}){fix}"
    raise ValueError(" ".join(msg.splitlines()))


def backbone_checkpoint(backbone: Backbone, **extra: Any) -> dict[str, Any]:
    """Our format for a bare backbone: a plain dict that loads with ``weights_only=True``. ``arch_kwargs`` keep the
    position-embedding rule, so a reloaded third-party backbone computes what it did."""
    return {"format": FORMAT_TAG, "format_version": FORMAT_VERSION, "arch": backbone.arch,
            "arch_kwargs": dict(backbone.arch_kwargs), "backbone": backbone.model.state_dict(), **extra}
