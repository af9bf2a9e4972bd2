"""mmv.Encoder: configs, batch invariances, 2D/3D weight sharing, gradients, checkpoints, bad input, compile."""

import json
import shutil
import sys

import pytest
import torch

from mmv.data import CtPreprocess, ModalityPreprocess, XrayPreprocess
from mmv.image import Image
from mmv.model import checkpoint
from mmv.model.checkpoint import CheckpointError
from mmv.model.config import EncoderConfig
from mmv.model.encoder import Encoder, EncoderOutput, MissingPreprocessWarning
from mmv.model.layers import PackedContext, drop_path_per_image
from mmv.packing import PackedBatch, pack
from mmv.tokenizer import Tokenizer

# No LayerScale by default here: at its usual 1e-5 the blocks start as near-identities, and comparisons
# of outputs would barely depend on attention.
TINY = dict(embed_dim=32, depth=2, num_heads=2, patch_size=(4, 8, 8), num_registers=2, qk_norm=True,
            layer_scale_init=None)


def tiny_encoder(**overrides) -> Encoder:
    torch.manual_seed(0)
    return Encoder(EncoderConfig(**{**TINY, **overrides})).eval()


def mixed_images():
    generator = torch.Generator().manual_seed(1)
    return [
        Image(torch.randn(16, 24, generator=generator), (0.5, 0.5), "DX"),
        Image(torch.randn(8, 16, 16, generator=generator), (2.0, 1.0, 1.0), "CT"),
        Image(torch.randn(20, 13, generator=generator), (0.3, 0.4)),
        Image(torch.randn(5, 9, 17, generator=generator), (1.5, 0.8, 0.8), "CT"),
    ]


def close(actual, expected, atol=2e-5):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=atol)


# --------------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize(
    ("name", "width", "depth", "heads", "millions"),
    [("vit_tiny", 192, 12, 3, (5, 7)), ("vit_small", 384, 12, 6, (21, 25)), ("vit_base", 768, 12, 12, (85, 90)),
     ("vit_large", 1024, 24, 16, (302, 310))],
)
def test_presets_have_the_standard_sizes(name, width, depth, heads, millions):
    with torch.device("meta"):
        encoder = Encoder.from_preset(name)
    config = encoder.config
    assert (config.embed_dim, config.depth, config.num_heads) == (width, depth, heads)
    assert config.patch_size == (16, 16, 16) and config.head_dim == 64
    assert config.rope_sections == (12, 10, 10)
    assert len(encoder.blocks) == depth
    params = sum(p.numel() for p in encoder.parameters()) / 1e6
    assert millions[0] < params < millions[1]


