import csv
import dataclasses
import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from helpers.training import SyntheticImages, tiny_config

from mmv.cli import build_parser, main
from mmv.data import ModalityPreprocess
from mmv.data.dataset_spec import DatasetSpec, open_dataset
from mmv.data.datasets import CHEXPERT_LABELS, Manifest
from mmv.data.io import ImageReadError
from mmv.data.phantom import PHANTOM_FINDINGS, PhantomSettings, write_phantom_dataset
from mmv.eval.embed import ARRAY_NAMES, RUN_FILE, run_embed, run_embed_encoders
from mmv.eval.encoders import embed_preprocess, load_encoder
from mmv.eval.features import FeatureTableError, read_feature_table
from mmv.model import CheckpointError, Encoder, EncoderConfig, MissingPreprocessWarning
from mmv.train import Trainer

# Phantoms at their coarsest: a CT of 20 x 22 x 22 voxels (45 tokens) and a radiograph of 40 x 44
# pixels (30 tokens) each; preprocessing at the same spacings leaves their sizes as they are.
CT_SPACING = (16.0, 16.0, 16.0)
XRAY_SPACING = 8.0
PHANTOMS = PhantomSettings(ct_spacing=CT_SPACING, xray_spacing=XRAY_SPACING)
NUM_PHANTOMS = 3
PREPROCESS = {"ct_spacing": CT_SPACING, "xray_spacing": XRAY_SPACING}
ENCODER_CONFIG = EncoderConfig(embed_dim=32, depth=2, num_heads=2, patch_size=(4, 8, 8), layer_scale_init=None)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    directory = tmp_path_factory.mktemp("phantoms")
    return write_phantom_dataset(directory, NUM_PHANTOMS, seed=1, settings=PHANTOMS, progress=False)


@pytest.fixture(scope="module")
def manifest_rows(manifest):
    with open(manifest, newline="") as stream:
        return list(csv.DictReader(stream))


class SimulatedInterruption(Exception):
    """Stands for the run being killed between two batches."""


def tiny_encoder(seed=0):
    torch.manual_seed(seed)
    return Encoder(ENCODER_CONFIG)


def embed(checkpoint, manifest, out_dir, **options):
    options = {**PREPROCESS, **options}
    return run_embed(checkpoint, DatasetSpec("manifest", manifest), out_dir, progress=False, **options)


def test_table_holds_one_row_per_image_with_the_manifest_index(manifest, manifest_rows, tmp_path):
    run = embed(tiny_encoder(), manifest, tmp_path / "features")

    assert (run.num_rows, run.encoded, run.skipped_ids) == (2 * NUM_PHANTOMS, 2 * NUM_PHANTOMS, ())
    for array in ("cls", "patch_mean"):
        table = read_feature_table(tmp_path / "features", array)
        assert table.features.shape == (2 * NUM_PHANTOMS, ENCODER_CONFIG.embed_dim)
        assert table.features.dtype == np.float32
        assert np.isfinite(table.features).all()
        # Every image gets its own features.
        assert len({row.tobytes() for row in np.asarray(table.features)}) == 2 * NUM_PHANTOMS
    index = table.index
    assert index.ids == tuple(row["id"] for row in manifest_rows)
    assert index.splits == tuple(row["split"] for row in manifest_rows)
    assert index.groups == tuple(row["group"] for row in manifest_rows)
    assert index.modalities == tuple(row["modality"] for row in manifest_rows)
    assert index.label_names == PHANTOM_FINDINGS
    expected_labels = [[float(row[name]) for name in PHANTOM_FINDINGS] for row in manifest_rows]
    np.testing.assert_array_equal(index.labels, expected_labels)
    assert not (tmp_path / "features" / "partial").exists()


