"""Reading medical image files with ITK into :class:`mmv.Image`.

This module is the only place where ITK's (x, y, z) index order and its direction matrices exist: every
function here returns arrays, shapes and spacings in (z, y, x) order, and every 3D volume in the
canonical LPS orientation of the design (identity direction: x toward the patient's left, y toward
posterior, z toward superior). ITK is imported on first use, never at import time.

Only geometry and the modality are taken from headers; ITK's DICOM reader (GDCM) already applies the
rescale slope/intercept and turns MONOCHROME1 into MONOCHROME2, so neither is done a second time here.
Patient identifiers are never copied into results, errors or logs.

No file reaches ITK before this module has recognised its format from its first bytes and, for DICOM and
NIfTI, checked its header in Python (:mod:`mmv.data.dicom_header`, :func:`_nifti1_header`): GDCM aborts the
process on some inconsistent DICOM headers, reads unparsable numbers as garbage and pads short pixel data
with uninitialised memory. Whatever is read is checked before it is returned: finite pixels, finite
geometry, spacing within ``SPACING_RANGE_MM``. Every failure is an :class:`ImageReadError`.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import math
import os
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmv.data import dicom_header as tags
from mmv.data.dicom_header import (
    ENCAPSULATED_TRANSFER_SYNTAXES,
    DicomHeader,
    DicomHeaderError,
    looks_like_dicom,
    read_dicom_header,
)
from mmv.image import Image
from mmv.orientation import PERMUTATION_TOLERANCE, signed_permutation

__all__ = [
    "SPACING_RANGE_MM",
    "ImageReadError",
    "ImageInfo",
    "NiftiHeaderFacts",
    "read_image",
    "read_image_info",
    "list_dicom_series",
    "inspect_nifti_header",
]

# The ITK image reader of each supported format. A file's format is recognised here, from its first bytes
# (and the name for NIfTI and MetaImage), never by ITK's reader factory: probing a file with every ITK
# reader hands it to GDCM, which can abort the process.
_SUPPORTED_READERS = {
    "DICOM": "GDCMImageIO",
    "NIfTI": "NiftiImageIO",
    "NRRD": "NrrdImageIO",
    "MetaImage": "MetaImageIO",
    "PNG": "PNGImageIO",
    "JPEG": "JPEGImageIO",
}
# Formats ITK could read but this module refuses, recognised by their signatures only to say so.
_UNSUPPORTED_SIGNATURES = {
    b"CDF\x01": "MINC / netCDF",
    b"CDF\x02": "MINC / netCDF",
    b"\x89HDF\r\n\x1a\n": "MINC / HDF5",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"# vtk DataFile": "VTK",
}
# Spacing a reader accepts, in mm: from 1 micrometre (beyond micro-CT) to 1 m (beyond any slice gap).
# Anything outside is a corrupt or mis-scaled header, and would make the physical token positions absurd.
SPACING_RANGE_MM = (1e-3, 1e3)
# The most voxels a reader returns (4 GiB of float32): larger comes only from a corrupt header.
_MAX_VOXELS = 1 << 30
# An oblique volume is resampled onto a grid of at most this many times its own voxels.
_MAX_RESAMPLE_GROWTH = 64
# Direction matrices must be orthonormal to this tolerance (DICOM cosines carry ~6 decimals).
_ORTHONORMAL_TOLERANCE = 1e-3
# Photometric interpretations whose decoding this module relies on; PALETTE COLOR and the rest are refused.
_GREY_PHOTOMETRIC = {"MONOCHROME1", "MONOCHROME2"}
_COLOUR_PHOTOMETRIC = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"}

# Relative tolerance on slice-to-slice distance and in-plane offsets within a DICOM series.
_SERIES_SPACING_TOLERANCE = 0.01
# Voxels of an oblique volume resampled per grid_sample call, to bound the memory of the sample grid.
_RESAMPLE_CHUNK_VOXELS = 1 << 22


class ImageReadError(Exception):
    """A file or DICOM directory could not be read as an image.

    Attributes:
        path: the file or directory that failed.
        reason: why, in words (never containing patient identifiers).
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class ImageInfo:
    """What :func:`read_image` would return, known from the headers alone.

    Attributes:
        shape: pixel array shape, ``(H, W)`` or ``(D, H, W)``, after canonical reorientation.
        spacing: voxel size in millimetres in the same (z, y, x) order.
        modality: the DICOM Modality when the file has one, else None.
    """

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    modality: str | None


@dataclass(frozen=True)
class NiftiHeaderFacts:
    """Whether a NIfTI header carries real intensity scaling and real voxel spacing.

    Scaling is absent when ``scl_slope`` is 0 or NaN or the scaling is the identity (slope 1, intercept 0);
    spacing is absent when ``pixdim`` is 1 on all three spatial axes. Such a header leaves both to an
    external source such as a metadata table.
    """

    has_intensity_scaling: bool
    has_spacing: bool


@dataclass
class _Geometry:
    """ITK geometry of one image, converted to NumPy: index axes in ITK order (x, y, z)."""

    size: np.ndarray  # (n,) voxels per index axis
    spacing: np.ndarray  # (n,) mm
    origin: np.ndarray  # (n,) mm, physical position of voxel (0, ..., 0)
    direction: np.ndarray  # (n, n), column i is the physical direction of index axis i


# The ITK names this module uses. ITK loads its SWIG modules lazily, on first attribute access.
_ITK_NAMES = (
    "ProcessObject", "ImageFileReader", "Image", "F", "PyBuffer", "array_view_from_image", *_SUPPORTED_READERS.values()
)


