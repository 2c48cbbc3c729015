"""ADE20K in mmsegmentation: weight conversion, multi-level features, the compat ops, IoUMetric, the front door."""
import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bam import build_backbone
from bam.formats import backbone_checkpoint
from bam.samples import ade as ade_sample
from eval import run as front
from eval.tasks import ade20k as ade20k_task
from transfer.ade20k import CONFIG_DIR

from ..conftest import TINY_VIT, assert_flag_error, assert_one_line_error

pytest.importorskip("mmseg", reason="the 'seg' extra: pip install -e '.[seg]'")
import mmcv  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.structures import PixelData  # noqa: E402
from mmseg.structures import SegDataSample  # noqa: E402

from transfer.ade20k import models as mm  # noqa: E402
from transfer.ade20k.mmseg_compat import ensure_mmcv_ops, point_sample  # noqa: E402

TINY_VIT4 = dict(TINY_VIT, depth=4)  # UperNet takes 4 levels from 4 different blocks
SAMPLE_CONFIG = CONFIG_DIR / "upernet_cpu_sample.py"


@pytest.fixture
def tiny_vit4():
    torch.manual_seed(0)
    return build_backbone("vit_small_patch16_224", **TINY_VIT4).eval()


def _mmseg_backbone(backbone, size=(32, 32)):
    cfg = mm.backbone_config(backbone, size)
    cfg.pop("type")
    module = (mm.VisionTransformer if backbone.is_vit else mm.ResNet)(**cfg)  # mmseg's own modules
    module.eval()  # mmseg's train() returns None: no chaining
    return module


# --- compat ops -------------------------------------------------------------------------------------------------

def test_point_sample_is_bilinear_with_align_corners_false_and_zero_padding():
    assert ensure_mmcv_ops() in ("compat", "mmcv")
    grid = 1 + torch.tensor([[0.0, 1.0], [2.0, 3.0]])[None, None]  # value = 1 + col + 2 * row, linear in (x, y)
    # (x, y) in [0, 1]: pixel j has its centre at (j + 0.5) / 2; (0, 0) is the corner, outside is zero
    points = torch.tensor([[[0.25, 0.25], [0.5, 0.5], [0.375, 0.625], [0.0, 0.0]]])
    got = point_sample(grid, points)
    # 1 + 0 | 1 + 0.5 + 2 * 0.5 | 1 + 0.25 + 2 * 0.75 | a quarter of pixel (0, 0) and three zero pads
    assert got.shape == (1, 1, 4)
    assert torch.allclose(got[0, 0], torch.tensor([1.0, 2.5, 2.75, 0.25]))
    assert point_sample(grid, points.reshape(1, 2, 2, 2)).shape == (1, 1, 2, 2)


def test_point_sample_matches_mmcvs_own_source_and_is_what_mmseg_imports():
    path = Path(mmcv.__file__).parent / "ops" / "point_sample.py"  # pure PyTorch; only mmcv.ops' package init fails
    spec = importlib.util.spec_from_file_location("mmcv_point_sample_source", path)
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    x, pts = torch.randn(2, 3, 5, 7), torch.rand(2, 11, 2) * 1.2 - 0.1
    assert torch.allclose(point_sample(x, pts), reference.point_sample(x, pts), atol=1e-6)
    from mmseg.models.utils import point_sample as mmseg_module
    if ensure_mmcv_ops() == "compat":
        assert mmseg_module.point_sample is point_sample
        with pytest.raises(ModuleNotFoundError):  # mmseg's cc_head / psa_head guard exactly this
            from mmcv.ops import CrissCrossAttention  # noqa: F401


# --- weight conversion ------------------------------------------------------------------------------------------

