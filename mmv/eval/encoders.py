"""The encoder of ``mmv embed`` and the preprocessing it was trained with, from any checkpoint mmv writes.

Checkpoints (:func:`load_encoder`)
    an encoder directory written by :meth:`mmv.Encoder.save_pretrained` (``<run>/encoder`` of ``mmv
    pretrain``), a training checkpoint file of ``mmv pretrain`` (``<run>/checkpoints/step_*.pt``; its EMA
    teacher's encoder, read by :func:`mmv.train.encoder_from_checkpoint`, which is what the run saves when
    it finishes), a pretraining run directory (its ``encoder`` when the run has finished, else its latest
    checkpoint), or an :class:`mmv.Encoder`.

Preprocessing (:func:`embed_preprocess`)
    CT is windowed and resampled, X-rays resized and normalised (:class:`mmv.data.ModalityPreprocess`) as
    the encoder was trained: with the preprocessing its ``config.json`` records (:attr:`mmv.Encoder.preprocess`;
    an encoder directory, wherever it was copied, or an Encoder object), or the run config of a training
    checkpoint. An encoder directory written before mmv recorded it falls back to the run's ``config.json``
    beside it, else to the defaults (:mod:`mmv.data.preprocess`) with a warning. Each setting can be given
    explicitly instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mmv.data.preprocess import ModalityPreprocess
from mmv.model.checkpoint import CONFIG_NAME
from mmv.model.encoder import PREPROCESS_KEY, Encoder, MissingPreprocessWarning
from mmv.train.checkpoint import encoder_from_checkpoint, latest_checkpoint
from mmv.train.config import PretrainConfig
from mmv.train.sources import modality_preprocess

__all__ = ["LoadedEncoder", "embed_preprocess", "load_encoder", "weights_digest"]


@dataclass(frozen=True, eq=False)
class LoadedEncoder:
    """An encoder read for embedding, with the preprocessing it was trained with (when known).

    Attributes:
        encoder: the encoder, in eval mode.
        preprocess_from: where :attr:`preprocess` comes from: ``"the encoder"`` (its own record),
            ``"the pretraining run"`` (a run config) or ``"the defaults"``.
        source: what was read, for the record (a path, or ``"an Encoder object"``).
    """

    encoder: Encoder
    preprocess_from: str
    source: str

    @property
    def preprocess(self) -> ModalityPreprocess:
        """The preprocessing of its training run, or the defaults: the encoder's own record."""
        return self.encoder.preprocess


def _run_config(path: Path) -> PretrainConfig | None:
    """The pretraining config saved at ``path`` (a run's ``config.json``), or None if it is not one."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(values, dict) or "data" not in values or "model" not in values:
            return None
        return PretrainConfig.from_dict(values)
    except (OSError, UnicodeDecodeError, ValueError, TypeError, RecursionError):
        return None


def _records_preprocess(path: Path) -> bool:
    """Whether the encoder config at ``path`` records its preprocessing (unreadable: from_pretrained says why)."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return True
    return not isinstance(values, dict) or PREPROCESS_KEY in values


def _load_training_checkpoint(path: Path) -> LoadedEncoder:
    encoder = encoder_from_checkpoint(path, "teacher")
    return LoadedEncoder(encoder, "the pretraining run", str(path))


def _load_encoder_directory(path: Path) -> LoadedEncoder:
    if _records_preprocess(path / CONFIG_NAME):
        encoder = Encoder.from_pretrained(path)
        return LoadedEncoder(encoder, "the encoder", str(path))
    # Written before encoders recorded their preprocessing: the run config beside it still says what it was.
    run = _run_config(path.parent / CONFIG_NAME)
    if run is None:
        encoder = Encoder.from_pretrained(path)  # warns that the defaults are used
        return LoadedEncoder(encoder, "the defaults", str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingPreprocessWarning)
        encoder = Encoder.from_pretrained(path)
    encoder.preprocess = modality_preprocess(run.data)
    return LoadedEncoder(encoder, "the pretraining run", str(path))


def load_encoder(checkpoint: str | os.PathLike | Encoder) -> LoadedEncoder:
    """Read an encoder from any of the checkpoints ``mmv embed`` accepts (see the module documentation).

    Raises:
        FileNotFoundError: nothing at the path, or a directory that is neither an encoder nor a run.
        CheckpointError: an unreadable or foreign checkpoint, or weights that do not fit its config.
    """
    if isinstance(checkpoint, Encoder):
        return LoadedEncoder(checkpoint.eval(), "the encoder", "an Encoder object")
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a path or an mmv.Encoder, got {type(checkpoint).__name__}")
    path = Path(checkpoint)
    if path.is_file():
        return _load_training_checkpoint(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint file or directory")
    if (path / CONFIG_NAME).is_file() and _run_config(path / CONFIG_NAME) is None:
        return _load_encoder_directory(path)
    if (path / "encoder" / CONFIG_NAME).is_file():
        return _load_encoder_directory(path / "encoder")
    latest = latest_checkpoint(path / "checkpoints")
    if latest is not None:
        return _load_training_checkpoint(latest)
    raise FileNotFoundError(
        f"{path}: neither an encoder directory ({CONFIG_NAME} + weights) nor a pretraining run "
        "(encoder/ or checkpoints/step_*.pt)"
    )


def embed_preprocess(
    preprocess: ModalityPreprocess | None = None,
    *,
    ct_spacing: Sequence[float] | None = None,
    ct_window: Sequence[float] | None = None,
    xray_spacing: float | None = None,
    xray_short_side: int | None = None,
) -> ModalityPreprocess:
    """The preprocessing of embedding: the encoder's (or the defaults) with any setting replaced.

    ``xray_spacing`` (mm pixels) and ``xray_short_side`` (pixels) are alternatives: give at most one.
    """
    base = preprocess if preprocess is not None else ModalityPreprocess()
    if not isinstance(base, ModalityPreprocess):
        raise TypeError(f"preprocess must be an mmv.data.ModalityPreprocess or None, got {type(base).__name__}")
    if xray_spacing is not None and xray_short_side is not None:
        raise ValueError("give at most one of xray_spacing and xray_short_side")
    ct, xray = base.ct, base.xray
    if ct_spacing is not None:
        ct = dataclasses.replace(ct, spacing=tuple(ct_spacing))
    if ct_window is not None:
        ct = dataclasses.replace(ct, window=tuple(ct_window))
    if xray_spacing is not None:
        xray = dataclasses.replace(xray, short_side=None, spacing=(float(xray_spacing),) * 2)
    if xray_short_side is not None:
        xray = dataclasses.replace(xray, short_side=xray_short_side, spacing=None)
    return ModalityPreprocess(ct, xray)


def weights_digest(encoder: Encoder) -> str:
    """SHA-256 of the encoder's weights (names, dtypes, shapes and bytes), whatever file they came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
