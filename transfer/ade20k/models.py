"""Our backbones inside mmsegmentation: weight converters to mmseg's module names, and the UperNet segmentor.

A plain timm ViT becomes mmseg's ``VisionTransformer`` and a timm ResNet mmseg's ``ResNet``, each checked key by key
and shape by shape against the real mmseg module. Importing this module imports mmseg (after installing the
``mmcv.ops`` stand-ins mmcv-lite needs, see ``transfer.ade20k.mmseg_compat``) and registers ``BamIoUMetric``.
"""
from __future__ import annotations

import logging
import re
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from bam.backbones import Backbone
from transfer.ade20k.mmseg_compat import ensure_mmcv_ops

ensure_mmcv_ops()
with warnings.catch_warnings():  # mmcv-lite warns once that it has no deformable attention; UperNet needs none
    warnings.filterwarnings("ignore", message=".*MultiScaleDeformableAttention.*")
    from mmengine.config import ConfigDict
    from mmengine.logging import MMLogger
    from mmengine.registry import DefaultScope
    from mmseg.datasets import ADE20KDataset
    from mmseg.evaluation import IoUMetric
    from mmseg.models.backbones import ResNet, VisionTransformer
    from mmseg.registry import METRICS, MODELS
    from mmseg.utils import register_all_modules

register_all_modules(init_default_scope=False)
logger = logging.getLogger(__name__)

