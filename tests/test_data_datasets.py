"""Datasets on small fake trees with the real layouts, the preprocessing cache, mixtures and the packed loader."""

from __future__ import annotations

import csv
import gzip
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

itk = pytest.importorskip("itk")
nibabel = pytest.importorskip("nibabel")
pydicom = pytest.importorskip("pydicom")

from mmv.data import (  # noqa: E402
    CHEXPERT_COMPETITION_LABELS,
    CHEXPERT_LABELS,
    CT_RATE_LABELS,
    CheXpert,
    CtPreprocess,
    CtRate,
    ImageReadError,
    LabelledPackedBatch,
    Manifest,
    MimicCxr,
    MixedDataset,
    ModalityPreprocess,
    PackedCollate,
    PreprocessCache,
    TokenBudgetBatchSampler,
    XrayPreprocess,
)
from mmv.image import Image  # noqa: E402
from mmv.packing import PackedBatch, pack  # noqa: E402
from mmv.tokenizer import Tokenizer, count_tokens  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning")

CT_SERIES = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"


def write_csv(path: Path, header: list[str], rows: list[list], compress: bool = False) -> None:
    opener = gzip.open if compress else open
    with opener(path, "wt", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        writer.writerows(rows)


def write_radiograph(path: Path, rows: int, columns: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, size=(rows, columns)).astype(np.uint8)
    itk.imwrite(itk.image_from_array(pixels), str(path))


# ------------------------------------------------------------------------------------------------
# Fake trees, built once per session (ITK writes the images)

MIMIC_IMAGES = [
    # dicom_id, subject, study, view, rows, columns, split
    ("d1", "10000032", "50414267", "PA", 40, 32, "train"),
    ("d2", "10000032", "50414267", "LATERAL", 40, 32, "train"),
    ("d3", "10000032", "53189527", "AP", 36, 44, "train"),
    ("d4", "11000011", "51000000", "PA", 30, 30, "test"),
    ("d5", "12000022", "52000000", "AP", 32, 28, "train"),  # a study without a label row
]


@pytest.fixture(scope="session")
def mimic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mimic-cxr-jpg")
    for seed, (dicom, subject, study, _, rows, columns, _) in enumerate(MIMIC_IMAGES):
        study_folder = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        write_radiograph(study_folder / f"{dicom}.jpg", rows, columns, seed)
    write_csv(
        root / "mimic-cxr-2.0.0-split.csv.gz",
        ["dicom_id", "study_id", "subject_id", "split"],
        [[d, st, su, sp] for d, su, st, _, _, _, sp in MIMIC_IMAGES],
        compress=True,
    )
    write_csv(
        root / "mimic-cxr-2.0.0-metadata.csv.gz",
        ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns"],
        [[d, su, st, "CHEST (PA AND LAT)", v, r, c] for d, su, st, v, r, c, _ in MIMIC_IMAGES],
        compress=True,
    )
    first = ["1.0", "", "-1.0", "0.0"] + [""] * 10
    second = ["0.0"] * 8 + ["1.0"] + ["0.0"] * 5
    third = [""] * 14
    write_csv(
        root / "mimic-cxr-2.0.0-chexpert.csv.gz",
        ["subject_id", "study_id", *CHEXPERT_LABELS],
        [["10000032", "50414267", *first], ["10000032", "53189527", *second], ["11000011", "51000000", *third]],
        compress=True,
    )
    return root


@pytest.fixture(scope="session")
def chexpert_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "CheXpert-v1.0-small"
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *_chexpert_csv_order()]
    rows = []
    views = [
        ("patient00001/study1/view1_frontal.jpg", "Frontal", "AP"),
        ("patient00001/study1/view2_lateral.jpg", "Lateral", ""),
        ("patient00002/study1/view1_frontal.jpg", "Frontal", "PA"),
    ]
    for seed, (relative, view, projection) in enumerate(views):
        write_radiograph(root / "train" / relative, 24 + 4 * seed, 20, seed)
        labels = {name: "" for name in CHEXPERT_LABELS}
        labels.update({"Atelectasis": "-1.0", "Cardiomegaly": "1.0", "Edema": "0.0", "Pleural Effusion": "-1.0"})
        cells = [labels[name] for name in _chexpert_csv_order()]
        rows.append([f"CheXpert-v1.0-small/train/{relative}", "Female", "68", view, projection, *cells])
    write_csv(root / "train.csv", header, rows)
    return root


