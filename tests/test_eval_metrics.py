import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmv.eval.metrics import auroc, auroc_on_resamples, bootstrap_auroc, macro_auroc, roc_curve


def pairwise_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUROC by counting every positive-negative pair: wins count 1, ties 1/2."""
    known = ~np.isnan(labels)
    positives = scores[known][labels[known] == 1]
    negatives = scores[known][labels[known] == 0]
    if positives.size == 0 or negatives.size == 0:
        return float("nan")
    wins = (positives[:, None] > negatives[None, :]).sum() + 0.5 * (positives[:, None] == negatives[None, :]).sum()
    return wins / (positives.size * negatives.size)


@settings(max_examples=60, deadline=None)
@given(
    num_rows=st.integers(1, 40),
    num_labels=st.integers(1, 4),
    distinct_scores=st.integers(1, 6),
    nan_share=st.sampled_from([0.0, 0.2, 0.6]),
    seed=st.integers(0, 2**31),
)
def test_auroc_equals_pairwise_count_with_ties_and_nans(num_rows, num_labels, distinct_scores, nan_share, seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, distinct_scores, size=(num_rows, num_labels)).astype(np.float64)
    labels = rng.integers(0, 2, size=(num_rows, num_labels)).astype(np.float64)
    labels[rng.random(labels.shape) < nan_share] = np.nan
    expected = np.array([pairwise_auroc(scores[:, j], labels[:, j]) for j in range(num_labels)])
    np.testing.assert_allclose(auroc(scores, labels), expected, rtol=0, atol=1e-12, equal_nan=True)
    defined = expected[~np.isnan(expected)]
    expected_macro = defined.mean() if defined.size else float("nan")
    np.testing.assert_allclose(macro_auroc(scores, labels), expected_macro, atol=1e-12, equal_nan=True)


def test_single_class_label_is_nan_not_a_number_made_up():
    scores = np.array([[0.1, 0.2], [0.5, 0.9], [0.3, 0.4]])
    labels = np.array([[1, 0], [1, 1], [1, np.nan]], dtype=float)
    result = auroc(scores, labels)
    assert math.isnan(result[0])
    assert result[1] == 1.0
    assert macro_auroc(scores, labels) == 1.0
    assert math.isnan(macro_auroc(scores[:, :1], labels[:, :1]))


def test_one_dimensional_and_torch_inputs():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.5])
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert auroc(scores, labels) == pytest.approx(0.875)
    assert isinstance(auroc(scores, labels), float)


@pytest.mark.parametrize(
    "scores, labels, message",
    [
        (np.zeros((4, 2)), np.zeros((4, 3)), "labels must have the shape of scores"),
        (np.zeros((4, 2, 1)), np.zeros((4, 2, 1)), "scores must have shape"),
        (np.array([0.1, np.nan]), np.array([1.0, 0.0]), "scores must be finite"),
        (np.array([0.1, 0.2]), np.array([1.0, 2.0]), "labels must hold 0, 1 or NaN"),
    ],
)
def test_bad_arguments_are_named(scores, labels, message):
    with pytest.raises(ValueError, match=message):
        auroc(scores, labels)


def test_resampled_auroc_equals_auroc_of_resampled_rows():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 4, size=(30, 3)).astype(float)
    labels = rng.integers(0, 2, size=(30, 3)).astype(float)
    labels[rng.random(labels.shape) < 0.3] = np.nan
    resamples = rng.integers(0, 30, size=(20, 30))
    expected = np.stack([auroc(scores[rows], labels[rows]) for rows in resamples])
    np.testing.assert_allclose(auroc_on_resamples(scores, labels, resamples), expected, atol=1e-12, equal_nan=True)


def test_bootstrap_interval_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=(300, 2)).astype(float)
    scores = labels + rng.normal(scale=[0.7, 2.0], size=(300, 2))
    first = bootstrap_auroc(scores, labels, num_resamples=400, seed=5)
    again = bootstrap_auroc(scores, labels, num_resamples=400, seed=5)
    other = bootstrap_auroc(scores, labels, num_resamples=400, seed=6)
    np.testing.assert_array_equal(first.per_label, again.per_label)
    assert not np.array_equal(first.per_label, other.per_label)
    estimate = auroc(scores, labels)
    assert np.all(first.per_label[:, 0] < estimate) and np.all(estimate < first.per_label[:, 1])
    assert first.macro[0] < macro_auroc(scores, labels) < first.macro[1]
    # The stronger signal is measured more precisely: its interval is narrower.
    widths = first.per_label[:, 1] - first.per_label[:, 0]
    assert widths[0] < widths[1]
    assert first.macro_replicates == 400


def test_bootstrap_of_undefined_label_is_nan_and_excluded_from_macro():
    rng = np.random.default_rng(1)
    labels = np.c_[rng.integers(0, 2, 50), np.ones(50)].astype(float)
    scores = rng.normal(size=(50, 2))
    interval = bootstrap_auroc(scores, labels, num_resamples=50)
    assert np.isnan(interval.per_label[1]).all()
    assert interval.defined_replicates[1] == 0
    assert not np.isnan(interval.macro).any()


def test_roc_curve_area_equals_auroc_with_ties():
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 5, size=80).astype(float)
    labels = rng.integers(0, 2, size=80).astype(float)
    labels[:7] = np.nan
    curve = roc_curve(scores, labels)
    assert (curve.fpr[0], curve.tpr[0]) == (0.0, 0.0) and (curve.fpr[-1], curve.tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(curve.fpr) >= 0) and np.all(np.diff(curve.tpr) >= 0)
    assert np.trapezoid(curve.tpr, curve.fpr) == pytest.approx(auroc(scores, labels), abs=1e-12)
    assert curve.thresholds[0] == np.inf and len(curve.thresholds) == len(np.unique(scores)) + 1


def test_roc_curve_needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        roc_curve(np.array([0.1, 0.2]), np.array([1.0, 1.0]))
