"""mmv.tokenizer: patches, physical token coordinates, padding, background and random token dropping."""

import numpy as np
import pytest
import torch

from mmv.image import Image
from mmv.tokenizer import Tokenizer, as_image, count_tokens, grid_shape


def test_grid_shape_rounds_up_and_2d_has_one_layer():
    assert grid_shape((224, 224), (16, 16, 16)) == (1, 14, 14)
    assert grid_shape((96, 100, 81), (16, 16, 16)) == (6, 7, 6)
    assert grid_shape((5, 7), (4, 3, 2)) == (1, 2, 4)
    assert count_tokens((192, 192, 192), (16, 16, 16)) == 1728
    with pytest.raises(ValueError, match="image_shape"):
        grid_shape((4,), (16, 16, 16))
    with pytest.raises(ValueError, match="patch_size"):
        grid_shape((4, 4), (16, 0, 16))


def test_3d_patches_are_flattened_in_zyx_order():
    volume = torch.randn(8, 12, 6)
    tokens = Tokenizer((4, 6, 3))(Image(volume, (1.0, 1.0, 1.0)))
    assert tokens.grid_shape == (2, 2, 2)
    assert tokens.patches.shape == (8, 4 * 6 * 3)
    for index in range(8):
        z, y, x = index // 4, (index // 2) % 2, index % 2
        expected = volume[4 * z : 4 * z + 4, 6 * y : 6 * y + 6, 3 * x : 3 * x + 3].flatten()
        torch.testing.assert_close(tokens.patches[index], expected, rtol=0, atol=0)
    assert tokens.kept_indices.tolist() == list(range(8))


def test_2d_patches_use_only_the_in_plane_patch_size():
    image = torch.randn(8, 6)
    tokens = Tokenizer((16, 4, 3))(Image(image, (0.5, 0.5)))
    assert not tokens.is_3d
    assert tokens.grid_shape == (1, 2, 2)
    assert tokens.patches.shape == (4, 12)
    torch.testing.assert_close(tokens.patches[3], image[4:8, 3:6].flatten(), rtol=0, atol=0)


def test_coordinates_are_patch_centres_in_mm_from_the_image_centre():
    tokens = Tokenizer((16, 16, 16))(Image(torch.zeros(32, 32, 48), (2.0, 1.0, 0.5)))
    coords = tokens.coords_mm
    assert coords.dtype == torch.float32 and coords.shape == (2 * 2 * 3, 3)
    # Patch centres sit 8 voxels either side of the centre in z and y; at -16, 0, 16 voxels in x.
    assert sorted(set(coords[:, 0].tolist())) == [-16.0, 16.0]
    assert sorted(set(coords[:, 1].tolist())) == [-8.0, 8.0]
    assert sorted(set(coords[:, 2].tolist())) == [-8.0, 0.0, 8.0]
    torch.testing.assert_close(coords[0], torch.tensor([-16.0, -8.0, -8.0]))


def test_2d_images_lie_in_the_plane_z_0():
    tokens = Tokenizer((16, 16, 16))(Image(torch.zeros(32, 16), (0.2, 0.3)))
    torch.testing.assert_close(tokens.coords_mm, torch.tensor([[0.0, -1.6, 0.0], [0.0, 1.6, 0.0]]))


def test_padding_is_even_and_filled_with_pad_value():
    image = torch.arange(1.0, 31.0).reshape(5, 6)
    tokens = Tokenizer((1, 4, 4), pad_value=-7.0)(Image(image, (1.0, 1.0)))
    assert tokens.grid_shape == (1, 2, 2)
    padded = torch.full((8, 8), -7.0)
    padded[1:6, 1:7] = image  # 3 rows and 2 columns of padding, split as evenly as possible
    torch.testing.assert_close(tokens.patches[0], padded[:4, :4].flatten())
    torch.testing.assert_close(tokens.patches[3], padded[4:, 4:].flatten())
    # Centres of the patches in image pixels: rows 0.5 and 4.5 (image centre 2), columns 0.5 and 4.5
    # (image centre 2.5).
    expected = torch.tensor([[0.0, -1.5, -2.0], [0.0, -1.5, 2.0], [0.0, 2.5, -2.0], [0.0, 2.5, 2.0]])
    torch.testing.assert_close(tokens.coords_mm, expected, rtol=0, atol=0)


