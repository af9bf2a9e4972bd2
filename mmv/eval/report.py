"""Written results of probes and analyses: JSON for programs, markdown for people, PNG plots.

JSON holds NaN and infinity as null. Plots use matplotlib's Agg canvas directly (no pyplot state, no
display needed); matplotlib is imported only when a plot is drawn (``pip install mmv[eval]``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from mmv.eval.analysis import ModalityAnalysis
from mmv.eval.metrics import roc_curve
from mmv.eval.probe import LinearProbe, ProbeEvaluation

__all__ = [
    "analysis_markdown",
    "analysis_summary",
    "plot_auroc_comparison",
    "plot_roc_curves",
    "plot_subspaces",
    "probe_markdown",
    "probe_summary",
    "write_json",
]


def _plain(value):
    """JSON-ready copy: arrays to lists, NaN and infinity to None, tuple keys joined with '->'."""
    if isinstance(value, Mapping):
        return {("->".join(key) if isinstance(key, tuple) else str(key)): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | Path, content: Mapping) -> Path:
    """Write ``content`` as indented JSON, NaN written as null."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_plain(content), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def _auroc_text(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def _interval_text(lower: float, upper: float) -> str:
    return "n/a" if math.isnan(lower) or math.isnan(upper) else f"{lower:.3f}-{upper:.3f}"


def _evaluation_summary(evaluation: ProbeEvaluation) -> dict:
    return {
        "macro_auroc": evaluation.macro_auroc,
        "macro_auroc_ci": evaluation.interval.macro,
        "labels": {
            name: {
                "auroc": evaluation.auroc[j],
                "auroc_ci": evaluation.interval.per_label[j],
                "positives": evaluation.positives[j],
                "negatives": evaluation.negatives[j],
                "bootstrap_replicates_defined": evaluation.interval.defined_replicates[j],
            }
            for j, name in enumerate(evaluation.label_names)
        },
        "confidence": evaluation.interval.confidence,
        "bootstrap_resamples": evaluation.interval.num_resamples,
        "bootstrap_macro_replicates": evaluation.interval.macro_replicates,
    }


def probe_summary(probe: LinearProbe, evaluation: ProbeEvaluation, context: Mapping) -> dict:
    """Everything about one probe run as a JSON-ready dict; ``context`` (protocol, counts, ...) comes first."""
    summary = dict(context)
    summary.update(_evaluation_summary(evaluation))
    for j, name in enumerate(probe.label_names):
        summary["labels"][name].update({
            "l2": probe.l2[j],
            "selected_by": probe.selected_by[j],
            "skipped": probe.skipped.get(name),
        })
    summary["l2_grid"] = probe.l2_grid
    summary["validation_log_loss"] = {name: probe.validation_log_loss[:, j] for j, name in enumerate(probe.label_names)}
    summary["validation_auroc"] = {name: probe.validation_auroc[:, j] for j, name in enumerate(probe.label_names)}
    return summary


def probe_markdown(probe: LinearProbe, evaluation: ProbeEvaluation, title: str, notes: Mapping[str, object]) -> str:
    """A markdown table of per-label AUROC with intervals, test counts and chosen L2, then the macro row."""
    percent = round(100 * evaluation.interval.confidence)
    lines = [f"# {title}", ""]
    lines += [f"- {key}: {value}" for key, value in notes.items()]
    lines += ["", f"| label | positives | negatives | AUROC | {percent}% CI | L2 |", "|---|---:|---:|---:|---:|---:|"]
    for j, name in enumerate(evaluation.label_names):
        l2 = "skipped: " + probe.skipped[name] if name in probe.skipped else f"{probe.l2[j]:g}"
        lines.append(
            f"| {name} | {evaluation.positives[j]} | {evaluation.negatives[j]} | {_auroc_text(evaluation.auroc[j])} "
            f"| {_interval_text(*evaluation.interval.per_label[j])} | {l2} |"
        )
    macro_interval = _interval_text(*evaluation.interval.macro)
    lines.append(f"| **macro** | | | **{_auroc_text(evaluation.macro_auroc)}** | {macro_interval} | |")
    lines += [
        "",
        f"Intervals: percentile bootstrap, {evaluation.interval.num_resamples} resamples of the test rows "
        "(not stratified, the same rows for every label).",
        "",
    ]
    return "\n".join(lines)


def _figure(width: float, height: float, columns: int = 1):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("plots need matplotlib: pip install 'mmv[eval]'") from error
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(1, columns, squeeze=False)[0]


