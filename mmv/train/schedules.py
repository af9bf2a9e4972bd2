"""Schedules of training hyperparameters as functions of the optimiser step: linear warm-up, then cosine;
the EMA teacher's momentum and softmax temperature."""

from __future__ import annotations

import math

__all__ = ["cosine_schedule", "warmup_cosine_schedule", "linear_warmup", "teacher_momentum", "teacher_temperature"]


def _check_step(step: int, total_steps: int, owner: str) -> None:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"{owner}: total_steps must be a positive int, got {total_steps!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{owner}: step must be a non-negative int, got {step!r}")


def cosine_schedule(step: int, total_steps: int, start: float, end: float) -> float:
    """``start`` at step 0 to ``end`` at ``total_steps`` on a half cosine; ``end`` after that."""
    _check_step(step, total_steps, "cosine_schedule")
    progress = min(step, total_steps) / total_steps
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear_warmup(step: int, warmup_steps: int, start: float, end: float) -> float:
    """``start`` at step 0 rising linearly to ``end`` at ``warmup_steps``; ``end`` after that."""
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"linear_warmup: warmup_steps must be a non-negative int, got {warmup_steps!r}")
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


def warmup_cosine_schedule(step: int, total_steps: int, peak: float, final: float, warmup_steps: int = 0) -> float:
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then a cosine from ``peak`` to ``final``."""
    _check_step(step, total_steps, "warmup_cosine_schedule")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or not 0 <= warmup_steps < total_steps:
        raise ValueError(
            f"warmup_cosine_schedule: warmup_steps must be an int in [0, total_steps={total_steps}), got {warmup_steps!r}"
        )
    if step < warmup_steps:
        return peak * step / warmup_steps
    return cosine_schedule(step - warmup_steps, total_steps - warmup_steps, peak, final)


def teacher_momentum(step: int, total_steps: int, base: float, final: float) -> float:
    """EMA momentum at ``step``: ``base`` rising to ``final`` on a half cosine over ``total_steps``."""
    if not 0.0 <= base <= final <= 1.0:
        raise ValueError(f"teacher_momentum: need 0 <= base <= final <= 1, got base={base}, final={final}")
    return cosine_schedule(step, total_steps, base, final)


def teacher_temperature(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Teacher softmax temperature: ``start`` warmed linearly to ``end`` over ``warmup_steps``."""
    if not (start > 0 and end > 0):
        raise ValueError(f"teacher_temperature: temperatures must be positive, got start={start}, end={end}")
    return linear_warmup(step, warmup_steps, start, end)
