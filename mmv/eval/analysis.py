"""How two modalities (chest X-ray and CT) share the feature space of one encoder.

Given features of modality A and modality B in the same C-dimensional space, this measures:

- **Modality classifier**: held-out accuracy of a linear probe told to separate A from B (rows split by
  group, so one patient or phantom never sits on both sides). Near 1 means the modalities are linearly
  separable; near the majority share means the features do not encode the modality.
- **Linear CKA** (Kornblith et al., 2019) between A and B on paired rows (row i of A and row i of B show
  the same subject): ``|A^T B|_F^2 / (|A^T A|_F |B^T B|_F)`` on centred features. It needs pairs; without
  them only the covariance alignment is reported.
- **Covariance alignment**, defined with or without pairs: ``<S_A, S_B>_F / (|S_A|_F |S_B|_F)`` for the
  covariance matrices S of each modality (each centred on its own mean). It is 1 when both modalities
  spread along the same feature directions with proportional variances and 0 when their variance lies in
  orthogonal directions. Unlike CKA it compares where each modality varies, not how samples correspond.
- **Principal angles** between the top principal subspaces of A and B (each modality centred on its own
  mean; rank k given, or the smallest k explaining ``variance_fraction`` of that modality's variance).
- **Shared and modality-specific subspaces**: the principal vector pairs (u_i in A's subspace, v_i in B's)
  whose angle is below ``shared_angle_deg`` define shared directions ``(u_i + v_i) / |u_i + v_i|``; the
  remaining principal vectors of A (of B) span A's (B's) specific subspace. All shared and A-specific
  directions are orthonormal (principal vectors satisfy ``u_i . v_j = 0`` for i != j); A- and B-specific
  directions need not be orthogonal to each other. For each modality the report gives the share of its
  variance inside each subspace.
- **Cross-modal transfer** (when both modalities carry the same labels, e.g. the phantom data): a probe
  fit on A's training rows scored on B's test rows, and the other way round, next to each within-modality
  score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mmv.data.datasets import CT_MODALITY, XRAY_MODALITY
from mmv.eval.metrics import auroc
from mmv.eval.probe import DEFAULT_L2_GRID, ProbeEvaluation, evaluate_probe, fit_linear_probe
from mmv.eval.protocols import carve_groups

__all__ = [
    "LabelledFeatures",
    "ModalityAnalysis",
    "ModalityClassification",
    "SubspaceSplit",
    "TransferResult",
    "analyse_modalities",
    "classify_modality",
    "covariance_alignment",
    "cross_modal_transfer",
    "linear_cka",
    "principal_angles",
    "principal_subspace",
    "split_subspaces",
]

_ROWS_PER_SLICE = 16384


def _as_features(features, name: str) -> np.ndarray:
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"{name} must be a 2-D (N, C) array with N >= 2, got shape {features.shape}")
    return features


def _check_same_width(features_a: np.ndarray, features_b: np.ndarray) -> None:
    if features_a.shape[1] != features_b.shape[1]:
        raise ValueError(
            f"features_b must have {features_a.shape[1]} columns like features_a, got {features_b.shape[1]}"
        )


def _mean_and_covariance(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (biased) covariance in float64, accumulated over row slices."""
    mean = np.zeros(features.shape[1])
    for start in range(0, features.shape[0], _ROWS_PER_SLICE):
        mean += features[start : start + _ROWS_PER_SLICE].astype(np.float64).sum(axis=0)
    mean /= features.shape[0]
    covariance = np.zeros((features.shape[1], features.shape[1]))
    for start in range(0, features.shape[0], _ROWS_PER_SLICE):
        centred = features[start : start + _ROWS_PER_SLICE].astype(np.float64) - mean
        covariance += centred.T @ centred
    return mean, covariance / features.shape[0]


def linear_cka(features_a, features_b) -> float:
    """Linear CKA between paired feature matrices (row i of each describes the same subject)."""
    features_a = _as_features(features_a, "features_a")
    features_b = _as_features(features_b, "features_b")
    if features_a.shape[0] != features_b.shape[0]:
        raise ValueError(
            f"features_b must have one row per row of features_a ({features_a.shape[0]}), got {features_b.shape[0]}"
        )
    mean_a = features_a.astype(np.float64).mean(axis=0)
    mean_b = features_b.astype(np.float64).mean(axis=0)
    cross = np.zeros((features_a.shape[1], features_b.shape[1]))
    gram_a = np.zeros((features_a.shape[1],) * 2)
    gram_b = np.zeros((features_b.shape[1],) * 2)
    for start in range(0, features_a.shape[0], _ROWS_PER_SLICE):
        a = features_a[start : start + _ROWS_PER_SLICE].astype(np.float64) - mean_a
        b = features_b[start : start + _ROWS_PER_SLICE].astype(np.float64) - mean_b
        cross += a.T @ b
        gram_a += a.T @ a
        gram_b += b.T @ b
    denominator = np.linalg.norm(gram_a) * np.linalg.norm(gram_b)
    return float(np.linalg.norm(cross) ** 2 / denominator) if denominator > 0 else float("nan")


