"""Token-budget batching: batches of variable-size images filled up to a number of patch tokens.

Packed attention has no padding, so the cost of a batch is its total token count, not its image count.
:class:`TokenBudgetBatchSampler` fills each batch up to ``max_tokens`` with first-fit decreasing inside a
window of consecutive (shuffled) samples: large volumes open batches and small radiographs fill the gaps,
while the window keeps the epoch's order random at the scale of the whole data set.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

__all__ = ["TokenBudgetBatchSampler", "check_positive_int"]


class TokenBudgetBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of dataset indices whose token counts add up to at most ``max_tokens``.

    Each epoch: order the samples (a permutation, or a weighted draw with replacement when ``weights`` is
    given), cut the order into windows of ``window`` samples, pack each window by first-fit decreasing,
    shuffle the batches, and give rank ``r`` of ``world_size`` every ``world_size``-th batch. Every rank gets
    the same number of batches (by repeating a few batches, or dropping them with ``drop_last``), and the
    result depends only on ``seed``, the epoch (:meth:`set_epoch`) and the arguments.

    Args:
        token_counts: tokens of each sample (see ``LabelledImageDataset.token_counts``).
        max_tokens: the budget per batch; every sample must fit in it alone.
        window: samples packed together; larger packs tighter, smaller keeps the order more random.
        shuffle: randomise the order and the batches (False: dataset order, deterministic packing).
        seed: base of the random stream; the epoch is added to it.
        rank, world_size: this process's shard; default from ``torch.distributed`` when initialised, else 0 / 1.
        drop_last: drop the batches that do not divide evenly among ranks instead of repeating some.
        weights: per-sample sampling weights (e.g. ``MixedDataset.sample_weights()``); samples are then
            drawn with replacement.
        num_samples: samples drawn per epoch with ``weights`` (default: all of them, once on average).
        max_images: optional cap on images per batch.
    """

    def __init__(
        self,
        token_counts: Sequence[int],
        max_tokens: int,
        *,
        window: int = 1024,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
        weights: Sequence[float] | torch.Tensor | None = None,
        num_samples: int | None = None,
        max_images: int | None = None,
    ) -> None:
        counts = np.asarray(token_counts, dtype=np.int64)
        if counts.ndim != 1 or counts.size == 0:
            raise ValueError(f"token_counts must be a non-empty sequence of ints, got shape {counts.shape}")
        if np.any(counts < 1):
            bad = int(np.flatnonzero(counts < 1)[0])
            raise ValueError(f"token_counts must be positive, got {int(counts[bad])} at index {bad}")
        check_positive_int(max_tokens, "max_tokens")
        if np.any(counts > max_tokens):
            bad = int(np.argmax(counts))
            raise ValueError(
                f"max_tokens ({max_tokens}) must hold every sample alone: sample {bad} has {int(counts[bad])} tokens"
            )
        check_positive_int(window, "window")
        if max_images is not None:
            check_positive_int(max_images, "max_images")
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=torch.float64)
            if weights.shape != (counts.size,):
                raise ValueError(
                    f"weights must have one entry per sample ({counts.size}), got shape {tuple(weights.shape)}"
                )
            if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
                raise ValueError("weights must be finite, non-negative and not all zero")
            num_samples = counts.size if num_samples is None else num_samples
            check_positive_int(num_samples, "num_samples")
        elif num_samples is not None:
            raise ValueError("num_samples applies only with weights")
        if world_size is None:
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            world_size = torch.distributed.get_world_size() if distributed else 1
            if rank is None:
                rank = torch.distributed.get_rank() if distributed else 0
        check_positive_int(world_size, "world_size")
        if rank is None:
            rank = 0
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
        self.token_counts = counts
        self.max_tokens = int(max_tokens)
        self.window = int(window)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.drop_last = bool(drop_last)
        self.weights = weights
        self.num_samples = num_samples
        self.max_images = max_images
        self.epoch = 0
        self._batches_epoch: int | None = None
        self._batches: list[list[int]] = []

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose batches are produced next (call before each epoch, as with DistributedSampler)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        yield from (list(batch) for batch in self._rank_batches())

    def __len__(self) -> int:
        return len(self._rank_batches())

    def _rank_batches(self) -> list[list[int]]:
        if self._batches_epoch != self.epoch:
            self._batches = self._shard(self._all_batches())
            self._batches_epoch = self.epoch
        return self._batches

    def _all_batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator)
        elif self.shuffle:
            order = torch.randperm(self.token_counts.size, generator=generator)
        else:
            order = torch.arange(self.token_counts.size)
        order = order.numpy()
        batches = []
        for start in range(0, order.size, self.window):
            batches.extend(self._first_fit_decreasing(order[start : start + self.window]))
        if self.shuffle or self.weights is not None:
            permutation = torch.randperm(len(batches), generator=generator).tolist()
            batches = [batches[i] for i in permutation]
        return batches

    def _first_fit_decreasing(self, indices: np.ndarray) -> list[list[int]]:
        counts = self.token_counts[indices]
        # Stable sort keeps equal-sized samples in their (random) order.
        by_size = np.argsort(-counts, kind="stable")
        remaining = np.empty(indices.size, dtype=np.int64)
        images = np.zeros(indices.size, dtype=np.int64)
        bins: list[list[int]] = []
        for position in by_size:
            size = counts[position]
            fits = remaining[: len(bins)] >= size
            if self.max_images is not None:
                fits &= images[: len(bins)] < self.max_images
            target = int(np.argmax(fits)) if fits.any() else len(bins)
            if target == len(bins):
                bins.append([])
                remaining[target] = self.max_tokens
            bins[target].append(int(indices[position]))
            remaining[target] -= size
            images[target] += 1
        return bins

    def _shard(self, batches: list[list[int]]) -> list[list[int]]:
        if self.world_size == 1:
            return batches
        if self.drop_last:
            batches = batches[: len(batches) - len(batches) % self.world_size]
        else:
            shortfall = -len(batches) % self.world_size
            batches = batches + [batches[i % len(batches)] for i in range(shortfall)]
        return batches[self.rank :: self.world_size]


def check_positive_int(value, name: str) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is an int >= 1 (bool is not an int here)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
