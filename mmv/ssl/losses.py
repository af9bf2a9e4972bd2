"""The self-supervised objectives of DINOv2: DINO on CLS tokens, iBOT on masked patch tokens, KoLeo.

Teacher scores become target distributions in one of two ways: softmax after subtracting an EMA centre
(``"centering"``), or Sinkhorn-Knopp normalisation (``"sinkhorn"``), which spreads each batch evenly over
the prototypes. Both are global over a distributed job: centres and Sinkhorn sums are all-reduced, so
every rank computes the same targets it would with the whole batch. Losses are computed in float32 whatever
the dtype of the scores.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["TargetNormalisation", "DinoLoss", "IbotLoss", "koleo_loss", "sinkhorn_knopp"]

NORMALISATIONS = ("centering", "sinkhorn")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(tensor: torch.Tensor, op=None) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, temperature: float, iterations: int = 3) -> torch.Tensor:
    """Target distributions ``(N, K)`` from teacher scores by Sinkhorn-Knopp.

    Alternately normalises the prototypes' total mass to 1/K each and every sample's to 1/N (N over all
    ranks), starting from ``exp(scores / temperature)``; each returned row sums to 1.
    """
    if scores.dim() != 2:
        raise ValueError(f"sinkhorn_knopp: scores must be (N, K), got shape {tuple(scores.shape)}")
    if not temperature > 0:
        raise ValueError(f"sinkhorn_knopp: temperature must be positive, got {temperature}")
    logits = scores.float() / temperature
    maximum = _all_reduce(logits.max().clone() if logits.numel() else logits.new_tensor(-1e30), dist.ReduceOp.MAX)
    q = torch.exp(logits - maximum).t()  # (K, N)
    num_prototypes = q.shape[0]
    num_samples = _all_reduce(torch.tensor(float(q.shape[1]), device=q.device))
    q /= _all_reduce(q.sum()).clamp_min(1e-30)
    for _ in range(iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True)).clamp_min(1e-30)
        q /= num_prototypes
        q /= q.sum(dim=0, keepdim=True).clamp_min(1e-30)
        q /= num_samples
    return (q * num_samples).t()


class TargetNormalisation(nn.Module):
    """Turns teacher scores into target distributions: EMA centering or Sinkhorn-Knopp.

    Args:
        num_prototypes: K.
        normalisation: ``"centering"`` or ``"sinkhorn"``.
        center_momentum: EMA momentum of the centre (centering only).
        sinkhorn_iterations: Sinkhorn-Knopp iterations.
    """

    def __init__(
        self,
        num_prototypes: int,
        normalisation: str = "centering",
        center_momentum: float = 0.9,
        sinkhorn_iterations: int = 3,
    ) -> None:
        super().__init__()
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"{type(self).__name__}: normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
        if not 0.0 <= center_momentum < 1.0:
            raise ValueError(f"{type(self).__name__}: center_momentum must lie in [0, 1), got {center_momentum}")
        self.normalisation = normalisation
        self.center_momentum = center_momentum
        self.sinkhorn_iterations = sinkhorn_iterations
        self.register_buffer("center", torch.zeros(1, num_prototypes))

    @torch.no_grad()
    def targets(self, teacher_scores: torch.Tensor, temperature: float) -> torch.Tensor:
        """float32 ``(N, K)`` distributions; with centering, also moves the centre toward this batch's mean."""
        if teacher_scores.dim() != 2 or teacher_scores.shape[1] != self.center.shape[1]:
            raise ValueError(
                f"{type(self).__name__}: teacher_scores must be (N, {self.center.shape[1]}), got {tuple(teacher_scores.shape)}"
            )
        if not temperature > 0:
            raise ValueError(f"{type(self).__name__}: temperature must be positive, got {temperature}")
        scores = teacher_scores.float()
        if self.normalisation == "sinkhorn":
            return sinkhorn_knopp(scores, temperature, self.sinkhorn_iterations)
        targets = F.softmax((scores - self.center) / temperature, dim=-1)
        self._update_center(scores)
        return targets

    def _update_center(self, scores: torch.Tensor) -> None:
        total = _all_reduce(scores.sum(dim=0, keepdim=True))
        count = _all_reduce(torch.tensor(float(scores.shape[0]), device=scores.device))
        if float(count) > 0:
            self.center.mul_(self.center_momentum).add_(total / count, alpha=1.0 - self.center_momentum)


