"""``--task coco --engine detectron2``: detectron2's own trainer and COCO evaluator on our exported weights.

ResNet-50: the model zoo's Mask R-CNN R50-FPN (or C4, ``--d2-model c4``) yaml merged with ours from
``transfer/configs/detectron2`` (torchvision-style weights, SyncBN), run by ``DefaultTrainer``. ViTs: ViTDet's
Mask R-CNN as a LazyConfig (``mask_rcnn_vitdet_bam.py``), run by the loop of detectron2's
``tools/lazyconfig_train_net.py``. Datasets are registered from the same COCO layout the torchvision engine reads.
The task's schedule, size and head flags (``--proposals``, ``--roi-batch``, ``--detections-per-image``,
``--weight-decay``, ``--drop-path``, ``--layer-decay``) are written into either config.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from bam.backbones import Backbone
from transfer.coco.data import load_coco
from transfer.coco.detectron2_export import CONFIG_DIR, read_detectron2_weights
from transfer.coco.mask_rcnn import FPN_PROPOSALS, mask_rcnn_options

logger = logging.getLogger(__name__)
INSTALL_HINT = ("detectron2 is not installed and is not on PyPI: build it from source (pip install "
                "--no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'), or use --engine "
                "torchvision (the default), or --export-only to write the weights for a detectron2 elsewhere")
PRECISE_BN_ITERS = 200  # detectron2's TEST.PRECISE_BN.NUM_ITER


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


def _schedule(args) -> tuple[int, list[int]]:
    return args.iters, [int(s) for s in str(args.steps).split(",") if s.strip()]


def _proposals(args) -> tuple[int, int, int, int]:
    """``--proposals``: RPN pre-NMS (per level) / post-NMS (per image) top-k in training, then in testing; the same
    meaning in torchvision and detectron2."""
    opts = mask_rcnn_options(args)
    return tuple(opts[f"rpn_{k}_nms_top_n_{s}"] for s in ("train", "test") for k in ("pre", "post"))


def global_attention_blocks(depth: int) -> set[int]:
    """ViTDet's global-attention blocks, the last of each quarter ((2, 5, 8, 11) at depth 12, (5, 11, 17, 23) at 24,
    as projects/ViTDet's B and L configs); every other block attends within 14x14 windows."""
    return {depth * q // 4 - 1 for q in (1, 2, 3, 4)} - {-1}


def assert_backbone_loaded(model: torch.nn.Module, weights: Path) -> None:
    """Every exported tensor is in ``model`` under exactly one name ending with its own, with its values: what
    detectron2's suffix matching would skip with only a warning (a shape mismatch, a missing name) fails here."""
    state = getattr(model, "module", model).state_dict()
    problems = []
    for name, value in read_detectron2_weights(weights).items():
        hits = [k for k in state if k == name or k.endswith("." + name)]
        if len(hits) != 1:
            problems.append(f"{name}: {len(hits)} places in the model")
        elif tuple(state[hits[0]].shape) != value.shape or not torch.equal(state[hits[0]].cpu(),
                                                                           torch.from_numpy(value)):
            problems.append(f"{name}: not loaded into {hits[0]} (shape {tuple(state[hits[0]].shape)} vs "
                            f"{value.shape})")
    if problems:
        raise ValueError(f"detectron2 did not load {weights} as exported: {'; '.join(problems[:5])}")


def train_resnet(args, backbone: Backbone, weights: Path, train_name: str, val_name: str, num_classes: int,
                 output_dir: Path, device: str) -> dict:
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.engine import DefaultTrainer, hooks
    from detectron2.evaluation import COCOEvaluator

    class Trainer(DefaultTrainer):
        @classmethod
        def build_evaluator(cls, cfg, dataset_name, output_folder=None):
            return COCOEvaluator(dataset_name, output_dir=output_folder or str(output_dir / "inference"))

        def build_hooks(self):  # evaluated once, after train(), instead of also by the hook at the last iteration
            return [h for h in super().build_hooks() if not isinstance(h, hooks.EvalHook)]

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
    # the flag's default is detectron2's FPN values; C4 keeps its own (12000/2000, 6000/1000) unless told otherwise
    if args.d2_model == "fpn" or args.proposals != FPN_PROPOSALS:
        rpn = cfg.MODEL.RPN
        rpn.PRE_NMS_TOPK_TRAIN, rpn.POST_NMS_TOPK_TRAIN, rpn.PRE_NMS_TOPK_TEST, rpn.POST_NMS_TOPK_TEST = \
            _proposals(args)
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE, cfg.TEST.DETECTIONS_PER_IMAGE = args.roi_batch, args.detections_per_image
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (train_name,), (val_name,)
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS, cfg.SOLVER.BASE_LR = iters, tuple(steps), args.lr
    cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.WARMUP_ITERS = args.batch_size, args.warmup_iters
    cfg.SOLVER.WEIGHT_DECAY = args.weight_decay
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = args.clip_grad > 0
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE, cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = "norm", args.clip_grad or 1.0
    cfg.SOLVER.CHECKPOINT_PERIOD, cfg.DATALOADER.NUM_WORKERS = args.checkpoint_period, args.num_workers
    # precise BN re-estimates statistics over 200 batches after training; a shorter run spends no more than it trained
    cfg.TEST.PRECISE_BN.NUM_ITER = min(PRECISE_BN_ITERS, iters)
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TEST = (args.min_size,), args.min_size
    cfg.INPUT.MAX_SIZE_TRAIN = cfg.INPUT.MAX_SIZE_TEST = args.max_size
    if device == "cpu":  # SyncBN needs a process group on CUDA; one CPU process uses plain BN
        for node in (cfg.MODEL.RESNETS, cfg.MODEL.FPN, cfg.MODEL.ROI_BOX_HEAD, cfg.MODEL.ROI_MASK_HEAD):
            if getattr(node, "NORM", "") == "SyncBN":
                node.NORM = "BN"
    (output_dir / "detectron2_config.yaml").write_text(cfg.dump())
    trainer = Trainer(cfg)
    fresh = not trainer.checkpointer.has_checkpoint()
    trainer.resume_or_load(resume=True)
    if fresh:
        assert_backbone_loaded(trainer.model, weights)
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

    if backbone.patch_size != 16:  # SimpleFeaturePyramid scales by 4, 2, 1 or 0.5 only: strides 4-32 need patch 16
        raise ValueError(f"{backbone.arch}: detectron2's ViTDet builds its stride 4-64 pyramid from a patch-16 map; "
                         f"patch {backbone.patch_size} runs with --engine torchvision")
    cfg = LazyConfig.load(str(CONFIG_DIR / "mask_rcnn_vitdet_bam.py"))
    net = cfg.model.backbone.net
    vit = backbone.model
    depth = len(vit.blocks)
    net.embed_dim, net.depth, net.num_heads = vit.embed_dim, depth, vit.blocks[0].attn.num_heads
    net.mlp_ratio = vit.blocks[0].mlp.fc1.out_features / vit.embed_dim
    net.patch_size, net.drop_path_rate = backbone.patch_size, args.drop_path
    net.pretrain_img_size = vit.patch_embed.img_size[0]  # sizes the position embedding our weights carry
    net.window_block_indexes = sorted(set(range(depth)) - global_attention_blocks(depth))
    square = max(args.min_size, args.max_size)
    net.img_size = cfg.model.backbone.square_pad = square  # ViTDet pads every image to this square
    cfg.optimizer.params.lr_factor_func.keywords.update(num_layers=depth, lr_decay_rate=args.layer_decay)
    cfg.model.roi_heads.num_classes = num_classes
    pre_train, post_train, pre_test, post_test = _proposals(args)
    cfg.model.proposal_generator.pre_nms_topk = (pre_train, pre_test)
    cfg.model.proposal_generator.post_nms_topk = (post_train, post_test)
    cfg.model.roi_heads.batch_size_per_image = args.roi_batch
    cfg.model.roi_heads.box_predictor.test_topk_per_image = args.detections_per_image
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
    cfg.dataloader.test.num_workers = args.num_workers
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
    resumed = checkpointer.has_checkpoint()
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=True)
    if not resumed:
        assert_backbone_loaded(model, weights)
    start = trainer.iter + 1 if resumed else 0
    trainer.train(start, iters)
    return inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))