def test_packed_features_equal_those_of_each_image_encoded_alone(manifest, tmp_path):
    encoder = tiny_encoder()
    # A budget of two images per batch at most, so images share packs with different neighbours.
    embed(encoder, manifest, tmp_path / "features", max_tokens=90)
    cls = read_feature_table(tmp_path / "features", "cls")
    pooled = read_feature_table(tmp_path / "features", "patch_mean")
    dataset = open_dataset(DatasetSpec("manifest", manifest), transform=embed_preprocess(**PREPROCESS))
    with torch.no_grad():
        for row in range(len(dataset)):
            out = encoder([dataset[row].image])
            np.testing.assert_allclose(cls.features[row], out.cls[0].numpy(), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(pooled.features[row], out.pooled[0].numpy(), rtol=1e-5, atol=1e-6)


def test_resumed_run_writes_what_an_uninterrupted_run_writes(manifest, tmp_path, monkeypatch):
    encoder = tiny_encoder()
    embed(encoder, manifest, tmp_path / "whole", max_tokens=90)

    encoded_batches = []
    interrupt = True
    original_forward = Encoder.forward

    def counted_forward(self, inputs, token_mask=None):
        if interrupt and encoded_batches:
            raise SimulatedInterruption
        encoded_batches.append(inputs.num_images)
        return original_forward(self, inputs, token_mask)

    monkeypatch.setattr(Encoder, "forward", counted_forward)
    with pytest.raises(SimulatedInterruption):
        embed(encoder, manifest, tmp_path / "resumed", max_tokens=90)
    with pytest.raises(FeatureTableError):
        read_feature_table(tmp_path / "resumed")
    encoded_before = encoded_batches[0]
    interrupt = False
    encoded_batches.clear()

    run = embed(encoder, manifest, tmp_path / "resumed", max_tokens=90)

    # Only the images the interrupted run had not written go through the encoder again.
    assert 0 < encoded_before < 2 * NUM_PHANTOMS
    assert sum(encoded_batches) == run.encoded == 2 * NUM_PHANTOMS - encoded_before
    for array in ("cls", "patch_mean"):
        whole = read_feature_table(tmp_path / "whole", array)
        resumed = read_feature_table(tmp_path / "resumed", array)
        assert resumed.index.same_as(whole.index)
        np.testing.assert_allclose(resumed.features, whole.features, rtol=1e-5, atol=1e-6)


def test_finished_table_is_kept_and_other_weights_are_refused(manifest, tmp_path):
    out_dir = tmp_path / "features"
    embed(tiny_encoder(seed=0), manifest, out_dir)
    first = np.array(read_feature_table(out_dir).features)

    again = embed(tiny_encoder(seed=0), manifest, out_dir)
    assert again.encoded == 0 and again.num_rows == 2 * NUM_PHANTOMS
    with pytest.raises(FeatureTableError, match="different weights"):
        embed(tiny_encoder(seed=1), manifest, out_dir)
    with pytest.raises(FeatureTableError, match="different preprocessing"):
        embed(tiny_encoder(seed=0), manifest, out_dir, ct_window=(-500.0, 500.0))

    redone = embed(tiny_encoder(seed=1), manifest, out_dir, resume=False)
    assert redone.encoded == 2 * NUM_PHANTOMS
    assert not np.allclose(read_feature_table(out_dir).features, first)


def test_unreadable_image_is_left_out_with_skip_and_stops_the_run_otherwise(manifest, manifest_rows, tmp_path):
    data = tmp_path / "phantoms"
    shutil.copytree(manifest.parent, data)
    broken = manifest_rows[1]
    (data / broken["path"]).write_bytes(b"\x89PNG\r\n\x1a\n truncated")

    with pytest.raises(ImageReadError):
        embed(tiny_encoder(), data / manifest.name, tmp_path / "raise")

    run = embed(tiny_encoder(), data / manifest.name, tmp_path / "skip", on_error="skip")
    assert run.skipped_ids == (broken["id"],)
    table = read_feature_table(tmp_path / "skip")
    assert table.index.ids == tuple(row["id"] for row in manifest_rows if row is not broken)
    assert json.loads((tmp_path / "skip" / RUN_FILE).read_text())["skipped_ids"] == [broken["id"]]
    # A finished run with a skipped image is finished: running again encodes nothing.
    assert embed(tiny_encoder(), data / manifest.name, tmp_path / "skip", on_error="skip").encoded == 0


def test_manifest_split_selects_rows(manifest, manifest_rows):
    split = manifest_rows[0]["split"]
    records = open_dataset(DatasetSpec("manifest", manifest, splits=(split,))).records
    assert [record.id for record in records] == [row["id"] for row in manifest_rows if row["split"] == split]
    assert {record.split for record in records} == {split}
    with pytest.raises(ValueError, match="no rows with split"):
        open_dataset(DatasetSpec("manifest", manifest, splits=("nonexistent",)))


def test_training_checkpoint_run_directory_and_encoder_directory_give_the_same_features(manifest, tmp_path):
    config = tiny_config(
        tmp_path / "run", steps=2,
        model={"options": {**tiny_config(tmp_path).model.options, "drop_path_rate": 0.0, "layer_scale_init": "none"}},
        data={"ct_spacing": list(CT_SPACING), "xray_spacing": XRAY_SPACING, "xray_short_side": None},
    )
    Trainer(config, dataset=SyntheticImages(6)).train()
    run_dir = tmp_path / "run"
    checkpoint = sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1]

    # The encoder directory records the run's preprocessing itself, so a copy of it alone embeds the same.
    copied = shutil.copytree(run_dir / "encoder", tmp_path / "elsewhere" / "encoder")

    features = {}
    sources = {"checkpoint": (checkpoint, "the pretraining run"), "run": (run_dir, "the encoder"),
               "encoder": (run_dir / "encoder", "the encoder"), "copied": (copied, "the encoder")}
    for name, (source, base) in sources.items():
        # No preprocessing arguments: the run's own (the phantoms' spacings) must be used.
        run_embed(source, DatasetSpec("manifest", manifest), tmp_path / name, progress=False)
        features[name] = np.array(read_feature_table(tmp_path / name).features)
        record = json.loads((tmp_path / name / RUN_FILE).read_text())
        assert record["preprocess_from"] == {"base": base, "arguments": []}
        assert record["settings"]["preprocess"]["ct"]["spacing"] == list(CT_SPACING)
        assert record["settings"]["preprocess"]["xray"]["spacing"] == [XRAY_SPACING, XRAY_SPACING]
    np.testing.assert_array_equal(features["checkpoint"], features["encoder"])
    np.testing.assert_array_equal(features["run"], features["encoder"])
    np.testing.assert_array_equal(features["copied"], features["encoder"])