def test_config_round_trips_through_json_and_rejects_unknown_or_bad_values():
    config = EncoderConfig.from_preset("vit_tiny", mlp="swiglu", num_registers=4, rope_sections=(8, 12, 12))
    assert EncoderConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown keys.*'width'"):
        EncoderConfig.from_dict({**config.to_dict(), "width": 3})
    with pytest.raises(ValueError, match="name"):
        EncoderConfig.from_preset("vit_huge")
    for bad, match in [
        ({"num_heads": 5}, "divisible"),
        ({"mlp": "relu"}, "mlp"),
        ({"patch_size": (16, 16)}, "patch_size"),
        ({"coordinate_unit_mm": 0.0}, "coordinate_unit_mm"),
        ({"rope_sections": (20, 10, 10)}, "rope_sections"),
        ({"drop_path_rate": 1.0}, "drop_path_rate"),
        ({"depth": 0}, "depth"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            EncoderConfig(**bad)


# --------------------------------------------------------------------------------------------------
# Behaviour of the packed forward


def test_outputs_have_the_documented_shapes():
    encoder = tiny_encoder()
    images = mixed_images()
    out = encoder(images)
    assert isinstance(out, EncoderOutput)
    num_tokens = out.batch.num_tokens
    assert out.cls.shape == (4, 32) and out.pooled.shape == (4, 32)
    assert out.registers.shape == (4, 2, 32)
    assert out.patch_tokens.shape == (num_tokens, 32)
    assert out.cu_seqlens.tolist() == [0, 6, 14, 20, 32]
    assert [tuple(g.shape) for g in out.unpack()] == [(2, 3, 32), (2, 2, 2, 32), (3, 2, 32), (2, 2, 3, 32)]
    for pooled, tokens in zip(out.pooled, out.split()):
        close(pooled, tokens.mean(0))


def test_an_image_alone_equals_the_same_image_inside_a_mixed_batch():
    encoder = tiny_encoder()
    images = mixed_images()
    together = encoder(images)
    for index, image in enumerate(images):
        alone = encoder([image])
        close(alone.cls[0], together.cls[index])
        close(alone.registers[0], together.registers[index])
        close(alone.patch_tokens, together.split()[index])


def test_permuting_the_images_permutes_the_outputs():
    encoder = tiny_encoder()
    images = mixed_images()
    order = [2, 0, 3, 1]
    out = encoder(images)
    permuted = encoder([images[i] for i in order])
    close(permuted.cls, out.cls[order])
    close(permuted.pooled, out.pooled[order])
    for grid, i in zip(permuted.unpack(), order):
        close(grid, out.unpack()[i])


def test_a_2d_image_equals_the_image_repeated_pz_times_as_a_one_token_deep_volume():
    encoder = tiny_encoder()
    pz = encoder.config.patch_size[0]
    image = torch.randn(16, 24, generator=torch.Generator().manual_seed(5))
    flat = encoder([Image(image, (0.5, 0.7))])
    deep = encoder([Image(image.expand(pz, -1, -1), (3.0, 0.5, 0.7))])
    assert not flat.batch.is_3d[0] and deep.batch.is_3d[0]
    torch.testing.assert_close(flat.batch.coords_mm, deep.batch.coords_mm, rtol=0, atol=0)
    close(flat.cls, deep.cls, atol=1e-4)
    close(flat.patch_tokens, deep.patch_tokens, atol=1e-4)


def test_a_channel_first_2d_array_is_the_2d_image():
    # [1, H, W] once took the 3D path and gave another CLS than [H, W].
    encoder = tiny_encoder()
    image = torch.randn(16, 24, generator=torch.Generator().manual_seed(7))
    flat, channel_first = encoder([image]), encoder([image[None]])
    assert not channel_first.batch.is_3d[0]
    torch.testing.assert_close(channel_first.cls, flat.cls, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(3, 32, 32), (32, 32, 3), (32, 32, 1), (4, 32, 32), (1, 3, 32, 32), (1, 1, 32, 32)])
def test_arrays_that_may_be_colour_images_raise_naming_the_input_and_shape(shape):
    # (H, W, 3) and (3, H, W) were once encoded as volumes of 32 or 3 slices.
    with pytest.raises(ValueError, match="ambiguous") as raised:
        tiny_encoder()([torch.zeros(16, 16), torch.zeros(shape)])
    assert "inputs[1]" in str(raised.value) and str(shape) in str(raised.value)


def test_physical_spacing_changes_the_encoding():
    encoder = tiny_encoder()
    image = torch.randn(16, 24, generator=torch.Generator().manual_seed(6))
    fine = encoder([Image(image, (0.2, 0.2))])
    coarse = encoder([Image(image, (2.0, 2.0))])
    assert (fine.cls - coarse.cls).abs().max() > 1e-3


def test_a_packed_batch_and_a_list_of_images_give_the_same_result():
    encoder = tiny_encoder()
    images = mixed_images()
    batch = pack([encoder.tokenizer(image) for image in images])
    close(encoder(batch).cls, encoder(images).cls, atol=0)


def test_dropped_tokens_are_never_seen_and_come_back_as_nan():
    encoder = tiny_encoder()
    tokenizer = Tokenizer(encoder.config.patch_size, drop_rate=0.5)
    generator = torch.Generator().manual_seed(0)
    batch = pack([tokenizer(image, generator) for image in mixed_images()])
    out = encoder(batch)
    for grid, kept in zip(out.unpack(), batch.split(batch.kept_indices)):
        flat = grid.reshape(-1, 32)
        is_kept = torch.zeros(flat.shape[0], dtype=torch.bool)
        is_kept[kept] = True
        assert torch.isfinite(flat[is_kept]).all()
        assert torch.isnan(flat[~is_kept]).all()
        assert (~is_kept).any()


def test_an_image_without_patch_tokens_still_gets_a_cls_token_and_a_nan_mean():
    encoder = tiny_encoder()
    images = mixed_images()[:2]
    batch = pack([encoder.tokenizer(image) for image in images])
    empty_first = PackedBatch(
        **{
            **_fields(batch),
            "cu_seqlens": torch.cat((torch.zeros(1, dtype=torch.int32), batch.cu_seqlens)),
            "grid_shapes": ((1, 2, 2), *batch.grid_shapes),
            "is_3d": (False, *batch.is_3d),
            "modalities": (None, *batch.modalities),
        }
    )
    out = encoder(empty_first)
    assert out.cls.shape == (3, 32) and torch.isfinite(out.cls).all()
    assert torch.isnan(out.pooled[0]).all() and torch.isfinite(out.pooled[1:]).all()
    close(out.cls[1:], encoder(batch).cls)
    assert torch.isnan(out.unpack()[0]).all()


def test_token_mask_replaces_the_masked_embeddings_by_the_mask_token():
    encoder = tiny_encoder()
    images = mixed_images()
    batch = pack([encoder.tokenizer(image) for image in images])
    mask = torch.zeros(batch.num_tokens, dtype=torch.bool)
    mask[batch.cu_seqlens[1] : batch.cu_seqlens[2]] = True  # every token of image 1
    plain = encoder(batch)
    masked = encoder(batch, token_mask=mask)
    close(masked.cls[[0, 2, 3]], plain.cls[[0, 2, 3]])
    assert (masked.cls[1] - plain.cls[1]).abs().max() > 1e-4
    with torch.no_grad():
        encoder.mask_token.normal_()
    patched = batch.patches_3d.clone()
    patched[:8] = torch.randn(8, patched.shape[1])  # image 1 holds the first 8 3D patches
    other_pixels = encoder(PackedBatch(**{**_fields(batch), "patches_3d": patched}), token_mask=mask)
    close(other_pixels.cls[1], encoder(batch, token_mask=mask).cls[1])


def _fields(batch):
    names = ("patches_2d", "patches_3d", "rows_2d", "rows_3d", "coords_mm", "cu_seqlens", "max_seqlen",
             "kept_indices", "grid_shapes", "is_3d", "modalities", "patch_size")
    return {name: getattr(batch, name) for name in names}


def test_validated_batches_skip_the_attention_checks(monkeypatch):
    layers_module = sys.modules["mmv.model.layers"]
    seen = []
    real = layers_module.packed_attention

    def recording(*args, **kwargs):
        seen.append(kwargs["validate"])
        return real(*args, **kwargs)

    monkeypatch.setattr(layers_module, "packed_attention", recording)
    encoder = tiny_encoder()
    batch = pack([encoder.tokenizer(image) for image in mixed_images()])
    encoder(batch)
    assert seen and not any(seen)
    seen.clear()
    encoder(PackedBatch(**_fields(batch), validate=False))
    assert seen and all(seen)


def test_gradients_reach_every_parameter():
    encoder = tiny_encoder(mlp="swiglu", layer_scale_init=0.1).train()
    images = mixed_images()
    batch = pack([encoder.tokenizer(image) for image in images])
    mask = torch.zeros(batch.num_tokens, dtype=torch.bool)
    mask[::3] = True
    out = encoder(batch, token_mask=mask)
    loss = (out.cls**2).sum() + (out.patch_tokens**2).sum() + (out.registers**2).sum()
    loss.backward()
    for name, parameter in encoder.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name
    assert any("ls1.gamma" in name for name, _ in encoder.named_parameters())


def test_stochastic_depth_drops_whole_images():
    torch.manual_seed(0)
    lengths = [3, 5, 2, 4, 6, 1, 3, 2]
    sequence_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    context = PackedContext(None, 0, None, None, (0, 0, 0), sequence_ids, len(lengths), False)
    branch = torch.ones(int(sum(lengths)), 4)
    dropped = drop_path_per_image(branch, 0.5, context)
    values = set()
    for image in range(len(lengths)):
        rows = dropped[sequence_ids == image]
        assert torch.unique(rows).numel() == 1, "one decision per image"
        values.add(rows[0, 0].item())
    assert values == {0.0, 2.0}


def test_training_with_stochastic_depth_runs_and_differs_from_eval():
    encoder = tiny_encoder(drop_path_rate=0.9)
    images = mixed_images()
    reference = encoder(images).cls
    encoder.train()
    torch.manual_seed(3)
    assert not torch.allclose(encoder(images).cls, reference)


def test_bf16_autocast_stays_close_to_float32():
    encoder = tiny_encoder()
    images = mixed_images()
    reference = encoder(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = encoder(images)
    assert torch.isfinite(low.patch_tokens).all()
    similarity = torch.nn.functional.cosine_similarity(low.patch_tokens.float(), reference.patch_tokens, dim=1)
    assert similarity.min() > 0.99


def test_casting_the_weights_keeps_the_rotary_frequencies_float32():
    encoder = tiny_encoder().to(torch.float64)
    assert encoder.rope_freqs.dtype == torch.float32
    assert encoder.cls_token.dtype == torch.float64


# --------------------------------------------------------------------------------------------------
# Checkpoints


def test_save_and_load_round_trip_is_exact(tmp_path):
    encoder = tiny_encoder(mlp="swiglu")
    encoder.save_pretrained(tmp_path / "enc")
    assert (tmp_path / "enc" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "enc" / "config.json").read_text())["mlp"] == "swiglu"
    loaded = Encoder.from_pretrained(tmp_path / "enc")
    assert loaded.config == encoder.config and not loaded.training
    for (name, a), (_, b) in zip(encoder.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    images = mixed_images()
    torch.testing.assert_close(loaded(images).patch_tokens, encoder(images).patch_tokens, rtol=0, atol=0)


def test_weights_of_another_model_raise_a_checkpoint_error_naming_the_file(tmp_path):
    tiny_encoder().save_pretrained(tmp_path / "a")
    tiny_encoder(embed_dim=64).save_pretrained(tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").replace(tmp_path / "a" / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors.*shape") as error:
        Encoder.from_pretrained(tmp_path / "a")
    assert error.value.path == str(tmp_path / "a" / "model.safetensors")
    tiny_encoder(num_registers=0).save_pretrained(tmp_path / "c")
    (tmp_path / "c" / "model.safetensors").replace(tmp_path / "a" / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing.*register_tokens"):
        Encoder.from_pretrained(tmp_path / "a")


@pytest.mark.parametrize("use_safetensors", [True, False])
def test_a_truncated_weight_file_raises_a_checkpoint_error_naming_the_file(tmp_path, monkeypatch, use_safetensors):
    if not use_safetensors:
        monkeypatch.setattr(checkpoint, "safetensors_torch", None)
    tiny_encoder().save_pretrained(tmp_path)
    path = tmp_path / ("model.safetensors" if use_safetensors else "model.pt")
    assert path.is_file()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read the weights") as error:
        Encoder.from_pretrained(tmp_path)
    assert str(path) in str(error.value)


def test_the_torch_fallback_format_round_trips(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "safetensors_torch", None)
    encoder = tiny_encoder()
    encoder.save_pretrained(tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
    loaded = Encoder.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(encoder.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_missing_or_invalid_checkpoint_files_raise_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing")):
        Encoder.from_pretrained(tmp_path / "nothing")
    tiny_encoder().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_heads": 3}))
    with pytest.raises(CheckpointError, match="config.json.*divisible"):
        Encoder.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        Encoder.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Encoder.from_pretrained(tmp_path)


def test_the_preprocessing_travels_with_the_saved_encoder(tmp_path):
    encoder = tiny_encoder()
    assert encoder.preprocess == ModalityPreprocess()
    encoder.preprocess = ModalityPreprocess(
        CtPreprocess(spacing=(4.0, 2.0, 2.0), window=(-1200.0, 600.0), size_mm=(None, 300.0, 300.0)),
        XrayPreprocess(short_side=None, spacing=(1.0, 1.0), percentiles=(1.0, 99.0)),
    )
    encoder.save_pretrained(tmp_path / "enc")
    copied = shutil.copytree(tmp_path / "enc", tmp_path / "elsewhere")
    loaded = Encoder.from_pretrained(copied)
    assert loaded.preprocess == encoder.preprocess
    volume = Image(torch.randn(8, 12, 12) * 500, (8.0, 4.0, 4.0), "CT")
    assert loaded.preprocess(volume).spacing == (4.0, 2.0, 2.0)
    encoder.preprocess = "ct 1.5 mm"
    with pytest.raises(TypeError, match="preprocess"):
        encoder.save_pretrained(tmp_path / "bad")


def test_an_encoder_directory_without_recorded_preprocessing_loads_with_the_defaults_and_a_warning(tmp_path):
    tiny_encoder().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "preprocess"}))
    with pytest.warns(MissingPreprocessWarning, match="config.json.*default"):
        loaded = Encoder.from_pretrained(tmp_path)
    assert loaded.preprocess == ModalityPreprocess()
    (tmp_path / "config.json").write_text(json.dumps({**config, "preprocess": {"ct": config["preprocess"]["ct"]}}))
    with pytest.raises(CheckpointError, match="config.json.*preprocess.*missing \\['xray'\\]"):
        Encoder.from_pretrained(tmp_path)


def test_from_pretrained_accepts_the_config_or_weights_file_of_the_directory(tmp_path):
    encoder = tiny_encoder()
    encoder.save_pretrained(tmp_path / "enc")
    for path in (tmp_path / "enc" / "config.json", tmp_path / "enc" / "model.safetensors"):
        loaded = Encoder.from_pretrained(path)
        assert torch.equal(loaded.cls_token, encoder.cls_token)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match="notes.txt.*directory save_pretrained wrote"):
        Encoder.from_pretrained(tmp_path / "notes.txt")


def test_a_config_missing_a_field_names_it_instead_of_blaming_the_weights(tmp_path):
    tiny_encoder().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["embed_dim"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json.*missing required keys \\['embed_dim'\\]"):
        Encoder.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="missing required keys \\['depth', 'mlp'\\]"):
        EncoderConfig.from_dict({k: v for k, v in EncoderConfig().to_dict().items() if k not in ("depth", "mlp")})


def test_every_size_is_bounded_and_the_presets_fit():
    for name in ("vit_tiny", "vit_small", "vit_base", "vit_large"):
        EncoderConfig.from_preset(name)
    EncoderConfig(embed_dim=16384, num_heads=64, depth=1, mlp_ratio=1.0, num_registers=1024)
    EncoderConfig(embed_dim=64, num_heads=1, depth=512, mlp_ratio=64.0, patch_size=(1, 512, 512))
    for overrides, field in [
        ({"depth": 513}, "depth"),
        ({"embed_dim": 2**20, "num_heads": 2**13}, "embed_dim"),
        ({"num_registers": 1025}, "num_registers"),
        ({"mlp_ratio": 64.5}, "mlp_ratio"),
        ({"patch_size": (1, 513, 16)}, "patch_size"),
        ({"embed_dim": 16384, "num_heads": 64, "depth": 512}, "parameters"),
    ]:
        with pytest.raises(ValueError, match=field):
            EncoderConfig(**overrides)


@pytest.mark.parametrize(
    "hostile",
    [
        {"depth": 10**7},
        {"embed_dim": 2**20, "num_heads": 2**13},
        {"num_registers": 10**9},
        {"embed_dim": 8192, "num_heads": 32, "depth": 512},
    ],
)
def test_an_oversized_config_raises_a_checkpoint_error_before_any_allocation(tmp_path, monkeypatch, hostile):
    tiny_encoder().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **hostile}))

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built from an unchecked config")

    monkeypatch.setattr(Encoder, "__init__", no_model)
    with pytest.raises(CheckpointError, match="config.json.*at most|config.json.*parameters") as error:
        Encoder.from_pretrained(tmp_path)
    assert error.value.path == str(tmp_path / "config.json")


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"embed_dim": ' + "[" * 100_000 + "]" * 100_000 + "}"])
def test_a_deeply_nested_config_raises_a_checkpoint_error(tmp_path, text):
    tiny_encoder().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match="config.json.*nested too deeply"):
        Encoder.from_pretrained(tmp_path)