def _chexpert_csv_order() -> list[str]:
    return [
        "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
        "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
        "Fracture", "Support Devices",
    ]  # fmt: skip


CT_SHAPE_XYZ = (24, 20, 6)  # columns, rows, slices
CT_SPACING = {"XYSpacing": "[0.8, 0.7]", "ZSpacing": 2.5}


def ct_raw_values(seed: int) -> np.ndarray:
    """Stored values (x, y, z) of a fake scan: air (0 -> -1024 HU) around a soft-tissue block (1064 -> 40 HU)."""
    raw = np.zeros(CT_SHAPE_XYZ, dtype=np.int16)
    raw[6:18, 5:15, :] = 1064
    raw[0, 0, seed % 6] = 2024  # a bright voxel marks the volume
    return raw


@pytest.fixture(scope="session")
def ct_rate_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ct-rate")
    dataset = root / "dataset"
    names = ["valid_1_a_1", "valid_1_a_2", "valid_2_b_1", "valid_3_a_1"]  # valid_3_a_1 is not downloaded
    for seed, name in enumerate(names[:3]):
        patient = "_".join(name.split("_")[:2])
        relative = Path(patient) / f"{patient}_{name.split('_')[2]}" / f"{name}.nii.gz"
        raw = ct_raw_values(seed)
        # Original: blank header (identity affine, no scaling), values as stored by the scanner.
        (dataset / "valid" / relative).parent.mkdir(parents=True, exist_ok=True)
        nibabel.save(nibabel.Nifti1Image(raw, np.eye(4)), dataset / "valid" / relative)
        # Fixed copy: spacing and the scanner's scaling in the header.
        fixed = nibabel.Nifti1Image(raw, np.diag([0.7, 0.8, 2.5, 1.0]))
        fixed.header.set_slope_inter(1.0, -1024.0)
        (dataset / "valid_fixed" / relative).parent.mkdir(parents=True, exist_ok=True)
        nibabel.save(fixed, dataset / "valid_fixed" / relative)
    (dataset / "metadata").mkdir()
    write_csv(
        dataset / "metadata" / "validation_metadata.csv",
        ["VolumeName", "Manufacturer", "Rows", "Columns", "XYSpacing", "RescaleIntercept", "RescaleSlope",
         "RescaleType", "NumberofSlices", "ZSpacing"],
        [[f"{n}.nii.gz", "ACME", CT_SHAPE_XYZ[1], CT_SHAPE_XYZ[0], CT_SPACING["XYSpacing"], -1024, 1, "HU",
          CT_SHAPE_XYZ[2], CT_SPACING["ZSpacing"]] for n in names],
    )  # fmt: skip
    (dataset / "multi_abnormality_labels").mkdir()
    write_csv(
        dataset / "multi_abnormality_labels" / "valid_predicted_labels.csv",
        ["VolumeName", *CT_RATE_LABELS],
        [[f"{n}.nii.gz", *[(i + k) % 2 for k in range(18)]] for i, n in enumerate(names[:2])],
    )
    return root


@pytest.fixture(scope="session")
def manifest_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("manifest")
    write_radiograph(root / "xray.png", 50, 40, 0)
    shutil.copytree(CT_SERIES, root / "series")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    write_csv(
        root / "manifest.csv",
        ["path", "modality", "effusion", "nodule"],
        [["xray.png", "DX", "1", ""], ["series", "CT", "0", "1"], ["broken.png", "DX", "", "0"]],
    )
    return root


# ------------------------------------------------------------------------------------------------
# MIMIC-CXR-JPG


def test_mimic_split_frontal_views_and_study_labels(mimic_root):
    train = MimicCxr(mimic_root, "train")
    assert [r.id for r in train.records] == ["d1", "d3", "d5"]  # the lateral view and the test image are out
    first = train[0]
    assert first.modality == "DX" and first.id == "d1"
    assert first.image.shape == (40, 32)
    assert first.image.spacing == pytest.approx((350 / 32, 350 / 32))
    labels = first.labels
    assert labels.dtype == torch.float32 and labels.shape == (14,)
    assert labels[0] == 1.0 and labels[3] == 0.0
    assert math.isnan(labels[1]) and math.isnan(labels[2])  # blank, and uncertain under "ignore"
    assert float(train[1].labels[CHEXPERT_LABELS.index("No Finding")]) == 1.0
    assert bool(torch.isnan(train[2].labels).all())  # study without a label row
    assert len(MimicCxr(mimic_root, "train", frontal_only=False)) == 4
    assert [r.id for r in MimicCxr(mimic_root, "test").records] == ["d4"]
    assert float(MimicCxr(mimic_root, "train", uncertainty="ones")[0].labels[2]) == 1.0
    with pytest.raises(ValueError, match="split"):
        MimicCxr(mimic_root, "valid")


