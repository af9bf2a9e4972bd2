"""The CSV tables that come with data sets: label files, official splits, metadata and manifests."""

from __future__ import annotations

import csv
import gzip
import io
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["TableError", "read_table"]


class TableError(ValueError):
    """A table that is missing, unreadable, or not in the layout its reader expects."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def _open_text(path: Path):
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return path.open(encoding="utf-8-sig", newline="")


def read_table(path: str | os.PathLike, required: Iterable[str] = ()) -> list[dict[str, str]]:
    """The rows of a CSV file (gzip-compressed when its name ends in ``.gz``) as dicts keyed by the
    header's column names, stripped of surrounding spaces. Blank lines are skipped.

    Raises:
        TableError: the file is missing or unreadable, has no header, lacks a ``required`` column, or
            has a row with fewer cells than the header.
    """
    path = Path(path)
    try:
        with _open_text(path) as handle:
            rows = list(csv.reader(handle))
    except FileNotFoundError:
        raise TableError(path, "file not found") from None
    except (OSError, UnicodeDecodeError, EOFError, csv.Error) as error:
        raise TableError(path, f"cannot read ({error})") from error
    if not rows:
        raise TableError(path, "empty file, expected a header row")
    header = [name.strip() for name in rows[0]]
    missing = [name for name in required if name not in header]
    if missing:
        raise TableError(path, f"missing columns {missing}")
    records = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < len(header):
            raise TableError(path, f"line {line} has {len(row)} cells, the header {len(header)}")
        records.append(dict(zip(header, row)))
    return records
