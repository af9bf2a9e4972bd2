"""Images to patch tokens: patches, physical token coordinates, and token dropping.

One patch size ``(pz, py, px)`` serves both kinds of image. A volume ``[D, H, W]`` is cut into
``pz x py x px`` patches; a 2D image ``[H, W]`` into ``py x px`` patches, which the encoder embeds with
its patch weights summed over z (exactly the embedding of the image repeated pz times along z, without
storing or multiplying the repeats). Sizes that are not multiples of the patch are padded evenly on
both sides, so every token holds some real pixels.

Token coordinates are the (z, y, x) position of each patch centre in millimetres, measured from the
centre of the image; a 2D image lies in the plane z = 0. The encoder divides them by its
``coordinate_unit_mm``.

Tokens can be dropped before the encoder ever sees them: background patches (every real voxel at or
below ``background_level``) and, for training, a random fraction of the rest. ``kept_indices`` records
where each kept token sits in the image's token grid, so outputs can be scattered back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mmv.image import Image
from mmv.meta_tensor import image_from_meta_tensor, is_meta_tensor

__all__ = ["Tokenizer", "TokenizedImage", "as_image", "grid_shape", "count_tokens", "check_patch_size"]

PatchSize = tuple[int, int, int]


def check_patch_size(patch_size: Sequence[int], owner: str) -> PatchSize:
    """``patch_size`` as a tuple of three positive ints ``(pz, py, px)``, or a ValueError naming ``owner``."""
    try:
        values = tuple(int(p) for p in patch_size)
        exact = all(int(p) == p for p in patch_size)
    except (TypeError, ValueError):
        raise TypeError(f"{owner}: patch_size must be three positive ints (pz, py, px), got {patch_size!r}") from None
    if len(values) != 3 or not exact or any(p < 1 for p in values):
        raise ValueError(f"{owner}: patch_size must be three positive ints (pz, py, px), got {patch_size!r}")
    return values


def grid_shape(image_shape: Sequence[int], patch_size: Sequence[int]) -> PatchSize:
    """The token grid ``(gz, gy, gx)`` of an image of shape ``[H, W]`` or ``[D, H, W]`` (gz = 1 in 2D)."""
    pz, py, px = check_patch_size(patch_size, "grid_shape")
    shape = tuple(int(s) for s in image_shape)
    if len(shape) not in (2, 3) or any(s < 1 for s in shape):
        raise ValueError(f"grid_shape: image_shape must be [H, W] or [D, H, W] with positive sizes, got {shape}")
    depth = math.ceil(shape[0] / pz) if len(shape) == 3 else 1
    return (depth, math.ceil(shape[-2] / py), math.ceil(shape[-1] / px))


def count_tokens(image_shape: Sequence[int], patch_size: Sequence[int]) -> int:
    """Number of patch tokens of an image before any dropping (no CLS or register tokens)."""
    return math.prod(grid_shape(image_shape, patch_size))


# A first or last axis this short could hold channels (gray + alpha, RGB, RGBA) rather than slices.
_MAX_CHANNELS = 4


def as_image(image: Image | torch.Tensor | np.ndarray, name: str = "image") -> Image:
    """An :class:`mmv.Image` from an Image, a MONAI MetaTensor, or an array read with 1 mm spacing.

    An Image is taken as it is. A MetaTensor (recognised by its ``affine`` and ``meta``) brings its own
    spacing and orientation: see :func:`mmv.meta_tensor.image_from_meta_tensor`. A plain array may be:

    - ``[H, W]`` or ``[1, H, W]`` (one channel first): a 2D image;
    - ``[D, H, W]`` or ``[1, D, H, W]``: a volume, when D and W are both more than 4.

    Anything else raises a ValueError naming ``name`` and the shape, in particular 3D arrays whose first
    or last axis has 1 to 4 entries (``(3, H, W)``, ``(H, W, 3)``, ``(H, W, 1)``), which could as well
    be colour or channel axes as slices: give a grayscale ``[H, W]`` or an ``mmv.Image(pixels, spacing)``.
    """
    if isinstance(image, Image):
        return image
    if is_meta_tensor(image):
        return image_from_meta_tensor(image, name)
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{name} must be an mmv.Image, a torch.Tensor or a numpy array, got {type(image).__name__}")
    shape = tuple(image.shape)
    if image.dim() in (3, 4) and image.shape[0] == 1:
        image = image[0]  # the one channel of a channel-first array
    elif image.dim() == 4:
        raise ValueError(
            f"{name} must have one channel: got a 4D array of shape {shape} with {shape[0]} channels "
            f"(expected [1, D, H, W])"
        )
    if image.dim() not in (2, 3):
        raise ValueError(f"{name} must be [H, W] (2D) or [D, H, W] (3D) with one channel, got shape {shape}")
    if image.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {shape}")
    if image.dim() == 3 and (image.shape[0] <= _MAX_CHANNELS or image.shape[-1] <= _MAX_CHANNELS):
        raise ValueError(
            f"{name} of shape {shape} is ambiguous: an axis of {_MAX_CHANNELS} or fewer at either end may "
            f"hold colour channels rather than slices. mmv encodes one channel: pass a grayscale [H, W] or "
            f"[1, H, W] image, or mmv.Image(pixels, spacing) for a volume [D, H, W]"
        )
    return Image(image, (1.0,) * image.dim())


@dataclass
class TokenizedImage:
    """The patch tokens of one image, before packing.

    Attributes:
        patches: float32 ``(N, py * px)`` for a 2D image or ``(N, pz * py * px)`` for a volume; each row
            is one patch flattened in (z, y, x) order.
        coords_mm: float32 ``(N, 3)``: (z, y, x) of each patch centre in mm from the image centre.
        kept_indices: int64 ``(N,)``: row-major index of each token in the ``grid_shape`` grid, increasing.
        grid_shape: ``(gz, gy, gx)``, the full token grid before dropping (gz = 1 for 2D).
        is_3d: whether the image was a volume.
        patch_size: the ``(pz, py, px)`` it was cut with.
        modality: the image's modality tag, if any.
    """

    patches: torch.Tensor
    coords_mm: torch.Tensor
    kept_indices: torch.Tensor
    grid_shape: PatchSize
    is_3d: bool
    patch_size: PatchSize
    modality: str | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.patches.shape[0])


class Tokenizer:
    """Cuts images into patch tokens with physical coordinates, dropping background and random tokens.

    Args:
        patch_size: ``(pz, py, px)``; 2D images use ``(py, px)``.
        background_level: drop patches whose every real (unpadded) pixel is ``<= background_level``
            (for example air in HU for CT). None keeps every patch. An image that is all background
            keeps all of its tokens rather than none.
        drop_rate: fraction of the remaining tokens dropped at random (NaViT-style, for training),
            in ``[0, 1)``; at least one token per image is kept.
        pad_value: the pixel value used to pad sizes up to a multiple of the patch.
    """

    def __init__(
        self,
        patch_size: Sequence[int] = (16, 16, 16),
        *,
        background_level: float | None = None,
        drop_rate: float = 0.0,
        pad_value: float = 0.0,
    ) -> None:
        self.patch_size = check_patch_size(patch_size, "Tokenizer")
        if background_level is not None:
            background_level = float(background_level)
            if math.isnan(background_level):
                raise ValueError("Tokenizer: background_level must be a number or None, got nan")
        self.background_level = background_level
        drop_rate = float(drop_rate)
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"Tokenizer: drop_rate must be in [0, 1), got {drop_rate}")
        self.drop_rate = drop_rate
        pad_value = float(pad_value)
        if not math.isfinite(pad_value):
            raise ValueError(f"Tokenizer: pad_value must be finite, got {pad_value}")
        self.pad_value = pad_value

    def __repr__(self) -> str:
        return (
            f"Tokenizer(patch_size={self.patch_size}, background_level={self.background_level}, "
            f"drop_rate={self.drop_rate}, pad_value={self.pad_value})"
        )

    def __call__(
        self,
        image: Image | torch.Tensor | np.ndarray,
        generator: torch.Generator | None = None,
    ) -> TokenizedImage:
        """Tokenise one image (an :class:`mmv.Image`, a MONAI MetaTensor, or an array read with 1 mm spacing;
        see :func:`as_image`).

        ``generator`` (a CPU generator) draws the random token drop, when ``drop_rate > 0``.
        """
        image = as_image(image)
        pixels = image.pixels
        if not bool(torch.isfinite(pixels).all()):
            raise ValueError(
                f"Tokenizer: image pixels must be finite, got NaN or infinite values in an image of shape "
                f"{tuple(pixels.shape)}"
            )
        pz, py, px = self.patch_size
        volume = pixels if image.is_3d else pixels[None]
        spacing = image.spacing if image.is_3d else (1.0, *image.spacing)
        patch = (pz if image.is_3d else 1, py, px)
        grid = grid_shape(pixels.shape, self.patch_size)
        pad_low = [(g * p - n) // 2 for g, p, n in zip(grid, patch, volume.shape)]
        pad_high = [g * p - n - low for g, p, n, low in zip(grid, patch, volume.shape, pad_low)]

        patches, is_background = self._cut(volume, patch, grid, pad_low, pad_high)
        kept = self._kept_indices(patches.shape[0], is_background, generator)
        if kept.numel() < patches.shape[0]:
            patches = patches[kept.to(patches.device)]
        coords = _patch_centres_mm(kept, grid, patch, volume.shape, pad_low, spacing)
        return TokenizedImage(
            patches=patches,
            coords_mm=coords.to(pixels.device),
            kept_indices=kept.to(pixels.device),
            grid_shape=grid,
            is_3d=image.is_3d,
            patch_size=self.patch_size,
            modality=image.modality,
        )

    def _cut(self, volume, patch, grid, pad_low, pad_high) -> tuple[torch.Tensor, torch.Tensor | None]:
        """All patches ``(N, prod(patch))`` of the padded volume, and which are background (or None)."""
        # F.pad takes (x_low, x_high, y_low, y_high, z_low, z_high).
        pads = [pad_low[2], pad_high[2], pad_low[1], pad_high[1], pad_low[0], pad_high[0]]
        padded_any = any(pads)
        fill = -math.inf if (self.background_level is not None and padded_any) else self.pad_value
        padded = F.pad(volume[None], pads, value=fill)[0] if padded_any else volume
        gz, gy, gx = grid
        pz, py, px = patch
        patches = (
            padded.reshape(gz, pz, gy, py, gx, px).permute(0, 2, 4, 1, 3, 5).reshape(gz * gy * gx, pz * py * px)
        )
        is_background = None
        if self.background_level is not None:
            # Padding is -inf here so that it never decides whether a patch is background.
            is_background = patches.amax(dim=1) <= self.background_level
            if padded_any:
                patches = torch.where(torch.isneginf(patches), self.pad_value, patches)
        return patches, is_background

    def _kept_indices(self, num_patches: int, is_background: torch.Tensor | None, generator) -> torch.Tensor:
        """Increasing int64 indices (on the CPU) of the patches that become tokens."""
        kept = torch.arange(num_patches)
        if is_background is not None:
            foreground = torch.nonzero(~is_background.cpu()).flatten()
            if foreground.numel() > 0:
                kept = foreground
        if self.drop_rate > 0.0:
            num_kept = max(1, round(kept.numel() * (1.0 - self.drop_rate)))
            chosen = torch.randperm(kept.numel(), generator=generator)[:num_kept]
            kept = kept[chosen.sort().values]
        return kept


def _patch_centres_mm(kept, grid, patch, shape, pad_low, spacing) -> torch.Tensor:
    """(z, y, x) in mm of the centres of the kept patches, from the centre of the unpadded image."""
    gz, gy, gx = grid
    index = torch.stack((kept // (gy * gx), (kept // gx) % gy, kept % gx), dim=1).double()
    patch_t = torch.tensor(patch, dtype=torch.float64)
    centre_voxel = index * patch_t + (patch_t - 1) / 2 - torch.tensor(pad_low, dtype=torch.float64)
    image_centre = (torch.tensor(shape, dtype=torch.float64) - 1) / 2
    return ((centre_voxel - image_centre) * torch.tensor(spacing, dtype=torch.float64)).float()
