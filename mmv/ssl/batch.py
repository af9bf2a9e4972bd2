"""Self-supervised batches: multi-crop views of every image, tokenised, masked and packed.

:class:`MultiCropDataset` turns a dataset of :class:`mmv.data.Sample` into the views of each image and
the iBOT masks of its global views; :class:`SslCollate` packs a batch of them into an :class:`SslBatch`.
All randomness of a sample comes from a seed that :class:`SeededBatchSampler` attaches to every index
(derived from the run's seed, the epoch and the sample's place in the epoch), so a batch is the same
whichever process or worker builds it and whenever, which is what makes resumed runs exact.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from mmv.packing import PackedBatch, pack
from mmv.ssl.augment import MultiCrop
from mmv.ssl.masking import block_mask, sample_mask_ratios
from mmv.tokenizer import TokenizedImage, Tokenizer, count_tokens

__all__ = ["SeededBatchSampler", "MultiCropDataset", "SslSample", "SslBatch", "SslCollate", "sample_dimensions"]


def _derive_seed(*values: int) -> int:
    return int(np.random.default_rng([int(v) for v in values]).integers(2**62))


class SeededBatchSampler(torch.utils.data.Sampler[list[tuple[int, int]]]):
    """Wraps a batch sampler: yields ``(index, seed)`` pairs and can start an epoch part-way.

    Args:
        batch_sampler: yields lists of dataset indices; ``set_epoch`` is forwarded to it.
        seed: the run's seed.
    """

    def __init__(self, batch_sampler, seed: int) -> None:
        self.batch_sampler = batch_sampler
        self.seed = int(seed)
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Produce epoch ``epoch`` next, skipping its first ``start_batch`` batches (to resume)."""
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(self.epoch)

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.start_batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for number, batch in enumerate(self.batch_sampler):
            if number < self.start_batch:
                continue
            yield [(int(index), _derive_seed(self.seed, self.epoch, number, position)) for position, index in enumerate(batch)]


def sample_dimensions(dataset, index: int) -> int:
    """2 or 3: whether sample ``index`` of a dataset is a 2D image or a volume, from headers when possible."""
    if hasattr(dataset, "locate") and hasattr(dataset, "sources"):
        source, local = dataset.locate(index)
        return sample_dimensions(dataset.sources[source], local)
    if hasattr(dataset, "image_info"):
        return len(dataset.image_info(index).shape)
    sample = dataset[index]
    if sample is None:
        raise ValueError(f"sample_dimensions: sample {index} is unreadable")
    return sample.image.pixels.dim()


@dataclass
class SslSample:
    """The tokenised views of one image (globals first) and the iBOT masks of its global views."""

    views: list[TokenizedImage]
    global_masks: list[torch.Tensor]
    modality: str | None


