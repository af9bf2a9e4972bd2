import csv
import gzip
import math

import numpy as np
import pytest

from mmv.eval.features import FeatureIndex, FeatureWriter, read_feature_table
from mmv.eval.protocols import (
    CHEXPERT5_LABELS,
    CTRATE18_LABELS,
    MIMIC14_LABELS,
    LabelFileError,
    carve_groups,
    get_protocol,
    prepare_protocol,
)

CHEXPERT_COLUMNS = (
    "Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly",
    "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax",
    "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices",
)


def write_csv(path, header, rows, compress=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = gzip.open(path, "wt", newline="") if compress else path.open("w", newline="")
    with handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def feature_table(directory, ids, label_names=(), labels=None, splits=None, groups=None, modalities=None):
    num_rows = len(ids)
    index = FeatureIndex(
        ids=tuple(ids),
        splits=tuple(splits or [""] * num_rows),
        modalities=tuple(modalities or ["xray"] * num_rows),
        groups=tuple(groups or [""] * num_rows),
        label_names=tuple(label_names),
        labels=np.zeros((num_rows, len(label_names))) if labels is None else labels,
    )
    with FeatureWriter(directory, index, {"cls": 2}) as writer:
        writer.write(np.arange(num_rows), {"cls": np.arange(2 * num_rows, dtype=np.float32).reshape(num_rows, 2)})
    return read_feature_table(directory)


def chexpert_row(path, **labels):
    values = {name: "" for name in CHEXPERT_COLUMNS}
    values.update(Path=path, Sex="Female", Age="60", **{"Frontal/Lateral": "Frontal", "AP/PA": "AP"})
    values.update({name.replace("_", " "): value for name, value in labels.items()})
    return [values[name] for name in CHEXPERT_COLUMNS]


def test_chexpert5_reads_the_csvs_and_applies_the_uncertainty_policy(tmp_path):
    root = tmp_path / "CheXpert-v1.0-small"
    train = [
        chexpert_row(f"CheXpert-v1.0-small/train/patient{p:05d}/study1/view{v}_frontal.jpg",
                     Atelectasis="-1.0", Cardiomegaly="-1.0", Edema="1.0" if p % 2 else "", Consolidation="0.0",
                     Pleural_Effusion="-1.0")
        for p in range(1, 11) for v in (1, 2)
    ]
    valid = [
        chexpert_row(f"CheXpert-v1.0-small/valid/patient{p:05d}/study1/view1_frontal.jpg",
                     Atelectasis="1.0", Cardiomegaly="0.0", Edema="0.0", Consolidation="1.0", Pleural_Effusion="0.0")
        for p in (64541, 64542)
    ]
    write_csv(root / "train.csv", CHEXPERT_COLUMNS, train)
    write_csv(root / "valid.csv", CHEXPERT_COLUMNS, valid)
    ids = [f"/data/CheXpert-v1.0-small/{row[0].split('/', 1)[1]}" for row in train + valid]
    ids.append("/data/elsewhere/image.png")
    table = feature_table(tmp_path / "features", ids)

    data = prepare_protocol("chexpert5", table, root, val_fraction=0.2, seed=1)
    assert data.label_names == CHEXPERT5_LABELS
    assert len(data.test) == 2 and data.test.ids == tuple(ids[20:22])
    np.testing.assert_array_equal(data.test.labels, [[1, 0, 1, 0, 0]] * 2)
    assert len(data.train) + len(data.val) == 20 and data.val_carved
    assert set(data.train.groups).isdisjoint(data.val.groups) and len(set(data.val.groups)) == 2
    # U-Ones for Atelectasis and Edema, U-Zeros for the others; blank Edema is negative.
    all_labels = np.concatenate([data.train.labels, data.val.labels])
    labels_by_id = dict(zip(data.train.ids + data.val.ids, all_labels))
    np.testing.assert_array_equal(labels_by_id[ids[0]], [1, 0, 0, 1, 0])
    assert set(all_labels[:, 3]) == {0.0, 1.0} and not np.isnan(all_labels).any()
    assert data.unlabelled_feature_rows == 1 and data.missing_feature_items == 0
    np.testing.assert_array_equal(table.features[data.test.rows], table.features[[20, 21]])


def test_chexpert5_needs_its_files_and_columns(tmp_path):
    table = feature_table(tmp_path / "features", ["a"])
    with pytest.raises(ValueError, match="labels_root is required"):
        prepare_protocol("chexpert5", table)
    with pytest.raises(LabelFileError, match="file not found") as error:
        prepare_protocol("chexpert5", table, tmp_path)
    assert error.value.path == tmp_path / "train.csv"
    write_csv(tmp_path / "train.csv", ("Path", "Atelectasis"), [["train/p/s/v.jpg", "1"]])
    with pytest.raises(LabelFileError, match="missing columns.*Cardiomegaly"):
        prepare_protocol("chexpert5", table, tmp_path)


def write_mimic_tree(root, compress=True):
    label_rows = [
        ["10000001", "50000001"] + ["1.0", "-1.0", ""] + ["0.0"] * 11,
        ["10000002", "50000002"] + ["0.0"] * 14,
        ["10000003", "50000003"] + [""] * 13 + ["1.0"],
        ["10000004", "50000004"] + ["1.0"] * 14,
    ]
    split_rows = [
        ["d1a", "50000001", "10000001", "train"],
        ["d1b", "50000001", "10000001", "train"],
        ["d2", "50000002", "10000002", "validate"],
        ["d3", "50000003", "10000003", "test"],
        ["d4", "50000004", "10000004", "test"],
        ["d5", "50000005", "10000005", "train"],
    ]
    suffix = ".csv.gz" if compress else ".csv"
    label_columns = ("subject_id", "study_id") + MIMIC14_LABELS
    write_csv(root / f"mimic-cxr-2.0.0-chexpert{suffix}", label_columns, label_rows, compress)
    split_columns = ("dicom_id", "study_id", "subject_id", "split")
    write_csv(root / f"mimic-cxr-2.0.0-split{suffix}", split_columns, split_rows, compress)


@pytest.mark.parametrize("compress", [True, False])
def test_mimic14_uses_the_official_split_and_ignores_uncertain(tmp_path, compress):
    write_mimic_tree(tmp_path / "mimic", compress)
    ids = ["files/p10/p10000001/s50000001/d1a.jpg", "files/p10/p10000001/s50000001/d1b.jpg",
           "files/p10/p10000002/s50000002/d2.jpg", "files/p10/p10000003/s50000003/d3.jpg", "d5"]
    data = prepare_protocol("mimic14", feature_table(tmp_path / "features", ids), tmp_path / "mimic")
    assert data.label_names == MIMIC14_LABELS and not data.val_carved
    assert data.train.ids == tuple(ids[:2]) and data.val.ids == (ids[2],) and data.test.ids == (ids[3],)
    first = data.train.labels[0]
    assert first[0] == 1 and math.isnan(first[1]) and first[2] == 0 and (first[3:] == 0).all()
    np.testing.assert_array_equal(data.test.labels[0], [0] * 13 + [1])
    # d5's study has no labels (left out); d4 has labels but no features.
    assert data.unlabelled_feature_rows == 1 and data.missing_feature_items == 1
    assert data.train.groups == ("10000001", "10000001")


def test_mimic14_rejects_unknown_label_values(tmp_path):
    write_mimic_tree(tmp_path)
    path = tmp_path / "mimic-cxr-2.0.0-chexpert.csv.gz"
    write_csv(path, ("subject_id", "study_id") + MIMIC14_LABELS, [["1", "2"] + ["2.0"] * 14], compress=True)
    with pytest.raises(LabelFileError, match="'2.0' is not 1, 0, -1 or blank") as error:
        prepare_protocol("mimic14", feature_table(tmp_path / "features", ["d1a"]), tmp_path)
    assert error.value.path == path


def test_ctrate18_reads_the_label_csvs(tmp_path):
    label_dir = tmp_path / "CT-RATE" / "dataset" / "multi_abnormality_labels"
    train = [[f"train_{p}_a_{r}.nii.gz"] + [str((p + j) % 2) for j in range(18)] for p in range(1, 9) for r in (1, 2)]
    valid = [[f"valid_{p}_a_1.nii.gz"] + [str((p * j) % 2) for j in range(18)] for p in (1, 2, 3)]
    write_csv(label_dir / "train_predicted_labels.csv", ("VolumeName",) + CTRATE18_LABELS, train)
    write_csv(label_dir / "valid_predicted_labels.csv", ("VolumeName",) + CTRATE18_LABELS, valid)
    ids = [f"dataset/train_fixed/train_{p}/train_{p}_a/train_{p}_a_{r}.nii.gz" for p in range(1, 9) for r in (1, 2)]
    ids += ["valid_1_a_1", "valid_2_a_1.nii.gz"]
    data = prepare_protocol("ctrate18", feature_table(tmp_path / "features", ids), tmp_path / "CT-RATE", seed=3)
    assert data.label_names == CTRATE18_LABELS and len(CTRATE18_LABELS) == 18
    assert data.test.ids == tuple(ids[-2:]) and data.missing_feature_items == 1
    np.testing.assert_array_equal(data.test.labels[1], [(2 * j) % 2 for j in range(18)])
    assert len(data.val) == 2 and data.val.groups[0] == data.val.groups[1]
    assert set(data.train.groups).isdisjoint(data.val.groups)
    # The dataset directory itself works as labels root too.
    dataset_dir = tmp_path / "CT-RATE" / "dataset"
    again = prepare_protocol("ctrate18", feature_table(tmp_path / "features2", ids), dataset_dir, seed=3)
    assert again.val.ids == data.val.ids


def test_manifest_takes_labels_and_splits_from_the_table(tmp_path):
    labels = np.array([[1, 0], [0, -1], [1, np.nan], [0, 1], [1, 1]], dtype=float)
    table = feature_table(
        tmp_path / "features", ["a", "b", "c", "d", "e"], ("x", "y"), labels,
        splits=["train", "TRAIN", "validation", "test", "valid"],
    )
    data = prepare_protocol("manifest", table)
    assert data.train.ids == ("a", "b") and data.val.ids == ("c", "e") and data.test.ids == ("d",)
    assert math.isnan(data.train.labels[1, 1]) and not data.val_carved


def test_manifest_without_splits_carves_test_and_val_by_group(tmp_path):
    num_rows = 40
    table = feature_table(
        tmp_path / "features", [f"r{i}" for i in range(num_rows)], ("x",), np.arange(num_rows)[:, None] % 2,
        groups=[f"g{i // 2}" for i in range(num_rows)],
    )
    data = prepare_protocol("manifest", table, val_fraction=0.25, test_fraction=0.25, seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (22, 8, 10)
    split_groups = [set(split.groups) for split in (data.train, data.val, data.test)]
    assert all(a.isdisjoint(b) for i, a in enumerate(split_groups) for b in split_groups[i + 1 :])
    again = prepare_protocol("manifest", table, val_fraction=0.25, test_fraction=0.25, seed=0)
    assert again.test.ids == data.test.ids


def test_manifest_rejects_bad_labels_and_splits(tmp_path):
    table = feature_table(tmp_path / "a", ["a", "b"], ("x",), np.array([[1.0], [3.0]]), splits=["train", "test"])
    with pytest.raises(ValueError, match="row 'b', label 'x' holds 3.0"):
        prepare_protocol("manifest", table)
    table = feature_table(tmp_path / "b", ["a", "b"], ("x",), np.array([[1.0], [0.0]]), splits=["train", "holdout"])
    with pytest.raises(ValueError, match="row 'b' has 'holdout'"):
        prepare_protocol("manifest", table)


def test_carve_groups_and_protocol_names():
    groups = [f"g{i % 10}" for i in range(50)]
    mask = carve_groups(groups, 0.3, seed=2)
    chosen = {group for group, picked in zip(groups, mask) if picked}
    assert len(chosen) == 3 and all(picked == (group in chosen) for group, picked in zip(groups, mask))
    with pytest.raises(ValueError, match="at least 2 groups"):
        carve_groups(["only"] * 5, 0.5, seed=0)
    with pytest.raises(ValueError, match="protocol must be one of"):
        get_protocol("chexpert14")
