"""Entry points of the evaluation commands: a probe run and a modality analysis, from feature tables to files.

These are what ``mmv probe`` and ``mmv analyze`` call; they read feature tables written by ``mmv embed``
(see :mod:`mmv.eval.features`) and write JSON, markdown and PNG results into an output directory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmv.data.datasets import CT_MODALITY, XRAY_MODALITY
from mmv.eval.analysis import LabelledFeatures, ModalityAnalysis, analyse_modalities, cross_modal_transfer
from mmv.eval.features import FeatureTable, read_feature_table
from mmv.eval.probe import (
    DEFAULT_L2_GRID,
    LinearProbe,
    ProbeEvaluation,
    evaluate_probe,
    fit_linear_probe,
    paired_macro_auroc_difference,
)
from mmv.eval.protocols import SPLITS, ProtocolData, get_protocol, prepare_protocol
from mmv.eval.report import (
    analysis_markdown,
    analysis_summary,
    plot_roc_curves,
    plot_subspaces,
    probe_markdown,
    probe_summary,
    write_json,
)

__all__ = ["AnalysisRun", "ProbeRun", "compare_probe_runs", "run_analysis", "run_probe"]


@dataclass(frozen=True, eq=False)
class ProbeRun:
    """A finished probe run: the protocol's data, the fitted probe, its test evaluation and the files written."""

    data: ProtocolData
    probe: LinearProbe
    evaluation: ProbeEvaluation
    outputs: dict[str, Path]


def run_probe(
    features_dir: str | Path,
    protocol: str,
    out_dir: str | Path,
    *,
    labels_root: str | Path | None = None,
    array: str | Sequence[str] = "cls",
    modality: str | None = None,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    select_by: str = "log_loss",
    val_fraction: float = 0.1,
    seed: int = 0,
    num_resamples: int = 1000,
    max_iter: int = 200,
    progress: bool = True,
) -> ProbeRun:
    """Fit and test a linear probe on a feature table under a named protocol.

    Writes ``<protocol>.json`` (all figures), ``<protocol>.md`` (the table) and ``<protocol>_roc.png``
    into ``out_dir``; with ``modality``, only the rows of that modality tag (``"CT"``, ``"DX"``, ...) of a
    mixed table are probed, and the files are named ``<protocol>_<modality>.*``. See
    :mod:`mmv.eval.protocols` for the protocols and ``labels_root``, and
    :func:`~mmv.eval.probe.fit_linear_probe` for ``l2_grid``, ``select_by`` and ``max_iter``; ``seed``
    draws the carved validation split and the bootstrap. Several ``array`` names probe those arrays side
    by side (see :func:`~mmv.eval.features.read_feature_table`).
    """
    protocol_spec = get_protocol(protocol)
    table = read_feature_table(features_dir, array)
    if modality is not None:
        table = table.subset(_modality_rows(table, modality, None, seed))
    data = prepare_protocol(protocol_spec, table, labels_root, val_fraction=val_fraction, seed=seed)
    probe = fit_linear_probe(
        table.select(data.train.rows), data.train.labels,
        table.select(data.val.rows), data.val.labels,
        label_names=data.label_names, l2_grid=l2_grid, select_by=select_by, max_iter=max_iter, progress=progress,
    )
    evaluation = evaluate_probe(
        probe, table.select(data.test.rows), data.test.labels, num_resamples=num_resamples, seed=seed
    )
    context = {
        "protocol": protocol_spec.name,
        "protocol_summary": protocol_spec.summary,
        "features_dir": str(Path(features_dir)),
        "array": table.array_name,
        "modality": modality,
        "feature_dim": int(table.features.shape[1]),
        "labels_root": None if labels_root is None else str(labels_root),
        "rows": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
        "val_carved_from_train": data.val_carved,
        "val_fraction": val_fraction if data.val_carved else None,
        "unlabelled_feature_rows": data.unlabelled_feature_rows,
        "missing_feature_items": data.missing_feature_items,
        "select_by": select_by,
        "seed": seed,
    }
    notes = {
        "protocol": f"`{protocol_spec.name}`: {protocol_spec.summary}",
        "features": f"`{table.array_name}` ({table.features.shape[1]} dims) from `{Path(features_dir)}`"
        + ("" if modality is None else f", {modality} rows only"),
        "rows": f"train {len(data.train)}, val {len(data.val)}, test {len(data.test)}",
        "left out": f"{data.unlabelled_feature_rows} feature rows without labels, "
        f"{data.missing_feature_items} labelled items without features",
    }
    out_dir = Path(out_dir)
    stem = protocol_spec.name if modality is None else f"{protocol_spec.name}_{modality}"
    title = f"Linear probe, {protocol_spec.name}, {table.array_name} features" + ("" if modality is None else f", {modality}")
    markdown_path = out_dir / f"{stem}.md"
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown_path.write_text(probe_markdown(probe, evaluation, title, notes), encoding="utf-8")
    outputs = {
        "json": write_json(out_dir / f"{stem}.json", probe_summary(probe, evaluation, context)),
        "markdown": markdown_path,
        "roc_plot": plot_roc_curves(out_dir / f"{stem}_roc.png", evaluation, title),
    }
    return ProbeRun(data=data, probe=probe, evaluation=evaluation, outputs=outputs)


