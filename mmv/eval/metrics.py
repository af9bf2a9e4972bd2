"""Ranking metrics for multi-label evaluation: AUROC, macro AUROC, bootstrap intervals and ROC curves.

Every function takes scores and labels as NumPy arrays or torch tensors of shape ``(N,)`` or ``(N, L)``.
Labels are 1 (positive), 0 (negative) or NaN (unknown); a NaN label removes that row from that label only.
AUROC is the Mann-Whitney statistic computed from ranks with tied scores given their average rank, so a
tie between a positive and a negative counts one half, exactly. A label whose known rows hold a single
class has no AUROC: it is reported as NaN, never as 0.5 or another made-up number.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "BootstrapInterval",
    "RocCurve",
    "auroc",
    "auroc_on_resamples",
    "bootstrap_auroc",
    "macro_auroc",
    "roc_curve",
]

# Bound on resampled rows handled at once by the bootstrap (replicates x rows), to cap its memory.
_BOOTSTRAP_CELLS_PER_CHUNK = 4_000_000


def _as_float64_array(value, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float64).numpy()
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be a numeric array or tensor, got {type(value).__name__}") from error


def _check_labels(labels: np.ndarray, name: str = "labels") -> None:
    known = labels[~np.isnan(labels)]
    if not np.all((known == 0) | (known == 1)):
        bad = known[(known != 0) & (known != 1)][0]
        raise ValueError(f"{name} must hold 0, 1 or NaN (unknown), found {bad!r}")


def _scores_and_labels(scores, labels) -> tuple[np.ndarray, np.ndarray, bool]:
    """Validated float64 copies as ``(N, L)`` arrays, and whether the input was one-dimensional."""
    scores = _as_float64_array(scores, "scores")
    labels = _as_float64_array(labels, "labels")
    if scores.ndim not in (1, 2):
        raise ValueError(f"scores must have shape (N,) or (N, L), got shape {scores.shape}")
    if labels.shape != scores.shape:
        raise ValueError(f"labels must have the shape of scores {scores.shape}, got shape {labels.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite (no NaN or infinity)")
    _check_labels(labels)
    one_dimensional = scores.ndim == 1
    if one_dimensional:
        scores, labels = scores[:, None], labels[:, None]
    return scores, labels, one_dimensional


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of a 1-D array, tied values sharing the average of the ranks they span."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], ordered.size]
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def _auroc_column(scores: np.ndarray, labels: np.ndarray) -> float:
    known = ~np.isnan(labels)
    scores, positive = scores[known], labels[known] == 1
    num_positive = int(positive.sum())
    num_negative = positive.size - num_positive
    if num_positive == 0 or num_negative == 0:
        return float("nan")
    rank_sum = _average_ranks(scores)[positive].sum()
    mann_whitney_u = rank_sum - num_positive * (num_positive + 1) / 2.0
    return float(mann_whitney_u / (num_positive * num_negative))


def auroc(scores, labels) -> np.ndarray | float:
    """Area under the ROC curve of each label.

    Args:
        scores: ``(N,)`` or ``(N, L)`` finite scores; higher means more likely positive.
        labels: same shape; 1, 0 or NaN (unknown, ignored for that label).

    Returns:
        ``(L,)`` float64 array (a float for 1-D input); NaN where a label's known rows hold one class.
    """
    scores, labels, one_dimensional = _scores_and_labels(scores, labels)
    per_label = np.array([_auroc_column(scores[:, j], labels[:, j]) for j in range(scores.shape[1])])
    return float(per_label[0]) if one_dimensional else per_label


def macro_auroc(scores, labels) -> float:
    """Mean AUROC over the labels where it is defined; NaN when it is defined for none."""
    per_label = np.atleast_1d(auroc(scores, labels))
    defined = per_label[~np.isnan(per_label)]
    return float(defined.mean()) if defined.size else float("nan")


@dataclass(frozen=True)
class _SortedLabel:
    """One label's known rows sorted by score, with the boundaries of runs of tied scores."""

    rows: np.ndarray
    positive: np.ndarray
    tie_starts: np.ndarray