@functools.cache
def _itk():
    # Loading a SWIG module emits DeprecationWarnings on Python 3.11+; under warning filters that turn them
    # into errors (python -W error, pytest -W error) the module's initialisation fails and the interpreter
    # crashes. So every module used here is loaded at once, with those warnings ignored.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import itk  # heavy (hundreds of MB): imported only when a file is actually read

        for name in _ITK_NAMES:
            getattr(itk, name)
    # ITK prints its own warnings (e.g. non-uniform slice spacing) to stderr; this module checks those
    # conditions itself and raises, so the console stays free of duplicate and possibly confusing text.
    itk.ProcessObject.SetGlobalWarningDisplay(False)
    return itk


def read_image(
    path: str | os.PathLike, series_uid: str | None = None, frame: int | None = None
) -> Image:
    """Read a medical image file, or a directory holding a DICOM series, into an :class:`mmv.Image`.

    Supported: a DICOM file, a directory with a DICOM series, NIfTI (``.nii``, ``.nii.gz``), NRRD,
    MetaImage (``.mha``/``.mhd``), PNG and JPEG.

    - Pixels are float32. DICOM rescale slope/intercept are applied exactly once (CT comes out in
      Hounsfield units); NIfTI ``scl_slope``/``scl_inter`` are applied when present. ITK's NIfTI library
      turns NaN and infinite voxels of floating-point NIfTI files into 0. Radiographs stored
      as MONOCHROME1 come out like MONOCHROME2 (dense tissue bright). Colour images become luminance.
    - A single DICOM file, PNG and JPEG give a 2D image ``[H, W]`` in stored row/column order; a DICOM
      series and 3D NIfTI/NRRD/MetaImage files give a volume ``[D, H, W]`` in canonical LPS orientation,
      by permuting and flipping axes when the direction is a signed permutation and by trilinear
      resampling otherwise. Spacing is in millimetres, in (z, y, x) order.
    - Spacing is never invented. DICOM in-plane spacing is PixelSpacing, else the Pixel Measures functional
      group of enhanced multi-frame files, else ImagerPixelSpacing (radiographs: the spacing at the
      detector, larger than at the patient by the geometric magnification); a file with none of them
      valid (missing, zero, unparsable) raises. A one-file DICOM series takes its thickness from
      SpacingBetweenSlices, else SliceThickness, else raises. A NIfTI pixdim that is not positive and an
      NRRD or MetaImage header without a spacing field raise too. PNG and JPEG carry no physical size:
      their spacing is ITK's 1.0 per pixel, which callers replace (the radiograph data sets do).
    - Only plausible images are returned: every pixel finite, spacing within ``SPACING_RANGE_MM``
      (0.001 to 1000 mm), finite origin and orthonormal direction for volumes, at most 2**30 voxels.
      DICOM files must be greyscale (MONOCHROME1/2) or colour (RGB, YBR_*) with 8, 16 or 32 bits
      allocated and at least Rows x Columns x frames of pixel data; PALETTE COLOR is refused.

    Args:
        path: a file, or a directory holding DICOM files (not searched recursively).
        series_uid: which series to read when the directory holds several.
        frame: which frame of a multi-frame DICOM file or a 4D volume to read; such files raise without it.

    Raises:
        ImageReadError: for any file that cannot be read (missing, empty, truncated, corrupt, unsupported,
            implausible as above, several series without ``series_uid``, inconsistent slices, frames without
            ``frame``), with the path and the reason. No other exception comes from a file's content.
    """
    path = _checked_path(path, series_uid, frame)
    with _as_read_error(path):
        if path.is_dir():
            return _read_dicom_series(path, series_uid, with_pixels=True)
        return _read_file(path, frame, with_pixels=True)


def read_image_info(
    path: str | os.PathLike, series_uid: str | None = None, frame: int | None = None
) -> ImageInfo:
    """Shape, spacing and modality that :func:`read_image` would return, from the headers only.

    Takes the same arguments and raises the same :class:`ImageReadError` for unreadable headers. Pixel
    data is not read, so truncated pixel data is only detected by :func:`read_image`.
    """
    path = _checked_path(path, series_uid, frame)
    with _as_read_error(path):
        if path.is_dir():
            return _read_dicom_series(path, series_uid, with_pixels=False)
        return _read_file(path, frame, with_pixels=False)


