"""mmv.data.PreprocessCache: keys, memory-mapped hits, atomic writes under concurrency and after crashes."""

from __future__ import annotations

import multiprocessing
import os

import pytest
import torch

from mmv import Image
from mmv.data import PreprocessCache


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(b"pretend image")
    return path


def image_of(value: float) -> Image:
    return Image(torch.full((3, 4, 5), value), (1.5, 0.75, 0.75), "CT")


def test_miss_then_memory_mapped_hit(tmp_path, source):
    cache = PreprocessCache(tmp_path / "cache")
    calls = []

    def compute():
        calls.append(1)
        return image_of(2.0)

    first = cache.get_or_compute(source, "params", compute)
    second = cache.get_or_compute(source, "params", compute)
    assert len(calls) == 1 and (cache.hits, cache.misses) == (1, 1)
    torch.testing.assert_close(first.pixels, second.pixels)
    assert second.spacing == (1.5, 0.75, 0.75) and second.modality == "CT"
    entry = tmp_path / "cache" / f"{cache.key(source, 'params')}.npy"
    if os.path.exists("/proc/self/maps"):  # Linux: the hit is a mapping of the entry, not a copy in memory
        with open("/proc/self/maps") as maps:
            assert str(entry) in maps.read()
    second.pixels += 1  # copy-on-write: the entry itself is untouched
    torch.testing.assert_close(cache.get_or_compute(source, "params", compute).pixels, first.pixels)


def test_key_follows_file_content_time_and_parameters(tmp_path, source):
    cache = PreprocessCache(tmp_path / "cache")
    key = cache.key(source, "a")
    assert cache.key(source, "a") == key
    assert cache.key(source, "b") != key
    os.utime(source, ns=(1, 1))
    assert cache.key(source, "a") != key
    with pytest.raises(FileNotFoundError):
        cache.key(tmp_path / "missing", "a")
    with pytest.raises(TypeError, match="parameters"):
        cache.key(source, 3)


def test_partial_and_corrupt_entries_are_misses(tmp_path, source):
    cache = PreprocessCache(tmp_path / "cache")
    key = cache.key(source, "p")
    cache.store(key, image_of(1.0))
    array_path = tmp_path / "cache" / f"{key}.npy"
    # A writer killed mid-file leaves only a temporary file behind; it is never read.
    (tmp_path / "cache" / f"{key}.npy.123.abc.tmp").write_bytes(b"partial")
    assert cache.load(key) is not None
    array_path.write_bytes(array_path.read_bytes()[:100])  # a truncated array is not trusted
    assert cache.load(key) is None
    image = cache.get_or_compute(source, "p", lambda: image_of(4.0))
    assert float(image.pixels[0, 0, 0]) == 4.0
    assert float(cache.load(key).pixels[0, 0, 0]) == 4.0
    cache.clear()
    assert list((tmp_path / "cache").iterdir()) == []


def _hammer(directory: str, source: str, value: float, rounds: int) -> None:
    cache = PreprocessCache(directory)
    key = cache.key(source, "shared")
    for _ in range(rounds):
        cache.store(key, Image(torch.full((32, 32, 8), value), (1.0, 1.0, 1.0), "CT"))
        loaded = cache.load(key)
        assert loaded is not None and loaded.shape == (32, 32, 8)


def test_concurrent_writers_never_expose_a_partial_entry(tmp_path, source):
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(target=_hammer, args=(str(tmp_path / "cache"), str(source), 1.0, 10)) for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    reader = PreprocessCache(tmp_path / "cache")
    key = reader.key(source, "shared")
    for _ in range(50):
        loaded = reader.load(key)
        assert loaded is None or bool((loaded.pixels == 1.0).all())
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert not [p for p in (tmp_path / "cache").iterdir() if p.suffix == ".tmp"]


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="directory"):
        PreprocessCache(None)
    with pytest.raises(TypeError, match="image"):
        PreprocessCache(tmp_path).store("k", torch.zeros(3))
