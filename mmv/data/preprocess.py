"""Preprocessing of :class:`mmv.Image` in physical units: resampling, CT windowing, X-ray normalisation, crop/pad.

Every function takes and returns an ``mmv.Image`` (2D ``[H, W]`` or 3D ``[D, H, W]``, spacing in mm in
(z, y, x) order) and never changes the orientation. :class:`CtPreprocess` and :class:`XrayPreprocess`
chain them into the two standard pipelines and can predict their output shape from the input shape and
spacing alone, which is what token-budget batching needs before any pixel is read.
:class:`ModalityPreprocess` applies one or the other by the image's dimension, for data sets that mix both.

The ``DEFAULT_*`` constants are the one place that defines the default preprocessing: the pipelines' own
defaults and the pretraining config's (:class:`mmv.train.config.DataConfig`) are taken from them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from mmv.image import Image

__all__ = [
    "resampled_shape",
    "resample_to_spacing",
    "ct_window",
    "normalize_xray",
    "resize_xray",
    "cropped_shape",
    "crop_or_pad",
    "CtPreprocess",
    "XrayPreprocess",
    "ModalityPreprocess",
    "DEFAULT_CT_SPACING",
    "DEFAULT_CT_WINDOW",
    "DEFAULT_XRAY_SHORT_SIDE",
    "DEFAULT_XRAY_PERCENTILES",
]

# The default preprocessing. CT: 1.5 mm isotropic voxels (a vit_small volume of a 350 mm chest is then
# about 15k tokens) and [-1000, 1000] HU; X-rays: 512 pixels on the short side, 0.5-99.5 % intensities.
DEFAULT_CT_SPACING = (1.5, 1.5, 1.5)
DEFAULT_CT_WINDOW = (-1000.0, 1000.0)
DEFAULT_XRAY_SHORT_SIDE = 512
DEFAULT_XRAY_PERCENTILES = (0.5, 99.5)
# The largest image any function here will make: 2^31 voxels (8 GiB of float32), beyond the finest
# whole-body CT. A larger result comes from a wrong spacing (metres read as millimetres, say) and is
# refused before anything is allocated.
MAX_OUTPUT_VOXELS = 1 << 31
# The smallest radiograph the X-ray pipeline accepts, in pixels per side: a smaller one holds no
# anatomy, and resizing it to a short side of hundreds of pixels would invent an image.
MIN_XRAY_SIDE = 16

# Percentiles are estimated from at most this many pixels taken on a regular stride: for the 0.5-99.5 %
# range of a radiograph this changes them negligibly and keeps the cost independent of image size.
_PERCENTILE_MAX_SAMPLES = 1 << 20


def _target_spacing(spacing: float | Sequence[float], dims: int, name: str) -> tuple[float, ...]:
    values = (spacing,) * dims if isinstance(spacing, (int, float)) else tuple(spacing)
    if len(values) != dims:
        raise ValueError(f"{name} must be a number or have one value per image dimension ({dims}), got {spacing!r}")
    try:
        values = tuple(float(value) for value in values)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must contain numbers, got {spacing!r}") from None
    if not all(math.isfinite(value) and value > 0 for value in values):
        raise ValueError(f"{name} must be finite and positive (mm), got {spacing!r}")
    return values


def _resample_factors(
    shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]
) -> tuple[tuple[float, ...], tuple[int, ...], tuple[float, ...]]:
    """Per-axis scale factors, output sizes and output spacings of :func:`resample_to_spacing`."""
    factors, sizes, spacings = [], [], []
    for size, current, wanted in zip(shape, spacing, target, strict=True):
        factor = current / wanted
        # The tolerance keeps 3000 * (512 / 3000) at 512 rather than 511.
        count = math.floor(size * factor + 1e-6)
        # An axis thinner than one target voxel (a single slice, say) is kept as it is.
        if count < 1:
            factor, count, wanted = 1.0, size, current
        factors.append(factor)
        sizes.append(count)
        spacings.append(wanted)
    return tuple(factors), tuple(sizes), tuple(spacings)


def _check_output_size(sizes: Sequence[int], what: str) -> None:
    voxels = math.prod(sizes)
    if voxels > MAX_OUTPUT_VOXELS:
        raise ValueError(
            f"{what} gives shape {tuple(sizes)} = {voxels} voxels, more than the {MAX_OUTPUT_VOXELS} "
            f"allowed (MAX_OUTPUT_VOXELS); is the image's spacing in mm?"
        )


def _checked_resample(
    shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]
) -> tuple[tuple[float, ...], tuple[int, ...], tuple[float, ...]]:
    """:func:`_resample_factors`, refusing outputs beyond ``MAX_OUTPUT_VOXELS``."""
    factors, sizes, spacings = _resample_factors(shape, spacing, target)
    what = (
        f"resampling image of shape {tuple(shape)} and spacing {tuple(spacing)} mm to target_spacing "
        f"{tuple(target)} mm"
    )
    _check_output_size(sizes, what)
    return factors, sizes, spacings


def resampled_shape(
    shape: Sequence[int], spacing: Sequence[float], target_spacing: float | Sequence[float]
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Shape and spacing that :func:`resample_to_spacing` gives for an image of ``shape`` and ``spacing``
    (raising the same ValueError for an output beyond ``MAX_OUTPUT_VOXELS``)."""
    target = _target_spacing(target_spacing, len(shape), "target_spacing")
    _, sizes, spacings = _checked_resample(shape, spacing, target)
    return sizes, spacings


