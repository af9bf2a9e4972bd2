"""Training checkpoints: one file per saved step, written atomically and durably, checksummed, the last K kept.

This module is the one owner of the format: the files, the layout of the state a run saves
(:func:`training_state`), its verification and restoring (:func:`restore_training_state`), and reading an
encoder out of it (:func:`encoder_from_checkpoint`).

A checkpoint is a dict of tensors and plain Python values (numbers, strings, lists, dicts), saved with
``torch.save`` and loaded with ``torch.load(weights_only=True)``, so loading one never runs code from the
file. Files are named ``step_00001234.pt`` inside the run's checkpoint directory. Each holds, under the
key ``"sha256"``, the SHA-256 of its content (every tensor's dtype, shape and bytes and every plain value,
in order); :func:`load_checkpoint` recomputes it, so a flipped byte anywhere in the data is an error rather
than silently different weights.

The state of a run holds ``format`` (``"mmv-pretrain-checkpoint"``), the data position (``step``,
``epoch``, ``batch_in_epoch``), the state dicts of the ``student`` (:class:`mmv.ssl.objective.SslStudent`),
the ``teacher`` (:class:`mmv.ssl.teacher.EmaTeacher` of the student), the ``objective`` (loss centres) and
the ``optimizer``, the random generator states of every process (``rng``), and the run ``config`` as JSON.

An unusable checkpoint raises :class:`mmv.CheckpointError` (defined in :mod:`mmv.model.checkpoint`).
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
from torch import nn

from mmv.files import TEMPORARY_SUFFIX, atomic_write
from mmv.model.checkpoint import CheckpointError, check_state_dict, parse_json_config
from mmv.model.encoder import Encoder
from mmv.train.config import PretrainConfig
from mmv.train.sources import modality_preprocess

__all__ = [
    "CHECKSUM_KEY",
    "TRAINING_CHECKPOINT_FORMAT",
    "content_digest",
    "training_state",
    "restore_training_state",
    "encoder_from_checkpoint",
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

# The "format" entry of the state a pretraining run saves.
TRAINING_CHECKPOINT_FORMAT = "mmv-pretrain-checkpoint"

# Where each model's encoder lies in a run's state: the student is an SslStudent, the teacher an
# EmaTeacher holding a copy of it as ``module``.
_ENCODER_PREFIXES = {"teacher": "module.encoder.", "student": "encoder."}

# The entries of a run's state holding the data position, and those holding module state dicts.
_POSITION_KEYS = ("step", "epoch", "batch_in_epoch")
_MODULE_KEYS = ("student", "teacher", "objective")


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


def training_state(
    *,
    step: int,
    epoch: int,
    batch_in_epoch: int,
    student: nn.Module,
    teacher: nn.Module,
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    rng_states: list[dict[str, Any]],
    config: PretrainConfig,
) -> dict[str, Any]:
    """The state a pretraining run saves (see the module documentation), ready for :func:`save_checkpoint`.

    ``rng_states`` holds :func:`capture_rng_state` of every process, by rank.
    """
    return {
        "format": TRAINING_CHECKPOINT_FORMAT,
        "step": step,
        "epoch": epoch,
        "batch_in_epoch": batch_in_epoch,
        "student": student.state_dict(),
        "teacher": teacher.state_dict(),
        "objective": objective.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng_states,
        "config": json.dumps(config.to_dict()),
    }


def restore_training_state(
    path: str | os.PathLike,
    state: dict[str, Any],
    *,
    student: nn.Module,
    teacher: nn.Module,
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    rank: int,
    world_size: int,
) -> tuple[int, int, int]:
    """Check that ``state`` (read from ``path``) fits this run, then load it into the modules and the
    optimiser and restore process ``rank``'s random generators; returns ``(step, epoch, batch_in_epoch)``.

    Raises:
        CheckpointError: naming ``path``, when the state is not a run's, or does not fit these modules, this
            optimiser or this number of processes; nothing is loaded then unless the damage is one no
            check foresaw.
    """
    modules = {"student": student, "teacher": teacher, "objective": objective}
    try:
        _check_state(path, state, modules, optimizer, rank, world_size)
        for key, module in modules.items():
            module.load_state_dict(state[key])
        optimizer.load_state_dict(state["optimizer"])
        restore_rng_state(state["rng"][rank])
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as error:  # unforeseen damage
        raise CheckpointError(path, f"cannot restore the run from it ({type(error).__name__}: {error})") from error
    step, epoch, batch_in_epoch = (state[key] for key in _POSITION_KEYS)
    return step, epoch, batch_in_epoch


def _check_state(
    path: str | os.PathLike,
    state: dict[str, Any],
    modules: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    rank: int,
    world_size: int,
) -> None:
    _check_format(path, state)
    required = (*_POSITION_KEYS, *_MODULE_KEYS, "optimizer", "rng")
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(path, f"the checkpoint lacks {missing}")
    for key in _POSITION_KEYS:
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**62:
            raise CheckpointError(path, f"{key!r} must be a non-negative int, got {value!r}")
    for key, module in modules.items():
        _check_tensors(path, state, key)
        try:
            check_state_dict(path, state[key], module.state_dict())
        except CheckpointError as error:
            raise CheckpointError(path, f"{key}: {error.reason}") from None
    _check_optimizer_state(path, state["optimizer"], optimizer)
    rng_states = state["rng"]
    if not isinstance(rng_states, list) or len(rng_states) != world_size:
        count = len(rng_states) if isinstance(rng_states, list) else "no list of"
        raise CheckpointError(path, f"the checkpoint holds random states of {count} processes, this run has {world_size}")
    try:
        check_rng_state(rng_states[rank])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
        raise CheckpointError(path, f"unusable random generator states ({error})") from None


def _check_format(path: str | os.PathLike, state: dict[str, Any]) -> None:
    if state.get("format") != TRAINING_CHECKPOINT_FORMAT:
        raise CheckpointError(
            path, f"not an mmv pretraining checkpoint (expected format {TRAINING_CHECKPOINT_FORMAT!r})"
        )


def _check_tensors(path: str | os.PathLike, state: dict[str, Any], key: str) -> None:
    if not isinstance(state[key], dict) or not all(isinstance(t, torch.Tensor) for t in state[key].values()):
        raise CheckpointError(path, f"{key!r} must be a dict of tensors")


def _check_optimizer_state(path: str | os.PathLike, saved: Any, optimizer: torch.optim.Optimizer) -> None:
    """The saved AdamW state must have this optimiser's groups, and tensors shaped like their parameters."""
    if not (isinstance(saved, dict) and isinstance(saved.get("state"), dict) and isinstance(saved.get("param_groups"), list)):
        raise CheckpointError(path, "'optimizer' must be an optimiser state (a dict of 'state' and 'param_groups')")
    groups = optimizer.param_groups
    saved_sizes = [len(g.get("params", ())) if isinstance(g, dict) else None for g in saved["param_groups"]]
    sizes = [len(g["params"]) for g in groups]
    if saved_sizes != sizes:
        raise CheckpointError(path, f"the optimiser state has groups of {saved_sizes} parameters, this run's optimiser {sizes}")
    parameters = {}
    for saved_group, group in zip(saved["param_groups"], groups):
        parameters.update(zip(saved_group["params"], group["params"]))
    for index, values in saved["state"].items():
        if index not in parameters or not isinstance(values, dict):
            raise CheckpointError(path, f"the optimiser state has an entry {index!r} for no parameter")
        shape = tuple(parameters[index].shape)
        for name, value in values.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != shape:
                raise CheckpointError(
                    path,
                    f"optimiser state {name!r} of parameter {index} has shape {tuple(value.shape)}, the parameter {shape}",
                )


