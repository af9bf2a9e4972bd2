"""Fuzzing mmv.data's readers with mutants of real DICOM and NIfTI files.

Mutants (truncations, byte flips, edits of header fields to hostile values) of pydicom's and nibabel's
files, and DICOM series with one mutated slice, are made at test time with a fixed seed. A worker
subprocess under a memory limit (RLIMIT_AS) reads them one after another and reports each; when it dies,
the file it was reading is counted as a crash and a new worker goes on with the rest, and a file that takes
longer than the watchdog's limit counts as a hang. Every file must end in a returned image or an
ImageReadError naming it (or, for a series, the slice inside it); every returned image must be finite
with plausible spacing and agree with read_image_info.
"""

from __future__ import annotations

import gzip
import json
import queue
import shutil
import struct
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("itk")
pydicom = pytest.importorskip("pydicom")
nibabel = pytest.importorskip("nibabel")

from nibabel.testing import data_path as nibabel_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
NIBABEL_FILES = Path(nibabel_data)
CT_SERIES = PYDICOM_FILES / "dicomdirtests" / "98892001" / "CT5N"

SEED = 20261204
MUTANTS_PER_SOURCE = 30
SERIES_MUTANTS = 40
# Address space of a worker: ITK and torch map about 4 GiB at start; the rest bounds what one file may cost.
MEMORY_LIMIT_BYTES = 8 << 30
# A read of these small files takes well under a second; a file still not done after this is hung.
HANG_SECONDS = 120

# (file, frame to read): explicit and implicit VR, big endian, RLE, JPEG-LS, JPEG 2000, JPEG lossless and
# extended, deflated, MONOCHROME1, multi-frame; NIfTI 3D, 4D, gzipped, oblique, scaled.
DICOM_SOURCES = [
    ("CT_small.dcm", None),
    ("MR_small_bigendian.dcm", None),
    ("MR_small_implicit.dcm", None),
    ("MR_small_RLE.dcm", None),
    ("MR_small_jpeg_ls_lossless.dcm", None),
    ("JPEG2000.dcm", None),
    ("SC_rgb_jpeg_gdcm.dcm", None),
    ("JPGExtended.dcm", None),
    ("image_dfl.dcm", None),
    ("dicomdirtests/77654033/CR1/6154", None),
    ("rtdose.dcm", 0),
]
NIFTI_SOURCES = [("anatomical.nii", None), ("example4d.nii.gz", 1), ("functional.nii", 0), ("standard.nii.gz", None)]

WORKER = r"""
import json, math, resource, sys
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from mmv.data import ImageReadError, read_image, read_image_info
from mmv.data.io import SPACING_RANGE_MM

def attempt(function, path, frame):
    try:
        return function(path, frame=frame), "ok"
    except ImageReadError as error:
        # A series may name the slice that failed, inside the directory read.
        named = error.path == path or error.path.startswith(path.rstrip("/") + "/")
        return None, "ImageReadError" if named else f"ImageReadError naming {error.path!r}"
    except BaseException as error:
        return None, f"{type(error).__name__}: {str(error)[-300:]}"

def plausible(spacing):
    return all(math.isfinite(s) and SPACING_RANGE_MM[0] <= s <= SPACING_RANGE_MM[1] for s in spacing)

for line in open(sys.argv[1]):
    path, frame = line.rstrip("\n").split("\t")
    frame = None if frame == "-" else int(frame)
    print(json.dumps({"start": path}), flush=True)
    info, info_outcome = attempt(read_image_info, path, frame)
    image, image_outcome = attempt(read_image, path, frame)
    problems = []
    if info is not None and not plausible(info.spacing):
        problems.append(f"info spacing {info.spacing}")
    if image is not None:
        if not bool(image.pixels.isfinite().all()):
            problems.append("non-finite pixels")
        if not plausible(image.spacing):
            problems.append(f"spacing {image.spacing}")
        if info is not None and (info.shape != image.shape or info.spacing != image.spacing):
            problems.append(f"info {info.shape} {info.spacing} differs from image {image.shape} {image.spacing}")
    print(json.dumps({"path": path, "info": info_outcome, "image": image_outcome, "problems": problems}), flush=True)
"""


