"""``--task coco --engine detectron2`` for real: detectron2's trainer and COCOEvaluator on our exported weights.

Both paths (ResNet-FPN by ``DefaultTrainer``, ViTDet by the LazyConfig loop) train a few iterations of 2 images at
64 pixels on a small built-in COCO sample, then detectron2's COCOEvaluator scores the validation split; its AP is
checked against pycocotools' own COCOeval on the detections it wrote.
"""
import json
import math

import numpy as np
import pytest
import torch
import yaml
from pycocotools.coco import COCO

from bam import build_backbone
from bam.formats import backbone_checkpoint
from bam.samples import coco as coco_sample
from eval.run import main
from transfer.coco.data import coco_metrics
from transfer.coco.detectron2_engine import global_attention_blocks
from transfer.coco.detectron2_export import read_detectron2_weights

from ..conftest import TINY_VIT, assert_one_line_error

# few proposals and RoIs: detectron2's 256-channel heads on 512 RoIs per image would take minutes on 2 cores
FAST = ["--iters", "4", "--batch-size", "2", "--min-size", "64", "--max-size", "64", "--proposals", "100,50,50,20",
        "--roi-batch", "16", "--detections-per-image", "10", "--num-workers", "0", "--checkpoint-period", "100",
        "--warmup-iters", "2", "--steps", "3"]
METRICS = [f"{t}/{m}" for t in ("bbox", "segm") for m in ("AP", "AP50", "AP75", "APs", "APm", "APl")]


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    """The built-in COCO-format sample's generator, 6 training and 3 validation images."""
    root = tmp_path_factory.mktemp("coco")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(coco_sample, "SPLITS", {"train2017": (6, 0), "val2017": (3, 1)})
        coco_sample.generate(root)
    return root


def _run(coco_root, out, *flags) -> dict:
    assert main(["--task", "coco", "--engine", "detectron2", "--data", str(coco_root), "--output-dir", str(out),
                 *FAST, *flags]) == 0
    return json.loads((out / "results.json").read_text())


def _check_training_and_evaluation(res: dict, out, coco_root) -> dict[str, torch.Tensor]:
    """What both paths share: results.json, finite losses at every logged iteration, COCOEvaluator's AP equal to
    pycocotools' on the detections it saved; returns the trained weights."""
    assert res["task"] == "coco" and res["engine"] == "detectron2"
    assert list(res["metrics"]) == METRICS
    for name, value in res["metrics"].items():
        if value is None:  # detectron2's NaN: the 3 validation images hold no small or large objects
            assert name.endswith(("APs", "APl")), name
        else:
            assert math.isfinite(value) and 0 <= value <= 100, (name, value)
    logged = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert logged[-1]["iteration"] == 3  # detectron2 counts from 0: the 4th iteration
    assert all(math.isfinite(entry["total_loss"]) and entry["total_loss"] > 0 for entry in logged)
    detections = json.loads((out / "inference" / "coco_instances_results.json").read_text())
    assert detections and len(detections) <= 3 * 10  # --detections-per-image reached detectron2
    reference = coco_metrics(COCO(str(coco_root / "annotations" / "instances_val2017.json")), detections)
    for name in ("bbox/AP", "bbox/AP50", "bbox/AP75", "segm/AP", "segm/AP50", "segm/AP75"):
        assert res["metrics"][name] == pytest.approx(reference[name], abs=1e-6), name
    final = torch.load(out / "model_final.pth", weights_only=True)
    assert final["iteration"] == 3
    return final["model"]