def encoder_from_checkpoint(path: str | os.PathLike, which: str = "teacher") -> Encoder:
    """The encoder of the EMA teacher (or of the student) saved in a training checkpoint file, in eval mode.

    Its :attr:`~mmv.Encoder.preprocess` is the preprocessing of the run (from the run config the
    checkpoint holds), so its users preprocess images as it was trained.

    Args:
        path: a checkpoint file of a pretraining run (``<run>/checkpoints/step_*.pt``).
        which: ``"teacher"`` (what a finished run saves as its encoder) or ``"student"``.

    Raises:
        ValueError: ``which`` is neither ``"teacher"`` nor ``"student"``.
        FileNotFoundError: no such file.
        CheckpointError: naming ``path``, for an unreadable, truncated or corrupt file, one that is not a
            pretraining checkpoint, an unusable run config, or weights that do not fit it.
    """
    if not isinstance(which, str) or which not in _ENCODER_PREFIXES:
        raise ValueError(f"encoder_from_checkpoint: which must be 'teacher' or 'student', got {which!r}")
    path = Path(path)
    state = load_checkpoint(path)
    _check_format(path, state)
    if which not in state:
        raise CheckpointError(path, f"the checkpoint lacks {[which]}")
    _check_tensors(path, state, which)
    try:
        config = PretrainConfig.from_dict(parse_json_config(state["config"], path))
        encoder_config = config.model.encoder_config()
        preprocess = modality_preprocess(config.data)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(path, f"its run config is unusable ({error})") from error
    prefix = _ENCODER_PREFIXES[which]
    weights = {name[len(prefix) :]: tensor for name, tensor in state[which].items() if name.startswith(prefix)}
    encoder = Encoder(encoder_config)
    check_state_dict(path, weights, encoder.state_dict())
    encoder.load_state_dict(weights)
    encoder.preprocess = preprocess
    return encoder.eval()
