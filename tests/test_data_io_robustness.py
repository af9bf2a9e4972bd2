"""mmv.data's readers on hostile and inconsistent files: every failure an ImageReadError naming the file,
never a crash, an invented spacing or a non-finite pixel. Files are real ones from pydicom, pydicom-data and
nibabel, edited at test time."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("itk")
pydicom = pytest.importorskip("pydicom")
nibabel = pytest.importorskip("nibabel")

from nibabel.testing import data_path as nibabel_data  # noqa: E402
from pydicom.datadict import dictionary_VR, tag_for_keyword  # noqa: E402
from pydicom.dataelem import RawDataElement  # noqa: E402
from pydicom.tag import Tag  # noqa: E402

from mmv.data import ImageReadError, read_image, read_image_info  # noqa: E402
from mmv.data.io import SPACING_RANGE_MM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
CT_SMALL = PYDICOM_FILES / "CT_small.dcm"
CT_SERIES = PYDICOM_FILES / "dicomdirtests" / "98892001" / "CT5N"
RADIOGRAPH = PYDICOM_FILES / "dicomdirtests" / "77654033" / "CR1" / "6154"  # ImagerPixelSpacing only
NIBABEL_FILES = Path(nibabel_data)

pytestmark = pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning")


def edited_dicom(source: Path, target: Path, **changes) -> Path:
    """A copy of ``source`` with header elements set by keyword; a str is written verbatim as the element's
    value (even one that is no valid decimal or integer string), None deletes the element."""
    dataset = pydicom.dcmread(source)
    for keyword, value in changes.items():
        if value is None:
            if keyword in dataset:
                delattr(dataset, keyword)
        elif isinstance(value, str):
            tag = Tag(tag_for_keyword(keyword))
            raw = value.encode() + b" " * (len(value) % 2)
            dataset[tag] = RawDataElement(tag, dictionary_VR(tag), len(raw), raw, 0, False, True)
        else:
            setattr(dataset, keyword, value)
    dataset.save_as(target)
    return target


def read_in_subprocess(code: str, *args: str, warnings_as_errors: bool = False) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter: a reader that aborts the process fails the test instead of ending it."""
    flags = ["-W", "error"] if warnings_as_errors else []
    return subprocess.run(
        [sys.executable, *flags, "-c", textwrap.dedent(code), *args], cwd=ROOT, capture_output=True, text=True
    )


def assert_unreadable(path: Path, reason: str) -> None:
    for read in (read_image, read_image_info):
        with pytest.raises(ImageReadError, match=reason) as error:
            read(path)
        assert error.value.path == str(path)


# ------------------------------------------------------------------------------------------------
# Issue 17.1: a DICOM header must not abort the process


REPORT_READ = """
    import sys
    from mmv.data import ImageReadError, list_dicom_series, read_image, read_image_info
    path = sys.argv[1]
    for read in (read_image_info, read_image, list_dicom_series):
        try:
            read(path)
            print(read.__name__, "returned")
        except ImageReadError as error:
            named = error.path == path or error.path.startswith(path + "/")
            print(read.__name__, "ImageReadError", named, error.reason)
"""


def test_palette_color_ct_raises_instead_of_aborting(tmp_path):
    palette = edited_dicom(CT_SMALL, tmp_path / "palette.dcm", PhotometricInterpretation="PALETTE COLOR")
    result = read_in_subprocess(REPORT_READ, str(palette))
    assert result.returncode == 0, f"the reader killed the process ({result.returncode}): {result.stderr[-2000:]}"
    lines = result.stdout.splitlines()
    assert lines[0].startswith("read_image_info ImageReadError True unsupported DICOM PhotometricInterpretation")
    assert lines[1].startswith("read_image ImageReadError True unsupported DICOM PhotometricInterpretation")
    assert lines[2].startswith("list_dicom_series ImageReadError True not a directory")


