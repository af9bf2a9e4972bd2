"""mmv.data.io against real files shipped by pydicom and nibabel (oracles) and synthetic files written by ITK."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

itk = pytest.importorskip("itk")
pydicom = pytest.importorskip("pydicom")
nibabel = pytest.importorskip("nibabel")

from nibabel.testing import data_path as nibabel_data  # noqa: E402

from mmv.data import (  # noqa: E402
    ImageReadError,
    inspect_nifti_header,
    list_dicom_series,
    read_image,
    read_image_info,
)

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
DICOMDIR = PYDICOM_FILES / "dicomdirtests"
CT_SERIES = DICOMDIR / "98892001" / "CT5N"  # 5 axial CT slices, 2.5 mm apart, stored superior first
NIBABEL_FILES = Path(nibabel_data)

# ITK's SWIG bindings trigger these on Python 3.11+; they say nothing about this code.
pytestmark = pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning")


def rescaled(dataset) -> np.ndarray:
    return dataset.pixel_array.astype(np.float64) * float(dataset.get("RescaleSlope", 1)) + float(
        dataset.get("RescaleIntercept", 0)
    )


def nibabel_in_lps(image, frame=None) -> np.ndarray:
    """nibabel's voxels in the canonical orientation of the design: LPS, axes (z, y, x)."""
    canonical = nibabel.as_closest_canonical(image)  # RAS+: i toward right... (R), j anterior, k superior
    voxels = np.asarray(canonical.get_fdata(), dtype=np.float64)
    if frame is not None:
        voxels = voxels[..., frame]
    return np.transpose(voxels[::-1, ::-1, :], (2, 1, 0))  # RAS -> LPS flips i and j


# ------------------------------------------------------------------------------------------------
# DICOM files from pydicom


def test_single_ct_slice_is_in_hounsfield_units_with_spacing():
    path = PYDICOM_FILES / "CT_small.dcm"
    oracle = pydicom.dcmread(path)
    image = read_image(path)
    assert image.shape == oracle.pixel_array.shape
    assert image.pixels.dtype.is_floating_point and image.pixels.dtype.itemsize == 4
    np.testing.assert_array_equal(image.pixels.numpy(), rescaled(oracle))
    assert image.spacing == pytest.approx([float(v) for v in oracle.PixelSpacing])
    assert image.modality == "CT"
    assert image.pixels.min() < -800  # air in HU: the intercept (-1024) was applied


def test_monochrome1_radiograph_is_inverted_once():
    path = DICOMDIR / "77654033" / "CR1" / "6154"
    oracle = pydicom.dcmread(path)
    assert oracle.PhotometricInterpretation == "MONOCHROME1"
    raw = oracle.pixel_array.astype(np.float64)
    image = read_image(path).pixels.numpy().astype(np.float64)
    # Inverted within the stored bit range, then rescaled: bright where MONOCHROME1 stored low values.
    expected = ((2**oracle.BitsStored - 1) - raw) * float(oracle.RescaleSlope) + float(oracle.RescaleIntercept)
    np.testing.assert_allclose(image, expected, rtol=1e-6)
    assert np.corrcoef(image.ravel(), raw.ravel())[0, 1] < -0.999


def test_ct_series_matches_pydicom_sorted_by_position():
    files = sorted(CT_SERIES.iterdir())
    slices = [pydicom.dcmread(f) for f in files]
    slices.sort(key=lambda s: float(s.ImagePositionPatient[2]))  # identity orientation: z up = superior
    oracle = np.stack([rescaled(s) for s in slices])
    image = read_image(CT_SERIES)
    assert image.shape == oracle.shape == (5, 16, 16)
    np.testing.assert_array_equal(image.pixels.numpy(), oracle)
    assert image.spacing == pytest.approx((2.5, 0.488281, 0.488281))
    assert image.modality == "CT"
    info = read_image_info(CT_SERIES)
    assert info.shape == image.shape and info.spacing == pytest.approx(image.spacing)


def test_directory_with_several_series_lists_them_and_reads_the_chosen_one():
    directory = DICOMDIR / "98892003" / "MR2"
    uids = list_dicom_series(directory)
    assert len(uids) == 3
    with pytest.raises(ImageReadError) as error:
        read_image(directory)
    assert all(uid in str(error.value) for uid in uids)
    assert error.value.path == str(directory)
    single = next(uid for uid in uids if uid.endswith(".481"))
    oracle = pydicom.dcmread(directory / "15970")
    image = read_image(directory, series_uid=single)
    # A sagittal slice, columns toward posterior and rows toward inferior: one voxel thick in x, rows flipped
    # so that z runs toward superior.
    assert image.shape == (16, 16, 1)
    np.testing.assert_array_equal(image.pixels.numpy()[:, :, 0], oracle.pixel_array[::-1, :].astype(np.float64))
    # One slice: its thickness is the header's SliceThickness, not a default.
    assert image.spacing == pytest.approx((*[float(v) for v in oracle.PixelSpacing], float(oracle.SliceThickness)))
    with pytest.raises(ImageReadError, match="no series"):
        read_image(directory, series_uid="1.2.3")


