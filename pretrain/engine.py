"""One epoch of BAM pretraining."""
from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from bam.distributed import get_dist_info, mean_over_ranks
from bam.ema import ema_update_
from bam.loss import BAMLoss
from pretrain.model import set_lr_wd
from pretrain.monitor import Monitor


@dataclass
class Schedules:
    """One value per optimisation step."""
    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    reg: np.ndarray


class NonFiniteLossError(RuntimeError):
    pass


def train_one_epoch(model, teacher, loss_fn: BAMLoss, loader, optimizer, scaler, schedules: Schedules, epoch: int,
                    device: torch.device, amp_dtype: torch.dtype | None, clip_grad: float, monitor: Monitor,
                    log_freq: int, show_progress: bool, last_good: str) -> dict[str, float]:
    model.train()
    student = model.module if hasattr(model, "module") else model
    steps = len(loader)
    world = get_dist_info().world_size
    totals = {"loss": 0.0, "data_time": 0.0, "images_per_s": 0.0}
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    # in a log file (SLURM), a bar line every 30 s instead of every step
    bar = tqdm(total=steps, desc=f"epoch {epoch}", disable=not show_progress, dynamic_ncols=True, leave=False,
               mininterval=0.5 if sys.stderr.isatty() else 30)
    end = time.perf_counter()
    for it, (crops, _, _) in enumerate(loader):
        step = epoch * steps + it
        data_time = time.perf_counter() - end
        set_lr_wd(optimizer, schedules.lr[step], schedules.wd[step])
        loss_fn.reg = float(schedules.reg[step])
        crops = [c.to(device, non_blocking=True) for c in crops]

        with autocast:
            z = model(crops)
            with torch.no_grad():
                z_teacher = teacher(crops) if teacher is not None else None
            loss = loss_fn(z, z_teacher)
        if not math.isfinite(loss.item()):
            raise NonFiniteLossError(f"the loss is {loss.item()} at step {step} (epoch {epoch}, iteration {it}); "
                                     f"stopping. The last good checkpoint is {last_good}")

        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip_grad > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        scaler.step(optimizer)
        scaler.update()
        if teacher is not None:
            ema_update_(teacher, student, float(schedules.momentum[step]))

        batch_time = time.perf_counter() - end
        end = time.perf_counter()
        values = {"loss": loss.item(), "lr": float(schedules.lr[step]), "weight_decay": float(schedules.wd[step]),
                  "reg": loss_fn.reg, "teacher_momentum": float(schedules.momentum[step]) if teacher else None,
                  "images_per_s": crops[0].shape[0] * world / batch_time, "data_time": data_time, "epoch": epoch}
        totals["loss"] += values["loss"]
        totals["data_time"] += data_time
        totals["images_per_s"] += values["images_per_s"]
        if step % log_freq == 0:
            monitor.log(step, values)
        bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}")
        bar.update()
    bar.close()
    return {k: mean_over_ranks(v / steps) for k, v in totals.items()}