def test_palette_color_slice_in_a_series_directory_raises_instead_of_aborting(tmp_path):
    series = tmp_path / "series"
    shutil.copytree(CT_SERIES, series)
    first = sorted(series.iterdir())[0]
    edited_dicom(first, first, PhotometricInterpretation="PALETTE COLOR")
    result = read_in_subprocess(REPORT_READ, str(series))
    assert result.returncode == 0, f"the reader killed the process ({result.returncode}): {result.stderr[-2000:]}"
    lines = result.stdout.splitlines()
    assert lines[0].startswith("read_image_info ImageReadError True unsupported DICOM PhotometricInterpretation")
    assert lines[1].startswith("read_image ImageReadError True unsupported DICOM PhotometricInterpretation")
    assert lines[2] == "list_dicom_series returned"  # listing reads no pixel format


def test_unreadable_file_is_skipped_by_a_dataset(tmp_path):
    bad = edited_dicom(CT_SMALL, tmp_path / "palette.dcm", PhotometricInterpretation="PALETTE COLOR")
    nan_spacing = edited_dicom(CT_SMALL, tmp_path / "nan.dcm", PixelSpacing="nan\\nan")
    shutil.copy(CT_SMALL, tmp_path / "good.dcm")
    (tmp_path / "manifest.csv").write_text(
        f"path,modality,finding\n{bad.name},CT,1\n{nan_spacing.name},CT,0\ngood.dcm,CT,1\n"
    )
    code = """
        import sys
        from mmv.data import Manifest
        dataset = Manifest(sys.argv[1], on_error="skip")
        samples = [dataset[index] for index in range(len(dataset))]
        print([None if sample is None else tuple(sample.image.shape) for sample in samples], dataset.skipped)
    """
    result = read_in_subprocess(code, str(tmp_path / "manifest.csv"))
    assert result.returncode == 0, f"the reader killed the process ({result.returncode}): {result.stderr[-2000:]}"
    assert result.stdout.strip() == "[None, None, (128, 128)] 2"


# ------------------------------------------------------------------------------------------------
# Issue 17.2: pixel data shorter than the header says


def test_short_pixel_data_raises(tmp_path):
    dataset = pydicom.dcmread(CT_SMALL)
    dataset.PixelData = dataset.PixelData[: len(dataset.PixelData) // 2]
    dataset.save_as(tmp_path / "short.dcm")
    assert_unreadable(tmp_path / "short.dcm", "short DICOM pixel data: 16384 bytes where .* need 32768")


@pytest.mark.parametrize("field", ["Rows", "Columns"])
def test_rows_or_columns_beyond_the_pixel_data_raise(tmp_path, field):
    path = edited_dicom(CT_SMALL, tmp_path / "large.dcm", **{field: 256})
    assert_unreadable(path, "short DICOM pixel data")


def test_truncated_slice_in_a_series_names_the_slice(tmp_path):
    series = tmp_path / "series"
    shutil.copytree(CT_SERIES, series)
    victim = sorted(series.iterdir())[2]
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(ImageReadError, match="truncated pixel data") as error:
        read_image(series)
    assert error.value.path == str(victim)


# ------------------------------------------------------------------------------------------------
# Issue 17.3: only ImageReadError leaves a reader


def nifti_with(tmp_path: Path, name: str, **fields) -> Path:
    """anatomical.nii (2 mm voxels) with NIfTI-1 header fields overwritten in the file's byte order."""
    offsets = {
        "pixdim1": (80, "f"), "pixdim2": (84, "f"), "scl_slope": (112, "f"), "scl_inter": (116, "f"),
        "quatern_b": (256, "f"), "qoffset_x": (268, "f"), "srow_x0": (280, "f"), "vox_offset": (108, "f"),
        "dim1": (42, "h"), "bitpix": (72, "h"), "sform_code": (254, "h"), "qform_code": (252, "h"),
    }  # fmt: skip
    data = bytearray((NIBABEL_FILES / "anatomical.nii").read_bytes())
    order = "<" if struct.unpack_from("<i", data)[0] == 348 else ">"
    for field, value in fields.items():
        offset, code = offsets[field]
        struct.pack_into(order + code, data, offset, value)
    path = tmp_path / name
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"pixdim1": float("nan")}, "unknown voxel size: NIfTI pixdim"),
        ({"pixdim1": -2.0}, "unknown voxel size: NIfTI pixdim"),
        ({"pixdim1": 0.0}, "unknown voxel size: NIfTI pixdim"),
        ({"pixdim1": 1e30}, "implausible voxel spacing"),
        ({"pixdim2": 1e-30}, "implausible voxel spacing"),
        ({"srow_x0": float("nan"), "qform_code": 0}, "orthonormal"),
        ({"vox_offset": float("nan")}, "vox_offset"),
        ({"dim1": -3}, "corrupt NIfTI header: dim"),
        ({"bitpix": 7}, "bitpix"),
    ],
    ids=lambda value: "-".join(value) if isinstance(value, dict) else None,
)
def test_hostile_nifti_fields_raise_image_read_error(tmp_path, fields, reason):
    path = nifti_with(tmp_path, "hostile.nii", **fields)
    # Some of these reach ITK only when the pixels are read; both calls must fail alike or return plausibly.
    with pytest.raises(ImageReadError, match=reason) as error:
        read_image(path)
    assert error.value.path == str(path)


