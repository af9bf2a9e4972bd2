"""DINO head, EMA teacher and the schedules of training."""

import math

import pytest
import torch
from torch import nn

from mmv.ssl.heads import DinoHead
from mmv.ssl.teacher import EmaTeacher
from mmv.train.schedules import (
    cosine_schedule,
    linear_warmup,
    teacher_momentum,
    teacher_temperature,
    warmup_cosine_schedule,
)


def test_head_scores_are_cosines_with_unit_prototypes_even_after_training():
    head = DinoHead(16, num_prototypes=32, hidden_dim=24, bottleneck_dim=8)
    optimizer = torch.optim.SGD(head.parameters(), lr=1.0)
    head(torch.randn(5, 16)).pow(2).sum().backward()
    optimizer.step()
    scores = head(torch.randn(7, 16))
    assert scores.shape == (7, 32)
    assert float(scores.detach().abs().max()) <= 1.0 + 1e-5
    norms = head.prototypes.weight.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(32))


def test_head_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_prototypes"):
        DinoHead(16, num_prototypes=0)


def test_ema_update_and_frozen_eval_teacher():
    student = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5))
    teacher = EmaTeacher(student)
    assert not any(p.requires_grad for p in teacher.parameters())
    before = [p.clone() for p in teacher.module.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    teacher.update(student, momentum=0.75)
    for old, new, s in zip(before, teacher.module.parameters(), student.parameters()):
        torch.testing.assert_close(new, 0.75 * old + 0.25 * s)
    teacher.train()
    assert not teacher.module.training
    x = torch.randn(2, 3)
    assert torch.equal(teacher(x), teacher(x))


def test_schedules_endpoints():
    assert teacher_momentum(0, 100, 0.992, 1.0) == pytest.approx(0.992)
    assert teacher_momentum(100, 100, 0.992, 1.0) == pytest.approx(1.0)
    assert teacher_temperature(0, 10, 0.04, 0.07) == pytest.approx(0.04)
    assert teacher_temperature(5, 10, 0.04, 0.07) == pytest.approx(0.055)
    assert teacher_temperature(50, 10, 0.04, 0.07) == pytest.approx(0.07)
    assert warmup_cosine_schedule(0, 100, 1.0, 0.0, 10) == 0.0
    assert warmup_cosine_schedule(10, 100, 1.0, 0.0, 10) == pytest.approx(1.0)
    assert warmup_cosine_schedule(55, 100, 1.0, 0.0, 10) == pytest.approx(0.5)
    assert cosine_schedule(200, 100, 0.04, 0.4) == pytest.approx(0.4)
    assert linear_warmup(3, 0, 0.1, 0.2) == pytest.approx(0.2)
    assert math.isfinite(warmup_cosine_schedule(99, 100, 1.0, 0.1, 0))
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine_schedule(0, 10, 1.0, 0.0, 10)


def test_batch_norm_head_separates_images_that_share_a_dominant_direction():
    torch.manual_seed(0)
    shared = torch.randn(1, 16) * 10
    features = shared + 0.1 * torch.randn(12, 16)
    plain, normed = DinoHead(16, 32, 24, 8), DinoHead(16, 32, 24, 8, batch_norm=True)

    def mean_cosine(head):
        bottleneck = torch.nn.functional.normalize(head.mlp(features).detach(), dim=-1)
        return float(((bottleneck @ bottleneck.T).sum() - 12) / (12 * 11))

    assert mean_cosine(plain) > 0.9
    assert mean_cosine(normed) < 0.5
    assert normed(features[:1]).shape == (1, 32)  # a single row passes through unnormalised
