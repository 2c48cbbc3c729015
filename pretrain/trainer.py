"""Set up a pretraining run from its arguments and run it epoch by epoch (checkpoints, resume, k-NN, results)."""
from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader, Subset

from bam.backbones import ARCHS, build_backbone
from bam.checkpoint import (
    FORMAT_TAG,
    FORMAT_VERSION,
    epoch_path,
    latest_path,
    load_file,
    remove_stale_temporaries,
    save_atomic,
    state_dict_sha256,
)
from bam.cli import resolve_device
from bam.distributed import DistInfo, all_gather_rows, get_dist_info, init_distributed, is_dist
from bam.ema import make_teacher
from bam.images import EvalImageFolder, check_image_folder
from bam.loss import BAMLoss
from bam.projector import Projector
from bam.results import versions, write_results
from bam.samples.cache import default_cache_dir
from bam.samples.photos import photos_sample
from bam.schedules import cosine_schedule, linear_warmup_constant
from bam.training import (
    SaveNow,
    amp_dtype,
    grad_scaler,
    keep_signals_for_the_main_process,
    restore_training_state,
    seed_everything,
    training_state,
)
from pretrain.contrastive_crop import boxes_from_attention, cls_attention
from pretrain.data import EpochSampler, MultiCropAugmentation, SeededAugmentedFolder
from pretrain.engine import Schedules, train_one_epoch
from pretrain.knn_monitor import fraction_subset, online_knn
from pretrain.model import BAMModel, build_optimizer
from pretrain.monitor import Monitor

logger = logging.getLogger("pretrain")


def prepare_output_dir(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"  # one per process: ranks share the folder
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"cannot write to --output-dir {out} ({e.strerror}); choose a writable folder") from None
    return out


# flags a resumed run may change: they do not change what is trained (--epochs extends the schedule)
RESUMABLE_CHANGES = {"epochs", "stop_after_epochs", "output_dir", "cache_dir", "device", "num_workers", "log_freq",
                     "tensorboard", "wandb", "knn_freq", "knn_train", "knn_val", "knn_train_fraction", "saveckp_freq",
                     "compile", "deterministic", "debug", "force_recipe_change"}


def describe_changes(changed: dict[str, tuple]) -> str:
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())


def check_resume(path: Path, args: argparse.Namespace) -> tuple[dict, dict[str, tuple]]:
    """The checkpoint to resume from and the recipe keys the new command line changes (only flags of
    :data:`RESUMABLE_CHANGES`, unless --force-recipe-change); one-line errors otherwise."""
    ckpt = load_file(path)
    missing = [k for k in ("model", "optimizer", "scaler", "epoch", "config", "rng") if k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a pretraining checkpoint (no {', '.join(missing)}: a backbone-only file?); "
                         "resume needs the checkpoint.pth a run writes, or use another --output-dir to start over")
    old, new = ckpt["config"], vars(args)
    changed = {k: (old.get(k, "<absent>"), new.get(k, "<absent>")) for k in sorted(set(old) | set(new))
               if k not in RESUMABLE_CHANGES and old.get(k, "<absent>") != new.get(k, "<absent>")}
    if changed and not args.force_recipe_change:
        raise ValueError(f"{path} was trained with another recipe ({describe_changes(changed)}); resuming would "
                         "train it under the new values: use another --output-dir, or --force-recipe-change to "
                         "resume anyway")
    return ckpt, changed


def resolve_data(args: argparse.Namespace) -> tuple[Path, Path | None, Path | None, bool]:
    """(pretraining root, k-NN bank root, k-NN query root, is the built-in sample)."""
    if args.data:
        root = check_image_folder(args.data)
        knn_train = check_image_folder(args.knn_train, "--knn-train") if args.knn_train else None
        knn_val = check_image_folder(args.knn_val, "--knn-val") if args.knn_val else None
        return root, knn_train, knn_val, False
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    sample = photos_sample(cache)
    logger.info("no --data: pretraining on the built-in sample %s (crops of scikit-image photographs, not ImageNet)",
                sample)
    return sample / "train", Path(args.knn_train or sample / "train"), Path(args.knn_val or sample / "val"), True


def validate(args: argparse.Namespace) -> None:
    if args.arch not in ARCHS:
        raise ValueError(f"--arch {args.arch} is unknown; known: {', '.join(sorted(ARCHS))}")
    if args.batch_size_per_gpu < 2:
        raise ValueError(f"--batch-size-per-gpu {args.batch_size_per_gpu} is too small: BAM compares every image "
                         "with the other images of the batch; use at least 2")
    if not 1 <= args.n_target_crops <= 2 + args.n_local:
        raise ValueError(f"--n-target-crops {args.n_target_crops} must be between 1 and the {2 + args.n_local} crops")