def resample_to_spacing(
    image: Image, target_spacing: float | Sequence[float], antialias: bool | None = None
) -> Image:
    """Resample to a voxel spacing (mm) with trilinear (3D) or bilinear (2D) interpolation in physical space.

    Output voxel ``i`` has its centre ``(i + 0.5) * target`` mm from the outer edge of input voxel 0, so the
    output spacing is exactly the target and the field of view is kept to within one output voxel
    (``floor(size * spacing / target)`` voxels). An axis shorter than one target voxel keeps its size and
    spacing.

    Args:
        image: 2D or 3D image.
        target_spacing: one value for all axes or one per axis, (z, y, x) order.
        antialias: low-pass filter when shrinking (2D only, as in torch's anti-aliased bilinear resize).
            Defaults to True for 2D images and False for volumes.

    Raises:
        ValueError: the output would have more than ``MAX_OUTPUT_VOXELS`` voxels (checked before any
            allocation; usually a spacing in the wrong unit).
    """
    target = _target_spacing(target_spacing, image.pixels.dim(), "target_spacing")
    factors, sizes, spacings = _checked_resample(image.shape, image.spacing, target)
    if sizes == image.shape:
        return Image(image.pixels, spacings, image.modality)
    if antialias is None:
        antialias = not image.is_3d
    if antialias and image.is_3d:
        raise ValueError("antialias must be False for a 3D image (torch only anti-aliases 2D resizing)")
    # The aten kernels take the output size and the scale separately (F.interpolate derives one from the
    # other): the scale fixes the physical sample positions, the size is the one predicted above.
    pixels = image.pixels[None, None]
    if image.is_3d:
        resized = torch.ops.aten.upsample_trilinear3d(pixels, sizes, False, *factors)
    elif antialias:
        resized = torch.ops.aten._upsample_bilinear2d_aa(pixels, sizes, False, *factors)
    else:
        resized = torch.ops.aten.upsample_bilinear2d(pixels, sizes, False, *factors)
    return Image(resized[0, 0], spacings, image.modality)


def ct_window(image: Image, low: float = -1000.0, high: float = 1000.0) -> Image:
    """Map Hounsfield units linearly from ``[low, high]`` to ``[-1, 1]``, clipping outside; NaN becomes -1."""
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"CT window must satisfy low < high (HU), got low={low!r}, high={high!r}")
    return Image(_linear_to_unit_range(image.pixels, low, high), image.spacing, image.modality)


