"""Multi-crop views for self-supervised pretraining, cut in physical space for 2D and 3D images alike.

A crop is a box in millimetres: its area (2D) or volume (3D) is a random share of the image's (the scale
range, as in DINOv2's random resized crops), its side lengths have a random log-uniform aspect ratio, and
it is resampled (bilinear / trilinear) to a fixed grid of voxels. The view's spacing is the box's extent
over the grid, so a view's tokens keep their true physical size and positions for the 3D rotary
embeddings. Global views (the teacher sees these) take large shares, local views small ones; their grids
differ, so the views of one image are sequences of different lengths in one pack.

After cropping: a random contrast/brightness change, Gaussian blur (sigma in mm) and Gaussian noise, on
intensities already normalised to about [-1, 1] by :mod:`mmv.data.preprocess`. Flips are off by default
(left and right are not interchangeable in a chest); ``flip_axes`` allows them per axis.

All randomness comes from the ``torch.Generator`` passed in, so a view depends only on its seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mmv.image import Image

__all__ = ["CropSpec", "MultiCrop", "random_crop", "AXIS_NAMES"]

AXIS_NAMES = ("z", "y", "x")


@dataclass(frozen=True)
class CropSpec:
    """One kind of view.

    Attributes:
        size_2d: output grid ``(H, W)`` of views of 2D images, in pixels.
        size_3d: output grid ``(D, H, W)`` of views of volumes, in voxels.
        scale: range of the share of the image's area (2D) or volume (3D) that the box covers.
        aspect_ratio: range of the ratio between two sides of the box, drawn log-uniformly.
    """

    size_2d: tuple[int, int]
    size_3d: tuple[int, int, int]
    scale: tuple[float, float]
    aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self) -> None:
        for name, dims in (("size_2d", 2), ("size_3d", 3)):
            value = tuple(getattr(self, name))
            if len(value) != dims or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
                raise ValueError(f"CropSpec: {name} must be {dims} positive ints, got {getattr(self, name)!r}")
            object.__setattr__(self, name, value)
        low, high = (float(v) for v in self.scale)
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"CropSpec: scale must satisfy 0 < low <= high <= 1, got {self.scale!r}")
        object.__setattr__(self, "scale", (low, high))
        low, high = (float(v) for v in self.aspect_ratio)
        if not 0.0 < low <= high:
            raise ValueError(f"CropSpec: aspect_ratio must satisfy 0 < low <= high, got {self.aspect_ratio!r}")
        object.__setattr__(self, "aspect_ratio", (low, high))

    def size(self, is_3d: bool) -> tuple[int, ...]:
        return self.size_3d if is_3d else self.size_2d


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def random_crop(image: Image, spec: CropSpec, generator: torch.Generator) -> Image:
    """A random box of ``image`` in physical space, resampled to ``spec``'s grid (see the module doc)."""
    dims = image.pixels.dim()
    extent = [n * s for n, s in zip(image.shape, image.spacing)]
    share = _uniform(generator, *spec.scale)
    log_low, log_high = (math.log(r) for r in spec.aspect_ratio)
    log_ratios = [_uniform(generator, log_low, log_high) for _ in range(dims)]
    mean_log = sum(log_ratios) / dims
    side = (share * math.prod(extent)) ** (1 / dims)
    sides = [min(e, side * math.exp(r - mean_log)) for e, r in zip(extent, log_ratios)]
    starts = [_uniform(generator, 0.0, e - s) for e, s in zip(extent, sides)]
    size = spec.size(image.is_3d)
    # grid_sample wants, per output voxel, the input position in [-1, 1] across the outer edges
    # (align_corners=False), in (x, y[, z]) order.
    axes = []
    for start, length, count, total in zip(starts, sides, size, extent):
        centres_mm = start + (torch.arange(count, dtype=torch.float32) + 0.5) * (length / count)
        axes.append(centres_mm * (2.0 / total) - 1.0)
    mesh = torch.meshgrid(*axes, indexing="ij")
    grid = torch.stack(mesh[::-1], dim=-1)[None]
    pixels = image.pixels[None, None]
    resampled = F.grid_sample(pixels, grid.to(pixels.device), mode="bilinear", padding_mode="border", align_corners=False)
    spacing = tuple(length / count for length, count in zip(sides, size))
    return Image(resampled[0, 0], spacing, image.modality)