@pytest.mark.parametrize(
    "fields",
    [
        {"scl_slope": float("nan")},  # the NIfTI standard: no scaling
        {"scl_slope": 2.0, "scl_inter": float("nan")},  # the NIfTI library takes the intercept as 0
        {"quatern_b": float("nan"), "sform_code": 0},  # ITK falls back to another orientation
        {"qoffset_x": float("nan"), "qform_code": 0, "sform_code": 0},
    ],
    ids=lambda value: "-".join(value),
)
def test_nan_in_fields_the_nifti_library_replaces_gives_a_plausible_image(tmp_path, fields):
    image = read_image(nifti_with(tmp_path, "nan.nii", **fields))
    assert bool(image.pixels.isfinite().all())
    assert image.shape == (25, 41, 33) and image.spacing == (2.0, 2.0, 2.0)


def test_nifti_scaling_that_overflows_raises(tmp_path):
    voxels = np.ones((4, 5, 6), dtype=np.float32)
    voxels[1, 2, 3] = 3e38
    voxels[0, 0, 0] = np.inf  # the NIfTI library turns stored NaN and infinities into 0
    image = nibabel.Nifti1Image(voxels, np.diag([0.7, 0.7, 1.5, 1.0]))
    image.header.set_slope_inter(10.0, 0.0)
    path = tmp_path / "overflow.nii"
    nibabel.save(image, path)
    with pytest.raises(ImageReadError, match="^.*: 1 non-finite pixel values") as error:
        read_image(path)
    assert error.value.path == str(path)


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"SamplesPerPixel": 0}, "SamplesPerPixel 0"),
        ({"SamplesPerPixel": 3}, "SamplesPerPixel 3 does not match"),
        ({"BitsAllocated": 12}, "BitsAllocated 12"),
        ({"BitsStored": 17}, "BitsStored 17"),
        ({"PixelSpacing": "-1\\-1"}, "unknown pixel spacing.*-1.0"),
        ({"PixelSpacing": "nan\\nan"}, "unknown pixel spacing.*'nan"),
        ({"PixelSpacing": "abc\\abc"}, "unknown pixel spacing.*'abc"),
        ({"RescaleSlope": "abc"}, "RescaleSlope .* is not a decimal string"),
        ({"RescaleSlope": "0"}, "RescaleSlope .* is not one non-zero number"),
        ({"RescaleIntercept": "nan"}, "RescaleIntercept .* is not a decimal string"),
        ({"RescaleIntercept": "1\\2"}, "RescaleIntercept .* is not one number"),
        ({"ImagePositionPatient": "nan\\0\\0"}, "ImagePositionPatient .* is not a decimal string"),
        ({"ImagePositionPatient": "0\\0"}, "ImagePositionPatient holds 2 values, not 3"),
        ({"NumberOfFrames": "abc"}, "NumberOfFrames .* is not an integer string"),
        ({"PhotometricInterpretation": None}, "PhotometricInterpretation None"),
        ({"PixelData": None}, "without pixel data"),
    ],
    ids=lambda value: "-".join(value) if isinstance(value, dict) else None,
)
def test_hostile_dicom_fields_raise_image_read_error(tmp_path, changes, reason):
    path = edited_dicom(CT_SMALL, tmp_path / "hostile.dcm", **changes)
    assert_unreadable(path, reason)


