"""``python eval/run.py --task ade20k``: ADE20K semantic segmentation, UperNet on our backbone in mmsegmentation.

The evaluated backbone's weights are converted to mmseg's ``VisionTransformer`` (4 blocks, one per quarter, through
mmseg's MultiLevelNeck to strides 4/8/16/32) or ``ResNet`` (its 4 stages), then mmengine's Runner trains and
validates the recipe kept in ``transfer/configs/ade20k`` and mmseg's IoUMetric scores it (percent, 0-100).
Under ``torchrun`` / a multi-task SLURM job every rank trains its share of the global ``--batch-size``
(``transfer/ade20k/train.py``); a rerun of the same command resumes its checkpoint (``transfer/ade20k/resume.py``).
mmseg, mmengine and mmcv-lite are the ``seg`` extra: ``pip install -e ".[seg]"``.
"""
from __future__ import annotations

import argparse
import logging
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

from bam.backbones import Backbone
from bam.cli import number, parse_list, resolve_defaults
from bam.distributed import get_dist_info
from bam.samples import ade as ade_sample
from bam.samples.cache import ensure_generated
from bam.training import seed_everything
from eval.budget import ADE20K_VAL, Workload
from eval.context import TaskContext
from eval.tasks import TaskSpec
from transfer.ade20k import CONFIG_DIR

logger = logging.getLogger(__name__)
HELP = "ADE20K semantic segmentation: UperNet on the backbone in mmsegmentation, mIoU / mAcc / aAcc (percent)"
# preset -> config file per backbone family (ViT, ResNet); the files cite mmseg's recipe for every value
PRESETS = {
    "160k": {"vit": "upernet_vit_160k.py", "resnet": "upernet_resnet_160k.py"},
    "cpu_sample": {"vit": "upernet_cpu_sample.py", "resnet": "upernet_cpu_sample.py"},
}
SEG_EXTRA = ("--task ade20k needs mmsegmentation: pip install -e '.[seg]' (mmengine==0.10.7, mmcv-lite==2.1.0, "
             "mmsegmentation==1.2.2, ftfy, regex)")


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--preset", default=None, choices=sorted(PRESETS),
                       help="160k (mmseg's UperNet ADE20K recipe, 512x512, 16 images x 160k iterations) or "
                            "cpu_sample (4 images x 400 iterations at 128x128)")
    group.add_argument("--seg-config", default=None,
                       help="an mmengine config file to start from instead of the preset's (transfer/configs/ade20k)")
    group.add_argument("--iters", type=number(int, ge=1), default=None,
                       help="training iterations (default: the config's, 160000)")
    group.add_argument("--batch-size", type=number(int, ge=1), default=None,
                       help="images per iteration, over all processes: N processes take --batch-size / N each "
                            "(default: the config's, 16)")
    group.add_argument("--lr", type=number(float, gt=0), default=None,
                       help="peak learning rate (default: the config's, 6e-5 for "
                       "ViTs with AdamW, 0.01 for ResNets with SGD)")
    group.add_argument("--crop-size", type=number(int, ge=1), default=None,
                       help="square training crop (default: the config's, 512)")
    group.add_argument("--num-workers", type=number(int, ge=0), default=None,
                       help="DataLoader workers (default: the config's, 4)")
    group.add_argument("--classes", default=None, help="comma-separated names of labels 1..N (default: ADE20K's 150; "
                       "the built-in sample's 5 without --data); label 0 is 'other' and is ignored")


def builtin_sample(cache_dir: Path) -> Path:
    return ensure_generated(cache_dir / ade_sample.sample_dirname(), ade_sample.generate)


def check_layout(root: Path, img_suffix: str = ".jpg", seg_suffix: str = ".png") -> dict[str, int]:
    """mmseg's ADE20K layout under ``root``, every image with its annotation; returns images per split."""
    counts = {}
    for split in ("training", "validation"):
        img_dir, ann_dir = root / "images" / split, root / "annotations" / split
        for folder in (img_dir, ann_dir):
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder} is missing: --data must be an ADE20K root (ADEChallengeData2016) "
                                        f"with images/{{training,validation}}/*{img_suffix} and "
                                        f"annotations/{{training,validation}}/*{seg_suffix}")
        images = sorted(img_dir.rglob(f"*{img_suffix}"))
        if not images:
            raise FileNotFoundError(f"{img_dir} has no *{img_suffix} images")
        for image in images:
            annotation = ann_dir / image.relative_to(img_dir).with_suffix(seg_suffix)
            if not annotation.is_file():
                raise FileNotFoundError(f"{image} has no annotation: expected {annotation}")
        counts[split] = len(images)
    return counts