def _sorted_labels(scores: np.ndarray, labels: np.ndarray) -> list[_SortedLabel]:
    sorted_labels = []
    for j in range(scores.shape[1]):
        rows = np.flatnonzero(~np.isnan(labels[:, j]))
        rows = rows[np.argsort(scores[rows, j], kind="mergesort")]
        ordered = scores[rows, j]
        tie_starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]) if rows.size else rows
        sorted_labels.append(_SortedLabel(rows, labels[rows, j] == 1, tie_starts))
    return sorted_labels


def _weighted_auroc(label: _SortedLabel, row_counts: np.ndarray) -> np.ndarray:
    """AUROC of each replicate, a replicate given by how often each row was drawn ``(B, N)``.

    With rows sorted by score and grouped into runs of ties, a positive beats every negative of a lower
    run and half of the negatives of its own run; weighting each row by its count gives the resampled
    Mann-Whitney statistic without sorting each replicate. Counts are float32 (exact below 2^24 rows) to
    halve the memory traffic; the final products are summed in float64.
    """
    num_replicates = row_counts.shape[0]
    if label.rows.size == 0:
        return np.full(num_replicates, np.nan)
    counts = row_counts[:, label.rows]
    positive_weight = np.where(label.positive, counts, np.float32(0))
    negative_weight = counts - positive_weight
    if label.tie_starts.size < label.rows.size:
        positive_weight = np.add.reduceat(positive_weight, label.tie_starts, axis=1)
        negative_weight = np.add.reduceat(negative_weight, label.tie_starts, axis=1)
    negatives_below = np.cumsum(negative_weight, axis=1, dtype=np.float32) - negative_weight
    twice_wins = np.einsum(
        "bn,bn->b", positive_weight, 2 * negatives_below + negative_weight, dtype=np.float64, casting="safe"
    )
    pairs = positive_weight.sum(axis=1, dtype=np.float64) * negative_weight.sum(axis=1, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, twice_wins / (2 * pairs), np.nan)


def _row_counts(resample_rows: np.ndarray, num_rows: int) -> np.ndarray:
    num_replicates = resample_rows.shape[0]
    flat = (resample_rows + num_rows * np.arange(num_replicates)[:, None]).ravel()
    counts = np.bincount(flat, minlength=num_replicates * num_rows).reshape(num_replicates, num_rows)
    return counts.astype(np.float32)


def auroc_on_resamples(scores, labels, resample_rows) -> np.ndarray:
    """AUROC of each label on each given resample of the rows.

    Args:
        scores, labels: as for :func:`auroc`.
        resample_rows: ``(B, N)`` integer row indices, one resample per row (drawn with replacement).

    Returns:
        ``(B, L)`` float64 array; NaN where a label has a single class in a resample.
    """
    scores, labels, _ = _scores_and_labels(scores, labels)
    resample_rows = np.asarray(resample_rows)
    num_rows = scores.shape[0]
    if resample_rows.ndim != 2 or not np.issubdtype(resample_rows.dtype, np.integer):
        raise ValueError(f"resample_rows must be a 2-D integer array, got {resample_rows.dtype} {resample_rows.shape}")
    if resample_rows.size and (resample_rows.min() < 0 or resample_rows.max() >= num_rows):
        raise ValueError(f"resample_rows must index rows 0..{num_rows - 1}")
    row_counts = _row_counts(resample_rows, num_rows)
    return np.stack([_weighted_auroc(label, row_counts) for label in _sorted_labels(scores, labels)], axis=1)


@dataclass(frozen=True)
class BootstrapInterval:
    """Percentile bootstrap confidence intervals of per-label and macro AUROC.

    ``per_label`` is ``(L, 2)`` (lower, upper), NaN for a label undefined on the full data.
    ``defined_replicates`` counts, per label, the replicates in which the label had both classes: only
    those enter its interval. ``macro_replicates`` counts the replicates in which every label defined on
    the full data was defined: only those enter the macro interval, so it averages one fixed label set.
    """

    per_label: np.ndarray
    macro: tuple[float, float]
    confidence: float
    num_resamples: int
    defined_replicates: np.ndarray
    macro_replicates: int


