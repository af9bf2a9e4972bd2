"""Reading medical image files with ITK into :class:`mmv.Image`.

This module is the only place where ITK's (x, y, z) index order and its direction matrices exist: every
function here returns arrays, shapes and spacings in (z, y, x) order, and every 3D volume in the
canonical LPS orientation of the design (identity direction: x toward the patient's left, y toward
posterior, z toward superior). ITK is imported on first use, never at import time.

Only geometry and the modality are taken from headers; ITK's DICOM reader (GDCM) already applies the
rescale slope/intercept and turns MONOCHROME1 into MONOCHROME2, so neither is done a second time here.
Patient identifiers are never copied into results, errors or logs.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmv.image import Image

__all__ = [
    "ImageReadError",
    "ImageInfo",
    "NiftiHeaderFacts",
    "read_image",
    "read_image_info",
    "list_dicom_series",
    "inspect_nifti_header",
]

# ITK image readers this module accepts, by ITK class name. Anything else ITK happens to read
# (TIFF, MINC, VTK, ...) is refused so that behaviour is defined only for tested formats.
_SUPPORTED_READERS = {
    "GDCMImageIO": "DICOM",
    "NiftiImageIO": "NIfTI",
    "NrrdImageIO": "NRRD",
    "MetaImageIO": "MetaImage",
    "PNGImageIO": "PNG",
    "JPEGImageIO": "JPEG",
}

# A direction matrix closer than this to a signed permutation is treated as one: DICOM stores
# orientation cosines with ~6 decimals, and 1e-4 rad moves a voxel 200 mm away by 0.02 mm.
_PERMUTATION_TOLERANCE = 1e-4
# Relative tolerance on slice-to-slice distance and in-plane offsets within a DICOM series.
_SERIES_SPACING_TOLERANCE = 0.01
# Voxels of an oblique volume resampled per grid_sample call, to bound the memory of the sample grid.
_RESAMPLE_CHUNK_VOXELS = 1 << 22

_DICOM_MODALITY = "0008|0060"


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


@functools.cache
def _itk():
    import itk  # heavy (hundreds of MB): imported only when a file is actually read

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
      turns NaN voxels of floating-point NIfTI files into 0. Radiographs stored
      as MONOCHROME1 come out like MONOCHROME2 (dense tissue bright). Colour images become luminance.
    - A single DICOM file, PNG and JPEG give a 2D image ``[H, W]`` in stored row/column order; a DICOM
      series and 3D NIfTI/NRRD/MetaImage files give a volume ``[D, H, W]`` in canonical LPS orientation,
      by permuting and flipping axes when the direction is a signed permutation and by trilinear
      resampling otherwise. Spacing is in millimetres, in (z, y, x) order.

    Args:
        path: a file, or a directory holding DICOM files (not searched recursively).
        series_uid: which series to read when the directory holds several.
        frame: which frame of a multi-frame DICOM file or a 4D volume to read; such files raise without it.

    Raises:
        ImageReadError: for any file that cannot be read (missing, empty, truncated, corrupt, unsupported,
            several series without ``series_uid``, inconsistent slices, frames without ``frame``), with the
            path and the reason.
    """
    path = _checked_path(path, series_uid, frame)
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
    if path.is_dir():
        return _read_dicom_series(path, series_uid, with_pixels=False)
    return _read_file(path, frame, with_pixels=False)


def list_dicom_series(directory: str | os.PathLike) -> tuple[str, ...]:
    """SeriesInstanceUIDs of the DICOM series in ``directory`` (not searched recursively).

    Raises:
        ImageReadError: when ``directory`` is not a directory.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ImageReadError(directory, "not a directory")
    return tuple(_series_file_names(directory))


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


def _open_image_io(path: Path):
    itk = _itk()
    io = itk.ImageIOFactory.CreateImageIO(str(path), itk.CommonEnums.IOFileMode_ReadMode)
    if io is None:
        raise ImageReadError(path, "unsupported or corrupt file: no image reader recognises it")
    name = io.GetNameOfClass()
    if name not in _SUPPORTED_READERS:
        raise ImageReadError(
            path, f"unsupported format ({name}); supported: {', '.join(sorted(set(_SUPPORTED_READERS.values())))}"
        )
    io.SetFileName(str(path))
    try:
        io.ReadImageInformation()
    except RuntimeError as error:
        raise ImageReadError(path, f"unreadable {_SUPPORTED_READERS[name]} header: {_itk_reason(error)}") from None
    return io


def _itk_reason(error: Exception) -> str:
    """The last line of an ITK exception: the part that says what went wrong, without source locations."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _header_text(header, key: str) -> str | None:
    if not header.HasKey(key):
        return None
    text = str(header[key]).strip()
    return text or None


def _geometry(io, axes: int) -> _Geometry:
    return _Geometry(
        size=np.array([io.GetDimensions(axis) for axis in range(axes)], dtype=np.int64),
        spacing=np.array([io.GetSpacing(axis) for axis in range(axes)], dtype=np.float64),
        origin=np.array([io.GetOrigin(axis) for axis in range(axes)], dtype=np.float64),
        direction=np.array([io.GetDirection(axis)[:axes] for axis in range(axes)], dtype=np.float64).T,
    )


def _read_file(path: Path, frame: int | None, with_pixels: bool) -> Image | ImageInfo:
    io = _open_image_io(path)
    format_name = _SUPPORTED_READERS[io.GetNameOfClass()]
    axes = io.GetNumberOfDimensions()
    components = io.GetNumberOfComponents()
    if components not in (1, 3, 4):
        raise ImageReadError(path, f"{components} components per pixel; expected 1 (grey), 3 (RGB) or 4 (RGBA)")
    header = io.GetMetaDataDictionary()
    modality = _header_text(header, _DICOM_MODALITY) if format_name == "DICOM" else None
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

    if not with_pixels:
        if image_axes == 2:
            return ImageInfo(tuple(int(n) for n in geometry.size[::-1]), _zyx(geometry.spacing), modality)
        shape, spacing = _canonical_grid(geometry)
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
    if image_axes == 2:
        spacing = _zyx(geometry.spacing)
    else:
        voxels, spacing = _to_canonical(voxels, geometry)
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