def make_schedules(args: argparse.Namespace, steps: int, global_batch: int) -> Schedules:
    peak = args.lr * global_batch / 256
    if args.min_lr > peak:
        logger.warning("--min-lr %g is above the peak lr %g of a global batch of %d: the cosine schedule rises after "
                       "the warm-up (the official recipes' 1e-3 assumes a global batch of 4096)", args.min_lr, peak,
                       global_batch)
    return Schedules(
        lr=cosine_schedule(peak, args.min_lr, args.epochs, steps, args.warmup_epochs),
        wd=cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs, steps),
        momentum=cosine_schedule(args.teacher_momentum, 1.0, args.epochs, steps),
        reg=linear_warmup_constant(args.reg if args.reg_start is None else args.reg_start, args.reg, args.epochs,
                                   steps, args.reg_warmup_epochs))


@torch.no_grad()
def update_boxes(backbone, root: Path, size: int, threshold: float, device, batch_size: int, workers: int
                 ) -> torch.Tensor:
    """ContrastiveCrop boxes of every training image, sharded over ranks, in dataset order."""
    info = get_dist_info()
    dataset = EvalImageFolder(root, size)
    order = torch.arange(info.rank, len(dataset), info.world_size)
    loader = DataLoader(Subset(dataset, order.tolist()), batch_size=batch_size, num_workers=workers)
    boxes = [boxes_from_attention(cls_attention(backbone, x.to(device)), (size, size), threshold) for x, _ in loader]
    boxes = all_gather_rows(torch.cat(boxes).to(device)).cpu()
    index = all_gather_rows(order.to(device)).cpu()
    out = torch.empty(len(dataset), 4)
    out[index] = boxes
    return out


@dataclass
class Run:
    """What a pretraining run holds from build to finish."""
    args: argparse.Namespace
    info: DistInfo
    device: torch.device
    out: Path
    latest: Path
    root: Path
    is_sample: bool
    student: BAMModel
    teacher: BAMModel | None
    model: torch.nn.Module                  # the student as trained: DDP-wrapped and/or compiled
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    loss_fn: BAMLoss
    boxes: torch.Tensor                     # ContrastiveCrop's, shared with the DataLoader workers
    sampler: EpochSampler
    loader: DataLoader
    steps: int                              # optimisation steps per epoch
    schedules: Schedules
    knn_sets: tuple | None
    monitor: Monitor | None = None          # opened by resume, once config.yaml is written
    start_epoch: int = 0
    start_iteration: int = 0                # batches of start_epoch already trained (a save at a signal)
    history: dict = field(default_factory=dict)

    def knn(self, tag: str) -> float | None:
        if self.knn_sets is None:
            return None
        backbone = (self.teacher or self.student).backbone
        res = online_knn(backbone, *self.knn_sets, self.device, self.args.batch_size_per_gpu, self.args.num_workers)
        logger.info("k-NN (k=20, T=0.07) %s: top-1 %.2f%%, top-5 %.2f%%", tag, res["top1"], res["top5"])
        return res["top1"]

    def state(self, epoch: int, iteration: int = 0) -> dict:
        """The checkpoint after ``iteration`` batches of ``epoch`` (0: after ``epoch`` whole epochs); every rank
        calls it (the random generators of all ranks are gathered)."""
        student, args = self.student, self.args
        state = training_state(student, self.optimizer, self.scaler, format=FORMAT_TAG,
                               format_version=FORMAT_VERSION, arch=args.arch, arch_kwargs=dict(args.arch_kwargs),
                               backbone=student.backbone.model.state_dict(), epoch=epoch, iteration=iteration,
                               step=epoch * self.steps + iteration, config=vars(args), boxes=self.boxes.clone(),
                               knn=self.history)
        if self.teacher is not None:
            state.update(teacher=self.teacher.state_dict(),
                         teacher_backbone=self.teacher.backbone.model.state_dict())
        if is_dist():
            gathered = [None] * self.info.world_size
            torch.distributed.all_gather_object(gathered, state["rng"])
            state["rng"] = gathered
        return state

    def save(self, state: dict) -> None:
        if self.info.is_main:
            save_atomic(state, self.latest)


