"""A disk cache of preprocessed images: ``.npy`` arrays, memory-mapped on read, written atomically, checksummed.

An entry is keyed by the source's absolute path, size, modification and status-change times and by a
string that describes the preprocessing (``repr`` of a frozen dataclass such as
:class:`mmv.data.CtPreprocess`), so a changed file or changed parameters never return a stale array. A
DICOM series is a directory: it is keyed by each of its files (name, size and times), so rewriting one
slice in place, which leaves the directory's own size and time alone, changes the key too.

Each entry is an ``.npy`` array and a ``.json`` record of its spacing, modality, shape and the SHA-256 of
the array's bytes. A hit recomputes the checksum over the mapped array (a fraction of the cost of decoding
the source), so an entry that is empty, truncated, corrupt or from another writer is a miss, and the
recomputed image replaces it. Writers put each file under a unique temporary name and rename it into
place, so concurrent DataLoader workers and killed processes never leave a partial entry; the worst case
is a stray ``*.tmp`` file, which :meth:`PreprocessCache.clear` removes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from mmv.files import TEMPORARY_SUFFIX, atomic_write
from mmv.image import Image

__all__ = ["PreprocessCache"]

_FORMAT_VERSION = 2


class PreprocessCache:
    """Cache of preprocessed :class:`mmv.Image` objects in a directory.

    Args:
        directory: where entries live (created if missing). Safe to share between processes.

    Example::

        cache = PreprocessCache("/scratch/ct-cache")
        image = cache.get_or_compute(path, repr(preprocess), lambda: preprocess(read_image(path)))
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory must be a str or os.PathLike, got {type(directory).__name__}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def key(self, source: str | os.PathLike, parameters: str) -> str:
        """The entry name for ``source`` preprocessed with ``parameters``; changes when the file changes, or,
        for a directory (a DICOM series), when any file in it changes or is added or removed.

        Raises:
            FileNotFoundError: when ``source`` does not exist.
        """
        if not isinstance(parameters, str):
            raise TypeError(f"parameters must be a str describing the preprocessing, got {type(parameters).__name__}")
        source = Path(source).absolute()
        files = [_file_identity(source, source.stat())]
        if source.is_dir():
            # The reader takes a series from the directory's own files (not subdirectories).
            with os.scandir(source) as entries:
                files += sorted(_file_identity(entry.name, entry.stat()) for entry in entries if entry.is_file())
        identity = json.dumps([_FORMAT_VERSION, files, parameters], ensure_ascii=True)
        return hashlib.sha256(identity.encode()).hexdigest()

    def load(self, key: str) -> Image | None:
        """The cached image for ``key``, memory-mapped, or None when there is no complete, intact entry."""
        array_path, meta_path = self._paths(key)
        try:
            meta = json.loads(meta_path.read_bytes())
            # Copy-on-write mapping: the tensor is writable without touching the file.
            pixels = np.load(array_path, mmap_mode="c", allow_pickle=False)
            if pixels.dtype != np.float32 or list(pixels.shape) != meta["shape"]:
                return None
            # The checksum is taken over the mapped bytes themselves, so what is checked is what is served.
            if _digest(pixels) != meta["sha256"]:
                return None
            return Image(torch.from_numpy(pixels), tuple(meta["spacing"]), meta["modality"])
        except Exception:  # empty, truncated or corrupt files fail in many ways (EOFError, ValueError, ...): a miss
            return None

    def store(self, key: str, image: Image) -> None:
        """Write ``image`` under ``key`` atomically (the array file appears last, and only when complete)."""
        if not isinstance(image, Image):
            raise TypeError(f"image must be an mmv.Image, got {type(image).__name__}")
        array_path, meta_path = self._paths(key)
        pixels = np.ascontiguousarray(image.pixels.detach().cpu().numpy(), dtype=np.float32)
        meta = {"spacing": list(image.spacing), "modality": image.modality, "shape": list(pixels.shape), "sha256": _digest(pixels)}
        # A cache may lose entries in a power cut (they are checked and recomputed), so no fsync.
        atomic_write(meta_path, lambda stream: stream.write(json.dumps(meta).encode()), durable=False)
        atomic_write(array_path, lambda stream: np.save(stream, pixels, allow_pickle=False), durable=False)

    def get_or_compute(self, source: str | os.PathLike, parameters: str, compute: Callable[[], Image]) -> Image:
        """The cached image for ``source`` and ``parameters``, computing and storing it on a miss."""
        key = self.key(source, parameters)
        image = self.load(key)
        if image is not None:
            self.hits += 1
            return image
        self.misses += 1
        image = compute()
        self.store(key, image)
        return image

    def clear(self) -> None:
        """Remove every entry and every leftover temporary file."""
        for entry in self.directory.iterdir():
            if entry.suffix in (".npy", ".json", TEMPORARY_SUFFIX) and entry.is_file():
                entry.unlink(missing_ok=True)

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.directory / f"{key}.npy", self.directory / f"{key}.json"


def _file_identity(name: str | Path, status: os.stat_result) -> list:
    # The status-change time moves on every write, even one that puts the modification time back.
    return [str(name), status.st_size, status.st_mtime_ns, status.st_ctime_ns]


def _digest(pixels: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(pixels)).cast("B")).hexdigest()
