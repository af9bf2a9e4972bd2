"""A disk cache of preprocessed images: ``.npy`` arrays, memory-mapped on read, written atomically.

An entry is keyed by the source file's absolute path, size and modification time and by a string that
describes the preprocessing (``repr`` of a frozen dataclass such as :class:`mmv.data.CtPreprocess`), so a
changed file or changed parameters never return a stale array. Writers put each file under a unique
temporary name and rename it into place, so concurrent DataLoader workers and killed processes never leave
a partial entry; the worst case is a stray ``*.tmp`` file, which :meth:`PreprocessCache.clear` removes.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from mmv.image import Image

__all__ = ["PreprocessCache"]

_FORMAT_VERSION = 1


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
        """The entry name for ``source`` preprocessed with ``parameters``; changes when the file changes.

        Raises:
            FileNotFoundError: when ``source`` does not exist.
        """
        if not isinstance(parameters, str):
            raise TypeError(f"parameters must be a str describing the preprocessing, got {type(parameters).__name__}")
        source = Path(source).absolute()
        status = source.stat()
        # A DICOM series is a directory: its own mtime changes when files are added or removed.
        identity = json.dumps(
            [_FORMAT_VERSION, str(source), status.st_size, status.st_mtime_ns, parameters], ensure_ascii=True
        )
        return hashlib.sha256(identity.encode()).hexdigest()

    def load(self, key: str) -> Image | None:
        """The cached image for ``key``, memory-mapped, or None when there is no complete entry."""
        array_path, meta_path = self._paths(key)
        try:
            meta = json.loads(meta_path.read_text())
            # Copy-on-write mapping: pages are read lazily and the tensor is writable without touching the file.
            pixels = np.load(array_path, mmap_mode="c", allow_pickle=False)
            image = Image(torch.from_numpy(pixels), tuple(meta["spacing"]), meta["modality"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if pixels.dtype != np.float32 or tuple(pixels.shape) != tuple(meta.get("shape", ())):
            return None
        return image

    def store(self, key: str, image: Image) -> None:
        """Write ``image`` under ``key`` atomically (the array file appears last, and only when complete)."""
        if not isinstance(image, Image):
            raise TypeError(f"image must be an mmv.Image, got {type(image).__name__}")
        array_path, meta_path = self._paths(key)
        meta = {"spacing": list(image.spacing), "modality": image.modality, "shape": list(image.shape)}
        self._write_atomically(meta_path, lambda stream: stream.write(json.dumps(meta).encode()))
        pixels = image.pixels.detach().cpu().contiguous().numpy()
        self._write_atomically(array_path, lambda stream: np.save(stream, pixels, allow_pickle=False))

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
            if entry.suffix in (".npy", ".json", ".tmp") and entry.is_file():
                entry.unlink(missing_ok=True)

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.directory / f"{key}.npy", self.directory / f"{key}.json"

    def _write_atomically(self, path: Path, write: Callable) -> None:
        temporary = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        try:
            with open(temporary, "wb") as stream:
                write(stream)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