def test_token_counts_are_predicted_without_reading_pixels(mimic_root):
    transform = XrayPreprocess(short_side=16)
    dataset = MimicCxr(mimic_root, "train", transform=transform)
    counts = dataset.token_counts((4, 8, 8), progress=False)
    actual = [count_tokens(dataset[i].image.shape, (4, 8, 8)) for i in range(len(dataset))]
    assert counts == actual
    image = dataset[1].image
    assert min(image.shape) == 16 and float(image.pixels.min()) == -1.0 and float(image.pixels.max()) == 1.0


# ------------------------------------------------------------------------------------------------
# CheXpert


def test_chexpert_paths_policies_and_competition_labels(chexpert_root):
    dataset = CheXpert(chexpert_root, "train.csv")
    assert len(dataset) == 2  # frontal only
    sample = dataset[0]
    assert sample.id == "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"
    assert sample.image.shape == (24, 20)
    assert dataset.label_names == CHEXPERT_LABELS
    assert math.isnan(sample.labels[CHEXPERT_LABELS.index("Atelectasis")])  # U-Ignore by default
    competition = CheXpert(
        chexpert_root, "train.csv", labels=CHEXPERT_COMPETITION_LABELS,
        uncertainty={"Atelectasis": "ones", "Pleural Effusion": "zeros"},
    )  # fmt: skip
    assert competition.label_names == CHEXPERT_COMPETITION_LABELS
    values = competition[0].labels.tolist()
    assert values[0] == 1.0 and values[1] == 1.0 and math.isnan(values[2]) and values[3] == 0.0 and values[4] == 0.0
    assert len(CheXpert(chexpert_root, "train.csv", frontal_only=False)) == 3
    with pytest.raises(ValueError, match="uncertainty policy"):
        CheXpert(chexpert_root, uncertainty="maybe")
    with pytest.raises(ValueError, match="subset"):
        CheXpert(chexpert_root, labels=["Broken Heart"])


# ------------------------------------------------------------------------------------------------
# CT-RATE


def air_peak(pixels: torch.Tensor) -> float:
    values, counts = torch.unique(pixels.round(), return_counts=True)
    return float(values[counts.argmax()])


@pytest.mark.parametrize("fixed", [False, True])
def test_ct_rate_scaling_and_spacing_come_from_one_source(ct_rate_root, fixed):
    dataset = CtRate(ct_rate_root, "valid", fixed=fixed)
    assert [r.id for r in dataset.records] == ["valid_1_a_1", "valid_1_a_2", "valid_2_b_1"]
    sample = dataset[0]
    assert sample.modality == "CT"
    assert sample.image.shape == (6, 20, 24)
    assert sample.image.spacing == pytest.approx((2.5, 0.8, 0.7))
    assert air_peak(sample.image.pixels) == pytest.approx(-1024.0, abs=1.0)
    assert float(sample.image.pixels.max()) == pytest.approx(1000.0)  # the marker, 2024 stored
    assert float(sample.image.pixels[3, 10, 12]) == pytest.approx(40.0)  # soft tissue
    assert sample.labels.tolist() == [float(k % 2) for k in range(18)]
    assert bool(torch.isnan(dataset[2].labels).all())  # no label row
    assert dataset.image_info(0).shape == sample.image.shape


def test_fixed_and_original_volumes_agree(ct_rate_root):
    original = CtRate(ct_rate_root, "valid")[1].image
    fixed = CtRate(ct_rate_root, "valid", fixed=True)[1].image
    torch.testing.assert_close(original.pixels, fixed.pixels)


