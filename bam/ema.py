"""The momentum (EMA) teacher."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of ``student`` (unwrapped from DDP by the caller) that only ``ema_update_`` changes."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher = momentum * teacher + (1 - momentum) * student``, parameter by parameter.

    Buffers (BatchNorm statistics) are left alone: the teacher keeps its own, as in DINO.
    """
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different parameter lists")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, [p.detach() for p in s_params], alpha=1.0 - momentum)