# ------------------------------------------------------------------------------------------------
# Issue 17.4: implausible images


def test_overflowing_rescale_slope_raises(tmp_path):
    path = edited_dicom(CT_SMALL, tmp_path / "slope.dcm", RescaleSlope="1e308")
    with pytest.raises(ImageReadError, match="non-finite pixel values") as error:
        read_image(path)
    assert error.value.path == str(path)


@pytest.mark.parametrize("spacing", ["1e300\\1e300", "1e-310\\1e-310", "2000\\2000", "0.0001\\0.0001", "inf\\1"])
def test_implausible_pixel_spacing_raises(tmp_path, spacing):
    path = edited_dicom(CT_SMALL, tmp_path / "spacing.dcm", PixelSpacing=spacing)
    assert_unreadable(path, "unknown pixel spacing: .* within 0.001 to 1000 mm")


def test_spacing_at_the_bounds_of_the_accepted_range_is_read(tmp_path):
    low, high = SPACING_RANGE_MM
    path = edited_dicom(CT_SMALL, tmp_path / "bounds.dcm", PixelSpacing=[low, high])
    assert read_image(path).spacing == (low, high)


def test_unparsable_spacing_gives_the_same_answer_every_time(tmp_path):
    # GDCM read "nan" and "abc" as whatever memory held: a different spacing in every process.
    path = edited_dicom(CT_SMALL, tmp_path / "abc.dcm", PixelSpacing="abc\\abc")
    code = """
        import sys
        from mmv.data import ImageReadError, read_image
        try:
            print(read_image(sys.argv[1]).spacing)
        except ImageReadError as error:
            print(error.reason)
    """
    answers = {read_in_subprocess(code, str(path)).stdout for _ in range(2)}
    assert len(answers) == 1 and next(iter(answers)).startswith("unknown pixel spacing")


# ------------------------------------------------------------------------------------------------
# Issue 18.2: unknown spacing is reported, never invented


def pydicom_data_file(name: str) -> Path:
    """A file of the pydicom-data package (the test extra), found without pydicom's download fallback."""
    try:
        distribution = importlib.metadata.distribution("pydicom-data")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pydicom-data is not installed")
    return Path(distribution.locate_file(f"data_store/data/{name}"))


def test_real_radiograph_with_zero_pixel_spacing_raises():
    path = pydicom_data_file("RG1_UNCR.dcm")
    assert [float(value) for value in pydicom.dcmread(path, stop_before_pixels=True).PixelSpacing] == [0.0, 0.0]
    assert_unreadable(path, r"unknown pixel spacing: .*found PixelSpacing \[0.0, 0.0\]")


def test_enhanced_multiframe_spacing_comes_from_its_functional_groups():
    path = pydicom_data_file("eCT_Supplemental.dcm")
    oracle = pydicom.dcmread(path, stop_before_pixels=True)
    assert "PixelSpacing" not in oracle
    measures = oracle.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    image = read_image(path, frame=1)
    assert image.shape == (oracle.Rows, oracle.Columns)
    assert image.spacing == tuple(float(value) for value in measures.PixelSpacing)
    assert read_image_info(path, frame=1).spacing == image.spacing


@pytest.mark.parametrize("spacing", [[0, 0], None, "abc\\abc"], ids=["zero", "missing", "unparsable"])
def test_unknown_pixel_spacing_raises(tmp_path, spacing):
    path = edited_dicom(CT_SMALL, tmp_path / "unknown.dcm", PixelSpacing=spacing)
    assert_unreadable(path, "unknown pixel spacing")


@pytest.mark.parametrize("spacing", [[0, 0], None, "abc\\abc"], ids=["zero", "missing", "unparsable"])
def test_imager_pixel_spacing_is_the_fallback(tmp_path, spacing):
    path = edited_dicom(CT_SMALL, tmp_path / "imager.dcm", PixelSpacing=spacing, ImagerPixelSpacing=[0.2, 0.15])
    assert read_image(path).spacing == (0.2, 0.15)
    assert read_image_info(path).spacing == (0.2, 0.15)