def test_encoder_directory_without_recorded_preprocessing_uses_the_run_beside_it_else_warns(manifest, tmp_path):
    run_dir = tmp_path / "run"
    config = tiny_config(run_dir, steps=2, data={"ct_spacing": list(CT_SPACING), "xray_spacing": XRAY_SPACING})
    Trainer(config, dataset=SyntheticImages(6)).train()
    # An encoder directory as mmv wrote it before it recorded the preprocessing.
    config_path = run_dir / "encoder" / "config.json"
    values = json.loads(config_path.read_text())
    del values["preprocess"]
    config_path.write_text(json.dumps(values))
    copied = shutil.copytree(run_dir / "encoder", tmp_path / "copied")

    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingPreprocessWarning)
        in_run = load_encoder(run_dir / "encoder")
    assert in_run.preprocess_from == "the pretraining run"
    assert in_run.preprocess.ct.spacing == CT_SPACING == in_run.encoder.preprocess.ct.spacing
    with pytest.warns(MissingPreprocessWarning, match="config.json"):
        alone = load_encoder(copied)
    assert alone.preprocess_from == "the defaults" and alone.preprocess == ModalityPreprocess()


def test_embed_command_arguments(manifest, tmp_path, capsys):
    encoder_dir, other_encoder_dir = tmp_path / "encoder", tmp_path / "other_encoder"
    tiny_encoder(seed=0).save_pretrained(encoder_dir)
    tiny_encoder(seed=1).save_pretrained(other_encoder_dir)
    arguments = [
        "--dataset", "manifest", "--data", str(manifest), "--out", str(tmp_path / "features"),
        "--ct-spacing", *map(str, CT_SPACING), "--xray-spacing", str(XRAY_SPACING), "--max-tokens", "100",
        "--num-workers", "1", "--no-progress",
    ]

    assert main(["embed", str(encoder_dir), *arguments]) == 0
    assert main(["embed", str(other_encoder_dir), *arguments]) == 2
    assert "mmv embed: error:" in capsys.readouterr().err

    table = read_feature_table(tmp_path / "features")
    assert len(table.index) == 2 * NUM_PHANTOMS
    record = json.loads((tmp_path / "features" / RUN_FILE).read_text())
    assert record["checkpoint"] == str(encoder_dir)
    assert record["preprocess_from"] == {"base": "the encoder", "arguments": ["ct_spacing", "xray_spacing"]}
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["embed", str(encoder_dir), "--dataset", "nifti", "--data", "x", "--out", "y"])
    with pytest.raises(SystemExit):
        parser.parse_args([
            "embed", str(encoder_dir), "--dataset", "manifest", "--data", "x", "--out", "y", "--xray-spacing", "1",
            "--xray-short-side", "512",
        ])


