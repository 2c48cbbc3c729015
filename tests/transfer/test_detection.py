"""Detection parts: feature pyramids, one Mask R-CNN step, COCOeval wrappers, the detectron2 weight converter."""
import pickle

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from bam import build_backbone
from transfer.coco.data import coco_metrics, to_coco_results
from transfer.coco.detectron2_export import (
    detectron2_to_resnet,
    read_detectron2_weights,
    resnet_to_detectron2,
    to_detectron2,
    write_detectron2_weights,
)
from transfer.coco.mask_rcnn import ViTDetBackbone, build_mask_rcnn, resnet_fpn

from ..conftest import TINY_VIT


def _grid(size, stride):
    """Map size at a stride; the stride-64 level max-pools the stride-32 map with stride 2 (rounding up)."""
    if stride == 64:
        return tuple(-(-(s // 32) // 2) for s in size)
    return tuple(s // stride for s in size)


@pytest.mark.parametrize("size", [(64, 96), (128, 128)])
@pytest.mark.parametrize("patch", [8, 16])
def test_vit_simple_feature_pyramid_shapes(size, patch):
    torch.manual_seed(0)
    vit = build_backbone("vit_small_patch16_224", **{**TINY_VIT, "patch_size": patch})
    out = ViTDetBackbone(vit, out_channels=16)(torch.randn(2, 3, *size))
    assert list(out) == ["0", "1", "2", "3", "pool"]
    assert [tuple(f.shape) for f in out.values()] == [(2, 16, *_grid(size, s)) for s in (4, 8, 16, 32, 64)]


@pytest.mark.parametrize("size", [(64, 96), (128, 128)])
def test_resnet_fpn_shapes_and_frozen_stem(size):
    torch.manual_seed(0)
    backbone = build_backbone("resnet18")
    bn_mean = backbone.model.layer2[0].bn1.running_mean.clone().uniform_()
    backbone.model.layer2[0].bn1.running_mean.copy_(bn_mean)
    fpn = resnet_fpn(backbone, out_channels=16)
    out = fpn(torch.randn(1, 3, *size))
    assert [tuple(f.shape) for f in out.values()] == [(1, 16, *_grid(size, s)) for s in (4, 8, 16, 32, 64)]
    body = fpn.body
    assert not any(p.requires_grad for n, p in body.named_parameters() if n.startswith(("conv1", "layer1")))
    assert all(p.requires_grad for n, p in body.named_parameters() if n.startswith("layer4"))
    assert type(body.layer2[0].bn1).__name__ == "FrozenBatchNorm2d"
    assert torch.equal(body.layer2[0].bn1.running_mean, bn_mean)
    with pytest.raises(ValueError, match="takes ViTs and ResNets"):
        resnet_fpn(build_backbone("caformer_s18"))


def test_one_mask_rcnn_training_step_moves_the_backbone():
    torch.manual_seed(0)
    vit = build_backbone("vit_small_patch16_224", **TINY_VIT)
    model = build_mask_rcnn(vit, num_classes=2, min_size=64, max_size=64, rpn_post_nms_top_n_train=50,
                            box_batch_size_per_image=16)
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:40, 12:50] = 1
    targets = [{"boxes": torch.tensor([[12.0, 10.0, 50.0, 40.0]]), "labels": torch.tensor([2]), "masks": masks}] * 2
    before = vit.model.blocks[0].attn.qkv.weight.clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = model([torch.rand(3, 64, 64), torch.rand(3, 64, 64)], targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    assert not torch.equal(before, vit.model.blocks[0].attn.qkv.weight)
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 64)])[0]
    assert set(out) == {"boxes", "labels", "scores", "masks"} and out["masks"].shape[1:] == (1, 64, 64)


def _gt() -> COCO:
    coco = COCO()
    anns, images = [], []
    for i in range(2):
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "height": 40, "width": 60})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 7 + i, "iscrowd": 0, "area": 300.0,
                     "bbox": [10.0, 5.0, 20.0, 15.0], "segmentation": [[10, 5, 30, 5, 30, 20, 10, 20]]})
    coco.dataset = {"images": images, "annotations": anns,
                    "categories": [{"id": 7, "name": "a"}, {"id": 8, "name": "b"}]}
    coco.createIndex()
    return coco


def _outputs(coco: COCO, label_shift=0) -> list[dict]:
    outs = []
    for image_id in (1, 2):
        ann = coco.imgToAnns[image_id][0]
        x, y, w, h = ann["bbox"]
        mask = torch.from_numpy(coco.annToMask(ann)).float()[None, None]
        outs.append({"boxes": torch.tensor([[x, y, x + w, y + h]]), "scores": torch.tensor([0.9]),
                     "labels": torch.tensor([ann["category_id"] - 6 + label_shift]), "masks": mask})
    return outs