def _covariance_alignment(covariance_a: np.ndarray, covariance_b: np.ndarray) -> float:
    denominator = np.linalg.norm(covariance_a) * np.linalg.norm(covariance_b)
    return float(np.sum(covariance_a * covariance_b) / denominator) if denominator > 0 else float("nan")


def covariance_alignment(features_a, features_b) -> float:
    """Cosine similarity of the two modalities' covariance matrices (rows need not be paired)."""
    features_a = _as_features(features_a, "features_a")
    features_b = _as_features(features_b, "features_b")
    _check_same_width(features_a, features_b)
    return _covariance_alignment(_mean_and_covariance(features_a)[1], _mean_and_covariance(features_b)[1])


def _top_eigenvectors(
    covariance: np.ndarray, rank: int | None, variance_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    eigenvalues, eigenvectors = np.clip(eigenvalues[::-1], 0.0, None), eigenvectors[:, ::-1]
    if rank is None:
        total = eigenvalues.sum()
        if total <= 0:
            raise ValueError("features have no variance: no principal subspace")
        explained = np.cumsum(eigenvalues) / total
        rank = min(int(np.searchsorted(explained, variance_fraction - 1e-12)) + 1, eigenvalues.size)
    return eigenvectors[:, :rank], eigenvalues[:rank]


def principal_subspace(features, rank: int | None = None, variance_fraction: float = 0.9) -> np.ndarray:
    """Orthonormal ``(C, k)`` basis of the top-k principal directions of centred ``features``.

    ``rank`` fixes k; otherwise k is the smallest number of directions explaining ``variance_fraction``.
    """
    features = _as_features(features, "features")
    _check_rank(rank, variance_fraction, features.shape[1])
    return _top_eigenvectors(_mean_and_covariance(features)[1], rank, variance_fraction)[0]


def _check_rank(rank: int | None, variance_fraction: float, num_features: int) -> None:
    if rank is not None and not 1 <= rank <= num_features:
        raise ValueError(f"rank must lie in 1..{num_features}, got {rank}")
    if not 0.0 < variance_fraction <= 1.0:
        raise ValueError(f"variance_fraction must lie in (0, 1], got {variance_fraction}")


def _check_basis(basis: np.ndarray, name: str) -> np.ndarray:
    basis = np.asarray(basis, dtype=np.float64)
    if basis.ndim != 2 or basis.shape[1] == 0 or basis.shape[1] > basis.shape[0]:
        raise ValueError(f"{name} must be a (C, k) basis with 1 <= k <= C, got shape {basis.shape}")
    if not np.allclose(basis.T @ basis, np.eye(basis.shape[1]), atol=1e-6):
        raise ValueError(f"{name} must have orthonormal columns")
    return basis


def principal_angles(basis_a, basis_b) -> np.ndarray:
    """Principal angles (radians, ascending) between the spans of two orthonormal ``(C, k)`` bases."""
    basis_a, basis_b = _check_basis(basis_a, "basis_a"), _check_basis(basis_b, "basis_b")
    if basis_a.shape[0] != basis_b.shape[0]:
        raise ValueError(f"basis_b must have {basis_a.shape[0]} rows like basis_a, got {basis_b.shape[0]}")
    cosines = np.linalg.svd(basis_a.T @ basis_b, compute_uv=False)
    return np.arccos(np.clip(cosines, 0.0, 1.0))


@dataclass(frozen=True, eq=False)
class SubspaceSplit:
    """Shared and modality-specific orthonormal bases ``(C, k)`` and the principal angles (degrees)."""

    angles_deg: np.ndarray
    shared_angle_deg: float
    shared: np.ndarray
    specific_a: np.ndarray
    specific_b: np.ndarray


def split_subspaces(basis_a, basis_b, shared_angle_deg: float = 30.0) -> SubspaceSplit:
    """Split two principal subspaces into shared directions and directions specific to each."""
    basis_a, basis_b = _check_basis(basis_a, "basis_a"), _check_basis(basis_b, "basis_b")
    if basis_a.shape[0] != basis_b.shape[0]:
        raise ValueError(f"basis_b must have {basis_a.shape[0]} rows like basis_a, got {basis_b.shape[0]}")
    if not 0.0 < shared_angle_deg < 90.0:
        raise ValueError(f"shared_angle_deg must lie in (0, 90), got {shared_angle_deg}")
    left, cosines, right_t = np.linalg.svd(basis_a.T @ basis_b, full_matrices=True)
    angles_deg = np.degrees(np.arccos(np.clip(cosines, 0.0, 1.0)))
    vectors_a, vectors_b = basis_a @ left, basis_b @ right_t.T
    num_shared = int((angles_deg < shared_angle_deg).sum())
    bisectors = vectors_a[:, :num_shared] + vectors_b[:, :num_shared]
    empty = np.zeros((basis_a.shape[0], 0))
    return SubspaceSplit(
        angles_deg=angles_deg,
        shared_angle_deg=float(shared_angle_deg),
        shared=bisectors / np.linalg.norm(bisectors, axis=0) if num_shared else empty,
        specific_a=vectors_a[:, num_shared:],
        specific_b=vectors_b[:, num_shared:],
    )


def _variance_share(covariance: np.ndarray, basis: np.ndarray) -> float:
    total = np.trace(covariance)
    if basis.shape[1] == 0 or total <= 0:
        return 0.0 if total > 0 else float("nan")
    return float(np.trace(basis.T @ covariance @ basis) / total)


def _span(*bases: np.ndarray) -> np.ndarray:
    stacked = np.concatenate(bases, axis=1)
    if stacked.shape[1] == 0:
        return stacked
    left, singular_values, _ = np.linalg.svd(stacked, full_matrices=False)
    return left[:, singular_values > 1e-8 * singular_values[0]]


@dataclass(frozen=True, eq=False)
class ModalityClassification:
    """Held-out scores of a linear probe separating modality A (0) from B (1)."""

    accuracy: float
    balanced_accuracy: float
    auroc: float
    num_test: int


def _group_names(groups: Sequence[str] | None, num_rows: int, prefix: str, name: str) -> list[str]:
    if groups is None:
        return [f"{prefix}{i}" for i in range(num_rows)]
    groups = [str(group) for group in groups]
    if len(groups) != num_rows:
        raise ValueError(f"{name} must have one entry per row ({num_rows}), got {len(groups)}")
    return [group or f"{prefix}{i}" for i, group in enumerate(groups)]


def classify_modality(
    features_a, features_b, *, groups_a: Sequence[str] | None = None, groups_b: Sequence[str] | None = None,
    test_fraction: float = 0.25, val_fraction: float = 0.2, seed: int = 0, progress: bool = False,
) -> ModalityClassification:
    """Fit a linear A-versus-B probe on some groups and score it on held-out groups."""
    features_a = _as_features(features_a, "features_a")
    features_b = _as_features(features_b, "features_b")
    _check_same_width(features_a, features_b)
    groups = _group_names(groups_a, len(features_a), "a:", "groups_a")
    groups += _group_names(groups_b, len(features_b), "b:", "groups_b")
    features = np.concatenate([features_a, features_b]).astype(np.float32)
    is_b = np.r_[np.zeros(len(features_a)), np.ones(len(features_b))]
    test = carve_groups(groups, test_fraction, seed)
    rest = np.flatnonzero(~test)
    val = np.zeros_like(test)
    val[rest[carve_groups([groups[i] for i in rest], val_fraction, seed + 1)]] = True
    train = ~test & ~val
    probe = fit_linear_probe(
        features[train], is_b[train], features[val], is_b[val], label_names=("modality",), progress=progress
    )
    scores = probe.decision_function(features[test])[:, 0]
    predicted = scores >= 0.0
    truth = is_b[test] == 1
    recalls = [np.mean(predicted[truth == side] == side) for side in (False, True) if (truth == side).any()]
    return ModalityClassification(
        accuracy=float(np.mean(predicted == truth)),
        balanced_accuracy=float(np.mean(recalls)),
        auroc=auroc(scores, is_b[test]),
        num_test=int(test.sum()),
    )


@dataclass(frozen=True, eq=False)
class LabelledFeatures:
    """Features of one modality with labels ``(N, L)`` (NaN = unknown), splits and groups per row."""

    features: np.ndarray
    labels: np.ndarray
    splits: tuple[str, ...]
    groups: tuple[str, ...]

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(np.array(self.splits, dtype=object) == split)


@dataclass(frozen=True, eq=False)
class TransferResult:
    """Probe scores by (training modality, test modality), e.g. ``evaluations[("DX", "CT")]``."""

    label_names: tuple[str, ...]
    evaluations: dict[tuple[str, str], ProbeEvaluation]


def cross_modal_transfer(
    modalities: dict[str, LabelledFeatures], label_names: Sequence[str], *,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID, num_resamples: int = 1000, seed: int = 0, progress: bool = False,
) -> TransferResult:
    """Fit a probe on each modality's train/val rows and score it on every modality's test rows."""
    evaluations = {}
    for source, source_data in modalities.items():
        train, val = source_data.rows("train"), source_data.rows("val")
        if train.size == 0 or val.size == 0:
            raise ValueError(f"modality {source!r} needs train and val rows for transfer")
        probe = fit_linear_probe(
            source_data.features[train], source_data.labels[train],
            source_data.features[val], source_data.labels[val],
            label_names=label_names, l2_grid=l2_grid, progress=progress,
        )
        for target, target_data in modalities.items():
            test = target_data.rows("test")
            if test.size == 0:
                raise ValueError(f"modality {target!r} needs test rows for transfer")
            evaluations[(source, target)] = evaluate_probe(
                probe, target_data.features[test], target_data.labels[test], num_resamples=num_resamples, seed=seed
            )
    return TransferResult(label_names=tuple(label_names), evaluations=evaluations)


@dataclass(frozen=True, eq=False)
class ModalityAnalysis:
    """Everything :func:`analyse_modalities` measures (see the module documentation).

    ``variance_shares[m]`` gives, for modality m (0 = A, 1 = B), the share of its variance in the shared,
    A-specific and B-specific subspaces and outside all three, in that order. ``linear_cka`` is None
    without paired rows.
    """

    modality_names: tuple[str, str]
    num_rows: tuple[int, int]
    classification: ModalityClassification
    paired_rows: int
    linear_cka: float | None
    covariance_alignment: float
    ranks: tuple[int, int]
    subspaces: SubspaceSplit
    variance_shares: np.ndarray
    transfer: TransferResult | None


def analyse_modalities(
    features_a, features_b, *, modality_names: tuple[str, str] = (XRAY_MODALITY, CT_MODALITY), pairs=None,
    groups_a: Sequence[str] | None = None, groups_b: Sequence[str] | None = None, rank: int | None = None,
    variance_fraction: float = 0.9, shared_angle_deg: float = 30.0, transfer: TransferResult | None = None,
    seed: int = 0, progress: bool = False,
) -> ModalityAnalysis:
    """Measure how modalities A and B use the feature space.

    Args:
        features_a, features_b: ``(N_A, C)`` and ``(N_B, C)`` features.
        modality_names: names of A and B.
        pairs: optional ``(P, 2)`` row numbers ``(row in A, row in B)`` of the same subject, for CKA.
        groups_a, groups_b: optional group (patient, phantom) per row, for the classifier's split.
        rank, variance_fraction: size of each principal subspace (see :func:`principal_subspace`).
        shared_angle_deg: principal angles below this define shared directions.
        transfer: a :func:`cross_modal_transfer` result to carry in the report.
        seed: seed of the classifier's split.
    """
    features_a = _as_features(features_a, "features_a")
    features_b = _as_features(features_b, "features_b")
    _check_same_width(features_a, features_b)
    _check_rank(rank, variance_fraction, features_a.shape[1])
    linear_cka_value, paired_rows = None, 0
    if pairs is not None:
        pairs = np.asarray(pairs)
        if pairs.ndim != 2 or pairs.shape[1] != 2 or not np.issubdtype(pairs.dtype, np.integer):
            raise ValueError(f"pairs must be a (P, 2) integer array, got {pairs.dtype} {pairs.shape}")
        out_of_range = pairs.size and (
            pairs.min() < 0 or pairs[:, 0].max() >= len(features_a) or pairs[:, 1].max() >= len(features_b)
        )
        if out_of_range:
            raise ValueError("pairs must hold row numbers of features_a and features_b")
        if len(pairs) >= 2:
            linear_cka_value = linear_cka(features_a[pairs[:, 0]], features_b[pairs[:, 1]])
            paired_rows = len(pairs)
    _, covariance_a = _mean_and_covariance(features_a)
    _, covariance_b = _mean_and_covariance(features_b)
    basis_a, _ = _top_eigenvectors(covariance_a, rank, variance_fraction)
    basis_b, _ = _top_eigenvectors(covariance_b, rank, variance_fraction)
    subspaces = split_subspaces(basis_a, basis_b, shared_angle_deg)
    union = _span(subspaces.shared, subspaces.specific_a, subspaces.specific_b)
    variance_shares = np.array([
        [
            _variance_share(covariance, subspaces.shared),
            _variance_share(covariance, subspaces.specific_a),
            _variance_share(covariance, subspaces.specific_b),
            1.0 - _variance_share(covariance, union),
        ]
        for covariance in (covariance_a, covariance_b)
    ])
    return ModalityAnalysis(
        modality_names=tuple(modality_names),
        num_rows=(len(features_a), len(features_b)),
        classification=classify_modality(
            features_a, features_b, groups_a=groups_a, groups_b=groups_b, seed=seed, progress=progress
        ),
        paired_rows=paired_rows,
        linear_cka=linear_cka_value,
        covariance_alignment=_covariance_alignment(covariance_a, covariance_b),
        ranks=(basis_a.shape[1], basis_b.shape[1]),
        subspaces=subspaces,
        variance_shares=variance_shares,
        transfer=transfer,
    )