def test_embed_command_with_several_checkpoints_writes_a_table_per_name(manifest, tmp_path, capsys):
    encoder_dirs = [tmp_path / "first", tmp_path / "second"]
    for seed, directory in enumerate(encoder_dirs):
        tiny_encoder(seed=seed).save_pretrained(directory)
    arguments = [
        "--dataset", "manifest", "--data", str(manifest), "--out", str(tmp_path / "features"),
        "--ct-spacing", *map(str, CT_SPACING), "--xray-spacing", str(XRAY_SPACING), "--no-progress",
    ]

    assert main(["embed", *map(str, encoder_dirs), "--name", "a", "--name", "b", *arguments]) == 0
    for name, directory in zip("ab", encoder_dirs):
        assert json.loads((tmp_path / "features" / name / RUN_FILE).read_text())["checkpoint"] == str(directory)
        embed(directory, manifest, tmp_path / f"alone_{name}")
        np.testing.assert_array_equal(
            read_feature_table(tmp_path / "features" / name).features, read_feature_table(tmp_path / f"alone_{name}").features
        )
    capsys.readouterr()
    # One name per checkpoint, each its own.
    assert main(["embed", *map(str, encoder_dirs), "--name", "a", *arguments]) == 2
    assert "--name must be given once per checkpoint" in capsys.readouterr().err
    assert main(["embed", *map(str, encoder_dirs), "--name", "a", "--name", "a", *arguments]) == 2
    assert "differently" in capsys.readouterr().err
    assert main(["embed", str(encoder_dirs[0]), "--name", "a", *arguments]) == 2
    assert "with one, --out is its table" in capsys.readouterr().err


def test_several_encoders_read_each_image_once_and_write_what_separate_runs_write(manifest, tmp_path, monkeypatch):
    encoders = {"first": tiny_encoder(seed=0), "second": tiny_encoder(seed=1)}
    reads = []
    original_getitem = Manifest.__getitem__

    def counted_getitem(self, position):
        reads.append(self.records[position].id)
        return original_getitem(self, position)

    monkeypatch.setattr(Manifest, "__getitem__", counted_getitem)
    # A budget of two images per batch at most: several batches, each of several images of both kinds.
    runs = run_embed_encoders(
        encoders, DatasetSpec("manifest", manifest), tmp_path / "together", max_tokens=90, progress=False, **PREPROCESS
    )
    ids = [record.id for record in open_dataset(DatasetSpec("manifest", manifest)).records]
    assert sorted(reads) == sorted(ids)
    monkeypatch.setattr(Manifest, "__getitem__", original_getitem)

    assert list(runs) == ["first", "second"]
    dataset = open_dataset(DatasetSpec("manifest", manifest), transform=embed_preprocess(**PREPROCESS))
    for name, encoder in encoders.items():
        assert runs[name].directory == tmp_path / "together" / name
        assert runs[name].encoded == runs[name].num_rows == 2 * NUM_PHANTOMS
        embed(encoder, manifest, tmp_path / f"alone_{name}", max_tokens=90)
        for array in ARRAY_NAMES:
            together = read_feature_table(tmp_path / "together" / name, array)
            alone = read_feature_table(tmp_path / f"alone_{name}", array)
            assert together.index.same_as(alone.index)
            np.testing.assert_array_equal(together.features, alone.features)
        cls = read_feature_table(tmp_path / "together" / name, "cls").features
        with torch.no_grad():
            for row in range(len(dataset)):
                out = encoder([dataset[row].image])
                np.testing.assert_allclose(cls[row], out.cls[0].numpy(), rtol=1e-4, atol=1e-4)
    first = read_feature_table(tmp_path / "together" / "first").features
    assert not np.allclose(first, read_feature_table(tmp_path / "together" / "second").features)