# ------------------------------------------------------------------------------------------------
# Mutants


SPACINGS = ["0\\0", "nan\\nan", "abc\\abc", "1e300\\1e300", "1e-310\\1e-310", "-1\\-1", "inf\\1", "1", ""]
THICKNESSES = ["0", "nan", "abc", "1e300", "-5", ""]
# Hostile values of the header elements worth editing, by tag (text) or None (a 16-bit unsigned value).
HOSTILE_TEXT = {
    0x00020010: ["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2", "1.2.840.10008.1.2.5", ""],
    0x00280004: ["PALETTE COLOR", "YBR_FULL", "YBR_FULL_422", "RGB", "MONOCHROME1", "abc", ""],
    0x00280008: ["0", "-1", "2", "99999", "abc", ""],
    0x00280030: SPACINGS,
    0x00181164: SPACINGS,
    0x00180050: THICKNESSES,
    0x00180088: THICKNESSES,
    0x00281052: ["1e308", "-1e308", "nan", "abc", "1\\2", ""],
    0x00281053: ["1e308", "0", "nan", "inf", "abc", "-1", ""],
    0x00200032: ["nan\\0\\0", "abc", "1e308\\0\\0", "0\\0", ""],
    0x00200037: ["0\\0\\0\\0\\0\\0", "nan\\0\\0\\0\\1\\0", "1\\1\\0\\0\\1\\0", "1\\0\\0", "abc", ""],
}
HOSTILE_US = [0, 1, 2, 3, 4, 7, 8, 12, 15, 16, 17, 24, 32, 33, 64, 255, 4096, 32768, 65535]
US_TAGS = [0x00280002, 0x00280010, 0x00280011, 0x00280100, 0x00280101, 0x00280102, 0x00280103]


def dicom_fields(path: Path) -> list[tuple[int, int, int, int]]:
    """(tag, value offset, value length, size of the length field) of the elements worth editing."""
    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    fields = []
    syntax = str(dataset.file_meta.get("TransferSyntaxUID", "")).encode()
    offset = path.read_bytes().find(syntax, 132, 1024) if syntax else -1
    if offset > 0:  # pydicom decodes the file meta while reading: find its transfer syntax by value
        fields.append((0x00020010, offset, len(syntax) + len(syntax) % 2, 2))
    for tag in [*US_TAGS, *HOSTILE_TEXT]:
        element = dataset.get_item(tag) if tag in dataset else None
        if element is None or not hasattr(element, "value_tell") or not element.length:
            continue  # absent, or already decoded by pydicom (no offset known)
        long_length = element.is_implicit_VR or element.VR in ("OB", "OW", "SQ", "UN", "UT", "UC", "UR")
        fields.append((tag, element.value_tell, element.length, 4 if long_length else 2))
    return fields


def edit_dicom_field(data: bytearray, fields, rng: np.random.Generator, big_endian: bool) -> str:
    """Replace one element's value by a hostile one, rewriting its length field (text padded to even length)."""
    tag, offset, length, length_size = fields[rng.integers(len(fields))]
    order = ">" if big_endian and tag >> 16 != 0x0002 else "<"
    if tag in US_TAGS:
        value = int(rng.choice(HOSTILE_US))
        data[offset : offset + 2] = struct.pack(order + "H", value)
        return f"({tag:08X})={value}"
    choices = HOSTILE_TEXT[tag]
    text = choices[rng.integers(len(choices))]
    value = text.encode() + b" " * (len(text) % 2)
    struct.pack_into(order + ("I" if length_size == 4 else "H"), data, offset - length_size, len(value))
    data[offset : offset + length] = value
    return f"({tag:08X})={text!r}"