def compare_probe_runs(
    run: ProbeRun, baseline: ProbeRun, *, seed: int = 0, num_resamples: int = 1000, confidence: float = 0.95
) -> dict:
    """Macro AUROC of ``run`` minus that of ``baseline``, with a paired bootstrap interval
    (:func:`~mmv.eval.probe.paired_macro_auroc_difference`): two probe runs of one protocol on two
    encoders' features of the same images, e.g. a pretrained encoder against its random initialisation.

    Raises:
        ValueError: the two runs did not test the same rows (ids, in order) under the same labels.
    """
    if run.data.test.ids != baseline.data.test.ids or run.data.label_names != baseline.data.label_names:
        raise ValueError(
            "compare_probe_runs: the two runs must test the same rows under the same labels "
            f"({len(run.data.test)} and {len(baseline.data.test)} test rows)"
        )
    return paired_macro_auroc_difference(
        run.evaluation, baseline.evaluation, seed, num_resamples=num_resamples, confidence=confidence
    )


def _modality_rows(table: FeatureTable, modality: str, max_rows: int | None, seed: int) -> np.ndarray:
    rows = np.flatnonzero(np.array(table.index.modalities, dtype=object) == modality)
    if rows.size < 2:
        found = sorted(set(table.index.modalities))
        raise ValueError(f"modality {modality!r} has {rows.size} rows in {table.directory}; modalities there: {found}")
    if max_rows is not None and rows.size > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=max_rows, replace=False))
    return rows


def _pairs_by_group(groups_a: Sequence[str], groups_b: Sequence[str]) -> np.ndarray | None:
    """Row pairs of groups that hold exactly one row of each modality; None when fewer than two."""

    def single_rows(groups: Sequence[str]) -> dict[str, int]:
        rows: dict[str, list[int]] = {}
        for row, group in enumerate(groups):
            if group:
                rows.setdefault(group, []).append(row)
        return {group: found[0] for group, found in rows.items() if len(found) == 1}

    rows_a, rows_b = single_rows(groups_a), single_rows(groups_b)
    common = sorted(rows_a.keys() & rows_b.keys())
    return np.array([[rows_a[group], rows_b[group]] for group in common], dtype=np.int64) if len(common) >= 2 else None


def _labelled_features(table: FeatureTable, val_fraction: float, seed: int) -> LabelledFeatures:
    data = prepare_protocol("manifest", table, val_fraction=val_fraction, seed=seed)
    labels = np.full(table.index.labels.shape, np.nan)
    splits = np.full(len(table.index), "", dtype=object)
    for name in SPLITS:
        split = getattr(data, name)
        labels[split.rows] = split.labels
        splits[split.rows] = name
    groups = tuple(group or row_id for group, row_id in zip(table.index.groups, table.index.ids))
    return LabelledFeatures(table.features, labels, tuple(splits), groups)