class DinoLoss(TargetNormalisation):
    """DINO's cross-entropy between teacher targets on the global views and student scores on all views.

    Every student view of an image is compared with every teacher (global) view of the same image except
    itself; the loss is the mean over those pairs of the batch-mean cross-entropy.

    Args:
        student_temperature: softmax temperature of the student (0.1).
        Others: see :class:`TargetNormalisation`.
    """

    def __init__(self, num_prototypes: int, student_temperature: float = 0.1, **normalisation) -> None:
        super().__init__(num_prototypes, **normalisation)
        if not student_temperature > 0:
            raise ValueError(f"DinoLoss: student_temperature must be positive, got {student_temperature}")
        self.student_temperature = student_temperature

    def forward(self, student_scores: torch.Tensor, teacher_targets: torch.Tensor) -> torch.Tensor:
        """Loss from student scores ``(V, B, K)`` and teacher targets ``(G, B, K)``.

        Student views ``0 .. G-1`` are the same crops as the teacher's ``G`` global views (and are not
        compared with themselves); views ``G .. V-1`` are local crops.
        """
        if student_scores.dim() != 3 or teacher_targets.dim() != 3:
            raise ValueError(
                f"DinoLoss: student_scores must be (V, B, K) and teacher_targets (G, B, K), got "
                f"{tuple(student_scores.shape)} and {tuple(teacher_targets.shape)}"
            )
        num_views, num_globals = student_scores.shape[0], teacher_targets.shape[0]
        if student_scores.shape[1:] != teacher_targets.shape[1:] or num_globals > num_views:
            raise ValueError(
                f"DinoLoss: student_scores (V, B, K) and teacher_targets (G, B, K) must agree on B and K with "
                f"G <= V, got {tuple(student_scores.shape)} and {tuple(teacher_targets.shape)}"
            )
        num_pairs = num_globals * num_views - num_globals
        if num_pairs == 0:
            raise ValueError("DinoLoss: need at least one student view besides the teacher's single view")
        log_probabilities = F.log_softmax(student_scores.float() / self.student_temperature, dim=-1)
        summed = log_probabilities.sum(dim=0)
        total = student_scores.new_zeros((), dtype=torch.float32)
        for g in range(num_globals):
            others = summed - log_probabilities[g]
            total = total - (teacher_targets[g] * others).sum(dim=-1).mean()
        return total / num_pairs


class IbotLoss(TargetNormalisation):
    """iBOT's cross-entropy on masked patch tokens, each weighted by 1 / (masked tokens of its image).

    The weighting makes every masked image count equally however many tokens it has, which is what lets
    the loss run on a flat list of masked tokens from a packed batch. The loss is the weighted sum divided
    by the number of images with masked tokens.
    """

    def __init__(self, num_prototypes: int, student_temperature: float = 0.1, **normalisation) -> None:
        super().__init__(num_prototypes, **normalisation)
        if not student_temperature > 0:
            raise ValueError(f"IbotLoss: student_temperature must be positive, got {student_temperature}")
        self.student_temperature = student_temperature

    def forward(self, student_scores: torch.Tensor, teacher_targets: torch.Tensor, token_images: torch.Tensor) -> torch.Tensor:
        """Loss from ``(M, K)`` student scores and teacher targets of M masked tokens, and the image of each
        (int64 ``(M,)``). Zero (with a gradient path) when M is 0."""
        if student_scores.shape != teacher_targets.shape or student_scores.dim() != 2:
            raise ValueError(
                f"IbotLoss: student_scores and teacher_targets must both be (M, K), got "
                f"{tuple(student_scores.shape)} and {tuple(teacher_targets.shape)}"
            )
        if token_images.shape != (student_scores.shape[0],):
            raise ValueError(f"IbotLoss: token_images must be ({student_scores.shape[0]},), got {tuple(token_images.shape)}")
        if student_scores.shape[0] == 0:
            return student_scores.float().sum() * 0.0
        log_probabilities = F.log_softmax(student_scores.float() / self.student_temperature, dim=-1)
        cross_entropy = -(teacher_targets * log_probabilities).sum(dim=-1)
        images, inverse, counts = torch.unique(token_images, return_inverse=True, return_counts=True)
        weights = 1.0 / counts[inverse].float()
        return (cross_entropy * weights).sum() / images.numel()


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy regulariser: minus the mean log distance of each L2-normalised row to its
    nearest other row. Spreads features over the sphere; 0 for fewer than two rows."""
    if features.dim() != 2:
        raise ValueError(f"koleo_loss: features must be (N, C), got shape {tuple(features.shape)}")
    if features.shape[0] < 2:
        return features.float().sum() * 0.0
    normalised = F.normalize(features.float(), dim=-1, eps=eps)
    with torch.no_grad():
        similarity = normalised @ normalised.t()
        similarity.fill_diagonal_(-2.0)
        nearest = similarity.argmax(dim=1)
    distances = (normalised - normalised[nearest]).norm(dim=-1)
    return -torch.log(distances + eps).mean()
