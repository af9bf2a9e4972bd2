import csv
import json

import numpy as np
import pytest

from mmv.data.datasets import CT_MODALITY, XRAY_MODALITY
from mmv.eval.commands import compare_probe_runs, run_analysis, run_probe
from mmv.eval.features import FeatureIndex, FeatureWriter, read_feature_table
from mmv.eval.report import plot_auroc_comparison
from mmv.eval.protocols import CTRATE18_LABELS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NUM_FEATURES = 12


def phantom_table(directory, num_phantoms=160, seed=0):
    """An X-ray and a CT row per phantom, sharing two labels read from a shared latent direction."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(num_phantoms, 3))
    labels = np.c_[latent[:, 0] > 0, latent[:, 1] > 0, np.zeros(num_phantoms)].astype(float)
    labels[:, 2] = np.nan  # a label nobody knows: it must come out as not available, not as a number
    shared = np.zeros((num_phantoms, NUM_FEATURES))
    shared[:, :3] = latent
    xray = shared + rng.normal(size=shared.shape) * 0.2
    xray[:, 3] += rng.normal(size=num_phantoms) * 2.0
    ct = shared + rng.normal(size=shared.shape) * 0.2
    ct[:, 4] += rng.normal(size=num_phantoms) * 2.0
    ct[:, 5] += 3.0
    split_of = ["train"] * (num_phantoms * 5 // 8) + ["val"] * (num_phantoms // 8) + ["test"] * (num_phantoms // 4)
    index = FeatureIndex(
        ids=tuple(f"phantom{i}/{kind}" for kind in ("xray", "ct") for i in range(num_phantoms)),
        splits=tuple(split_of * 2),
        modalities=tuple([XRAY_MODALITY] * num_phantoms + [CT_MODALITY] * num_phantoms),
        groups=tuple(f"phantom{i}" for i in range(num_phantoms)) * 2,
        label_names=("left", "right", "unknown"),
        labels=np.concatenate([labels, labels]),
    )
    with FeatureWriter(directory, index, {"cls": NUM_FEATURES}) as writer:
        writer.write(np.arange(2 * num_phantoms), {"cls": np.concatenate([xray, ct])})
    return directory


def test_run_probe_writes_json_markdown_and_roc_plot(tmp_path):
    features_dir = phantom_table(tmp_path / "features")
    run = run_probe(features_dir, "manifest", tmp_path / "out", num_resamples=100, progress=False)
    assert set(run.outputs) == {"json", "markdown", "roc_plot"}
    summary = json.loads(run.outputs["json"].read_text())
    assert summary["protocol"] == "manifest" and summary["rows"] == {"train": 200, "val": 40, "test": 80}
    assert summary["labels"]["left"]["auroc"] > 0.9 and summary["macro_auroc"] > 0.9
    assert summary["labels"]["unknown"]["auroc"] is None and summary["labels"]["unknown"]["skipped"]
    assert summary["macro_auroc"] == pytest.approx(np.mean([summary["labels"][n]["auroc"] for n in ("left", "right")]))
    lower, upper = summary["macro_auroc_ci"]
    assert lower < summary["macro_auroc"] < upper
    markdown = run.outputs["markdown"].read_text()
    left = summary["labels"]["left"]
    assert f"| left | {left['positives']} | {left['negatives']} | {left['auroc']:.3f} |" in markdown
    assert left["positives"] + left["negatives"] == 80
    assert "| **macro** |" in markdown and "skipped:" in markdown
    assert run.outputs["roc_plot"].read_bytes().startswith(PNG_SIGNATURE)


def test_run_probe_probes_one_modality_of_a_mixed_table(tmp_path):
    features_dir = phantom_table(tmp_path / "features")
    runs = {
        modality: run_probe(
            features_dir, "manifest", tmp_path / "out", modality=modality, num_resamples=50, progress=False
        )
        for modality in (CT_MODALITY, XRAY_MODALITY)
    }
    for modality, run in runs.items():
        assert run.outputs["json"].name == f"manifest_{modality}.json" and run.outputs["json"].is_file()
        summary = json.loads(run.outputs["json"].read_text())
        # 160 phantoms, one row each in this modality (the whole table has 320).
        assert summary["modality"] == modality and summary["rows"] == {"train": 100, "val": 20, "test": 40}
        assert summary["macro_auroc"] > 0.9
    with pytest.raises(ValueError, match="modality 'MR' has 0 rows.*'CT', 'DX'"):
        run_probe(features_dir, "manifest", tmp_path / "out", modality="MR", progress=False)


def test_run_probe_with_a_data_set_protocol(tmp_path):
    label_dir = tmp_path / "ctrate" / "dataset" / "multi_abnormality_labels"
    label_dir.mkdir(parents=True)
    rng = np.random.default_rng(1)
    names = {"train": [f"train_{p}_a_1" for p in range(60)], "valid": [f"valid_{p}_a_1" for p in range(30)]}
    features = rng.normal(size=(90, NUM_FEATURES)).astype(np.float32)
    labels = (features[:, :1] + rng.normal(size=(90, 18)) * 0.5 > 0).astype(int)
    for split, rows in (("train", slice(0, 60)), ("valid", slice(60, 90))):
        with (label_dir / f"{split}_predicted_labels.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(("VolumeName",) + CTRATE18_LABELS)
            writer.writerows([f"{name}.nii.gz", *row] for name, row in zip(names[split], labels[rows]))
    ids = names["train"] + names["valid"]
    index = FeatureIndex(tuple(ids), ("",) * 90, (CT_MODALITY,) * 90, ("",) * 90, (), np.zeros((90, 0)))
    with FeatureWriter(tmp_path / "features", index, {"cls": NUM_FEATURES}) as writer:
        writer.write(np.arange(90), {"cls": features})
    run = run_probe(
        tmp_path / "features", "ctrate18", tmp_path / "out", labels_root=tmp_path / "ctrate", num_resamples=50,
        progress=False,
    )
    summary = json.loads((tmp_path / "out" / "ctrate18.json").read_text())
    assert summary["rows"]["test"] == 30 and summary["val_carved_from_train"]
    assert len(summary["labels"]) == 18 and summary["macro_auroc"] > 0.75
    assert run.evaluation.auroc.shape == (18,)


def test_run_analysis_writes_the_report_with_transfer(tmp_path):
    features_dir = phantom_table(tmp_path / "features")
    run = run_analysis(features_dir, tmp_path / "out", num_resamples=50, progress=False)
    summary = json.loads(run.outputs["json"].read_text())
    # Paired on the phantom: the 3 shared unit-variance directions against each modality's own variance-4
    # direction give CKA near 3 / (3 + 16).
    assert summary["paired_rows"] == 160 and 0.1 < summary["linear_cka"] < 0.3
    assert summary["modality_classifier"]["accuracy"] > 0.95
    assert summary["subspace_dims"]["shared"] == 3
    assert summary["subspace_dims"]["DX_specific"] == 1 and summary["subspace_dims"]["CT_specific"] == 1
    assert set(summary["transfer"]) == {"DX->DX", "DX->CT", "CT->DX", "CT->CT"}
    assert summary["transfer"]["DX->CT"]["macro_auroc"] > 0.8
    markdown = run.outputs["markdown"].read_text()
    assert "## Cross-modal transfer" in markdown and "| DX -> CT |" in markdown
    assert run.outputs["subspace_plot"].read_bytes().startswith(PNG_SIGNATURE)


def test_run_analysis_names_a_missing_modality(tmp_path):
    features_dir = phantom_table(tmp_path / "features", num_phantoms=16)
    with pytest.raises(ValueError, match=r"modality 'MR' has 0 rows .* modalities there: \['CT', 'DX'\]"):
        run_analysis(features_dir, tmp_path / "out", modalities=(XRAY_MODALITY, "MR"), progress=False)


def two_array_table(directory, num_rows=240, seed=0):
    """Array ``a`` tells label ``left``, array ``b`` label ``right``; the manifest protocol's splits."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(num_rows, 2))
    split_of = ["train"] * (num_rows * 5 // 8) + ["val"] * (num_rows // 8) + ["test"] * (num_rows // 4)
    index = FeatureIndex(
        ids=tuple(f"image{i}" for i in range(num_rows)),
        splits=tuple(split_of),
        modalities=(XRAY_MODALITY,) * num_rows,
        groups=tuple(f"image{i}" for i in range(num_rows)),
        label_names=("left", "right"),
        labels=(latent > 0).astype(float),
    )
    arrays = {
        "a": np.c_[latent[:, :1], rng.normal(size=(num_rows, 3))],
        "b": np.c_[latent[:, 1:], rng.normal(size=(num_rows, 2))],
    }
    with FeatureWriter(directory, index, {name: value.shape[1] for name, value in arrays.items()}) as writer:
        writer.write(np.arange(num_rows), arrays)
    return directory, arrays


def test_run_probe_of_several_arrays_probes_them_side_by_side(tmp_path):
    features_dir, arrays = two_array_table(tmp_path / "features")
    table = read_feature_table(features_dir, ("a", "b"))
    assert table.array_name == "a+b"
    np.testing.assert_array_equal(table.features, np.c_[arrays["a"], arrays["b"]].astype(np.float32))

    alone = run_probe(features_dir, "manifest", tmp_path / "a", array="a", num_resamples=50, progress=False)
    both = run_probe(features_dir, "manifest", tmp_path / "ab", array=("a", "b"), num_resamples=50, progress=False)
    assert alone.evaluation.auroc[0] > 0.9 and alone.evaluation.auroc[1] < 0.75
    assert (both.evaluation.auroc > 0.9).all()
    summary = json.loads(both.outputs["json"].read_text())
    assert summary["array"] == "a+b" and summary["feature_dim"] == 7
    for bad in ((), ("a", "a"), ("a", 3)):
        with pytest.raises(ValueError, match="array"):
            read_feature_table(features_dir, bad)


def test_compare_probe_runs_gives_the_paired_difference_of_the_same_test_rows(tmp_path):
    features_dir, _ = two_array_table(tmp_path / "features")
    both = run_probe(features_dir, "manifest", tmp_path / "ab", array=("a", "b"), num_resamples=50, progress=False)
    alone = run_probe(features_dir, "manifest", tmp_path / "a", array="a", num_resamples=50, progress=False)

    difference = compare_probe_runs(both, alone, seed=0, num_resamples=200)
    expected = both.evaluation.macro_auroc - alone.evaluation.macro_auroc
    assert difference["macro_auroc"] == pytest.approx(expected) and expected > 0.1
    low, high = difference["interval"]
    assert 0.0 < low < expected < high and difference["confidence"] == 0.95
    assert compare_probe_runs(both, alone, seed=0, num_resamples=200) == difference

    mixed = phantom_table(tmp_path / "mixed")
    xray = run_probe(mixed, "manifest", tmp_path / "x", modality=XRAY_MODALITY, num_resamples=20, progress=False)
    ct = run_probe(mixed, "manifest", tmp_path / "c", modality=CT_MODALITY, num_resamples=20, progress=False)
    with pytest.raises(ValueError, match="same rows"):
        compare_probe_runs(xray, ct)


def test_auroc_comparison_plot(tmp_path):
    features_dir, _ = two_array_table(tmp_path / "features")
    both = run_probe(features_dir, "manifest", tmp_path / "ab", array=("a", "b"), num_resamples=20, progress=False)
    alone = run_probe(features_dir, "manifest", tmp_path / "a", array="a", num_resamples=20, progress=False)
    panels = {"first": {"both": both.evaluation, "a": alone.evaluation}, "second": {"a": alone.evaluation}}
    path = plot_auroc_comparison(tmp_path / "plots" / "comparison.png", panels)
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    mixed = phantom_table(tmp_path / "mixed")
    other = run_probe(mixed, "manifest", tmp_path / "m", num_resamples=20, progress=False)
    with pytest.raises(ValueError, match="share their labels"):
        plot_auroc_comparison(tmp_path / "bad.png", {"panel": {"a": alone.evaluation, "other": other.evaluation}})
