"""``mmv.Image``: one 2D or 3D image with its voxel spacing, shared by the data pipeline and the encoder."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["Image", "is_meta_tensor"]


def is_meta_tensor(value: Any) -> bool:
    """True for a tensor carrying an affine and a metadata dict, as MONAI's MetaTensor does (checked by
    these attributes, so that mmv never imports MONAI)."""
    return (
        isinstance(value, torch.Tensor) and hasattr(value, "affine") and isinstance(getattr(value, "meta", None), dict)
    )


@dataclass
class Image:
    """A single-channel image with physical voxel spacing.

    Attributes:
        pixels: float32 tensor, ``[H, W]`` for a 2D image or ``[D, H, W]`` for a volume (axis order
            (z, y, x)). NumPy arrays and other dtypes are converted to a float32 tensor.
        spacing: voxel size in millimetres in the same axis order, one value per dimension.
        modality: optional free-form tag such as ``"CT"`` or ``"CR"``/``"DX"`` (X-ray).
    """

    pixels: torch.Tensor
    spacing: tuple[float, ...]
    modality: str | None = None

    def __post_init__(self) -> None:
        if is_meta_tensor(self.pixels):
            raise TypeError(
                "Image: pixels is a MONAI MetaTensor, whose axes are (x, y, z) with a spacing of their own; "
                "use Image.from_meta_tensor(pixels), or pass it to the encoder as it is"
            )
        if isinstance(self.pixels, np.ndarray):
            self.pixels = torch.from_numpy(np.ascontiguousarray(self.pixels))
        if not isinstance(self.pixels, torch.Tensor):
            raise TypeError(f"Image: pixels must be a torch.Tensor or numpy array, got {type(self.pixels).__name__}")
        if self.pixels.dim() not in (2, 3):
            raise ValueError(
                f"Image: pixels must be [H, W] (2D) or [D, H, W] (3D) with one channel, got shape "
                f"{tuple(self.pixels.shape)}"
            )
        if self.pixels.numel() == 0:
            raise ValueError(f"Image: pixels must not be empty, got shape {tuple(self.pixels.shape)}")
        if self.pixels.dtype != torch.float32:
            if self.pixels.is_complex():
                raise TypeError(f"Image: pixels must be real-valued, got {self.pixels.dtype}")
            self.pixels = self.pixels.float()
        try:
            spacing = tuple(float(s) for s in self.spacing)
        except (TypeError, ValueError):
            raise TypeError(f"Image: spacing must be a sequence of numbers, got {self.spacing!r}") from None
        if len(spacing) != self.pixels.dim():
            raise ValueError(
                f"Image: spacing must have one value per pixel dimension ({self.pixels.dim()}), got {spacing}"
            )
        if not all(math.isfinite(s) and s > 0 for s in spacing):
            raise ValueError(f"Image: spacing must be finite and positive (mm), got {spacing}")
        self.spacing = spacing
        if self.modality is not None and not isinstance(self.modality, str):
            raise TypeError(f"Image: modality must be a string or None, got {type(self.modality).__name__}")

    @classmethod
    def from_meta_tensor(cls, tensor: torch.Tensor, name: str = "image") -> Image:
        """The image of a MONAI MetaTensor: (z, y, x) in LPS orientation with spacing from its affine, as
        :func:`mmv.data.read_image` reads the same file (see :mod:`mmv.meta_tensor`)."""
        from mmv.meta_tensor import image_from_meta_tensor  # imports this module

        return image_from_meta_tensor(tensor, name)

    @property
    def is_3d(self) -> bool:
        """True for a volume ``[D, H, W]``, False for a 2D image ``[H, W]``."""
        return self.pixels.dim() == 3

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.pixels.shape)

    def to(self, *args, **kwargs) -> Image:
        """A copy with ``pixels.to(*args, **kwargs)`` (device moves; the dtype stays float32)."""
        return Image(self.pixels.to(*args, **kwargs).float(), self.spacing, self.modality)
