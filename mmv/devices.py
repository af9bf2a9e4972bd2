"""Turning a user's device setting into a ``torch.device``, the same way for training and embedding."""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]


def resolve_device(device: str | torch.device | None, argument: str = "device") -> torch.device:
    """``device`` as a ``torch.device``; None or ``"auto"`` give CUDA where it is available, else the CPU.

    Raises:
        ValueError: ``device`` names no device, or asks for CUDA where none is available (the message
            names ``argument``).
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{argument} must be 'auto' or a torch device such as 'cpu' or 'cuda', got {device!r}") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{argument} {device!r} was asked for, but CUDA is not available")
    return resolved
