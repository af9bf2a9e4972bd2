"""The trainer: configs, checkpoints, a run's outputs, and exact resume."""

import dataclasses
import errno
import io
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from helpers.training import SyntheticImages, tiny_config

import mmv.train
from mmv import files
from mmv.model.checkpoint import CheckpointError
from mmv.model.config import EncoderConfig
from mmv.model.encoder import Encoder
from mmv.train import Trainer, encoder_from_checkpoint
from mmv.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from mmv.ssl.augment import CropSpec, MultiCrop
from mmv.train.config import (
    AugmentConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    RunSettings,
    apply_overrides,
    load_config,
)
from mmv.train.sources import modality_preprocess


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


@pytest.mark.parametrize(
    "override", ["optim.steps=0", "optim.accumulation=0", "run.log_every=0", "run.checkpoint_every=0", "run.keep_checkpoints=0"]
)
def test_counts_and_periods_must_be_positive_when_the_config_is_built(override):
    # A zero period would end the run at its first step (the loop takes the step modulo it).
    with pytest.raises(ValueError, match=re.escape(f"{override.split('=')[0]} must be positive, got 0")):
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


@pytest.mark.parametrize(
    "override, message",
    [
        ("ssl.num_prototypes=0", "ssl.num_prototypes must lie in [1, 1048576], got 0"),
        ("ssl.num_prototypes=1000000000", "ssl.num_prototypes must lie in [1, 1048576], got 1000000000"),
        ("ssl.head_hidden_dim=100000", "ssl.head_hidden_dim must lie in [1, 65536], got 100000"),
        ("ssl.head_layers=1000", "ssl.head_layers must lie in [1, 16], got 1000"),
        ("ssl.head_bottleneck_dim=65536", "give a head layer of 4294967296 weights, more than 2147483648"),
    ],
)
def test_ssl_head_sizes_are_bounded_before_any_head_is_built(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(None, [override])


def test_a_warmup_longer_than_the_run_is_flagged_naming_both_keys():
    with pytest.warns(UserWarning, match=re.escape("optim.warmup_steps (100) is longer than the run (optim.steps = 50)")):
        load_config(None, ["optim.steps=50", "ssl.teacher_temperature_warmup_steps=10"])
    with pytest.warns(UserWarning, match=re.escape("ssl.teacher_temperature_warmup_steps (300) is longer than the run")):
        load_config(None, ["optim.steps=200"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(None, ["optim.steps=300"])


def test_the_augment_section_takes_its_view_defaults_from_multicrop():
    # One source of the defaults: a default [augment] section builds the default MultiCrop.
    assert AugmentConfig().multicrop() == MultiCrop()
    changed = AugmentConfig(
        num_global=1, num_local=3, global_size_2d=[40, 48], global_size_3d=[8, 16, 24], local_size_2d=[8, 16],
        local_size_3d=[4, 8, 12], global_scale=[0.5, 0.9], local_scale=[0.1, 0.2], aspect_ratio=[0.5, 2.0],
        contrast=[0.7, 1.1], brightness=[-0.2, 0.3], blur_probability=0.25, blur_sigma_mm=[1.0, 2.0],
        noise_probability=0.75, noise_std=[0.01, 0.02], flip_axes=["x"],
    )
    assert changed.multicrop() == MultiCrop(
        global_crop=CropSpec((40, 48), (8, 16, 24), (0.5, 0.9), (0.5, 2.0)),
        local_crop=CropSpec((8, 16), (4, 8, 12), (0.1, 0.2), (0.5, 2.0)),
        num_global=1, num_local=3, contrast=(0.7, 1.1), brightness=(-0.2, 0.3), blur_probability=0.25,
        blur_sigma_mm=(1.0, 2.0), noise_probability=0.75, noise_std=(0.01, 0.02), flip_axes=("x",),
    )


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


def _same_weights(a, b):
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_encoder_from_checkpoint_gives_the_teacher_or_the_student_with_the_runs_preprocessing(tmp_path):
    config = tiny_config(tmp_path, steps=2)
    trainer = Trainer(config, dataset=SyntheticImages())
    trainer.train()
    path = tmp_path / "checkpoints" / "step_00000002.pt"
    teacher = mmv.train.encoder_from_checkpoint(path)
    assert isinstance(teacher, Encoder) and not teacher.training
    assert _same_weights(teacher, Encoder.from_pretrained(tmp_path / "encoder"))  # what the finished run saved
    assert teacher.preprocess == modality_preprocess(config.data)
    student = encoder_from_checkpoint(path, which="student")
    assert _same_weights(student, trainer.student.encoder) and not _same_weights(student, teacher)
    assert student.preprocess == modality_preprocess(config.data)


def test_encoder_from_checkpoint_refuses_a_bad_which_and_unusable_files(tmp_path):
    with pytest.raises(ValueError, match="which must be 'teacher' or 'student', got 'ema'"):
        encoder_from_checkpoint(tmp_path / "step_00000001.pt", which="ema")
    with pytest.raises(ValueError, match="which must be 'teacher' or 'student', got \\['teacher'\\]"):
        encoder_from_checkpoint(tmp_path / "step_00000001.pt", which=["teacher"])
    with pytest.raises(FileNotFoundError, match="step_00000001.pt"):
        encoder_from_checkpoint(tmp_path / "step_00000001.pt")
    Trainer(tiny_config(tmp_path / "run", steps=2), dataset=SyntheticImages()).train()
    path = tmp_path / "run" / "checkpoints" / "step_00000002.pt"
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"{re.escape(str(truncated))}: cannot read the checkpoint") as error:
        encoder_from_checkpoint(truncated)
    assert error.value.path == str(truncated)
    foreign = save_checkpoint(tmp_path / "foreign", 1, {"weights": torch.ones(2)})
    with pytest.raises(CheckpointError, match=f"{re.escape(str(foreign))}: not an mmv pretraining checkpoint"):
        encoder_from_checkpoint(foreign)
    good = load_checkpoint(path)
    without_cls = {name: tensor for name, tensor in good["student"].items() if not name.endswith("cls_token")}
    damaged = save_checkpoint(tmp_path / "damaged", 2, {**good, "student": without_cls})
    with pytest.raises(CheckpointError, match=f"{re.escape(str(damaged))}: .*missing \\['cls_token'\\]"):
        encoder_from_checkpoint(damaged, which="student")
    assert _same_weights(encoder_from_checkpoint(damaged), encoder_from_checkpoint(path))  # the teacher is whole
    studentless = save_checkpoint(tmp_path / "studentless", 2, {k: v for k, v in good.items() if k != "student"})
    with pytest.raises(CheckpointError, match=f"{re.escape(str(studentless))}: the checkpoint lacks \\['student'\\]"):
        encoder_from_checkpoint(studentless, which="student")
    unusable = save_checkpoint(tmp_path / "unusable", 2, {**good, "config": '{"model": {"preset": "vit_huge_x"}}'})
    with pytest.raises(CheckpointError, match=f"{re.escape(str(unusable))}: its run config is unusable"):
        encoder_from_checkpoint(unusable)


# --------------------------------------------------------------------------------------------------
# Damaged checkpoints, interrupted metrics, failing disks


def _losses(records):
    return [(r["loss"], r["dino"], r["ibot"], r["koleo"]) for r in records]


@pytest.fixture(scope="module")
def uninterrupted_history(tmp_path_factory):
    threads = torch.get_num_threads()
    try:
        return Trainer(tiny_config(tmp_path_factory.mktemp("uninterrupted"), steps=6), dataset=SyntheticImages()).train()
    finally:
        torch.set_num_threads(threads)


def test_a_flipped_byte_in_a_checkpoint_fails_its_checksum(tmp_path):
    weights = torch.arange(1000, dtype=torch.float32)
    path = save_checkpoint(tmp_path, 1, {"weights": weights, "note": "x", "numbers": [1, 2.5, None]})
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["weights"], weights) and loaded["numbers"] == [1, 2.5, None] and "sha256" not in loaded
    data = bytearray(path.read_bytes())
    data[data.find(weights.numpy().tobytes()) + 1234] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="step_00000001.pt: .*does not match its checksum"):
        load_checkpoint(path)
    torch.save({"weights": weights}, path)  # a file without a checksum is not a checkpoint of ours
    with pytest.raises(CheckpointError, match="step_00000001.pt: .*no 'sha256' checksum"):
        load_checkpoint(path)


