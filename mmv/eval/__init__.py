"""Evaluation of frozen features: feature tables, AUROC metrics, linear probes, protocols and the modality analysis.

:func:`run_embed` (:func:`run_embed_encoders` for several encoders), :func:`run_probe` and
:func:`run_analysis` are the entry points of ``mmv embed``, ``mmv probe`` and ``mmv analyze``.
"""

from mmv.data.dataset_spec import DatasetSpec
from mmv.eval.commands import compare_probe_runs, run_analysis, run_probe
from mmv.eval.embed import run_embed, run_embed_encoders
from mmv.eval.features import FeatureIndex, FeatureWriter, read_feature_table
from mmv.eval.metrics import auroc, bootstrap_auroc, macro_auroc, roc_curve
from mmv.eval.probe import evaluate_probe, fit_linear_probe
from mmv.eval.protocols import PROTOCOLS, prepare_protocol

__all__ = [
    "PROTOCOLS",
    "DatasetSpec",
    "FeatureIndex",
    "FeatureWriter",
    "auroc",
    "bootstrap_auroc",
    "compare_probe_runs",
    "evaluate_probe",
    "fit_linear_probe",
    "macro_auroc",
    "prepare_protocol",
    "read_feature_table",
    "roc_curve",
    "run_analysis",
    "run_embed",
    "run_embed_encoders",
    "run_probe",
]