def build(args: argparse.Namespace) -> Run:
    """Validate the flags and the data, then build model, data, optimizer and schedules (nothing is written but the
    output folder: config.yaml and the log wait for ``resume``)."""
    validate(args)
    info = init_distributed(args.device)
    if not info.is_main:  # rank 0 talks; the others only warn
        logging.getLogger().setLevel(logging.WARNING)
    device = resolve_device(args.device, info.local_rank)
    dtype = amp_dtype(args.amp, device)  # fp16 needs CUDA: refused before anything is written
    if args.data and Path(args.output_dir).resolve().is_relative_to(Path(args.data).resolve()):
        raise ValueError(f"--output-dir {args.output_dir} is inside --data {args.data}: its checkpoints would be "
                         "read as training images; write elsewhere")
    out = prepare_output_dir(args.output_dir)
    root, knn_train_root, knn_val_root, is_sample = resolve_data(args)
    latest = latest_path(out)
    if info.is_main:
        remove_stale_temporaries(out)
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)  # the same initial weights on every rank (the teacher is copied before DDP syncs)

    backbone = build_backbone(args.arch, drop_path_rate=args.drop_path_rate, **args.arch_kwargs)
    if args.grad_checkpointing:
        backbone.model.set_grad_checkpointing(True)
    projector = Projector(backbone.embed_dim, args.proj_hidden_dim, args.proj_out_dim, args.proj_layers,
                          args.proj_norm, args.proj_act, args.proj_last_norm)
    student = BAMModel(backbone, projector).to(device)
    if is_dist() and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in student.modules()):
        student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
    teacher = make_teacher(student) if args.teacher else None
    model = torch.nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda"
                                                      else None) if is_dist() else student
    if args.compile:
        model = torch.compile(model)
    seed_everything(args.seed + info.rank)  # from here on ranks draw different randomness (drop path)
    if args.ccrop_alpha and not backbone.is_vit:
        raise ValueError(f"ContrastiveCrop (--ccrop-alpha) needs a ViT's attention; {args.arch} has none")

    augment = MultiCropAugmentation(args.global_size, args.local_size, args.global_scale, args.local_scale,
                                    args.n_local, args.ccrop_alpha)
    dataset = SeededAugmentedFolder(root, augment, args.seed)
    # shared memory: the DataLoader's persistent workers see box updates made here
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(len(dataset), 1).share_memory_()
    dataset.boxes = boxes if args.ccrop_alpha else None
    global_batch = args.batch_size_per_gpu * info.world_size
    if len(dataset) < global_batch:
        raise ValueError(f"--data {root} has {len(dataset)} images, fewer than one global batch of {global_batch}; "
                         "lower --batch-size-per-gpu")
    sampler = EpochSampler(dataset, info.rank, info.world_size, args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size_per_gpu, sampler=sampler, num_workers=args.num_workers,
                        worker_init_fn=keep_signals_for_the_main_process,
                        pin_memory=device.type == "cuda", persistent_workers=args.num_workers > 0, drop_last=True)
    steps = len(loader)
    loss_fn = BAMLoss(2 + args.n_local, 2, args.n_target_crops, args.reg, args.temperature, args.sinkhorn_iters,
                      args.top_k, args.positive_masking)
    knn_sets = None
    if knn_train_root and knn_val_root:
        knn_sets = (fraction_subset(EvalImageFolder(knn_train_root, args.global_size), args.knn_train_fraction,
                                    args.seed), EvalImageFolder(knn_val_root, args.global_size))
    return Run(args, info, device, out, latest, root, is_sample, student, teacher, model,
               build_optimizer(args.optimizer, student), grad_scaler(device, dtype), dtype, loss_fn, boxes, sampler,
               loader, steps, make_schedules(args, steps, global_batch), knn_sets)


def resume(run: Run) -> None:
    """Continue from ``<output-dir>/checkpoint.pth`` when it is there (the same command is the resume), else start
    with the k-NN of the initial weights; then open the log."""
    args = run.args
    resumed, recipe_changes = check_resume(run.latest, args) if run.latest.is_file() else (None, {})
    if recipe_changes:
        logger.warning("--force-recipe-change: resuming %s under a changed recipe: %s", run.latest,
                       describe_changes(recipe_changes))
    if run.info.is_main:  # written only once the resume is known to be consistent
        (run.out / "config.yaml").write_text(yaml.safe_dump(vars(args), sort_keys=True))
    run.monitor = Monitor(run.out, run.info.is_main, args.tensorboard, args.wandb, vars(args))
    if resumed is None:
        if run.knn_sets is not None:
            run.history["before"] = run.knn("before training (random init)")
        return
    ckpt = resumed
    if isinstance(ckpt["rng"], list):
        ckpt["rng"] = ckpt["rng"][run.info.rank]
    restore_training_state(ckpt, run.student, run.optimizer, run.scaler)
    if run.teacher is not None:
        run.teacher.load_state_dict(ckpt["teacher"])
    run.boxes.copy_(ckpt["boxes"])
    run.start_epoch, run.start_iteration = ckpt["epoch"], ckpt.get("iteration", 0)
    run.history = dict(ckpt.get("knn", {}))
    where = f" and {run.start_iteration} of {run.steps} steps of the next" if run.start_iteration else ""
    logger.info("resuming from %s: %d of %d epochs done%s", run.latest, run.start_epoch, args.epochs, where)
    if recipe_changes:
        run.monitor.log(run.start_epoch * run.steps, {"recipe_change": {k: list(v) for k, v in recipe_changes.items()}},
                        kind="recipe_change")


