"""The EMA teacher: a copy of the student updated as an exponential moving average, and its schedules."""

from __future__ import annotations

import copy

import torch
from torch import nn

from mmv.train.schedules import cosine_schedule, linear_warmup

__all__ = ["EmaTeacher", "teacher_momentum", "teacher_temperature"]


def teacher_momentum(step: int, total_steps: int, base: float = 0.992, final: float = 1.0) -> float:
    """EMA momentum at ``step``: ``base`` rising to ``final`` on a half cosine over ``total_steps``."""
    if not 0.0 <= base <= final <= 1.0:
        raise ValueError(f"teacher_momentum: need 0 <= base <= final <= 1, got base={base}, final={final}")
    return cosine_schedule(step, total_steps, base, final)


def teacher_temperature(step: int, warmup_steps: int, start: float = 0.04, end: float = 0.07) -> float:
    """Teacher softmax temperature: ``start`` warmed linearly to ``end`` over ``warmup_steps``."""
    if not (start > 0 and end > 0):
        raise ValueError(f"teacher_temperature: temperatures must be positive, got start={start}, end={end}")
    return linear_warmup(step, warmup_steps, start, end)


class EmaTeacher(nn.Module):
    """A frozen copy of a student module, moved toward the student by :meth:`update`.

    The copy is in eval mode (no stochastic depth) and takes no gradients. Its parameters follow
    ``teacher = momentum * teacher + (1 - momentum) * student``; buffers are copied.
    """

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        if not isinstance(student, nn.Module):
            raise TypeError(f"EmaTeacher: student must be an nn.Module, got {type(student).__name__}")
        self.module = copy.deepcopy(student)
        self.module.requires_grad_(False)
        self.module.eval()

    def train(self, mode: bool = True) -> EmaTeacher:
        # The teacher always runs as in evaluation, whatever mode its owner is put in.
        super().train(mode)
        self.module.eval()
        return self

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float) -> None:
        """Move every parameter toward ``student``'s (same architecture) by ``1 - momentum``."""
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EmaTeacher.update: momentum must lie in [0, 1], got {momentum}")
        teacher_parameters = list(self.module.parameters())
        student_parameters = list(student.parameters())
        if len(teacher_parameters) != len(student_parameters):
            raise ValueError(
                f"EmaTeacher.update: student has {len(student_parameters)} parameters, the teacher {len(teacher_parameters)}"
            )
        torch._foreach_lerp_(teacher_parameters, [p.detach() for p in student_parameters], 1.0 - momentum)
        for teacher_buffer, student_buffer in zip(self.module.buffers(), student.buffers()):
            teacher_buffer.copy_(student_buffer)
