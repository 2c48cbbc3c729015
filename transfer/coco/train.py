"""Training and evaluating torchvision's Mask R-CNN on COCO-format data (the ``--engine torchvision`` path):
detectron2's WarmupMultiStepLR schedule, DDP over ranks, COCOeval sharded over ranks."""
from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from bam import training
from bam.checkpoint import latest_path, load_file, remove_stale_temporaries, save_atomic
from bam.distributed import barrier, get_dist_info, sum_over_ranks
from transfer.classification.finetune import layer_decay_groups, set_group_lrs
from transfer.coco.data import CocoInstances, coco_metrics, collate, to_coco_results

logger = logging.getLogger(__name__)


def lr_factor(it: int, warmup: int, steps: list[int]) -> float:
    """detectron2's WarmupMultiStepLR: linear warm-up from 0.001, then x0.1 at each step."""
    warm = 0.001 + (1 - 0.001) * it / warmup if it < warmup else 1.0
    return warm * 0.1 ** sum(it >= s for s in steps)


@torch.no_grad()
def evaluate(model, dataset: CocoInstances, device: torch.device, batch_size: int, workers: int) -> tuple[dict, int]:
    """COCOeval of ``model`` on ``dataset``; under a process group each rank runs every world_size-th image and
    the detections are gathered before scoring (every rank returns the same metrics)."""
    info = get_dist_info()
    model.eval()
    shard = Subset(dataset, range(info.rank, len(dataset), info.world_size)) if info.world_size > 1 else dataset
    results = []
    loader = DataLoader(shard, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    for images, targets in tqdm(loader, desc="coco eval", leave=False, dynamic_ncols=True, disable=info.rank > 0):
        outputs = model([im.to(device) for im in images])
        results += to_coco_results(outputs, [t["image_id"] for t in targets], dataset.cat_ids)
    if info.world_size > 1:
        parts: list = [None] * info.world_size
        torch.distributed.all_gather_object(parts, results)
        results = [r for part in parts for r in part]
    return coco_metrics(dataset.coco, results), len(results)


def train(model, train_set: CocoInstances, args, device: torch.device, output_dir: Path,
          run_id: dict, backbone) -> None:
    """Train ``model`` in place; under a process group with DDP, each rank taking batch_size / world_size images
    of every global batch (DistributedSampler), rank 0 writing the log and the checkpoint."""
    info = get_dist_info()
    if args.batch_size % info.world_size:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of the {info.world_size} processes")
    groups = layer_decay_groups(model, backbone, args.weight_decay, args.layer_decay)
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999))
    dtype = training.amp_dtype(args.amp, device)
    scaler = training.grad_scaler(device, dtype)
    steps = [int(s) for s in str(args.steps).split(",") if s.strip()]
    ckpt_path, start, resumed_rng = latest_path(output_dir), 0, None
    if info.rank == 0:
        remove_stale_temporaries(output_dir)
    run_id = {**json.loads(json.dumps(run_id, default=str)), "world_size": info.world_size}
    if ckpt_path.is_file():
        state = load_file(ckpt_path)
        if state.get("run_id") == run_id:
            training.restore_training_state(state, model, optimizer, scaler)
            start, resumed_rng = state["iter"], state.get("rng")
            logger.info("resuming detection training from %s (iteration %d)", ckpt_path, start)
        else:
            logger.warning("%s belongs to another run (other weights, data or schedule): starting over", ckpt_path)
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if info.world_size > 1 else model
    sampler = DistributedSampler(train_set, info.world_size, info.rank, shuffle=True, seed=args.seed, drop_last=True)
    log_path = output_dir / "log.jsonl" if info.rank == 0 else Path(os.devnull)
    per_rank = args.batch_size // info.world_size
    per_epoch = len(sampler) // per_rank  # iterations in one pass over the images (drop_last)
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(open(log_path, "a" if start else "w"))
        it, epoch = start, start // per_epoch  # a resumed run goes on at its place in its epoch
        bar = tqdm(total=args.iters, initial=start, desc="coco train", dynamic_ncols=True, disable=info.rank > 0)
        model.train()
        save_now = stack.enter_context(training.SaveNow())
        while it < args.iters:
            sampler.set_epoch(epoch)
            skip = (it - epoch * per_epoch) * per_rank
            loader = DataLoader(train_set, batch_size=per_rank, sampler=training.SkipFirst(sampler, skip),
                                worker_init_fn=training.keep_signals_for_the_main_process,
                                drop_last=True, collate_fn=collate, num_workers=args.num_workers)
            batches = iter(loader)  # draws the workers' base seed from the global generator
            if resumed_rng is not None:  # as the uninterrupted run had it here (exact with --num-workers 0; with
                training.set_rng_state(resumed_rng)  # workers, the rest of the epoch's flips are drawn anew)
                resumed_rng = None
            for images, targets in batches:
                if it >= args.iters:
                    break
                set_group_lrs(optimizer, args.lr * lr_factor(it, args.warmup_iters, steps))
                images = [im.to(device, non_blocking=True) for im in images]
                targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
                with training.autocast(device, dtype):
                    losses = net(images, targets)
                loss = sum(losses.values())
                saved = start or it >= args.checkpoint_period  # rank 0 wrote one at each period
                mean = sum_over_ranks(loss.detach()) / info.world_size  # a NaN on any rank stops every rank
                value = training.finite_loss(mean, f"iteration {it}", ckpt_path if saved else "none yet", "lower --lr")
                training.optimizer_step(loss, optimizer, scaler, args.clip_grad, model.parameters())
                it += 1
                bar.update()
                if it % 20 == 0 or it == args.iters:
                    log.write(json.dumps({"iter": it, "loss": value, **{k: v.item() for k, v in losses.items()},
                                          "lr": optimizer.param_groups[-1]["lr"]}) + "\n")
                    log.flush()
                    bar.set_postfix(loss=f"{value:.3f}")
                signalled = save_now.due()  # a preemption signal: the checkpoint now, then the signal passed on
                if (it % args.checkpoint_period == 0 or it == args.iters or signalled) and info.rank == 0:
                    state = training.training_state(model, optimizer, scaler, iter=it, run_id=run_id)
                    save_atomic(state, ckpt_path)
                if signalled:
                    barrier()
                    logger.info("saved %s at iteration %d (signal)", ckpt_path, it)
                    save_now.release()
            epoch += 1
        bar.close()
