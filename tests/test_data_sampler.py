"""mmv.data.TokenBudgetBatchSampler: budgets, coverage, determinism, sharding and weighted draws."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmv.data import TokenBudgetBatchSampler


def mixed_counts(seed=0, n=300):
    """Radiographs of ~200-1000 tokens and CT crops of ~2000-6000 tokens."""
    rng = np.random.default_rng(seed)
    small = rng.integers(200, 1000, size=n - n // 5)
    large = rng.integers(2000, 6000, size=n // 5)
    return rng.permutation(np.concatenate([small, large])).tolist()


@settings(max_examples=25, deadline=None)
@given(
    counts=st.lists(st.integers(1, 100), min_size=1, max_size=200),
    window=st.integers(1, 64),
    seed=st.integers(0, 3),
)
def test_every_sample_once_and_every_batch_within_budget(counts, window, seed):
    sampler = TokenBudgetBatchSampler(counts, max_tokens=100, window=window, seed=seed)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for batch in batches for i in batch) == list(range(len(counts)))
    assert all(sum(counts[i] for i in batch) <= 100 for batch in batches)


def test_first_fit_decreasing_packs_tightly():
    counts = [6, 4] * 50 + [3, 3, 3, 1] * 25
    batches = list(TokenBudgetBatchSampler(counts, max_tokens=10, window=len(counts), seed=1))
    assert len(batches) == sum(counts) // 10  # every batch exactly full
    mixed = mixed_counts()
    fill = sum(mixed) / (len(list(TokenBudgetBatchSampler(mixed, 16384, seed=2))) * 16384)
    assert fill > 0.9


def test_deterministic_for_seed_and_epoch():
    counts = mixed_counts()
    first = TokenBudgetBatchSampler(counts, 8192, seed=5)
    second = TokenBudgetBatchSampler(counts, 8192, seed=5)
    assert list(first) == list(second)
    epoch0 = list(first)
    first.set_epoch(1)
    assert list(first) != epoch0
    second.set_epoch(1)
    assert list(first) == list(second)
    assert list(TokenBudgetBatchSampler(counts, 8192, seed=6)) != epoch0


def test_without_shuffle_batches_follow_dataset_order():
    batches = list(TokenBudgetBatchSampler([5, 5, 5, 5], 10, shuffle=False, window=2))
    assert batches == [[0, 1], [2, 3]]


@pytest.mark.parametrize("drop_last", [False, True])
def test_shards_are_equal_and_cover_the_epoch(drop_last):
    counts = mixed_counts(n=101)
    whole = list(TokenBudgetBatchSampler(counts, 8192, seed=3, rank=0, world_size=1))
    shards = [
        list(TokenBudgetBatchSampler(counts, 8192, seed=3, rank=r, world_size=3, drop_last=drop_last))
        for r in range(3)
    ]
    assert len({len(shard) for shard in shards}) == 1
    seen = [tuple(batch) for shard in shards for batch in shard]
    if drop_last:
        assert len(seen) == len(whole) - len(whole) % 3 and len(set(seen)) == len(seen)
    else:
        assert {tuple(batch) for batch in whole} == set(seen)


def test_weighted_draws_follow_source_weights():
    counts = [100] * 1000
    weights = np.r_[np.full(900, 0.5 / 900), np.full(100, 0.5 / 100)]  # two sources, equal shares
    sampler = TokenBudgetBatchSampler(counts, 1000, weights=weights.tolist(), num_samples=4000, seed=0)
    drawn = [i for batch in sampler for i in batch]
    assert len(drawn) == 4000
    from_small_source = sum(i >= 900 for i in drawn) / len(drawn)
    assert from_small_source == pytest.approx(0.5, abs=0.04)
    assert max(collections.Counter(drawn).values()) > 1  # drawn with replacement


def test_max_images_caps_batches():
    batches = list(TokenBudgetBatchSampler([1] * 50, 100, max_images=8))
    assert max(len(batch) for batch in batches) == 8


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"token_counts": [], "max_tokens": 10}, "token_counts"),
        ({"token_counts": [0, 3], "max_tokens": 10}, "positive"),
        ({"token_counts": [5, 30], "max_tokens": 10}, "max_tokens"),
        ({"token_counts": [5], "max_tokens": 10, "window": 0}, "window"),
        ({"token_counts": [5], "max_tokens": 10, "rank": 2, "world_size": 2}, "rank"),
        ({"token_counts": [5, 5], "max_tokens": 10, "weights": [1.0]}, "weights"),
        ({"token_counts": [5], "max_tokens": 10, "num_samples": 4}, "num_samples"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TokenBudgetBatchSampler(**kwargs)
