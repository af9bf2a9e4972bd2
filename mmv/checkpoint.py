"""Training checkpoints: one file per saved step, written atomically, the last K kept.

A checkpoint is a dict of tensors and plain Python values (numbers, strings, lists, dicts), saved with
``torch.save`` and loaded with ``torch.load(weights_only=True)``, so loading one never runs code from the
file. Files are named ``step_00001234.pt`` inside the run's checkpoint directory.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
]

_NAME = re.compile(r"^step_(\d{8})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, truncated or not a training checkpoint."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The checkpoint files of a directory, oldest step first (none if it does not exist)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in directory.iterdir() if (m := _NAME.match(path.name))]
    return [path for _, path in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The checkpoint of the highest step in ``directory``, or None."""
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


def save_checkpoint(directory: str | os.PathLike, step: int, state: dict[str, Any], keep: int = 3) -> Path:
    """Write ``state`` as the checkpoint of ``step`` and delete all but the newest ``keep`` checkpoints.

    The file is written under a temporary name and renamed into place, so a run killed while saving
    leaves the previous checkpoints intact and never a half-written one.
    """
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 10**8:
        raise ValueError(f"save_checkpoint: step must be an int in [0, 1e8), got {step!r}")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"save_checkpoint: keep must be a positive int, got {keep!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{step:08d}.pt"
    temporary = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint on the CPU without executing code from it.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is truncated, corrupt, or holds something other than a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, unpickling error, refused type: the file is not usable
        raise CheckpointError(path, f"cannot read the checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict):
        raise CheckpointError(path, f"a checkpoint must hold a dict, got {type(state).__name__}")
    return state


def capture_rng_state() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's global random generators (CPU and CUDA), as tensors and
    plain values that load with ``weights_only=True``."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators saved by :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