def plot_roc_curves(path: str | Path, evaluation: ProbeEvaluation, title: str) -> Path:
    """One PNG with the ROC curve of every label that has both classes, AUROC in the legend."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, (axes,) = _figure(6.5, 6.0)
    for j, name in enumerate(evaluation.label_names):
        labels = evaluation.labels[:, j]
        if math.isnan(evaluation.auroc[j]):
            continue
        curve = roc_curve(evaluation.scores[:, j], labels)
        axes.plot(curve.fpr, curve.tpr, linewidth=1.3, label=f"{name} ({evaluation.auroc[j]:.3f})")
    axes.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=0.8)
    axes.set(xlim=(0, 1), ylim=(0, 1), xlabel="false positive rate", ylabel="true positive rate", aspect="equal")
    axes.set_title(f"{title}\nmacro AUROC {_auroc_text(evaluation.macro_auroc)}", fontsize=10)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="lower right", fontsize=7)
    figure.savefig(path, dpi=120)
    return path


def plot_auroc_comparison(path: str | Path, panels: Mapping[str, Mapping[str, ProbeEvaluation]]) -> Path:
    """One PNG of bar charts, one panel per entry of ``panels`` (its title), side by side: per label and
    macro AUROC of each of the panel's evaluations (its legend entry), with their bootstrap intervals as
    whiskers. The evaluations of a panel share their labels, e.g. two encoders probed on the same rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axes_row = _figure(6.0 * len(panels), 4.0, columns=len(panels))
    for axes, (title, evaluations) in zip(axes_row, panels.items()):
        label_names = next(iter(evaluations.values())).label_names
        if any(evaluation.label_names != label_names for evaluation in evaluations.values()):
            raise ValueError(f"plot_auroc_comparison: the evaluations of panel {title!r} must share their labels")
        names = [*label_names, "macro"]
        positions = np.arange(len(names))
        width = 0.8 / len(evaluations)
        for i, (legend, evaluation) in enumerate(evaluations.items()):
            values = np.append(evaluation.auroc, evaluation.macro_auroc)
            intervals = np.vstack((evaluation.interval.per_label, evaluation.interval.macro))
            whiskers = np.clip(np.stack((values - intervals[:, 0], intervals[:, 1] - values)), 0.0, None)
            offset = (i - (len(evaluations) - 1) / 2) * width
            axes.bar(positions + offset, values, width=width, yerr=np.nan_to_num(whiskers), capsize=3, label=legend)
        axes.axhline(0.5, color="0.5", linewidth=0.8, linestyle="--")
        axes.set_xticks(positions, names, rotation=30, ha="right")
        axes.set(ylim=(0.3, 1.0), ylabel="AUROC")
        confidence = next(iter(evaluations.values())).interval.confidence
        axes.set_title(f"{title} ({confidence:.0%} bootstrap intervals)", fontsize=10)
        axes.legend(loc="lower right", fontsize=8)
    figure.savefig(path, dpi=100)
    return path


def analysis_summary(analysis: ModalityAnalysis, context: Mapping) -> dict:
    """A modality analysis as a JSON-ready dict (bases omitted; their dimensions are given)."""
    name_a, name_b = analysis.modality_names
    subspaces = analysis.subspaces
    summary = dict(context)
    summary.update({
        "modalities": list(analysis.modality_names),
        "rows": dict(zip(analysis.modality_names, analysis.num_rows)),
        "modality_classifier": {
            "accuracy": analysis.classification.accuracy,
            "balanced_accuracy": analysis.classification.balanced_accuracy,
            "auroc": analysis.classification.auroc,
            "test_rows": analysis.classification.num_test,
        },
        "paired_rows": analysis.paired_rows,
        "linear_cka": analysis.linear_cka,
        "covariance_alignment": analysis.covariance_alignment,
        "principal_subspace_ranks": dict(zip(analysis.modality_names, analysis.ranks)),
        "principal_angles_deg": subspaces.angles_deg,
        "shared_angle_deg": subspaces.shared_angle_deg,
        "subspace_dims": {
            "shared": subspaces.shared.shape[1],
            f"{name_a}_specific": subspaces.specific_a.shape[1],
            f"{name_b}_specific": subspaces.specific_b.shape[1],
        },
        "variance_shares": {
            modality: dict(zip(("shared", f"{name_a}_specific", f"{name_b}_specific", "outside"), shares))
            for modality, shares in zip(analysis.modality_names, analysis.variance_shares)
        },
    })
    if analysis.transfer is not None:
        summary["transfer"] = {
            f"{source}->{target}": _evaluation_summary(evaluation)
            for (source, target), evaluation in analysis.transfer.evaluations.items()
        }
    return summary