def test_several_encoders_resume_each_table_from_its_own_rows(manifest, tmp_path, monkeypatch):
    encoders = {"first": tiny_encoder(seed=0), "second": tiny_encoder(seed=1)}
    for name, encoder in encoders.items():
        embed(encoder, manifest, tmp_path / f"alone_{name}", max_tokens=90)

    forwards = []
    interrupt = True
    original_forward = Encoder.forward

    def counted_forward(self, inputs, token_mask=None):
        # Killed after the first encoder wrote the first batch, before the second encoder saw it.
        if interrupt and forwards:
            raise SimulatedInterruption
        forwards.append(inputs.num_images)
        return original_forward(self, inputs, token_mask)

    monkeypatch.setattr(Encoder, "forward", counted_forward)
    together = tmp_path / "together"
    with pytest.raises(SimulatedInterruption):
        run_embed_encoders(encoders, DatasetSpec("manifest", manifest), together, max_tokens=90, progress=False, **PREPROCESS)
    first_batch = forwards[0]
    interrupt = False
    forwards.clear()

    runs = run_embed_encoders(
        encoders, DatasetSpec("manifest", manifest), together, max_tokens=90, progress=False, **PREPROCESS
    )

    assert 0 < first_batch < 2 * NUM_PHANTOMS
    assert runs["first"].encoded == 2 * NUM_PHANTOMS - first_batch
    assert runs["second"].encoded == 2 * NUM_PHANTOMS
    for name in encoders:
        for array in ARRAY_NAMES:
            resumed = read_feature_table(together / name, array)
            alone = read_feature_table(tmp_path / f"alone_{name}", array)
            assert resumed.index.same_as(alone.index)
            np.testing.assert_allclose(resumed.features, alone.features, rtol=1e-5, atol=1e-6)
        assert not (together / name / "partial").exists()
    # Finished tables are kept: nothing is read or encoded again.
    forwards.clear()
    again = run_embed_encoders(encoders, DatasetSpec("manifest", manifest), together, progress=False, **PREPROCESS)
    assert forwards == [] and all(run.encoded == 0 for run in again.values())


def test_several_encoders_must_share_preprocessing_patch_size_and_have_names(manifest, tmp_path):
    spec = DatasetSpec("manifest", manifest)
    coarse = Encoder(dataclasses.replace(ENCODER_CONFIG, patch_size=(8, 8, 8)))
    with pytest.raises(ValueError, match="patch size"):
        run_embed_encoders({"fine": tiny_encoder(), "coarse": coarse}, spec, tmp_path / "a", progress=False, **PREPROCESS)
    other = tiny_encoder(seed=1)
    other.preprocess = embed_preprocess(ct_spacing=(8.0, 8.0, 8.0))
    with pytest.raises(ValueError, match="share one preprocessing"):
        run_embed_encoders({"a": tiny_encoder(), "b": other}, spec, tmp_path / "a", progress=False)
    # Settings given explicitly replace both encoders' own: then they agree.
    runs = run_embed_encoders({"a": tiny_encoder(), "b": other}, spec, tmp_path / "b", progress=False, **PREPROCESS)
    assert runs["a"].num_rows == runs["b"].num_rows == 2 * NUM_PHANTOMS
    for names in ({}, {"": tiny_encoder()}, {"../up": tiny_encoder()}, {".hidden": tiny_encoder()}):
        with pytest.raises(ValueError, match="checkpoints|encoder names"):
            run_embed_encoders(names, spec, tmp_path / "c", progress=False, **PREPROCESS)