# NIfTI-1 header fields: (offset, struct code).
NIFTI_FIELDS = (
    [(40 + 2 * i, "h") for i in range(8)]  # dim
    + [(70, "h"), (72, "h"), (252, "h"), (254, "h")]  # datatype, bitpix, qform_code, sform_code
    + [(76 + 4 * i, "f") for i in range(8)]  # pixdim
    + [(108, "f"), (112, "f"), (116, "f")]  # vox_offset, scl_slope, scl_inter
    + [(256 + 4 * i, "f") for i in range(6)]  # quatern_b, c, d, qoffset_x, y, z
    + [(280 + 4 * i, "f") for i in range(12)]  # srow_x, y, z
)
HOSTILE_INT16 = [0, -1, 1, 2, 3, 4, 5, 7, 8, 16, 64, 255, 2048, 32767, -32768]
HOSTILE_FLOAT = [0.0, -1.0, -2.0, 1e-40, 1e-20, 1e20, 1e30, 3e38, float("nan"), float("inf"), float("-inf"), 0.5]


def edit_nifti_field(data: bytearray, rng: np.random.Generator) -> str:
    order = "<" if struct.unpack_from("<i", data, 0)[0] == 348 else ">"
    offset, code = NIFTI_FIELDS[rng.integers(len(NIFTI_FIELDS))]
    value = HOSTILE_INT16[rng.integers(len(HOSTILE_INT16))] if code == "h" else float(rng.choice(HOSTILE_FLOAT))
    struct.pack_into(order + code, data, offset, value)
    return f"{code}@{offset}={value}"


def mutate(data: bytes, rng: np.random.Generator, header_end: int, edit) -> tuple[bytes, str]:
    """One mutant: a truncation, flipped bytes (mostly in the header) or an edited header field."""
    kind = rng.choice(3, p=[0.25, 0.25, 0.5])
    if kind == 0:
        cut = int(rng.integers(1, header_end + 64)) if rng.random() < 0.5 else int(rng.integers(1, len(data)))
        cut = min(cut, len(data) - 1)
        return data[:cut], f"truncated to {cut}"
    mutant = bytearray(data)
    if kind == 1:
        region = min(len(data), header_end + 64) if rng.random() < 0.8 else len(data)
        offsets = rng.integers(0, region, size=int(rng.integers(1, 5)))
        for offset in offsets:
            mutant[offset] ^= int(rng.integers(1, 256))
        return bytes(mutant), f"flipped {sorted(offsets.tolist())}"
    how = edit(mutant, rng)
    return bytes(mutant), how


def dicom_header_end(path: Path) -> int:
    dataset = pydicom.dcmread(path)
    return dataset.get_item(0x7FE00010).value_tell


@pytest.fixture(scope="module")
def mutants(tmp_path_factory) -> dict[str, tuple[str, str | None]]:
    """Mutant path -> (description, frame to read)."""
    root = tmp_path_factory.mktemp("reader_fuzz")
    rng = np.random.default_rng(SEED)
    made: dict[str, tuple[str, int | None]] = {}
    for name, frame in DICOM_SOURCES:
        source = PYDICOM_FILES / name
        data = source.read_bytes()
        fields = dicom_fields(source)
        syntax = pydicom.dcmread(source, stop_before_pixels=True).file_meta.TransferSyntaxUID
        big_endian = syntax == "1.2.840.10008.1.2.2"
        header_end = dicom_header_end(source)
        for index in range(MUTANTS_PER_SOURCE):
            mutant, how = mutate(data, rng, header_end, lambda m, r: edit_dicom_field(m, fields, r, big_endian))
            path = root / f"{Path(name).stem}_{index}.dcm"
            path.write_bytes(mutant)
            made[str(path)] = (f"{name}: {how}", frame)
    for name, frame in NIFTI_SOURCES:
        source = NIBABEL_FILES / name
        compressed = name.endswith(".gz")
        raw = gzip.decompress(source.read_bytes()) if compressed else source.read_bytes()
        for index in range(MUTANTS_PER_SOURCE):
            # Gzipped sources are mutated mostly before compression, so the mutations reach the header.
            on_raw = not compressed or rng.random() < 0.75
            data = raw if on_raw else source.read_bytes()
            mutant, how = mutate(data, rng, 352, edit_nifti_field if on_raw else lambda m, r: "unchanged")
            if compressed and on_raw:
                mutant = gzip.compress(mutant, mtime=0)
            path = root / f"{name.split('.')[0]}_{index}.{'nii.gz' if compressed else 'nii'}"
            path.write_bytes(mutant)
            made[str(path)] = (f"{name}: {how}{' (before gzip)' if compressed and on_raw else ''}", frame)
    slices = sorted(CT_SERIES.iterdir())
    fields = {item: dicom_fields(item) for item in slices}
    for index in range(SERIES_MUTANTS):
        directory = root / f"series_{index}"
        shutil.copytree(CT_SERIES, directory)
        victim = slices[rng.integers(len(slices))]
        data = victim.read_bytes()
        mutant, how = mutate(
            data, rng, dicom_header_end(victim), lambda m, r: edit_dicom_field(m, fields[victim], r, False)
        )
        (directory / victim.name).write_bytes(mutant)
        made[str(directory)] = (f"CT5N series, slice {victim.name}: {how}", None)
    return made


