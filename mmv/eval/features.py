"""The on-disk feature table: frozen encoder features per image, memory-mapped, with an index of ids and labels.

A feature table is a directory::

    features.json     {"format": "mmv-features", "version": 1, "num_rows": N,
                       "arrays": {"cls": C, "patch_mean": C, ...}, "label_names": [...]}
    index.csv         id, split, modality, group, then one column per label name
    <array>.npy       float32 (N, C) in NumPy's .npy format, one file per array name (e.g. cls.npy)
    written.npy       bool (N,): rows whose features have been written

Row i of every array belongs to row i of ``index.csv``. ``id`` is unique and names the image (a path
relative to the data set root, a DICOM id, a CT-RATE volume name); ``split`` is the data set's own split
(train / val / test, or blank when the data set has none); ``modality`` is the data set's modality tag
(``DX`` for radiographs, ``CT``); ``group`` ties rows of one patient (or phantom) together, blank when
unknown. Label cells are 1, 0, any other number the source gives (e.g. -1 for uncertain), or blank for
unknown (read back as NaN).

The index is written when the table is created, the arrays are filled in any order by
:class:`FeatureWriter`, and ``written.npy`` records which rows are done, so an interrupted run resumes by
reopening the same directory. :func:`read_feature_table` maps one array read-only.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "FeatureIndex",
    "FeatureTable",
    "FeatureTableError",
    "FeatureWriter",
    "RowSelection",
    "read_feature_index",
    "read_feature_table",
]

FORMAT_NAME = "mmv-features"
FORMAT_VERSION = 1
META_FILE = "features.json"
INDEX_FILE = "index.csv"
WRITTEN_FILE = "written.npy"
INDEX_COLUMNS = ("id", "split", "modality", "group")


class FeatureTableError(Exception):
    """A feature table directory that is missing, unreadable, inconsistent or incomplete."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def _strings(values: Sequence[str], name: str, length: int) -> tuple[str, ...]:
    values = tuple(values)
    if len(values) != length:
        raise ValueError(f"{name} must have one entry per id ({length}), got {len(values)}")
    if not all(isinstance(value, str) for value in values):
        raise TypeError(f"{name} must hold strings")
    return values


@dataclass(frozen=True, eq=False)
class FeatureIndex:
    """What each row of a feature table is: ids, split, modality, group and labels (NaN = unknown)."""

    ids: tuple[str, ...]
    splits: tuple[str, ...]
    modalities: tuple[str, ...]
    groups: tuple[str, ...]
    label_names: tuple[str, ...]
    labels: np.ndarray

    def __post_init__(self):
        ids = tuple(self.ids)
        if not all(isinstance(value, str) and value for value in ids):
            raise ValueError("ids must be non-empty strings")
        if len(set(ids)) != len(ids):
            raise ValueError("ids must be unique")
        object.__setattr__(self, "ids", ids)
        for name in ("splits", "modalities", "groups"):
            object.__setattr__(self, name, _strings(getattr(self, name), name, len(ids)))
        label_names = _strings(self.label_names, "label_names", len(self.label_names))
        if len(set(label_names)) != len(label_names) or set(label_names) & set(INDEX_COLUMNS) or "" in label_names:
            raise ValueError(f"label_names must be unique, non-empty and not one of {INDEX_COLUMNS}")
        object.__setattr__(self, "label_names", label_names)
        labels = np.array(self.labels, dtype=np.float64).reshape(len(ids), len(label_names))
        if np.isinf(labels).any():
            raise ValueError("labels must be finite or NaN (unknown)")
        labels.setflags(write=False)
        object.__setattr__(self, "labels", labels)

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, rows, label_names: Sequence[str] | None = None) -> FeatureIndex:
        """The given rows (and optionally only the named label columns, in that order)."""
        rows = np.asarray(rows, dtype=np.int64)
        label_names = self.label_names if label_names is None else tuple(label_names)
        missing = [name for name in label_names if name not in self.label_names]
        if missing:
            raise ValueError(f"label_names must be columns of the index, these are not: {missing}")
        columns = [self.label_names.index(name) for name in label_names]
        return FeatureIndex(
            ids=tuple(self.ids[i] for i in rows),
            splits=tuple(self.splits[i] for i in rows),
            modalities=tuple(self.modalities[i] for i in rows),
            groups=tuple(self.groups[i] for i in rows),
            label_names=label_names,
            labels=self.labels[rows][:, columns],
        )

    def same_as(self, other: FeatureIndex) -> bool:
        """Whether both describe the same rows with the same labels (NaN equal to NaN)."""
        return (
            self.ids == other.ids
            and self.splits == other.splits
            and self.modalities == other.modalities
            and self.groups == other.groups
            and self.label_names == other.label_names
            and np.array_equal(self.labels, other.labels, equal_nan=True)
        )


