"""mmv.data.preprocess: physical-space resampling, CT window, X-ray normalisation and resizing, crop/pad."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmv import Image
from mmv.data import (
    CtPreprocess,
    ModalityPreprocess,
    XrayPreprocess,
    crop_or_pad,
    ct_window,
    normalize_xray,
    resample_to_spacing,
    resize_xray,
)
from mmv.data.preprocess import (
    DEFAULT_CT_SPACING,
    DEFAULT_CT_WINDOW,
    DEFAULT_XRAY_SHORT_SIDE,
    resampled_shape,
)


def linear_volume(shape, spacing, gradient=(3.0, -2.0, 0.5)) -> Image:
    """Voxel value = gradient . (physical position of the voxel centre, mm, from the outer corner)."""
    centres = [(torch.arange(n, dtype=torch.float64) + 0.5) * s for n, s in zip(shape, spacing)]
    z, y, x = torch.meshgrid(*centres, indexing="ij")
    return Image((gradient[0] * z + gradient[1] * y + gradient[2] * x).float(), spacing, "CT")


def test_trilinear_resampling_samples_physical_positions():
    image = linear_volume((8, 10, 12), (2.0, 0.8, 0.7))
    result = resample_to_spacing(image, (1.5, 1.0, 0.5))
    assert result.spacing == (1.5, 1.0, 0.5)
    assert result.shape == (math.floor(8 * 2 / 1.5), math.floor(10 * 0.8), math.floor(12 * 0.7 / 0.5))
    expected = linear_volume(result.shape, result.spacing)
    # Linear interpolation reproduces a linear field exactly, except within half an input voxel of the edge
    # where samples are clamped.
    inner = (slice(2, -2), slice(2, -2), slice(2, -2))
    torch.testing.assert_close(result.pixels[inner], expected.pixels[inner], atol=1e-4, rtol=1e-5)
    assert result.modality == "CT"


def test_bilinear_resampling_of_2d_keeps_field_of_view():
    image = Image(torch.rand(300, 200), (0.2, 0.3))
    result = resample_to_spacing(image, 1.0)
    assert result.shape == (60, 60) and result.spacing == (1.0, 1.0)
    assert float(result.pixels.mean()) == pytest.approx(float(image.pixels.mean()), abs=0.02)


def test_resampling_to_the_same_spacing_is_identity_and_thin_axes_are_kept():
    image = Image(torch.rand(1, 7, 9), (5.0, 1.0, 1.0))
    result = resample_to_spacing(image, (1.5, 1.0, 1.0))
    assert result.shape == (3, 7, 9)  # 1 slice of 5 mm holds three 1.5 mm slices
    thin = resample_to_spacing(Image(torch.rand(1, 7, 9), (1.0, 1.0, 1.0)), (2.0, 1.0, 1.0))
    assert thin.shape == (1, 7, 9) and thin.spacing == (1.0, 1.0, 1.0)
    same = resample_to_spacing(image, image.spacing)
    assert same.pixels is image.pixels


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 40), st.integers(1, 40), st.integers(1, 40)),
    spacing=st.tuples(*[st.floats(0.3, 5.0)] * 3),
    target=st.tuples(*[st.floats(0.3, 5.0)] * 3),
)
def test_predicted_shape_matches_resampling(shape, spacing, target):
    predicted, predicted_spacing = resampled_shape(shape, spacing, target)
    result = resample_to_spacing(Image(torch.zeros(shape), spacing), target)
    assert result.shape == predicted and result.spacing == pytest.approx(predicted_spacing)


def test_ct_window_maps_hu_to_unit_range_and_nan_to_air():
    image = Image(torch.tensor([[-2000.0, -1000.0, 0.0, 500.0, 1000.0, 3000.0, float("nan")]]), (1.0, 1.0))
    result = ct_window(image).pixels
    torch.testing.assert_close(result, torch.tensor([[-1.0, -1.0, 0.0, 0.5, 1.0, 1.0, -1.0]]))
    narrow = ct_window(image, low=-100.0, high=300.0).pixels
    assert float(narrow[0, 2]) == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="low < high"):
        ct_window(image, low=10.0, high=10.0)


def test_xray_normalisation_is_robust_to_outliers():
    pixels = torch.linspace(100.0, 200.0, 10_000).reshape(100, 100)
    pixels[0, :5] = 1e6  # burnt-in label
    result = normalize_xray(Image(pixels, (1.0, 1.0)), 1.0, 99.0).pixels
    assert float(result.min()) == -1.0 and float(result.max()) == 1.0
    # The bulk keeps its linear spread despite the outliers.
    assert float(result[50, 50]) == pytest.approx(0.0, abs=0.03)
    constant = normalize_xray(Image(torch.full((4, 4), 7.0), (1.0, 1.0))).pixels
    assert bool((constant == -1.0).all())
    with pytest.raises(ValueError, match="percentiles"):
        normalize_xray(Image(pixels, (1.0, 1.0)), 60.0, 40.0)


def test_resize_xray_to_short_side_or_spacing():
    image = Image(torch.rand(3000, 2500), (0.14, 0.14))
    by_side = resize_xray(image, short_side=512)
    assert by_side.shape == (614, 512)
    assert by_side.spacing[1] == pytest.approx(0.14 * 2500 / 512)
    by_spacing = resize_xray(image, spacing=0.7)
    assert by_spacing.shape == (600, 500) and by_spacing.spacing == (0.7, 0.7)
    with pytest.raises(ValueError, match="exactly one"):
        resize_xray(image)
    with pytest.raises(ValueError, match="2D"):
        resize_xray(Image(torch.rand(2, 3, 4), (1.0, 1.0, 1.0)), short_side=2)


def test_crop_or_pad_in_millimetres():
    pixels = torch.arange(6 * 8, dtype=torch.float32).reshape(6, 8)
    image = Image(pixels, (2.0, 0.5))
    result = crop_or_pad(image, (20.0, 2.0), fill=-1.0)  # 10 rows (pad 4), 4 columns (crop 4)
    assert result.shape == (10, 4) and result.spacing == image.spacing
    assert bool((result.pixels[:2] == -1).all()) and bool((result.pixels[-2:] == -1).all())
    torch.testing.assert_close(result.pixels[2:8], pixels[:, 2:6])
    untouched = crop_or_pad(image, (None, 2.0))
    assert untouched.shape == (6, 4)
    with pytest.raises(ValueError, match="size_mm"):
        crop_or_pad(image, (1.0, 2.0, 3.0))


def test_ct_pipeline_windows_resamples_and_pads():
    hu = torch.full((10, 40, 40), -1000.0)
    hu[:, 10:30, 10:30] = 40.0
    hu[0, 0, 0] = float("nan")
    preprocess = CtPreprocess(spacing=(2.0, 1.5, 1.5), size_mm=(30.0, 45.0, 45.0))
    image = Image(hu, (3.0, 1.0, 1.0), "CT")
    result = preprocess(image)
    assert result.shape == preprocess.output_shape(image.shape, image.spacing) == (15, 30, 30)
    assert result.spacing == (2.0, 1.5, 1.5)
    assert bool(torch.isfinite(result.pixels).all())
    assert float(result.pixels.min()) == -1.0 and float(result.pixels.max()) == pytest.approx(0.04, abs=1e-4)
    with pytest.raises(ValueError, match="3D"):
        preprocess(Image(torch.zeros(4, 4), (1.0, 1.0)))
    with pytest.raises(ValueError, match="window"):
        CtPreprocess(window=(100.0, -100.0))


def test_xray_pipeline_predicts_its_shape():
    preprocess = XrayPreprocess(short_side=256)
    image = Image(torch.rand(900, 700) * 4000, (0.2, 0.2), "DX")
    result = preprocess(image)
    assert result.shape == preprocess.output_shape(image.shape, image.spacing) == (329, 256)
    assert float(result.pixels.min()) == -1.0 and float(result.pixels.max()) == 1.0
    assert repr(preprocess) == repr(XrayPreprocess(short_side=256))  # the cache key is stable
    with pytest.raises(ValueError, match="short_side"):
        XrayPreprocess(short_side=0)
    with pytest.raises(ValueError, match="exactly one"):
        XrayPreprocess(short_side=256, spacing=(0.5, 0.5))


def test_outputs_beyond_the_voxel_bound_are_refused_before_allocating():
    # A spacing in metres read as mm once asked the allocator for hundreds of terabytes.
    huge_spacing = Image(torch.zeros(100, 64, 64), (1e4, 1e4, 1e4), "CT")
    for run in (
        lambda: CtPreprocess()(huge_spacing),
        lambda: CtPreprocess().output_shape(huge_spacing.shape, huge_spacing.spacing),
        lambda: resample_to_spacing(Image(torch.zeros(64, 64), (1.0, 1.0)), 1e-5),
        lambda: crop_or_pad(Image(torch.zeros(8, 8), (1.0, 1.0)), (1e6, 1e6)),
        lambda: CtPreprocess(size_mm=(1e9, None, None))(Image(torch.zeros(4, 8, 8), (1.5, 0.75, 0.75))),
    ):
        with pytest.raises(ValueError, match="voxels, more than") as raised:
            run()
        assert "spacing" in str(raised.value) or "size_mm" in str(raised.value)
    # The bound leaves real images alone: a 0.5 mm CT of 512 x 512 x 800 resampled to 0.5 mm.
    assert CtPreprocess(spacing=(0.5, 0.5, 0.5)).output_shape((800, 512, 512), (0.5, 0.5, 0.5)) == (800, 512, 512)


def test_xray_pipeline_refuses_images_too_small_to_resize():
    # A 1 x 1 image once came out as 512 x 512 without a word.
    for shape in ((1, 1), (15, 400), (400, 15)):
        image = Image(torch.rand(shape), (0.2, 0.2), "DX")
        for run in (
            lambda: XrayPreprocess()(image),
            lambda: XrayPreprocess().output_shape(image.shape, image.spacing),
            lambda: XrayPreprocess(short_side=None, spacing=(0.5, 0.5))(image),
            lambda: resize_xray(image, short_side=512),
        ):
            with pytest.raises(ValueError, match=r"image must have at least 16 pixels per side") as raised:
                run()
            assert str(shape) in str(raised.value)
    assert XrayPreprocess(short_side=32)(Image(torch.rand(16, 20), (0.2, 0.2))).shape == (32, 40)


def test_resample_rejects_bad_spacing():
    image = Image(np.zeros((3, 3), dtype=np.float32), (1.0, 1.0))
    with pytest.raises(ValueError, match="target_spacing"):
        resample_to_spacing(image, (1.0, -1.0))
    with pytest.raises(ValueError, match="target_spacing"):
        resample_to_spacing(image, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="antialias"):
        resample_to_spacing(Image(torch.zeros(4, 4, 4), (1.0, 1.0, 1.0)), 2.0, antialias=True)


def test_one_set_of_defaults_for_the_pipelines_the_trainer_and_a_new_encoder():
    from mmv import Encoder
    from mmv.train.config import DataConfig
    from mmv.train.sources import modality_preprocess

    defaults = ModalityPreprocess()
    assert defaults == ModalityPreprocess(CtPreprocess(), XrayPreprocess())
    assert modality_preprocess(DataConfig()) == defaults
    assert Encoder.from_preset("vit_tiny", depth=1).preprocess == defaults
    assert CtPreprocess().spacing == DEFAULT_CT_SPACING == DataConfig().ct_spacing
    assert CtPreprocess().window == DEFAULT_CT_WINDOW == DataConfig().ct_window
    assert XrayPreprocess().short_side == DEFAULT_XRAY_SHORT_SIDE == DataConfig().xray_short_side


def test_the_mixed_transform_routes_by_dimension_and_round_trips_through_json():
    preprocess = ModalityPreprocess(CtPreprocess(spacing=(2.0, 2.0, 2.0)), XrayPreprocess(short_side=16))
    volume = Image(torch.zeros(4, 6, 6), (4.0, 4.0, 4.0), "CT")
    radiograph = Image(torch.rand(40, 32), (0.5, 0.5), "DX")
    assert preprocess(volume).shape == preprocess.output_shape(volume.shape, volume.spacing) == (8, 12, 12)
    assert preprocess(radiograph).shape == preprocess.output_shape(radiograph.shape, radiograph.spacing) == (20, 16)
    values = json.loads(json.dumps(preprocess.to_dict()))
    assert ModalityPreprocess.from_dict(values) == preprocess
    with pytest.raises(ValueError, match="preprocess.ct.*unknown \\['voxel'\\]"):
        ModalityPreprocess.from_dict({**values, "ct": {**values["ct"], "voxel": 1}})
    with pytest.raises(ValueError, match="missing \\['xray'\\]"):
        ModalityPreprocess.from_dict({"ct": values["ct"]})
    with pytest.raises(TypeError, match="ct must be a CtPreprocess"):
        ModalityPreprocess(XrayPreprocess(), XrayPreprocess())