def _signed_permutation(direction: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """For a direction matrix that is a signed permutation: (index axis along each physical axis, sign)."""
    source_axis = np.argmax(np.abs(direction), axis=1)
    if len(set(source_axis.tolist())) != direction.shape[0]:
        return None
    signs = np.sign(direction[np.arange(direction.shape[0]), source_axis])
    permutation = np.zeros_like(direction)
    permutation[np.arange(direction.shape[0]), source_axis] = signs
    if np.max(np.abs(direction - permutation)) > _PERMUTATION_TOLERANCE:
        return None
    return source_axis, signs


def _oblique_grid(geometry: _Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Identity-direction grid covering an oblique volume: (origin, spacing, size), all in ITK (x, y, z) order."""
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in geometry.size], indexing="ij")).reshape(3, -1)
    physical = geometry.origin[:, None] + geometry.direction @ (geometry.spacing[:, None] * corners)
    low, high = physical.min(axis=1), physical.max(axis=1)
    # Each physical axis keeps the spacing of the index axis that runs most nearly along it.
    spacing = geometry.spacing[np.argmax(np.abs(geometry.direction), axis=1)]
    size = np.floor((high - low) / spacing + 1e-6).astype(np.int64) + 1
    return low, spacing, size


def _canonical_grid(geometry: _Geometry) -> tuple[tuple[int, ...], tuple[float, ...]]:
    permutation = _signed_permutation(geometry.direction)
    if permutation is not None:
        source_axis, _ = permutation
        return tuple(int(n) for n in geometry.size[source_axis][::-1]), _zyx(geometry.spacing[source_axis])
    _, spacing, size = _oblique_grid(geometry)
    return tuple(int(n) for n in size[::-1]), _zyx(spacing)


def _to_canonical(voxels: np.ndarray, geometry: _Geometry) -> tuple[np.ndarray, tuple[float, ...]]:
    """Reorient a (z, y, x) array to the identity direction: exact for signed permutations, resampled otherwise."""
    permutation = _signed_permutation(geometry.direction)
    if permutation is not None:
        source_axis, signs = permutation
        # NumPy axis of ITK index axis i is 2 - i; new NumPy axis (2 - a) holds physical axis a.
        voxels = np.transpose(voxels, [2 - source_axis[axis] for axis in (2, 1, 0)])
        flips = [2 - axis for axis in range(3) if signs[axis] < 0]
        if flips:
            voxels = np.flip(voxels, axis=flips)
        return np.ascontiguousarray(voxels), _zyx(geometry.spacing[source_axis])
    return _resample_oblique(voxels, geometry)


def _resample_oblique(voxels: np.ndarray, geometry: _Geometry) -> tuple[np.ndarray, tuple[float, ...]]:
    origin, spacing, size = _oblique_grid(geometry)
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


def _series_file_names(directory: Path) -> dict[str, tuple[str, ...]]:
    itk = _itk()
    names = itk.GDCMSeriesFileNames.New()
    # Group by SeriesInstanceUID alone: splitting on orientation or size would hide inconsistent series.
    names.SetUseSeriesDetails(False)
    names.SetDirectory(str(directory))
    return {str(uid): tuple(names.GetFileNames(uid)) for uid in names.GetSeriesUIDs()}


@dataclass
class _Slice:
    path: Path
    geometry: _Geometry
    modality: str | None
    voxels: np.ndarray | None


def _read_dicom_slice(path: Path, with_pixels: bool) -> _Slice:
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
    if geometry.size[2] != 1:
        raise ImageReadError(path, f"multi-frame DICOM ({geometry.size[2]} frames) inside a series")
    header = io.GetMetaDataDictionary()
    return _Slice(
        path,
        geometry,
        _header_text(header, _DICOM_MODALITY),
        None if voxels is None else voxels[0],
    )


def _read_dicom_series(directory: Path, series_uid: str | None, with_pixels: bool) -> Image | ImageInfo:
    series = _series_file_names(directory)
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

    slices = [_read_dicom_slice(Path(name), with_pixels) for name in series[series_uid]]
    first = slices[0]
    for other in slices[1:]:
        if not np.array_equal(other.geometry.size[:2], first.geometry.size[:2]):
            raise ImageReadError(directory, f"slices of different sizes in series {series_uid}")
        if not np.allclose(other.geometry.spacing[:2], first.geometry.spacing[:2], rtol=1e-4, atol=1e-6):
            raise ImageReadError(directory, f"slices with different pixel spacing in series {series_uid}")
        if np.max(np.abs(other.geometry.direction - first.geometry.direction)) > _PERMUTATION_TOLERANCE:
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
    else:
        slice_spacing = float(first.geometry.spacing[2])

    geometry = _Geometry(
        size=np.array([*first.geometry.size[:2], len(slices)], dtype=np.int64),
        spacing=np.array([*first.geometry.spacing[:2], slice_spacing]),
        origin=slices[0].geometry.origin,
        direction=first.geometry.direction,
    )
    if not with_pixels:
        shape, spacing = _canonical_grid(geometry)
        return ImageInfo(shape, spacing, first.modality)
    voxels, spacing = _to_canonical(np.stack([item.voxels for item in slices]), geometry)
    return Image(torch.from_numpy(voxels), spacing, first.modality)
