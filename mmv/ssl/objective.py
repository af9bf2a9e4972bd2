"""The DINOv2 objective of one step: the student (encoder and heads) and DINO + iBOT + KoLeo on an SSL batch.

The EMA teacher encodes the global views of every image; the student encodes all views at once in one
pack (global views with iBOT block masks, local views whole). The loss is DINO on the CLS tokens, iBOT on
the masked patch tokens and KoLeo on the global views' CLS tokens, weighted as the ``[ssl]`` section of
the run config (:class:`mmv.train.config.SslConfig`) says. The training loop (:mod:`mmv.train.trainer`)
owns everything else: optimiser, schedules, data and checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from mmv.model.encoder import Encoder
from mmv.packing import PackedBatch
from mmv.ssl.batch import SslBatch
from mmv.ssl.heads import DinoHead
from mmv.ssl.losses import DinoLoss, IbotLoss, koleo_loss
from mmv.ssl.teacher import EmaTeacher

if TYPE_CHECKING:  # mmv.train builds on this package, not the other way round
    from mmv.train.config import SslConfig

__all__ = ["LOSS_NAMES", "SslStudent", "StepLosses", "SslObjective"]

LOSS_NAMES = ("loss", "dino", "ibot", "koleo")

# The fields of the [ssl] section the objective reads.
_OBJECTIVE_FIELDS = (
    "num_prototypes", "student_temperature", "normalisation", "dino_weight", "ibot_weight", "koleo_weight"
)


class SslStudent(nn.Module):
    """The encoder with its DINO head and iBOT head (the same module when not separate).

    ``forward(batch, token_mask, masked_rows)`` returns the encoder's CLS tokens ``(B, C)``, their DINO
    scores ``(B, K)`` and the iBOT scores ``(M, K)`` of the patch tokens at ``masked_rows``.
    """

    def __init__(self, encoder: Encoder, dino_head: DinoHead, ibot_head: DinoHead | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.dino_head = dino_head
        self.ibot_head = ibot_head

    def forward(self, batch: PackedBatch, token_mask: torch.Tensor | None, masked_rows: torch.Tensor):
        out = self.encoder(batch, token_mask)
        head = self.ibot_head if self.ibot_head is not None else self.dino_head
        return out.cls, self.dino_head(out.cls), head(out.patch_tokens[masked_rows])


@dataclass
class StepLosses:
    """The weighted total ``loss`` of one batch and its unweighted terms (named as in :data:`LOSS_NAMES`)."""

    loss: torch.Tensor
    dino: torch.Tensor
    ibot: torch.Tensor
    koleo: torch.Tensor


class SslObjective(nn.Module):
    """DINO + iBOT + KoLeo for one :class:`SslBatch`, given the student and the teacher.

    Args:
        ssl: the ``[ssl]`` section of the run config (:class:`mmv.train.config.SslConfig`): prototypes,
            student temperature, normalisation of the teacher's scores and the weights of the terms.

    Its state (the loss centres) is part of a training checkpoint.
    """

    def __init__(self, ssl: SslConfig) -> None:
        super().__init__()
        if not all(hasattr(ssl, name) for name in _OBJECTIVE_FIELDS):
            raise TypeError(f"SslObjective: ssl must be the [ssl] section (an SslConfig), got {type(ssl).__name__}")
        self.dino = DinoLoss(ssl.num_prototypes, ssl.student_temperature, normalisation=ssl.normalisation)
        self.ibot = IbotLoss(ssl.num_prototypes, ssl.student_temperature, normalisation=ssl.normalisation)
        self.weights = (ssl.dino_weight, ssl.ibot_weight, ssl.koleo_weight)

    def forward(self, student: nn.Module, teacher: EmaTeacher, batch: SslBatch, temperature: float) -> StepLosses:
        num_images, num_global = batch.num_images, batch.num_global
        masked_rows = torch.nonzero(batch.mask).flatten()
        with torch.no_grad():
            _, teacher_cls_scores, teacher_patch_scores = teacher(batch.teacher, None, masked_rows)
            dino_targets = self.dino.targets(teacher_cls_scores, temperature)
            ibot_targets = self.ibot.targets(teacher_patch_scores, temperature)
        student_cls, student_cls_scores, student_patch_scores = student(batch.student, batch.student_mask(), masked_rows)
        num_prototypes = student_cls_scores.shape[-1]
        dino = self.dino(
            student_cls_scores.view(batch.num_views, num_images, num_prototypes),
            dino_targets.view(num_global, num_images, num_prototypes),
        )
        token_images = batch.teacher.sequence_ids()[masked_rows]
        ibot = self.ibot(student_patch_scores, ibot_targets, token_images)
        global_cls = student_cls[: num_global * num_images].view(num_global, num_images, -1)
        koleo = torch.stack([koleo_loss(view) for view in global_cls]).mean()
        dino_weight, ibot_weight, koleo_weight = self.weights
        loss = dino_weight * dino + ibot_weight * ibot + koleo_weight * koleo
        return StepLosses(loss, dino, ibot, koleo)
