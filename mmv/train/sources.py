"""The image sources of a pretraining run, built from the ``[data]`` section of its config."""

from __future__ import annotations

import csv
from pathlib import Path

from mmv.data.cache import PreprocessCache
from mmv.data.datasets import CheXpert, CtRate, Manifest, MimicCxr, MixedDataset
from mmv.data.preprocess import CtPreprocess, ModalityPreprocess, XrayPreprocess
from mmv.train.config import DataConfig

__all__ = ["ModalityPreprocess", "modality_preprocess", "build_pretraining_sources", "SOURCE_KINDS"]

SOURCE_KINDS = ("manifest", "mimic", "chexpert", "ctrate")


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


def _manifest_rows_in_split(path: Path, split: str, id_column: str) -> set[str]:
    with open(path, newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    if rows and "split" not in rows[0]:
        raise ValueError(f"{path}: a source with split={split!r} needs a 'split' column")
    return {row[id_column] for row in rows if row["split"].strip().lower() == split}


def _build_source(spec: dict, transform, cache):
    if not isinstance(spec, dict) or "kind" not in spec or "path" not in spec:
        raise ValueError(f"data.sources entries must be tables with 'kind' and 'path', got {spec!r}")
    unknown = sorted(set(spec) - {"kind", "path", "weight", "split", "id_column"})
    if unknown:
        raise ValueError(f"data.sources entry {spec!r} has unknown key(s) {unknown}")
    kind, path, split = spec["kind"], Path(spec["path"]), spec.get("split")
    if kind == "manifest":
        id_column = spec.get("id_column")
        dataset = Manifest(path, label_columns=(), id_column=id_column, transform=transform, cache=cache, on_error="skip")
        if split is not None:
            keep = _manifest_rows_in_split(path, str(split).lower(), dataset.id_column)
            dataset.records = [record for record in dataset.records if record.id in keep]
        return dataset
    if kind == "mimic":
        return MimicCxr(path, split=split or "train", transform=transform, cache=cache, on_error="skip")
    if kind == "chexpert":
        return CheXpert(path, csv=f"{split or 'train'}.csv", transform=transform, cache=cache, on_error="skip")
    if kind == "ctrate":
        return CtRate(path, split=split or "train", transform=transform, cache=cache, on_error="skip")
    raise ValueError(f"data.sources kind must be one of {SOURCE_KINDS}, got {kind!r}")


def build_pretraining_sources(config: DataConfig) -> MixedDataset:
    """All sources of ``config`` behind one index, each preprocessed by modality, weighted by ``weight``.

    Unreadable files are skipped (and logged once) rather than ending the run.
    """
    if not config.sources:
        raise ValueError("data.sources must list at least one source (kind and path)")
    transform = modality_preprocess(config)
    cache = PreprocessCache(config.cache_dir) if config.cache_dir else None
    sources = [_build_source(spec, transform, cache) for spec in config.sources]
    for spec, source in zip(config.sources, sources):
        if len(source) == 0:
            raise ValueError(f"data source {spec!r} holds no images")
    weights = [float(spec.get("weight", len(source))) for spec, source in zip(config.sources, sources)]
    return MixedDataset(sources, weights)
