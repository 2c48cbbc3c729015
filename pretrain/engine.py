"""One epoch of BAM pretraining."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from bam.distributed import get_dist_info, mean_over_ranks
from bam.ema import ema_update_
from bam.loss import BAMLoss
from bam.training import autocast, finite_loss, optimizer_step
from pretrain.model import set_lr_wd
from pretrain.monitor import Monitor


@dataclass
class Schedules:
    """One value per optimisation step."""
    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    reg: np.ndarray


def train_one_epoch(model, teacher, loss_fn: BAMLoss, loader, optimizer, scaler, schedules: Schedules, epoch: int,
                    device: torch.device, amp_dtype: torch.dtype | None, clip_grad: float, monitor: Monitor,
                    log_freq: int, show_progress: bool, last_good: str, steps: int | None = None, first: int = 0,
                    on_step: Callable[[int], None] | None = None) -> dict[str, float]:
    """Train ``epoch`` (``steps`` batches, default the loader's) from batch ``first`` on, the loader yielding the rest
    of the epoch; ``on_step(n)`` runs after the epoch's n-th batch (the trainer's save at a signal). Returns the
    means over the batches trained here."""
    model.train()
    student = model.module if hasattr(model, "module") else model
    steps = len(loader) if steps is None else steps
    world = get_dist_info().world_size
    totals = {"loss": 0.0, "data_time": 0.0, "images_per_s": 0.0}
    # in a log file (SLURM), a bar line every 30 s instead of every step
    bar = tqdm(total=steps, initial=first, desc=f"epoch {epoch}", disable=not show_progress, dynamic_ncols=True,
               leave=False, mininterval=0.5 if sys.stderr.isatty() else 30)
    end = time.perf_counter()
    done = 0
    for it, (crops, _, _) in enumerate(loader, start=first):
        step = epoch * steps + it
        data_time = time.perf_counter() - end
        set_lr_wd(optimizer, schedules.lr[step], schedules.wd[step])
        loss_fn.reg = float(schedules.reg[step])
        crops = [c.to(device, non_blocking=True) for c in crops]

        with autocast(device, amp_dtype):
            z = model(crops)
            with torch.no_grad():
                z_teacher = teacher(crops) if teacher is not None else None
            loss = loss_fn(z, z_teacher)
        value = finite_loss(loss, f"step {step} (epoch {epoch}, iteration {it})", last_good)
        optimizer_step(loss, optimizer, scaler, clip_grad, model.parameters())
        if teacher is not None:
            ema_update_(teacher, student, float(schedules.momentum[step]))

        batch_time = time.perf_counter() - end
        end = time.perf_counter()
        values = {"loss": value, "lr": float(schedules.lr[step]), "weight_decay": float(schedules.wd[step]),
                  "reg": loss_fn.reg, "teacher_momentum": float(schedules.momentum[step]) if teacher else None,
                  "images_per_s": crops[0].shape[0] * world / batch_time, "data_time": data_time, "epoch": epoch}
        totals["loss"] += values["loss"]
        totals["data_time"] += data_time
        totals["images_per_s"] += values["images_per_s"]
        if step % log_freq == 0:
            monitor.log(step, values)
        bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}")
        bar.update()
        done += 1
        if on_step is not None:
            on_step(it + 1)
    bar.close()
    return {k: mean_over_ranks(v / max(done, 1)) for k, v in totals.items()}