def list_dicom_series(directory: str | os.PathLike) -> tuple[str, ...]:
    """SeriesInstanceUIDs of the DICOM series in ``directory`` (not searched recursively).

    Files that are not DICOM, and DICOM files without pixel data (such as a DICOMDIR), are ignored.

    Raises:
        ImageReadError: when ``directory`` is not a directory, or for a file in it that starts like DICOM
            (the DICM marker) but is corrupt, or an image without a SeriesInstanceUID.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ImageReadError(directory, "not a directory")
    with _as_read_error(directory):
        return tuple(_series_files(directory))


def inspect_nifti_header(path: str | os.PathLike) -> NiftiHeaderFacts:
    """Tell whether a NIfTI-1 file's header carries intensity scaling and voxel spacing.

    Raises:
        ImageReadError: when the file is not a readable NIfTI-1 file.
    """
    path = _checked_path(path, None, None)
    header = _nifti1_header(path)
    slope, intercept = header["scl_slope"], header["scl_inter"]
    # The NIfTI standard: scl_slope == 0 means "no scaling"; some writers leave NaN, most write the identity.
    if not math.isfinite(intercept):
        intercept = 0.0
    has_scaling = math.isfinite(slope) and slope != 0.0 and (slope, intercept) != (1.0, 0.0)
    has_spacing = not all(value == 1.0 for value in header["pixdim"][1:4])
    return NiftiHeaderFacts(has_intensity_scaling=has_scaling, has_spacing=has_spacing)


_NIFTI1_HEADER_SIZE = 348


def _nifti1_header(path: Path) -> dict:
    """The fields of a NIfTI-1 header this module needs, parsed from the file's first 348 bytes.

    Read directly because ITK reports a missing scl_slope as 1 and the pixel type after scaling, which
    hides both what the file holds and how large its data is.
    """
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as stream:
            raw = stream.read(_NIFTI1_HEADER_SIZE)
    except (OSError, EOFError, zlib.error) as error:
        raise ImageReadError(path, f"unreadable NIfTI header: {error}") from None
    if len(raw) < _NIFTI1_HEADER_SIZE:
        raise ImageReadError(path, "not a NIfTI-1 file: shorter than its 348-byte header")
    for order in ("<", ">"):
        if np.frombuffer(raw, dtype=f"{order}i4", count=1)[0] == _NIFTI1_HEADER_SIZE:
            break
    else:
        raise ImageReadError(path, "not a NIfTI-1 file: sizeof_hdr is not 348")

    def field(offset: int, kind: str, count: int = 1) -> np.ndarray:
        return np.frombuffer(raw, dtype=f"{order}{kind}", count=count, offset=offset)

    return {
        "dim": field(40, "i2", 8).astype(np.int64),
        "bitpix": int(field(72, "i2")[0]),
        "pixdim": field(76, "f4", 8).astype(np.float64),
        "vox_offset": float(field(108, "f4")[0]),
        "scl_slope": float(field(112, "f4")[0]),
        "scl_inter": float(field(116, "f4")[0]),
    }


def _checked_nifti_header(path: Path) -> dict:
    """The NIfTI-1 header, checked for what ITK would otherwise pass on as impossible geometry."""
    header = _nifti1_header(path)
    dims = header["dim"]
    axes = int(dims[0])
    if not 1 <= axes <= 7 or np.any(dims[1 : axes + 1] < 1):
        raise ImageReadError(path, f"corrupt NIfTI header: dim {dims.tolist()}")
    if header["bitpix"] not in (8, 16, 24, 32, 64, 128, 256):
        raise ImageReadError(path, f"corrupt NIfTI header: bitpix {header['bitpix']}")
    if not (math.isfinite(header["vox_offset"]) and 0 <= header["vox_offset"] < 1 << 31):
        raise ImageReadError(path, f"corrupt NIfTI header: vox_offset {header['vox_offset']}")
    spatial = header["pixdim"][1 : min(axes, 3) + 1]
    if not np.all(np.isfinite(spatial)) or np.any(spatial <= 0):
        raise ImageReadError(path, f"unknown voxel size: NIfTI pixdim {spatial.tolist()} is not finite and positive")
    return header


# Where the text headers of NRRD and MetaImage end at the latest, for the spacing check.
_TEXT_HEADER_BYTES = 1 << 16
# Header fields from which ITK takes the spacing; without any, ITK assumes 1 mm.
_TEXT_SPACING_FIELDS = {
    "NRRD": (":", {b"spacings", b"space directions"}, b""),
    "MetaImage": ("=", {b"elementspacing", b"elementsize"}, b"elementdatafile"),
}


def _check_text_header_has_spacing(path: Path, format_name: str) -> None:
    """Raise for an NRRD or MetaImage header without a spacing field, whose spacing ITK would invent as 1 mm."""
    separator, fields, last_field = _TEXT_SPACING_FIELDS[format_name]
    with open(path, "rb") as stream:
        lines = stream.read(_TEXT_HEADER_BYTES).split(b"\n")
    for line in lines[1:] if format_name == "NRRD" else lines:
        key = line.split(separator.encode(), 1)[0].strip().lower()
        if key in fields:
            return
        # An attached NRRD header ends at a blank line, a MetaImage header with its ElementDataFile line.
        if key == last_field:
            break
    names = ", ".join(sorted(field.decode() for field in fields))
    raise ImageReadError(path, f"unknown voxel spacing: the {format_name} header has none of {names}")


def _checked_path(path: str | os.PathLike, series_uid: str | None, frame: int | None) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if series_uid is not None and not isinstance(series_uid, str):
        raise TypeError(f"series_uid must be a str or None, got {type(series_uid).__name__}")
    if frame is not None and (isinstance(frame, bool) or not isinstance(frame, int) or frame < 0):
        raise ValueError(f"frame must be a non-negative int or None, got {frame!r}")
    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "no such file or directory")
    if path.is_file() and path.stat().st_size == 0:
        raise ImageReadError(path, "file is empty")
    if path.is_file() and series_uid is not None:
        raise ImageReadError(path, "series_uid applies to a directory holding a DICOM series, not to a file")
    return path


@contextlib.contextmanager
def _as_read_error(path: Path):
    """Report what a corrupt file can still make ITK, NumPy or the OS raise as an ImageReadError naming the path."""
    try:
        yield
    except (RuntimeError, ValueError, ArithmeticError, OSError) as error:
        raise ImageReadError(path, f"unreadable ({type(error).__name__}): {_itk_reason(error)}") from error


def _file_format(path: Path) -> str:
    """The supported format of a file, recognised from its signature (and name for NIfTI and MetaImage)."""
    with open(path, "rb") as stream:
        prefix = stream.read(_NIFTI1_HEADER_SIZE)
    name = path.name.lower()
    if prefix.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if prefix.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if prefix.startswith(b"NRRD000"):
        return "NRRD"
    if name.endswith((".nii", ".nii.gz")):
        return "NIfTI"
    if name.endswith((".mha", ".mhd")):
        return "MetaImage"
    if looks_like_dicom(prefix):
        return "DICOM"
    for signature, format_name in _UNSUPPORTED_SIGNATURES.items():
        if prefix.startswith(signature):
            raise ImageReadError(
                path, f"unsupported format ({format_name}); supported: {', '.join(sorted(_SUPPORTED_READERS))}"
            )
    raise ImageReadError(path, "unsupported or corrupt file: no image reader recognises it")


def _open_image_io(path: Path, format_name: str):
    itk = _itk()
    io = getattr(itk, _SUPPORTED_READERS[format_name]).New()
    if not io.CanReadFile(str(path)):
        raise ImageReadError(path, f"corrupt {format_name} file: the {format_name} reader does not recognise it")
    io.SetFileName(str(path))
    try:
        io.ReadImageInformation()
    except RuntimeError as error:
        raise ImageReadError(path, f"unreadable {format_name} header: {_itk_reason(error)}") from None
    return io


def _itk_reason(error: Exception) -> str:
    """The last line of an ITK exception: the part that says what went wrong, without source locations."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _geometry(io, axes: int) -> _Geometry:
    return _Geometry(
        size=np.array([io.GetDimensions(axis) for axis in range(axes)], dtype=np.int64),
        spacing=np.array([io.GetSpacing(axis) for axis in range(axes)], dtype=np.float64),
        origin=np.array([io.GetOrigin(axis) for axis in range(axes)], dtype=np.float64),
        direction=np.array([io.GetDirection(axis)[:axes] for axis in range(axes)], dtype=np.float64).T,
    )