def _gaussian_blur(pixels: torch.Tensor, sigma_voxels: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur with a sigma per axis (in voxels), reflecting at the borders.

    Each axis is a weighted sum of shifted views of the padded image: for kernels of a few taps this
    is cheaper than a convolution call and needs no thread pool.
    """
    out = pixels
    dims = pixels.dim()
    for axis, sigma in enumerate(sigma_voxels):
        size = out.shape[axis]
        if sigma < 0.2 or size < 2:
            continue
        radius = min(max(1, math.ceil(3 * sigma)), size - 1)
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
        kernel = (kernel / kernel.sum()).tolist()
        padding = [0, 0] * dims
        # F.pad lists the last axis first.
        padding[2 * (dims - 1 - axis)] = padding[2 * (dims - 1 - axis) + 1] = radius
        padded = F.pad(out[None], padding, mode="reflect")[0]
        blurred = torch.zeros_like(out)
        for shift, weight in enumerate(kernel):
            blurred.add_(padded.narrow(axis, shift, size), alpha=weight)
        out = blurred
    return out


@dataclass(frozen=True)
class MultiCrop:
    """DINOv2-style multi-crop in physical space: ``num_global`` global and ``num_local`` local views.

    Attributes:
        global_crop: :class:`CropSpec` of the global views (the teacher's).
        local_crop: :class:`CropSpec` of the local views.
        num_global: global views per image (2 in DINO).
        num_local: local views per image.
        contrast: range of the multiplicative contrast change around the view's mean.
        brightness: range of the additive intensity shift.
        blur_probability: chance of a Gaussian blur per view.
        blur_sigma_mm: range of the blur's sigma in mm.
        noise_probability: chance of additive Gaussian noise per view.
        noise_std: range of the noise's standard deviation.
        flip_axes: axes (``"z"``, ``"y"``, ``"x"``) that may be flipped, each with probability 1/2;
            none by default, since a chest is not left-right symmetric. 2D images use ``"y"`` and ``"x"``.
    """

    global_crop: CropSpec = field(default_factory=lambda: CropSpec((224, 224), (96, 96, 96), (0.32, 1.0)))
    local_crop: CropSpec = field(default_factory=lambda: CropSpec((96, 96), (48, 48, 48), (0.05, 0.32)))
    num_global: int = 2
    num_local: int = 8
    contrast: tuple[float, float] = (0.8, 1.2)
    brightness: tuple[float, float] = (-0.1, 0.1)
    blur_probability: float = 0.5
    blur_sigma_mm: tuple[float, float] = (0.5, 4.0)
    noise_probability: float = 0.5
    noise_std: tuple[float, float] = (0.0, 0.05)
    flip_axes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("global_crop", "local_crop"):
            if not isinstance(getattr(self, name), CropSpec):
                raise TypeError(f"MultiCrop: {name} must be a CropSpec, got {type(getattr(self, name)).__name__}")
        if isinstance(self.num_global, bool) or not isinstance(self.num_global, int) or self.num_global < 1:
            raise ValueError(f"MultiCrop: num_global must be a positive int, got {self.num_global!r}")
        if isinstance(self.num_local, bool) or not isinstance(self.num_local, int) or self.num_local < 0:
            raise ValueError(f"MultiCrop: num_local must be a non-negative int, got {self.num_local!r}")
        for name in ("contrast", "brightness", "blur_sigma_mm", "noise_std"):
            low, high = (float(v) for v in getattr(self, name))
            if not low <= high:
                raise ValueError(f"MultiCrop: {name} must be a range (low, high) with low <= high, got {getattr(self, name)!r}")
            object.__setattr__(self, name, (low, high))
        for name in ("blur_probability", "noise_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"MultiCrop: {name} must lie in [0, 1], got {getattr(self, name)!r}")
        unknown = [axis for axis in self.flip_axes if axis not in AXIS_NAMES]
        if unknown:
            raise ValueError(f"MultiCrop: flip_axes must name axes among {AXIS_NAMES}, got {self.flip_axes!r}")
        object.__setattr__(self, "flip_axes", tuple(self.flip_axes))

    @property
    def num_views(self) -> int:
        return self.num_global + self.num_local

    def view_sizes(self, is_3d: bool) -> list[tuple[int, ...]]:
        """Grid of every view of an image, globals first."""
        return [self.global_crop.size(is_3d)] * self.num_global + [self.local_crop.size(is_3d)] * self.num_local

    def __call__(self, image: Image, generator: torch.Generator) -> list[Image]:
        """The views of ``image``: ``num_global`` globals, then ``num_local`` locals."""
        if not isinstance(image, Image):
            raise TypeError(f"MultiCrop: image must be an mmv.Image, got {type(image).__name__}")
        specs = [self.global_crop] * self.num_global + [self.local_crop] * self.num_local
        return [self._photometric(random_crop(image, spec, generator), generator) for spec in specs]

    def _photometric(self, view: Image, generator: torch.Generator) -> Image:
        pixels = view.pixels
        names = AXIS_NAMES[-pixels.dim() :]
        flips = [axis for axis, name in enumerate(names) if name in self.flip_axes and _uniform(generator, 0, 1) < 0.5]
        if flips:
            pixels = pixels.flip(flips)
        mean = pixels.mean()
        pixels = (pixels - mean) * _uniform(generator, *self.contrast) + mean + _uniform(generator, *self.brightness)
        if _uniform(generator, 0, 1) < self.blur_probability:
            sigma_mm = _uniform(generator, *self.blur_sigma_mm)
            pixels = _gaussian_blur(pixels, [sigma_mm / s for s in view.spacing])
        if _uniform(generator, 0, 1) < self.noise_probability:
            std = _uniform(generator, *self.noise_std)
            pixels = pixels + std * torch.randn(pixels.shape, generator=generator).to(pixels.device)
        return Image(pixels.contiguous(), view.spacing, view.modality)