def _set(cfg: Any, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for name in parents:
        cfg = cfg[name]
    cfg[last] = value


def config_defaults(cfg: Any) -> dict:
    """The values the flags left unset take: the recipe config's."""
    return {"iters": cfg.train_cfg.max_iters, "batch_size": cfg.train_dataloader.batch_size,
            "lr": cfg.optim_wrapper.optimizer.lr, "crop_size": cfg.model.data_preprocessor.size[0],
            "num_workers": cfg.train_dataloader.num_workers}


def apply_overrides(cfg: Any, *, data_root: Path, classes: list[str] | None, iters: int, batch_size: int, lr: float,
                    crop_size: int, num_workers: int) -> None:
    """Put the run's data, classes and flags into an mmengine ``Config`` (in place). ``classes=None``: the config's
    dataset type knows its classes (ADE20KDataset)."""
    img_scale = cfg.get("img_scale")
    # the recipe files' local names: in the dump they would be stale
    for shorthand in ("crop_size", "img_scale", "data_root", "dataset_type", "dataset", "train_pipeline",
                      "test_pipeline", "norm_cfg", "vis_backends"):
        cfg.pop(shorthand, None)
    old_iters = cfg.train_cfg.max_iters
    cfg.train_cfg.max_iters = iters
    cfg.train_cfg.val_interval = min(cfg.train_cfg.val_interval, iters)
    schedulers = []
    for sched in cfg.param_scheduler:  # the schedule ends where training ends; a warm-up longer than that shrinks
        sched.end = iters if sched.end == old_iters else min(sched.end, iters)
        if sched.begin < sched.end:
            schedulers.append(sched)
    cfg.param_scheduler = schedulers
    cfg.optim_wrapper.optimizer.lr = lr
    cfg.model.data_preprocessor.size = (crop_size, crop_size)
    for step in [*cfg.train_dataloader.dataset.pipeline, *cfg.val_dataloader.dataset.pipeline]:
        if step.type == "RandomCrop":
            step.crop_size = (crop_size, crop_size)
        if step.type in ("Resize", "RandomResize") and img_scale is not None:  # the recipe file's own img_scale
            step.scale = tuple(img_scale)
    cfg.train_dataloader.batch_size = batch_size
    for loader in (cfg.train_dataloader, cfg.val_dataloader):
        loader.num_workers = num_workers
        loader.persistent_workers = num_workers > 0
        loader.dataset.data_root = str(data_root)
        if classes is not None:  # the dataset's own classes: mmseg's base dataset class, ADE20K's file layout
            loader.dataset.type = "BaseSegDataset"
            loader.dataset.metainfo = dict(classes=tuple(classes), palette=[_colour(i) for i in range(len(classes))])


def _colour(i: int) -> list[int]:
    return [(37 * i + 64) % 256, (91 * i + 128) % 256, (53 * i + 32) % 256]


def build_config(ctx: TaskContext, args: argparse.Namespace, backbone: Backbone, mmseg_models: ModuleType,
                 world_size: int = 1) -> tuple[Any, Path, dict[str, int]]:
    """The recipe for ``backbone`` with the run's data, classes and flags (unset flags take the recipe's values and
    are written back into ``args``): ``(config, the recipe file it came from, images per split)``. Its
    ``train_dataloader.batch_size`` is the global batch, which ``world_size`` processes must divide evenly."""
    from mmengine.config import Config

    from transfer.ade20k.train import per_process_batch

    family = "vit" if backbone.is_vit else "resnet"
    source = Path(args.seg_config) if args.seg_config else CONFIG_DIR / PRESETS[args.preset][family]
    if not source.is_file():
        raise FileNotFoundError(f"--seg-config {source} is not a file")
    cfg = Config.fromfile(str(source))
    data = cfg.train_dataloader.dataset
    counts = check_layout(ctx.data_root, data.get("img_suffix", ".jpg"), data.get("seg_map_suffix", ".png"))
    if args.classes:
        classes = parse_list(args.classes, str, "--classes")
    else:
        classes = list(ade_sample.CLASSES if ctx.is_sample else mmseg_models.ADE20K_CLASSES)
    own_classes = data.type == "ADE20KDataset" and classes == list(mmseg_models.ADE20K_CLASSES)
    resolve_defaults(args, config_defaults(cfg))
    for flag in ("iters", "batch_size", "crop_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    per_process_batch(args.batch_size, world_size)  # a one-line error before anything is written
    apply_overrides(cfg, data_root=ctx.data_root.resolve(), classes=None if own_classes else classes, iters=args.iters,
                    batch_size=args.batch_size, lr=args.lr, crop_size=args.crop_size, num_workers=args.num_workers)
    cfg.model = mmseg_models.segmentor_config(cfg.model, backbone, len(classes), (args.crop_size, args.crop_size))
    cfg.work_dir = str((ctx.output_dir / "mmseg").resolve())
    return cfg, source, counts


def run(ctx: TaskContext, args: argparse.Namespace) -> dict:
    resolve_defaults(args, SPEC.defaults, None, SPEC.sample if ctx.is_sample else None)
    try:
        import transfer.ade20k.models as mmseg_models
        from transfer.ade20k.resume import run_identity
        from transfer.ade20k.train import train_and_validate
    except ImportError as e:
        raise ValueError(f"{SEG_EXTRA}; import failed: {e}") from None
    info = get_dist_info()
    backbone = ctx.load_backbone()
    mmseg_models.check_supported(backbone)  # before any data is read
    cfg, source, counts = build_config(ctx, args, backbone, mmseg_models, info.world_size)
    resolved = ctx.output_dir / "ade20k_config.py"
    if info.is_main:
        cfg.dump(str(resolved))
        logger.info("%s on %d training / %d validation images, %d classes, %d iterations of %d x %dx%d crops "
                    "(%d per process); config %s", backbone.arch, counts["training"], counts["validation"],
                    cfg.model.decode_head.num_classes, args.iters, args.batch_size, args.crop_size, args.crop_size,
                    args.batch_size // info.world_size, resolved)

    seed_everything(args.seed)  # the heads' initialisation: the same on every rank and in every rerun
    model = mmseg_models.build_segmentor(cfg.model, backbone)
    run_id = run_identity(cfg.to_dict(), ctx.model_id(), args.seed)
    outcome = train_and_validate(cfg, model, device=ctx.device, info=info, seed=args.seed, run_id=run_id,
                                 experiment_name=f"ade20k-{uuid.uuid4().hex[:8]}")
    metrics = {k: round(float(outcome["summary"][k]), 2) for k in ("mIoU", "mAcc", "aAcc")}  # mmseg rounds to 0.01
    if info.is_main:
        logger.info("ADE20K: mIoU %.2f, mAcc %.2f, aAcc %.2f (percent)", metrics["mIoU"], metrics["mAcc"],
                    metrics["aAcc"])
    return {"metrics": metrics, "metrics_scale": "percent (0-100), as mmseg's IoUMetric reports",
            "per_class": outcome["per_class"], "classes": list(outcome["per_class"]), "iterations": args.iters,
            "batch_per_process": args.batch_size // info.world_size, "resumed_from": outcome["resumed_from"],
            "resumed_iteration": outcome["resumed_iteration"], "num_images": counts, "config_file": str(resolved),
            "config_source": str(source), "mmseg_log_dir": outcome["log_dir"],
            "backbone_family": "vit" if backbone.is_vit else "resnet"}


def workload(args: argparse.Namespace, arch: str, world: int) -> Workload:
    """The preset's config (mmengine reads it), with the flags on top: UperNet's batch, iterations and crops."""
    try:
        from mmengine.config import Config
    except ImportError:
        raise ValueError(f"the plan check reads the ADE20K config with mmengine: {SEG_EXTRA}") from None
    family = "vit" if "vit" in arch else "resnet"
    cfg = Config.fromfile(str(Path(args.seg_config) if args.seg_config else
                              CONFIG_DIR / PRESETS[args.preset or SPEC.defaults["preset"]][family]))
    resolve_defaults(args, config_defaults(cfg))  # in place, as the other tasks' workloads do
    batch, iters, crop = args.batch_size, args.iters, args.crop_size
    if batch % world:
        raise ValueError(f"--batch-size {batch} is not a multiple of the {world} processes")
    amp = "fp16" if cfg.optim_wrapper.get("type") == "AmpOptimWrapper" else "none"
    return Workload(arch, ((1, crop, crop),), batch // world, 1, batch, images=iters * batch, eval_images=ADE20K_VAL,
                    trains=True, optimizer=cfg.optim_wrapper.optimizer.type.lower(), precision=amp, resumable=True,
                    memory_fixes=("more GPUs",), note="the backbone only: UperNet's neck and heads add memory and "
                    "FLOPs not counted here")


SPEC = TaskSpec(name="ade20k", help=HELP, headline="mIoU", add_arguments=add_arguments,
                builtin_sample=builtin_sample, run=run, workload=workload,
                distributed=True,  # torchrun / srun: mmengine's DDP over the global --batch-size, sharded validation
                defaults={"preset": "160k"}, sample={"preset": "cpu_sample"}, suite_dataset="ade20k")