def _check_geometry(path: Path, geometry: _Geometry, oriented: bool) -> None:
    """Raise unless spacing is plausible and, for a volume placed in space (``oriented``), origin and direction are
    finite and the direction orthonormal."""
    low, high = SPACING_RANGE_MM
    spacing = geometry.spacing
    if not _plausible_spacing(tuple(float(value) for value in spacing), len(spacing)):
        raise ImageReadError(
            path, f"implausible voxel spacing {_zyx(spacing)} mm; accepted: {low:g} to {high:g} mm per axis"
        )
    if np.any(geometry.size < 1) or int(np.prod(geometry.size, dtype=np.float64)) > _MAX_VOXELS:
        raise ImageReadError(path, f"implausible image size {tuple(int(n) for n in geometry.size[::-1])}")
    if not oriented:
        return
    if not np.all(np.isfinite(geometry.origin)):
        raise ImageReadError(path, "non-finite image origin")
    direction = geometry.direction
    identity = np.eye(len(direction))
    orthonormal = np.all(np.isfinite(direction)) and (
        np.max(np.abs(direction.T @ direction - identity)) <= _ORTHONORMAL_TOLERANCE
    )
    if not orthonormal:
        raise ImageReadError(path, "the direction cosines are not orthonormal")


def _check_pixels(path: Path, voxels: np.ndarray) -> None:
    # min and max propagate NaN and show infinities without a temporary array the size of the image.
    if not (math.isfinite(float(np.min(voxels))) and math.isfinite(float(np.max(voxels)))):
        count = int(voxels.size - np.count_nonzero(np.isfinite(voxels)))
        raise ImageReadError(
            path, f"{count} non-finite pixel values (NaN or infinity, e.g. from an overflowing rescale slope)"
        )


@dataclass(frozen=True)
class _DicomFacts:
    """What the reader takes from a DICOM header that it checked itself (see :func:`_dicom_facts`)."""

    modality: str | None
    rows: int
    columns: int
    frames: int
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm: (y, x)
    slice_spacing: float | None  # SpacingBetweenSlices, else SliceThickness, when plausible


def _dicom_header(path: Path) -> DicomHeader:
    try:
        return read_dicom_header(path)
    except DicomHeaderError as error:
        raise ImageReadError(path, f"corrupt DICOM: {error}") from None


def _dicom_facts(path: Path, header: DicomHeader, frame: int | None) -> _DicomFacts:
    """Check that GDCM can decode the file safely and exactly, and take its spacing; raise ImageReadError if not."""
    try:
        return _checked_dicom_facts(path, header, frame)
    except DicomHeaderError as error:
        raise ImageReadError(path, f"corrupt DICOM: {error}") from None