def _format_label(value: float) -> str:
    value = float(value)
    if math.isnan(value):
        return ""
    return str(int(value)) if value.is_integer() else repr(value)


def _write_index(path: Path, index: FeatureIndex) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(INDEX_COLUMNS + index.label_names)
        for i, row_id in enumerate(index.ids):
            fixed = (row_id, index.splits[i], index.modalities[i], index.groups[i])
            writer.writerow(fixed + tuple(_format_label(value) for value in index.labels[i]))


def _parse_label(cell: str, path: Path, line: int, column: str) -> float:
    if cell.strip() == "":
        return float("nan")
    try:
        value = float(cell)
    except ValueError:
        raise FeatureTableError(path, f"line {line}, column {column!r}: {cell!r} is not a number") from None
    if math.isnan(value) or math.isinf(value):
        raise FeatureTableError(path, f"line {line}, column {column!r}: labels must be finite or blank")
    return value


def read_feature_index(path: str | Path) -> FeatureIndex:
    """Read an ``index.csv`` of a feature table."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise FeatureTableError(path, f"cannot read the index ({error})") from error
    if not rows or tuple(rows[0][: len(INDEX_COLUMNS)]) != INDEX_COLUMNS:
        raise FeatureTableError(path, f"the header must start with {','.join(INDEX_COLUMNS)}")
    header, body = rows[0], rows[1:]
    label_names = tuple(header[len(INDEX_COLUMNS):])
    labels = np.empty((len(body), len(label_names)))
    for i, row in enumerate(body):
        if len(row) != len(header):
            raise FeatureTableError(path, f"line {i + 2} has {len(row)} cells, the header {len(header)}")
        for j, name in enumerate(label_names):
            labels[i, j] = _parse_label(row[len(INDEX_COLUMNS) + j], path, i + 2, name)
    try:
        return FeatureIndex(
            ids=tuple(row[0] for row in body),
            splits=tuple(row[1] for row in body),
            modalities=tuple(row[2] for row in body),
            groups=tuple(row[3] for row in body),
            label_names=label_names,
            labels=labels,
        )
    except ValueError as error:
        raise FeatureTableError(path, str(error)) from error


def _read_meta(directory: Path) -> dict:
    path = directory / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FeatureTableError(directory, f"not a feature table (no {META_FILE})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FeatureTableError(path, f"cannot read the table description ({error})") from error
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
        raise FeatureTableError(path, f"not a {FORMAT_NAME} version {FORMAT_VERSION} description")
    arrays = meta.get("arrays")
    if not isinstance(arrays, dict) or not all(isinstance(dim, int) and dim > 0 for dim in arrays.values()):
        raise FeatureTableError(path, "'arrays' must map array names to positive widths")
    return meta


def _open_array(path: Path, mode: str, shape: tuple[int, ...], dtype) -> np.memmap:
    try:
        array = np.lib.format.open_memmap(path, mode=mode)
    except (OSError, ValueError) as error:
        raise FeatureTableError(path, f"cannot map the array ({error})") from error
    if array.shape != shape or array.dtype != np.dtype(dtype):
        raise FeatureTableError(path, f"expected {np.dtype(dtype)} {shape}, found {array.dtype} {array.shape}")
    return array


def _check_array_name(name: str) -> None:
    if not name or not name.replace("_", "").isalnum() or name in ("written", "index", "features"):
        raise ValueError(f"array names must be letters, digits and '_' (not a reserved name), got {name!r}")


class FeatureWriter:
    """Creates a feature table, or reopens one to resume, and fills its arrays row by row.

    Args:
        directory: the table directory (created if needed).
        index: what each row is; fixed when the table is created.
        array_dims: width of each feature array, e.g. ``{"cls": 768, "patch_mean": 768}``.

    Reopening a directory that holds a table with the same index and arrays resumes it:
    :attr:`pending_rows` lists what is left. A directory holding a different table raises
    :class:`FeatureTableError`.
    """

    def __init__(self, directory: str | Path, index: FeatureIndex, array_dims: Mapping[str, int]):
        if not array_dims:
            raise ValueError("array_dims must name at least one array")
        for name, width in array_dims.items():
            _check_array_name(name)
            if not isinstance(width, (int, np.integer)) or width <= 0:
                raise ValueError(f"array_dims[{name!r}] must be a positive integer, got {width!r}")
        self.directory = Path(directory)
        self.index = index
        self.array_dims = {name: int(width) for name, width in array_dims.items()}
        if (self.directory / META_FILE).exists():
            self._check_existing()
        else:
            self._create()
        num_rows = len(index)
        self._arrays = {
            name: _open_array(self.directory / f"{name}.npy", "r+", (num_rows, width), np.float32)
            for name, width in self.array_dims.items()
        }
        self._written = _open_array(self.directory / WRITTEN_FILE, "r+", (num_rows,), np.bool_)

    def _create(self) -> None:
        # The description is written last: a directory without it is an unfinished creation and is redone.
        self.directory.mkdir(parents=True, exist_ok=True)
        _write_index(self.directory / INDEX_FILE, self.index)
        num_rows = len(self.index)
        for name, width in self.array_dims.items():
            np.lib.format.open_memmap(self.directory / f"{name}.npy", "w+", np.float32, (num_rows, width)).flush()
        np.lib.format.open_memmap(self.directory / WRITTEN_FILE, "w+", np.bool_, (num_rows,)).flush()
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "num_rows": num_rows,
            "arrays": self.array_dims,
            "label_names": list(self.index.label_names),
        }
        (self.directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    def _check_existing(self) -> None:
        meta = _read_meta(self.directory)
        if meta["arrays"] != self.array_dims:
            raise FeatureTableError(
                self.directory, f"holds arrays {meta['arrays']}, not {self.array_dims}: use a new directory"
            )
        if not read_feature_index(self.directory / INDEX_FILE).same_as(self.index):
            raise FeatureTableError(self.directory, "holds a table with a different index: use a new directory")

    @property
    def pending_rows(self) -> np.ndarray:
        """Row numbers whose features have not been written yet, ascending."""
        return np.flatnonzero(~self._written)

    @property
    def complete(self) -> bool:
        """Whether every row has been written."""
        return bool(self._written.all())

    def write(self, rows, arrays: Mapping[str, np.ndarray]) -> None:
        """Store features for the given row numbers, one ``(len(rows), C)`` array per array name."""
        rows = np.asarray(rows)
        if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
            raise ValueError(f"rows must be a 1-D integer array, got {rows.dtype} {rows.shape}")
        if rows.size and (rows.min() < 0 or rows.max() >= len(self.index)):
            raise ValueError(f"rows must lie in 0..{len(self.index) - 1}")
        if set(arrays) != set(self.array_dims):
            raise ValueError(f"arrays must have exactly the keys {sorted(self.array_dims)}, got {sorted(arrays)}")
        values = {}
        for name, value in arrays.items():
            value = np.asarray(value, dtype=np.float32)
            if value.shape != (rows.size, self.array_dims[name]):
                raise ValueError(
                    f"arrays[{name!r}] must have shape {(rows.size, self.array_dims[name])}, got {value.shape}"
                )
            if not np.isfinite(value).all():
                raise ValueError(f"arrays[{name!r}] must be finite")
            values[name] = value
        for name, value in values.items():
            self._arrays[name][rows] = value
            self._arrays[name].flush()
        # Rows are marked only after their features reach the file, so a crash never marks unwritten rows.
        self._written[rows] = True
        self._written.flush()

    def close(self) -> None:
        """Flush and release the mapped files."""
        for array in self._arrays.values():
            array.flush()
        self._written.flush()
        self._arrays = {}

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


@dataclass(frozen=True, eq=False)
class FeatureTable:
    """One array of a feature table, memory-mapped read-only, with its index."""

    directory: Path
    array_name: str
    index: FeatureIndex
    features: np.ndarray

    def select(self, rows) -> RowSelection:
        """The given rows of :attr:`features`, read on demand."""
        return RowSelection(self.features, rows)

    def subset(self, rows, label_names: Sequence[str] | None = None) -> FeatureTable:
        """The given rows as a table of their own, their features read into memory."""
        rows = np.asarray(rows, dtype=np.int64)
        return FeatureTable(
            directory=self.directory,
            array_name=self.array_name,
            index=self.index.subset(rows, label_names),
            features=RowSelection(self.features, rows)[:],
        )


def read_feature_table(
    directory: str | Path, array: str | Sequence[str] = "cls", *, allow_incomplete: bool = False
) -> FeatureTable:
    """Open one array of a feature table, or several side by side.

    Args:
        directory: the table directory.
        array: which array, e.g. ``"cls"`` or ``"patch_mean"``; several names, e.g. ``("cls",
            "patch_mean")``, give their columns side by side in that order (read into memory), as one
            array named ``"cls+patch_mean"``.
        allow_incomplete: accept a table whose rows are not all written (unwritten rows hold zeros).
    """
    names = (array,) if isinstance(array, str) else tuple(array)
    if not names or not all(isinstance(name, str) for name in names) or len(set(names)) != len(names):
        raise ValueError(f"array must be an array name or distinct array names, got {array!r}")
    directory = Path(directory)
    meta = _read_meta(directory)
    for name in names:
        if name not in meta["arrays"]:
            raise FeatureTableError(directory, f"has no array {name!r}; it has {sorted(meta['arrays'])}")
    # The index and the written flags are read once, however many arrays are opened.
    index = read_feature_index(directory / INDEX_FILE)
    if len(index) != meta.get("num_rows") or list(index.label_names) != meta.get("label_names"):
        raise FeatureTableError(directory, f"{INDEX_FILE} disagrees with {META_FILE}")
    arrays = [
        _open_array(directory / f"{name}.npy", "r", (len(index), meta["arrays"][name]), np.float32) for name in names
    ]
    written = _open_array(directory / WRITTEN_FILE, "r", (len(index),), np.bool_)
    missing = int((~written).sum())
    if missing and not allow_incomplete:
        raise FeatureTableError(directory, f"{missing} of {len(index)} rows have no features yet (resume the run)")
    features = arrays[0] if isinstance(array, str) else np.concatenate([np.asarray(a) for a in arrays], axis=1)
    return FeatureTable(directory=directory, array_name="+".join(names), index=index, features=features)


class RowSelection:
    """Some rows of a 2-D array (typically memory-mapped), read slice by slice without a full copy.

    Supports ``len()``, ``.shape``, ``.dtype`` and slicing with step 1, which returns an in-memory array.
    """

    def __init__(self, array: np.ndarray, rows):
        rows = np.asarray(rows)
        if array.ndim != 2:
            raise ValueError(f"array must be 2-D, got shape {array.shape}")
        if rows.ndim != 1 or not (np.issubdtype(rows.dtype, np.integer) or rows.size == 0):
            raise ValueError(f"rows must be a 1-D integer array, got {rows.dtype} {rows.shape}")
        if rows.size and (rows.min() < 0 or rows.max() >= array.shape[0]):
            raise ValueError(f"rows must lie in 0..{array.shape[0] - 1}")
        self.array = array
        self.rows = rows.astype(np.int64)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows.size, self.array.shape[1])

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    @property
    def ndim(self) -> int:
        return 2

    def __len__(self) -> int:
        return self.rows.size

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a RowSelection is read with slices of step 1, e.g. selection[start:stop]")
        return np.asarray(self.array[self.rows[key]])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        values = self[:]
        return values if dtype is None else values.astype(dtype, copy=False)
