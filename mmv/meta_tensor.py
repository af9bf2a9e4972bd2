"""MONAI's ``MetaTensor`` read into :class:`mmv.Image`, without importing MONAI.

A MetaTensor is a torch.Tensor whose axes are the image's index axes (i, j, k), usually with a channel
axis first (``EnsureChannelFirst``), and whose ``affine`` maps (i, j, k) to world millimetres in the
space its ``meta["space"]`` names (RAS unless MONAI was told otherwise). mmv's images are (z, y, x) in
the canonical LPS orientation with spacing in mm, as :func:`mmv.data.read_image` returns them, so a
volume's axes are permuted and flipped here by its affine and its spacing taken from the affine's
column lengths. Recognised by its ``affine`` and ``meta`` attributes, so ``import mmv`` never imports
MONAI.
"""

from __future__ import annotations

import numpy as np
import torch

from mmv.image import Image, is_meta_tensor
from mmv.orientation import signed_permutation

__all__ = ["is_meta_tensor", "image_from_meta_tensor"]

# RAS and LPS differ in the sign of their first two world axes.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def image_from_meta_tensor(tensor: torch.Tensor, name: str = "image") -> Image:
    """The :class:`mmv.Image` of a MetaTensor, with spacing in mm from its affine.

    The number of spatial axes is ``len(meta["spatial_shape"])`` (MONAI's readers give 2D images a 4 x 4
    affine too), else the affine's size less one; one more axis in front is a channel axis, which must
    hold one channel. ``[1, X, Y, Z]`` or ``[X, Y, Z]`` give a volume ``[D, H, W]`` in LPS orientation;
    ``[1, X, Y]`` or ``[X, Y]``, and a volume one voxel deep along Z (MONAI's ITKReader reads a single
    DICOM file so), give a 2D image ``[H, W]`` in stored row/column order: what
    :func:`mmv.data.read_image` gives for the same file.

    Raises:
        ValueError: naming ``name``, for a batch, several channels, a shape that does not fit the affine,
            or an oblique orientation (read such a file with :func:`mmv.data.read_image`, which resamples).
    """
    affine = np.asarray(torch.as_tensor(tensor.affine).detach().cpu(), dtype=np.float64)
    shape = tuple(tensor.shape)
    if getattr(tensor, "is_batch", False) or affine.ndim != 2:
        raise ValueError(f"{name}: a batched MetaTensor of shape {shape}; pass its images one by one")
    spatial_shape = tensor.meta.get("spatial_shape")
    spatial_dims = len(spatial_shape) if spatial_shape is not None else affine.shape[0] - 1
    if spatial_dims not in (2, 3) or affine.shape[0] != affine.shape[1] or affine.shape[0] < spatial_dims + 1:
        raise ValueError(
            f"{name}: MetaTensor must have 2 or 3 spatial axes and a square affine of at least that size plus "
            f"one, got {spatial_dims} spatial axes and an affine of shape {affine.shape}"
        )
    pixels = tensor.as_subclass(torch.Tensor).detach()
    if pixels.dim() == spatial_dims + 1:
        if shape[0] != 1:
            raise ValueError(f"{name}: MetaTensor must have one channel, got shape {shape} with {shape[0]} channels")
        pixels = pixels[0]
    if pixels.dim() != spatial_dims:
        axes = ", ".join("XYZ"[:spatial_dims])
        raise ValueError(
            f"{name}: MetaTensor of shape {shape} does not fit its {spatial_dims} spatial axes: expected "
            f"[1, {axes}] or [{axes}]"
        )
    if spatial_dims == 3 and pixels.shape[2] == 1:
        pixels, spatial_dims = pixels[:, :, 0], 2
    columns = affine[:spatial_dims, :spatial_dims] if spatial_dims == 3 else affine[:3, :2]
    spacing = np.linalg.norm(columns, axis=0)  # mm per step along each index axis
    if not np.all(np.isfinite(spacing) & (spacing > 0)):
        raise ValueError(f"{name}: MetaTensor affine has a zero or non-finite axis: {affine.tolist()}")
    if spatial_dims == 2:
        # Index axes (x, y) to rows and columns, as read_image gives a 2D image.
        return Image(pixels.transpose(0, 1).contiguous(), (float(spacing[1]), float(spacing[0])))
    space = tensor.meta.get("space", "RAS")
    space = str(getattr(space, "value", space)).upper()  # MONAI's SpaceKeys is a string enum
    direction = columns / spacing
    if space != "LPS":
        direction = _RAS_TO_LPS @ direction
    permutation = signed_permutation(direction)  # the index axis running along L, P and S, and its sign
    if permutation is None:
        raise ValueError(
            f"{name}: MetaTensor has an oblique orientation (affine {np.round(affine, 4).tolist()}); read the "
            f"file with mmv.data.read_image, which resamples it to LPS"
        )
    source_axis, signs = permutation
    # Output axes (z, y, x) = physical axes (S, P, L); flip those whose index axis runs the other way.
    pixels = pixels.permute(*(int(source_axis[axis]) for axis in (2, 1, 0)))
    flips = [2 - axis for axis in range(3) if signs[axis] < 0]
    if flips:
        pixels = pixels.flip(flips)
    return Image(pixels.contiguous(), tuple(float(spacing[source_axis[axis]]) for axis in (2, 1, 0)))