def _checked_dicom_facts(path: Path, header: DicomHeader, frame: int | None) -> _DicomFacts:
    if header.has_float_pixel_data and not header.has_pixel_data:
        raise ImageReadError(path, "unsupported DICOM: floating-point pixel data")
    if not header.has_pixel_data:
        raise ImageReadError(path, "DICOM file without pixel data")
    photometric = header.text(tags.PHOTOMETRIC)
    samples = header.unsigned(tags.SAMPLES_PER_PIXEL)
    if photometric in _GREY_PHOTOMETRIC:
        expected_samples = 1
    elif photometric in _COLOUR_PHOTOMETRIC:
        expected_samples = 3
    else:
        supported = ", ".join(sorted(_GREY_PHOTOMETRIC | _COLOUR_PHOTOMETRIC))
        raise ImageReadError(
            path, f"unsupported DICOM PhotometricInterpretation {photometric!r:.40}; supported: {supported}"
        )
    if samples != expected_samples:
        raise ImageReadError(path, f"SamplesPerPixel {samples} does not match PhotometricInterpretation {photometric}")
    rows, columns = header.unsigned(tags.ROWS), header.unsigned(tags.COLUMNS)
    if not rows or not columns:
        raise ImageReadError(path, f"DICOM image of Rows {rows} x Columns {columns}")
    bits = header.unsigned(tags.BITS_ALLOCATED)
    stored = header.unsigned(tags.BITS_STORED)
    high_bit = header.unsigned(tags.HIGH_BIT)
    if bits not in (8, 16, 32) or stored is None or not 1 <= stored <= bits or (high_bit or 0) >= bits:
        raise ImageReadError(
            path, f"unsupported DICOM pixel format: BitsAllocated {bits}, BitsStored {stored}, HighBit {high_bit}"
        )
    if header.unsigned(tags.PIXEL_REPRESENTATION) not in (None, 0, 1):
        raise ImageReadError(path, "DICOM PixelRepresentation is neither 0 (unsigned) nor 1 (signed)")
    frames = header.integer(tags.NUMBER_OF_FRAMES) or 1
    if frames < 1:
        raise ImageReadError(path, f"DICOM NumberOfFrames {frames}")
    if rows * columns * frames > _MAX_VOXELS:
        raise ImageReadError(path, f"implausible DICOM size: {frames} frames of {rows} x {columns}")
    encapsulated = header.transfer_syntax in ENCAPSULATED_TRANSFER_SYNTAXES
    if encapsulated != (header.pixel_data_length is None):
        raise ImageReadError(path, "DICOM pixel data framing does not match the transfer syntax (compressed or not)")
    if not encapsulated:
        # Native YBR_FULL_422 stores two luminance samples and one pair of chrominance per two pixels.
        samples_stored = 2 if photometric == "YBR_FULL_422" else samples
        expected = rows * columns * frames * samples_stored * bits // 8
        if header.pixel_data_length < expected:
            raise ImageReadError(
                path,
                f"short DICOM pixel data: {header.pixel_data_length} bytes where {frames} frame(s) of "
                f"{rows} x {columns} x {samples_stored} samples of {bits} bits need {expected}",
            )
    slope = header.decimals(tags.RESCALE_SLOPE)
    intercept = header.decimals(tags.RESCALE_INTERCEPT)
    if slope is not None and (len(slope) != 1 or slope[0] == 0.0):
        raise ImageReadError(path, f"DICOM RescaleSlope {list(slope)} is not one non-zero number")
    if intercept is not None and len(intercept) != 1:
        raise ImageReadError(path, f"DICOM RescaleIntercept {list(intercept)} is not one number")
    for tag, name, count in (
        (tags.IMAGE_POSITION, "ImagePositionPatient", 3),
        (tags.IMAGE_ORIENTATION, "ImageOrientationPatient", 6),
    ):
        values = header.decimals(tag)
        if values is not None and len(values) != count:
            raise ImageReadError(path, f"DICOM {name} holds {len(values)} values, not {count}")
    return _DicomFacts(
        modality=header.text(tags.MODALITY),
        rows=rows,
        columns=columns,
        frames=frames,
        pixel_spacing=_dicom_pixel_spacing(path, header, frame or 0),
        slice_spacing=_dicom_slice_spacing(header),
    )


def _plausible_spacing(values: tuple[float, ...] | None, count: int) -> bool:
    low, high = SPACING_RANGE_MM
    return values is not None and len(values) == count and all(low <= value <= high for value in values)


def _dicom_pixel_spacing(path: Path, header: DicomHeader, frame: int) -> tuple[float, float]:
    """In-plane spacing (between rows, between columns) in mm from the first source that holds a plausible one."""
    candidates = [("PixelSpacing", tags.PIXEL_SPACING, None)]
    for name, sequence, index in (
        ("SharedFunctionalGroups", tags.SHARED_FUNCTIONAL_GROUPS, 0),
        ("PerFrameFunctionalGroups", tags.PER_FRAME_FUNCTIONAL_GROUPS, frame),
    ):
        groups = header.items(sequence)
        if index < len(groups):
            for measures in header.items(tags.PIXEL_MEASURES_SEQUENCE, groups[index])[:1]:
                candidates.append((f"{name} PixelSpacing", tags.PIXEL_SPACING, measures))
    candidates.append(("ImagerPixelSpacing", tags.IMAGER_PIXEL_SPACING, None))
    found = []
    for name, tag, dataset in candidates:
        try:
            values = header.decimals(tag, dataset)
        except DicomHeaderError:
            found.append(f"{name} '{header.text(tag, dataset)[:40]}'")
            continue
        if _plausible_spacing(values, 2):
            return values[0], values[1]
        if values is not None:
            found.append(f"{name} {list(values)}")
    low, high = SPACING_RANGE_MM
    raise ImageReadError(
        path,
        "unknown pixel spacing: neither PixelSpacing, nor a Pixel Measures functional group, nor ImagerPixelSpacing "
        f"holds two values within {low:g} to {high:g} mm" + (f" (found {'; '.join(found)})" if found else ""),
    )


def _dicom_slice_spacing(header: DicomHeader) -> float | None:
    for tag in (tags.SPACING_BETWEEN_SLICES, tags.SLICE_THICKNESS):
        try:
            values = header.decimals(tag)
        except DicomHeaderError:
            continue
        if _plausible_spacing(values, 1):
            return values[0]
    return None