@pytest.mark.parametrize("damage", ["truncated", "flipped byte"])
def test_resume_falls_back_past_a_damaged_checkpoint_and_cuts_the_metrics_back(tmp_path, uninterrupted_history, damage):
    dataset = SyntheticImages()
    Trainer(tiny_config(tmp_path, steps=6), dataset=dataset).train(until_step=4)
    newest = tmp_path / "checkpoints" / "step_00000004.pt"
    data = newest.read_bytes()
    if damage == "truncated":
        newest.write_bytes(data[: len(data) // 2])
    else:
        cls_token = encoder_from_checkpoint(newest, "teacher").cls_token.detach().numpy().tobytes()
        offset = data.find(cls_token)
        newest.write_bytes(data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :])
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as stream:
        stream.write('{"step": 5, "loss": 1.2')  # a kill in the middle of a line
    with pytest.warns(RuntimeWarning, match="step_00000004.pt"):
        trainer = Trainer(tiny_config(tmp_path, steps=6), dataset=dataset, resume=True)
    assert trainer.step == 2 and trainer.resumed_from == tmp_path / "checkpoints" / "step_00000002.pt"
    assert _losses(trainer.train()) == _losses(uninterrupted_history[2:])
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert _losses(metrics) == _losses(uninterrupted_history)


def test_resume_cuts_the_metrics_of_steps_after_the_last_checkpoint(tmp_path, uninterrupted_history):
    dataset = SyntheticImages()
    Trainer(tiny_config(tmp_path, steps=6), dataset=dataset).train(until_step=3)
    # A kill after step 3 was logged but before its checkpoint was written: the run resumes from step 2.
    (tmp_path / "checkpoints" / "step_00000003.pt").unlink()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    trainer = Trainer(tiny_config(tmp_path, steps=6), dataset=dataset, resume=True)
    trainer.train(until_step=4)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert _losses(metrics) == _losses(uninterrupted_history[:4])


def test_a_checkpoint_that_does_not_fit_the_run_raises_a_checkpoint_error_naming_it(tmp_path):
    dataset = SyntheticImages()
    Trainer(tiny_config(tmp_path / "run", steps=2), dataset=dataset).train()
    good = load_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000002.pt")
    some_weight = next(iter(good["teacher"]))
    exp_avg_index = next(iter(good["optimizer"]["state"]))
    damaged = {
        r"lacks \['optimizer'\]": {k: v for k, v in good.items() if k != "optimizer"},
        "teacher: .*missing": {**good, "teacher": {k: v for k, v in good["teacher"].items() if k != some_weight}},
        "student: .*shape": {**good, "student": {k: v[..., :1] if v.dim() else v for k, v in good["student"].items()}},
        "optimiser state 'exp_avg'.*shape": {
            **good,
            "optimizer": {
                **good["optimizer"],
                "state": {
                    **good["optimizer"]["state"],
                    exp_avg_index: {**good["optimizer"]["state"][exp_avg_index], "exp_avg": torch.zeros(7, 3)},
                },
            },
        },
        "random states of 2 processes": {**good, "rng": good["rng"] * 2},
        "random generator": {**good, "rng": [{**good["rng"][0], "torch": torch.zeros(3)}]},
        "'step' must be a non-negative int": {**good, "step": -1},
    }
    for index, (message, state) in enumerate(damaged.items()):
        run = tmp_path / f"damaged{index}"
        path = save_checkpoint(run / "checkpoints", 2, state)
        with pytest.raises(CheckpointError, match=f"{re.escape(str(path))}: .*{message}") as error, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Trainer(tiny_config(run, steps=4), dataset=dataset, resume=True)
        assert error.value.path == str(run / "checkpoints")
    wider = tiny_config(tmp_path / "run", steps=4, model={"preset": "vit_tiny", "options": {"embed_dim": 64, "depth": 2, "num_heads": 2, "patch_size": [4, 8, 8]}})
    with pytest.raises(CheckpointError, match="step_00000002.pt: student: weight .* has shape"), pytest.warns(RuntimeWarning):
        Trainer(wider, dataset=dataset, resume=True)


def test_an_unwritable_out_dir_fails_before_data_and_model_set_up(tmp_path, monkeypatch):
    import mmv.train.trainer

    def no_set_up(*args, **kwargs):
        raise AssertionError("the model was set up before the output directory was checked")

    monkeypatch.setattr(mmv.train.trainer, "Encoder", no_set_up)
    blocker = tmp_path / "a file"
    blocker.write_text("")
    with pytest.raises(OSError, match=f"run.out_dir: cannot write to {blocker / 'run'}"):
        Trainer(tiny_config(blocker / "run"))
    if os.geteuid() == 0:  # permissions do not stop root
        return
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match=f"run.out_dir: cannot write to {read_only}"):
            Trainer(tiny_config(read_only))
    finally:
        read_only.chmod(0o700)