def test_vit_mapping_round_trips_every_weight(tiny_vit4):
    original = tiny_vit4.model.state_dict()
    converted = mm.vit_to_mmseg(original)
    target = _mmseg_backbone(tiny_vit4).state_dict()
    assert set(converted) == set(target)
    assert all(converted[k].shape == target[k].shape for k in target)
    back = mm.vit_from_mmseg(converted)
    assert set(back) == set(original) and all(torch.equal(back[k], original[k]) for k in original)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnet_mapping_matches_mmseg_resnet_exactly(arch):
    backbone = build_backbone(arch)
    original = backbone.model.state_dict()
    target = _mmseg_backbone(backbone).state_dict()
    converted = mm.resnet_to_mmseg(original)
    assert set(converted) == set(target) and all(converted[k].shape == target[k].shape for k in target)
    assert all(torch.equal(converted[k], original[k]) for k in original)  # same names: converting back is identity


def test_converted_vit_gives_our_features(tiny_vit4):
    """mmseg's ViT with our weights = timm's blocks 0..3 (the last through the final norm, as our backbone)."""
    target = _mmseg_backbone(tiny_vit4)
    target.load_state_dict(mm.converted_backbone_state(tiny_vit4, target), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        levels = target(x)
        raw = tiny_vit4.model.forward_intermediates(x, indices=[0, 1, 2], norm=False, output_fmt="NCHW",
                                                    intermediates_only=True)
        last = tiny_vit4.get_intermediate_layers(x, 1)[0]["patch"]
    for got, want in zip(levels[:3], raw):
        assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(levels[3].flatten(2).transpose(1, 2), last, atol=1e-5)


def test_unusable_archs_say_what_works():
    with pytest.raises(ValueError, match=r"vit_small_patch14_dinov2 .*blocks\.\*\.ls1\.gamma.*supports plain ViTs"):
        mm.backbone_config(build_backbone("vit_small_patch14_dinov2", depth=4, img_size=28), (28, 28))
    with pytest.raises(ValueError, match="4 different blocks"):
        mm.backbone_config(build_backbone("vit_small_patch16_224", **TINY_VIT), (32, 32))


# --- the segmentor ----------------------------------------------------------------------------------------------

def _segmentor(backbone, crop, num_classes=3):
    cfg = Config.fromfile(str(SAMPLE_CONFIG))
    return mm.build_segmentor(mm.segmentor_config(cfg.model, backbone, num_classes, crop), backbone)


@pytest.mark.parametrize("arch", ["tiny_vit", "resnet18"])
@pytest.mark.parametrize("size", [(64, 64), (96, 128)])
def test_multi_level_features_have_strides_4_8_16_32(arch, size):
    backbone = build_backbone("vit_small_patch16_224", **TINY_VIT4) if arch == "tiny_vit" else build_backbone(arch)
    model = _segmentor(backbone, (64, 64))
    model.eval()
    with torch.no_grad():
        levels = model.extract_feat(torch.randn(1, 3, *size))
    channels = [64] * 4 if backbone.is_vit else [64, 128, 256, 512]  # the sample config's neck width / stages
    assert [tuple(f.shape) for f in levels] == [(1, c, size[0] // s, size[1] // s)
                                                for c, s in zip(channels, (4, 8, 16, 32))]


def test_one_training_step_with_converted_weights(tiny_vit4):
    model = _segmentor(tiny_vit4, (32, 32))
    expected = mm.converted_backbone_state(tiny_vit4, model.backbone)
    model.init_weights()  # what mmengine's Runner calls before training: must keep our weights
    assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in expected.items())
    model.train()
    samples = []
    for _ in range(2):
        sample = SegDataSample(metainfo=dict(img_shape=(32, 32), pad_shape=(32, 32)))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, 3, (1, 32, 32)))
        samples.append(sample)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = model.loss(torch.randn(2, 3, 32, 32), samples)
    loss = sum(v for k, v in losses.items() if k.endswith("loss_ce"))
    assert set(losses) >= {"decode.loss_ce", "aux.loss_ce"} and torch.isfinite(loss)
    loss.backward()
    assert model.backbone.patch_embed.projection.weight.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(model.backbone.cls_token, expected["cls_token"])


# --- the metric ------------------------------------------------------------------------------------------------

