"""Writing output files so that a kill, a crash, a power loss or a full disk never leaves a partial one.

:func:`atomic_write` writes under a unique temporary name beside the target, flushes it, renames it over
the target and (when ``durable``) fsyncs the file and then its directory, so after a power loss the target
holds either its old or its new content, never a mix. A full disk raises ``OSError(ENOSPC)`` saying
"no space left on <directory>", whichever library did the writing (``torch.save`` would otherwise report
``basic_ios::clear: iostream error`` or an ``enforce fail``). :func:`check_writable` lets a long job test
its output directory before spending time on set-up.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["TEMPORARY_SUFFIX", "atomic_write", "check_writable", "fsync_directory"]

TEMPORARY_SUFFIX = ".tmp"


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any], durable: bool = True) -> Path:
    """Make ``path`` hold what ``write(stream)`` writes into a binary stream, atomically.

    Concurrent writers of one path each use their own temporary file (``<name>.<pid>.<random>.tmp``), so
    the last rename wins and a reader sees one complete version. ``durable=False`` skips the fsyncs, for
    files that may be lost in a power cut but must never be partial (a cache).

    Raises:
        OSError: with errno ENOSPC and the message "no space left on <directory>" for a full disk; any
            other error of the file system as raised (the temporary file is removed in every case).
    """
    path = Path(path)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex}{TEMPORARY_SUFFIX}")
    stream = None
    try:
        with open(temporary, "wb") as file:
            stream = _ErrorRecordingStream(file)
            write(stream)
            file.flush()
            if durable:
                os.fsync(file.fileno())
        os.replace(temporary, path)
        if durable:
            fsync_directory(path.parent)
    except Exception as error:
        # Libraries that write through C++ streams replace the OSError of a failed write with their own.
        cause = stream.error if stream is not None and stream.error is not None else error
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"no space left on {path.parent} (writing {path.name})") from error
        raise
    finally:
        temporary.unlink(missing_ok=True)
    return path


def fsync_directory(directory: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename into it) to disk, where the platform allows it."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory; renames there are durable by other means
        return
    try:
        os.fsync(descriptor)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.EBADF):  # file systems without directory fsync
            raise
    finally:
        os.close(descriptor)


def check_writable(directory: str | os.PathLike, owner: str) -> Path:
    """Create ``directory`` if needed and check a file can be written in it; returns it as a Path.

    Raises:
        OSError (PermissionError, ...): naming ``owner`` (the setting that chose the directory), the
            directory and the reason, e.g. a read-only file system or a full disk.
    """
    directory = Path(directory)
    probe = directory / f".write-test.{os.getpid()}.{uuid.uuid4().hex}{TEMPORARY_SUFFIX}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as file:
            try:
                file.write(b"mmv")
                file.flush()
            finally:
                probe.unlink()
    except OSError as error:
        reason = "no space left" if error.errno == errno.ENOSPC else error.strerror or str(error)
        raise OSError(error.errno, f"{owner}: cannot write to {directory} ({reason})") from error
    return directory


class _ErrorRecordingStream:
    """A binary file whose failed writes are remembered, for writers that hide the OSError."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        try:
            self._file.flush()
        except OSError as error:
            self.error = error
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)
