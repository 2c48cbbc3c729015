"""Distributed helpers that do nothing without a process group.

Library code never assumes ``torch.distributed`` is initialised: every collective here is the identity
on one process, so the same loss and training step run on one CPU process, under ``torchrun`` and under
SLURM. Only entry points call :func:`init_distributed`.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_dist_info() -> DistInfo:
    if not is_dist():
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def launched_as() -> DistInfo:
    """The rank, world size and local rank torchrun's (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) or srun's
    (``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``) environment gives this process, before any process group
    is joined; one process without either."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:
        return DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return DistInfo()


def init_distributed(device: torch.device | str | None = None, timeout_min: int = 30) -> DistInfo:
    """Join the process group described by torchrun's or SLURM's environment; a no-op without one.

    NCCL on CUDA, gloo on CPU. Reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (torchrun) or
    ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` (srun); ``MASTER_ADDR``/``MASTER_PORT`` must be set.
    """
    launched = launched_as()
    rank, world, local = launched.rank, launched.world_size, launched.local_rank
    if world == 1 or is_dist():
        return get_dist_info() if is_dist() else DistInfo()
    device = torch.device(device) if device is not None else torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=timeout_min))
    logger.info("joined process group: rank %d of %d (%s)", rank, world, backend)
    return DistInfo(rank, world, local)


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``sum`` or ``max``); the identity without a process group."""
    if is_dist():
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0's checkpoint is on disk); a no-op without a process group."""
    if is_dist():
        dist.barrier()


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` summed over ranks, on ``t``'s device (gloo reduces on the CPU, NCCL on the GPU); ``t``
    itself without a process group."""
    if not is_dist():
        return t
    out = t.detach().to("cuda" if dist.get_backend() == "nccl" else "cpu", copy=True)
    return all_reduce_(out).to(t.device)


def mean_over_ranks(value: float | torch.Tensor) -> float:
    """Average a scalar over ranks (for logging); returns a Python float."""
    t = torch.as_tensor(value, dtype=torch.float64).detach().clone()
    if is_dist():
        t = t.to("cuda" if dist.get_backend() == "nccl" else "cpu")
        all_reduce_(t)
        t /= dist.get_world_size()
    return float(t)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the summed gradient of its own slice.

    The backward uses all_reduce rather than reduce_scatter because gloo has no reduce_scatter.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        g = torch.stack(grads)
        dist.all_reduce(g)
        return g[dist.get_rank()]


def gather_with_grad(x: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``x`` in rank order, differentiable; ``[x]`` without a process group."""
    if not is_dist() or dist.get_world_size() == 1:
        return [x]
    return list(_GatherWithGrad.apply(x))


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (ranks may hold different counts)."""
    if not is_dist():
        return t
    sizes = [torch.zeros(1, dtype=torch.long, device=t.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([t.shape[0]], device=t.device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, *t.shape[1:], dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)])


def broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object: a decision every rank must take alike); ``value``
    itself without a process group."""
    if not is_dist():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def balanced_shards(costs: Sequence[float], world_size: int) -> list[list[int]]:
    """The indices of ``costs`` each rank takes: the costliest item first onto the least loaded rank (ties go to the
    lower rank, then the earlier item), each shard in index order. Deterministic: every rank computes the same split.
    Rank 0 gets the costliest item, so it has work whenever there is any."""
    loads, shards = [0.0] * world_size, [[] for _ in range(world_size)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        shards[rank].append(i)
        loads[rank] += costs[i]
    return [sorted(s) for s in shards]


class RankFailed(ValueError):
    """Another rank's failure, raised on a rank whose own part succeeded. A ValueError so that entry points report it
    in one line: the rank that failed reports its own error in full."""


def _gather_failures(failure: str | None) -> list[str | None]:
    if not is_dist():
        return [failure]
    failures: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failure)
    return failures


def _clean_up_together(cleanup: Callable[[], None] | None) -> None:
    try:
        if cleanup is not None:
            cleanup()
    finally:  # a cleanup that fails must not leave the other ranks at the barrier
        if is_dist():
            dist.barrier()


@contextlib.contextmanager
def fail_together(cleanup: Callable[[], None] | None = None) -> Iterator[None]:
    """Agree on a block's outcome: if it raised on any rank, it raises on every rank (its own exception where it
    failed, :class:`RankFailed` naming the first rank that failed elsewhere), so no rank waits at a later collective
    for one that has stopped until the process group times out.

    One collective when the block ends: every rank runs the block, even one with nothing to do in it. After a failure
    every rank runs ``cleanup`` and waits for the others' before raising, so a launcher that stops the job at its
    first exited process (torchrun does) cannot cut rank 0's cleanup short. Without a process group: the block, and
    ``cleanup`` if it raised.
    """
    try:
        yield
    except Exception as e:
        _gather_failures(f"{type(e).__name__}: {e}")
        _clean_up_together(cleanup)
        raise
    failures = _gather_failures(None)
    failed = [r for r, f in enumerate(failures) if f is not None]
    if failed:
        _clean_up_together(cleanup)
        raise RankFailed(f"rank {failed[0]} of {len(failures)} failed ({failures[failed[0]]}); its log has the "
                         "details")
