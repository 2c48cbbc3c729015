"""Which architecture converted weights fit, and the checks that refuse weights with whole blocks missing.

Used by :func:`bam.formats.load_backbone` when a file does not name its arch (and to check it when it does).
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from bam.backbones import ARCHS
from bam.format_converters import Converted, StateDict

# width -> (size, depth, heads) of the ViTs the supported sources release (ViT-g: I-JEPA/timm 1408, DINOv2 1536)
VIT_SIZES = {192: ("tiny", 12, 3), 384: ("small", 12, 6), 768: ("base", 12, 12), 1024: ("large", 24, 16),
             1280: ("huge", 32, 16), 1408: ("giant", 40, 16), 1536: ("giant", 40, 24)}
_RESNETS = {((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34",
            ((3, 4, 6, 3), True): "resnet50", ((3, 4, 23, 3), True): "resnet101"}
_CAFORMERS = {(64, 9): "caformer_s18", (64, 18): "caformer_s36", (96, 18): "caformer_m36", (128, 18): "caformer_b36"}


def _count(sd: dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def spans(indices: Iterable[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"``."""
    out, run = [], []
    for i in sorted(indices):
        if run and i != run[-1] + 1:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(i)
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out)


def vit_grid(sd: StateDict) -> tuple[int, int, bool]:
    """(stored grid side, prefix tokens, whether ``pos_embed`` leaves the prefix tokens out) of ViT weights."""
    n_prefix = int("cls_token" in sd) + (sd["reg_token"].shape[1] if "reg_token" in sd else 0)
    n_pos = sd["pos_embed"].shape[1]
    no_embed_class = n_prefix > 0 and math.isqrt(n_pos) ** 2 == n_pos
    grid = math.isqrt(n_pos if no_embed_class else n_pos - n_prefix)
    return grid, n_prefix, no_embed_class


def infer_vit(sd: StateDict, family: str = "timm", given: dict[str, Any] | None = None
              ) -> tuple[str, dict[str, Any], list[str]]:
    """Name and timm kwargs of the ViT that ``sd`` fits; also the choices the weights could not tell.

    Raises ValueError when blocks are missing: a gap in ``blocks.N``, or fewer blocks than every released ViT of
    that width has (unless ``given`` names the ``depth``)."""
    given = given or {}
    dim, _, patch, _ = sd["patch_embed.proj.weight"].shape
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    depth = len(blocks)
    if blocks != set(range(depth)):
        raise ValueError(f"the weights hold blocks {spans(blocks)}: blocks {spans(set(range(max(blocks))) - blocks)}"
                         f" are missing, the file is incomplete")
    size, std_depth, heads = VIT_SIZES.get(dim, ("small", None, max(dim // 64, 1)))
    if std_depth is not None and depth < std_depth and "depth" not in given:
        raise ValueError(f"the weights hold {depth} blocks (blocks.{spans(blocks)}) of a {dim}-wide ViT, whose "
                         f"released models ({size}) have {std_depth}: the file looks truncated; if the model "
                         f"really has {depth} blocks, pass depth={depth}")
    grid, n_prefix, no_embed_class = vit_grid(sd)
    hidden, gated = sd["blocks.0.mlp.fc1.weight"].shape[0], sd["blocks.0.mlp.fc2.weight"].shape[1]
    mlp_ratio = hidden / dim
    if int(dim * mlp_ratio) != hidden:  # timm sizes the MLP as int(dim * ratio)
        mlp_ratio = (hidden + 0.5) / dim
    kw: dict[str, Any] = {
        "embed_dim": dim, "depth": depth, "patch_size": patch, "img_size": grid * patch, "mlp_ratio": mlp_ratio,
        "qkv_bias": "blocks.0.attn.qkv.bias" in sd, "class_token": "cls_token" in sd,
        "reg_tokens": n_prefix - int("cls_token" in sd), "no_embed_class": no_embed_class,
        "init_values": 1e-5 if "blocks.0.ls1.gamma" in sd else None,
    }
    if hidden == 2 * gated:  # DINOv2's SwiGLU: fc1 holds both halves
        kw["ffn"] = "swiglu"
    heads_default = 12 if family == "mocov3" else heads
    kw["num_heads"] = heads_default
    guessed = [f"num_heads={heads_default} (the {family} default for embed_dim {dim})"]
    reg = kw["reg_tokens"]
    if family == "dinov2":
        name = f"vit_{size}_patch14{'_reg4' if reg else ''}_dinov2"
    elif family == "mocov3":
        name = f"vit_{size}_mocov3_patch16_224"
    else:
        name = f"vit_{size}_patch{patch}_224"
    if name not in ARCHS:  # the kwargs say everything; the name only labels the size
        name = next((a for a in ARCHS if a.startswith(f"vit_{size}_") and "mocov3" not in a), "vit_small_patch16_224")
    return name, kw, guessed


def infer_arch(conv: Converted, given: dict[str, Any] | None = None) -> tuple[str, dict[str, Any], list[str]]:
    """(arch, kwargs, guesses) for converted weights whose file does not name its arch."""
    sd = conv.state_dict
    if "patch_embed.proj.weight" in sd:
        return infer_vit(sd, conv.vit_family, given)
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
    raise ValueError(f"cannot tell the architecture from the weights of format {conv.fmt} (no ViT, ResNet or "
                     f"CAFormer keys; found {sorted(sd)[:4]}{' ...' if len(sd) > 4 else ''}); pass --arch")


def _numbered(keys: Iterable[str]) -> dict[str, set[int]]:
    """Every numbered container in ``keys`` and its indices: ``layer1.2.conv1.weight`` -> ``{"layer1": {2}}``."""
    out: dict[str, set[int]] = defaultdict(set)
    for key in keys:
        parts = key.split(".")
        for i in range(1, len(parts) - 1):
            if parts[i].isdigit():
                out[".".join(parts[:i])].add(int(parts[i]))
    return out


def block_mismatch(file_keys: Iterable[str], model_keys: Iterable[str]) -> str | None:
    """Describe the first numbered container (``blocks``, ``layer3``, ...) whose blocks differ between the file
    and the model, outermost first; None when every shared container holds the same blocks."""
    got, want = _numbered(file_keys), _numbered(model_keys)
    for name in sorted(set(got) & set(want), key=lambda n: (n.count("."), n)):
        if got[name] != want[name]:
            return (f"the file holds {len(got[name])} {name} blocks ({name}.{spans(got[name])}) where the model "
                    f"has {len(want[name])} ({name}.{spans(want[name])})")
    return None