def _linear_to_unit_range(pixels: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``low -> -1``, ``high -> 1``, clipped, NaN to -1: one new tensor, then in-place passes."""
    result = (pixels - low).mul_(2.0 / (high - low)).sub_(1.0).clamp_(-1.0, 1.0)
    return result.nan_to_num_(nan=-1.0)


def normalize_xray(image: Image, low_percentile: float = 0.5, high_percentile: float = 99.5) -> Image:
    """Map X-ray intensities linearly so that the two percentiles land on -1 and 1, clipping outside.

    Robust to burnt-in labels and collimator edges at either end of the histogram. NaN becomes -1; an image
    whose percentiles coincide (constant) becomes all -1.
    """
    if not 0.0 <= low_percentile < high_percentile <= 100.0:
        raise ValueError(
            "percentiles must satisfy 0 <= low_percentile < high_percentile <= 100, got "
            f"{low_percentile!r} and {high_percentile!r}"
        )
    flat = image.pixels.reshape(-1)
    sample = flat[:: max(1, math.ceil(flat.numel() / _PERCENTILE_MAX_SAMPLES))].detach().cpu().numpy()
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return Image(torch.full_like(image.pixels, -1.0), image.spacing, image.modality)
    # NumPy selects percentiles by partial partitioning (linear time) where torch.quantile sorts.
    low, high = (float(value) for value in np.percentile(sample, [low_percentile, high_percentile]))
    if high <= low:
        return Image(torch.full_like(image.pixels, -1.0), image.spacing, image.modality)
    return Image(_linear_to_unit_range(image.pixels, low, high), image.spacing, image.modality)


def _xray_target(shape: Sequence[int], spacing: Sequence[float], short_side: int | None, target_spacing) -> tuple:
    if (short_side is None) == (target_spacing is None):
        raise ValueError("give exactly one of short_side and spacing")
    if len(shape) != 2:
        raise ValueError(f"image must be 2D [H, W] for X-ray resizing, got shape {tuple(shape)}")
    if min(shape) < MIN_XRAY_SIDE:
        raise ValueError(
            f"image must have at least {MIN_XRAY_SIDE} pixels per side (MIN_XRAY_SIDE) to be resized as an "
            f"X-ray, got shape {tuple(shape)}"
        )
    if target_spacing is not None:
        return _target_spacing(target_spacing, 2, "spacing")
    if isinstance(short_side, bool) or not isinstance(short_side, int) or short_side < 1:
        raise ValueError(f"short_side must be a positive int, got {short_side!r}")
    # The short side spans exactly short_side pixels: the spacing follows from its physical length.
    scale = min(shape) / short_side
    return tuple(current * scale for current in spacing)


def resize_xray(image: Image, short_side: int | None = None, spacing: float | Sequence[float] | None = None) -> Image:
    """Resize a 2D image (bilinear, anti-aliased) to a short side in pixels or to a pixel spacing in mm.

    The image needs at least ``MIN_XRAY_SIDE`` pixels per side, and the output at most
    ``MAX_OUTPUT_VOXELS`` pixels; either is a ValueError raised before anything is allocated.
    """
    return resample_to_spacing(image, _xray_target(image.shape, image.spacing, short_side, spacing), antialias=True)


def _crop_sizes(shape: Sequence[int], spacing: Sequence[float], size_mm) -> tuple[int, ...]:
    values = (size_mm,) * len(shape) if isinstance(size_mm, (int, float)) else tuple(size_mm)
    if len(values) != len(shape):
        raise ValueError(
            f"size_mm must be a number or have one entry per image dimension ({len(shape)}), got {size_mm!r}"
        )
    sizes = []
    for size, step, wanted in zip(shape, spacing, values, strict=True):
        if wanted is None:
            sizes.append(size)
            continue
        if not (isinstance(wanted, (int, float)) and math.isfinite(wanted) and wanted > 0):
            raise ValueError(f"size_mm entries must be positive numbers (mm) or None, got {size_mm!r}")
        sizes.append(max(1, round(wanted / step)))
    return tuple(sizes)


def _checked_crop_sizes(shape: Sequence[int], spacing: Sequence[float], size_mm) -> tuple[int, ...]:
    sizes = _crop_sizes(shape, spacing, size_mm)
    _check_output_size(sizes, f"cropping or padding to size_mm {size_mm!r} at spacing {tuple(spacing)} mm")
    return sizes


def cropped_shape(shape: Sequence[int], spacing: Sequence[float], size_mm) -> tuple[int, ...]:
    """Shape that :func:`crop_or_pad` gives for an image of ``shape`` and ``spacing``."""
    return _checked_crop_sizes(shape, spacing, size_mm)


def crop_or_pad(image: Image, size_mm: float | Sequence[float | None], fill: float = 0.0) -> Image:
    """Centre-crop or pad each axis to a physical extent in mm (``None`` leaves an axis as it is).

    The voxel count per axis is ``round(size_mm / spacing)``; padding uses ``fill`` (e.g. -1 after
    :func:`ct_window`, which is air). Where an odd number of voxels is removed or added, the extra one is
    at the end of the axis. An output beyond ``MAX_OUTPUT_VOXELS`` is a ValueError, raised before allocating.
    """
    sizes = _checked_crop_sizes(image.shape, image.spacing, size_mm)
    output = torch.full(sizes, float(fill), dtype=torch.float32)
    source, target = [], []
    for current, wanted in zip(image.shape, sizes, strict=True):
        if current >= wanted:
            start = (current - wanted) // 2
            source.append(slice(start, start + wanted))
            target.append(slice(0, wanted))
        else:
            start = (wanted - current) // 2
            source.append(slice(0, current))
            target.append(slice(start, start + current))
    output[tuple(target)] = image.pixels[tuple(source)]
    return Image(output, image.spacing, image.modality)


@dataclass(frozen=True)
class CtPreprocess:
    """The CT pipeline: window (HU to [-1, 1], NaN to air), trilinear resampling, optional crop/pad with air.

    The defaults are :data:`DEFAULT_CT_WINDOW` ([-1000, 1000] HU) and :data:`DEFAULT_CT_SPACING` (1.5 mm
    isotropic), those of pretraining. Windowing comes first so that NaN voxels and extreme values never
    bleed into their neighbours.

    Attributes:
        spacing: target voxel size in mm, (z, y, x).
        window: HU range mapped to [-1, 1].
        size_mm: physical extent to crop/pad to, per axis, or None for no crop/pad.
    """

    spacing: tuple[float, float, float] = DEFAULT_CT_SPACING
    window: tuple[float, float] = DEFAULT_CT_WINDOW
    size_mm: tuple[float | None, float | None, float | None] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "spacing", _target_spacing(self.spacing, 3, "spacing"))
        low, high = (float(value) for value in self.window)
        if not low < high:
            raise ValueError(f"window must be (low, high) with low < high, got {self.window!r}")
        object.__setattr__(self, "window", (low, high))
        if self.size_mm is not None:
            object.__setattr__(self, "size_mm", tuple(self.size_mm))
            _crop_sizes((1, 1, 1), (1.0, 1.0, 1.0), self.size_mm)

    def __call__(self, image: Image) -> Image:
        """Preprocess one CT volume in HU."""
        if not image.is_3d:
            raise ValueError(f"image must be a 3D volume [D, H, W] for CtPreprocess, got shape {image.shape}")
        self.output_shape(image.shape, image.spacing)  # sizes checked before the window allocates
        image = resample_to_spacing(ct_window(image, *self.window), self.spacing)
        if self.size_mm is not None:
            image = crop_or_pad(image, self.size_mm, fill=-1.0)
        return image

    def output_shape(self, shape: Sequence[int], spacing: Sequence[float]) -> tuple[int, ...]:
        """Shape of the result for an input of ``shape`` and ``spacing``, without touching pixels."""
        shape, spacing = resampled_shape(shape, spacing, self.spacing)
        return shape if self.size_mm is None else cropped_shape(shape, spacing, self.size_mm)


@dataclass(frozen=True)
class XrayPreprocess:
    """The X-ray pipeline: anti-aliased resize (short side or spacing), then robust percentile normalisation.

    The defaults are :data:`DEFAULT_XRAY_SHORT_SIDE` (512 pixels) and :data:`DEFAULT_XRAY_PERCENTILES`.

    Attributes:
        short_side: pixels on the short side after resizing (exclusive with ``spacing``).
        spacing: target pixel size in mm, (y, x) or one value (exclusive with ``short_side``).
        percentiles: intensity percentiles mapped to -1 and 1.
    """

    short_side: int | None = DEFAULT_XRAY_SHORT_SIDE
    spacing: tuple[float, float] | None = None
    percentiles: tuple[float, float] = DEFAULT_XRAY_PERCENTILES

    def __post_init__(self) -> None:
        if self.spacing is not None:
            object.__setattr__(self, "spacing", _target_spacing(self.spacing, 2, "spacing"))
        _xray_target((MIN_XRAY_SIDE, MIN_XRAY_SIDE), (1.0, 1.0), self.short_side, self.spacing)
        low, high = (float(value) for value in self.percentiles)
        if not 0.0 <= low < high <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles!r}")
        object.__setattr__(self, "percentiles", (low, high))

    def __call__(self, image: Image) -> Image:
        """Preprocess one 2D radiograph (any intensity scale, dense tissue bright)."""
        return normalize_xray(resize_xray(image, self.short_side, self.spacing), *self.percentiles)

    def output_shape(self, shape: Sequence[int], spacing: Sequence[float]) -> tuple[int, ...]:
        """Shape of the result for an input of ``shape`` and ``spacing``, without touching pixels."""
        target = _xray_target(shape, spacing, self.short_side, self.spacing)
        return resampled_shape(shape, spacing, target)[0]


@dataclass(frozen=True)
class ModalityPreprocess:
    """Preprocess volumes with ``ct`` and 2D images with ``xray``: the transform of a data set mixing both.

    It predicts output shapes like both (``output_shape``), so token-budget batching works on mixed data,
    and :meth:`to_dict` / :meth:`from_dict` give its JSON form, which :meth:`mmv.Encoder.save_pretrained`
    stores beside the weights. ``ModalityPreprocess()`` is the default preprocessing.

    Attributes:
        ct: the pipeline of 3D images.
        xray: the pipeline of 2D images.
    """

    ct: CtPreprocess = field(default_factory=CtPreprocess)
    xray: XrayPreprocess = field(default_factory=XrayPreprocess)

    def __post_init__(self) -> None:
        if not isinstance(self.ct, CtPreprocess):
            raise TypeError(f"ct must be a CtPreprocess, got {type(self.ct).__name__}")
        if not isinstance(self.xray, XrayPreprocess):
            raise TypeError(f"xray must be an XrayPreprocess, got {type(self.xray).__name__}")

    def __call__(self, image: Image) -> Image:
        return self.ct(image) if image.is_3d else self.xray(image)

    def output_shape(self, shape: Sequence[int], spacing: Sequence[float]) -> tuple[int, ...]:
        """Shape of the result for an input of ``shape`` and ``spacing``, without touching pixels."""
        return (self.ct if len(shape) == 3 else self.xray).output_shape(shape, spacing)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values: ``{"ct": {...}, "xray": {...}}`` with every field of both pipelines."""
        return {name: _json_fields(getattr(self, name)) for name in _PIPELINES}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModalityPreprocess:
        """The preprocessing from :meth:`to_dict`'s output; a missing or unknown key raises ValueError naming it."""
        _check_keys(values, _PIPELINES, "preprocess")
        return cls(**{
            name: _pipeline_from_dict(values[name], kind, f"preprocess.{name}") for name, kind in _PIPELINES.items()
        })


_PIPELINES = {"ct": CtPreprocess, "xray": XrayPreprocess}


def _json_fields(pipeline) -> dict[str, Any]:
    def plain(value):
        return [plain(item) for item in value] if isinstance(value, tuple) else value

    return {f.name: plain(getattr(pipeline, f.name)) for f in fields(pipeline)}


def _check_keys(values: Any, expected: Sequence[str], name: str) -> None:
    if not isinstance(values, dict):
        raise TypeError(f"{name} must be a JSON object, got {type(values).__name__}")
    missing = sorted(set(expected) - set(values))
    unknown = sorted(set(values) - set(expected))
    if missing or unknown:
        raise ValueError(f"{name} must have exactly the keys {sorted(expected)}: missing {missing}, unknown {unknown}")


def _pipeline_from_dict(values: Any, kind: type, name: str):
    _check_keys(values, [f.name for f in fields(kind)], name)
    # JSON has arrays, not tuples.
    return kind(**{key: tuple(value) if isinstance(value, list) else value for key, value in values.items()})
