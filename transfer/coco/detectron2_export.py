"""Our backbones in detectron2's weight format, and detectron2's own trainer on them.

The file detectron2 reads is a pickle of ``{"model": {name: numpy array}, "__author__": ..., "matching_heuristics":
True}``; with matching heuristics detectron2 aligns the names as suffixes of its model's names (its own
``convert-torchvision-to-d2.py`` relies on the same). ResNet names: keys outside a ``layerN`` get ``stem.``,
``layerN`` -> ``res{N+1}``, ``bnK`` -> ``convK.norm``, ``downsample.0/1`` -> ``shortcut`` / ``shortcut.norm``.
ViT names are those of detectron2's ``ViT`` (ViTDet), which keeps timm's block names; it has no [CLS] token and no
final norm, and keeps the [CLS] slot of the position embedding (``pretrain_use_cls_token=True``).
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import torch

from bam.backbones import Backbone

AUTHOR = "bam-ssl"
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "detectron2"
_LAYER = re.compile(r"^layer(\d)\.")
_BN = re.compile(r"\.bn(\d)\.")
_VIT_DROPPED = ("cls_token", "norm.weight", "norm.bias")


def resnet_to_detectron2(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision / timm ResNet names -> detectron2's; ``fc.*`` and ``num_batches_tracked`` are dropped."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        name = key
        m = _LAYER.match(name)
        name = f"res{int(m.group(1)) + 1}.{name[m.end():]}" if m else f"stem.{name}"
        name = name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        name = _BN.sub(lambda b: f".conv{b.group(1)}.norm.", "." + name)[1:]
        out[name] = value
    return out


def detectron2_to_resnet(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`resnet_to_detectron2` (for round-trip checks and reading detectron2 backbones)."""
    out = {}
    for key, value in state_dict.items():
        name = re.sub(r"\.conv(\d)\.norm\.", lambda c: f".bn{c.group(1)}.", "." + key)[1:]
        name = name.replace("shortcut.norm", "downsample.1").replace("shortcut", "downsample.0")
        m = re.match(r"^res(\d)\.", name)
        name = f"layer{int(m.group(1)) - 1}.{name[m.end():]}" if m else name[len("stem."):]
        out[name] = value
    return out


def vit_to_detectron2(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ViT names -> detectron2 ViTDet's (the same names, without [CLS] token and final norm)."""
    return {k: v for k, v in state_dict.items() if k not in _VIT_DROPPED}


def to_detectron2(backbone: Backbone) -> dict[str, torch.Tensor]:
    state = backbone.model.state_dict()
    if backbone.is_vit:
        if any(".ls1." in k or k == "reg_token" for k in state):
            raise ValueError(f"{backbone.arch}: detectron2's ViT has no layer scale or register tokens; use a plain "
                             f"ViT (vit_small/base_patch16_224, the MoCo-v3 ViTs) or a ResNet")
        return vit_to_detectron2(state)
    if not any(k.startswith("layer4.") for k in state):
        raise ValueError(f"{backbone.arch}: the detectron2 engine takes plain ViTs and ResNets")
    return resnet_to_detectron2(state)


def write_detectron2_weights(backbone: Backbone, path: Path) -> Path:
    """Write the pickle detectron2's ``DetectionCheckpointer`` loads (atomically)."""
    blob = {"model": {k: v.detach().cpu().numpy() for k, v in to_detectron2(backbone).items()},
            "__author__": AUTHOR, "matching_heuristics": True}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        pickle.dump(blob, f)
    tmp.replace(path)
    return path


# what a pickle of numpy arrays needs, and nothing that can run code
_NUMPY_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                  ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                  ("numpy._core.multiarray", "scalar")}


class _NumpyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: a detectron2 weights file holds numpy arrays")
        return super().find_class(module, name)


def read_detectron2_weights(path: Path) -> dict[str, np.ndarray]:
    """Our export read back by an unpickler that resolves numpy's array constructors only: a crafted file in the
    output folder cannot run code here."""
    with open(path, "rb") as f:
        try:
            return _NumpyUnpickler(f).load()["model"]
        except (pickle.UnpicklingError, KeyError, EOFError) as e:
            raise ValueError(f"{path} is not a detectron2 weights file this project wrote ({e})") from None