class _DiskFullAfter(io.FileIO):
    """A file on a disk that fills up after ``capacity`` bytes."""

    capacity = 4096

    def write(self, data):
        if self.tell() + len(data) > self.capacity:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def test_a_full_disk_during_a_checkpoint_says_so_and_keeps_the_previous_one(tmp_path, monkeypatch):
    previous = save_checkpoint(tmp_path, 1, {"weights": torch.ones(3)})
    monkeypatch.setattr(files, "open", lambda path, mode: _DiskFullAfter(path, mode), raising=False)
    with pytest.raises(OSError, match=f"no space left on {tmp_path} \\(writing step_00000002.pt\\)") as error:
        save_checkpoint(tmp_path, 2, {"weights": torch.ones(100_000)})
    assert error.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert list_checkpoints(tmp_path) == [previous] and sorted(p.name for p in tmp_path.iterdir()) == [previous.name]
    assert torch.equal(load_checkpoint(previous)["weights"], torch.ones(3))


def test_the_temporary_file_of_a_killed_save_is_removed_by_the_next_save(tmp_path):
    (tmp_path / "step_00000001.pt.4321.0123abcd.tmp").write_bytes(b"half a checkpoint")
    save_checkpoint(tmp_path, 2, {"weights": torch.ones(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002.pt"]


def test_checkpoints_are_fsynced_and_so_is_their_directory_after_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording(descriptor):
        synced.append("directory" if stat.S_ISDIR(os.fstat(descriptor).st_mode) else "file")
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording)
    save_checkpoint(tmp_path, 1, {"weights": torch.ones(3)})
    assert synced == ["file", "directory"]


KILLED_WORKER = """
import sys
from helpers.training import SyntheticImages, tiny_config
from mmv.train import Trainer

Trainer(tiny_config(sys.argv[1], steps=6, run={"checkpoint_every": 1}), dataset=SyntheticImages()).train()
"""


def test_a_run_killed_with_sigkill_resumes_with_the_same_losses(tmp_path, uninterrupted_history):
    script = tmp_path / "worker.py"
    script.write_text(KILLED_WORKER)
    out = tmp_path / "run"
    tests = Path(__file__).resolve().parent
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    environment["PYTHONPATH"] = os.pathsep.join([str(tests), str(tests.parent), environment.get("PYTHONPATH", "")])
    worker = subprocess.Popen([sys.executable, str(script), str(out)], env=environment, stderr=subprocess.PIPE)
    try:
        # Killed once step 3 is logged: in step 4's forward pass, or while checkpoint 3 or 4 is being written.
        metrics = out / "metrics.jsonl"
        while worker.poll() is None and not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
            time.sleep(0.01)
        assert worker.poll() is None, worker.stderr.read().decode()[-4000:]
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    trainer = Trainer(tiny_config(out, steps=6, run={"checkpoint_every": 1}), dataset=SyntheticImages(), resume=True)
    assert trainer.step >= 2
    trainer.train()
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert _losses(records) == _losses(uninterrupted_history)
    assert not list((out / "checkpoints").glob("*.tmp"))