def _score(gt: np.ndarray, pred: np.ndarray, classes=("a", "b", "c")) -> mm.BamIoUMetric:
    metric = mm.BamIoUMetric(iou_metrics=["mIoU"])
    metric.dataset_meta = dict(classes=classes)
    sample = dict(pred_sem_seg=dict(data=torch.from_numpy(pred)[None]),
                  gt_sem_seg=dict(data=torch.from_numpy(gt)[None]))
    metric.process({}, [sample])
    metric.compute_metrics(metric.results)
    return metric


def test_iou_metric_perfect_all_wrong_and_by_hand():
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    perfect = _score(gt, np.where(gt == 255, 0, gt))
    assert perfect.summary == {"aAcc": 100.0, "mIoU": 100.0, "mAcc": 100.0}
    assert all(v == {"IoU": 100.0, "Acc": 100.0} for v in perfect.per_class.values())
    wrong = _score(gt, (gt + 1) % 3)
    assert wrong.summary == {"aAcc": 0.0, "mIoU": 0.0, "mAcc": 0.0}
    # a: 2 of 2 right, b predicted on one a pixel; b: 1 of 2 right; class c absent from the ground truth: left out
    partial = _score(np.array([[0, 0], [1, 1]]), np.array([[0, 0], [0, 1]]))
    assert partial.per_class["a"] == {"IoU": round(100 * 2 / 3, 2), "Acc": 100.0}
    assert partial.per_class["b"] == {"IoU": 50.0, "Acc": 50.0} and partial.per_class["c"]["IoU"] is None
    assert partial.summary == {"aAcc": 75.0, "mIoU": round(100 * (2 / 3 + 1 / 2) / 2, 2), "mAcc": 75.0}


# --- recipe, sample, front door ----------------------------------------------------------------------------------

def test_paper_preset_is_mmsegs_vit_recipe_and_short_runs_shrink_its_schedule(tmp_path):
    cfg = Config.fromfile(str(CONFIG_DIR / "upernet_vit_160k.py"))
    assert cfg.train_cfg.max_iters == 160000 and cfg.train_dataloader.batch_size == 16
    assert cfg.optim_wrapper.optimizer.type == "AdamW" and cfg.optim_wrapper.optimizer.lr == 6e-5
    assert cfg.model.data_preprocessor.size == (512, 512) and cfg.model.backbone.drop_path_rate == 0.1
    ade20k_task.apply_overrides(cfg, data_root=tmp_path, classes=["x", "y"], iters=1000, batch_size=2, lr=1e-4,
                                crop_size=64, num_workers=0)
    assert [(s.type, s.begin, s.end) for s in cfg.param_scheduler] == [("LinearLR", 0, 1000)]
    assert cfg.train_cfg.val_interval == 1000 and cfg.val_dataloader.dataset.metainfo["classes"] == ("x", "y")
    assert not cfg.train_dataloader.persistent_workers


def test_cpu_sample_preset_inherits_the_512_base_with_its_own_pipelines():
    """mmengine resolves a base file's names when it reads it: the sample's img_scale and crop size must reach the
    base's pipelines in its dataloaders once the task has applied the config (with no flags: its own values)."""
    cfg = Config.fromfile(str(SAMPLE_CONFIG))
    base = Config.fromfile(str(CONFIG_DIR / "_ade20k_512.py"))
    ade20k_task.apply_overrides(cfg, data_root=Path("/data"), classes=None, iters=cfg.train_cfg.max_iters,
                                batch_size=cfg.train_dataloader.batch_size, lr=cfg.optim_wrapper.optimizer.lr,
                                crop_size=cfg.model.data_preprocessor.size[0], num_workers=2)
    train, val = cfg.train_dataloader, cfg.val_dataloader
    assert [s.type for s in train.dataset.pipeline] == [s.type for s in base.train_dataloader.dataset.pipeline]
    steps = {s.type: s for s in train.dataset.pipeline}
    assert steps["RandomResize"].scale == (512, 128) and steps["RandomCrop"].crop_size == (128, 128)
    assert [s.scale for s in val.dataset.pipeline if s.type == "Resize"] == [(512, 128)]
    assert train.dataset.type == val.dataset.type == "BaseSegDataset"
    assert (train.batch_size, train.num_workers, val.batch_size, val.num_workers) == (4, 2, 1, 2)
    assert train.dataset.data_prefix == base.train_dataloader.dataset.data_prefix and train.dataset.reduce_zero_label
    assert (cfg.train_cfg.max_iters, cfg.train_cfg.val_interval, cfg.train_cfg.type) == (400, 400, "IterBasedTrainLoop")
    assert cfg.default_hooks.checkpoint.interval == -1 and not cfg.default_hooks.checkpoint.save_last
    assert cfg.default_hooks.logger.interval == 20 and cfg.env_cfg.dist_cfg.backend == "gloo"
    assert cfg.val_evaluator == base.val_evaluator and cfg.visualizer == base.visualizer