def test_ct_rate_with_preprocessing_and_cache(ct_rate_root, tmp_path):
    transform = CtPreprocess(spacing=(3.0, 1.0, 1.0), size_mm=(18.0, 20.0, 20.0))
    cache = PreprocessCache(tmp_path / "cache")
    dataset = CtRate(ct_rate_root, "valid", transform=transform, cache=cache)
    uncached = CtRate(ct_rate_root, "valid", transform=transform)
    first = [dataset[i] for i in range(len(dataset))]
    again = [dataset[i] for i in range(len(dataset))]
    assert (cache.misses, cache.hits) == (3, 3)
    for a, b, c in zip(first, again, (uncached[i] for i in range(len(uncached)))):
        torch.testing.assert_close(a.image.pixels, b.image.pixels)
        torch.testing.assert_close(b.image.pixels, c.image.pixels)
        assert b.image.spacing == c.image.spacing == (3.0, 1.0, 1.0) and b.image.modality == "CT"
    assert first[0].image.shape == (6, 20, 20)
    assert dataset.token_counts((2, 4, 4), progress=False) == [3 * 5 * 5] * 3


# ------------------------------------------------------------------------------------------------
# Manifest, skipping, mixtures and the packed loader


def test_manifest_reads_any_listed_file(manifest_root):
    dataset = Manifest(manifest_root / "manifest.csv")
    assert dataset.label_names == ("effusion", "nodule")
    xray, series = dataset[0], dataset[1]
    assert xray.modality == "DX" and xray.image.shape == (50, 40)
    assert series.modality == "CT" and series.image.shape == (5, 16, 16) and series.id == "series"
    assert xray.labels[0] == 1.0 and math.isnan(xray.labels[1])
    with pytest.raises(ImageReadError) as error:
        dataset[2]
    assert error.value.path.endswith("broken.png")


def test_skipping_logs_once_and_counts(manifest_root, caplog):
    dataset = Manifest(manifest_root / "manifest.csv", on_error="skip")
    with caplog.at_level(logging.WARNING, logger="mmv.data.datasets"):
        assert dataset[2] is None
        assert dataset[2] is None
    assert dataset.skipped == 2
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1 and "broken.png" in messages[0]
    assert dataset.token_counts((1, 8, 8), progress=False)[2] == 1
    with pytest.raises(ValueError, match="on_error"):
        Manifest(manifest_root / "manifest.csv", on_error="ignore")


def test_manifest_reads_the_manifest_mmv_phantom_writes(tmp_path):
    from mmv.data.phantom import PHANTOM_FINDINGS, PhantomSettings, write_phantom_dataset

    settings = PhantomSettings(ct_spacing=(16.0, 16.0, 16.0), xray_spacing=8.0)
    manifest = write_phantom_dataset(tmp_path, 2, seed=0, settings=settings, progress=False)
    with open(manifest, newline="") as stream:
        rows = list(csv.DictReader(stream))
    transform = ModalityPreprocess(CtPreprocess(spacing=(16.0,) * 3), XrayPreprocess(short_side=None, spacing=(8.0, 8.0)))
    dataset = Manifest(manifest, transform=transform)
    # split and group describe rows; id names them: none of them is a label.
    assert dataset.label_names == PHANTOM_FINDINGS and dataset.id_column == "id"
    assert [record.id for record in dataset.records] == [row["id"] for row in rows]
    assert [sample.modality for sample in dataset] == [row["modality"] for row in rows]
    for sample, row in zip(dataset, rows):
        assert sample.labels.tolist() == [float(row[name]) for name in PHANTOM_FINDINGS]


def test_a_bad_label_cell_is_named_by_line_column_and_value(manifest_root, tmp_path):
    shutil.copy(manifest_root / "xray.png", tmp_path / "xray.png")
    write_csv(tmp_path / "manifest.csv", ["path", "modality", "effusion", "nodule"],
              [["xray.png", "DX", "1", ""], ["xray.png", "DX", "0", "maybe"]])
    with pytest.raises(ValueError, match="manifest.csv: line 3, column 'nodule'.*'maybe'"):
        Manifest(tmp_path / "manifest.csv")
    assert Manifest(tmp_path / "manifest.csv", label_columns=["effusion"]).label_names == ("effusion",)