def _read_file(path: Path, frame: int | None, with_pixels: bool) -> Image | ImageInfo:
    format_name = _file_format(path)
    dicom = _dicom_facts(path, _dicom_header(path), frame) if format_name == "DICOM" else None
    if format_name == "NIfTI":
        _checked_nifti_header(path)
    if format_name in ("NRRD", "MetaImage"):
        _check_text_header_has_spacing(path, format_name)
    io = _open_image_io(path, format_name)
    axes = io.GetNumberOfDimensions()
    components = io.GetNumberOfComponents()
    if components not in (1, 3, 4):
        raise ImageReadError(path, f"{components} components per pixel; expected 1 (grey), 3 (RGB) or 4 (RGBA)")
    modality = dicom.modality if dicom is not None else None
    geometry = _geometry(io, axes)

    # Frames: the last index axis of a multi-frame DICOM (3 axes) or of a 4D volume.
    if format_name == "DICOM":
        image_axes = 2
    elif axes in (2, 3):
        image_axes = axes
    elif axes == 4:
        image_axes = 3
    else:
        raise ImageReadError(path, f"{axes}D image; supported: 2D, 3D and 4D with a chosen frame")
    frames = int(np.prod(geometry.size[image_axes:])) if axes > image_axes else 1
    if axes > image_axes and frames > 1 and frame is None:
        raise ImageReadError(path, f"{frames} frames; choose one with frame=0..{frames - 1}")
    if frame is not None and frame >= frames:
        raise ImageReadError(path, f"frame={frame} requested but the image has {frames} frame(s)")
    geometry = _Geometry(
        size=geometry.size[:image_axes],
        spacing=geometry.spacing[:image_axes],
        origin=geometry.origin[:image_axes],
        direction=geometry.direction[:image_axes, :image_axes],
    )
    if dicom is not None:
        if (frames, *geometry.size[::-1]) != (dicom.frames, dicom.rows, dicom.columns):
            raise ImageReadError(path, "the DICOM decoder disagrees with the header about the image size")
        geometry.spacing = np.array(dicom.pixel_spacing[::-1], dtype=np.float64)
    _check_geometry(path, geometry, oriented=image_axes == 3)

    if not with_pixels:
        if image_axes == 2:
            return ImageInfo(tuple(int(n) for n in geometry.size[::-1]), _zyx(geometry.spacing), modality)
        shape, spacing = _canonical_grid(path, geometry)
        return ImageInfo(shape, spacing, modality)

    _check_data_complete(path, io, format_name)
    itk = _itk()
    reader = itk.ImageFileReader[itk.Image[itk.F, axes]].New()
    reader.SetImageIO(io)
    reader.SetFileName(str(path))
    try:
        reader.Update()
    except RuntimeError as error:
        raise ImageReadError(path, f"unreadable {format_name} pixel data: {_itk_reason(error)}") from None
    itk_buffer = itk.array_view_from_image(reader.GetOutput())
    voxels = itk_buffer
    if axes > image_axes:
        voxels = voxels.reshape((frames, *voxels.shape[axes - image_axes :]))[frame or 0]
    if voxels.shape != tuple(int(n) for n in geometry.size[::-1]):
        raise ImageReadError(path, f"decoded pixels of shape {voxels.shape} do not match the header")
    _check_pixels(path, voxels)
    if image_axes == 2:
        spacing = _zyx(geometry.spacing)
    else:
        voxels, spacing = _to_canonical(path, voxels, geometry)
    if np.shares_memory(voxels, itk_buffer):
        voxels = voxels.copy()  # the ITK buffer goes away with the reader
    return Image(torch.from_numpy(voxels), spacing, modality)


def _zyx(values_xyz: np.ndarray) -> tuple[float, ...]:
    return tuple(float(value) for value in values_xyz[::-1])


def _check_data_complete(path: Path, io, format_name: str) -> None:
    """Raise for truncated files that ITK would otherwise read without error (filling the rest)."""
    name = path.name.lower()
    if format_name == "NIfTI" and name.endswith((".nii", ".nii.gz")):
        header = _nifti1_header(path)
        axes = int(np.clip(header["dim"][0], 1, 7))
        voxels = int(np.prod(np.maximum(header["dim"][1 : axes + 1], 1)))
        expected = int(header["vox_offset"]) + voxels * header["bitpix"] // 8
        if name.endswith(".gz"):
            actual = _gzip_uncompressed_size(path, expected)
        else:
            actual = path.stat().st_size
        if actual < expected:
            raise ImageReadError(path, f"truncated NIfTI: {actual} bytes of data and header, {expected} expected")
    elif format_name == "JPEG":
        with open(path, "rb") as stream:
            stream.seek(max(0, path.stat().st_size - 4096))
            tail = stream.read()
        # Inside entropy-coded data 0xFF is always followed by 0x00 or a restart marker, so an end-of-image
        # marker near the end means the stream is complete.
        if b"\xff\xd9" not in tail:
            raise ImageReadError(path, "truncated JPEG: no end-of-image marker")


def _gzip_uncompressed_size(path: Path, expected: int) -> int:
    """Uncompressed size of a gzip file, or the size reached before the stream broke off.

    The trailer's ISIZE (size mod 2**32) settles the usual single-member file at once; anything else
    (multi-member files, sizes beyond 4 GiB, a truncated or corrupt stream) is decompressed in full.
    """
    with open(path, "rb") as stream:
        stream.seek(-4, os.SEEK_END)
        trailer_size = int.from_bytes(stream.read(4), "little")
    if trailer_size == expected and expected < 1 << 32:
        try:
            with gzip.open(path, "rb") as probe:
                probe.read(1)  # the trailer only counts if the file starts as a gzip stream
            return expected
        except (OSError, EOFError, zlib.error):
            return 0
    total = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(1 << 24):
                total += len(chunk)
    except (OSError, EOFError, zlib.error):
        return min(total, expected - 1)
    return total


