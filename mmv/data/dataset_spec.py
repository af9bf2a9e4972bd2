"""Data sets named by kind, path and splits: how pretraining, ``mmv embed`` and the demo open their images.

A :class:`DatasetSpec` says which data set (``manifest``, ``mimic``, ``chexpert`` or ``ctrate``), where it is
and which of its splits to take; :func:`open_dataset` opens it as one :class:`~mmv.data.LabelledImageDataset`
in a fixed order, each record with its split and group:

``manifest``
    any CSV manifest (:class:`~mmv.data.Manifest`): its rows in table order, split and group the table's
    ``split`` and ``group`` cells; the splits to take are values of the ``split`` column (compared regardless
    of case).
``mimic``, ``chexpert``, ``ctrate``
    MIMIC-CXR-JPG, CheXpert and CT-RATE: their official splits one after the other (:data:`NAMED_SPLITS`).
    A record's split is its split's common name (:data:`COMMON_SPLIT_NAMES`: train, val or test); its group
    numbers its patient in order of appearance (``patient_000001``, ...), so that rows of one patient stay
    together without any patient number being kept.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmv.data.cache import PreprocessCache
from mmv.data.datasets import CheXpert, CtRate, LabelledImageDataset, Manifest, MimicCxr
from mmv.image import Image

__all__ = ["COMMON_SPLIT_NAMES", "DATASET_KINDS", "NAMED_SPLITS", "DatasetSpec", "open_dataset"]

DATASET_KINDS = ("manifest", "mimic", "chexpert", "ctrate")
# The splits of each named data set, in the order they are opened.
NAMED_SPLITS = {"mimic": MimicCxr.SPLITS, "chexpert": CheXpert.SPLITS, "ctrate": CtRate.SPLITS}
# The common name (train, val, test) of each way data sets and tables name a split.
COMMON_SPLIT_NAMES = {
    "train": "train", "val": "val", "valid": "val", "validate": "val", "validation": "val", "test": "test",
}  # fmt: skip


@dataclass(frozen=True)
class DatasetSpec:
    """Which images to open.

    Attributes:
        kind: ``manifest``, ``mimic``, ``chexpert`` or ``ctrate`` (:data:`DATASET_KINDS`).
        path: the manifest CSV, or the data set's root directory.
        splits: the splits to take (one name or several); None takes all of them. ``mimic``: train,
            validate, test; ``chexpert``: train, valid (``train.csv`` / ``valid.csv``); ``ctrate``: train,
            valid; ``manifest``: values of its ``split`` column.
        fixed: CT-RATE only: read the header-fixed copies (``train_fixed/``, ``valid_fixed/``).
        id_column: manifest only: the column of sample ids; None uses ``id`` when the manifest has it,
            else the path as written.
        label_columns: manifest only: the label columns; None takes every column that is not the path,
            modality, id, split or group.

    Raises:
        ValueError: an unknown kind, a split the data set does not have (named data sets), an empty split
            name, or an option of another kind.
    """

    kind: str
    path: str | os.PathLike
    splits: str | tuple[str, ...] | None = None
    fixed: bool = False
    id_column: str | None = None
    label_columns: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in DATASET_KINDS:
            raise ValueError(f"DatasetSpec: kind must be one of {DATASET_KINDS}, got {self.kind!r}")
        object.__setattr__(self, "path", Path(self.path))
        if self.splits is not None:
            splits = (self.splits,) if isinstance(self.splits, str) else tuple(self.splits)
            if not splits or not all(isinstance(split, str) and split.strip() for split in splits):
                raise ValueError(f"DatasetSpec: splits must be None or non-empty split names, got {self.splits!r}")
            if self.kind in NAMED_SPLITS:
                unknown = [split for split in splits if split not in NAMED_SPLITS[self.kind]]
                if unknown:
                    raise ValueError(
                        f"DatasetSpec: splits of {self.kind} must be among {NAMED_SPLITS[self.kind]}, got {unknown}"
                    )
            object.__setattr__(self, "splits", tuple(dict.fromkeys(splits)))
        if self.fixed and self.kind != "ctrate":
            raise ValueError(f"DatasetSpec: fixed applies to ctrate only, not {self.kind}")
        if self.kind != "manifest" and (self.id_column is not None or self.label_columns is not None):
            raise ValueError(f"DatasetSpec: id_column and label_columns apply to manifest only, not {self.kind}")
        if self.label_columns is not None:
            object.__setattr__(self, "label_columns", tuple(self.label_columns))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (for run records such as ``embed.json``)."""
        values = dataclasses.asdict(self)
        values["path"] = str(self.path)
        return values


def _open_named(spec: DatasetSpec, options: dict[str, Any]) -> LabelledImageDataset:
    parts = []
    for split in spec.splits or NAMED_SPLITS[spec.kind]:
        if spec.kind == "mimic":
            parts.append(MimicCxr(spec.path, split=split, **options))
        elif spec.kind == "chexpert":
            parts.append(CheXpert(spec.path, csv=f"{split}.csv", **options))
        else:
            parts.append(CtRate(spec.path, split=split, fixed=spec.fixed, **options))
    dataset = parts[0].concat(*parts[1:])
    patients: dict[str, str] = {}
    for record in dataset.records:
        patients.setdefault(record.group, f"patient_{len(patients) + 1:06d}")
    return dataset.map_records(
        lambda record: dataclasses.replace(record, split=COMMON_SPLIT_NAMES.get(record.split, record.split), group=patients[record.group])
    )


def open_dataset(
    spec: DatasetSpec,
    transform: Callable[[Image], Image] | None = None,
    cache: PreprocessCache | None = None,
    on_error: str = "raise",
) -> LabelledImageDataset:
    """The images of ``spec`` in a fixed order, each record with its split and group (see the module).

    ``transform``, ``cache`` and ``on_error`` are passed to the data set (see
    :class:`mmv.data.LabelledImageDataset`).

    Raises:
        TypeError: ``spec`` is not a :class:`DatasetSpec`.
        ValueError: no image in the chosen splits (a manifest: no ``split`` column, or no row of a chosen
            split); ``TableError`` (a ValueError) for a missing or malformed table.
    """
    if not isinstance(spec, DatasetSpec):
        raise TypeError(f"spec must be a DatasetSpec, got {type(spec).__name__}")
    options = {"transform": transform, "cache": cache, "on_error": on_error}
    if spec.kind == "manifest":
        dataset = Manifest(spec.path, label_columns=spec.label_columns, id_column=spec.id_column, **options)
        if spec.splits is not None:
            dataset = dataset.in_splits(spec.splits)
    else:
        dataset = _open_named(spec, options)
    if len(dataset) == 0:
        raise ValueError(f"{spec.path}: the {spec.kind} data set holds no images (splits {spec.splits or 'all'})")
    return dataset
