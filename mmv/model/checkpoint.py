"""Saving and loading encoder weights without executing code: config as JSON, weights as safetensors.

Where the ``safetensors`` package is missing, weights are written with ``torch.save`` and read back with
``torch.load(weights_only=True)``, which also never runs code from the file.

:class:`CheckpointError` is the one error type of every unusable checkpoint in mmv, encoder directories
and training checkpoints (:mod:`mmv.train.checkpoint`) alike (exported as ``mmv.CheckpointError``), and
:func:`parse_json_config` the one reader of a checkpoint's JSON config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from mmv.files import atomic_write

__all__ = [
    "CheckpointError",
    "CONFIG_NAME",
    "SAFETENSORS_NAME",
    "TORCH_NAME",
    "parse_json_config",
    "write_checkpoint",
    "read_checkpoint",
    "check_state_dict",
]

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
TORCH_NAME = "model.pt"

# A config.json is a few hundred bytes; anything near this size is not one, and is not read whole.
MAX_CONFIG_BYTES = 1 << 20


try:
    import safetensors.torch as safetensors_torch
except ImportError:  # an optional dependency: fall back to torch.save / weights_only loading
    safetensors_torch = None


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


def write_checkpoint(directory: str | os.PathLike, config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> Path:
    """Write ``config.json`` and the weights into ``directory`` (created if needed); returns the weights path.

    Each file is written under a temporary name, fsynced and renamed, so a crash or a power loss never
    leaves a half-written one.

    Raises:
        OSError: "no space left on <directory>" for a full disk, or the file system's error.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}
    config_path = directory / CONFIG_NAME
    atomic_write(config_path, lambda stream: stream.write((json.dumps(config, indent=2) + "\n").encode()))
    if safetensors_torch is not None:
        weights_path, stale_path = directory / SAFETENSORS_NAME, directory / TORCH_NAME
        # Serialised here and written by atomic_write, so a full disk is reported as one.
        atomic_write(weights_path, lambda stream: stream.write(safetensors_torch.save(tensors, metadata={"format": "pt"})))
    else:
        weights_path, stale_path = directory / TORCH_NAME, directory / SAFETENSORS_NAME
        atomic_write(weights_path, lambda stream: torch.save(tensors, stream))
    # Weights of the other format from an earlier save would otherwise shadow or outlive these.
    stale_path.unlink(missing_ok=True)
    return weights_path


def read_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """Read ``(config, state_dict on the CPU, weights path)`` from a directory written by :func:`write_checkpoint`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such checkpoint directory")
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: the checkpoint has no {CONFIG_NAME}")
    try:
        with open(config_path, "rb") as stream:
            text = stream.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise CheckpointError(config_path, f"cannot read the config ({error})") from error
    config = parse_json_config(text, config_path)
    safetensors_path = directory / SAFETENSORS_NAME
    torch_path = directory / TORCH_NAME
    if safetensors_path.is_file():
        if safetensors_torch is None:
            raise CheckpointError(safetensors_path, "reading it needs the safetensors package (pip install safetensors)")
        return config, _load_safetensors(safetensors_path), safetensors_path
    if torch_path.is_file():
        return config, _load_torch(torch_path), torch_path
    raise FileNotFoundError(f"{directory}: the checkpoint has neither {SAFETENSORS_NAME} nor {TORCH_NAME}")


def check_state_dict(path: Path, loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Raise :class:`CheckpointError` unless ``loaded`` has exactly the names, shapes and kinds of dtype of ``expected``."""
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            path, f"the weights do not match the model: missing {_few(missing)}, unexpected {_few(unexpected)}"
        )
    for name, tensor in loaded.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                path, f"weight {name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(expected[name].shape)}"
            )
        # Floating-point weights load into any floating dtype; integer buffers (counters) must match exactly.
        wanted = expected[name]
        if wanted.is_floating_point() and not tensor.is_floating_point():
            raise CheckpointError(path, f"weight {name!r} must be floating point, got {tensor.dtype}")
        if not wanted.is_floating_point() and tensor.dtype != wanted.dtype:
            raise CheckpointError(path, f"weight {name!r} must be {wanted.dtype}, got {tensor.dtype}")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors_torch.load_file(str(path), device="cpu")
    except Exception as error:  # SafetensorError, OSError, ...: all mean the file is not usable
        raise CheckpointError(path, f"cannot read the weights ({type(error).__name__}: {error})") from error


def _load_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, pickle error, refused type: all mean the file is not usable
        raise CheckpointError(path, f"cannot read the weights ({type(error).__name__}: {error})") from error
    if not isinstance(loaded, dict) or not all(isinstance(t, torch.Tensor) for t in loaded.values()):
        raise CheckpointError(path, "the file must hold a dict of tensors")
    return loaded


def _few(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"[{shown}{more}]" if names else "none"
