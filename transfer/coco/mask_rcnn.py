"""Mask R-CNN from torchvision's detection models on the project's backbones.

ViTs get ViTDet's simple feature pyramid (Li et al., 2022): from the stride-16 patch map, scale factors 4 (two
2x2 transposed convolutions), 2 (one), 1 and 1/2 (2x2 max pool), each followed by a 1x1 and a 3x3 convolution
with channel LayerNorm, giving strides 4, 8, 16, 32, plus a max-pooled stride-64 level for the RPN. ResNets get
torchvision's standard FPN on their four stages, with frozen BatchNorm and a frozen stem + first stage (the
detectron2 / torchvision default, ``freeze_at=2``).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from bam.backbones import Backbone
from bam.images import MEAN, STD

LEVELS = ("0", "1", "2", "3", "pool")  # strides 4, 8, 16, 32, 64
# RPN proposals pre/post NMS in training, then in testing: detectron2's FPN values (configs/Base-RCNN-FPN.yaml)
FPN_PROPOSALS = "2000,1000,1000,1000"


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a ``[B, C, H, W]`` map (ViTDet's norm in the pyramid)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _conv_ln(in_ch: int, out_ch: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, k, padding=k // 2, bias=False), LayerNorm2d(out_ch))


class SimpleFeaturePyramid(nn.Module):
    """``[B, D, h, w]`` (stride 16) -> ``{"0": stride 4, "1": 8, "2": 16, "3": 32, "pool": 64}``, ``out_channels``
    each."""

    def __init__(self, dim: int, out_channels: int = 256):
        super().__init__()
        half, quarter = dim // 2, dim // 4
        self.scales = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(dim, half, 2, stride=2), LayerNorm2d(half), nn.GELU(),
                          nn.ConvTranspose2d(half, quarter, 2, stride=2)),
            nn.ConvTranspose2d(dim, half, 2, stride=2),
            nn.Identity(),
            nn.MaxPool2d(2, stride=2),
        ])
        widths = (quarter, half, dim, dim)
        self.outputs = nn.ModuleList(
            nn.Sequential(_conv_ln(w, out_channels, 1), _conv_ln(out_channels, out_channels, 3)) for w in widths)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = [out(scale(x)) for scale, out in zip(self.scales, self.outputs)]
        pyramid = OrderedDict(zip(LEVELS[:4], maps))
        pyramid["pool"] = F.max_pool2d(maps[-1], kernel_size=1, stride=2)
        return pyramid


class ViTDetBackbone(nn.Module):
    """A ViT backbone (any patch size: its patch map is resized to stride 16 when needed) + the simple pyramid."""

    def __init__(self, backbone: Backbone, out_channels: int = 256):
        super().__init__()
        if not backbone.is_vit:
            raise ValueError(f"{backbone.arch} is not a ViT")
        self.backbone = backbone
        self.pyramid = SimpleFeaturePyramid(backbone.embed_dim, out_channels)
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        out = self.backbone.forward_features(images)
        h, w = out["hw"]
        fmap = out["patch"].transpose(1, 2).reshape(images.shape[0], -1, h, w)
        if self.backbone.patch_size != 16:  # keep the pyramid's strides 4..64 whatever the patch size
            fmap = F.interpolate(fmap, size=(images.shape[-2] // 16, images.shape[-1] // 16), mode="bilinear",
                                 align_corners=False)
        return self.pyramid(fmap)


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by a FrozenBatchNorm2d holding the same statistics and affine parameters."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


def resnet_fpn(backbone: Backbone, out_channels: int = 256, trainable_stages: int = 3) -> BackboneWithFPN:
    model = backbone.model
    if not all(hasattr(model, f"layer{i}") for i in range(1, 5)):
        raise ValueError(f"{backbone.arch}: the torchvision detection engine takes ViTs and ResNets "
                         f"(layer1..layer4); this arch has neither")
    freeze_batchnorm(model)
    trainable = [f"layer{i}" for i in range(5 - trainable_stages, 5)]
    for name, param in model.named_parameters():
        param.requires_grad_(any(name.startswith(t + ".") for t in trainable))
    widths = [info["num_chs"] for info in model.feature_info if info["module"].startswith("layer")]
    return BackboneWithFPN(model, {f"layer{i}": str(i - 1) for i in range(1, 5)}, widths, out_channels,
                           extra_blocks=LastLevelMaxPool())


def build_mask_rcnn(backbone: Backbone, num_classes: int, min_size: int = 800, max_size: int = 1333,
                    out_channels: int = 256, **mask_rcnn_kwargs) -> MaskRCNN:
    """Mask R-CNN with ``num_classes`` foreground classes (torchvision counts the background: +1);
    ``mask_rcnn_kwargs`` go to torchvision's ``MaskRCNN`` (proposal counts, RoI batch, detections per image)."""
    if backbone.is_vit:
        features: nn.Module = ViTDetBackbone(backbone, out_channels)
    else:
        features = resnet_fpn(backbone, out_channels)
    return MaskRCNN(features, num_classes=num_classes + 1, min_size=min_size, max_size=max_size,
                    image_mean=list(MEAN), image_std=list(STD), **mask_rcnn_kwargs)


def mask_rcnn_options(args) -> dict:
    """torchvision's MaskRCNN keyword arguments for ``--proposals``, ``--roi-batch``, ``--detections-per-image``."""
    try:
        pre_train, post_train, pre_test, post_test = (int(v) for v in str(args.proposals).split(","))
    except ValueError:
        raise ValueError(f"--proposals {args.proposals!r} must be four integers: pre/post NMS in training, "
                         f"then in testing") from None
    return {"rpn_pre_nms_top_n_train": pre_train, "rpn_post_nms_top_n_train": post_train,
            "rpn_pre_nms_top_n_test": pre_test, "rpn_post_nms_top_n_test": post_test,
            "box_batch_size_per_image": args.roi_batch, "box_detections_per_img": args.detections_per_image}
