"""Limited-memory BFGS for smooth convex objectives whose gradient the caller computes.

The probes minimise a sum of independent L2-regularised logistic losses: strictly convex, so every step
satisfies the curvature condition and a backtracking (Armijo) line search is enough. Parameters and the
curvature history are float64; the objective may compute in any precision. Kept apart from
``torch.optim.LBFGS``, which wants autograd-style ``.grad`` fields and imports the compiler stack on first use.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["LbfgsResult", "minimise_lbfgs"]

_ARMIJO_SLOPE = 1e-4
_MAX_HALVINGS = 20


@dataclass(frozen=True)
class LbfgsResult:
    """The minimiser found, its objective value, iterations taken and whether a tolerance was met."""

    x: torch.Tensor
    value: float
    iterations: int
    converged: bool


def minimise_lbfgs(
    objective: Callable[[torch.Tensor], tuple[float, torch.Tensor]],
    x0: torch.Tensor,
    *,
    max_iter: int = 200,
    history_size: int = 20,
    gradient_tolerance: float = 1e-6,
    change_tolerance: float = 1e-10,
) -> LbfgsResult:
    """Minimise ``objective(x) -> (value, gradient)`` from ``x0`` (a 1-D tensor).

    Stops when the largest gradient entry is at most ``gradient_tolerance``, when an iteration lowers
    the value by less than ``change_tolerance`` times its size, when the line search finds no lower value
    (the objective's own rounding has been reached: ``converged`` is then False), or after ``max_iter``
    iterations.
    """
    if x0.ndim != 1:
        raise ValueError(f"x0 must be a 1-D tensor, got shape {tuple(x0.shape)}")
    if max_iter < 1 or history_size < 1:
        raise ValueError(f"max_iter and history_size must be positive, got {max_iter} and {history_size}")
    x = x0.detach().to(torch.float64).clone()
    value, gradient = objective(x)
    gradient = gradient.to(torch.float64)
    history: deque[tuple[torch.Tensor, torch.Tensor, float]] = deque(maxlen=history_size)
    for iteration in range(1, max_iter + 1):
        if float(gradient.abs().max()) <= gradient_tolerance:
            return LbfgsResult(x, value, iteration - 1, True)
        direction = _two_loop_direction(gradient, history)
        slope = float(gradient @ direction)
        if slope >= 0:
            # Round-off made the quasi-Newton direction useless: restart from steepest descent.
            history.clear()
            direction = -gradient
            slope = float(gradient @ direction)
        step = 1.0 if history else min(1.0, 1.0 / float(gradient.abs().sum()))
        for _ in range(_MAX_HALVINGS):
            candidate = x + step * direction
            candidate_value, candidate_gradient = objective(candidate)
            if candidate_value <= value + _ARMIJO_SLOPE * step * slope:
                break
            step *= 0.5
        else:
            return LbfgsResult(x, value, iteration, False)
        candidate_gradient = candidate_gradient.to(torch.float64)
        change = candidate - x
        gradient_change = candidate_gradient - gradient
        curvature = float(change @ gradient_change)
        if curvature > 1e-12 * float(change @ change):
            history.append((change, gradient_change, 1.0 / curvature))
        decrease = value - candidate_value
        x, value, gradient = candidate, candidate_value, candidate_gradient
        if decrease <= change_tolerance * max(abs(value), 1.0):
            return LbfgsResult(x, value, iteration, True)
    return LbfgsResult(x, value, max_iter, float(gradient.abs().max()) <= gradient_tolerance)


def _two_loop_direction(gradient: torch.Tensor, history) -> torch.Tensor:
    """``-H g`` for the inverse-Hessian approximation H built from the curvature pairs (Nocedal & Wright 7.4)."""
    q = gradient.clone()
    alphas = []
    for change, gradient_change, rho in reversed(history):
        alpha = rho * float(change @ q)
        q -= alpha * gradient_change
        alphas.append(alpha)
    if history:
        change, gradient_change, _ = history[-1]
        q *= float(change @ gradient_change) / float(gradient_change @ gradient_change)
    for (change, gradient_change, rho), alpha in zip(history, reversed(alphas)):
        beta = rho * float(gradient_change @ q)
        q += (alpha - beta) * change
    return -q
