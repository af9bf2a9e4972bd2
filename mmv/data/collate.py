"""The collate function that tokenises samples inside DataLoader workers and packs them into a ``PackedBatch``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from mmv.data.datasets import Sample
from mmv.packing import PackedBatch, pack
from mmv.tokenizer import Tokenizer

__all__ = ["PackedCollate", "LabelledPackedBatch"]


class LabelledPackedBatch(NamedTuple):
    """A packed batch with what the samples said about themselves, in batch order.

    Attributes:
        batch: the packed tokens.
        labels: one float32 label vector per image (sources of a mixture may have different label sets).
        ids: the sample ids.
        skipped: samples of this batch dropped as unreadable (``on_error="skip"``).
    """

    batch: PackedBatch
    labels: list[torch.Tensor]
    ids: list[str]
    skipped: int

    def pin_memory(self) -> LabelledPackedBatch:
        """Pinned copy (DataLoader(pin_memory=True) calls this)."""
        return self._replace(batch=self.batch.pin_memory(), labels=[label.pin_memory() for label in self.labels])


class PackedCollate:
    """``collate_fn`` for a DataLoader over :class:`mmv.data.Sample` items: tokenise, then pack.

    Runs in the loader workers, so patch extraction and token dropping overlap with training. Samples that
    are None (unreadable files skipped by a dataset with ``on_error="skip"``) are dropped; a batch whose
    samples were all skipped collates to None, which the training loop should pass over.

    Args:
        tokenizer: the :class:`mmv.tokenizer.Tokenizer` (patch size, background and random token dropping).
        with_labels: return a :class:`LabelledPackedBatch` instead of the bare :class:`mmv.packing.PackedBatch`.

    Example::

        sampler = TokenBudgetBatchSampler(dataset.token_counts(tokenizer.patch_size), max_tokens=32768)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=PackedCollate(tokenizer), num_workers=8)
    """

    def __init__(self, tokenizer: Tokenizer, with_labels: bool = False) -> None:
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer must be an mmv.tokenizer.Tokenizer, got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        self.with_labels = bool(with_labels)

    def __call__(self, samples: Sequence[Sample | None]) -> PackedBatch | LabelledPackedBatch | None:
        present = [sample for sample in samples if sample is not None]
        for position, sample in enumerate(present):
            if not isinstance(sample, Sample):
                raise TypeError(f"samples[{position}] must be an mmv.data.Sample or None, got {type(sample).__name__}")
        if not present:
            return None
        batch = pack([self.tokenizer(sample.image) for sample in present])
        if not self.with_labels:
            return batch
        return LabelledPackedBatch(
            batch=batch,
            labels=[sample.labels for sample in present],
            ids=[sample.id for sample in present],
            skipped=len(samples) - len(present),
        )