class MultiCropDataset(torch.utils.data.Dataset):
    """Views of every sample of ``source`` for self-supervised training.

    Indexed by ``(index, seed)`` pairs (see :class:`SeededBatchSampler`); returns an :class:`SslSample`,
    or None where ``source`` skips an unreadable file.

    Args:
        source: a dataset of :class:`mmv.data.Sample` (e.g. a ``Manifest`` or ``MixedDataset``).
        multicrop: the :class:`MultiCrop` views.
        tokenizer: cuts views into tokens (its ``drop_rate`` drops tokens at random).
        mask_probability: share of an image's global views that get an iBOT mask.
        mask_ratio: range of masked token shares.
    """

    def __init__(
        self,
        source,
        multicrop: MultiCrop,
        tokenizer: Tokenizer,
        mask_probability: float = 0.5,
        mask_ratio: tuple[float, float] = (0.1, 0.5),
    ) -> None:
        if not isinstance(multicrop, MultiCrop):
            raise TypeError(f"MultiCropDataset: multicrop must be a MultiCrop, got {type(multicrop).__name__}")
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"MultiCropDataset: tokenizer must be a Tokenizer, got {type(tokenizer).__name__}")
        self.source = source
        self.multicrop = multicrop
        self.tokenizer = tokenizer
        self.mask_probability = float(mask_probability)
        self.mask_ratio = tuple(float(r) for r in mask_ratio)
        sample_mask_ratios(multicrop.num_global, torch.Generator(), self.mask_probability, self.mask_ratio)

    def __len__(self) -> int:
        return len(self.source)

    def token_counts(self, progress: bool = True) -> list[int]:
        """Tokens of all views of every sample (before random dropping), for token-budget batching."""
        per_dims = {
            dims: sum(count_tokens(size, self.tokenizer.patch_size) for size in self.multicrop.view_sizes(dims == 3))
            for dims in (2, 3)
        }
        indices = tqdm(range(len(self)), desc="token counts", disable=not progress, leave=False)
        return [per_dims[sample_dimensions(self.source, i)] for i in indices]

    def __getitem__(self, key: tuple[int, int]) -> SslSample | None:
        if not (isinstance(key, tuple) and len(key) == 2):
            raise TypeError(f"MultiCropDataset: index with (index, seed) pairs from SeededBatchSampler, got {key!r}")
        index, seed = key
        sample = self.source[index]
        if sample is None:
            return None
        generator = torch.Generator().manual_seed(int(seed))
        views = [self.tokenizer(view, generator) for view in self.multicrop(sample.image, generator)]
        ratios = sample_mask_ratios(self.multicrop.num_global, generator, self.mask_probability, self.mask_ratio)
        masks = [
            block_mask(view.grid_shape, ratio, generator)[view.kept_indices] if ratio > 0 else torch.zeros(view.num_tokens, dtype=torch.bool)
            for view, ratio in zip(views, ratios)
        ]
        return SslSample(views=views, global_masks=masks, modality=sample.modality)


@dataclass
class SslBatch:
    """B images' views packed for the student and the teacher.

    Attributes:
        student: every view, view-major: view v of image b is image ``v * B + b`` of the pack; the first
            ``num_global * B`` images are the global views.
        teacher: the global views alone, in the same order (their tokens are the student's first rows).
        mask: bool ``(T_global,)`` over the teacher's tokens: which the student sees masked.
        num_images: B.
        num_global: global views per image.
        modalities: each image's modality.
    """

    student: PackedBatch
    teacher: PackedBatch
    mask: torch.Tensor
    num_images: int
    num_global: int
    modalities: tuple[str | None, ...]

    @property
    def num_views(self) -> int:
        return self.student.num_images // self.num_images

    def student_mask(self) -> torch.Tensor:
        """bool ``(T_student,)``: the iBOT mask over the student's tokens (local views never masked)."""
        extra = self.student.num_tokens - self.mask.shape[0]
        return torch.cat((self.mask, self.mask.new_zeros(extra)))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SslBatch:
        return SslBatch(
            student=self.student.to(device, non_blocking),
            teacher=self.teacher.to(device, non_blocking),
            mask=self.mask.to(device, non_blocking=non_blocking),
            num_images=self.num_images,
            num_global=self.num_global,
            modalities=self.modalities,
        )


class SslCollate:
    """``collate_fn`` packing :class:`SslSample` items into an :class:`SslBatch` (None items are dropped;
    a batch of only None collates to None)."""

    def __call__(self, samples: Sequence[SslSample | None]) -> SslBatch | None:
        present = [sample for sample in samples if sample is not None]
        if not present:
            return None
        num_views = len(present[0].views)
        num_global = len(present[0].global_masks)
        if any(len(s.views) != num_views or len(s.global_masks) != num_global for s in present):
            raise ValueError("SslCollate: every sample must have the same numbers of views and global views")
        view_major = [sample.views[v] for v in range(num_views) for sample in present]
        masks = [sample.global_masks[v] for v in range(num_global) for sample in present]
        return SslBatch(
            student=pack(view_major),
            teacher=pack(view_major[: num_global * len(present)]),
            mask=torch.cat(masks),
            num_images=len(present),
            num_global=num_global,
            modalities=tuple(sample.modality for sample in present),
        )
