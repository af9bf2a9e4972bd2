"""``mmv embed``: frozen encoder features of every image of a data set, written as a feature table.

:func:`run_embed` reads a checkpoint and a data set and writes a feature table (:mod:`mmv.eval.features`)
with two arrays, ``cls`` (the final CLS token) and ``patch_mean`` (the mean final patch token), one row
per image in the data set's own order. Images are read, preprocessed and tokenised in DataLoader
workers, packed into batches of up to ``max_tokens`` patch tokens (:class:`~mmv.data.TokenBudgetBatchSampler`
and :class:`~mmv.data.PackedCollate`) and encoded in eval mode without gradients.
:func:`run_embed_encoders` does the same for several encoders at once, reading each image once for all
of them and writing one table per encoder. The command line of ``mmv embed`` is :mod:`mmv.cli`'s.

Checkpoints
    an encoder directory written by :meth:`mmv.Encoder.save_pretrained` (``<run>/encoder`` of ``mmv
    pretrain``), a training checkpoint file of ``mmv pretrain`` (``<run>/checkpoints/step_*.pt``; its EMA
    teacher's encoder, which is what the run saves when it finishes), a pretraining run directory (its
    ``encoder`` when the run has finished, else its latest checkpoint), or an :class:`mmv.Encoder`.

Data sets (:class:`mmv.data.DatasetSpec`)
    ``manifest`` (any CSV manifest), ``mimic`` (MIMIC-CXR-JPG), ``chexpert`` and ``ctrate`` (CT-RATE),
    opened by :func:`mmv.data.open_dataset`: each record's split and group (a manifest's ``split`` and
    ``group`` cells; for the named data sets, train / val / test and patients numbered in order of
    appearance, without any patient number) fill the index's. The named data sets embed every split by
    default, since their probe protocols take train, validation and test rows from one table.

Preprocessing
    CT is windowed and resampled, X-rays resized and normalised (:class:`mmv.data.ModalityPreprocess`) as
    the encoder was trained: with the preprocessing its ``config.json`` records (:attr:`mmv.Encoder.preprocess`;
    an encoder directory, wherever it was copied, or an Encoder object), or the run config of a training
    checkpoint. An encoder directory written before mmv recorded it falls back to the run's ``config.json``
    beside it, else to the defaults (:mod:`mmv.data.preprocess`) with a warning. Each setting can be given
    explicitly instead; ``embed.json`` says where the preprocessing came from.

Resuming
    Work in progress lives in ``<out_dir>/partial``, a feature table over every image of the data set,
    filled batch by batch; an interrupted run resumes from the rows already written, after checking that
    the weights, the preprocessing and the precision are those of the interrupted run. When every image
    has been through the encoder the table is copied to ``out_dir`` (leaving out the images that were
    unreadable with ``on_error="skip"``), ``<out_dir>/embed.json`` records what was done, and the partial
    table is removed. Running again on a finished directory does nothing.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mmv.data.cache import PreprocessCache
from mmv.data.collate import PackedCollate
from mmv.data.dataset_spec import DatasetSpec, open_dataset
from mmv.data.datasets import LabelledImageDataset
from mmv.data.preprocess import ModalityPreprocess
from mmv.data.sampler import TokenBudgetBatchSampler, check_positive_int
from mmv.devices import resolve_device
from mmv.eval.encoders import LoadedEncoder, embed_preprocess, load_encoder, weights_digest
from mmv.eval.features import (
    INDEX_COLUMNS,
    FeatureIndex,
    FeatureTableError,
    FeatureWriter,
    read_feature_index,
    read_feature_table,
)
from mmv.files import atomic_write
from mmv.model.encoder import Encoder
from mmv.tokenizer import Tokenizer

__all__ = [
    "ARRAY_NAMES",
    "RUN_FILE",
    "EmbedRun",
    "run_embed",
    "run_embed_encoders",
]

ARRAY_NAMES = ("cls", "patch_mean")
RUN_FILE = "embed.json"
PARTIAL_DIR = "partial"
RUN_FORMAT = "mmv-embed"
RUN_VERSION = 1

# What each setting that must not change within a feature table is called in messages.
_SETTING_NAMES = {
    "weights_sha256": "weights",
    "encoder_config": "encoder config",
    "preprocess": "preprocessing",
    "bf16": "precision (bf16)",
}
# Rows copied at a time when the finished table is written.
_COPY_ROWS = 65536
# What an encoder's name may be in run_embed_encoders: the name of its table's directory.
_TABLE_NAME = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*")


# --------------------------------------------------------------------------------------------------
# Data sets


def _feature_index(dataset: LabelledImageDataset, spec: DatasetSpec) -> FeatureIndex:
    """The feature index of ``dataset``'s images: ids, split, modality, group and labels."""
    clashes = [name for name in dataset.label_names if name in INDEX_COLUMNS]
    if clashes:
        raise ValueError(f"{spec.path}: label columns may not be named {clashes} (they are index columns)")
    records = dataset.records
    return FeatureIndex(
        ids=tuple(record.id for record in records),
        splits=tuple(record.split for record in records),
        modalities=tuple(record.modality for record in records),
        groups=tuple(record.group for record in records),
        label_names=dataset.label_names,
        labels=np.array([record.labels for record in records], dtype=np.float64).reshape(
            len(records), len(dataset.label_names)
        ),
    )