def test_resnet_fpn_trains_and_detectron2s_evaluator_scores_it(detectron2, coco_root, tmp_path):
    out = tmp_path / "r18"
    res = _run(coco_root, out, "--arch", "resnet18", "--lr", "0.001")
    model = _check_training_and_evaluation(res, out, coco_root)
    exported = read_detectron2_weights(out / "detectron2_weights.pkl")  # the random-init weights it started from
    trained = {k[len("backbone.bottom_up."):]: v for k, v in model.items()
               if k.startswith("backbone.bottom_up.") and not k.endswith("num_batches_tracked")}
    assert set(trained) == set(exported)  # every exported weight has its place, nothing else is in the ResNet
    # detectron2 freezes the stem and res2 (FREEZE_AT 2) and trains the rest
    assert np.array_equal(trained["stem.conv1.weight"].numpy(), exported["stem.conv1.weight"])
    assert np.array_equal(trained["res2.1.conv2.weight"].numpy(), exported["res2.1.conv2.weight"])
    assert not np.array_equal(trained["res5.1.conv2.weight"].numpy(), exported["res5.1.conv2.weight"])
    cfg = yaml.safe_load((out / "detectron2_config.yaml").read_text())
    assert cfg["MODEL"]["RESNETS"]["DEPTH"] == 18 and cfg["MODEL"]["RESNETS"]["NORM"] == "BN"  # SyncBN off on CPU
    assert [cfg["MODEL"]["RPN"][f"{k}_NMS_TOPK_{s}"] for s in ("TRAIN", "TEST") for k in ("PRE", "POST")] == \
        [100, 50, 50, 20]
    assert cfg["MODEL"]["ROI_HEADS"]["BATCH_SIZE_PER_IMAGE"] == 16 and cfg["TEST"]["PRECISE_BN"]["NUM_ITER"] == 4


def test_vitdet_trains_and_detectron2s_evaluator_scores_it(detectron2, coco_root, tmp_path):
    torch.manual_seed(0)
    vit = build_backbone("vit_small_patch16_224", **{**TINY_VIT, "patch_size": 16})  # ViTDet takes patch 16
    checkpoint = tmp_path / "vit.pth"
    torch.save(backbone_checkpoint(vit), checkpoint)
    out = tmp_path / "vitdet"
    # AdamW at 1e-3 teaches a random-init classifier "background" within 4 steps, leaving nothing to score
    res = _run(coco_root, out, "--checkpoint", str(checkpoint), "--lr", "1e-5")
    model = _check_training_and_evaluation(res, out, coco_root)
    exported = read_detectron2_weights(out / "detectron2_weights.pkl")
    trained = {k[len("backbone.net."):]: v for k, v in model.items() if k.startswith("backbone.net.")}
    assert set(exported) <= set(trained)  # ViTDet adds relative position tables of its own
    assert set(trained) - set(exported) == {f"blocks.{i}.attn.rel_pos_{a}" for i in range(2) for a in "hw"}
    assert trained["pos_embed"].shape == exported["pos_embed"].shape == (1, 1 + 2 * 2, 32)  # 32-pixel pretraining
    assert not np.array_equal(trained["blocks.0.attn.qkv.weight"].numpy(), exported["blocks.0.attn.qkv.weight"])
    assert not np.array_equal(trained["patch_embed.proj.weight"].numpy(), exported["patch_embed.proj.weight"])


def test_vitdet_global_attention_blocks_are_the_official_ones(detectron2):
    from detectron2 import model_zoo
    net = model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model.backbone.net  # ViT-B, depth 12
    assert sorted(set(range(12)) - global_attention_blocks(12)) == list(net.window_block_indexes)
    # projects/ViTDet/configs/COCO/mask_rcnn_vitdet_{l,h}_100ep.py: global attention at 5, 11, 17, 23 / 7, 15, 23, 31
    assert global_attention_blocks(24) == {5, 11, 17, 23} and global_attention_blocks(32) == {7, 15, 23, 31}


def test_vitdet_refuses_patch_8_in_one_line(detectron2, coco_root, tmp_path, tiny_checkpoint, caplog):
    argv = ["--task", "coco", "--engine", "detectron2", "--data", str(coco_root), "--checkpoint",
            str(tiny_checkpoint), "--output-dir", str(tmp_path / "p8"), *FAST]
    assert_one_line_error(main, argv, caplog, "patch 8 runs with --engine torchvision")
