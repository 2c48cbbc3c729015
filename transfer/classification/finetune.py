"""End-to-end fine-tuning: the MAE/BEiT recipe with timm's parts.

Layer-wise lr decay follows MAE/BEiT for ViTs (patch embedding, [CLS] and positions: layer 0; block i: layer
i + 1; the final norm and the head: layer depth + 1; scale ``decay ** (depth + 1 - layer)``) and timm's
``param_groups_layer_decay`` (its ``group_matcher`` stages) for CNNs. No weight decay on biases, norms, [CLS]
and position embeddings. Per-step linear warm-up then cosine to ``min_lr``, each group at ``lr * lr_scale``.
"""
from __future__ import annotations

import json
import logging
import math
import re
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image, ImageOps
from timm.data import Mixup, create_transform
from timm.data.auto_augment import posterize as timm_posterize
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets import ImageFolder
from tqdm import tqdm

from bam import training
from bam.backbones import Backbone, build_backbone
from bam.checkpoint import latest_path, load_file, remove_stale_temporaries, save_atomic
from bam.distributed import barrier, get_dist_info, sum_over_ranks
from bam.images import MEAN, STD, labelled_folder

logger = logging.getLogger(__name__)
_VIT_STEM = re.compile(r"^(cls_token|reg_token|dist_token|pos_embed|patch_embed)")
_VIT_BLOCK = re.compile(r"^blocks\.(\d+)\.")


