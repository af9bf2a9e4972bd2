"""The image sources of a pretraining run, built from the ``[data]`` section of its config."""

from __future__ import annotations

from mmv.data.cache import PreprocessCache
from mmv.data.dataset_spec import DatasetSpec, open_dataset
from mmv.data.datasets import MixedDataset
from mmv.data.preprocess import CtPreprocess, ModalityPreprocess, XrayPreprocess
from mmv.train.config import DataConfig

__all__ = ["ModalityPreprocess", "modality_preprocess", "build_pretraining_sources"]

# The keys of a data.sources entry.
_SOURCE_KEYS = ("kind", "path", "weight", "split", "id_column")
# The split a named data set (not a manifest) contributes when its entry names none.
_DEFAULT_NAMED_SPLIT = "train"


def modality_preprocess(config: DataConfig) -> ModalityPreprocess:
    """The preprocessing ``config`` describes: CT windowed and resampled to ``ct_spacing``, X-rays resized
    to ``xray_spacing`` mm pixels when it is set, else to ``xray_short_side`` pixels."""
    spacing = config.xray_spacing
    return ModalityPreprocess(
        ct=CtPreprocess(spacing=tuple(config.ct_spacing), window=tuple(config.ct_window)),
        xray=XrayPreprocess(
            short_side=config.xray_short_side if spacing is None else None,
            spacing=None if spacing is None else (float(spacing), float(spacing)),
        ),
    )


def _source_spec(entry: dict) -> DatasetSpec:
    """The data set of one ``data.sources`` entry: a manifest's rows of its ``split`` (all without one), a
    named data set's ``split`` (``train`` without one); no labels, since pretraining uses none."""
    if not isinstance(entry, dict) or "kind" not in entry or "path" not in entry:
        raise ValueError(f"data.sources entries must be tables with 'kind' and 'path', got {entry!r}")
    unknown = sorted(set(entry) - set(_SOURCE_KEYS))
    if unknown:
        raise ValueError(f"data.sources entry {entry!r} has unknown key(s) {unknown}")
    kind, split = entry["kind"], entry.get("split")
    if split is None and kind != "manifest":
        split = _DEFAULT_NAMED_SPLIT
    labels = {"label_columns": ()} if kind == "manifest" else {}
    try:
        return DatasetSpec(kind, entry["path"], splits=split, id_column=entry.get("id_column"), **labels)
    except ValueError as error:
        raise ValueError(f"data.sources entry {entry!r}: {error}") from None


def build_pretraining_sources(config: DataConfig) -> MixedDataset:
    """All sources of ``config`` behind one index, each preprocessed by modality, weighted by ``weight``.

    Unreadable files are skipped (and logged once) rather than ending the run.
    """
    if not config.sources:
        raise ValueError("data.sources must list at least one source (kind and path)")
    transform = modality_preprocess(config)
    cache = PreprocessCache(config.cache_dir) if config.cache_dir else None
    specs = [_source_spec(entry) for entry in config.sources]
    sources = [open_dataset(spec, transform, cache, on_error="skip") for spec in specs]
    weights = [float(entry.get("weight", len(source))) for entry, source in zip(config.sources, sources)]
    return MixedDataset(sources, weights)
