"""Training and validating the segmentor with mmengine's Runner, in one process or on every rank of a process group.

Under a process group (``torchrun``, a multi-task SLURM job: ``eval/run.py`` joins it before the task runs) the Runner
gets ``launcher='pytorch'``; its ``setup_env`` then finds ``is_distributed()`` true and skips its own ``init_dist``
(mmengine 0.10.7 runner.py, ``setup_env``), its InfiniteSampler / DefaultSampler give each rank every world_size-th
index of one seeded stream, and its evaluator gathers every rank's validation results (the sampler's padding dropped)
before rank 0 scores them. The model arrives wrapped: :class:`GlobalBatchNorm` for the recipe's whole-batch statistics,
then mmengine's ``MMDistributedDataParallel``. It is wrapped here rather than by the Runner, whose ``wrap_model``
reads ``LOCAL_RANK`` from the environment (absent under srun), passes that as a device id even for a CPU model, and
first moves the model to CUDA whenever CUDA exists, whatever ``--device`` says.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from mmengine.model import MMDistributedDataParallel
from mmengine.runner import Runner

from bam.distributed import DistInfo, broadcast_from_rank0
from bam.training import SaveNow
from transfer.ade20k.global_bn import convert_to_global_bn
from transfer.ade20k.resume import ATOMIC_BACKEND, ResumeHook, resume_point

logger = logging.getLogger(__name__)


def per_process_batch(batch_size: int, world_size: int) -> int:
    """Images per process: ``batch_size`` is the recipe's global batch (mmseg's 8 GPUs x 2 = 16), split evenly."""
    if batch_size % world_size:
        raise ValueError(f"--batch-size {batch_size} is the global batch and must be a multiple of the {world_size} "
                         f"processes (each takes --batch-size / {world_size} images); pick a multiple of {world_size}")
    return batch_size // world_size


def distribute(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """``model`` on ``device``; with several processes, its batch norms global and the whole in mmengine's DDP."""
    model = model.to(device)
    if world_size == 1:
        return model
    model = convert_to_global_bn(model)
    # the running statistics come from the global batch, the same on every rank: no buffer sync after the initial one
    return MMDistributedDataParallel(module=model, device_ids=[device.index] if device.type == "cuda" else None,
                                     forward_sync_buffers=False, find_unused_parameters=False)


def train_and_validate(cfg: Any, model: nn.Module, *, device: torch.device, info: DistInfo, seed: int,
                       run_id: dict, experiment_name: str) -> dict:
    """Train ``model`` with the recipe ``cfg`` (an mmengine Config whose ``train_dataloader.batch_size`` is the global
    batch), resuming ``cfg.work_dir``'s checkpoint when it is this run's (``run_id``, see ``resume.resume_point``),
    then validate. Every rank returns rank 0's scores: ``{"summary": {mIoU, mAcc, aAcc}, "per_class": {...},
    "log_dir", "resumed_from", "resumed_iteration"}``."""
    runner_cfg = copy.deepcopy(cfg)
    runner_cfg.train_dataloader.batch_size = per_process_batch(cfg.train_dataloader.batch_size, info.world_size)
    if runner_cfg.default_hooks.get("checkpoint"):
        runner_cfg.default_hooks.checkpoint.backend_args = ATOMIC_BACKEND
    point = broadcast_from_rank0(resume_point(Path(cfg.work_dir), run_id) if info.is_main else None)
    start = point[1] if point else 0
    finished = start >= cfg.train_cfg.max_iters  # a finished run's checkpoint: its weights, validated again
    if point and info.is_main:
        logger.info("%s from %s (%d of %d iterations done)", "validating the weights" if finished else "resuming",
                    point[0], start, cfg.train_cfg.max_iters)
    with SaveNow() as save_now:
        if info.is_main:
            logger.info("SIGUSR1 / SIGUSR2 / SIGTERM from now on: a checkpoint at the next iteration, then the signal "
                        "goes on; the same command resumes")
        runner = Runner(model=distribute(model, device, info.world_size), work_dir=runner_cfg.work_dir,
                        train_dataloader=runner_cfg.train_dataloader, val_dataloader=runner_cfg.val_dataloader,
                        train_cfg=runner_cfg.train_cfg, val_cfg=runner_cfg.val_cfg,
                        val_evaluator=runner_cfg.val_evaluator, optim_wrapper=runner_cfg.optim_wrapper,
                        param_scheduler=runner_cfg.param_scheduler, default_hooks=runner_cfg.default_hooks,
                        custom_hooks=[ResumeHook(run_id, save_now)], env_cfg=runner_cfg.env_cfg,
                        log_processor=runner_cfg.log_processor, log_level=runner_cfg.log_level,
                        visualizer=runner_cfg.visualizer, default_scope=runner_cfg.default_scope,
                        randomness=dict(seed=seed), experiment_name=experiment_name, cfg=runner_cfg,
                        launcher="pytorch" if info.world_size > 1 else "none",
                        load_from=str(point[0]) if point else None, resume=bool(point) and not finished)
        if info.world_size == 1:
            runner.model.to(device)  # the Runner moves an unwrapped model to CUDA whenever there is one
        if finished:
            runner.val()
        else:
            runner.train()  # validates at the end of training (mmengine's IterBasedTrainLoop)
    metric = runner.val_loop.evaluator.metrics[0]
    summary, per_class = broadcast_from_rank0((metric.summary, metric.per_class) if info.is_main else None)
    return {"summary": summary, "per_class": per_class, "log_dir": runner.log_dir,
            "resumed_from": str(point[0]) if point else None, "resumed_iteration": start}