class Classifier(nn.Module):
    """A backbone and a linear head on its [CLS] token (``pool="cls"``) or, for ViTs, on MAE's ``global_pool``
    (``pool="avg"``): the mean of the patch tokens as the last block leaves them, through a new ``fc_norm``. As
    in MAE's models_vit.py, the backbone's final norm is removed then (its pretrained weights go unused) and
    the prefix tokens are left out of the mean. The head starts at N(0, 2e-5) with zero bias, as in MAE."""

    def __init__(self, backbone: Backbone, num_classes: int, pool: str = "cls"):
        super().__init__()
        if pool not in ("cls", "avg"):
            raise ValueError(f"pool {pool!r} must be cls or avg")
        self.backbone, self.pool = backbone, pool
        self.global_pool = pool == "avg" and backbone.is_vit
        if self.global_pool:
            backbone.model.norm = nn.Identity()  # MAE: ``del self.norm`` with global_pool
        self.fc_norm = nn.LayerNorm(backbone.embed_dim, eps=1e-6) if self.global_pool else nn.Identity()
        self.head = nn.Linear(backbone.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.backbone.forward_features(x)
        feat = self.fc_norm(out["patch"].mean(dim=1)) if self.global_pool else out["cls"]
        return self.head(feat)


def vit_layer_id(name: str, depth: int) -> int:
    """MAE's ``get_layer_id_for_vit`` on a timm ViT parameter name."""
    if _VIT_STEM.match(name):
        return 0
    m = _VIT_BLOCK.match(name)
    return int(m.group(1)) + 1 if m else depth + 1


_NO_DECAY_TOKENS = {"cls_token", "reg_token", "dist_token", "pos_embed"}


def _no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim <= 1 or name in _NO_DECAY_TOKENS


def layer_decay_groups(model: nn.Module, backbone: Backbone, weight_decay: float, layer_decay: float) -> list[dict]:
    """Parameter groups ``{"params", "names", "weight_decay", "lr_scale"}`` for ``model``, which contains ``backbone``.

    The backbone's parameters get layer-wise scales; every other trainable parameter of ``model`` (heads, necks)
    gets 1. Frozen parameters (e.g. the fixed sin-cos positions of MoCo-v3-style ViTs) are left out.
    """
    timm_model = backbone.model
    in_backbone = {id(p) for p in timm_model.parameters()}
    full_names = {id(p): n for n, p in model.named_parameters()}
    groups: dict[tuple[float, float], dict] = {}

    def add(param: torch.Tensor, scale: float, no_decay: bool) -> None:
        wd = 0.0 if no_decay else weight_decay
        group = groups.setdefault((scale, wd), {"params": [], "names": [], "weight_decay": wd, "lr_scale": scale})
        group["params"].append(param)
        group["names"].append(full_names[id(param)])

    if backbone.is_vit:
        depth = len(timm_model.blocks)
        for name, param in timm_model.named_parameters():
            if param.requires_grad:
                add(param, layer_decay ** (depth + 1 - vit_layer_id(name, depth)), _no_decay(name, param))
    else:
        for g in param_groups_layer_decay(timm_model, weight_decay=weight_decay, layer_decay=layer_decay):
            for param in g["params"]:
                if param.requires_grad:
                    add(param, g["lr_scale"], g["weight_decay"] == 0.0)
    for name, param in model.named_parameters():
        if id(param) not in in_backbone and param.requires_grad:
            add(param, 1.0, _no_decay(name, param))
    return sorted(groups.values(), key=lambda g: (g["lr_scale"], g["weight_decay"]))


def lr_at(step: float, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """MAE's ``adjust_learning_rate`` per step: linear warm-up from 0, then half-cycle cosine to ``min_lr``."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_group_lrs(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def with_drop_path(backbone: Backbone, rate: float) -> Backbone:
    """The same weights in a backbone rebuilt with stochastic depth ``rate`` (timm's ``drop_path_rate``)."""
    if rate <= 0:
        return backbone
    rebuilt = build_backbone(backbone.arch, **{**backbone.arch_kwargs, "drop_path_rate": rate})
    rebuilt.model.load_state_dict(backbone.model.state_dict())
    rebuilt.checkpoint_format = backbone.checkpoint_format
    return rebuilt


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, with 0 bits kept giving a black image as TensorFlow's and Pillow < 13's did (Pillow 13
    raises for 0, which timm 1.0's increasing-posterize level reaches at magnitude 10)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def train_transform(args):
    """timm's training transform: random resized crop (bicubic), flip, RandAugment, normalise, random erasing."""
    aa = None if str(args.auto_augment).lower() in ("none", "", "off") else args.auto_augment
    transform = create_transform(args.image_size, is_training=True, color_jitter=None, auto_augment=aa,
                                 interpolation="bicubic", re_prob=args.reprob, re_mode="pixel", re_count=1,
                                 mean=MEAN, std=STD)
    for t in transform.transforms:
        for op in getattr(t, "ops", []):
            if getattr(op, "aug_fn", None) is timm_posterize:
                op.aug_fn = _posterize
    return transform


def train_dataset(root: Path, args) -> ImageFolder:
    transform = train_transform(args)
    return labelled_folder(root, transform)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int, workers: int,
             dtype: torch.dtype | None = None) -> dict[str, float]:
    """Top-1 / top-5 (percent) on ``dataset``, the forward under the training's autocast ``dtype`` as MAE's
    (engine_finetune.py's evaluate). Under a process group each rank scores every ``world``-th image and the counts
    are summed: every rank returns the whole set's figures."""
    info = get_dist_info()
    shard = Subset(dataset, range(info.rank, len(dataset), info.world_size)) if info.world_size > 1 else dataset
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64)  # top-1 hits, top-5 hits, images
    for images, labels in DataLoader(shard, batch_size=batch_size, num_workers=workers):
        with training.autocast(device, dtype):
            logits = model(images.to(device)).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu() == labels[:, None]
        counts += torch.tensor([top[:, 0].sum().item(), top.any(dim=1).sum().item(), len(labels)], dtype=torch.float64)
    hits1, hits5, n = sum_over_ranks(counts).tolist()
    return {"top1": 100.0 * hits1 / n, "top5": 100.0 * hits5 / n}


def finetune(backbone: Backbone, train_set: Dataset, val_set: Dataset, num_classes: int, args,
             device: torch.device, output_dir: Path, run_id: dict) -> dict:
    """Fine-tune ``backbone`` with a new head on ``train_set``; evaluate on ``val_set`` every epoch.

    ``args.batch_size`` is the global batch of one optimizer step, whatever makes it: under a process group of
    ``world`` ranks (DistributedDataParallel) each step is ``world`` x ``args.accum_iter`` micro-batches. Every
    image's augmentation, and every micro-batch's Mixup/CutMix and drop path, is seeded from its place in the epoch
    (:class:`bam.training.SeededSamples`, :class:`bam.training.GlobalBatches`), so 8 x 128 and 1 x 64 x 16 train on
    the same views and differ only by float rounding.

    ``run_id`` (the weights' identity and the recipe) guards resuming: ``output_dir/checkpoint.pth`` is resumed
    only when it was written by the same run; otherwise the run starts over. The checkpoint is written after every
    epoch and, at a preemption signal (:class:`bam.training.SaveNow`), after the optimizer step under way; a
    resumed run goes on from the next step and ends with the weights of an uninterrupted one.
    """
    info = get_dist_info()
    training.seed_everything(args.seed)  # the head's initialisation
    batch = args.batch_size
    mixing = args.mixup > 0 or args.cutmix > 0
    if len(train_set) < batch:
        batch = max(2, len(train_set) - len(train_set) % 2) if mixing else len(train_set)
        logger.warning("only %d training images: batch size %d instead of %d", len(train_set), batch, args.batch_size)
    accum, world = args.accum_iter, info.world_size
    if batch % (world * accum):
        raise ValueError(f"--batch-size {batch} must be a multiple of {world} process(es) x --accum-iter {accum} "
                         f"(the global batch of one optimizer step, made of {world * accum} micro-batches)")
    micro = batch // (world * accum)
    if mixing and micro % 2:
        raise ValueError(f"--batch-size {batch} / ({world} process(es) x --accum-iter {accum}) = {micro} images must "
                         "be even with Mixup/CutMix (timm pairs images)")
    model = Classifier(with_drop_path(backbone, args.drop_path), num_classes, args.pool).to(device)
    lr = args.blr * batch / 256.0
    optimizer = torch.optim.AdamW(layer_decay_groups(model, model.backbone, args.weight_decay, args.layer_decay), lr=lr,
                                  betas=(0.9, 0.999))
    dtype = training.amp_dtype(args.amp, device)
    scaler = training.grad_scaler(device, dtype)
    mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                  num_classes=num_classes) if mixing else None
    criterion = SoftTargetCrossEntropy() if mixing else \
        LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing > 0 else nn.CrossEntropyLoss()
    run_key = json.loads(json.dumps(run_id, default=str))

    ckpt_path, start_epoch, first_step, running, history = latest_path(output_dir), 0, 0, 0.0, []
    if info.is_main:
        remove_stale_temporaries(output_dir)
    if ckpt_path.is_file():
        state = load_file(ckpt_path)
        if state.get("run_id") == run_key:
            training.restore_training_state(state, model, optimizer, scaler)
            start_epoch, history = state["epoch"] + 1, state["history"]
            first_step, running = state.get("iteration", 0), state.get("running_loss", 0.0)
            where = f", {first_step} steps into epoch {start_epoch + 1}" if first_step else ""
            logger.info("resuming fine-tuning from %s (epoch %d done%s)", ckpt_path, start_epoch, where)
        else:
            logger.warning("%s belongs to another run (other weights or recipe): starting over", ckpt_path)
    ddp = model if world == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)

    steps_per_epoch = len(train_set) // batch
    total, warmup = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)

    def save(epoch_done: int, **position) -> None:
        if info.is_main:
            save_atomic(training.training_state(model, optimizer, scaler, epoch=epoch_done, history=history,
                                                run_id=run_key, arch=backbone.arch, num_classes=num_classes,
                                                pool=args.pool, **position), ckpt_path)
        barrier()

    with training.SaveNow() as save_now:
        for epoch in range(start_epoch, args.epochs):
            model.train()
            first = first_step if epoch == start_epoch else 0
            running = running if epoch == start_epoch else 0.0
            sampler = training.GlobalBatches(len(train_set), batch, args.seed * 1009 + epoch, info.rank, world,
                                             accum, first)
            loader = DataLoader(training.SeededSamples(train_set, training.derived_seed(args.seed, epoch)),
                                batch_sampler=sampler, num_workers=args.num_workers,
                                worker_init_fn=training.keep_signals_for_the_main_process,
                                pin_memory=device.type == "cuda", persistent_workers=False)
            bar = tqdm(total=len(sampler), desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
                       disable=not info.is_main)
            for i, (images, labels) in enumerate(loader):
                step, j = first + i // accum, i % accum
                last_micro = j == accum - 1
                if j == 0:
                    set_group_lrs(optimizer, lr_at(epoch * steps_per_epoch + step, total, warmup, lr, args.min_lr))
                # Mixup/CutMix and drop path draw from the generators: seeded by the micro-batch's place in the epoch
                training.seed_everything(training.derived_seed(args.seed, epoch, sampler.micro_index(step, j)))
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                if mixup is not None:
                    images, labels = mixup(images, labels)
                with nullcontext() if last_micro or world == 1 else ddp.no_sync():
                    with training.autocast(device, dtype):
                        loss = criterion(ddp(images).float(), labels)
                    mean_loss = sum_over_ranks(loss.detach()) / world  # a NaN on any rank stops every rank
                    last_good = ckpt_path if ckpt_path.is_file() else "none yet"
                    running += training.finite_loss(mean_loss, f"epoch {epoch}, step {step}", last_good,
                                                    "lower --blr") / accum
                    training.optimizer_step(loss / accum if accum > 1 else loss, optimizer, scaler, args.clip_grad,
                                            model.parameters(), accumulate=not last_micro)
                bar.update()
                if last_micro and step + 1 < steps_per_epoch and save_now.due():
                    save(epoch - 1, iteration=step + 1, running_loss=running)
                    logger.info("saved %s at step %d of epoch %d (signal)", ckpt_path, step + 1, epoch + 1)
                    save_now.release()
            bar.close()
            val = evaluate(model, val_set, device, micro, args.num_workers, dtype)
            history.append({"epoch": epoch, "train_loss": running / max(steps_per_epoch, 1),
                            **{f"val_{k}": v for k, v in val.items()}, "lr": optimizer.param_groups[-1]["lr"]})
            logger.info("epoch %d/%d: train loss %.4f, val top-1 %.2f%%", epoch + 1, args.epochs,
                        history[-1]["train_loss"], val["top1"])
            save(epoch)
            if save_now.due():  # a signal during the epoch's end: its checkpoint is on disk
                save_now.release()
    if not history:
        raise ValueError(f"--epochs {args.epochs}: nothing to train")
    if info.is_main:
        with open(output_dir / "log.jsonl", "w") as f:
            f.writelines(json.dumps(h) + "\n" for h in history)
    last = history[-1]
    return {"top1": last["val_top1"], "top5": last["val_top5"], "history": history, "batch_size": batch,
            "accum_iter": accum, "world_size": world, "lr": lr, "steps": total}
