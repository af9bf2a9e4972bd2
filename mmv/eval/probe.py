"""Linear probes: L2-regularised logistic regression on frozen features, one output per label.

Features are standardised with the mean and standard deviation of the training rows. For each strength in
an L2 grid, one multi-label logistic regression is fit by full-batch L-BFGS; its loss is, per label, the
mean binary cross-entropy over the rows where that label is known (NaN labels are masked out) plus
``l2 / 2 * |w|^2`` (the bias is not penalised). Labels do not share parameters, so this is the same as
fitting each label alone. The grid is walked from the strongest L2 to the weakest, each fit starting from
the previous solution. Each label then keeps the strength that scores best on the validation rows (mean
validation log-loss by default, ties going to the stronger L2), with the weights fit on the training rows.

Loss and gradient are accumulated over slices of rows, so memory is one float32 copy of the standardised
training features (N x C x 4 bytes, 1.6 GB for 400k x 1024) plus a slice; features can be NumPy arrays,
memory-maps, :class:`~mmv.eval.features.RowSelection` or torch tensors. The fit has no randomness: the same
inputs give the same probe.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mmv.eval.lbfgs import minimise_lbfgs
from mmv.eval.metrics import BootstrapInterval, auroc, auroc_on_resamples, bootstrap_auroc

__all__ = [
    "DEFAULT_L2_GRID",
    "LinearProbe",
    "ProbeEvaluation",
    "evaluate_probe",
    "fit_linear_probe",
    "paired_macro_auroc_difference",
]

DEFAULT_L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
_ROWS_PER_SLICE = 16384


def _feature_shape(features, name: str) -> tuple[int, int]:
    shape = tuple(getattr(features, "shape", ()))
    if len(shape) != 2:
        raise ValueError(f"{name} must be a 2-D (N, C) array, got shape {shape}")
    return int(shape[0]), int(shape[1])


def _read_rows(features, start: int, stop: int) -> np.ndarray:
    rows = features[start:stop]
    if isinstance(rows, torch.Tensor):
        rows = rows.detach().cpu().numpy()
    return np.asarray(rows, dtype=np.float64)


def _label_matrix(labels, name: str, num_rows: int) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.array(labels, dtype=np.float64)
    if labels.ndim == 1:
        labels = labels[:, None]
    if labels.ndim != 2 or labels.shape[0] != num_rows:
        raise ValueError(f"{name} must have shape ({num_rows},) or ({num_rows}, L), got {labels.shape}")
    known = labels[~np.isnan(labels)]
    if not np.all((known == 0) | (known == 1)):
        raise ValueError(f"{name} must hold 0, 1 or NaN (unknown)")
    return labels


def _feature_statistics(features, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation per feature, merged slice by slice (Chan et al.) for accuracy."""
    num_rows, num_features = _feature_shape(features, name)
    count, mean, sum_squares = 0, np.zeros(num_features), np.zeros(num_features)
    for start in range(0, num_rows, _ROWS_PER_SLICE):
        rows = _read_rows(features, start, start + _ROWS_PER_SLICE)
        if not np.isfinite(rows).all():
            raise ValueError(f"{name} must be finite (rows {start}..{start + len(rows) - 1} are not)")
        rows_mean = rows.mean(axis=0)
        rows_sum_squares = ((rows - rows_mean) ** 2).sum(axis=0)
        merged = count + len(rows)
        delta = rows_mean - mean
        sum_squares += rows_sum_squares + delta**2 * count * len(rows) / merged
        mean += delta * len(rows) / merged
        count = merged
    scale = np.sqrt(sum_squares / max(count, 1))
    # A constant feature carries no signal; dividing by 1 leaves it at zero after centring.
    return mean, np.where(scale > 0, scale, 1.0)


def _standardised(features, start: int, stop: int, mean: np.ndarray, scale: np.ndarray, name: str) -> torch.Tensor:
    rows = _read_rows(features, start, stop)
    if not np.isfinite(rows).all():
        raise ValueError(f"{name} must be finite (rows {start}..{start + len(rows) - 1} are not)")
    return torch.from_numpy(((rows - mean) / scale).astype(np.float32))