def test_series_with_mixed_orientations_raises():
    directory = DICOMDIR / "98892003" / "MR2"
    mixed = next(uid for uid in list_dicom_series(directory) if uid.endswith(".136"))
    with pytest.raises(ImageReadError, match="orientation"):
        read_image(directory, series_uid=mixed)


def test_series_with_missing_slices_raises():
    with pytest.raises(ImageReadError, match="non-uniform slice spacing"):
        read_image(DICOMDIR / "77654033" / "CT2")


def test_multiframe_dicom_needs_a_frame():
    path = PYDICOM_FILES / "rtdose.dcm"
    with pytest.raises(ImageReadError, match="15 frames"):
        read_image(path)
    oracle = pydicom.dcmread(path).pixel_array
    np.testing.assert_array_equal(read_image(path, frame=3).pixels.numpy(), oracle[3].astype(np.float32))
    with pytest.raises(ImageReadError, match="frame=15"):
        read_image(path, frame=15)


def test_no_patient_identifier_leaves_the_reader(tmp_path):
    source = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    identifiers = [str(source.PatientName), str(source.PatientID)]
    image = read_image(PYDICOM_FILES / "CT_small.dcm")
    assert set(vars(image)) == {"pixels", "spacing", "modality"}
    for name in os.listdir(CT_SERIES):
        shutil.copy(CT_SERIES / name, tmp_path / name)
    shutil.copy(PYDICOM_FILES / "CT_small.dcm", tmp_path / "ct_small")
    with pytest.raises(ImageReadError) as error:
        read_image(tmp_path)
    for identifier in identifiers + [str(pydicom.dcmread(CT_SERIES / "2062").PatientName)]:
        assert identifier not in str(error.value)


# ------------------------------------------------------------------------------------------------
# NIfTI files from nibabel


@pytest.mark.parametrize("name", ["anatomical.nii", "reoriented_anat_moved.nii", "resampled_anat_moved.nii"])
def test_nifti_matches_nibabel_in_lps(name):
    path = NIBABEL_FILES / name
    oracle_image = nibabel.load(path)
    image = read_image(path)
    # ITK's NIfTI library turns NaN voxels of float files into 0 (resampled_anat_moved.nii has some).
    oracle = np.nan_to_num(nibabel_in_lps(oracle_image), nan=0.0)
    assert image.shape == oracle.shape
    np.testing.assert_allclose(image.pixels.numpy(), oracle, rtol=1e-6)
    zooms = nibabel.as_closest_canonical(oracle_image).header.get_zooms()[:3]
    assert image.spacing == pytest.approx(tuple(float(z) for z in zooms[::-1]))


def test_4d_nifti_needs_a_frame_and_matches_nibabel():
    path = NIBABEL_FILES / "functional.nii"
    with pytest.raises(ImageReadError, match="20 frames"):
        read_image(path)
    image = read_image(path, frame=7)
    np.testing.assert_allclose(image.pixels.numpy(), nibabel_in_lps(nibabel.load(path), frame=7), rtol=1e-6)
    assert image.spacing == pytest.approx((8.0, 4.0, 4.0))


def trilinear(volume_ijk: np.ndarray, index: np.ndarray) -> float:
    base = np.floor(index).astype(int)
    fraction = index - base
    total = 0.0
    for corner in np.ndindex(2, 2, 2):
        weight = np.prod([f if c else 1 - f for c, f in zip(corner, fraction)])
        total += weight * volume_ijk[tuple(base + np.array(corner))]
    return total


def test_oblique_nifti_is_resampled_onto_the_lps_grid():
    path = NIBABEL_FILES / "example4d.nii.gz"
    source = nibabel.load(path)
    voxels = np.asarray(source.dataobj)[..., 1].astype(np.float64)
    affine = source.affine.copy()  # voxel (i, j, k) -> RAS mm
    image = read_image(path, frame=1)
    spacing_zyx = np.array(image.spacing)
    # The output grid starts at the low corner of the volume's bounding box in LPS.
    corners = np.array(list(np.ndindex(2, 2, 2))) * (np.array(voxels.shape[:3]) - 1)
    lps_corners = (affine[:3, :3] @ corners.T + affine[:3, 3:]).T * np.array([-1, -1, 1])
    low = lps_corners.min(axis=0)
    to_index = np.linalg.inv(affine)
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(400):
        k, j, i = (rng.integers(0, n) for n in image.shape)
        lps = low + np.array([i, j, k]) * spacing_zyx[::-1]
        index = (to_index @ np.array([-lps[0], -lps[1], lps[2], 1.0]))[:3]
        if np.any(index < 0) or np.any(index > np.array(voxels.shape) - 1.001):
            continue
        assert float(image.pixels[k, j, i]) == pytest.approx(trilinear(voxels, index), rel=1e-4, abs=1e-2)
        checked += 1
    assert checked > 50