def test_a_huge_config_file_is_not_read(tmp_path):
    tiny_encoder().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"padding": "x" * (2 << 20)}))
    with pytest.raises(CheckpointError, match="config.json.*more than a config can be"):
        Encoder.from_pretrained(tmp_path)


def test_one_checkpoint_error_class_for_training_checkpoints_and_encoder_directories(tmp_path):
    import mmv
    import mmv.train.checkpoint

    assert mmv.CheckpointError is CheckpointError is mmv.train.checkpoint.CheckpointError
    broken = tmp_path / "step_00000001.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(mmv.CheckpointError, match="step_00000001.pt"):
        mmv.train.checkpoint.load_checkpoint(broken)


def test_a_full_disk_while_saving_says_so_and_leaves_the_old_files(tmp_path, monkeypatch):
    import errno
    import io

    from mmv import files

    encoder = tiny_encoder()
    encoder.save_pretrained(tmp_path)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}

    class FullDisk(io.FileIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "open", lambda path, mode: FullDisk(path, mode), raising=False)
    with pytest.raises(OSError, match=f"no space left on {tmp_path}") as error:
        tiny_encoder(embed_dim=64).save_pretrained(tmp_path)
    assert error.value.errno == errno.ENOSPC
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


# --------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("inputs", "error", "match"),
    [
        ([torch.zeros(8)], ValueError, r"inputs\[0\].*\[H, W\]"),
        ([torch.zeros(16, 16), torch.zeros(3, 8, 16, 16)], ValueError, r"inputs\[1\].*one channel"),
        ([torch.zeros(16, 0)], ValueError, r"inputs\[0\].*empty"),
        ([torch.full((8, 8), float("nan"))], ValueError, "finite"),
        ([], ValueError, "inputs"),
        (torch.zeros(8, 8), TypeError, "inputs"),
        ([object()], TypeError, r"inputs\[0\]"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(inputs, error, match):
    with pytest.raises(error, match=match):
        tiny_encoder()(inputs)


def test_non_finite_spacing_is_rejected_naming_spacing():
    with pytest.raises(ValueError, match="spacing"):
        tiny_encoder()([Image(torch.zeros(8, 8), (float("nan"), 1.0))])


def test_a_batch_with_another_patch_size_or_a_bad_token_mask_is_rejected():
    encoder = tiny_encoder()
    batch = pack([Tokenizer((2, 8, 8))(torch.zeros(16, 16))])
    with pytest.raises(ValueError, match="patch_size"):
        encoder(batch)
    batch = pack([encoder.tokenizer(torch.zeros(16, 16))])
    with pytest.raises(ValueError, match="token_mask"):
        encoder(batch, token_mask=torch.zeros(batch.num_tokens + 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="token_mask"):
        encoder(batch, token_mask=torch.zeros(batch.num_tokens))


# --------------------------------------------------------------------------------------------------
# torch.compile


def _compiled_matches_eager(backend, check_another_batch):
    torch._dynamo.reset()
    encoder = tiny_encoder(depth=1).train()
    images = mixed_images()
    batch = pack([encoder.tokenizer(image) for image in images])
    compiled = torch.compile(encoder, backend=backend)
    out = compiled(batch)
    (out.cls**2 + out.pooled**2).sum().backward()
    compiled_grads = {name: p.grad for name, p in encoder.named_parameters()}
    encoder.zero_grad(set_to_none=True)
    reference = encoder(batch)
    (reference.cls**2 + reference.pooled**2).sum().backward()
    close(out.cls, reference.cls, atol=1e-5)
    close(out.patch_tokens, reference.patch_tokens, atol=1e-5)
    for name, parameter in encoder.named_parameters():
        if name == "mask_token":  # no token_mask here, so no gradient either way
            assert compiled_grads[name] is None and parameter.grad is None
        else:
            # Relative to each gradient's scale: the CLS token's is ~1e4 (a 1e-6 vector through LayerNorm).
            difference = (compiled_grads[name] - parameter.grad).abs().max()
            assert difference <= 1e-4 * parameter.grad.abs().max() + 1e-6, name
    if check_another_batch:  # another size and composition: a recompile with dynamic shapes
        other = compiled(images[:3])
        close(other.cls, encoder(images[:3]).cls, atol=1e-5)


def test_torch_compile_traces_the_encoder_with_the_ops_fake_kernels():
    _compiled_matches_eager("aot_eager", check_another_batch=False)


@pytest.mark.slow
def test_torch_compile_with_inductor_matches_eager():
    _compiled_matches_eager("inductor", check_another_batch=True)


def test_torch_compile_with_dynamic_sizes_encodes_other_numbers_of_images_and_tokens_without_compiling_again():
    torch._dynamo.reset()
    encoder = tiny_encoder(depth=1)
    images = mixed_images()
    more_xrays = [Image(torch.randn(8, 16), (1.0, 1.0), "DX"), Image(torch.randn(16, 16), (0.5, 0.7), "DX")]
    longer_xray = Image(torch.randn(40, 40), (1.0, 1.0), "DX")
    first = pack([encoder.tokenizer(image) for image in images])
    same_longest = pack([encoder.tokenizer(image) for image in images[1:] + more_xrays * 2])
    new_longest = pack([encoder.tokenizer(image) for image in [*images, longer_xray]])
    assert same_longest.max_seqlen == first.max_seqlen and new_longest.max_seqlen != first.max_seqlen
    assert len({(b.num_images, b.num_tokens) for b in (first, same_longest, new_longest)}) == 3
    compiled = torch.compile(encoder, backend="aot_eager", dynamic=True)
    close(compiled(first).cls, encoder(first).cls, atol=1e-6)
    for batch in (same_longest, new_longest):
        with torch._dynamo.config.patch(error_on_recompile=True):
            out = compiled(batch)
        reference = encoder(batch)
        for name in ("cls", "registers", "patch_tokens", "pooled"):
            close(getattr(out, name), getattr(reference, name), atol=1e-6)
