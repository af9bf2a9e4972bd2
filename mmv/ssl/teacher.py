"""The EMA teacher: a copy of the student updated as an exponential moving average.

Its momentum and softmax temperature over a run are schedules of training (:mod:`mmv.train.schedules`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EmaTeacher"]


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