def test_coco_results_and_metrics_perfect_empty_and_wrong():
    coco = _gt()
    results = to_coco_results(_outputs(coco), [1, 2], [7, 8])
    assert results[0]["bbox"] == [10.0, 5.0, 20.0, 15.0] and results[1]["category_id"] == 8
    assert isinstance(results[0]["segmentation"]["counts"], str)
    perfect = coco_metrics(coco, results)
    assert perfect["bbox/AP"] == pytest.approx(100.0) and perfect["segm/AP"] == pytest.approx(100.0)
    assert perfect["bbox/AP50"] == pytest.approx(100.0) and perfect["bbox/APl"] is None  # no large objects
    empty = coco_metrics(coco, [])
    assert empty["bbox/AP"] == 0.0 and empty["segm/AP"] == 0.0
    swapped = to_coco_results(_outputs(coco), [1, 2], [8, 7])  # right boxes, wrong categories
    assert coco_metrics(coco, swapped)["bbox/AP"] == 0.0


def test_detectron2_resnet_names_round_trip_every_weight():
    backbone = build_backbone("resnet50")
    state = backbone.model.state_dict()
    d2 = resnet_to_detectron2(state)
    kept = {k for k in state if not k.endswith("num_batches_tracked") and not k.startswith("fc.")}
    assert len(d2) == len(kept)
    for name in ("stem.conv1.weight", "stem.conv1.norm.running_var", "res2.0.shortcut.weight",
                 "res2.0.shortcut.norm.bias", "res5.2.conv3.norm.weight", "res3.3.conv2.weight"):
        assert name in d2, name
    assert not any("layer" in k or ".bn" in k or "downsample" in k for k in d2)
    back = detectron2_to_resnet(d2)
    assert set(back) == kept and all(torch.equal(back[k], state[k]) for k in kept)


def test_detectron2_vit_names_and_pickle(tmp_path):
    torch.manual_seed(0)
    vit = build_backbone("vit_small_patch16_224", **TINY_VIT)
    d2 = to_detectron2(vit)
    assert set(vit.model.state_dict()) - set(d2) == {"cls_token", "norm.weight", "norm.bias"}
    assert d2["pos_embed"].shape == (1, 1 + 16, 32)  # the [CLS] slot kept (pretrain_use_cls_token)
    path = write_detectron2_weights(vit, tmp_path / "w.pkl")
    with open(path, "rb") as f:
        blob = pickle.load(f)
    assert set(blob) == {"model", "__author__", "matching_heuristics"} and blob["matching_heuristics"] is True
    assert all(isinstance(v, np.ndarray) for v in blob["model"].values())
    assert np.array_equal(read_detectron2_weights(path)["blocks.1.mlp.fc2.weight"],
                          vit.model.blocks[1].mlp.fc2.weight.detach().numpy())
    with pytest.raises(ValueError, match="no layer scale or register tokens"):
        to_detectron2(build_backbone("vit_small_patch14_reg4_dinov2", depth=1, img_size=28))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_converted_weights_fit_detectron2_models_exactly(detectron2, arch):
    """The exported names and shapes equal those of detectron2's own modules (ResNet as the engine configures it:
    basic blocks want the stage-2 width; ViTDet's ViT with the [CLS] slot of the pretraining position embedding)."""
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import ViT
    from detectron2.modeling.backbone.resnet import build_resnet_backbone
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.RESNETS.STRIDE_IN_1X1 = int(arch[len("resnet"):]), False
    if cfg.MODEL.RESNETS.DEPTH < 50:
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    d2_resnet = {k: v.shape for k, v in build_resnet_backbone(cfg, ShapeSpec(channels=3)).state_dict().items()}
    ours = {k: v.shape for k, v in to_detectron2(build_backbone(arch)).items()}
    assert ours == d2_resnet
    d2_vit = ViT(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, pretrain_img_size=32)
    ours = {k: v.shape for k, v in to_detectron2(build_backbone("vit_small_patch16_224", **TINY_VIT)).items()}
    assert ours == {k: v.shape for k, v in d2_vit.state_dict().items()}


def test_reading_an_export_never_runs_code_from_it(tmp_path):
    import os
    import pickle

    from transfer.coco.detectron2_export import read_detectron2_weights

    class Crafted:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    path = tmp_path / "detectron2_weights.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": Crafted()}}))
    with pytest.raises(ValueError, match="refusing posix.system"):
        read_detectron2_weights(path)
    assert not (tmp_path / "pwned").exists()