def test_pixel_spacing_is_preferred_to_imager_pixel_spacing(tmp_path):
    path = edited_dicom(CT_SMALL, tmp_path / "both.dcm", ImagerPixelSpacing=[0.2, 0.2])
    assert read_image(path).spacing == pytest.approx((0.661468, 0.661468))
    assert read_image(RADIOGRAPH).spacing == (0.1, 0.1)  # a real CR with ImagerPixelSpacing only


def test_one_slice_series_takes_its_thickness_from_the_header_or_raises(tmp_path):
    series = tmp_path / "one"
    series.mkdir()
    edited_dicom(CT_SMALL, series / "slice.dcm", SliceThickness=3.0, SpacingBetweenSlices=None)
    assert read_image(series).spacing == pytest.approx((3.0, 0.661468, 0.661468))
    edited_dicom(CT_SMALL, series / "slice.dcm", SliceThickness=None, SpacingBetweenSlices=None)
    with pytest.raises(ImageReadError, match="thickness is unknown") as error:
        read_image_info(series)
    assert error.value.path == str(series)


# ------------------------------------------------------------------------------------------------
# Issue 18.5: warning filters that turn ITK's SWIG DeprecationWarnings into errors


def test_reading_under_python_w_error_does_not_crash():
    code = """
        import sys
        from mmv.data import list_dicom_series, read_image, read_image_info
        ct, series, nifti, gz = sys.argv[1:]
        print(read_image(ct).shape, read_image_info(ct).shape, read_image(series).shape, list_dicom_series(series))
        print(read_image(nifti).shape, read_image(gz, frame=1).shape)
    """
    files = [CT_SMALL, CT_SERIES, NIBABEL_FILES / "anatomical.nii", NIBABEL_FILES / "example4d.nii.gz"]
    result = read_in_subprocess(code, *map(str, files), warnings_as_errors=True)
    assert result.returncode == 0, f"exit status {result.returncode}: {result.stderr[-2000:]}"
    assert result.stdout.splitlines()[0].startswith("(128, 128) (128, 128) (5, 16, 16)")


def test_a_downstream_pytest_run_with_w_error_passes(tmp_path):
    (tmp_path / "test_downstream.py").write_text(
        textwrap.dedent(
            f"""
            from mmv.data import read_image

            def test_reads():
                assert read_image({str(CT_SMALL)!r}).shape == (128, 128)
                assert read_image({str(NIBABEL_FILES / "anatomical.nii")!r}).shape == (25, 41, 33)
            """
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-W", "error", "-p", "no:cacheprovider", "-q", "test_downstream.py"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, f"exit status {result.returncode}: {result.stdout[-2000:]} {result.stderr[-2000:]}"
    assert "1 passed" in result.stdout


def write_text_header_image(path: Path, header: str) -> Path:
    path.write_bytes(header.encode() + np.arange(24, dtype="<f4").tobytes())
    return path


@pytest.mark.parametrize(
    "name, header, spacing_line",
    [
        (
            "volume.nrrd",
            "NRRD0004\ntype: float\ndimension: 3\nsizes: 2 3 4\nencoding: raw\nendian: little\n{}\n",
            "spacings: 0.5 0.75 2\n",
        ),
        (
            "volume.mha",
            "ObjectType = Image\nNDims = 3\nDimSize = 2 3 4\nElementType = MET_FLOAT\n{}ElementDataFile = LOCAL\n",
            "ElementSpacing = 0.5 0.75 2\n",
        ),
    ],
    ids=["nrrd", "metaimage"],
)
def test_text_header_without_spacing_raises(tmp_path, name, header, spacing_line):
    without = write_text_header_image(tmp_path / name, header.format(""))
    assert_unreadable(without, "unknown voxel spacing")
    with_spacing = write_text_header_image(tmp_path / f"spaced_{name}", header.format(spacing_line))
    image = read_image(with_spacing)
    assert image.spacing == (2.0, 0.75, 0.5)
    np.testing.assert_array_equal(image.pixels.numpy().ravel(), np.arange(24, dtype=np.float32))
