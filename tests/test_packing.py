"""mmv.packing: PackedBatch construction and validation, pack / unpack, moving, pickling."""

import pickle

import pytest
import torch

from mmv.image import Image
from mmv.packing import PackedBatch, cu_seqlens_from_lengths, pack, unpack
from mmv.tokenizer import Tokenizer

PATCH = (4, 4, 4)


def mixed_items(drop_rate=0.0):
    tokenizer = Tokenizer(PATCH, drop_rate=drop_rate)
    generator = torch.Generator().manual_seed(0)
    images = [
        Image(torch.randn(8, 12), (0.5, 0.5), "DX"),  # 2 x 3 tokens
        Image(torch.randn(8, 8, 4), (2.0, 1.0, 1.0), "CT"),  # 2 x 2 x 1 tokens
        Image(torch.randn(5, 5), (1.0, 1.0)),  # padded to 2 x 2 tokens
    ]
    return [tokenizer(image, generator) for image in images]


def batch_fields(batch):
    return {
        "patches_2d": batch.patches_2d,
        "patches_3d": batch.patches_3d,
        "rows_2d": batch.rows_2d,
        "rows_3d": batch.rows_3d,
        "coords_mm": batch.coords_mm,
        "cu_seqlens": batch.cu_seqlens,
        "max_seqlen": batch.max_seqlen,
        "kept_indices": batch.kept_indices,
        "grid_shapes": batch.grid_shapes,
        "is_3d": batch.is_3d,
        "modalities": batch.modalities,
        "patch_size": batch.patch_size,
    }


def assert_same_batch(a, b):
    for name, value in batch_fields(a).items():
        other = getattr(b, name)
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, other), name
        else:
            assert value == other, name


def test_pack_lays_images_end_to_end_and_splits_2d_from_3d_patches():
    items = mixed_items()
    batch = pack(items)
    assert batch.num_images == 3 and batch.num_tokens == 6 + 4 + 4
    assert batch.cu_seqlens.tolist() == [0, 6, 10, 14] and batch.cu_seqlens.dtype == torch.int32
    assert batch.lengths == (6, 4, 4) and batch.max_seqlen == 6
    assert batch.is_3d == (False, True, False)
    assert batch.modalities == ("DX", "CT", None)
    assert batch.grid_shapes == ((1, 2, 3), (2, 2, 1), (1, 2, 2))
    assert batch.patches_2d.shape == (10, 16) and batch.patches_3d.shape == (4, 64)
    assert batch.rows_2d.tolist() == [0, 1, 2, 3, 4, 5, 10, 11, 12, 13]
    assert batch.rows_3d.tolist() == [6, 7, 8, 9]
    torch.testing.assert_close(batch.patches_3d, items[1].patches, rtol=0, atol=0)
    torch.testing.assert_close(batch.coords_mm[6:10], items[1].coords_mm, rtol=0, atol=0)
    assert batch.sequence_ids().tolist() == [0] * 6 + [1] * 4 + [2] * 4
    assert batch.validated


def test_unpack_scatters_tokens_to_their_grid_and_leaves_dropped_positions_nan():
    batch = pack(mixed_items(drop_rate=0.5))
    features = torch.arange(batch.num_tokens, dtype=torch.float32)[:, None].repeat(1, 2)
    grids = unpack(batch, features)
    assert [tuple(g.shape) for g in grids] == [(2, 3, 2), (2, 2, 1, 2), (2, 2, 2)]
    for grid, kept, values in zip(grids, batch.split(batch.kept_indices), batch.split(features)):
        flat = grid.reshape(-1, 2)
        torch.testing.assert_close(flat[kept], values, rtol=0, atol=0)
        dropped = torch.ones(flat.shape[0], dtype=torch.bool)
        dropped[kept] = False
        assert torch.isnan(flat[dropped]).all()
        assert dropped.any()
    with pytest.raises(ValueError, match="features"):
        unpack(batch, features[:-1])
    with pytest.raises(TypeError, match="floating point"):
        unpack(batch, torch.zeros(batch.num_tokens, dtype=torch.int64))


def test_batch_pickles_and_moves_without_losing_anything():
    batch = pack(mixed_items())
    restored = pickle.loads(pickle.dumps(batch))
    assert_same_batch(batch, restored)
    assert restored.validated and restored.lengths == batch.lengths
    moved = batch.to("cpu")
    assert_same_batch(batch, moved)
    assert moved.validated


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a CUDA device")
def test_pin_memory_pins_every_tensor():
    pinned = pack(mixed_items()).pin_memory()
    assert all(getattr(pinned, name).is_pinned() for name, v in batch_fields(pinned).items() if isinstance(v, torch.Tensor))


