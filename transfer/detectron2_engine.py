"""``--task coco --engine detectron2``: detectron2's own trainer and COCO evaluator on our exported weights.

ResNet-50: the model zoo's Mask R-CNN R50-FPN (or C4, ``--d2-model c4``) yaml merged with ours from
``transfer/configs/detectron2`` (torchvision-style weights, SyncBN), run by ``DefaultTrainer``. ViTs: ViTDet's
Mask R-CNN as a LazyConfig (``mask_rcnn_vitdet_bam.py``), run by the loop of detectron2's
``tools/lazyconfig_train_net.py``. Datasets are registered from the same COCO layout the torchvision engine reads.
"""
from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

from bam.backbones import Backbone
from eval.context import TaskContext
from transfer.coco_data import load_coco
from transfer.detectron2_export import CONFIG_DIR

logger = logging.getLogger(__name__)
INSTALL_HINT = ("detectron2 is not installed and is not on PyPI: build it from source (pip install "
                "--no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'), or use --engine "
                "torchvision (the default), or --export-only to write the weights for a detectron2 elsewhere")


def require_detectron2() -> None:
    try:
        import detectron2  # noqa: F401
    except ImportError:
        raise ValueError(f"--engine detectron2: {INSTALL_HINT}") from None


def register(name: str, annotation_file: Path, image_dir: Path) -> None:
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, str(annotation_file), str(image_dir))


def _schedule(args: argparse.Namespace) -> tuple[int, list[int]]:
    return args.iters, [int(s) for s in str(args.steps).split(",") if s.strip()]


def train_resnet(args, backbone: Backbone, weights: Path, train_name: str, val_name: str, num_classes: int,
                 output_dir: Path, device: str) -> dict:
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.engine import DefaultTrainer
    from detectron2.evaluation import COCOEvaluator

    class Trainer(DefaultTrainer):
        @classmethod
        def build_evaluator(cls, cfg, dataset_name, output_folder=None):
            return COCOEvaluator(dataset_name, output_dir=output_folder or str(output_dir / "inference"))

    base = {"fpn": "mask_rcnn_R_50_FPN", "c4": "mask_rcnn_R_50_C4"}[args.d2_model]
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(f"COCO-InstanceSegmentation/{base}_1x.yaml"))
    cfg.merge_from_file(str(CONFIG_DIR / f"{base}_bam.yaml"))
    iters, steps = _schedule(args)
    depth = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}.get(backbone.arch)
    if depth is None:
        raise ValueError(f"{backbone.arch}: the detectron2 engine takes resnet18/34/50/101 and plain ViTs")
    cfg.MODEL.RESNETS.DEPTH = depth
    if depth < 50:  # basic blocks: detectron2 wants the stage-2 width and has no C4 head for them
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.WEIGHTS, cfg.MODEL.DEVICE, cfg.OUTPUT_DIR = str(weights), device, str(output_dir)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (train_name,), (val_name,)
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS, cfg.SOLVER.BASE_LR = iters, tuple(steps), args.lr
    cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.WARMUP_ITERS = args.batch_size, args.warmup_iters
    cfg.SOLVER.CHECKPOINT_PERIOD, cfg.DATALOADER.NUM_WORKERS = args.checkpoint_period, args.num_workers
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TEST = (args.min_size,), args.min_size
    cfg.INPUT.MAX_SIZE_TRAIN = cfg.INPUT.MAX_SIZE_TEST = args.max_size
    if device == "cpu":  # SyncBN needs a process group on CUDA; one CPU process uses plain BN
        for node in (cfg.MODEL.RESNETS, cfg.MODEL.FPN, cfg.MODEL.ROI_BOX_HEAD, cfg.MODEL.ROI_MASK_HEAD):
            if getattr(node, "NORM", "") == "SyncBN":
                node.NORM = "BN"
    (output_dir / "detectron2_config.yaml").write_text(cfg.dump())
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    trainer.train()
    return Trainer.test(cfg, trainer.model)


