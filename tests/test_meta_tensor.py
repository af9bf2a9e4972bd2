"""MONAI's MetaTensor as encoder input: the same image as mmv.data.read_image reads from the same file.

MONAI is a test extra, never a dependency of ``import mmv``; the files are nibabel's bundled NIfTI
images (LPS, RAS and anisotropic ones), read by MONAI's LoadImage with EnsureChannelFirst.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

monai = pytest.importorskip("monai")
from monai.data import MetaTensor  # noqa: E402
from monai.transforms import LoadImage, Orientation  # noqa: E402
from nibabel.testing import data_path as nibabel_data  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402

from mmv.data import read_image  # noqa: E402
from mmv.image import Image  # noqa: E402
from mmv.model.config import EncoderConfig  # noqa: E402
from mmv.model.encoder import Encoder  # noqa: E402
from mmv.tokenizer import as_image  # noqa: E402

NIFTI_FILES = ["anatomical.nii", "reoriented_anat_moved.nii", "resampled_anat_moved.nii"]


def load_with_monai(name: str, **kwargs) -> torch.Tensor:
    return LoadImage(image_only=True, ensure_channel_first=True, **kwargs)(str(Path(nibabel_data) / name))


@pytest.mark.parametrize("name", NIFTI_FILES)
@pytest.mark.parametrize("reader", ["NibabelReader", "ITKReader"])
def test_a_meta_tensor_is_the_image_read_image_reads(name, reader):
    # Its axes are (x, y, z) in RAS with the spacing in its affine; they were once read as (z, y, x) at 1 mm.
    meta_tensor = load_with_monai(name, reader=reader)
    expected = read_image(Path(nibabel_data) / name)
    image = as_image(meta_tensor, "inputs[0]")
    assert type(image.pixels) is torch.Tensor
    assert image.shape == expected.shape and image.spacing == pytest.approx(expected.spacing)
    # ITK's NIfTI library reads NaN voxels as 0 (resampled_anat_moved.nii has some).
    torch.testing.assert_close(image.pixels.nan_to_num(0.0), expected.pixels, rtol=0, atol=0)


def test_orientation_transforms_and_lps_affines_give_the_same_image():
    expected = read_image(Path(nibabel_data) / "anatomical.nii")
    for meta_tensor in (
        Orientation("PIR", labels=None)(load_with_monai("anatomical.nii")),
        load_with_monai("anatomical.nii", reader="ITKReader", affine_lps_to_ras=False),  # space LPS
    ):
        image = Image.from_meta_tensor(meta_tensor)
        assert image.spacing == expected.spacing
        torch.testing.assert_close(image.pixels, expected.pixels, rtol=0, atol=0)


def test_the_encoder_encodes_a_meta_tensor_as_the_read_image():
    torch.manual_seed(0)
    encoder = Encoder(EncoderConfig(embed_dim=32, depth=1, num_heads=2, patch_size=(4, 8, 8))).eval()
    for name in NIFTI_FILES[:2]:
        from_monai = encoder([load_with_monai(name)])
        from_mmv = encoder([read_image(Path(nibabel_data) / name)])
        torch.testing.assert_close(from_monai.batch.coords_mm, from_mmv.batch.coords_mm, rtol=0, atol=0)
        torch.testing.assert_close(from_monai.cls, from_mmv.cls, rtol=0, atol=0)


@pytest.mark.parametrize("reader", ["PydicomReader", "ITKReader"])
def test_a_single_dicom_file_is_the_2d_image_read_image_reads(reader):
    # ITKReader gives a one-slice volume [1, X, Y, 1], PydicomReader [1, X, Y] with a 4 x 4 affine.
    path = get_testdata_file("CT_small.dcm")
    image = as_image(LoadImage(image_only=True, ensure_channel_first=True, reader=reader)(path))
    expected = read_image(path)
    assert image.shape == expected.shape == (128, 128) and image.spacing == pytest.approx(expected.spacing)
    torch.testing.assert_close(image.pixels, expected.pixels, rtol=0, atol=0)


def test_a_2d_meta_tensor_is_rows_by_columns_with_its_pixel_spacing():
    pixels = torch.rand(1, 40, 30)  # MONAI's (x, y): 40 columns, 30 rows
    image = as_image(MetaTensor(pixels, affine=torch.diag(torch.tensor([0.5, 0.2, 1.0], dtype=torch.float64))))
    assert image.shape == (30, 40) and image.spacing == (0.2, 0.5)
    torch.testing.assert_close(image.pixels, pixels[0].T, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("meta_tensor", "match"),
    [
        (MetaTensor(torch.zeros(2, 8, 8, 8)), "one channel"),
        (MetaTensor(torch.zeros(8, 8)), "does not fit"),  # a 4 x 4 affine and no spatial_shape: 3D
        (MetaTensor(torch.zeros(1, 8, 8, 8), affine=torch.tensor(
            [[0.7, -0.7, 0, 0], [0.7, 0.7, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float64)), "oblique"),
    ],
)
def test_meta_tensors_that_do_not_fit_raise_naming_the_input(meta_tensor, match):
    with pytest.raises(ValueError, match=match) as raised:
        as_image(meta_tensor, "inputs[3]")
    assert "inputs[3]" in str(raised.value)


def test_an_image_refuses_meta_tensor_pixels_whose_axes_it_would_misread():
    with pytest.raises(TypeError, match="from_meta_tensor"):
        Image(load_with_monai("anatomical.nii"), (1.0, 1.0, 1.0))


def test_importing_mmv_does_not_import_monai():
    code = "import sys, mmv, mmv.data, mmv.model; assert 'monai' not in sys.modules, 'monai imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr
