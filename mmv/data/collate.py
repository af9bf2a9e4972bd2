"""The collate function that tokenises samples inside DataLoader workers and packs them into a ``PackedBatch``."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from mmv.data.datasets import Sample
from mmv.image import Image
from mmv.packing import PackedBatch, pack
from mmv.tokenizer import Tokenizer

__all__ = ["PackedCollate", "LabelledPackedBatch"]


class LabelledPackedBatch(NamedTuple):
    """A packed batch with what the samples said about themselves, in batch order.

    Attributes:
        batch: the packed tokens.
        labels: one float32 label vector per image (sources of a mixture may have different label sets; a
            number becomes a vector of one, None an empty vector).
        ids: the sample ids (None for ``(image, label)`` items, which have none).
        skipped: samples of this batch dropped as unreadable (``on_error="skip"``).
    """

    batch: PackedBatch
    labels: list[torch.Tensor]
    ids: list[str | None]
    skipped: int

    def pin_memory(self) -> LabelledPackedBatch:
        """Pinned copy (DataLoader(pin_memory=True) calls this)."""
        return self._replace(batch=self.batch.pin_memory(), labels=[label.pin_memory() for label in self.labels])


class PackedCollate:
    """``collate_fn`` for a DataLoader: tokenise each image, then pack them all into one batch.

    Items are :class:`mmv.data.Sample` (what mmv's data sets yield) or plain ``(image, label)`` tuples, the
    image an :class:`mmv.Image` (already preprocessed, e.g. by :class:`mmv.data.ModalityPreprocess`) and the
    label a number, a tensor or None. Runs in the loader workers, so patch extraction and token dropping
    overlap with training. Items that are None (unreadable files skipped by a dataset with
    ``on_error="skip"``) are dropped; a batch whose items were all skipped collates to None, which the
    training loop should pass over.

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

    def __call__(
        self, samples: Sequence[Sample | tuple[Image, Any] | None]
    ) -> PackedBatch | LabelledPackedBatch | None:
        present = [_image_labels_id(item, position) for position, item in enumerate(samples) if item is not None]
        if not present:
            return None
        batch = pack([self.tokenizer(image) for image, _, _ in present])
        if not self.with_labels:
            return batch
        return LabelledPackedBatch(
            batch=batch,
            labels=[labels for _, labels, _ in present],
            ids=[sample_id for _, _, sample_id in present],
            skipped=len(samples) - len(present),
        )


def _image_labels_id(item: Any, position: int) -> tuple[Image, torch.Tensor, str | None]:
    """The image, the float32 label vector and the id (None for a plain tuple) of one item."""
    if isinstance(item, Sample):
        return item.image, item.labels, item.id
    if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], Image)):
        raise TypeError(
            f"samples[{position}] must be an mmv.data.Sample, an (mmv.Image, label) tuple or None, "
            f"got {_describe(item)}"
        )
    image, label = item
    if label is None:
        labels = torch.empty(0, dtype=torch.float32)
    elif isinstance(label, torch.Tensor):
        labels = label.detach().to(torch.float32).reshape(-1)
    elif isinstance(label, numbers.Real):
        labels = torch.tensor([float(label)], dtype=torch.float32)
    else:
        raise TypeError(
            f"samples[{position}]: the label must be a number, a tensor or None, got {type(label).__name__}"
        )
    return image, labels, None


def _describe(item: Any) -> str:
    if isinstance(item, tuple):
        return f"a tuple of ({', '.join(type(part).__name__ for part in item)})"
    return type(item).__name__