# timm ViT name -> mmseg VisionTransformer name ({i}: block, {p}: weight | bias); read in both directions
VIT_KEYS = (
    ("cls_token", "cls_token"),
    ("pos_embed", "pos_embed"),
    ("patch_embed.proj.{p}", "patch_embed.projection.{p}"),
    ("blocks.{i}.norm1.{p}", "layers.{i}.ln1.{p}"),
    ("blocks.{i}.attn.qkv.weight", "layers.{i}.attn.attn.in_proj_weight"),  # both [3D, D], rows q | k | v
    ("blocks.{i}.attn.qkv.bias", "layers.{i}.attn.attn.in_proj_bias"),
    ("blocks.{i}.attn.proj.{p}", "layers.{i}.attn.attn.out_proj.{p}"),
    ("blocks.{i}.norm2.{p}", "layers.{i}.ln2.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", "layers.{i}.ffn.layers.0.0.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "layers.{i}.ffn.layers.1.{p}"),
    ("norm.{p}", "ln1.{p}"),  # the final norm, kept by final_norm=True
)
RESNET_DEPTHS = {("BasicBlock", (2, 2, 2, 2)): 18, ("BasicBlock", (3, 4, 6, 3)): 34,
                 ("Bottleneck", (3, 4, 6, 3)): 50, ("Bottleneck", (3, 4, 23, 3)): 101,
                 ("Bottleneck", (3, 8, 36, 3)): 152}
ADE20K_CLASSES: tuple[str, ...] = ADE20KDataset.METAINFO["classes"]
SUPPORTED = ("plain ViTs (vit_tiny/small/base/large_patch16_224, vit_small/base_patch8_224, the MoCo-v3 ViTs) "
             "and ResNets (resnet18/34/50/101)")


def _pattern(template: str) -> re.Pattern:
    body = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(body)


_TO_MMSEG = [(_pattern(src), dst) for src, dst in VIT_KEYS]
_FROM_MMSEG = [(_pattern(dst), src) for src, dst in VIT_KEYS]


def _rename(state: dict[str, torch.Tensor], rules: list[tuple[re.Pattern, str]]) -> dict[str, torch.Tensor]:
    out, unknown = {}, []
    for key, value in state.items():
        for pattern, template in rules:
            if m := pattern.fullmatch(key):
                out[template.format(**m.groupdict())] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(", ".join(unknown))
    return out


def vit_to_mmseg(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ViT state dict -> mmseg ``VisionTransformer`` state dict (same tensors); KeyError lists unknown keys."""
    return _rename(state, _TO_MMSEG)


def vit_from_mmseg(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``vit_to_mmseg``."""
    return _rename(state, _FROM_MMSEG)


def resnet_to_mmseg(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ResNet -> mmseg ``ResNet``: the names already agree (torchvision's layout: conv1, bn1, layerN.i.convK,
    bnK, downsample.0/1); only the classifier, absent from our backbones, would not carry over."""
    if unknown := [k for k in state if k.startswith("fc.")]:
        raise KeyError(", ".join(unknown))
    return dict(state)


def quarter_indices(depth: int) -> tuple[int, ...]:
    """The last block of each quarter of a ViT: (2, 5, 8, 11) at depth 12, as mmseg's ViT UperNet configs."""
    return tuple(depth * q // 4 - 1 for q in (1, 2, 3, 4))


def _unsupported(backbone: Backbone, why: str) -> ValueError:
    return ValueError(f"arch {backbone.arch} cannot run in mmsegmentation ({why}); --task ade20k supports {SUPPORTED}")


def backbone_config(backbone: Backbone, img_size: tuple[int, int]) -> dict[str, Any]:
    """mmseg backbone settings that hold exactly ``backbone``'s weights; ValueError (one line) for any other arch."""
    model = backbone.model
    if backbone.is_vit:
        try:
            vit_to_mmseg(model.state_dict())
        except KeyError as e:  # layer scale (ls1/ls2.gamma), registers (reg_token), ...: one entry per kind
            kinds = dict.fromkeys(re.sub(r"\.\d+\.", ".*.", k) for k in e.args[0].split(", "))
            raise _unsupported(backbone, f"mmseg's VisionTransformer has no place for {', '.join(kinds)}") from None
        block = model.blocks[0]
        hidden = block.mlp.fc1.out_features
        if (backbone.num_prefix_tokens != 1 or getattr(model, "no_embed_class", False) or block.attn.qkv.bias is None
                or not isinstance(block.mlp.act, nn.GELU) or model.norm.eps != 1e-6 or hidden % backbone.embed_dim):
            # torch's MultiheadAttention drops the output projection's bias together with the qkv bias
            raise _unsupported(backbone, "only a [CLS] token, a qkv bias, GELU, LayerNorm eps 1e-6 and an integer "
                                         "MLP ratio fit")
        if len(model.blocks) < 4:
            raise _unsupported(backbone, f"UperNet takes 4 levels from 4 different blocks; it has {len(model.blocks)}")
        return dict(type="VisionTransformer", img_size=img_size, patch_size=backbone.patch_size, in_channels=3,
                    embed_dims=backbone.embed_dim, num_layers=len(model.blocks), num_heads=block.attn.num_heads,
                    mlp_ratio=hidden // backbone.embed_dim, out_indices=quarter_indices(len(model.blocks)),
                    qkv_bias=True, with_cls_token=True, final_norm=True, patch_bias=True,
                    norm_cfg=dict(type="LN", eps=1e-6), act_cfg=dict(type="GELU"))
    stages = [getattr(model, f"layer{i}", None) for i in range(1, 5)]
    key = (type(stages[0][0]).__name__, tuple(len(s) for s in stages)) if all(stages) else None
    if key not in RESNET_DEPTHS or not isinstance(model.conv1, nn.Conv2d):
        raise _unsupported(backbone, "neither a plain ViT nor a ResNet with torchvision's layout")
    return dict(type="ResNet", depth=RESNET_DEPTHS[key], in_channels=3)


def check_supported(backbone: Backbone) -> None:
    """One-line ValueError naming the arch and what works, for a backbone mmseg's modules cannot hold."""
    backbone_config(backbone, (224, 224))


def level_channels(backbone: Backbone) -> list[int]:
    """Channels of the 4 feature levels (strides 4, 8, 16, 32) the backbone gives the neck / head."""
    if backbone.is_vit:
        return [backbone.embed_dim] * 4
    return [info["num_chs"] for info in backbone.model.feature_info[1:5]]


def segmentor_config(model_cfg: dict, backbone: Backbone, num_classes: int, crop_size: tuple[int, int]
                     ) -> ConfigDict:
    """A recipe's ``model`` dict completed for ``backbone``: architecture, widths, classes, crop size."""
    cfg = ConfigDict(model_cfg)
    cfg.backbone = ConfigDict({**backbone_config(backbone, crop_size), **(cfg.get("backbone") or {})})
    channels = level_channels(backbone)
    if backbone.is_vit:
        if not cfg.get("neck"):
            raise ValueError("a ViT needs the config's model.neck (MultiLevelNeck) to make 4 strides of one map")
        cfg.neck.in_channels = channels
        cfg.neck.out_channels = cfg.neck.get("out_channels") or backbone.embed_dim
        if cfg.neck.get("scales") is None:  # the patch grid (stride = patch size) to strides 4, 8, 16, 32
            cfg.neck.scales = [backbone.patch_size / stride for stride in (4, 8, 16, 32)]
        channels = [cfg.neck.out_channels] * 4
    else:
        cfg.neck = None
    cfg.decode_head.in_channels = [channels[i] for i in cfg.decode_head.in_index]
    cfg.decode_head.num_classes = num_classes
    if cfg.get("auxiliary_head"):
        cfg.auxiliary_head.in_channels = channels[cfg.auxiliary_head.in_index]
        cfg.auxiliary_head.num_classes = num_classes
    cfg.data_preprocessor.size = tuple(crop_size)
    return cfg


def converted_backbone_state(backbone: Backbone, target: nn.Module) -> dict[str, torch.Tensor]:
    """``backbone``'s weights under ``target``'s (an mmseg ViT or ResNet) names, ViT position embeddings resized
    to ``target``'s grid as mmseg's ``init_weights`` does (bicubic); asserts the exact key set and every shape."""
    state = backbone.model.state_dict()
    if isinstance(target, VisionTransformer):
        state = vit_to_mmseg(state)
        grid = tuple(s // target.patch_size for s in target.img_size)
        old = backbone.model.patch_embed.grid_size
        if tuple(old) != grid:
            state["pos_embed"] = VisionTransformer.resize_pos_embed(state["pos_embed"], grid, tuple(old),
                                                                    target.interpolate_mode)
    elif isinstance(target, ResNet):
        state = resnet_to_mmseg(state)
    else:
        raise TypeError(f"no converter for {type(target).__name__}")
    expected = target.state_dict()
    where = f"{backbone.arch} -> mmseg {type(target).__name__}"
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where}: missing {missing}, unexpected {unexpected}")
    bad = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state.items()
           if v.shape != expected[k].shape]
    if bad:
        raise ValueError(f"{where}: shape mismatch {', '.join(bad)}")
    return state


def build_segmentor(model_cfg: ConfigDict, backbone: Backbone) -> nn.Module:
    """mmseg's segmentor from ``model_cfg`` (see ``segmentor_config``): heads initialised by mmseg, then our
    converted backbone weights loaded strictly. ``init_weights`` is marked done, so mmengine's Runner keeps them."""
    with DefaultScope.overwrite_default_scope("mmseg"):  # mmseg builds its parts through mmengine's root registry
        model = MODELS.build(model_cfg)
    mm_logger = MMLogger.get_current_instance()
    level = mm_logger.level
    mm_logger.setLevel(logging.WARNING)  # else mmengine logs every parameter's initialisation, backbone's included
    try:
        model.init_weights()
    finally:
        mm_logger.setLevel(level)
    result = model.backbone.load_state_dict(converted_backbone_state(backbone, model.backbone), strict=True)
    assert not result.missing_keys and not result.unexpected_keys, result
    return model


@METRICS.register_module()
class BamIoUMetric(IoUMetric):
    """mmseg's ``IoUMetric`` (aAcc, mIoU, mAcc in percent, 0-100) that also keeps its last evaluation: the summary
    in ``self.summary`` and the per-class IoU / Acc in ``self.per_class`` (percent; None where mmseg has NaN: a class
    absent from the ground truth, which mmseg's means leave out)."""

    def compute_metrics(self, results: list) -> dict[str, float]:
        metrics = super().compute_metrics(results)
        self.summary = dict(metrics)
        intersect, union, pred, label = (sum(r) for r in zip(*results))
        per = self.total_area_to_metrics(intersect, union, pred, label, ["mIoU"], self.nan_to_num, self.beta)
        self.per_class = {name: {"IoU": _percent(iou), "Acc": _percent(acc)}
                          for name, iou, acc in zip(self.dataset_meta["classes"], per["IoU"], per["Acc"])}
        return metrics


def _percent(value: Any) -> float | None:
    value = float(value)
    return None if np.isnan(value) else round(100 * value, 2)
