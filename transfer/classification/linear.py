"""A grid of linear heads on frozen features, trained together in one pass over the data (as DINOv2 does).

Each head sees ``[CLS]`` tokens of the last ``n_blocks`` blocks, optionally followed by the mean patch token, from
the same feature "slots" (:mod:`transfer.features`), and has its own learning rate. The losses are summed, so
every head's gradient is exactly the gradient it would get alone: the grid is N separate probes for the price of
one backbone pass.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from bam.training import SaveNow, optimizer_step


@dataclass(frozen=True)
class HeadSpec:
    lr: float  # base learning rate, scaled by batch / 256
    n_blocks: int  # [CLS] tokens of this many last blocks
    avgpool: bool  # also the last block's mean patch token

    @property
    def name(self) -> str:
        return f"lr={self.lr:g} blocks={self.n_blocks}{' +avgpool' if self.avgpool else ''}"


def head_input(slots: torch.Tensor, n_blocks: int, avgpool: bool) -> torch.Tensor:
    """Concatenate ``[CLS_{L-n+1} .. CLS_L]`` (and the mean patch token) from ``slots: [B, K, D]``, whose last slot is
    the mean patch token when ``K > 1`` (a ViT) and whose ``K - 1`` first slots are [CLS] tokens, oldest first."""
    if slots.shape[1] == 1:  # a CNN: one pooled vector
        if n_blocks != 1 or avgpool:
            raise ValueError("a CNN backbone has one pooled feature: use n_blocks 1 without avgpool")
        return slots[:, 0]
    n_cls = slots.shape[1] - 1
    if not 1 <= n_blocks <= n_cls:
        raise ValueError(f"asked for {n_blocks} blocks but the features hold {n_cls}")
    cls = slots[:, n_cls - n_blocks:n_cls].flatten(1)
    return torch.cat([cls, slots[:, -1]], dim=1) if avgpool else cls


class LinearHead(nn.Module):
    """DINO's linear classifier: optional BatchNorm without affine (the official BAM ``--bn_head``), then a linear
    layer initialised N(0, 0.01) with zero bias."""

    def __init__(self, dim: int, num_classes: int, bn: bool = False):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if bn else nn.Identity()
        self.linear = nn.Linear(dim, num_classes)
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.bn(x))


class LinearGrid(nn.Module):
    def __init__(self, specs: Sequence[HeadSpec], embed_dim: int, num_classes: int, bn: bool = False):
        super().__init__()
        self.specs = list(specs)
        self.heads = nn.ModuleList(
            LinearHead((s.n_blocks + int(s.avgpool)) * embed_dim, num_classes, bn) for s in self.specs)

    def forward(self, slots: torch.Tensor) -> list[torch.Tensor]:
        inputs = {(s.n_blocks, s.avgpool): None for s in self.specs}
        for key in inputs:
            inputs[key] = head_input(slots, *key)
        return [head(inputs[(s.n_blocks, s.avgpool)]) for s, head in zip(self.specs, self.heads)]


def grid_optimizer(grid: LinearGrid, batch_size: int) -> torch.optim.SGD:
    """SGD, momentum 0.9, no weight decay; one parameter group per head at ``lr * batch_size / 256``."""
    groups = [{"params": list(h.parameters()), "lr": s.lr * batch_size / 256.0} for s, h in zip(grid.specs, grid.heads)]
    return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.9, weight_decay=0.0)


def train_grid(grid: LinearGrid, batches: Callable[[int, int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
               epochs: int, batch_size: int, on_epoch: Callable[[int, float], None] | None = None,
               resume: dict | None = None, save: Callable[[dict], None] | None = None) -> None:
    """Train every head on the same batches; ``batches(epoch, first)`` yields the epoch's ``(slots, labels)`` from
    its ``first``-th batch on. Cosine annealing to 0 over ``epochs``, stepped per epoch (as DINO's and the official
    BAM probe).

    ``save(state)``, when given, receives the loop's state after every epoch and, at a preemption signal
    (:class:`bam.training.SaveNow`), after the step under way; ``resume`` is such a state to go on from (the heads,
    the optimizer, the schedule and the position in the epoch). Every draw comes from a seed and the epoch, so a
    resumed run ends with the uninterrupted run's heads.
    """
    optimizer = grid_optimizer(grid, batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=0.0)
    start, first, running = 0, 0, [0.0, 0]  # running: the epoch's summed mean head loss, its batches
    if resume is not None:
        grid.load_state_dict(resume["grid"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        start, first, running = resume["epoch"], resume["iteration"], list(resume["running"])

    def state(epoch: int, iteration: int) -> dict:
        return {"grid": grid.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "epoch": epoch, "iteration": iteration, "running": list(running)}

    with SaveNow() if save is not None else nullcontext() as save_now:
        for epoch in range(start, epochs):
            grid.train()  # on_epoch may have evaluated
            if epoch != start or first == 0:
                first, running = 0, [0.0, 0]
            for i, (slots, labels) in enumerate(batches(epoch, first), start=first + 1):
                losses = [F.cross_entropy(logits, labels) for logits in grid(slots)]
                optimizer_step(torch.stack(losses).sum(), optimizer)  # a diverged head is reported, not fatal
                finite = [loss.item() for loss in losses if math.isfinite(loss.item())]
                running = [running[0] + sum(finite) / max(len(finite), 1), running[1] + 1]
                if save_now is not None and save_now.due():
                    save(state(epoch, i))
                    save_now.release()
            scheduler.step()
            if on_epoch is not None:
                on_epoch(epoch, running[0] / max(running[1], 1))
            if save is not None:
                save(state(epoch + 1, 0))
                if save_now.due():  # a signal during the epoch's end: its state is saved
                    save_now.release()


@torch.no_grad()
def evaluate_grid(grid: LinearGrid, slots: torch.Tensor, labels: torch.Tensor, chunk: int = 4096
                  ) -> list[dict[str, float]]:
    """Top-1 / top-5 (percent) of every head. A head with non-finite logits for a sample (diverged) gets it wrong."""
    grid.eval()
    hits = torch.zeros(len(grid.heads), 2, dtype=torch.float64)
    for start in range(0, slots.shape[0], chunk):
        y = labels[start:start + chunk]
        for i, logits in enumerate(grid(slots[start:start + chunk])):
            finite = torch.isfinite(logits).all(dim=1)
            top = logits.nan_to_num(0.0).topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
            hits[i, 0] += (top[:, 0] & finite).sum().item()
            hits[i, 1] += (top.any(dim=1) & finite).sum().item()
    n = max(slots.shape[0], 1)
    return [{"top1": 100.0 * h[0].item() / n, "top5": 100.0 * h[1].item() / n} for h in hits]


def select_head(results: Sequence[dict[str, float]]) -> int:
    """Index of the head with the best top-1 (ties: the first, i.e. the smallest lr of the first configuration)."""
    return max(range(len(results)), key=lambda i: (results[i]["top1"], -i))


def feature_batches(slots: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, device: torch.device
                    ) -> Callable[[int, int], Iterable[tuple[torch.Tensor, torch.Tensor]]]:
    """Shuffled mini-batches of cached features, a fresh seeded order every epoch, from the ``first``-th on."""
    def batches(epoch: int, first: int = 0):
        order = torch.randperm(slots.shape[0], generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        for start in range(first * batch_size, len(order), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2 and len(order) > 1:  # a 1-sample batch would break BatchNorm heads
                break
            yield slots[idx].to(device, non_blocking=True), labels[idx].to(device, non_blocking=True)
    return batches
