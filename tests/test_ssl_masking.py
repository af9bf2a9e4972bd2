"""iBOT block masks in 2D and 3D, batch ratios, and packed masks at kept tokens."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmv.image import Image
from mmv.packing import pack
from mmv.ssl.masking import block_mask, packed_block_mask, sample_mask_ratios
from mmv.tokenizer import Tokenizer


@settings(max_examples=20, deadline=None)
@given(
    grid=st.sampled_from([(1, 14, 14), (1, 8, 20), (6, 6, 6), (4, 8, 5)]),
    ratio=st.floats(0.1, 0.5),
    seed=st.integers(0, 2**31),
)
def test_block_mask_covers_about_the_requested_share(grid, ratio, seed):
    mask = block_mask(grid, ratio, torch.Generator().manual_seed(seed))
    total = grid[0] * grid[1] * grid[2]
    assert mask.shape == (total,) and mask.dtype == torch.bool
    # Blocks are added until the target is reached; the last one may overshoot by at most its size.
    assert round(ratio * total) * 0.5 <= int(mask.sum()) <= total


def test_block_mask_is_made_of_blocks_not_scattered_tokens():
    mask = block_mask((1, 16, 16), 0.4, torch.Generator().manual_seed(0)).view(16, 16)
    masked = mask.nonzero()
    neighbours = 0
    for y, x in masked.tolist():
        neighbours += any(
            0 <= y + dy < 16 and 0 <= x + dx < 16 and bool(mask[y + dy, x + dx])
            for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0))
        )
    assert neighbours == len(masked)


def test_block_mask_is_deterministic_and_zero_ratio_masks_nothing():
    a = block_mask((4, 6, 6), 0.3, torch.Generator().manual_seed(5))
    b = block_mask((4, 6, 6), 0.3, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert not block_mask((4, 6, 6), 0.0, torch.Generator()).any()


def test_block_mask_rejects_bad_arguments():
    with pytest.raises(ValueError, match="ratio"):
        block_mask((1, 4, 4), 1.0, torch.Generator())
    with pytest.raises(ValueError, match="grid_shape"):
        block_mask((4, 4), 0.2, torch.Generator())


def test_sample_mask_ratios_masks_the_requested_share_with_spread_ratios():
    ratios = sample_mask_ratios(10, torch.Generator().manual_seed(0), probability=0.5, ratio_range=(0.1, 0.5))
    masked = sorted(r for r in ratios if r > 0)
    assert len(masked) == 5
    # One ratio in each fifth of the range.
    for position, ratio in enumerate(masked):
        assert 0.1 + 0.08 * position <= ratio <= 0.1 + 0.08 * (position + 1)


def test_packed_mask_follows_each_images_kept_tokens():
    tokenizer = Tokenizer((4, 4, 4), drop_rate=0.3)
    generator = torch.Generator().manual_seed(0)
    items = [
        tokenizer(Image(torch.randn(32, 32), (1.0, 1.0)), generator),
        tokenizer(Image(torch.randn(16, 16, 16), (1.0, 1.0, 1.0)), generator),
    ]
    batch = pack(items)
    mask = packed_block_mask(batch, [0.0, 0.5], torch.Generator().manual_seed(1))
    assert mask.shape == (batch.num_tokens,)
    first, second = mask.split(list(batch.lengths))
    assert not first.any()
    full = block_mask(items[1].grid_shape, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(second, full[items[1].kept_indices])
