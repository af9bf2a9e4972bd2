"""mmv.data.PreprocessCache: keys, memory-mapped hits, atomic writes under concurrency and after crashes,
checksummed entries."""

from __future__ import annotations

import multiprocessing
import os
import shutil

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


def test_a_series_is_keyed_by_each_of_its_files(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    series = tmp_path / "series"
    series.mkdir()
    for index in range(3):
        shutil.copyfile(get_testdata_file("CT_small.dcm"), series / f"slice{index}.dcm")
    cache = PreprocessCache(tmp_path / "cache")
    first_byte_of_slice = lambda: image_of(float((series / "slice1.dcm").read_bytes()[-1]))  # noqa: E731
    before = cache.get_or_compute(series, "p", first_byte_of_slice)
    key = cache.key(series, "p")
    # Rewrite one slice in place, same size, and put its times back: the directory itself does not change.
    slice_path = series / "slice1.dcm"
    status, directory_status = slice_path.stat(), series.stat()
    data = bytearray(slice_path.read_bytes())
    data[-1] ^= 0xFF
    with open(slice_path, "r+b") as stream:
        stream.write(data)
    os.utime(slice_path, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert series.stat().st_mtime_ns == directory_status.st_mtime_ns and series.stat().st_size == directory_status.st_size
    assert cache.key(series, "p") != key
    after = cache.get_or_compute(series, "p", first_byte_of_slice)
    assert float(after.pixels[0, 0, 0]) == float(data[-1]) != float(before.pixels[0, 0, 0])
    assert (cache.hits, cache.misses) == (0, 2)
    changed = cache.key(series, "p")
    (series / "slice3.dcm").write_bytes(bytes(data))
    assert cache.key(series, "p") != changed


@pytest.mark.parametrize("damage", ["empty array", "empty record", "flipped pixel byte", "flipped header byte", "record of another entry"])
def test_an_unreadable_or_damaged_entry_is_a_miss_and_is_rewritten(tmp_path, source, damage):
    cache = PreprocessCache(tmp_path / "cache")
    key = cache.key(source, "p")
    cache.store(key, image_of(1.0))
    array_path, record_path = tmp_path / "cache" / f"{key}.npy", tmp_path / "cache" / f"{key}.json"
    intact = array_path.read_bytes()
    if damage == "empty array":
        array_path.write_bytes(b"")
    elif damage == "empty record":
        record_path.write_bytes(b"")
    elif damage == "flipped pixel byte":
        array_path.write_bytes(intact[:-3] + bytes([intact[-3] ^ 0x01]) + intact[-2:])
    elif damage == "flipped header byte":  # the shape (3, 4, 5) read as (3, 4, 4)
        array_path.write_bytes(intact.replace(b"(3, 4, 5)", b"(3, 4, 4)"))
    else:
        cache.store("other", image_of(2.0))
        record_path.write_bytes((tmp_path / "cache" / "other.json").read_bytes())
    assert cache.load(key) is None
    image = cache.get_or_compute(source, "p", lambda: image_of(3.0))
    assert bool((image.pixels == 3.0).all()) and cache.misses == 1
    reloaded = cache.load(key)
    assert reloaded is not None and bool((reloaded.pixels == 3.0).all())


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