def run_detectron2(data_root: Path, output_dir: Path, device: torch.device, args, backbone: Backbone, weights: Path
                   ) -> dict:
    """Train and evaluate with detectron2 on ``data_root`` (COCO layout); ``args`` holds the coco task's options."""
    require_detectron2()
    root = data_root
    names, cat_ids = {}, {}
    for split in (args.train_split, args.val_split):
        ann, images = root / "annotations" / f"instances_{split}.json", root / split
        cat_ids[split] = sorted(load_coco(ann, images, require_instances=split == args.train_split).getCatIds())
        names[split] = f"bam_{split}"
        register(names[split], ann, images)
    if cat_ids[args.train_split] != cat_ids[args.val_split]:
        raise ValueError(f"{args.train_split} and {args.val_split} annotation files list different categories")
    fit = train_vit if backbone.is_vit else train_resnet
    results = fit(args, backbone, weights, names[args.train_split], names[args.val_split],
                  len(cat_ids[args.train_split]), output_dir, device.type)
    # detectron2 reports NaN where the split has no objects of a size; results.json says null, as the other engine
    metrics = {f"{iou}/{k}": None if math.isnan(v) else float(v) for iou in ("bbox", "segm")
               for k, v in results.get(iou, {}).items() if k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    return {"metrics": metrics, "engine": "detectron2", "detectron2_weights": str(weights),
            "detectron2_config": str(output_dir / "detectron2_config.yaml")}