def write_chexpert_tables(root):
    """``train.csv`` and ``valid.csv`` of CheXpert's layout; only Cardiomegaly is filled in."""
    tables = {
        "train.csv": [
            ("train/patient00007/study1/view1_frontal.jpg", "Frontal", "-1.0"),
            ("train/patient00007/study2/view1_frontal.jpg", "Frontal", ""),
            ("train/patient00003/study1/view1_frontal.jpg", "Frontal", "0.0"),
            ("train/patient00003/study1/view2_lateral.jpg", "Lateral", "0.0"),
        ],
        "valid.csv": [("valid/patient64541/study1/view1_frontal.jpg", "Frontal", "1.0")],
    }
    for name, rows in tables.items():
        with open(root / name, "w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS])
            for path, view, cardiomegaly in rows:
                labels = [cardiomegaly if label == "Cardiomegaly" else "" for label in CHEXPERT_LABELS]
                writer.writerow([f"CheXpert-v1.0-small/{path}", "Female", "50", view, "AP", *labels])


def test_named_data_set_embeds_every_split_with_patient_groups(tmp_path):
    write_chexpert_tables(tmp_path)
    dataset = open_dataset(DatasetSpec("chexpert", tmp_path))
    records = dataset.records

    assert [record.id.split("/", 2)[2] for record in records] == [
        "patient00007/study1/view1_frontal.jpg",
        "patient00007/study2/view1_frontal.jpg",
        "patient00003/study1/view1_frontal.jpg",
        "patient64541/study1/view1_frontal.jpg",
    ]
    assert [record.split for record in records] == ["train", "train", "train", "val"]
    # Patients are numbered within the table; their own numbers are not stored.
    assert [record.group for record in records] == ["patient_000001", "patient_000001", "patient_000002", "patient_000003"]
    column = dataset.label_names.index("Cardiomegaly")
    # Uncertain (-1) and blank cells are unknown.
    np.testing.assert_array_equal([record.labels[column] for record in records], [np.nan, np.nan, 0.0, 1.0])
    assert [record.split for record in open_dataset(DatasetSpec("chexpert", tmp_path, splits="valid")).records] == ["val"]


def test_bad_arguments_raise_errors_naming_them(manifest, tmp_path):
    with pytest.raises(ValueError, match="kind"):
        DatasetSpec("nifti", manifest)
    with pytest.raises(ValueError, match="splits of mimic"):
        DatasetSpec("mimic", tmp_path, splits=("valid",))
    with pytest.raises(ValueError, match="fixed"):
        DatasetSpec("manifest", manifest, fixed=True)
    with pytest.raises(ValueError, match="max_tokens"):
        embed(tiny_encoder(), manifest, tmp_path / "a", max_tokens=0)
    with pytest.raises(ValueError, match="on_error"):
        embed(tiny_encoder(), manifest, tmp_path / "a", on_error="ignore")
    with pytest.raises(ValueError, match="xray_spacing and xray_short_side"):
        embed(tiny_encoder(), manifest, tmp_path / "a", xray_short_side=64)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_encoder(tmp_path / "missing")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not an mmv pretraining checkpoint"):
        load_encoder(foreign)
    (tmp_path / "table").mkdir()
    (tmp_path / "table" / "features.json").write_text("{}")
    with pytest.raises(FeatureTableError, match="did not write"):
        embed(tiny_encoder(), manifest, tmp_path / "table")


@pytest.mark.parametrize(
    "config_text",
    [
        json.dumps({"model": {"preset": "vit_tiny", "options": {"depth": 10**7}}, "data": {}}),
        json.dumps({"model": {"preset": "vit_tiny", "options": {"num_registers": 10**9}}, "data": {}}),
        "[" * 100_000 + "]" * 100_000,
    ],
)
def test_a_hostile_run_config_in_a_training_checkpoint_raises_before_any_model_is_built(tmp_path, monkeypatch, config_text):
    from mmv.train.checkpoint import TRAINING_CHECKPOINT_FORMAT, save_checkpoint

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built from an unchecked config")

    monkeypatch.setattr(Encoder, "__init__", no_model)
    state = {"format": TRAINING_CHECKPOINT_FORMAT, "teacher": {}, "config": config_text}
    path = save_checkpoint(tmp_path, 1, state)
    with pytest.raises(CheckpointError, match=f"{path}: .*(at most|nested too deeply)"):
        load_encoder(path)