def train_vit(args, backbone: Backbone, weights: Path, train_name: str, val_name: str, num_classes: int,
              output_dir: Path, device: str) -> dict:
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import LazyConfig, instantiate
    from detectron2.engine import AMPTrainer, SimpleTrainer, default_writers, hooks
    from detectron2.engine.defaults import create_ddp_model
    from detectron2.evaluation import COCOEvaluator, inference_on_dataset
    from detectron2.utils import comm

    cfg = LazyConfig.load(str(CONFIG_DIR / "mask_rcnn_vitdet_bam.py"))
    net = cfg.model.backbone.net
    vit = backbone.model
    net.embed_dim, net.depth, net.num_heads = vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads
    net.patch_size = backbone.patch_size
    cfg.model.backbone.square_pad = max(args.min_size, args.max_size)  # ViTDet pads every image to this square
    cfg.optimizer.params.lr_factor_func.keywords["num_layers"] = len(vit.blocks)
    cfg.model.roi_heads.num_classes = num_classes
    iters, steps = _schedule(args)
    cfg.train.max_iter, cfg.train.init_checkpoint, cfg.train.output_dir = iters, str(weights), str(output_dir)
    cfg.train.device, cfg.train.amp.enabled = device, device == "cuda" and args.amp != "none"
    cfg.train.checkpointer.period = args.checkpoint_period
    cfg.optimizer.lr, cfg.optimizer.weight_decay = args.lr, args.weight_decay
    cfg.lr_multiplier.scheduler.milestones, cfg.lr_multiplier.scheduler.num_updates = steps, iters
    cfg.lr_multiplier.scheduler.values = [0.1 ** i for i in range(len(steps) + 1)]
    cfg.lr_multiplier.warmup_length = args.warmup_iters / iters
    resize, crop = cfg.dataloader.train.mapper.augmentations[1:]
    resize.target_height = resize.target_width = args.min_size  # --min-size is the LSJ square
    crop.crop_size = (args.min_size, args.min_size)
    test_resize = cfg.dataloader.test.mapper.augmentations[0]
    test_resize.short_edge_length, test_resize.max_size = args.min_size, args.max_size
    cfg.dataloader.train.dataset.names, cfg.dataloader.test.dataset.names = train_name, val_name
    cfg.dataloader.train.total_batch_size, cfg.dataloader.train.num_workers = args.batch_size, args.num_workers
    cfg.dataloader.evaluator = {"_target_": COCOEvaluator, "dataset_name": val_name,
                                "output_dir": str(output_dir / "inference")}
    LazyConfig.save(cfg, str(output_dir / "detectron2_config.yaml"))

    model = instantiate(cfg.model).to(device)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    model = create_ddp_model(model, **cfg.train.ddp)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, instantiate(cfg.dataloader.train),
                                                                        optimizer)
    checkpointer = DetectionCheckpointer(model, str(output_dir), trainer=trainer)
    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if comm.is_main_process() else None,
        hooks.PeriodicWriter(default_writers(str(output_dir), iters), period=20) if comm.is_main_process() else None,
    ])
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=True)
    start = trainer.iter + 1 if checkpointer.has_checkpoint() else 0
    trainer.train(start, iters)
    return inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))


def run_detectron2(ctx: TaskContext, args: argparse.Namespace, backbone: Backbone, weights: Path) -> dict:
    require_detectron2()
    root = ctx.data_root
    names = {}
    for split in (args.train_split, args.val_split):
        ann, images = root / "annotations" / f"instances_{split}.json", root / split
        coco = load_coco(ann, images, require_instances=split == args.train_split)
        names[split] = f"bam_{split}"
        register(names[split], ann, images)
    num_classes = len(coco.getCatIds())
    fit = train_vit if backbone.is_vit else train_resnet
    results = fit(args, backbone, weights, names[args.train_split], names[args.val_split], num_classes,
                  ctx.output_dir, ctx.device.type)
    # detectron2 reports NaN where the split has no objects of a size; results.json says null, as the other engine
    metrics = {f"{iou}/{k}": None if math.isnan(v) else float(v) for iou in ("bbox", "segm")
               for k, v in results.get(iou, {}).items() if k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    return {"metrics": metrics, "engine": "detectron2", "detectron2_weights": str(weights)}
