"""iBOT-style block masking of patch tokens, in 2D and 3D, in packed form.

A mask is drawn on each image's full token grid as a union of random boxes (rectangles in 2D, boxes in
3D) until a sampled share of the grid is covered, then read at the image's kept tokens, so masks of all
images concatenate into one boolean per token of a :class:`mmv.packing.PackedBatch`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mmv.packing import PackedBatch

__all__ = ["block_mask", "sample_mask_ratios", "packed_block_mask"]


def block_mask(
    grid_shape: Sequence[int],
    ratio: float,
    generator: torch.Generator,
    min_block_tokens: int = 4,
    aspect_ratio: tuple[float, float] = (0.3, 1 / 0.3),
) -> torch.Tensor:
    """A bool mask over a ``(gz, gy, gx)`` token grid (flattened row-major) covering about ``ratio`` of it.

    Boxes of random size (at least ``min_block_tokens`` tokens, at most what is left to mask) and random
    log-uniform aspect ratios between the axes are added until the target count is reached or no box
    adds tokens ten times in a row. ``gz == 1`` gives 2D blocks.
    """
    shape = tuple(int(g) for g in grid_shape)
    if len(shape) != 3 or any(g < 1 for g in shape):
        raise ValueError(f"block_mask: grid_shape must be three positive ints (gz, gy, gx), got {grid_shape!r}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"block_mask: ratio must lie in [0, 1), got {ratio}")
    low, high = aspect_ratio
    if not 0 < low <= high:
        raise ValueError(f"block_mask: aspect_ratio must be (low, high) with 0 < low <= high, got {aspect_ratio}")
    mask = torch.zeros(shape, dtype=torch.bool)
    total = math.prod(shape)
    target = round(ratio * total)
    axes = [a for a in range(3) if shape[a] > 1]
    failures = 0
    while int(mask.sum()) < target and failures < 10:
        remaining = target - int(mask.sum())
        size = _uniform(generator, min(min_block_tokens, remaining), max(min_block_tokens, remaining))
        extents = [1, 1, 1]
        if axes:
            log_ratios = [_uniform(generator, math.log(low), math.log(high)) for _ in axes]
            mean_log = sum(log_ratios) / len(log_ratios)
            side = size ** (1 / len(axes))
            for axis, log_ratio in zip(axes, log_ratios):
                extents[axis] = max(1, min(shape[axis], round(side * math.exp(log_ratio - mean_log))))
        starts = [int(torch.randint(shape[a] - extents[a] + 1, (1,), generator=generator)) for a in range(3)]
        block = mask[starts[0] : starts[0] + extents[0], starts[1] : starts[1] + extents[1], starts[2] : starts[2] + extents[2]]
        before = int(mask.sum())
        block.fill_(True)
        failures = failures + 1 if int(mask.sum()) == before else 0
    return mask.flatten()


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def sample_mask_ratios(
    num_images: int,
    generator: torch.Generator,
    probability: float = 0.5,
    ratio_range: tuple[float, float] = (0.1, 0.5),
) -> list[float]:
    """Mask ratio of each of ``num_images`` images: 0 for unmasked ones, else spread over ``ratio_range``.

    A share ``probability`` of the images (rounded, drawn at random) is masked; their ratios split
    ``ratio_range`` into equal intervals with one uniform draw in each, as in DINOv2, so that every batch
    holds light and heavy masks.
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"sample_mask_ratios: probability must lie in [0, 1], got {probability}")
    low, high = ratio_range
    if not 0.0 <= low <= high < 1.0:
        raise ValueError(f"sample_mask_ratios: ratio_range must satisfy 0 <= low <= high < 1, got {ratio_range}")
    num_masked = round(probability * num_images)
    ratios = [0.0] * num_images
    chosen = torch.randperm(num_images, generator=generator)[:num_masked].tolist()
    for position, image in enumerate(chosen):
        lower = low + (high - low) * position / num_masked
        upper = low + (high - low) * (position + 1) / num_masked
        ratios[image] = _uniform(generator, lower, upper)
    return ratios


def packed_block_mask(
    batch: PackedBatch,
    ratios: Sequence[float],
    generator: torch.Generator,
    min_block_tokens: int = 4,
) -> torch.Tensor:
    """bool ``(T,)`` over the packed tokens: image b's tokens masked by a block mask of ``ratios[b]``.

    Masks are drawn on each image's full token grid and read at its kept tokens (``kept_indices``).
    """
    if len(ratios) != batch.num_images:
        raise ValueError(f"packed_block_mask: ratios must have one entry per image ({batch.num_images}), got {len(ratios)}")
    parts = []
    for kept, shape, ratio in zip(batch.split(batch.kept_indices), batch.grid_shapes, ratios):
        if ratio <= 0.0:
            parts.append(torch.zeros(kept.shape[0], dtype=torch.bool))
            continue
        parts.append(block_mask(shape, ratio, generator, min_block_tokens)[kept.cpu()])
    return torch.cat(parts).to(batch.device)
