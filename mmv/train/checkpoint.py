"""Training checkpoints: one file per saved step, written atomically and durably, checksummed, the last K kept.

A checkpoint is a dict of tensors and plain Python values (numbers, strings, lists, dicts), saved with
``torch.save`` and loaded with ``torch.load(weights_only=True)``, so loading one never runs code from the
file. Files are named ``step_00001234.pt`` inside the run's checkpoint directory. Each holds, under the
key ``"sha256"``, the SHA-256 of its content (every tensor's dtype, shape and bytes and every plain value,
in order); :func:`load_checkpoint` recomputes it, so a flipped byte anywhere in the data is an error rather
than silently different weights.

:class:`CheckpointError` is the one error type of every unusable checkpoint in mmv, training checkpoints
and encoder directories alike (exported as ``mmv.CheckpointError``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmv.files import TEMPORARY_SUFFIX, atomic_write

__all__ = [
    "CheckpointError",
    "CHECKSUM_KEY",
    "TRAINING_CHECKPOINT_FORMAT",
    "content_digest",
    "parse_json_config",
    "save_checkpoint",
    "load_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "capture_rng_state",
    "check_rng_state",
    "restore_rng_state",
]

_NAME = re.compile(r"^step_(\d{8})\.pt$")

CHECKSUM_KEY = "sha256"

# The "format" entry of the state a pretraining run saves (mmv.train) and mmv embed reads.
TRAINING_CHECKPOINT_FORMAT = "mmv-pretrain-checkpoint"

# A config.json is a few hundred bytes; anything near this size is not one, and is not read whole.
MAX_CONFIG_BYTES = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint (a training checkpoint file or an encoder directory) is missing a part, unreadable,
    truncated, corrupt, or holds a config or weights that do not fit the model.

    Attributes:
        path: the file (or directory) at fault.
        reason: what is wrong with it.
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def parse_json_config(text: str | bytes, path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's config, JSON text holding an object, as a dict.

    Raises:
        CheckpointError: naming ``path``, for text over 1 MiB, invalid JSON, JSON nested too deeply for the
            parser, or JSON that is not an object.
    """
    if len(text) > MAX_CONFIG_BYTES:
        raise CheckpointError(path, f"the config is over {MAX_CONFIG_BYTES} bytes, more than a config can be")
    try:
        config = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(path, f"cannot read the config as JSON ({error})") from error
    except RecursionError:
        raise CheckpointError(path, "cannot read the config as JSON (nested too deeply)") from None
    if not isinstance(config, dict):
        raise CheckpointError(path, f"the config must be a JSON object, got {type(config).__name__}")
    return config


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
    """Write ``state`` with its checksum as the checkpoint of ``step`` and delete all but the newest ``keep``.

    The file is written under a temporary name, fsynced and renamed into place, so a run killed while
    saving (or a power loss) leaves the previous checkpoints intact and never a half-written one; the
    temporary file such a kill leaves is removed by the next save (one run writes a directory).

    Raises:
        OSError: "no space left on <directory>" for a full disk, or the file system's error.
        TypeError: ``state`` holds a value a checkpoint cannot store (see the module documentation).
    """
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 10**8:
        raise ValueError(f"save_checkpoint: step must be an int in [0, 1e8), got {step!r}")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"save_checkpoint: keep must be a positive int, got {keep!r}")
    if not isinstance(state, dict) or CHECKSUM_KEY in state:
        raise ValueError(f"save_checkpoint: state must be a dict without a {CHECKSUM_KEY!r} key")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{step:08d}.pt"
    # One run writes a checkpoint directory, so a temporary file found now was left by a killed save.
    for stale in directory.glob(f"step_*.pt.*{TEMPORARY_SUFFIX}"):
        stale.unlink(missing_ok=True)
    checksummed = {**state, CHECKSUM_KEY: content_digest(state)}
    atomic_write(path, lambda stream: torch.save(checksummed, stream))
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint on the CPU without executing code from it, and verify its checksum.

    Returns the state as saved (without the checksum).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is truncated or corrupt (its content does not match its checksum), holds
            something other than a dict, or is not an mmv training checkpoint (no checksum).
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
    expected = state.pop(CHECKSUM_KEY, None)
    if not isinstance(expected, str):
        raise CheckpointError(path, f"not an mmv pretraining checkpoint (no {CHECKSUM_KEY!r} checksum)")
    try:
        actual = content_digest(state)
    except (TypeError, RecursionError) as error:
        raise CheckpointError(path, f"the checkpoint holds a value no checkpoint holds ({error})") from None
    if actual != expected:
        raise CheckpointError(path, "the checkpoint is corrupt: its content does not match its checksum")
    return state


def content_digest(state: Any) -> str:
    """SHA-256 (hex) of a checkpoint's content: tensors by dtype, shape and bytes, plain values by type and
    value, containers in order. Equal for a state and the same state after a ``torch.save``/``torch.load``.

    Raises:
        TypeError: a value that is neither a tensor, a plain Python value nor a container of them.
    """
    hasher = hashlib.sha256()
    _digest_into(hasher, state)
    return hasher.hexdigest()


def _digest_into(hasher, value: Any) -> None:
    # Each value is tagged with its kind and length, so different structures never hash alike.
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        hasher.update(f"T{tensor.dtype}{tuple(tensor.shape)};".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        hasher.update(f"D{len(value)};".encode())
        for key, item in value.items():
            _digest_into(hasher, key)
            _digest_into(hasher, item)
    elif isinstance(value, list | tuple):
        hasher.update(f"L{len(value)};".encode())
        for item in value:
            _digest_into(hasher, item)
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        hasher.update(f"S{len(data)};".encode() + data)
    elif value is None or isinstance(value, bool):
        hasher.update(f"{value!r};".encode())
    elif isinstance(value, int):
        hasher.update(f"I{value};".encode())
    elif isinstance(value, float):
        hasher.update(f"F{value.hex()};".encode())
    else:
        raise TypeError(f"a checkpoint cannot hold a {type(value).__name__}")


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


def _library_states(state: dict[str, Any]) -> tuple[tuple, tuple, torch.Tensor]:
    """The Python, NumPy and torch CPU states of a :func:`capture_rng_state` dict, in each library's form."""
    version, internal, gauss = state["python"]
    kind, keys, position, has_gauss, cached = state["numpy"]
    return (
        (version, tuple(internal), gauss),
        (kind, keys.numpy().astype(np.uint32), position, has_gauss, cached),
        state["torch"],
    )


def check_rng_state(state: dict[str, Any]) -> None:
    """Raise (KeyError, TypeError, ValueError, ...) unless :func:`restore_rng_state` can restore ``state``;
    tried on scratch generators, so the global ones are untouched."""
    python_state, numpy_state, torch_state = _library_states(state)
    random.Random().setstate(python_state)
    np.random.RandomState().set_state(numpy_state)
    torch.Generator().set_state(torch_state)
    if "cuda" in state and not all(isinstance(s, torch.Tensor) for s in state["cuda"]):
        raise TypeError("the CUDA generator states must be tensors")


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators saved by :func:`capture_rng_state`."""
    python_state, numpy_state, torch_state = _library_states(state)
    random.setstate(python_state)
    np.random.set_state(numpy_state)
    torch.set_rng_state(torch_state)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