def fit(run: Run) -> int:
    """Train epoch by epoch from where ``resume`` left off, saving after each epoch and at a preemption signal
    (then the signal ends or requeues the process). Returns the number of epochs done (--stop-after-epochs may
    leave before --epochs)."""
    args = run.args
    stop = min(args.epochs, run.start_epoch + args.stop_after_epochs) if args.stop_after_epochs else args.epochs
    with SaveNow() as save_now:
        for epoch in range(run.start_epoch, stop):
            first = run.start_iteration if epoch == run.start_epoch else 0
            run.sampler.set_epoch(epoch, skip_batches=first, batch_size=args.batch_size_per_gpu)
            warm = int(args.warmup_epochs)
            if args.ccrop_alpha and not first and epoch >= warm and (epoch - warm) % args.loc_interval == 0:
                run.boxes.copy_(update_boxes((run.teacher or run.student).backbone, run.root, args.global_size,
                                             args.box_thresh, run.device, args.batch_size_per_gpu, args.num_workers))

            def on_step(iteration: int, epoch: int = epoch) -> None:  # after `iteration` batches of the epoch
                if iteration < run.steps and save_now.due():
                    run.save(run.state(epoch, iteration))
                    save_now.release()

            stats = train_one_epoch(run.model, run.teacher, run.loss_fn, run.loader, run.optimizer, run.scaler,
                                    run.schedules, epoch, run.device, run.amp_dtype, args.clip_grad, run.monitor,
                                    args.log_freq, run.info.is_main,
                                    str(run.latest) if run.latest.is_file() else "none yet", run.steps, first,
                                    on_step)
            if args.knn_freq and (epoch + 1) % args.knn_freq == 0 and epoch + 1 < args.epochs:
                run.history[f"epoch{epoch + 1}"] = run.knn(f"after epoch {epoch + 1}")
            state = run.state(epoch + 1)
            run.save(state)
            if run.info.is_main and args.saveckp_freq and (epoch + 1) % args.saveckp_freq == 0:
                save_atomic(state, epoch_path(run.out, epoch + 1))
            run.monitor.log((epoch + 1) * run.steps, {"epoch": epoch + 1, **stats}, kind="epoch")
            logger.info("epoch %d/%d: loss %.4f, %.1f images/s", epoch + 1, args.epochs, stats["loss"],
                        stats["images_per_s"])
            if save_now.due():  # a signal during the epoch's end: its checkpoint is on disk
                save_now.release()
    return stop


def finish(run: Run, start: float) -> dict:
    """The k-NN after training, the ranks' agreement and results.json."""
    args = run.args
    if run.knn_sets is not None and "after" not in run.history:
        run.history["after"] = run.knn("after training")
    run.monitor.close()
    digests = [state_dict_sha256(run.student.state_dict())]
    if is_dist():  # every rank must end with the same weights; a desynchronised DDP run is reported, not hidden
        mine, digests = digests[0], [None] * run.info.world_size
        torch.distributed.all_gather_object(digests, mine)
    results = {"task": "pretrain", "checkpoint": str(run.latest.resolve()), "epochs": args.epochs,
               "world_size": run.info.world_size, "weights_sha256": digests[0], "ranks_agree": len(set(digests)) == 1,
               "knn_top1_before": run.history.get("before"), "knn_top1_after": run.history.get("after"),
               "knn": run.history, "data": {"root": str(run.root.resolve()), "builtin_sample": run.is_sample},
               "config": vars(args), "versions": versions(), "seconds": round(time.time() - start, 1)}
    if run.is_sample:
        results["note"] = ("built-in sample (crops of scikit-image photographs): shows that training learns; "
                           "not ImageNet")
    if run.info.is_main:
        write_results(run.out, results)
        logger.info("wrote %s; final checkpoint %s", run.out / "results.json", run.latest)
    return results


def train(args: argparse.Namespace) -> dict:
    """build / resume / fit / finish: the same command starts a run or continues it from its checkpoint."""
    start = time.time()
    run = build(args)
    resume(run)
    done = fit(run)
    if done < args.epochs:
        logger.info("stopping after epoch %d of %d as asked; run the same command again to continue", done,
                    args.epochs)
        run.monitor.close()
        return {"task": "pretrain", "checkpoint": str(run.latest.resolve()), "epochs_done": done}
    return finish(run, start)
