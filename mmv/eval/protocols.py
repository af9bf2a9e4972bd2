"""Evaluation protocols: which labels, which label values and which rows train, validate and test a probe.

A protocol turns a feature table (see :mod:`mmv.eval.features`) into train / val / test rows with labels.
The data set protocols read their labels from the data set's own label files, with the standard library
only, and match them to the feature ids; ``manifest`` takes labels and splits from the feature table.

``chexpert5``
    CheXpert, the 5 competition labels (Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural
    Effusion). Labels root: the directory holding ``train.csv`` and ``valid.csv``. Test: every image of
    ``valid.csv`` (expert labels, 0/1). Train: ``train.csv``, with uncertain (-1) labels mapped per label
    as is common after the CheXpert paper's comparison of policies: U-Ones for Atelectasis and Edema,
    U-Zeros for Cardiomegaly, Consolidation and Pleural Effusion; blank (not mentioned) is negative.
    Validation: a seeded share of the training patients. Ids match on the last four components of
    ``Path`` (``train/patient00001/study1/view1_frontal.jpg``), whatever prefix either side has.
``mimic14``
    MIMIC-CXR-JPG, the 14 CheXpert-labeller labels. Labels root: the directory holding
    ``mimic-cxr-2.0.0-chexpert.csv.gz`` and ``mimic-cxr-2.0.0-split.csv.gz`` (or the unzipped ``.csv``).
    Splits: the official split (train / validate / test). Labels are per study, joined to images on
    (subject_id, study_id): 1 positive, 0 negative, blank (not mentioned) negative, -1 (uncertain)
    ignored. Images whose study has no label row are left out. Ids match on the ``dicom_id`` (a file name
    such as ``files/p10/p10000032/s50414267/<dicom_id>.jpg`` matches too).
``ctrate18``
    CT-RATE, the 18 multi-abnormality labels (0/1). Labels root: the CT-RATE root (holding
    ``dataset/multi_abnormality_labels/``) or the ``dataset`` directory. Test: the valid split
    (``valid_predicted_labels.csv``). Train: ``train_predicted_labels.csv``; validation: a seeded share of
    the training patients. Ids match on the volume name without extension (``train_1_a_1``).
``manifest``
    Any labels: the label columns of the feature table, 1 / 0 / blank, with -1 (uncertain) ignored.
    Splits: the table's ``split`` column (train, val or valid or validate or validation, test). Without
    val rows, validation is a seeded share of the training groups; if no row has a split, test and
    validation are both seeded shares of the groups. Rows are grouped by ``group`` (the id when blank).

Carved validation (and test) shares are drawn over groups (patients), never splitting a patient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from mmv.data.dataset_spec import COMMON_SPLIT_NAMES
from mmv.data.datasets import CHEXPERT_COMPETITION_LABELS, CHEXPERT_LABELS, CT_RATE_LABELS
from mmv.data.tables import TableError, read_table
from mmv.eval.features import FeatureTable

__all__ = [
    "CHEXPERT5_LABELS",
    "CHEXPERT5_UNCERTAIN_AS",
    "CTRATE18_LABELS",
    "MIMIC14_LABELS",
    "PROTOCOLS",
    "LabelFileError",
    "LabelTable",
    "Protocol",
    "ProtocolData",
    "ProtocolSplit",
    "carve_groups",
    "chexpert_key",
    "file_stem_key",
    "get_protocol",
    "prepare_protocol",
]

CHEXPERT5_LABELS = CHEXPERT_COMPETITION_LABELS
CHEXPERT5_UNCERTAIN_AS = {
    "Atelectasis": 1.0,
    "Cardiomegaly": 0.0,
    "Consolidation": 0.0,
    "Edema": 1.0,
    "Pleural Effusion": 0.0,
}
MIMIC14_LABELS = CHEXPERT_LABELS
CTRATE18_LABELS = CT_RATE_LABELS
SPLITS = ("train", "val", "test")


class LabelFileError(TableError):
    """A label file that is missing, unreadable or not in the layout its protocol expects."""


@dataclass(frozen=True, eq=False)
class LabelTable:
    """Labels of one data set: per item its match key, group (patient), split and label values.

    ``splits`` are ``train``, ``val`` or ``test``; ``labels`` is ``(n, L)`` float64 with NaN = unknown.
    """

    keys: tuple[str, ...]
    groups: tuple[str, ...]
    splits: tuple[str, ...]
    label_names: tuple[str, ...]
    labels: np.ndarray


def _read_labels(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    """The rows of a label file, or LabelFileError."""
    try:
        return read_table(path, required)
    except TableError as error:
        raise LabelFileError(error.path, error.reason) from None


def _label_value(cell: str, path: Path, line: int, column: str) -> float:
    """The number in a label cell; NaN for a blank cell."""
    cell = cell.strip()
    if not cell:
        return float("nan")
    try:
        value = float(cell)
    except ValueError:
        raise LabelFileError(path, f"line {line}, column {column!r}: {cell!r} is not a label value") from None
    if value not in (1.0, 0.0, -1.0):
        raise LabelFileError(path, f"line {line}, column {column!r}: {cell!r} is not 1, 0, -1 or blank")
    return value


def _label_rows(
    path: Path, rows: list[dict[str, str]], label_names: Sequence[str], map_value: Callable[[str, float], float]
) -> np.ndarray:
    labels = np.empty((len(rows), len(label_names)))
    for i, row in enumerate(rows):
        for j, name in enumerate(label_names):
            labels[i, j] = map_value(name, _label_value(row[name], path, i + 2, name))
    return labels


def _path_key(path: str, components: int) -> str:
    return "/".join(PurePosixPath(path.strip().replace("\\", "/")).parts[-components:])


def chexpert_key(path: str) -> str:
    """Match key of a CheXpert image: the last four path components (split/patient/study/view)."""
    return _path_key(path, 4)


def file_stem_key(path: str) -> str:
    """Match key of a MIMIC-CXR image or CT-RATE volume: the file name up to its first dot."""
    return _path_key(path, 1).split(".")[0]


def _chexpert_labels(root: Path) -> LabelTable:
    def train_value(name: str, value: float) -> float:
        if math.isnan(value):
            return 0.0
        return CHEXPERT5_UNCERTAIN_AS[name] if value == -1.0 else value

    keys, groups, splits, label_blocks = [], [], [], []
    for file_name, split in (("train.csv", "train"), ("valid.csv", "test")):
        path = root / file_name
        rows = _read_labels(path, ("Path",) + CHEXPERT5_LABELS)
        for line, row in enumerate(rows, start=2):
            key = chexpert_key(row["Path"])
            parts = PurePosixPath(key).parts
            if len(parts) != 4:
                raise LabelFileError(path, f"line {line}: Path {key!r} is not split/patient/study/view")
            keys.append(key)
            groups.append(parts[1])
            splits.append(split)
        label_blocks.append(_label_rows(path, rows, CHEXPERT5_LABELS, train_value))
    return LabelTable(tuple(keys), tuple(groups), tuple(splits), CHEXPERT5_LABELS, np.concatenate(label_blocks))


def _first_existing(candidates: Sequence[Path]) -> Path:
    for candidate in candidates:
        if candidate.exists():
            return candidate
    return candidates[0]


def _mimic_labels(root: Path) -> LabelTable:
    label_path = _first_existing([root / "mimic-cxr-2.0.0-chexpert.csv.gz", root / "mimic-cxr-2.0.0-chexpert.csv"])
    split_path = _first_existing([root / "mimic-cxr-2.0.0-split.csv.gz", root / "mimic-cxr-2.0.0-split.csv"])

    def study_value(name: str, value: float) -> float:
        if math.isnan(value):
            return 0.0
        return float("nan") if value == -1.0 else value

    label_rows = _read_labels(label_path, ("subject_id", "study_id") + MIMIC14_LABELS)
    study_labels = _label_rows(label_path, label_rows, MIMIC14_LABELS, study_value)
    study_rows = {}
    for i, row in enumerate(label_rows):
        study = (row["subject_id"].strip(), row["study_id"].strip())
        if study in study_rows:
            raise LabelFileError(label_path, f"line {i + 2}: study {study[1]} of subject {study[0]} appears twice")
        study_rows[study] = i

    keys, groups, splits, rows = [], [], [], []
    for line, row in enumerate(_read_labels(split_path, ("dicom_id", "study_id", "subject_id", "split")), start=2):
        split = COMMON_SPLIT_NAMES.get(row["split"].strip().lower())
        if split is None:
            raise LabelFileError(split_path, f"line {line}: split {row['split']!r} is not train/validate/test")
        study = (row["subject_id"].strip(), row["study_id"].strip())
        if study not in study_rows:
            continue
        keys.append(file_stem_key(row["dicom_id"]))
        groups.append(study[0])
        splits.append(split)
        rows.append(study_rows[study])
    labels = study_labels[np.array(rows, dtype=np.int64)] if rows else np.empty((0, len(MIMIC14_LABELS)))
    return LabelTable(tuple(keys), tuple(groups), tuple(splits), MIMIC14_LABELS, labels)


def _ctrate_labels(root: Path) -> LabelTable:
    label_dir = _first_existing([root / "dataset" / "multi_abnormality_labels", root / "multi_abnormality_labels"])
    keys, groups, splits, label_blocks = [], [], [], []
    for file_name, split in (("train_predicted_labels.csv", "train"), ("valid_predicted_labels.csv", "test")):
        path = label_dir / file_name
        label_rows = _read_labels(path, ("VolumeName",) + CTRATE18_LABELS)
        for line, row in enumerate(label_rows, start=2):
            key = file_stem_key(row["VolumeName"])
            parts = key.split("_")
            if len(parts) != 4:
                raise LabelFileError(path, f"line {line}: volume name {key!r} is not split_patient_scan_recon")
            keys.append(key)
            groups.append(f"{parts[0]}_{parts[1]}")
            splits.append(split)
        labels = _label_rows(path, label_rows, CTRATE18_LABELS, lambda name, value: value)
        if (labels == -1.0).any() or np.isnan(labels).any():
            raise LabelFileError(path, "CT-RATE labels must all be 0 or 1")
        label_blocks.append(labels)
    return LabelTable(tuple(keys), tuple(groups), tuple(splits), CTRATE18_LABELS, np.concatenate(label_blocks))


@dataclass(frozen=True)
class Protocol:
    """A named evaluation protocol (see the module documentation for each one's rules)."""

    name: str
    summary: str
    label_names: tuple[str, ...] | None
    read_labels: Callable[[Path], LabelTable] | None
    key: Callable[[str], str]


PROTOCOLS: dict[str, Protocol] = {
    "chexpert5": Protocol(
        "chexpert5",
        "CheXpert, 5 competition labels; test = valid.csv; uncertain: U-Ones for Atelectasis and Edema, "
        "U-Zeros for the others, blank = negative; validation = share of training patients",
        CHEXPERT5_LABELS,
        _chexpert_labels,
        chexpert_key,
    ),
    "mimic14": Protocol(
        "mimic14",
        "MIMIC-CXR-JPG, 14 CheXpert labels; official train/validate/test split; uncertain (-1) ignored, "
        "blank = negative",
        MIMIC14_LABELS,
        _mimic_labels,
        file_stem_key,
    ),
    "ctrate18": Protocol(
        "ctrate18",
        "CT-RATE, 18 multi-abnormality labels; test = valid split; validation = share of training patients",
        CTRATE18_LABELS,
        _ctrate_labels,
        file_stem_key,
    ),
    "manifest": Protocol(
        "manifest",
        "labels and splits of the feature table; -1 ignored; missing validation (or test) carved by group",
        None,
        None,
        str,
    ),
}


def get_protocol(name: str) -> Protocol:
    """The protocol called ``name``."""
    if name not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, got {name!r}")
    return PROTOCOLS[name]


def carve_groups(groups: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the rows whose group falls in a seeded random ``fraction`` of the distinct groups.

    At least one group is chosen and at least one is left out, so both sides are non-empty.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    distinct = sorted(set(groups))
    if len(distinct) < 2:
        raise ValueError(f"need at least 2 groups (patients) to carve a split, got {len(distinct)}")
    count = min(max(1, round(fraction * len(distinct))), len(distinct) - 1)
    chosen = set(np.array(distinct, dtype=object)[np.random.default_rng(seed).permutation(len(distinct))[:count]])
    return np.array([group in chosen for group in groups], dtype=bool)


def _manifest_labels(table: FeatureTable, test_fraction: float, seed: int) -> LabelTable:
    index = table.index
    labels = np.array(index.labels, dtype=np.float64)
    bad = ~np.isnan(labels) & ~np.isin(labels, (0.0, 1.0, -1.0))
    if bad.any():
        row, column = np.argwhere(bad)[0]
        raise ValueError(
            f"manifest labels must be 1, 0, -1 or blank: row {index.ids[row]!r}, "
            f"label {index.label_names[column]!r} holds {labels[row, column]}"
        )
    labels[labels == -1.0] = np.nan
    groups = tuple(group or row_id for group, row_id in zip(index.groups, index.ids))
    raw_splits = [split.strip().lower() for split in index.splits]
    if not any(raw_splits):
        splits = np.array(["train"] * len(raw_splits), dtype=object)
        splits[carve_groups(groups, test_fraction, seed)] = "test"
    else:
        unknown = [(row_id, split) for row_id, split in zip(index.ids, raw_splits) if split not in COMMON_SPLIT_NAMES]
        if unknown:
            row_id, split = unknown[0]
            raise ValueError(f"feature table splits must be train/val/test, row {row_id!r} has {split!r}")
        splits = np.array([COMMON_SPLIT_NAMES[split] for split in raw_splits], dtype=object)
    return LabelTable(index.ids, groups, tuple(splits), index.label_names, labels)


@dataclass(frozen=True, eq=False)
class ProtocolSplit:
    """The rows of one split: row numbers in the feature table (ascending), their ids, groups and labels."""

    rows: np.ndarray
    ids: tuple[str, ...]
    groups: tuple[str, ...]
    labels: np.ndarray

    def __len__(self) -> int:
        return self.rows.size


@dataclass(frozen=True, eq=False)
class ProtocolData:
    """A feature table cut into train / val / test by a protocol.

    ``unlabelled_feature_rows`` counts feature rows the protocol has no labels for (left out);
    ``missing_feature_items`` counts labelled items with no feature row; ``val_carved`` says whether the
    validation rows were drawn from the training groups.
    """

    protocol: Protocol
    label_names: tuple[str, ...]
    train: ProtocolSplit
    val: ProtocolSplit
    test: ProtocolSplit
    unlabelled_feature_rows: int
    missing_feature_items: int
    val_carved: bool


def prepare_protocol(
    protocol: str | Protocol,
    table: FeatureTable,
    labels_root: str | Path | None = None,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> ProtocolData:
    """Cut a feature table into train / val / test rows with the labels of a protocol.

    Args:
        protocol: a name from :data:`PROTOCOLS` or a :class:`Protocol`.
        table: the feature table (from :func:`~mmv.eval.features.read_feature_table`).
        labels_root: the data set's label directory (see the module documentation); unused by ``manifest``.
        val_fraction: share of training groups drawn for validation when the protocol has no val split.
        test_fraction: share of groups drawn for test (``manifest`` tables without any split only).
        seed: seed of those draws.
    """
    protocol = get_protocol(protocol) if isinstance(protocol, str) else protocol
    if protocol.read_labels is None:
        label_table = _manifest_labels(table, test_fraction, seed)
    else:
        if labels_root is None:
            raise ValueError(f"labels_root is required by protocol {protocol.name!r}")
        labels_root = Path(labels_root)
        if not labels_root.is_dir():
            raise LabelFileError(labels_root, "labels_root is not a directory")
        label_table = protocol.read_labels(labels_root)

    label_row_of_key = {}
    for i, key in enumerate(label_table.keys):
        if key in label_row_of_key:
            raise ValueError(f"protocol {protocol.name!r}: item {key!r} is labelled twice")
        label_row_of_key[key] = i
    feature_rows, label_rows, seen = [], [], {}
    for row, feature_id in enumerate(table.index.ids):
        key = protocol.key(feature_id)
        if key in seen:
            raise ValueError(
                f"protocol {protocol.name!r}: feature ids {table.index.ids[seen[key]]!r} and {feature_id!r} "
                f"name the same item {key!r}"
            )
        seen[key] = row
        if key in label_row_of_key:
            feature_rows.append(row)
            label_rows.append(label_row_of_key[key])
    feature_rows = np.array(feature_rows, dtype=np.int64)
    label_rows = np.array(label_rows, dtype=np.int64)
    splits = np.array(label_table.splits, dtype=object)[label_rows] if label_rows.size else np.array([], dtype=object)
    groups = [label_table.groups[i] for i in label_rows]

    in_train = np.flatnonzero(splits == "train")
    val_carved = not (splits == "val").any() and in_train.size > 0
    if val_carved:
        try:
            carved = carve_groups([groups[i] for i in in_train], val_fraction, seed)
        except ValueError as error:
            raise ValueError(f"protocol {protocol.name!r}: cannot carve validation from train: {error}") from None
        splits[in_train[carved]] = "val"

    def split_rows(name: str) -> ProtocolSplit:
        chosen = np.flatnonzero(splits == name)
        if chosen.size == 0:
            raise ValueError(f"protocol {protocol.name!r}: no feature row falls in its {name} split")
        return ProtocolSplit(
            rows=feature_rows[chosen],
            ids=tuple(table.index.ids[feature_rows[i]] for i in chosen),
            groups=tuple(groups[i] for i in chosen),
            labels=label_table.labels[label_rows[chosen]],
        )

    return ProtocolData(
        protocol=protocol,
        label_names=label_table.label_names,
        train=split_rows("train"),
        val=split_rows("val"),
        test=split_rows("test"),
        unlabelled_feature_rows=len(table.index) - feature_rows.size,
        missing_feature_items=len(label_table.keys) - feature_rows.size,
        val_carved=bool(val_carved),
    )
