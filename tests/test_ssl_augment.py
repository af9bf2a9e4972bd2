"""Multi-crop views in physical space, 2D and 3D."""

import math

import pytest
import torch

from mmv.image import Image
from mmv.ssl.augment import CropSpec, MultiCrop, random_crop


def _ramp_along_x(shape, spacing):
    """An image whose value is the physical x position (mm) of each voxel centre."""
    x = (torch.arange(shape[-1], dtype=torch.float32) + 0.5) * spacing[-1]
    return Image(x.expand(*shape).contiguous(), spacing)


@pytest.mark.parametrize("shape, spacing", [((40, 60), (2.0, 1.0)), ((20, 24, 30), (3.0, 2.0, 1.5))])
def test_crop_samples_the_physical_box_it_reports(shape, spacing):
    image = _ramp_along_x(shape, spacing)
    spec = CropSpec((16, 16), (8, 8, 8), (0.2, 0.6), aspect_ratio=(1.0, 1.0))
    for seed in range(5):
        view = random_crop(image, spec, torch.Generator().manual_seed(seed))
        assert view.shape == spec.size(len(shape) == 3)
        extent = [n * s for n, s in zip(shape, spacing)]
        share = math.prod(n * s for n, s in zip(view.shape, view.spacing)) / math.prod(extent)
        assert 0.2 - 1e-4 <= share <= 0.6 + 1e-4
        # Values are the x positions of the view's voxel centres: consecutive ones differ by its x spacing.
        steps = view.pixels.reshape(-1, view.shape[-1]).diff(dim=1)
        torch.testing.assert_close(steps, torch.full_like(steps, view.spacing[-1]), rtol=1e-4, atol=1e-4)


def test_no_flip_by_default_and_flips_when_allowed():
    image = _ramp_along_x((32, 32), (1.0, 1.0))
    quiet = dict(contrast=(1.0, 1.0), brightness=(0.0, 0.0), blur_probability=0.0, noise_probability=0.0)
    spec = CropSpec((16, 16), (8, 8, 8), (0.5, 1.0))
    never = MultiCrop(spec, spec, num_local=2, **quiet)
    flipped = MultiCrop(spec, spec, num_local=2, flip_axes=("x",), **quiet)
    directions = {"never": set(), "flipped": set()}
    for seed in range(6):
        for name, multicrop in (("never", never), ("flipped", flipped)):
            for view in multicrop(image, torch.Generator().manual_seed(seed)):
                directions[name].add(bool(view.pixels[0, -1] > view.pixels[0, 0]))
    assert directions["never"] == {True}
    assert directions["flipped"] == {True, False}


def test_multicrop_views_sizes_order_and_determinism():
    multicrop = MultiCrop(
        CropSpec((32, 32), (16, 16, 16), (0.4, 1.0)), CropSpec((12, 12), (8, 8, 8), (0.05, 0.4)), num_global=2, num_local=3
    )
    volume = Image(torch.randn(20, 30, 30), (2.0, 1.0, 1.0), "CT")
    views = multicrop(volume, torch.Generator().manual_seed(3))
    assert [v.shape for v in views] == [(16, 16, 16)] * 2 + [(8, 8, 8)] * 3
    assert all(v.modality == "CT" for v in views)
    again = multicrop(volume, torch.Generator().manual_seed(3))
    assert all(torch.equal(a.pixels, b.pixels) and a.spacing == b.spacing for a, b in zip(views, again))
    assert multicrop.view_sizes(False) == [(32, 32)] * 2 + [(12, 12)] * 3


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="scale"):
        CropSpec((8, 8), (8, 8, 8), (0.0, 0.5))
    with pytest.raises(ValueError, match="flip_axes"):
        MultiCrop(flip_axes=("left",))
    with pytest.raises(TypeError, match="image"):
        MultiCrop()(torch.zeros(4, 4), torch.Generator())