def _oblique_grid(path: Path, geometry: _Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Identity-direction grid covering an oblique volume: (origin, spacing, size), all in ITK (x, y, z) order."""
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in geometry.size], indexing="ij")).reshape(3, -1)
    physical = geometry.origin[:, None] + geometry.direction @ (geometry.spacing[:, None] * corners)
    low, high = physical.min(axis=1), physical.max(axis=1)
    # Each physical axis keeps the spacing of the index axis that runs most nearly along it.
    spacing = geometry.spacing[np.argmax(np.abs(geometry.direction), axis=1)]
    size = np.floor((high - low) / spacing + 1e-6).astype(np.int64) + 1
    voxels, source_voxels = np.prod(size, dtype=np.float64), np.prod(geometry.size, dtype=np.float64)
    if voxels > min(_MAX_VOXELS, _MAX_RESAMPLE_GROWTH * source_voxels):
        raise ImageReadError(
            path,
            f"oblique volume of {int(source_voxels)} voxels would be resampled onto {int(voxels)} "
            f"(more than {_MAX_RESAMPLE_GROWTH} times as many): spacing too anisotropic for its orientation",
        )
    return low, spacing, size


def _canonical_grid(path: Path, geometry: _Geometry) -> tuple[tuple[int, ...], tuple[float, ...]]:
    permutation = signed_permutation(geometry.direction)
    if permutation is not None:
        source_axis, _ = permutation
        return tuple(int(n) for n in geometry.size[source_axis][::-1]), _zyx(geometry.spacing[source_axis])
    _, spacing, size = _oblique_grid(path, geometry)
    return tuple(int(n) for n in size[::-1]), _zyx(spacing)


def _to_canonical(path: Path, voxels: np.ndarray, geometry: _Geometry) -> tuple[np.ndarray, tuple[float, ...]]:
    """Reorient a (z, y, x) array to the identity direction: exact for signed permutations, resampled otherwise."""
    permutation = signed_permutation(geometry.direction)
    if permutation is not None:
        source_axis, signs = permutation
        # NumPy axis of ITK index axis i is 2 - i; new NumPy axis (2 - a) holds physical axis a.
        voxels = np.transpose(voxels, [2 - source_axis[axis] for axis in (2, 1, 0)])
        flips = [2 - axis for axis in range(3) if signs[axis] < 0]
        if flips:
            voxels = np.flip(voxels, axis=flips)
        return np.ascontiguousarray(voxels), _zyx(geometry.spacing[source_axis])
    return _resample_oblique(path, voxels, geometry)


def _resample_oblique(path: Path, voxels: np.ndarray, geometry: _Geometry) -> tuple[np.ndarray, tuple[float, ...]]:
    origin, spacing, size = _oblique_grid(path, geometry)
    physical_to_index = np.linalg.inv(geometry.direction @ np.diag(geometry.spacing))
    source = torch.from_numpy(np.ascontiguousarray(voxels))[None, None]
    # grid_sample pads with zeros; shifting by the minimum pads with the darkest value instead (air in CT).
    background = float(np.nanmin(voxels)) if np.isfinite(voxels).any() else 0.0
    source = source - background
    extent = torch.tensor([max(n - 1, 1) for n in geometry.size], dtype=torch.float64)
    output = np.empty(tuple(size[::-1]), dtype=np.float32)
    slice_voxels = int(size[0] * size[1])
    slices_per_chunk = max(1, _RESAMPLE_CHUNK_VOXELS // slice_voxels)
    y, x = torch.meshgrid(
        torch.arange(size[1], dtype=torch.float64), torch.arange(size[0], dtype=torch.float64), indexing="ij"
    )
    for z_start in range(0, int(size[2]), slices_per_chunk):
        z = torch.arange(z_start, min(z_start + slices_per_chunk, int(size[2])), dtype=torch.float64)
        grid_xyz = torch.stack(
            [
                x.expand(len(z), -1, -1) * spacing[0] + origin[0],
                y.expand(len(z), -1, -1) * spacing[1] + origin[1],
                z[:, None, None].expand(-1, *x.shape) * spacing[2] + origin[2],
            ],
            dim=-1,
        )
        index = (grid_xyz - torch.from_numpy(geometry.origin)) @ torch.from_numpy(physical_to_index).T
        normalised = (index / extent * 2 - 1).float()  # grid_sample wants (x, y, z) in [-1, 1]
        sampled = torch.nn.functional.grid_sample(
            source, normalised[None], mode="bilinear", padding_mode="zeros", align_corners=True
        )
        output[z_start : z_start + len(z)] = (sampled[0, 0] + background).numpy()
    return output, _zyx(spacing)


def _series_files(directory: Path) -> dict[str, list[tuple[Path, DicomHeader]]]:
    """The DICOM image files of a directory (not recursive) with their checked headers, by SeriesInstanceUID."""
    series: dict[str, list[tuple[Path, DicomHeader]]] = {}
    for path in sorted(directory.iterdir()):
        if not path.is_file():
            continue
        with open(path, "rb") as stream:
            prefix = stream.read(132)
        if not looks_like_dicom(prefix):
            continue
        try:
            header = read_dicom_header(path)
        except DicomHeaderError as error:
            if prefix[128:132] == b"DICM":
                raise ImageReadError(path, f"corrupt DICOM: {error}") from None
            continue  # no marker and no DICOM structure: some other file
        if not header.has_pixel_data:
            continue  # DICOMDIR, structured reports, presentation states
        uid = header.text(tags.SERIES_INSTANCE_UID)
        if uid is None:
            raise ImageReadError(path, "DICOM image without a SeriesInstanceUID")
        series.setdefault(uid, []).append((path, header))
    return series


@dataclass
class _Slice:
    path: Path
    geometry: _Geometry
    facts: _DicomFacts
    voxels: np.ndarray | None


def _read_dicom_slice(path: Path, header: DicomHeader, with_pixels: bool) -> _Slice:
    facts = _dicom_facts(path, header, None)
    if facts.frames != 1:
        raise ImageReadError(path, f"multi-frame DICOM ({facts.frames} frames) inside a series")
    itk = _itk()
    io = itk.GDCMImageIO.New()
    io.SetFileName(str(path))
    voxels = None
    try:
        if with_pixels:
            reader = itk.ImageFileReader[itk.Image[itk.F, 3]].New()
            reader.SetImageIO(io)
            reader.SetFileName(str(path))
            reader.Update()
            voxels = np.array(itk.array_view_from_image(reader.GetOutput()), dtype=np.float32)
        else:
            io.ReadImageInformation()
    except RuntimeError as error:
        raise ImageReadError(path, f"unreadable DICOM slice: {_itk_reason(error)}") from None
    geometry = _geometry(io, 3)
    if tuple(geometry.size) != (facts.columns, facts.rows, 1):
        raise ImageReadError(path, "the DICOM decoder disagrees with the header about the image size")
    # GDCM's spacing is replaced by the checked one; its third value is only a default for a lone slice.
    geometry.spacing = np.array([*facts.pixel_spacing[::-1], facts.slice_spacing or 1.0])
    _check_geometry(path, geometry, oriented=True)
    if voxels is not None:
        if voxels.shape != (1, facts.rows, facts.columns):
            raise ImageReadError(path, f"decoded pixels of shape {voxels.shape} do not match the header")
        _check_pixels(path, voxels)
    return _Slice(path, geometry, facts, None if voxels is None else voxels[0])


def _read_dicom_series(directory: Path, series_uid: str | None, with_pixels: bool) -> Image | ImageInfo:
    series = _series_files(directory)
    if not series:
        raise ImageReadError(directory, "directory holds no DICOM series")
    if series_uid is None:
        if len(series) > 1:
            raise ImageReadError(
                directory, f"{len(series)} DICOM series; choose one with series_uid= from: {', '.join(series)}"
            )
        series_uid = next(iter(series))
    elif series_uid not in series:
        raise ImageReadError(directory, f"no series {series_uid}; the directory holds: {', '.join(series)}")

    slices = [_read_dicom_slice(path, header, with_pixels) for path, header in series[series_uid]]
    first = slices[0]
    for other in slices[1:]:
        if not np.array_equal(other.geometry.size[:2], first.geometry.size[:2]):
            raise ImageReadError(directory, f"slices of different sizes in series {series_uid}")
        if not np.allclose(other.geometry.spacing[:2], first.geometry.spacing[:2], rtol=1e-4, atol=1e-6):
            raise ImageReadError(directory, f"slices with different pixel spacing in series {series_uid}")
        if np.max(np.abs(other.geometry.direction - first.geometry.direction)) > PERMUTATION_TOLERANCE:
            raise ImageReadError(directory, f"slices with different orientations in series {series_uid}")

    normal = first.geometry.direction[:, 2]
    positions = np.array([float(normal @ item.geometry.origin) for item in slices])
    order = np.argsort(positions, kind="stable")
    slices = [slices[i] for i in order]
    positions = positions[order]
    if len(slices) > 1:
        gaps = np.diff(positions)
        slice_spacing = float(np.median(gaps))
        if np.min(gaps) <= 0:
            raise ImageReadError(directory, f"several slices at the same position in series {series_uid}")
        if np.max(np.abs(gaps - slice_spacing)) > _SERIES_SPACING_TOLERANCE * slice_spacing:
            raise ImageReadError(
                directory,
                f"non-uniform slice spacing in series {series_uid} (gaps from {np.min(gaps):.4g} to "
                f"{np.max(gaps):.4g} mm: missing slices or mixed acquisitions)",
            )
        in_plane = first.geometry.direction[:, :2]
        offsets = np.array([(item.geometry.origin - slices[0].geometry.origin) @ in_plane for item in slices])
        if np.max(np.abs(offsets)) > _SERIES_SPACING_TOLERANCE * slice_spacing:
            raise ImageReadError(
                directory, f"slices of series {series_uid} are not stacked along their normal (tilted gantry?)"
            )
    elif first.facts.slice_spacing is not None:
        slice_spacing = first.facts.slice_spacing
    else:
        raise ImageReadError(
            directory,
            f"series {series_uid} has one slice without SpacingBetweenSlices or SliceThickness: its thickness is "
            "unknown (read the file itself for a 2D image)",
        )

    geometry = _Geometry(
        size=np.array([*first.geometry.size[:2], len(slices)], dtype=np.int64),
        spacing=np.array([*first.geometry.spacing[:2], slice_spacing]),
        origin=slices[0].geometry.origin,
        direction=first.geometry.direction,
    )
    _check_geometry(directory, geometry, oriented=True)
    if not with_pixels:
        shape, spacing = _canonical_grid(directory, geometry)
        return ImageInfo(shape, spacing, first.facts.modality)
    voxels, spacing = _to_canonical(directory, np.stack([item.voxels for item in slices]), geometry)
    return Image(torch.from_numpy(voxels), spacing, first.facts.modality)