def _standardised_copy(features, mean: np.ndarray, scale: np.ndarray, name: str) -> torch.Tensor:
    num_rows, num_features = _feature_shape(features, name)
    copy = torch.empty(num_rows, num_features, dtype=torch.float32)
    for start in range(0, num_rows, _ROWS_PER_SLICE):
        stop = start + _ROWS_PER_SLICE
        copy[start:stop] = _standardised(features, start, stop, mean, scale, name)
    return copy


def _masked_logistic_objective(
    inputs: torch.Tensor, targets: torch.Tensor, row_weights: torch.Tensor, weight: torch.Tensor,
    bias: torch.Tensor, l2: float,
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Loss and gradients, accumulated over row slices so no (N, L) graph is ever held."""
    loss = 0.0
    weight_grad = torch.zeros_like(weight)
    bias_grad = torch.zeros_like(bias)
    for start in range(0, inputs.shape[0], _ROWS_PER_SLICE):
        rows = inputs[start : start + _ROWS_PER_SLICE]
        logits = rows @ weight + bias
        target = targets[start : start + _ROWS_PER_SLICE]
        row_weight = row_weights[start : start + _ROWS_PER_SLICE]
        # The loss is summed in float64 so that its rounding stays below the line search's decreases.
        cross_entropy = F.binary_cross_entropy_with_logits(logits.double(), target.double(), reduction="none")
        loss += float((cross_entropy * row_weight).sum())
        residual = (torch.sigmoid(logits) - target) * row_weight
        weight_grad += rows.T @ residual
        bias_grad += residual.sum(dim=0)
    loss += 0.5 * l2 * float((weight.double() ** 2).sum())
    weight_grad += l2 * weight
    return loss, weight_grad, bias_grad


def _fit_l2(
    inputs: torch.Tensor, targets: torch.Tensor, row_weights: torch.Tensor, weight: torch.Tensor,
    bias: torch.Tensor, l2: float, max_iter: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    num_features, num_labels = weight.shape

    def objective(parameters: torch.Tensor) -> tuple[float, torch.Tensor]:
        parameters = parameters.to(torch.float32)
        loss, weight_grad, bias_grad = _masked_logistic_objective(
            inputs, targets, row_weights,
            parameters[: num_features * num_labels].view(num_features, num_labels),
            parameters[num_features * num_labels :], l2,
        )
        return loss, torch.cat([weight_grad.flatten(), bias_grad])

    with torch.no_grad():
        result = minimise_lbfgs(objective, torch.cat([weight.flatten(), bias]), max_iter=max_iter)
    parameters = result.x.to(torch.float32)
    split = num_features * num_labels
    return parameters[:split].view(num_features, num_labels), parameters[split:]


def _logits(features, mean, scale, weight: torch.Tensor, bias: torch.Tensor, name: str) -> np.ndarray:
    num_rows, _ = _feature_shape(features, name)
    logits = np.empty((num_rows, weight.shape[1]))
    with torch.no_grad():
        for start in range(0, num_rows, _ROWS_PER_SLICE):
            rows = _standardised(features, start, start + _ROWS_PER_SLICE, mean, scale, name)
            logits[start : start + _ROWS_PER_SLICE] = (rows @ weight + bias).double().numpy()
    return logits


def _mean_log_loss(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean binary cross-entropy per label over its known rows (NaN where none is known)."""
    known = ~np.isnan(labels)
    cross_entropy = np.logaddexp(0.0, logits) - np.where(known, labels, 0.0) * logits
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(known, cross_entropy, 0.0).sum(axis=0) / known.sum(axis=0)


@dataclass(frozen=True, eq=False)
class LinearProbe:
    """A fitted multi-label linear probe.

    The decision score (logit) is ``((x - feature_mean) / feature_scale) @ weight + bias`` and the
    probability its sigmoid. Labels listed in ``skipped`` (with the reason) could not be fit and score
    NaN. ``l2`` is each label's chosen strength; ``validation_log_loss`` and ``validation_auroc`` are
    ``(len(l2_grid), L)``, one row per grid strength. ``selected_by`` says per label which validation
    score chose its strength.
    """

    label_names: tuple[str, ...]
    feature_mean: np.ndarray
    feature_scale: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    l2: np.ndarray
    l2_grid: tuple[float, ...]
    validation_log_loss: np.ndarray
    validation_auroc: np.ndarray
    selected_by: tuple[str, ...]
    skipped: dict[str, str]

    def decision_function(self, features) -> np.ndarray:
        """``(N, L)`` logits for ``(N, C)`` features; NaN columns for skipped labels."""
        _, num_features = _feature_shape(features, "features")
        if num_features != self.weight.shape[0]:
            raise ValueError(f"features must have {self.weight.shape[0]} columns, got {num_features}")
        logits = _logits(
            features, self.feature_mean, self.feature_scale,
            torch.from_numpy(self.weight.astype(np.float32)), torch.from_numpy(self.bias.astype(np.float32)),
            "features",
        )
        logits[:, [name in self.skipped for name in self.label_names]] = np.nan
        return logits

    def predict_proba(self, features) -> np.ndarray:
        """``(N, L)`` probabilities for ``(N, C)`` features; NaN columns for skipped labels."""
        return np.exp(-np.logaddexp(0.0, -self.decision_function(features)))


def _labels_to_skip(train_labels, val_labels, label_names) -> dict[str, str]:
    skipped = {}
    for j, name in enumerate(label_names):
        train_known = train_labels[~np.isnan(train_labels[:, j]), j]
        if train_known.size == 0 or train_known.min() == train_known.max():
            skipped[name] = "the training rows do not hold both classes"
        elif np.isnan(val_labels[:, j]).all():
            skipped[name] = "no validation row has this label"
    return skipped


def _select_strengths(log_loss: np.ndarray, val_auroc: np.ndarray, select_by: str) -> tuple[np.ndarray, list[str]]:
    """Index of the chosen strength per label; the grid runs strong to weak so first-best favours strong."""
    chosen, selected_by = [], []
    for j in range(log_loss.shape[1]):
        if select_by == "auroc" and not np.isnan(val_auroc[:, j]).all():
            chosen.append(int(np.nanargmax(val_auroc[:, j])))
            selected_by.append("validation AUROC")
        elif np.isnan(log_loss[:, j]).all():
            chosen.append(0)
            selected_by.append("none (label skipped)")
        else:
            chosen.append(int(np.nanargmin(log_loss[:, j])))
            selected_by.append("validation log-loss")
    return np.array(chosen, dtype=np.int64), selected_by


def fit_linear_probe(
    train_features,
    train_labels,
    val_features,
    val_labels,
    *,
    label_names: Sequence[str] | None = None,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    select_by: Literal["log_loss", "auroc"] = "log_loss",
    max_iter: int = 200,
    progress: bool = True,
) -> LinearProbe:
    """Fit a linear probe, choosing each label's L2 strength on the validation rows.

    Args:
        train_features, val_features: ``(N, C)`` features (arrays, memory-maps, row selections, tensors).
        train_labels, val_labels: ``(N, L)`` (or ``(N,)``) labels: 1, 0 or NaN (unknown, ignored).
        label_names: one name per label column (default ``label_0``, ...).
        l2_grid: positive L2 strengths to try.
        select_by: ``"log_loss"`` (mean validation cross-entropy, default) or ``"auroc"`` (validation
            AUROC; a label whose validation rows hold one class falls back to log-loss).
        max_iter: L-BFGS iterations per strength.
        progress: show a progress bar over the grid.
    """
    num_train, num_features = _feature_shape(train_features, "train_features")
    num_val, val_width = _feature_shape(val_features, "val_features")
    if val_width != num_features:
        raise ValueError(f"val_features must have {num_features} columns like train_features, got {val_width}")
    train_labels = _label_matrix(train_labels, "train_labels", num_train)
    val_labels = _label_matrix(val_labels, "val_labels", num_val)
    num_labels = train_labels.shape[1]
    if val_labels.shape[1] != num_labels:
        raise ValueError(f"val_labels must have {num_labels} columns like train_labels, got {val_labels.shape[1]}")
    label_names = tuple(label_names) if label_names is not None else tuple(f"label_{j}" for j in range(num_labels))
    if len(label_names) != num_labels:
        raise ValueError(f"label_names must name {num_labels} labels, got {len(label_names)}")
    grid = sorted((float(l2) for l2 in l2_grid), reverse=True)
    if not grid or not all(math.isfinite(l2) and l2 > 0 for l2 in grid):
        raise ValueError(f"l2_grid must hold positive finite strengths, got {list(l2_grid)}")
    if select_by not in ("log_loss", "auroc"):
        raise ValueError(f"select_by must be 'log_loss' or 'auroc', got {select_by!r}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter}")

    mean, scale = _feature_statistics(train_features, "train_features")
    skipped = _labels_to_skip(train_labels, val_labels, label_names)
    fit_mask = np.array([name not in skipped for name in label_names])
    known = ~np.isnan(train_labels) & fit_mask
    row_weights = np.where(known, 1.0 / np.maximum(known.sum(axis=0), 1), 0.0)
    targets = np.where(known, train_labels, 0.0)
    positive_rate = np.clip(targets.sum(axis=0) * row_weights.max(axis=0, initial=0.0), 1e-6, 1 - 1e-6)

    inputs = _standardised_copy(train_features, mean, scale, "train_features")
    targets_t = torch.from_numpy(targets.astype(np.float32))
    row_weights_t = torch.from_numpy(row_weights.astype(np.float32))
    weight = torch.zeros(num_features, num_labels)
    bias = torch.from_numpy(np.log(positive_rate / (1 - positive_rate)).astype(np.float32))
    weights, biases = [], []
    log_loss = np.full((len(grid), num_labels), np.nan)
    val_auroc = np.full((len(grid), num_labels), np.nan)
    for g, l2 in enumerate(tqdm(grid, desc="linear probe (L2 grid)", disable=not progress)):
        weight, bias = _fit_l2(inputs, targets_t, row_weights_t, weight, bias, l2, max_iter)
        weights.append(weight.numpy().copy())
        biases.append(bias.numpy().copy())
        val_logits = _logits(val_features, mean, scale, weight, bias, "val_features")
        log_loss[g, fit_mask] = _mean_log_loss(val_logits[:, fit_mask], val_labels[:, fit_mask])
        val_auroc[g, fit_mask] = np.atleast_1d(auroc(val_logits[:, fit_mask], val_labels[:, fit_mask]))
    del inputs

    chosen, selected_by = _select_strengths(log_loss, val_auroc, select_by)
    columns = np.arange(num_labels)
    l2_chosen = np.where(fit_mask, np.array(grid)[chosen], np.nan)
    return LinearProbe(
        label_names=label_names,
        feature_mean=mean,
        feature_scale=scale,
        weight=np.stack(weights)[chosen, :, columns].T.copy(),
        bias=np.stack(biases)[chosen, columns].copy(),
        l2=l2_chosen,
        l2_grid=tuple(grid),
        validation_log_loss=log_loss,
        validation_auroc=val_auroc,
        selected_by=tuple(selected_by),
        skipped=skipped,
    )


@dataclass(frozen=True, eq=False)
class ProbeEvaluation:
    """Scores of a probe on labelled rows, with per-label and macro AUROC and bootstrap intervals.

    ``scores`` are the probe's logits (:meth:`LinearProbe.decision_function`): ranked like the
    probabilities, without the ties that saturated probabilities would create. ``positives`` and
    ``negatives`` count the known labels per label column.
    """

    label_names: tuple[str, ...]
    scores: np.ndarray
    labels: np.ndarray
    auroc: np.ndarray
    macro_auroc: float
    interval: BootstrapInterval
    positives: np.ndarray
    negatives: np.ndarray


def evaluate_probe(
    probe: LinearProbe, features, labels, *, num_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> ProbeEvaluation:
    """Score ``features`` with ``probe`` and measure AUROC against ``labels`` (NaN = unknown)."""
    num_rows, _ = _feature_shape(features, "features")
    labels = _label_matrix(labels, "labels", num_rows)
    if labels.shape[1] != len(probe.label_names):
        raise ValueError(f"labels must have {len(probe.label_names)} columns, got {labels.shape[1]}")
    scores = probe.decision_function(features)
    fit = np.array([name not in probe.skipped for name in probe.label_names])
    # Skipped labels have no scores: they are left out of the metrics (NaN), never scored as chance.
    per_label = np.full(len(fit), np.nan)
    intervals = np.full((len(fit), 2), np.nan)
    defined_replicates = np.zeros(len(fit), dtype=np.int64)
    macro_interval, macro_replicates = (float("nan"), float("nan")), 0
    if fit.any():
        per_label[fit] = np.atleast_1d(auroc(scores[:, fit], labels[:, fit]))
        interval = bootstrap_auroc(
            scores[:, fit], labels[:, fit], num_resamples=num_resamples, confidence=confidence, seed=seed
        )
        intervals[fit] = interval.per_label
        defined_replicates[fit] = interval.defined_replicates
        macro_interval, macro_replicates = interval.macro, interval.macro_replicates
    defined = per_label[~np.isnan(per_label)]
    return ProbeEvaluation(
        label_names=probe.label_names,
        scores=scores,
        labels=labels,
        auroc=per_label,
        macro_auroc=float(defined.mean()) if defined.size else float("nan"),
        interval=BootstrapInterval(
            per_label=intervals,
            macro=macro_interval,
            confidence=confidence,
            num_resamples=num_resamples,
            defined_replicates=defined_replicates,
            macro_replicates=macro_replicates,
        ),
        positives=(labels == 1).sum(axis=0),
        negatives=(labels == 0).sum(axis=0),
    )


def paired_macro_auroc_difference(
    pretrained: ProbeEvaluation, baseline: ProbeEvaluation, seed: int, num_resamples: int = 1000, confidence: float = 0.95
) -> dict[str, Any]:
    """Macro AUROC of ``pretrained`` minus that of ``baseline`` (two ProbeEvaluations of the same test rows),
    with a paired percentile bootstrap interval: every replicate draws one resample of the rows and scores
    both encoders on it, so the interval is that of the difference itself, not of two separate estimates.

    The macro average runs over the findings defined (both classes present) for both encoders on the full
    test rows; replicates where one of them lacks a class are left out.
    """
    if isinstance(num_resamples, bool) or not isinstance(num_resamples, int) or num_resamples < 1:
        raise ValueError(f"paired_macro_auroc_difference: num_resamples must be a positive int, got {num_resamples!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"paired_macro_auroc_difference: confidence must lie in (0, 1), got {confidence!r}")
    if not np.array_equal(pretrained.labels, baseline.labels, equal_nan=True):
        raise ValueError("paired_macro_auroc_difference: the two evaluations must be of the same test rows (their labels differ)")
    defined = ~np.isnan(pretrained.auroc) & ~np.isnan(baseline.auroc)
    if not defined.any():
        return {"macro_auroc": float("nan"), "interval": [float("nan"), float("nan")], "confidence": confidence}
    rows = np.random.default_rng(seed).integers(0, pretrained.labels.shape[0], size=(num_resamples, pretrained.labels.shape[0]))
    labels = pretrained.labels[:, defined]
    replicates = (
        auroc_on_resamples(pretrained.scores[:, defined], labels, rows)
        - auroc_on_resamples(baseline.scores[:, defined], labels, rows)
    )
    complete = replicates[~np.isnan(replicates).any(axis=1)].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    interval = [float(v) for v in np.quantile(complete, [tail, 1.0 - tail])] if complete.size else [float("nan")] * 2
    difference = float(pretrained.auroc[defined].mean() - baseline.auroc[defined].mean())
    return {"macro_auroc": difference, "interval": interval, "confidence": confidence}