# --------------------------------------------------------------------------------------------------
# The run


def _plain(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples become lists), so settings compare equal after a round trip."""
    return json.loads(json.dumps(value))


@dataclass(frozen=True)
class EmbedRun:
    """What a call of :func:`run_embed` did.

    Attributes:
        directory: the finished feature table.
        num_rows: rows of the table.
        encoded: images encoded by this call (0 when the table was already finished).
        skipped_ids: ids left out as unreadable (``on_error="skip"``).
        seconds: wall time of this call's encoding pass.
        images_per_s: ``encoded / seconds`` (read, preprocess, tokenise and encode), NaN when nothing was encoded.
    """

    directory: Path
    num_rows: int
    encoded: int
    skipped_ids: tuple[str, ...]
    seconds: float
    images_per_s: float


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FeatureTableError(path, f"cannot read the run record ({error})") from error
    if not isinstance(values, dict) or values.get("format") != RUN_FORMAT or values.get("version") != RUN_VERSION:
        raise FeatureTableError(path, f"not a {RUN_FORMAT} version {RUN_VERSION} run record")
    return values


def _write_json(path: Path, values: dict[str, Any]) -> None:
    atomic_write(path, lambda stream: stream.write((json.dumps(values, indent=2) + "\n").encode("utf-8")))


def _check_same_settings(path: Path, record: dict[str, Any], settings: dict[str, Any]) -> None:
    differing = [_SETTING_NAMES[key] for key in settings if record.get("settings", {}).get(key) != settings[key]]
    if differing:
        raise FeatureTableError(
            path,
            f"holds features made with a different {', '.join(differing)}: use another directory, or "
            "resume=False (--no-resume) to start over",
        )


def _remove_table_files(directory: Path) -> None:
    """Delete the files of a feature table written here and its run record, leaving anything else."""
    for name in ("features.json", "index.csv", "written.npy", RUN_FILE, *(f"{array}.npy" for array in ARRAY_NAMES)):
        (directory / name).unlink(missing_ok=True)


def _finished_run(out_dir: Path, index: FeatureIndex, settings: dict[str, Any]) -> EmbedRun | None:
    """The run recorded in ``out_dir`` when it finished with these settings over this index, else None."""
    record = _read_json(out_dir / RUN_FILE)
    if record is None or not record.get("complete"):
        return None
    _check_same_settings(out_dir / RUN_FILE, record, settings)
    skipped = tuple(record.get("skipped_ids", ()))
    unread = set(skipped)
    expected = index.subset([row for row, row_id in enumerate(index.ids) if row_id not in unread])
    if not read_feature_index(out_dir / "index.csv").same_as(expected):
        raise FeatureTableError(
            out_dir, "holds features of other images (the data set changed): use another directory, or resume=False"
        )
    shutil.rmtree(out_dir / PARTIAL_DIR, ignore_errors=True)
    return EmbedRun(out_dir, len(expected), 0, skipped, 0.0, math.nan)


def _prepare_directory(out_dir: Path, index: FeatureIndex, settings: dict[str, Any], resume: bool) -> EmbedRun | None:
    """Make ``out_dir`` ready for a run: the finished run it holds (when resuming one), else None once
    ``<out_dir>/partial`` is new or holds an interrupted run with the same settings."""
    partial = out_dir / PARTIAL_DIR
    if out_dir.exists() and not out_dir.is_dir():
        raise FeatureTableError(out_dir, "exists and is not a directory")
    if not resume:
        _remove_table_files(out_dir)
        shutil.rmtree(partial, ignore_errors=True)
    elif out_dir.is_dir():
        finished = _finished_run(out_dir, index, settings)
        if finished is not None:
            return finished
        if not partial.is_dir() and (out_dir / "features.json").exists():
            raise FeatureTableError(
                out_dir, "holds a feature table that mmv embed did not write: use another directory, or resume=False"
            )
    partial.mkdir(parents=True, exist_ok=True)
    record = _read_json(partial / RUN_FILE)
    if record is not None:
        _check_same_settings(partial / RUN_FILE, record, settings)
    return None


def _encode_pending(
    writers: Sequence[FeatureWriter],
    encoders: Sequence[Encoder],
    dataset: LabelledImageDataset,
    device: torch.device,
    *,
    max_tokens: int,
    num_workers: int,
    bf16: bool,
    progress: bool,
) -> list[list[int]]:
    """Encode the rows each writer still lacks with its encoder and write them; returns, per writer, the
    rows skipped as unreadable.

    Each image that some writer lacks is read, preprocessed and tokenised once, and its batch goes through
    every encoder that lacks a row of it; each writer receives only the rows it lacks.
    """
    pending_of = [set(writer.pending_rows.tolist()) for writer in writers]
    pending_rows = np.array(sorted(set().union(*pending_of)), dtype=np.int64)
    skipped: list[list[int]] = [[] for _ in writers]
    if pending_rows.size == 0:
        return skipped
    pending = dataset.subset(pending_rows)
    patch_size = encoders[0].config.patch_size
    counts = pending.token_counts(patch_size, progress=progress)
    # An image larger than the budget is encoded alone rather than refused.
    # Every image goes through this process, whether or not a process group is initialised.
    sampler = TokenBudgetBatchSampler(counts, max(max_tokens, max(counts)), shuffle=False, rank=0, world_size=1)
    batches = list(sampler)
    loader = torch.utils.data.DataLoader(
        pending,
        batch_sampler=batches,
        collate_fn=PackedCollate(Tokenizer(patch_size), with_labels=True),
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)
    bar = tqdm(total=len(pending), desc="embed", unit="img", disable=not progress)
    try:
        for positions, item in zip(batches, loader):
            rows_of = {pending.records[position].id: int(pending_rows[position]) for position in positions}
            present = [] if item is None else item.ids
            unread = [rows_of[row_id] for row_id in set(rows_of) - set(present)]
            for rows, lacking in zip(skipped, pending_of):
                rows.extend(row for row in unread if row in lacking)
            if present:
                batch = item.batch.to(device, non_blocking=True)
                present_rows = np.array([rows_of[row_id] for row_id in present], dtype=np.int64)
                for writer, encoder, lacking in zip(writers, encoders, pending_of):
                    wanted = np.array([row in lacking for row in present_rows])
                    if not wanted.any():
                        continue
                    with torch.inference_mode(), autocast:
                        out = encoder(batch)
                    writer.write(
                        present_rows[wanted],
                        {
                            "cls": out.cls.float().cpu().numpy()[wanted],
                            "patch_mean": out.pooled.float().cpu().numpy()[wanted],
                        },
                    )
            bar.update(len(positions))
    finally:
        bar.close()
    return skipped


def _write_finished_table(partial: Path, out_dir: Path, kept_rows: np.ndarray) -> FeatureIndex:
    """Copy the kept rows of the partial table into ``out_dir`` as a table of its own."""
    tables = {name: read_feature_table(partial, name, allow_incomplete=True) for name in ARRAY_NAMES}
    index = tables[ARRAY_NAMES[0]].index.subset(kept_rows)
    dims = {name: int(table.features.shape[1]) for name, table in tables.items()}
    with FeatureWriter(out_dir, index, dims) as writer:
        for start in range(0, kept_rows.size, _COPY_ROWS):
            chunk = kept_rows[start : start + _COPY_ROWS]
            writer.write(
                np.arange(start, start + chunk.size),
                {name: table.select(chunk)[:] for name, table in tables.items()},
            )
    return index


@dataclass(frozen=True, eq=False)
class _Table:
    """One encoder of a run and the feature table it fills."""

    encoder: Encoder
    out_dir: Path
    record: dict[str, Any]


def _check_run_arguments(dataset, on_error, max_tokens, num_workers, bf16) -> None:
    if not isinstance(dataset, DatasetSpec):
        raise TypeError(f"dataset must be a DatasetSpec, got {type(dataset).__name__}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    check_positive_int(max_tokens, "max_tokens")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be a non-negative int, got {num_workers!r}")
    if not isinstance(bf16, bool):
        raise ValueError(f"bf16 must be a bool, got {bf16!r}")


def _shared_preprocess(loaded: Mapping[str, LoadedEncoder], given: dict[str, Any]) -> ModalityPreprocess:
    """The one preprocessing of every encoder's images: each image is read once for all of them, so the
    encoders must agree on it (after ``given`` replaces settings) and on the patch size."""
    transforms = {name: embed_preprocess(encoder.preprocess, **given) for name, encoder in loaded.items()}
    first = next(iter(transforms.values()))
    differing = [name for name, transform in transforms.items() if transform.to_dict() != first.to_dict()]
    if differing:
        raise ValueError(
            f"the encoders {sorted(transforms)} must share one preprocessing to read each image once; "
            f"{differing} differ from {next(iter(transforms))!r} (give the settings explicitly, or embed them apart)"
        )
    patch_sizes = {name: tuple(encoder.encoder.config.patch_size) for name, encoder in loaded.items()}
    if len(set(patch_sizes.values())) > 1:
        raise ValueError(f"the encoders must share one patch size to read each image once, got {patch_sizes}")
    return first


def _run(
    checkpoints: Mapping[str, str | os.PathLike | Encoder],
    out_dirs: Mapping[str, Path],
    dataset: DatasetSpec,
    *,
    max_tokens: int,
    num_workers: int,
    device: str | torch.device | None,
    bf16: bool,
    given: dict[str, Any],
    cache_dir: str | os.PathLike | None,
    on_error: str,
    resume: bool,
    progress: bool,
) -> dict[str, EmbedRun]:
    """The embed run of :func:`run_embed` and :func:`run_embed_encoders`: one feature table per encoder."""
    _check_run_arguments(dataset, on_error, max_tokens, num_workers, bf16)
    device = resolve_device(device)
    loaded = {name: load_encoder(checkpoint) for name, checkpoint in checkpoints.items()}
    transform = _shared_preprocess(loaded, given)
    cache = PreprocessCache(cache_dir) if cache_dir is not None else None
    images = open_dataset(dataset, transform=transform, cache=cache, on_error=on_error)
    index = _feature_index(images, dataset)

    runs: dict[str, EmbedRun] = {}
    tables: dict[str, _Table] = {}
    for name, encoder_read in loaded.items():
        encoder = encoder_read.encoder.to(device).eval()
        settings = _plain(
            {
                "weights_sha256": weights_digest(encoder),
                "encoder_config": encoder.config.to_dict(),
                "preprocess": transform.to_dict(),
                "bf16": bf16,
            }
        )
        finished = _prepare_directory(out_dirs[name], index, settings, resume)
        if finished is not None:
            runs[name] = finished
            continue
        record = {
            "format": RUN_FORMAT,
            "version": RUN_VERSION,
            "complete": False,
            "settings": settings,
            "checkpoint": encoder_read.source,
            "preprocess_from": {
                "base": encoder_read.preprocess_from,
                "arguments": [setting for setting, value in given.items() if value is not None],
            },
            "dataset": dataset.to_dict(),
            "max_tokens": max_tokens,
            "device": str(device),
        }
        _write_json(out_dirs[name] / PARTIAL_DIR / RUN_FILE, record)
        tables[name] = _Table(encoder, out_dirs[name], record)
    if not tables:
        return runs

    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        writers = {
            name: stack.enter_context(
                FeatureWriter(table.out_dir / PARTIAL_DIR, index, {array: table.encoder.config.embed_dim for array in ARRAY_NAMES})
            )
            for name, table in tables.items()
        }
        to_encode = {name: int(writer.pending_rows.size) for name, writer in writers.items()}
        skipped_rows = dict(zip(tables, _encode_pending(
            list(writers.values()), [table.encoder for table in tables.values()], images, device,
            max_tokens=max_tokens, num_workers=num_workers, bf16=bf16, progress=progress,
        )))
        seconds = time.perf_counter() - started
        kept_rows = {name: np.setdiff1d(np.arange(len(index)), writer.pending_rows) for name, writer in writers.items()}

    for name, table in tables.items():
        runs[name] = _finish(table, index, kept_rows[name], skipped_rows[name], to_encode[name], seconds)
    return {name: runs[name] for name in checkpoints}


def _finish(
    table: _Table, index: FeatureIndex, kept_rows: np.ndarray, skipped_rows: list[int], encoded: int, seconds: float
) -> EmbedRun:
    """Write the finished table of ``table.out_dir`` from its partial table, record the run and remove the partial."""
    partial = table.out_dir / PARTIAL_DIR
    # The finished table replaces whatever an earlier, interrupted finishing step left in out_dir.
    _remove_table_files(table.out_dir)
    finished_index = _write_finished_table(partial, table.out_dir, kept_rows)
    skipped_ids = tuple(index.ids[row] for row in sorted(skipped_rows))
    images_per_s = encoded / seconds if encoded and seconds > 0 else math.nan
    record = {
        **table.record,
        "complete": True,
        "num_rows": len(finished_index),
        "skipped_ids": list(skipped_ids),
        "encoded_last_call": encoded,
        "seconds_last_call": seconds,
        "images_per_s_last_call": None if math.isnan(images_per_s) else images_per_s,
    }
    _write_json(table.out_dir / RUN_FILE, record)
    shutil.rmtree(partial)
    return EmbedRun(table.out_dir, len(finished_index), encoded, skipped_ids, seconds, images_per_s)


def run_embed(
    checkpoint: str | os.PathLike | Encoder,
    dataset: DatasetSpec,
    out_dir: str | os.PathLike,
    *,
    max_tokens: int = 16384,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    bf16: bool = False,
    ct_spacing: Sequence[float] | None = None,
    ct_window: Sequence[float] | None = None,
    xray_spacing: float | None = None,
    xray_short_side: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    on_error: str = "raise",
    resume: bool = True,
    progress: bool = True,
) -> EmbedRun:
    """Embed every image of ``dataset`` with the encoder of ``checkpoint`` into the feature table ``out_dir``.

    Args:
        checkpoint: an encoder directory, a training checkpoint, a pretraining run directory, or an
            :class:`mmv.Encoder` (moved to ``device`` and put in eval mode).
        dataset: the images (:class:`DatasetSpec`).
        out_dir: the feature table to write (a new or empty directory, or one this function wrote).
        max_tokens: patch tokens per encoder batch (an image with more is encoded alone).
        num_workers: DataLoader worker processes that read, preprocess and tokenise.
        device: where the encoder runs; default CUDA when available, else the CPU.
        bf16: encode under bfloat16 autocast (features are stored as float32 either way).
        ct_spacing, ct_window, xray_spacing, xray_short_side: preprocessing settings replacing those the
            encoder was trained with (see :func:`embed_preprocess`).
        cache_dir: a :class:`mmv.data.PreprocessCache` directory for the preprocessed images.
        on_error: ``"raise"`` stops at an unreadable image; ``"skip"`` leaves it out of the table, logs it
            once and lists it in ``embed.json``.
        resume: continue an interrupted run in ``out_dir`` (False starts over, deleting its table).
        progress: show tqdm progress bars.

    Returns:
        An :class:`EmbedRun`. The table is read with :func:`mmv.eval.read_feature_table`.

    Raises:
        FeatureTableError: ``out_dir`` holds features made with other weights, preprocessing or
            precision, or of other images, or files that are not a feature table.
    """
    given = {"ct_spacing": ct_spacing, "ct_window": ct_window, "xray_spacing": xray_spacing, "xray_short_side": xray_short_side}
    runs = _run(
        {"": checkpoint}, {"": Path(out_dir)}, dataset,
        max_tokens=max_tokens, num_workers=num_workers, device=device, bf16=bf16, given=given, cache_dir=cache_dir,
        on_error=on_error, resume=resume, progress=progress,
    )
    return runs[""]


def _check_table_name(name: Any) -> str:
    if not isinstance(name, str) or not _TABLE_NAME.fullmatch(name):
        raise ValueError(
            f"encoder names must be non-empty names of letters, digits, '_', '-' or '.' not starting with '.', "
            f"got {name!r}"
        )
    return name


def run_embed_encoders(
    checkpoints: Mapping[str, str | os.PathLike | Encoder],
    dataset: DatasetSpec,
    out_dir: str | os.PathLike,
    *,
    max_tokens: int = 16384,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    bf16: bool = False,
    ct_spacing: Sequence[float] | None = None,
    ct_window: Sequence[float] | None = None,
    xray_spacing: float | None = None,
    xray_short_side: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    on_error: str = "raise",
    resume: bool = True,
    progress: bool = True,
) -> dict[str, EmbedRun]:
    """Embed every image of ``dataset`` with each of several encoders, reading each image once for all.

    ``checkpoints`` maps a name to anything :func:`run_embed` accepts as its checkpoint; each encoder's
    feature table is ``<out_dir>/<name>``, the same table :func:`run_embed` writes for that encoder alone
    (the same batches, so the same values). Reading and preprocessing an image costs more than encoding
    it, so the encoders share them: they must share one preprocessing (after the settings given here
    replace theirs) and one patch size. Each table resumes on its own: an interruption between two
    encoders of a batch leaves one table a batch ahead of the other, and the next run encodes for each
    table only the rows it lacks. The other arguments are those of :func:`run_embed`.

    Returns:
        The :class:`EmbedRun` of each encoder, by name, in the order of ``checkpoints``.
    """
    if not isinstance(checkpoints, Mapping) or not checkpoints:
        raise ValueError(f"checkpoints must map at least one name to a checkpoint, got {checkpoints!r}")
    out_dir = Path(out_dir)
    out_dirs = {_check_table_name(name): out_dir / name for name in checkpoints}
    given = {"ct_spacing": ct_spacing, "ct_window": ct_window, "xray_spacing": xray_spacing, "xray_short_side": xray_short_side}
    return _run(
        dict(checkpoints), out_dirs, dataset,
        max_tokens=max_tokens, num_workers=num_workers, device=device, bf16=bf16, given=given, cache_dir=cache_dir,
        on_error=on_error, resume=resume, progress=progress,
    )
