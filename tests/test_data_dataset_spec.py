"""Opening data sets by kind, path and splits (mmv.data.dataset_spec), the manifest's split and group columns,
new data sets from old ones (subset, concat, map_records) and the pretraining sources built on them.

The trees here hold tables and empty image files only: opening a data set reads tables, never pixels.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import re
from pathlib import Path

import numpy as np
import pytest

from mmv.data import (
    CHEXPERT_COMPETITION_LABELS,
    CHEXPERT_LABELS,
    CT_RATE_LABELS,
    DATASET_KINDS,
    CheXpert,
    CtPreprocess,
    CtRate,
    DatasetSpec,
    Manifest,
    MimicCxr,
    ModalityPreprocess,
    open_dataset,
)
from mmv.data.dataset_spec import COMMON_SPLIT_NAMES, NAMED_SPLITS
from mmv.data.tables import TableError
from mmv.train.config import DataConfig
from mmv.train.sources import build_pretraining_sources


def write_table(path: Path, header: list[str], rows: list[list], compress: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with (gzip.open(path, "wt", newline="") if compress else open(path, "w", newline="")) as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# ------------------------------------------------------------------------------------------------
# Trees with every split of each named data set

# dicom_id, subject, study, split
MIMIC_ROWS = [
    ("t1", "10000032", "50000001", "train"),
    ("t2", "10000033", "50000002", "train"),
    ("v1", "10000034", "50000003", "validate"),
    ("s1", "10000035", "50000004", "test"),
    ("t3", "10000032", "50000005", "train"),  # the first patient again
]


@pytest.fixture(scope="module")
def mimic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mimic")
    write_table(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"],
                [[d, st, su, sp] for d, su, st, sp in MIMIC_ROWS], compress=True)
    write_table(root / "mimic-cxr-2.0.0-metadata.csv.gz",
                ["dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns"],
                [[d, su, st, "PA", 32, 32] for d, su, st, _ in MIMIC_ROWS], compress=True)
    write_table(root / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id", *CHEXPERT_LABELS],
                [[su, st, *(["1.0"] * len(CHEXPERT_LABELS))] for _, su, st, _ in MIMIC_ROWS], compress=True)
    return root  # fmt: skip


@pytest.fixture(scope="module")
def chexpert_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "CheXpert-v1.0-small"
    tables = {
        "train": ["patient00007/study1/view1_frontal.jpg", "patient00003/study1/view1_frontal.jpg"],
        "valid": ["patient64541/study1/view1_frontal.jpg"],
    }
    for split, paths in tables.items():
        write_table(root / f"{split}.csv", ["Path", "Frontal/Lateral", *CHEXPERT_LABELS],
                    [[f"CheXpert-v1.0-small/{split}/{path}", "Frontal", *([""] * 14)] for path in paths])
    return root  # fmt: skip


@pytest.fixture(scope="module")
def ct_rate_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ct-rate")
    volumes = {"train": ["train_1_a_1", "train_1_a_2", "train_2_a_1"], "valid": ["valid_9_a_1"]}
    for split, names in volumes.items():
        for name in names:
            patient = "_".join(name.split("_")[:2])
            path = root / split / patient / f"{patient}_{name.split('_')[2]}" / f"{name}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")  # opening checks that a volume is there, never reads it
        metadata = "validation" if split == "valid" else "train"
        write_table(root / "metadata" / f"{metadata}_metadata.csv",
                    ["VolumeName", "Rows", "Columns", "NumberofSlices", "XYSpacing", "ZSpacing",
                     "RescaleSlope", "RescaleIntercept"],
                    [[f"{name}.nii.gz", 16, 16, 8, "[0.8, 0.8]", 2.0, 1, -1024] for name in names])
        write_table(root / "multi_abnormality_labels" / f"{split}_predicted_labels.csv",
                    ["VolumeName", *CT_RATE_LABELS], [[f"{name}.nii.gz", *([0] * 18)] for name in names])
    return root  # fmt: skip


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """A manifest with split and group columns, splits written in mixed case, one row without a split."""
    root = tmp_path_factory.mktemp("manifest")
    rows = [
        ["a.png", "DX", "a", "p1", "train", "1"],
        ["b.nii.gz", "CT", "b", "p1", "Train", "0"],
        ["c.png", "DX", "c", "p2", " val ", ""],
        ["d.png", "DX", "d", "", "test", "1"],
        ["e.png", "DX", "e", "p3", "", "0"],
    ]
    return write_table(root / "manifest.csv", ["path", "modality", "id", "group", "split", "effusion"], rows)


@pytest.fixture(scope="module")
def plain_manifest(tmp_path_factory) -> Path:
    """A manifest without split or group columns."""
    root = tmp_path_factory.mktemp("plain")
    return write_table(root / "manifest.csv", ["path", "modality", "effusion"], [["a.png", "DX", "1"], ["b.png", "CT", ""]])


# ------------------------------------------------------------------------------------------------
# The factory: each kind and each split


def test_named_splits_are_the_data_set_classes_and_all_have_a_common_name():
    assert NAMED_SPLITS == {"mimic": MimicCxr.SPLITS, "chexpert": CheXpert.SPLITS, "ctrate": CtRate.SPLITS}
    assert set(NAMED_SPLITS) | {"manifest"} == set(DATASET_KINDS)
    for splits in NAMED_SPLITS.values():
        assert {COMMON_SPLIT_NAMES[split] for split in splits} <= {"train", "val", "test"}


def test_named_data_sets_record_their_own_split_and_the_patient_folder(mimic_root, chexpert_root, ct_rate_root):
    (validate,) = MimicCxr(mimic_root, "validate").records
    assert (validate.split, validate.group) == ("validate", "p10000034")
    (valid,) = CheXpert(chexpert_root, "valid.csv").records
    assert (valid.split, valid.group) == ("valid", "patient64541")
    assert [(r.split, r.group) for r in CtRate(ct_rate_root, "train").records][1:] == [("train", "train_1"), ("train", "train_2")]


def test_mimic_opens_every_split_in_order_with_common_split_names_and_numbered_patients(mimic_root):
    dataset = open_dataset(DatasetSpec("mimic", mimic_root))
    assert type(dataset) is MimicCxr and dataset.label_names == CHEXPERT_LABELS
    records = dataset.records
    assert [record.id for record in records] == ["t1", "t2", "t3", "v1", "s1"]  # train, validate, test
    assert [record.split for record in records] == ["train", "train", "train", "val", "test"]
    assert [record.group for record in records] == [f"patient_{n:06d}" for n in (1, 2, 1, 3, 4)]
    assert all(record.modality == "DX" for record in records)
    for split, ids in (("train", ["t1", "t2", "t3"]), ("validate", ["v1"]), ("test", ["s1"])):
        assert [record.id for record in open_dataset(DatasetSpec("mimic", mimic_root, splits=split)).records] == ids
    both = open_dataset(DatasetSpec("mimic", mimic_root, splits=("test", "validate")))
    assert [record.id for record in both.records] == ["s1", "v1"]  # in the order asked


def test_chexpert_opens_each_table(chexpert_root):
    dataset = open_dataset(DatasetSpec("chexpert", chexpert_root))
    assert type(dataset) is CheXpert
    assert [record.split for record in dataset.records] == ["train", "train", "val"]
    assert [record.group for record in dataset.records] == ["patient_000001", "patient_000002", "patient_000003"]
    valid = open_dataset(DatasetSpec("chexpert", chexpert_root, splits="valid"))
    assert [record.id for record in valid.records] == ["CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg"]
    train = open_dataset(DatasetSpec("chexpert", chexpert_root, splits="train"))
    assert len(train) == 2 and {record.split for record in train.records} == {"train"}


def test_ct_rate_opens_each_split_and_its_fixed_copies(ct_rate_root, tmp_path):
    dataset = open_dataset(DatasetSpec("ctrate", ct_rate_root))
    assert type(dataset) is CtRate and dataset.label_names == CT_RATE_LABELS
    assert [record.id for record in dataset.records] == ["train_1_a_1", "train_1_a_2", "train_2_a_1", "valid_9_a_1"]
    assert [record.split for record in dataset.records] == ["train", "train", "train", "val"]
    assert [record.group for record in dataset.records] == [f"patient_{n:06d}" for n in (1, 1, 2, 3)]
    assert len(open_dataset(DatasetSpec("ctrate", ct_rate_root, splits="valid"))) == 1
    assert len(open_dataset(DatasetSpec("ctrate", ct_rate_root, splits="train"))) == 3
    # The fixed copies are another folder: none is there, so the data set is empty, which is an error.
    with pytest.raises(ValueError, match="holds no images"):
        open_dataset(DatasetSpec("ctrate", ct_rate_root, splits="valid", fixed=True))


def test_manifest_records_carry_its_split_and_group_cells(manifest):
    dataset = open_dataset(DatasetSpec("manifest", manifest))
    assert type(dataset) is Manifest
    assert (dataset.split_column, dataset.group_column, dataset.id_column) == ("split", "group", "id")
    assert dataset.label_names == ("effusion",)  # split and group describe rows, they are not labels
    assert [record.split for record in dataset.records] == ["train", "Train", "val", "test", ""]
    assert [record.group for record in dataset.records] == ["p1", "p1", "p2", "", "p3"]


def test_manifest_splits_select_rows_regardless_of_case(manifest):
    train = open_dataset(DatasetSpec("manifest", manifest, splits="train"))
    assert type(train) is Manifest and [record.id for record in train.records] == ["a", "b"]
    assert [record.split for record in train.records] == ["train", "Train"]  # as written
    several = open_dataset(DatasetSpec("manifest", manifest, splits=("TEST", "val")))
    assert [record.id for record in several.records] == ["c", "d"]  # in table order
    assert [record.id for record in Manifest(manifest).in_splits("VAL").records] == ["c"]


def test_manifest_in_splits_checks_its_own_argument_and_every_split_it_names(manifest):
    dataset = Manifest(manifest)
    for splits in ((), " ", ["train", ""], [1]):
        with pytest.raises(ValueError, match="splits must be one or more non-blank split names"):
            dataset.in_splits(splits)
    with pytest.raises(ValueError, match=r"no rows with split \['holdout'\]"):
        dataset.in_splits(["train", "holdout"])  # one split present does not excuse another absent


def test_manifest_without_split_and_group_columns(plain_manifest):
    dataset = open_dataset(DatasetSpec("manifest", plain_manifest))
    assert (dataset.split_column, dataset.group_column) == (None, None)
    assert [(record.split, record.group) for record in dataset.records] == [("", ""), ("", "")]
    with pytest.raises(ValueError, match="needs a 'split' column"):
        open_dataset(DatasetSpec("manifest", plain_manifest, splits="train"))


def test_bad_kind_and_bad_splits_raise_value_errors_naming_the_argument_and_the_accepted_values(manifest, tmp_path):
    with pytest.raises(ValueError, match=r"kind must be one of \('manifest', 'mimic', 'chexpert', 'ctrate'\), got 'nifti'"):
        DatasetSpec("nifti", manifest)
    for kind, accepted in NAMED_SPLITS.items():
        with pytest.raises(ValueError, match=re.escape(f"splits of {kind} must be among {accepted}, got ['holdout']")):
            DatasetSpec(kind, tmp_path, splits=("train", "holdout"))
    for splits in ((), ("",), ("  ",), (1,)):
        with pytest.raises(ValueError, match="splits must be None or non-empty split names"):
            DatasetSpec("manifest", manifest, splits=splits)
    with pytest.raises(ValueError, match=r"no rows with split \['holdout'\]; the split column holds \['', 'Train', 'test', 'train', 'val'\]"):
        open_dataset(DatasetSpec("manifest", manifest, splits=("train", "holdout")))
    with pytest.raises(ValueError, match="fixed applies to ctrate only"):
        DatasetSpec("mimic", tmp_path, fixed=True)
    with pytest.raises(ValueError, match="id_column and label_columns apply to manifest only"):
        DatasetSpec("chexpert", tmp_path, label_columns=("Edema",))
    with pytest.raises(TypeError, match="spec must be a DatasetSpec"):
        open_dataset({"kind": "manifest", "path": manifest})
    with pytest.raises(TableError, match="file not found"):
        open_dataset(DatasetSpec("manifest", tmp_path / "missing.csv"))


def test_spec_describes_itself_for_run_records(manifest):
    spec = DatasetSpec("manifest", str(manifest), splits="train", label_columns=["effusion"])
    assert spec.path == manifest and spec.splits == ("train",) and spec.label_columns == ("effusion",)
    assert spec.to_dict() == {
        "kind": "manifest", "path": str(manifest), "splits": ("train",), "fixed": False, "id_column": None,
        "label_columns": ("effusion",),
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------
# New data sets from old ones


def test_subset_by_numbers_or_predicate_keeps_the_class_and_settings(manifest):
    transform = ModalityPreprocess()
    dataset = Manifest(manifest, transform=transform, on_error="skip")
    dataset.skipped = 3
    picked = dataset.subset(np.array([4, 0, -1]))
    assert type(picked) is Manifest and [record.id for record in picked.records] == ["e", "a", "e"]
    assert picked.transform is transform and picked.on_error == "skip" and picked.label_names == dataset.label_names
    assert picked.id_column == "id" and picked.split_column == "split" and picked.skipped == 0
    assert [record.id for record in dataset.records] == ["a", "b", "c", "d", "e"]  # the original is untouched
    assert [record.id for record in dataset.subset(lambda record: record.modality == "CT").records] == ["b"]
    assert len(dataset.subset([])) == 0
    with pytest.raises(IndexError, match="record number 5"):
        dataset.subset([5])
    with pytest.raises(TypeError, match="integer record numbers"):
        dataset.subset([True, False, True, False, True])
    with pytest.raises(TypeError, match="integer record numbers"):
        dataset.subset([1.0])
    with pytest.raises(TypeError, match="selection must be"):
        dataset.subset("ab")


def test_concat_joins_data_sets_of_the_same_class_and_settings_or_raises(
    mimic_root, chexpert_root, manifest, plain_manifest
):
    train, test = MimicCxr(mimic_root, "train"), MimicCxr(mimic_root, "test")
    joined = train.concat(test)
    assert type(joined) is MimicCxr and [record.id for record in joined.records] == ["t1", "t2", "t3", "s1"]
    assert len(train) == 3 and len(train.concat()) == 3
    with pytest.raises(TypeError, match=r"others\[0\] must be a MimicCxr"):
        train.concat(Manifest(manifest))
    full, valid = CheXpert(chexpert_root, "train.csv"), CheXpert(chexpert_root, "valid.csv")
    competition = CheXpert(chexpert_root, "valid.csv", labels=CHEXPERT_COMPETITION_LABELS)
    with pytest.raises(ValueError, match=r"others\[1\] has label_names \('Atelectasis', .*\), the data set it joins"):
        full.concat(valid, competition)
    with pytest.raises(ValueError, match="has transform"):
        train.concat(MimicCxr(mimic_root, "test", transform=CtPreprocess()))
    with pytest.raises(ValueError, match="has on_error"):
        train.concat(MimicCxr(mimic_root, "test", on_error="skip"))
    # Manifests must also agree on what their columns mean.
    with pytest.raises(ValueError, match="has split_column None"):
        Manifest(manifest, id_column="path", label_columns=()).concat(Manifest(plain_manifest, label_columns=()))
    with pytest.raises(ValueError, match="has id_column 'path'"):
        Manifest(manifest).concat(Manifest(manifest, id_column="path", label_columns=["effusion"]))


def test_map_records_makes_new_records_and_checks_their_labels(manifest):
    dataset = Manifest(manifest)
    renamed = dataset.map_records(lambda record: dataclasses.replace(record, group=record.group or "none"))
    assert type(renamed) is Manifest and [record.group for record in renamed.records] == ["p1", "p1", "p2", "none", "p3"]
    assert [record.group for record in dataset.records] == ["p1", "p1", "p2", "", "p3"]
    with pytest.raises(ValueError, match="record 'a' has 2 labels, expected 1"):
        dataset.map_records(lambda record: dataclasses.replace(record, labels=(*record.labels, 0.0)))


# ------------------------------------------------------------------------------------------------
# Pretraining sources


def sources(*entries: dict) -> DataConfig:
    return DataConfig(sources=list(entries))


def test_pretraining_sources_take_a_manifests_split_and_a_named_data_sets_train_split(manifest, mimic_root):
    mixed = build_pretraining_sources(sources(
        {"kind": "manifest", "path": str(manifest), "split": "TRAIN", "weight": 1.0},
        {"kind": "mimic", "path": str(mimic_root), "weight": 3.0},
    ))  # fmt: skip
    first, second = mixed.sources
    assert [record.id for record in first.records] == ["a", "b"] and first.label_names == ()
    assert [record.id for record in second.records] == ["t1", "t2", "t3"] and first.on_error == second.on_error == "skip"
    assert mixed.weights == (1.0, 3.0)
    whole = build_pretraining_sources(sources({"kind": "manifest", "path": str(manifest)})).sources[0]
    assert len(whole) == 5 and mixed.sources[0].transform == whole.transform


def test_pretraining_source_errors_name_the_entry_and_the_accepted_values(manifest, chexpert_root, plain_manifest):
    with pytest.raises(ValueError, match=r"data.sources entry .*kind must be one of \('manifest', 'mimic'"):
        build_pretraining_sources(sources({"kind": "nifti", "path": str(manifest)}))
    # A CheXpert split other than train or valid used to look for a table of that name.
    with pytest.raises(ValueError, match=r"data.sources entry .*splits of chexpert must be among \('train', 'valid'\)"):
        build_pretraining_sources(sources({"kind": "chexpert", "path": str(chexpert_root), "split": "test"}))
    with pytest.raises(ValueError, match="unknown key"):
        build_pretraining_sources(sources({"kind": "manifest", "path": str(manifest), "splits": "train"}))
    with pytest.raises(ValueError, match="id_column and label_columns apply to manifest only"):
        build_pretraining_sources(sources({"kind": "chexpert", "path": str(chexpert_root), "id_column": "Path"}))
    with pytest.raises(ValueError, match="needs a 'split' column"):
        build_pretraining_sources(sources({"kind": "manifest", "path": str(plain_manifest), "split": "train"}))
    with pytest.raises(ValueError, match="no rows with split"):
        build_pretraining_sources(sources({"kind": "manifest", "path": str(manifest), "split": "holdout"}))