def _percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    values = values[~np.isnan(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    tail = (1.0 - confidence) / 2.0
    lower, upper = np.quantile(values, [tail, 1.0 - tail])
    return float(lower), float(upper)


def bootstrap_auroc(
    scores, labels, *, num_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> BootstrapInterval:
    """Percentile bootstrap intervals for per-label and macro AUROC.

    Resampling is not stratified: each replicate draws N rows with replacement, the same rows for every
    label, so the macro interval reflects the labels' joint variation. Replicates are computed in
    vectorised chunks from row multiplicities; the result depends only on the data and ``seed``.
    """
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be a positive integer, got {num_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    scores, labels, _ = _scores_and_labels(scores, labels)
    num_rows, num_labels = scores.shape
    defined_on_full = ~np.isnan(np.array([_auroc_column(scores[:, j], labels[:, j]) for j in range(num_labels)]))
    sorted_labels = _sorted_labels(scores, labels)
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CELLS_PER_CHUNK // max(num_rows, 1))
    replicates = np.empty((num_resamples, num_labels))
    for start in range(0, num_resamples, chunk):
        stop = min(start + chunk, num_resamples)
        row_counts = _row_counts(rng.integers(0, num_rows, size=(stop - start, num_rows)), num_rows)
        for j, label in enumerate(sorted_labels):
            replicates[start:stop, j] = _weighted_auroc(label, row_counts)
    per_label = np.full((num_labels, 2), np.nan)
    for j in np.flatnonzero(defined_on_full):
        per_label[j] = _percentile_interval(replicates[:, j], confidence)
    complete = ~np.isnan(replicates[:, defined_on_full]).any(axis=1)
    if defined_on_full.any():
        macro = _percentile_interval(replicates[complete][:, defined_on_full].mean(axis=1), confidence)
    else:
        complete[:] = False
        macro = (float("nan"), float("nan"))
    return BootstrapInterval(
        per_label=per_label,
        macro=macro,
        confidence=confidence,
        num_resamples=num_resamples,
        defined_replicates=(~np.isnan(replicates)).sum(axis=0),
        macro_replicates=int(complete.sum()),
    )


@dataclass(frozen=True)
class RocCurve:
    """ROC curve points: ``fpr[i]``, ``tpr[i]`` when predicting positive for scores >= ``thresholds[i]``."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


def roc_curve(scores, labels) -> RocCurve:
    """ROC curve of one label, from (0, 0) to (1, 1), one point per distinct score.

    Tied scores move the curve diagonally, so the trapezoidal area under these points equals
    :func:`auroc`. Rows with a NaN label are ignored; a single class raises ``ValueError``.
    """
    scores, labels, one_dimensional = _scores_and_labels(scores, labels)
    if not one_dimensional:
        raise ValueError(f"roc_curve takes one label: scores must have shape (N,), got {scores.shape}")
    known = ~np.isnan(labels[:, 0])
    scores, positive = scores[known, 0], labels[known, 0] == 1
    num_positive = int(positive.sum())
    num_negative = positive.size - num_positive
    if num_positive == 0 or num_negative == 0:
        raise ValueError("labels must hold both classes among the known rows to define a ROC curve")
    order = np.argsort(-scores, kind="mergesort")
    ordered, positive = scores[order], positive[order]
    run_ends = np.r_[np.flatnonzero(ordered[1:] != ordered[:-1]), ordered.size - 1]
    true_positives = np.cumsum(positive)[run_ends]
    false_positives = (run_ends + 1) - true_positives
    return RocCurve(
        fpr=np.r_[0.0, false_positives / num_negative],
        tpr=np.r_[0.0, true_positives / num_positive],
        thresholds=np.r_[np.inf, ordered[run_ends]],
    )