def test_mixed_dataset_routes_indices_and_weights(mimic_root, ct_rate_root):
    xrays = MimicCxr(mimic_root, "train")
    cts = CtRate(ct_rate_root, "valid")
    mixed = MixedDataset([xrays, cts], weights=[1.0, 3.0])
    assert len(mixed) == 6
    assert mixed[0].modality == "DX" and mixed[3].modality == "CT" and mixed[-1].id == "valid_2_b_1"
    weights = mixed.sample_weights()
    assert float(weights[:3].sum()) == pytest.approx(1.0) and float(weights[3:].sum()) == pytest.approx(3.0)
    with pytest.raises(IndexError):
        mixed[6]
    with pytest.raises(ValueError, match="weights"):
        MixedDataset([xrays, cts], weights=[1.0])


def make_loader_dataset(mimic_root, ct_rate_root):
    xrays = MimicCxr(mimic_root, "train", transform=XrayPreprocess(short_side=16))
    cts = CtRate(ct_rate_root, "valid", transform=CtPreprocess(spacing=(3.0, 1.0, 1.0)))
    return MixedDataset([xrays, cts])


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_packs_mixed_batches_within_the_budget(mimic_root, ct_rate_root, workers):
    dataset = make_loader_dataset(mimic_root, ct_rate_root)
    patch = (2, 8, 8)
    counts = dataset.token_counts(patch, progress=False)
    sampler = TokenBudgetBatchSampler(counts, max_tokens=max(counts) + 5, seed=0)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=PackedCollate(Tokenizer(patch), with_labels=True),
        num_workers=workers,
        multiprocessing_context="fork" if workers else None,
    )
    seen = []
    for item in loader:
        assert isinstance(item, LabelledPackedBatch) and isinstance(item.batch, PackedBatch)
        assert item.batch.num_tokens <= sampler.max_tokens and item.skipped == 0
        assert len(item.labels) == len(item.ids) == item.batch.num_images
        seen.extend(item.ids)
        for label, is_3d in zip(item.labels, item.batch.is_3d):
            assert label.shape == ((18,) if is_3d else (14,))
    assert sorted(seen) == sorted(["d1", "d3", "d5", "valid_1_a_1", "valid_1_a_2", "valid_2_b_1"])


class ImageLabelPairs(torch.utils.data.Dataset):
    """A plain data set of ``(mmv.Image, label)`` items, as a downstream project would write one."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def test_collate_packs_a_plain_image_label_data_set():
    radiograph = Image(torch.rand(32, 24), (1.0, 1.0), "DX")
    volume = Image(torch.rand(4, 16, 16), (2.0, 1.0, 1.0), "CT")
    dataset = ImageLabelPairs([(radiograph, 1), (volume, torch.tensor([0.0, 1.0])), (radiograph, None)])
    tokenizer = Tokenizer((2, 8, 8))
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=PackedCollate(tokenizer, with_labels=True))
    (item,) = list(loader)
    expected = pack([tokenizer(radiograph), tokenizer(volume), tokenizer(radiograph)])
    assert torch.equal(item.batch.patches_2d, expected.patches_2d) and torch.equal(item.batch.patches_3d, expected.patches_3d)
    assert item.batch.is_3d == expected.is_3d == (False, True, False)
    assert [label.tolist() for label in item.labels] == [[1.0], [0.0, 1.0], []]
    assert all(label.dtype == torch.float32 for label in item.labels)
    assert item.ids == [None, None, None] and item.skipped == 0
    collate = PackedCollate(tokenizer)
    assert collate([(radiograph, 0), None]).num_images == 1
    with pytest.raises(TypeError, match="samples\\[1\\]: the label must be a number, a tensor or None, got str"):
        collate([(radiograph, 0), (radiograph, "effusion")])
    with pytest.raises(TypeError, match="samples\\[0\\] must be .*got a tuple of \\(Tensor, int\\)"):
        collate([(torch.rand(8, 8), 0)])


def test_collate_drops_skipped_samples(manifest_root):
    dataset = Manifest(manifest_root / "manifest.csv", on_error="skip", transform=None)
    collate = PackedCollate(Tokenizer((1, 8, 8)))
    batch = collate([dataset[0], dataset[2]])
    assert isinstance(batch, PackedBatch) and batch.num_images == 1
    assert batch.num_tokens == count_tokens((50, 40), (1, 8, 8))
    assert collate([None, None]) is None
    with pytest.raises(TypeError, match="samples"):
        collate([torch.zeros(3)])
    with pytest.raises(TypeError, match="tokenizer"):
        PackedCollate((1, 8, 8))
