import math

import pytest
import torch

from bam.ema import ema_update_, make_teacher
from bam.projector import Projector
from bam.schedules import cosine_schedule, linear_warmup_constant


def test_cosine_schedule_values_at_known_steps():
    s = cosine_schedule(base=1.0, final=0.1, epochs=10, steps_per_epoch=10, warmup_epochs=2, start_warmup=0.0)
    assert len(s) == 100
    assert s[0] == 0.0 and s[10] == pytest.approx(0.5)  # halfway through the linear warm-up
    assert s[20] == pytest.approx(1.0)  # warm-up over: the base value
    # cosine part has 80 steps: step 20 + 40 is its middle
    assert s[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 40 / 80)))
    assert s[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 79 / 80)))


def test_teacher_momentum_schedule_goes_from_0995_to_1():
    s = cosine_schedule(0.995, 1.0, epochs=3, steps_per_epoch=4)
    assert s[0] == 0.995 and s[-1] < 1.0 and s[-1] == pytest.approx(1.0, abs=1e-3)
    assert all(a <= b for a, b in zip(s, s[1:]))


def test_reg_warmup_is_linear_then_constant():
    s = linear_warmup_constant(0.1, 0.05, epochs=4, steps_per_epoch=2, warmup_epochs=2)
    assert s.tolist() == pytest.approx([0.1, 0.1 - 0.05 / 3, 0.1 - 0.1 / 3, 0.05, 0.05, 0.05, 0.05, 0.05])


def test_warmup_longer_than_schedule_is_an_error():
    with pytest.raises(ValueError, match="warm-up"):
        cosine_schedule(1, 0, epochs=2, steps_per_epoch=3, warmup_epochs=3)


def test_ema_update_by_hand():
    student = torch.nn.Linear(2, 1)
    teacher = make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        teacher.weight.fill_(1.0)
        student.weight.fill_(3.0)
    ema_update_(teacher, student, momentum=0.9)
    assert teacher.weight.flatten().tolist() == pytest.approx([0.9 * 1 + 0.1 * 3] * 2)


def test_projector_official_layout():
    p = Projector(384, 4096, 4096, n_layers=3, norm="none", activation="gelu")
    kinds = [type(m).__name__ for m in p.mlp]
    assert kinds == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert [m.out_features for m in p.mlp if isinstance(m, torch.nn.Linear)] == [4096, 4096, 4096]
    assert p(torch.randn(2, 384)).shape == (2, 4096)


def test_projector_with_batchnorm_and_relu():
    p = Projector(32, 64, 16, n_layers=2, norm="bn", activation="relu", last_norm=True)
    assert [type(m).__name__ for m in p.mlp] == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert p.mlp[3].bias is None
    with pytest.raises(ValueError, match="known"):
        Projector(32, activation="swish")