def test_background_patches_are_dropped_and_padding_never_counts_as_foreground():
    volume = torch.full((8, 8, 12), -1000.0)
    volume[0, 0, 0] = 40.0  # one voxel of tissue in the first patch
    volume[5, 7, 11] = -999.0  # just above the background level, in the last patch (which is padded)
    tokenizer = Tokenizer((4, 4, 8), background_level=-1000.0, pad_value=0.0)
    tokens = tokenizer(Image(volume, (1.0, 1.0, 1.0)))
    assert tokens.grid_shape == (2, 2, 2)
    assert tokens.kept_indices.tolist() == [0, 7]
    assert tokens.patches.shape == (2, 128)
    assert 40.0 in tokens.patches[0].tolist()
    assert 0.0 in tokens.patches[1].tolist()  # the padding of the last patch holds pad_value
    # Without the two voxels, every patch is background: padded with 0 > -1000 yet still background.
    volume[0, 0, 0] = volume[5, 7, 11] = -1000.0
    all_air = tokenizer(Image(volume, (1.0, 1.0, 1.0)))
    assert all_air.kept_indices.tolist() == list(range(8)), "an all-background image keeps all its tokens"


def test_random_dropping_keeps_a_reproducible_sorted_subset_of_foreground():
    image = torch.zeros(64, 64)
    image[:, 32:] = 1.0  # the right half is foreground: 8 of 16 patches
    tokenizer = Tokenizer((1, 16, 16), background_level=0.0, drop_rate=0.5)
    first = tokenizer(Image(image, (1.0, 1.0)), generator=torch.Generator().manual_seed(3))
    again = tokenizer(Image(image, (1.0, 1.0)), generator=torch.Generator().manual_seed(3))
    kept = first.kept_indices.tolist()
    assert len(kept) == 4
    assert kept == sorted(set(kept)) == again.kept_indices.tolist()
    assert all(index % 4 >= 2 for index in kept), "only foreground patches are candidates"
    torch.testing.assert_close(first.patches, torch.ones(4, 256))
    seen = {
        tuple(tokenizer(Image(image, (1.0, 1.0)), generator=torch.Generator().manual_seed(s)).kept_indices.tolist())
        for s in range(8)
    }
    assert len(seen) > 1, "different seeds drop different tokens"


def test_random_dropping_keeps_at_least_one_token():
    tokens = Tokenizer((1, 4, 4), drop_rate=0.99)(torch.randn(8, 8))
    assert tokens.num_tokens == 1


def test_plain_arrays_mean_1mm_spacing_and_channel_first_single_channel_is_accepted():
    array = np.random.default_rng(0).standard_normal((1, 8, 8, 8)).astype(np.float32)
    image = as_image(array)
    assert image.is_3d and image.spacing == (1.0, 1.0, 1.0)
    assert torch.equal(image.pixels, torch.from_numpy(array[0]))
    assert as_image(torch.zeros(4, 5)).spacing == (1.0, 1.0)


@pytest.mark.parametrize(
    ("pixels", "match"),
    [
        (torch.zeros(3, 8, 8, 8), "one channel"),
        (torch.zeros(2, 2, 2, 2, 2), "one channel"),
        (torch.zeros(8), r"\[H, W\]"),
        (torch.zeros(0, 8), "empty"),
    ],
)
def test_bad_arrays_raise_naming_the_argument(pixels, match):
    with pytest.raises(ValueError, match=match) as error:
        as_image(pixels, "images[2]")
    assert "images[2]" in str(error.value)


def test_non_finite_pixels_and_spacing_are_rejected():
    with pytest.raises(ValueError, match="finite"):
        Tokenizer((4, 4, 4))(torch.tensor([[0.0, float("nan")], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="spacing"):
        Image(torch.zeros(4, 4), (1.0, float("inf")))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"patch_size": (16, 16)}, "patch_size"),
        ({"patch_size": (16, 16, 1.5)}, "patch_size"),
        ({"drop_rate": 1.0}, "drop_rate"),
        ({"pad_value": float("nan")}, "pad_value"),
        ({"background_level": float("nan")}, "background_level"),
    ],
)
def test_bad_tokenizer_arguments_raise_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Tokenizer(**kwargs)