def test_builtin_sample_is_deterministic_and_in_ade_layout(tmp_path):
    ade_sample.generate(tmp_path / "a")
    assert ade20k_task.check_layout(tmp_path / "a") == {"training": 40, "validation": 12}
    assert "generated" in (tmp_path / "a" / "README.md").read_text()
    first = sorted((tmp_path / "a" / "annotations" / "validation").glob("*.png"))[0]
    label = np.array(Image.open(first))
    assert label.dtype == np.uint8 and set(np.unique(label)) <= set(range(len(ade_sample.CLASSES) + 1))
    name = "images/training/ADE_sample_training_00007.jpg"
    ade_sample.generate(tmp_path / "b")
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.fixture
def ade_root(tmp_path):
    """A tiny ADE20K-layout folder: 48x64 images of 3 classes in vertical bands, plus an unlabelled (0) corner."""
    root = tmp_path / "ADE"
    rng = np.random.default_rng(0)
    for split, n in (("training", 4), ("validation", 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            label = np.repeat(np.repeat(rng.permutation(3)[None] + 1, 48, 0), 22, 1)[:, :64].astype(np.uint8)
            label[:8, :8] = 0
            colours = np.array([[0, 0, 0], [200, 40, 40], [40, 200, 40], [40, 40, 200]], np.uint8)
            Image.fromarray(colours[label]).save(root / "images" / split / f"{i}.jpg")
            Image.fromarray(label).save(root / "annotations" / split / f"{i}.png")
    return root


FAST = ["--preset", "cpu_sample", "--iters", "2", "--batch-size", "2", "--crop-size", "32", "--num-workers", "0",
        "--classes", "red,green,blue"]


@pytest.fixture
def ade_front():
    return front.main


def test_front_door_end_to_end_with_a_checkpoint(ade_front, ade_root, tiny_vit4, tmp_path):
    checkpoint = tmp_path / "tiny.pth"
    torch.save(backbone_checkpoint(tiny_vit4), checkpoint)
    out = tmp_path / "out"
    assert ade_front(["--task", "ade20k", "--data", str(ade_root), "--checkpoint", str(checkpoint),
                      "--output-dir", str(out), *FAST]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "ade20k" and res["checkpoint_format"] == "bam" and set(res["metrics"]) == {
        "mIoU", "mAcc", "aAcc"}
    assert res["classes"] == ["red", "green", "blue"] and set(res["per_class"]["red"]) == {"IoU", "Acc"}
    assert res["iterations"] == 2 and res["config"]["crop_size"] == 32 and res["config"]["lr"] == 1e-3
    resolved = Config.fromfile(res["config_file"])
    assert resolved.model.backbone.type == "VisionTransformer" and resolved.model.backbone.num_layers == 4
    assert resolved.train_dataloader.dataset.data_root == str(ade_root.resolve())
    assert Path(res["mmseg_log_dir"]).is_dir() and Path(res["mmseg_log_dir"]).is_relative_to(out.resolve())


def test_bad_input_is_one_line(ade_front, ade_root, tmp_path, caplog, capsys):
    argv = ["--task", "ade20k", "--data", str(ade_root), "--output-dir", str(tmp_path / "o"), *FAST]
    assert_one_line_error(ade_front, [*argv, "--classes", ","], caplog, "--classes is empty")
    assert_one_line_error(ade_front, [*argv, "--arch", "caformer_s18"], caplog, "arch caformer_s18 cannot run")
    assert_flag_error(ade_front, [*argv, "--iters", "0"], capsys, "argument --iters: 0 must be >= 1")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "transfer.ade20k.models", None)  # as if mmsegmentation were not installed
        assert_one_line_error(ade_front, argv, caplog, "pip install -e '.[seg]'")
    (ade_root / "annotations" / "validation" / "1.png").unlink()
    assert_one_line_error(ade_front, argv, caplog, "1.jpg has no annotation")
    shutil.rmtree(ade_root / "annotations" / "training")
    assert_one_line_error(ade_front, argv, caplog, "annotations/training is missing")


@pytest.fixture(scope="module")
def ade_cache(tmp_path_factory):
    """A cache folder holding the built-in ADE20K-layout sample (what the front door uses without --data)."""
    cache = tmp_path_factory.mktemp("cache")
    ade20k_task.builtin_sample(cache)
    return cache


@pytest.fixture
def small_validation(monkeypatch):
    """The presets' configs as the task builds them, validated at short side 64 instead of 512 (the training crop is
    --crop-size; the test scale has no flag) and logging every iteration's losses instead of every 50th."""
    build = ade20k_task.build_config

    def build_small(*args, **kwargs):
        cfg, source, counts = build(*args, **kwargs)
        resize = [step for step in cfg.val_dataloader.dataset.pipeline if step.type == "Resize"]
        assert [step.scale for step in resize] == [(2048, 512)]  # mmseg's ADE20K test scale, about to shrink
        resize[0].scale = (256, 64)
        cfg.default_hooks.logger.interval = 1
        return cfg, source, counts

    monkeypatch.setattr(ade20k_task, "build_config", build_small)


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_both_160k_presets_run_a_few_iterations_on_the_sample(family, ade_front, ade_cache, small_validation,
                                                             tiny_vit4, tmp_path):
    if family == "vit":
        checkpoint = tmp_path / "tiny.pth"
        torch.save(backbone_checkpoint(tiny_vit4), checkpoint)
        model = ["--checkpoint", str(checkpoint)]
    else:
        model = ["--arch", "resnet18"]  # random init: the smallest ResNet the preset takes
    out = tmp_path / "out"
    assert ade_front(["--task", "ade20k", "--preset", "160k", "--cache-dir", str(ade_cache), "--output-dir", str(out),
                      *model, "--iters", "2", "--batch-size", "2", "--crop-size", "64", "--num-workers", "0"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert Path(res["config_source"]).name == ade20k_task.PRESETS["160k"][family]
    assert res["backbone_family"] == family and res["iterations"] == 2 and res["data"]["builtin_sample"]
    assert set(res["metrics"]) == {"mIoU", "mAcc", "aAcc"}
    assert all(math.isfinite(v) and 0 <= v <= 100 for v in res["metrics"].values()), res["metrics"]
    assert res["classes"] == list(ade_sample.CLASSES)
    cfg = Config.fromfile(res["config_file"])  # the preset's recipe, shortened by the flags only
    optimizer = cfg.optim_wrapper.optimizer
    assert (optimizer.type, optimizer.lr) == (("AdamW", 6e-5) if family == "vit" else ("SGD", 0.01))
    assert cfg.model.decode_head.channels == 512 and cfg.model.auxiliary_head.channels == 256
    assert cfg.train_cfg.max_iters == 2 and all(s.end == 2 for s in cfg.param_scheduler)
    logged = [json.loads(line) for line in (Path(res["mmseg_log_dir"]) / "vis_data" / "scalars.json").open()]
    losses = [entry for entry in logged if "loss" in entry]
    assert [entry["iter"] for entry in losses] == [1, 2]
    assert all(math.isfinite(entry[k]) for entry in losses for k in ("loss", "decode.loss_ce", "aux.loss_ce"))
    assert (out / "mmseg" / "iter_2.pth").is_file()  # the preset's CheckpointHook also saves the last iteration