def _number(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def analysis_markdown(analysis: ModalityAnalysis, title: str) -> str:
    """The modality analysis as markdown: the measures, the subspace table and the transfer table."""
    name_a, name_b = analysis.modality_names
    classification = analysis.classification
    cka = (
        f"{_number(analysis.linear_cka)} on {analysis.paired_rows} paired rows"
        if analysis.linear_cka is not None else "n/a (no paired rows)"
    )
    angles = ", ".join(f"{angle:.1f}" for angle in analysis.subspaces.angles_deg)
    lines = [
        f"# {title}",
        "",
        f"- rows: {name_a} {analysis.num_rows[0]}, {name_b} {analysis.num_rows[1]}",
        f"- modality classifier (held out, {classification.num_test} rows): "
        f"accuracy {_number(classification.accuracy)}, "
        f"balanced accuracy {_number(classification.balanced_accuracy)}, AUROC {_number(classification.auroc)}",
        f"- linear CKA: {cka}",
        f"- covariance alignment: {_number(analysis.covariance_alignment)}",
        f"- principal subspace ranks: {name_a} {analysis.ranks[0]}, {name_b} {analysis.ranks[1]}",
        f"- principal angles (degrees): {angles}",
        f"- shared directions: principal angle below {analysis.subspaces.shared_angle_deg:g} degrees",
        "",
        f"| variance of | shared ({analysis.subspaces.shared.shape[1]}) | {name_a}-specific "
        f"({analysis.subspaces.specific_a.shape[1]}) | {name_b}-specific ({analysis.subspaces.specific_b.shape[1]}) "
        "| outside |",
        "|---|---:|---:|---:|---:|",
    ]
    for modality, shares in zip(analysis.modality_names, analysis.variance_shares):
        lines.append(f"| {modality} | " + " | ".join(_number(share) for share in shares) + " |")
    if analysis.transfer is not None:
        names = analysis.transfer.label_names
        lines += ["", "## Cross-modal transfer (test AUROC)", ""]
        lines += ["| train -> test | macro | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
        for (source, target), evaluation in analysis.transfer.evaluations.items():
            cells = " | ".join(_number(value) for value in evaluation.auroc)
            lines.append(f"| {source} -> {target} | {_number(evaluation.macro_auroc)} | {cells} |")
    lines.append("")
    return "\n".join(lines)


def plot_subspaces(path: str | Path, analysis: ModalityAnalysis, title: str) -> Path:
    """Two panels: principal angles against the shared threshold, and each modality's variance shares."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name_a, name_b = analysis.modality_names
    figure, (angle_axes, share_axes) = _figure(11.0, 4.5, columns=2)
    angles = analysis.subspaces.angles_deg
    shared = angles < analysis.subspaces.shared_angle_deg
    positions = np.arange(1, angles.size + 1)
    angle_axes.bar(positions[shared], angles[shared], color="tab:purple", label="shared")
    angle_axes.bar(positions[~shared], angles[~shared], color="0.6", label="not shared")
    angle_axes.axhline(analysis.subspaces.shared_angle_deg, color="black", linestyle="--", linewidth=0.8)
    angle_axes.set(ylim=(0, 90), xlabel="principal angle index", ylabel="angle (degrees)")
    angle_axes.set_title(f"principal angles, {name_a} vs {name_b} subspaces", fontsize=10)
    angle_axes.legend(fontsize=8)
    # Side by side rather than stacked: the two specific subspaces may overlap, so shares need not add to 1.
    parts = ("shared", f"{name_a}-specific", f"{name_b}-specific", "outside")
    colours = ("tab:purple", "tab:blue", "tab:orange", "0.7")
    width = 0.2
    for k, (part, colour) in enumerate(zip(parts, colours)):
        offsets = np.arange(2) + (k - 1.5) * width
        share_axes.bar(offsets, analysis.variance_shares[:, k], width, color=colour, label=part)
    share_axes.set_xticks(np.arange(2), list(analysis.modality_names))
    share_axes.set(ylim=(0, 1), ylabel="share of the modality's variance")
    share_axes.set_title("where each modality's variance lies", fontsize=10)
    share_axes.legend(fontsize=8)
    figure.suptitle(title, fontsize=11)
    figure.savefig(path, dpi=120)
    return path