@dataclass(frozen=True, eq=False)
class AnalysisRun:
    """A finished modality analysis and the files written."""

    analysis: ModalityAnalysis
    outputs: dict[str, Path]


def run_analysis(
    features_dir: str | Path,
    out_dir: str | Path,
    *,
    modalities: tuple[str, str] = (XRAY_MODALITY, CT_MODALITY),
    second_features_dir: str | Path | None = None,
    array: str = "cls",
    rank: int | None = None,
    variance_fraction: float = 0.9,
    shared_angle_deg: float = 30.0,
    transfer: bool | None = None,
    max_rows_per_modality: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    num_resamples: int = 1000,
    progress: bool = True,
) -> AnalysisRun:
    """Analyse how two modalities share the feature space (see :mod:`mmv.eval.analysis`).

    Modality A's rows are those of ``features_dir`` whose ``modality`` is ``modalities[0]``; modality B's
    come from ``second_features_dir`` (default: the same table) with ``modalities[1]``. Rows whose group
    holds exactly one row of each modality are paired for CKA. Cross-modal transfer runs on the label
    columns both tables have, when ``transfer`` is True, or when it is None and such columns exist; the
    ``split`` column gives train / val / test (carved by group where missing, as in the ``manifest``
    protocol). ``max_rows_per_modality`` caps the rows read per modality (a seeded random subset).
    Writes ``analysis.json``, ``analysis.md`` and ``subspaces.png`` into ``out_dir``.
    """
    table_a = read_feature_table(features_dir, array)
    table_b = table_a if second_features_dir is None else read_feature_table(second_features_dir, array)
    if table_a.features.shape[1] != table_b.features.shape[1]:
        raise ValueError(
            "both feature tables must have the same width, "
            f"got {table_a.features.shape[1]} and {table_b.features.shape[1]}"
        )
    common_labels = [name for name in table_a.index.label_names if name in table_b.index.label_names]
    subset_a = table_a.subset(_modality_rows(table_a, modalities[0], max_rows_per_modality, seed), common_labels)
    subset_b = table_b.subset(_modality_rows(table_b, modalities[1], max_rows_per_modality, seed), common_labels)
    known_in_both = bool(common_labels) and all(
        (~np.isnan(subset.index.labels)).any() for subset in (subset_a, subset_b)
    )
    if transfer and not known_in_both:
        raise ValueError(f"transfer needs label columns known in both modalities; common columns: {common_labels}")
    transfer_result = None
    if transfer or (transfer is None and known_in_both):
        transfer_result = cross_modal_transfer(
            {
                modalities[0]: _labelled_features(subset_a, val_fraction, seed),
                modalities[1]: _labelled_features(subset_b, val_fraction, seed),
            },
            common_labels,
            num_resamples=num_resamples,
            seed=seed,
            progress=progress,
        )
    analysis = analyse_modalities(
        subset_a.features,
        subset_b.features,
        modality_names=modalities,
        pairs=_pairs_by_group(subset_a.index.groups, subset_b.index.groups),
        groups_a=subset_a.index.groups,
        groups_b=subset_b.index.groups,
        rank=rank,
        variance_fraction=variance_fraction,
        shared_angle_deg=shared_angle_deg,
        transfer=transfer_result,
        seed=seed,
        progress=progress,
    )
    context = {
        "features_dir": str(Path(features_dir)),
        "second_features_dir": None if second_features_dir is None else str(Path(second_features_dir)),
        "array": array,
        "variance_fraction": None if rank is not None else variance_fraction,
        "seed": seed,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"{modalities[0]} and {modalities[1]} in one feature space ({array})"
    markdown_path = out_dir / "analysis.md"
    markdown_path.write_text(analysis_markdown(analysis, title), encoding="utf-8")
    outputs = {
        "json": write_json(out_dir / "analysis.json", analysis_summary(analysis, context)),
        "markdown": markdown_path,
        "subspace_plot": plot_subspaces(out_dir / "subspaces.png", analysis, title),
    }
    return AnalysisRun(analysis=analysis, outputs=outputs)
