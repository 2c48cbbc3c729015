"""Per-step schedules: linear warm-up then cosine (lr, weight decay, teacher momentum, Sinkhorn reg)."""
from __future__ import annotations

import math

import numpy as np


def cosine_schedule(base: float, final: float, epochs: int, steps_per_epoch: int, warmup_epochs: float = 0,
                    start_warmup: float = 0.0) -> np.ndarray:
    """One value per step: ``warmup_epochs`` linear from ``start_warmup`` to ``base``, then cosine to ``final``.

    Step ``s`` of the cosine part (``S`` steps long) is ``final + (base - final) * (1 + cos(pi * s / S)) / 2``,
    as in DINO, so the last step is close to, not exactly, ``final``.
    """
    total = epochs * steps_per_epoch
    warm = int(round(warmup_epochs * steps_per_epoch))
    if warm > total:
        raise ValueError(f"warm-up ({warmup_epochs} epochs) is longer than the schedule ({epochs} epochs)")
    warmup = np.linspace(start_warmup, base, warm, endpoint=False) if warm else np.empty(0)
    steps = np.arange(total - warm)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(math.pi * steps / max(len(steps), 1)))
    return np.concatenate([warmup, cosine])


def linear_warmup_constant(start: float, final: float, epochs: int, steps_per_epoch: int,
                           warmup_epochs: float) -> np.ndarray:
    """Linear from ``start`` to ``final`` over ``warmup_epochs``, then constant (the official ``reg`` warm-up)."""
    total = epochs * steps_per_epoch
    warm = min(int(round(warmup_epochs * steps_per_epoch)), total)
    return np.concatenate([np.linspace(start, final, warm), np.full(total - warm, final)])