# ------------------------------------------------------------------------------------------------
# The harness


def read_all(files: dict[str, tuple[str, int | None]], workdir: Path) -> dict[str, dict]:
    """Each file's report from worker subprocesses; a worker's death or silence is charged to its current file."""
    results: dict[str, dict] = {}
    pending = list(files)
    attempt = 0
    while pending:
        attempt += 1
        listing = workdir / f"files_{attempt}.txt"
        frames = {path: "-" if files[path][1] is None else str(files[path][1]) for path in pending}
        listing.write_text("".join(f"{path}\t{frames[path]}\n" for path in pending))
        stderr = (workdir / f"stderr_{attempt}.txt").open("w")
        worker = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(listing), str(MEMORY_LIMIT_BYTES)],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        lines: queue.Queue = queue.Queue()

        def pump(stream=worker.stdout, sink=lines):
            for line in stream:
                sink.put(line)
            sink.put(None)

        threading.Thread(target=pump, daemon=True).start()
        current = None
        while True:
            try:
                line = lines.get(timeout=HANG_SECONDS)
            except queue.Empty:
                worker.kill()
                worker.wait()
                results[current or pending[0]] = {"outcome": "hang"}
                break
            if line is None:
                code = worker.wait()
                if current is None:
                    assert not [path for path in pending if path not in results], (
                        f"worker exited with {code} before reading a file: "
                        f"{(workdir / f'stderr_{attempt}.txt').read_text()[-2000:]}"
                    )
                else:
                    results[current] = {"outcome": f"crash (exit status {code})"}
                break
            message = json.loads(line)
            if "start" in message:
                current = message["start"]
            else:
                results[message["path"]] = message
                current = None
        stderr.close()
        pending = [path for path in pending if path not in results]
    return results


def test_reader_fuzz_no_crash_hang_or_stray_exception(mutants, tmp_path):
    results = read_all(mutants, tmp_path)
    failures, outcomes = [], Counter()
    for path, result in results.items():
        what = mutants[path][0]
        if "outcome" in result:  # crash or hang
            outcomes[result["outcome"].split(" ")[0]] += 1
            failures.append(f"{result['outcome']}: {what}")
            continue
        for call in ("info", "image"):
            outcomes[f"{call} {'ok' if result[call] == 'ok' else result[call].split(':')[0]}"] += 1
            if result[call] not in ("ok", "ImageReadError"):
                failures.append(f"{call}: {result[call]}: {what}")
        failures.extend(f"{problem}: {what}" for problem in result["problems"])
    summary = ", ".join(f"{key} {count}" for key, count in sorted(outcomes.items()))
    print(f"\n{len(mutants)} mutants: {summary}")
    assert len(results) == len(mutants)
    assert not failures, f"{len(failures)} failures ({summary}):\n" + "\n".join(failures[:40])
    # The mutants reach both outcomes, so the harness is exercising the readers rather than one error path.
    assert outcomes["image ok"] >= 20 and outcomes["image ImageReadError"] >= 100