def test_dataloader_pinning_goes_through_pin_memory_and_keeps_a_packed_batch(monkeypatch):
    # Pinning needs a GPU driver; stand in for it to check what DataLoader(pin_memory=True) does with a batch.
    pinned_ids = set()

    def fake_pin(tensor):
        copy = tensor.clone()
        pinned_ids.add(id(copy))
        return copy

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    batch = pack(mixed_items())
    result = torch.utils.data._utils.pin_memory.pin_memory(batch)
    assert isinstance(result, PackedBatch)
    assert_same_batch(batch, result)
    tensors = [v for v in batch_fields(result).values() if isinstance(v, torch.Tensor)]
    assert all(id(t) in pinned_ids for t in tensors)


def test_pack_is_a_dataloader_collate_function():
    items = mixed_items()
    loader = torch.utils.data.DataLoader(items, batch_size=3, collate_fn=pack, num_workers=1)
    (batch,) = list(loader)
    assert isinstance(batch, PackedBatch)
    assert_same_batch(batch, pack(items))


def test_pack_rejects_bad_items():
    items = mixed_items()
    with pytest.raises(ValueError, match="items"):
        pack([])
    with pytest.raises(TypeError, match=r"items\[1\]"):
        pack([items[0], torch.zeros(3)])
    other = Tokenizer((2, 2, 2))(torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"items\[1\].*patch_size"):
        pack([items[0], other])


def _corrupt(fields, name):
    fields = dict(fields)
    if name == "cu_seqlens_dtype":
        fields["cu_seqlens"] = fields["cu_seqlens"].long()
    elif name == "cu_seqlens_end":
        fields["cu_seqlens"] = torch.tensor([0, 6, 10, 13], dtype=torch.int32)
    elif name == "cu_seqlens_decreasing":
        fields["cu_seqlens"] = torch.tensor([0, 6, 5, 14], dtype=torch.int32)
    elif name == "max_seqlen":
        fields["max_seqlen"] = 5
    elif name == "patches_2d":
        fields["patches_2d"] = fields["patches_2d"][:, :8]
    elif name == "patches_3d":
        fields["patches_3d"] = fields["patches_3d"].double()
    elif name == "coords_mm":
        fields["coords_mm"] = fields["coords_mm"].clone()
        fields["coords_mm"][3, 1] = float("nan")
    elif name == "rows_2d":
        fields["rows_2d"] = fields["rows_2d"].clone()
        fields["rows_2d"][0] = 1  # row 1 named twice, row 0 never
    elif name == "rows_3d":
        fields["rows_2d"], fields["rows_3d"] = fields["rows_2d"].clone(), fields["rows_3d"].clone()
        fields["rows_2d"][0], fields["rows_3d"][0] = 6, 0  # a 2D row listed as 3D and vice versa
    elif name == "kept_indices":
        fields["kept_indices"] = fields["kept_indices"].clone()
        fields["kept_indices"][1] = 6  # image 0 has a 2 x 3 grid
    elif name == "grid_shapes":
        fields["grid_shapes"] = [(2, 2, 3), (2, 2, 1), (1, 2, 2)]  # a 2D image two layers deep
    elif name == "is_3d":
        fields["is_3d"] = [False, True]
    return fields


@pytest.mark.parametrize(
    ("corruption", "argument"),
    [
        ("cu_seqlens_dtype", "cu_seqlens"),
        ("cu_seqlens_end", "cu_seqlens"),
        ("cu_seqlens_decreasing", "cu_seqlens"),
        ("max_seqlen", "max_seqlen"),
        ("patches_2d", "patches_2d"),
        ("patches_3d", "patches_3d"),
        ("coords_mm", "coords_mm"),
        ("rows_2d", "rows_2d"),
        ("rows_3d", "rows_2d"),
        ("kept_indices", "kept_indices"),
        ("grid_shapes", "grid_shapes"),
        ("is_3d", "is_3d"),
    ],
)
def test_an_inconsistent_batch_is_rejected_naming_the_argument(corruption, argument):
    fields = _corrupt(batch_fields(pack(mixed_items())), corruption)
    with pytest.raises((ValueError, TypeError), match=argument):
        PackedBatch(**fields)


def test_unvalidated_construction_is_marked():
    batch = PackedBatch(**batch_fields(pack(mixed_items())), validate=False)
    assert not batch.validated


def test_cu_seqlens_from_lengths():
    assert cu_seqlens_from_lengths([3, 0, 2]).tolist() == [0, 3, 3, 5]
    with pytest.raises(ValueError, match="lengths"):
        cu_seqlens_from_lengths([1, -1])
