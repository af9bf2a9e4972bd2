"""The trainer: configs, checkpoints, a run's outputs, and exact resume."""

import dataclasses
import json
import re
import warnings

import pytest
import torch

from mmv.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint
from mmv.model.config import EncoderConfig
from mmv.model.encoder import Encoder
from mmv.pretrain_data import modality_preprocess
from mmv.train import Trainer
from mmv.train_config import ModelConfig, OptimConfig, PretrainConfig, RunSettings, apply_overrides, load_config

from train_helpers import SyntheticImages, tiny_config


@pytest.fixture(autouse=True)
def _restore_threads():
    # The tiny runs use one thread (run.num_threads); the rest of the test session keeps its own.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_config_from_toml_with_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\npreset = "vit_tiny"\n[optim]\nsteps = 10\nbetas = [0.9, 0.95]\n')
    config = load_config(path, ["optim.lr=2e-3", 'run.out_dir="elsewhere"', "augment.global_size_3d=[64, 64, 64]"])
    assert config.model.preset == "vit_tiny" and config.optim.steps == 10
    assert config.optim.betas == (0.9, 0.95) and config.optim.lr == 2e-3
    assert config.run.out_dir == "elsewhere" and config.augment.global_size_3d == (64, 64, 64)
    assert PretrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_model_and_data_sections_build_the_encoder_config_and_preprocessing(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        '[model]\npreset = "vit_tiny"\noptions = { layer_scale_init = "none", patch_size = [8, 8, 8] }\n'
        "[data]\nct_spacing = [4.0, 4.0, 4.0]\nxray_spacing = 2.5\n"
    )
    config = load_config(path)
    encoder_config = config.model.encoder_config()
    assert encoder_config.layer_scale_init is None and encoder_config.patch_size == (8, 8, 8)
    assert encoder_config == EncoderConfig.from_preset("vit_tiny", layer_scale_init=None, patch_size=(8, 8, 8))
    preprocess = modality_preprocess(config.data)
    assert preprocess.ct.spacing == (4.0, 4.0, 4.0)
    assert preprocess.xray.spacing == (2.5, 2.5) and preprocess.xray.short_side is None
    by_side = modality_preprocess(dataclasses.replace(config.data, xray_spacing=None, xray_short_side=256))
    assert by_side.xray.short_side == 256 and by_side.xray.spacing is None


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown key"):
        PretrainConfig.from_dict({"optim": {"learning_rate": 1.0}})
    with pytest.raises(ValueError, match="unknown section"):
        PretrainConfig.from_dict({"optimiser": {}})
    with pytest.raises(ValueError, match="section.key=value"):
        apply_overrides({}, ["lr=3"])
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=abc", "optim.lr must be a number, got 'abc'"),
        ("optim.steps=true", "optim.steps must be an integer, got True"),
        ("run.seed=1.5", "run.seed must be an integer, got 1.5"),
        ('data.ct_spacing=[1.5, "a", 1.5]', "data.ct_spacing must be a list of 3 numbers"),
        ("augment.global_size_2d=[224]", "augment.global_size_2d must be a list of 2 integers, got [224]"),
        ("augment.flip_axes=[1]", "augment.flip_axes must be a list of strings"),
        ("data.sources=3", "data.sources must be a list of tables, got 3"),
        ("optim.clip_grad=off", 'optim.clip_grad must be a number or "none"'),
        ("run.progress=1", "run.progress must be true or false, got 1"),
        ('model.options.embed_dim="abc"', "model.options: EncoderConfig: embed_dim must be an int"),
    ],
)
def test_every_config_field_is_type_checked_when_the_config_is_built(override, message):
    with pytest.raises(TypeError, match=re.escape(message)):
        load_config(None, [override])


def test_config_values_are_normalised_and_checked_on_direct_construction():
    config = load_config(None, ["optim.lr=1", "optim.clip_grad=none", "data.ct_spacing=[2, 2, 2]"])
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float) and config.optim.clip_grad is None
    assert config.data.ct_spacing == (2.0, 2.0, 2.0)
    with pytest.raises(TypeError, match="optim.warmup_steps must be an integer"):
        OptimConfig(warmup_steps="10")
    with pytest.raises(ValueError, match="model.preset must be one of"):
        ModelConfig(preset="vit_huge")
    with pytest.raises(ValueError, match="run.bf16 must be true, false or 'auto'"):
        RunSettings(bf16="yes")


def test_a_warmup_longer_than_the_run_is_flagged_naming_both_keys():
    with pytest.warns(UserWarning, match=re.escape("optim.warmup_steps (100) is longer than the run (optim.steps = 50)")):
        load_config(None, ["optim.steps=50", "ssl.teacher_temperature_warmup_steps=10"])
    with pytest.warns(UserWarning, match=re.escape("ssl.teacher_temperature_warmup_steps (300) is longer than the run")):
        load_config(None, ["optim.steps=200"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(None, ["optim.steps=300"])


def test_checkpoints_keep_the_last_k_and_refuse_corrupt_files(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, {"step": step, "weights": torch.ones(2) * step}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003.pt", "step_00000004.pt"]
    assert not list(tmp_path.glob("*.tmp"))
    assert load_checkpoint(tmp_path / "step_00000004.pt")["weights"].tolist() == [4.0, 4.0]
    broken = tmp_path / "step_00000005.pt"
    broken.write_bytes((tmp_path / "step_00000004.pt").read_bytes()[:50])
    with pytest.raises(CheckpointError, match="step_00000005.pt"):
        load_checkpoint(broken)


def test_a_run_writes_metrics_plot_checkpoints_and_encoder(tmp_path):
    config = tiny_config(tmp_path, steps=4)
    history = Trainer(config, dataset=SyntheticImages()).train()
    assert [record["step"] for record in history] == [1, 2, 3, 4]
    assert all(record["tokens"] > 0 for record in history)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[0]["lr"] == 0.0 and metrics[2]["lr"] > 0
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000002.pt", "step_00000004.pt"]
    encoder = Encoder.from_pretrained(tmp_path / "encoder")
    assert encoder.config.embed_dim == 32
    assert encoder.preprocess == modality_preprocess(config.data)  # the run's preprocessing travels with it


def test_resumed_run_continues_with_the_same_losses(tmp_path):
    dataset = SyntheticImages()
    uninterrupted = Trainer(tiny_config(tmp_path / "a", steps=6), dataset=dataset).train()
    first = Trainer(tiny_config(tmp_path / "b", steps=6), dataset=dataset).train(until_step=3)
    torch.manual_seed(1234)  # whatever happens to the global generators in between is undone by resuming
    resumed_trainer = Trainer(tiny_config(tmp_path / "b", steps=6), dataset=dataset, resume=True)
    assert resumed_trainer.step == 3
    second = resumed_trainer.train()
    losses = [(r["loss"], r["dino"], r["ibot"], r["koleo"]) for r in uninterrupted]
    assert losses == [(r["loss"], r["dino"], r["ibot"], r["koleo"]) for r in first + second]
    final_a = torch.load(tmp_path / "a" / "checkpoints" / "step_00000006.pt", weights_only=True)["teacher"]
    final_b = torch.load(tmp_path / "b" / "checkpoints" / "step_00000006.pt", weights_only=True)["teacher"]
    assert all(torch.equal(final_a[name], final_b[name]) for name in final_a)


def test_training_moves_the_weights_and_the_teacher_follows(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, steps=3, optim={"freeze_last_layer_steps": 0}), dataset=SyntheticImages())
    before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    trainer.train()
    after = trainer.student.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(teacher_before[k], v) for k, v in trainer.teacher.state_dict().items())