# ------------------------------------------------------------------------------------------------
# Synthetic files written with ITK


def physical_ramp(size_xyz, spacing_xyz, origin, direction) -> np.ndarray:
    """Voxels (z, y, x) whose value is x + 10 y + 100 z of the voxel's LPS position (mm)."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in size_xyz], indexing="ij"), axis=-1).astype(np.float64)
    physical = origin + (index * spacing_xyz) @ np.asarray(direction).T
    values = physical[..., 0] + 10 * physical[..., 1] + 100 * physical[..., 2]
    return np.transpose(values, (2, 1, 0)).astype(np.float32)


def write_itk_volume(path, voxels_zyx, spacing_xyz, origin, direction):
    image = itk.image_from_array(np.ascontiguousarray(voxels_zyx))
    image.SetSpacing([float(s) for s in spacing_xyz])
    image.SetOrigin([float(o) for o in origin])
    image.SetDirection(itk.matrix_from_array(np.asarray(direction, dtype=np.float64)))
    itk.imwrite(image, str(path))


# Coronal acquisition: index x runs toward the patient's right, y toward inferior, z toward anterior.
CORONAL = np.array([[-1.0, 0, 0], [0, 0, -1.0], [0, -1.0, 0]])


@pytest.fixture(scope="session")
def synthetic_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic_images")
    size, spacing, origin = (6, 5, 4), np.array([0.5, 0.8, 2.0]), np.array([10.0, -20.0, 30.0])
    ramp = physical_ramp(size, spacing, origin, CORONAL)
    files = {}
    for extension in ("nii", "nii.gz", "nrrd", "mha", "mhd"):
        files[extension] = root / f"coronal.{extension}"
        write_itk_volume(files[extension], ramp, spacing, origin, CORONAL)
    angle = np.deg2rad(20)
    oblique = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1.0]])
    files["oblique"] = root / "oblique.nrrd"
    oblique_ramp = physical_ramp((12, 10, 5), np.ones(3), origin, oblique)
    write_itk_volume(files["oblique"], oblique_ramp, np.ones(3), origin, oblique)
    grey = (np.arange(30 * 40).reshape(30, 40) % 251).astype(np.uint8)
    files["png"] = root / "grey.png"
    itk.imwrite(itk.image_from_array(grey), str(files["png"]))
    files["grey"] = grey
    rgb = np.zeros((8, 9, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    files["rgb"] = root / "rgb.png"
    itk.imwrite(itk.image_from_array(rgb, is_vector=True), str(files["rgb"]))
    files["jpg"] = root / "grey.jpg"
    itk.imwrite(itk.image_from_array(grey), str(files["jpg"]))
    files["spacing"] = spacing
    return files


@pytest.mark.parametrize("extension", ["nii", "nii.gz", "nrrd", "mha", "mhd"])
def test_signed_permutation_is_reoriented_exactly_to_lps(synthetic_files, extension):
    image = read_image(synthetic_files[extension])
    spacing = synthetic_files["spacing"]
    # Physical x comes from index x (flipped), y from index z, z from index y (flipped).
    assert image.shape == (5, 4, 6)
    assert image.spacing == pytest.approx((spacing[1], spacing[2], spacing[0]))
    pixels = image.pixels.numpy().astype(np.float64)
    k, j, i = np.meshgrid(*[np.arange(n) for n in image.shape], indexing="ij")
    expected = pixels[0, 0, 0] + i * image.spacing[2] + 10 * j * image.spacing[1] + 100 * k * image.spacing[0]
    np.testing.assert_allclose(pixels, expected, rtol=1e-5, atol=1e-3)
    info = read_image_info(synthetic_files[extension])
    assert info.shape == image.shape and info.spacing == pytest.approx(image.spacing)


def test_oblique_volume_is_resampled_with_linear_values_preserved(synthetic_files):
    image = read_image(synthetic_files["oblique"])
    assert read_image_info(synthetic_files["oblique"]).shape == image.shape
    pixels = image.pixels.numpy().astype(np.float64)
    # Inside the rotated volume the ramp is linear in LPS position, so trilinear resampling is exact there:
    # neighbours one voxel apart along x differ by exactly the x spacing.
    step_x = np.diff(pixels, axis=2)
    interior = (pixels[:, :, 1:] > pixels.min() + 1) & (pixels[:, :, :-1] > pixels.min() + 1)
    inside = step_x[interior]
    assert inside.size > 20
    assert np.median(inside) == pytest.approx(image.spacing[2], abs=1e-3)


def test_png_and_jpeg_are_2d(synthetic_files):
    image = read_image(synthetic_files["png"])
    assert image.shape == (30, 40) and image.spacing == (1.0, 1.0) and image.modality is None
    np.testing.assert_array_equal(image.pixels.numpy(), synthetic_files["grey"].astype(np.float32))
    jpeg = read_image(synthetic_files["jpg"])
    assert jpeg.shape == (30, 40)
    assert np.abs(jpeg.pixels.numpy() - synthetic_files["grey"]).mean() < 20  # lossy, but the same picture


def test_rgb_becomes_luminance(synthetic_files):
    image = read_image(synthetic_files["rgb"])
    assert image.shape == (8, 9)
    value = float(image.pixels[0, 0])
    assert 50 < value < 200  # a weighted mean of the channels
    assert np.all(image.pixels.numpy() == value)


def test_nifti_header_facts(synthetic_files, tmp_path):
    facts = inspect_nifti_header(synthetic_files["nii.gz"])
    assert facts.has_spacing and not facts.has_intensity_scaling  # ITK writes the identity scaling
    blank = tmp_path / "blank.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.zeros((4, 5, 6), dtype=np.int16), np.eye(4)), blank)
    facts = inspect_nifti_header(blank)
    assert not facts.has_spacing and not facts.has_intensity_scaling
    scaled = nibabel.Nifti1Image(np.zeros((4, 5, 6), dtype=np.int16), np.diag([0.7, 0.7, 1.5, 1.0]))
    scaled.header.set_slope_inter(1.0, -1024.0)
    nibabel.save(scaled, tmp_path / "scaled.nii")
    facts = inspect_nifti_header(tmp_path / "scaled.nii")
    assert facts.has_spacing and facts.has_intensity_scaling
    with pytest.raises(ImageReadError, match="not a NIfTI"):
        inspect_nifti_header(synthetic_files["png"])


# ------------------------------------------------------------------------------------------------
# Failures


def truncated_copy(source: Path, target: Path, fraction: float) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * fraction)])
    return target


@pytest.mark.parametrize("extension", ["nii", "nii.gz", "nrrd", "mha", "png", "jpg"])
def test_truncated_files_raise(synthetic_files, tmp_path, extension):
    source = synthetic_files[extension]
    broken = truncated_copy(source, tmp_path / f"broken.{extension}", 0.7)
    with pytest.raises(ImageReadError) as error:
        read_image(broken)
    assert error.value.path == str(broken)


def test_truncated_gzip_with_plausible_trailer_raises(synthetic_files, tmp_path):
    original = gzip.decompress(synthetic_files["nii.gz"].read_bytes())
    broken = tmp_path / "short.nii.gz"
    broken.write_bytes(gzip.compress(original[: len(original) - 10]))
    with pytest.raises(ImageReadError, match="truncated NIfTI"):
        read_image(broken)


def written(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda d: d / "missing.nii", "no such file"),
        (lambda d: written(d / "empty.dcm", b""), "empty"),
        (lambda d: written(d / "noise.dcm", np.random.default_rng(0).bytes(4096)), "no image reader"),
        (lambda d: written(d / "notes.txt", b"not an image"), "no image reader"),
        (lambda d: written(d / "short.nii", b"\x5c\x01\x00\x00" + bytes(100)), "unsupported or corrupt|NIfTI"),
        (lambda d: PYDICOM_FILES / "MR_truncated.dcm", "truncated pixel data"),
        (lambda d: NIBABEL_FILES / "T1.PAR", "no image reader"),
        (lambda d: NIBABEL_FILES / "tiny.mnc", "unsupported format"),
        (lambda d: d, "no DICOM series"),
    ],
    ids=["missing", "empty", "noise", "text", "short-nifti", "truncated-dicom", "par-rec", "minc", "no-dicom-dir"],
)
def test_unreadable_inputs_raise_with_path_and_reason(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(ImageReadError, match=reason) as error:
        read_image(path)
    assert error.value.path == str(path)
    assert str(path) in str(error.value)


def test_bad_arguments_raise():
    with pytest.raises(TypeError, match="path"):
        read_image(3)
    with pytest.raises(ValueError, match="frame"):
        read_image(PYDICOM_FILES / "CT_small.dcm", frame=-1)
    with pytest.raises(ImageReadError, match="series_uid"):
        read_image(PYDICOM_FILES / "CT_small.dcm", series_uid="1.2")


def test_importing_mmv_data_does_not_import_itk():
    code = "import sys, mmv, mmv.data; assert 'itk' not in sys.modules, 'itk imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
