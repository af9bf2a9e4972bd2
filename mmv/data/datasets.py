"""Datasets of labelled medical images: MIMIC-CXR-JPG, CheXpert, CT-RATE, any CSV manifest, and mixtures.

Every dataset yields :class:`Sample` (an :class:`mmv.Image` after an optional preprocessing transform,
float32 labels with NaN where unknown, an id and a modality tag) and can say how large each preprocessed
image will be before reading it, which the token-budget batch sampler needs. With ``on_error="skip"`` an
unreadable file yields None instead of raising (the collate drops it), is logged once with its path and
reason, and is counted in :attr:`LabelledImageDataset.skipped`; one bad file never ends a long run.

Each record also knows its split and its group (the images of one patient or phantom);
:meth:`LabelledImageDataset.subset`, :meth:`~LabelledImageDataset.concat` and
:meth:`~LabelledImageDataset.map_records` make new data sets of the same class from a data set's records.
The modality tags are :data:`XRAY_MODALITY` and :data:`CT_MODALITY`.
"""

from __future__ import annotations

import copy
import logging
import math
import operator
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from tqdm.auto import tqdm

from mmv.data.cache import PreprocessCache
from mmv.data.io import ImageInfo, ImageReadError, inspect_nifti_header, read_image, read_image_info
from mmv.data.tables import TableError, read_table
from mmv.image import Image
from mmv.tokenizer import count_tokens

__all__ = [
    "Sample",
    "ImageRecord",
    "LabelledImageDataset",
    "MimicCxr",
    "CheXpert",
    "CtRate",
    "Manifest",
    "MixedDataset",
    "CHEXPERT_LABELS",
    "CHEXPERT_COMPETITION_LABELS",
    "CT_RATE_LABELS",
    "CT_MODALITY",
    "XRAY_MODALITY",
    "MANIFEST_ROW_COLUMNS",
]

logger = logging.getLogger(__name__)

# The modality tags of radiographs and of CT, as DICOM's Modality attribute spells them.
XRAY_MODALITY = "DX"
CT_MODALITY = "CT"

# The 14 CheXpert labeller observations, in the column order of MIMIC-CXR's chexpert table (alphabetical).
CHEXPERT_LABELS = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)
# The five labels the CheXpert competition scores by AUROC.
CHEXPERT_COMPETITION_LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
CT_RATE_LABELS = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)
# JPEG and PNG radiographs carry no pixel spacing; their short side is taken to span a typical detector's
# short side (35 cm), which puts X-ray tokens on the same millimetre scale as CT tokens.
NOMINAL_XRAY_SHORT_SIDE_MM = 350.0

_UNCERTAINTY_POLICIES = ("ones", "zeros", "ignore")
# Manifest columns that describe a row (its split of the data set, its group of related images), not label it.
MANIFEST_SPLIT_COLUMN = "split"
MANIFEST_GROUP_COLUMN = "group"
MANIFEST_ROW_COLUMNS = (MANIFEST_SPLIT_COLUMN, MANIFEST_GROUP_COLUMN)


@dataclass
class Sample:
    """One labelled image.

    Attributes:
        image: the (preprocessed) image.
        labels: float32 ``(L,)``: 1 positive, 0 negative, NaN unknown (uncertain labels follow the dataset's
            policy).
        id: a dataset-specific identifier (DICOM id, relative path or volume name; never a patient name).
        modality: :data:`XRAY_MODALITY` for radiographs, :data:`CT_MODALITY` for CT, or the manifest's value.
    """

    image: Image
    labels: torch.Tensor
    id: str
    modality: str


@dataclass(frozen=True)
class ImageRecord:
    """Where one sample's image is and what is known about it before reading.

    Attributes:
        path: file or DICOM series directory.
        labels: one float per label name, NaN where unknown.
        id: the sample id.
        modality: the modality tag.
        info: raw shape and spacing when a metadata table gives them (saves reading headers).
        hu_scaling: (slope, intercept) to apply when the file itself carries no intensity scaling.
        spacing: spacing in mm (z, y, x) to use when the file itself carries none.
        split: the data set's split the image belongs to, in the data set's own words (MIMIC-CXR's
            ``validate``, a manifest's ``split`` cell); blank when unknown.
        group: what ties the image to others of the same patient (or phantom): a manifest's ``group`` cell;
            the patient's folder in the named data sets' layouts (which :func:`mmv.data.open_dataset`
            replaces by a number, so that it is never written); blank when unknown.
    """

    path: Path
    labels: tuple[float, ...]
    id: str
    modality: str
    info: ImageInfo | None = None
    hu_scaling: tuple[float, float] | None = None
    spacing: tuple[float, ...] | None = None
    split: str = ""
    group: str = ""


_Dataset = TypeVar("_Dataset", bound="LabelledImageDataset")


class LabelledImageDataset(torch.utils.data.Dataset):
    """A map-style dataset over :class:`ImageRecord` items; the base of every dataset here.

    Args:
        records: the samples.
        label_names: the name of each label position.
        transform: preprocessing ``Image -> Image`` (e.g. :class:`mmv.data.CtPreprocess`); a transform with an
            ``output_shape(shape, spacing)`` method lets :meth:`token_counts` avoid reading pixels.
        cache: a :class:`mmv.data.PreprocessCache` for the transformed images, keyed by ``repr(transform)``
            (use a frozen dataclass or another transform whose repr names all its parameters).
        on_error: ``"raise"`` or ``"skip"`` (yield None for unreadable files).
    """

    # What two data sets must share to be concatenated.
    _shared_settings: tuple[str, ...] = ("label_names", "transform", "cache", "on_error")

    def __init__(
        self,
        records: Sequence[ImageRecord],
        label_names: Sequence[str],
        transform: Callable[[Image], Image] | None = None,
        cache: PreprocessCache | None = None,
        on_error: str = "raise",
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable (Image -> Image) or None, got {type(transform).__name__}")
        if cache is not None and not isinstance(cache, PreprocessCache):
            raise TypeError(f"cache must be a PreprocessCache or None, got {type(cache).__name__}")
        self.label_names = tuple(label_names)
        self.records = self._checked(records)
        self.transform = transform
        self.cache = cache
        self.on_error = on_error
        self.skipped = 0
        self._reported: set[str] = set()

    def __len__(self) -> int:
        return len(self.records)

    def subset(self: _Dataset, selection: Sequence[int] | Callable[[ImageRecord], bool]) -> _Dataset:
        """A data set of the same class over some of these records, with the same labels, transform, cache
        and ``on_error``.

        Args:
            selection: record numbers (ints or NumPy integers, in the order wanted; negative numbers count
                from the end), or a predicate ``ImageRecord -> bool`` keeping the records it accepts, in order.

        Raises:
            IndexError: a record number out of range.
            TypeError: a selection that is neither.
        """
        if callable(selection):
            return self._with_records([record for record in self.records if selection(record)])
        if isinstance(selection, (str, bytes)) or not isinstance(selection, Iterable):
            raise TypeError(
                f"selection must be record numbers or a predicate ImageRecord -> bool, got {type(selection).__name__}"
            )
        records = []
        for number in selection:
            try:
                if isinstance(number, bool):
                    raise TypeError
                position = operator.index(number)
            except TypeError:
                raise TypeError(f"selection must hold integer record numbers, got {number!r}") from None
            if not -len(self.records) <= position < len(self.records):
                raise IndexError(f"selection holds record number {position}, the data set has {len(self.records)}")
            records.append(self.records[position])
        return self._with_records(records)

    def concat(self: _Dataset, *others: _Dataset) -> _Dataset:
        """A data set of the same class holding these records, then those of each of ``others``.

        Raises:
            TypeError: another data set of another class.
            ValueError: another data set with other label names, transform, cache or ``on_error`` (or, for
                manifests, another id, split or group column).
        """
        for number, other in enumerate(others):
            if type(other) is not type(self):
                raise TypeError(
                    f"others[{number}] must be a {type(self).__name__} like the data set it joins, "
                    f"got {type(other).__name__}"
                )
            for setting in self._shared_settings:
                mine, theirs = getattr(self, setting), getattr(other, setting)
                if mine != theirs:
                    raise ValueError(
                        f"others[{number}] has {setting} {theirs!r}, the data set it joins {mine!r}: "
                        "only data sets of the same settings concatenate"
                    )
        return self._with_records([record for dataset in (self, *others) for record in dataset.records])

    def map_records(self: _Dataset, function: Callable[[ImageRecord], ImageRecord]) -> _Dataset:
        """A data set of the same class whose records are ``function(record)`` of these, e.g.
        ``dataset.map_records(lambda record: dataclasses.replace(record, group=""))``.

        Raises:
            ValueError: a new record with another number of labels.
        """
        return self._with_records([function(record) for record in self.records])

    def _checked(self, records: Iterable[ImageRecord]) -> list[ImageRecord]:
        records = list(records)
        for record in records:
            if len(record.labels) != len(self.label_names):
                raise ValueError(
                    f"record {record.id!r} has {len(record.labels)} labels, expected {len(self.label_names)}"
                )
        return records

    def _with_records(self: _Dataset, records: Iterable[ImageRecord]) -> _Dataset:
        # A copy keeps every setting of the subclass; only the records and the skip count are its own.
        dataset = copy.copy(self)
        dataset.records = self._checked(records)
        dataset.skipped = 0
        dataset._reported = set()
        return dataset

    def __getitem__(self, index: int) -> Sample | None:
        record = self.records[index]
        try:
            image = self._preprocessed(record)
        except ImageReadError as error:
            if self.on_error == "raise":
                raise
            self.skipped += 1
            if error.path not in self._reported:
                self._reported.add(error.path)
                logger.warning("skipping unreadable image %s: %s", error.path, error.reason)
            return None
        labels = torch.tensor(record.labels, dtype=torch.float32)
        return Sample(image=image, labels=labels, id=record.id, modality=record.modality)

    def load_image(self, record: ImageRecord) -> Image:
        """Read one record's image before the transform: metadata-table fixes applied, modality set."""
        image = read_image(record.path)
        if record.hu_scaling is None and record.spacing is None:
            return Image(image.pixels, image.spacing, record.modality)
        header = inspect_nifti_header(record.path)
        pixels, spacing = image.pixels, image.spacing
        if record.hu_scaling is not None and not header.has_intensity_scaling:
            slope, intercept = record.hu_scaling
            pixels = pixels * slope + intercept
        if record.spacing is not None and not header.has_spacing:
            if len(record.spacing) != image.pixels.dim():
                raise ImageReadError(
                    record.path, f"metadata spacing {record.spacing} does not match the image shape {image.shape}"
                )
            spacing = record.spacing
        return Image(pixels, spacing, record.modality)

    def image_info(self, index: int) -> ImageInfo:
        """Shape and spacing of a record's image before the transform (from metadata, else from the header)."""
        record = self.records[index]
        if record.info is not None:
            return record.info
        info = read_image_info(record.path)
        return ImageInfo(info.shape, record.spacing or info.spacing, record.modality)

    def preprocessed_shape(self, index: int) -> tuple[int, ...]:
        """Shape of a sample's image after the transform, predicted without reading pixels when possible."""
        if self.transform is None:
            return self.image_info(index).shape
        output_shape = getattr(self.transform, "output_shape", None)
        if output_shape is not None:
            info = self.image_info(index)
            return tuple(output_shape(info.shape, info.spacing))
        # A transform that cannot predict its output is run once on the real image.
        sample = self[index]
        if sample is None:
            raise ImageReadError(self.records[index].path, "unreadable, so its preprocessed shape is unknown")
        return sample.image.shape

    def token_counts(self, patch_size: Sequence[int], progress: bool = True) -> list[int]:
        """Patch tokens of every preprocessed sample (before any token dropping), for batching.

        An unreadable header counts as one token with ``on_error="skip"`` (the sample is skipped when loaded).
        """
        counts = []
        for index in tqdm(range(len(self)), desc="token counts", disable=not progress, leave=False):
            try:
                counts.append(count_tokens(self.preprocessed_shape(index), patch_size))
            except ImageReadError:
                if self.on_error == "raise":
                    raise
                counts.append(1)
        return counts

    def _preprocessed(self, record: ImageRecord) -> Image:
        def compute() -> Image:
            image = self.load_image(record)
            return image if self.transform is None else self.transform(image)

        if self.cache is None:
            return compute()
        if not record.path.exists():
            raise ImageReadError(record.path, "no such file or directory")
        parameters = repr((type(self).__name__, record.hu_scaling, record.spacing, record.modality, self.transform))
        return self.cache.get_or_compute(record.path, parameters, compute)


class _RadiographDataset(LabelledImageDataset):
    """Radiographs stored as JPEG/PNG, whose pixel spacing is nominal (see ``NOMINAL_XRAY_SHORT_SIDE_MM``)."""

    def load_image(self, record: ImageRecord) -> Image:
        image = read_image(record.path)
        if image.is_3d:
            raise ImageReadError(record.path, f"expected a 2D radiograph, got a volume of shape {image.shape}")
        return Image(image.pixels, _nominal_spacing(image.shape), record.modality)

    def image_info(self, index: int) -> ImageInfo:
        record = self.records[index]
        shape = record.info.shape if record.info is not None else read_image_info(record.path).shape
        return ImageInfo(shape, _nominal_spacing(shape), record.modality)


def _nominal_spacing(shape: Sequence[int]) -> tuple[float, float]:
    pixel = NOMINAL_XRAY_SHORT_SIDE_MM / min(shape)
    return (pixel, pixel)


def _label_value(text: str | None) -> float:
    """A table cell as a label: blank means not mentioned, which is unknown (NaN)."""
    if text is None or not text.strip():
        return math.nan
    return float(text)


class MimicCxr(_RadiographDataset):
    """MIMIC-CXR-JPG: chest radiographs with the CheXpert labeller's 14 labels per study.

    Expects the MIMIC-CXR-JPG layout under ``root``: ``files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg`` and the
    tables ``mimic-cxr-2.0.0-chexpert.csv.gz``, ``mimic-cxr-2.0.0-split.csv.gz`` and
    ``mimic-cxr-2.0.0-metadata.csv.gz``. Labels are per study, joined on (subject_id, study_id); cells are
    1 / 0 / -1 (uncertain) / blank (NaN). Uncertain labels follow ``uncertainty``.

    Args:
        root: the MIMIC-CXR-JPG directory.
        split: ``"train"``, ``"validate"`` or ``"test"`` (the official split).
        frontal_only: keep PA and AP views only (from the metadata's ViewPosition).
        uncertainty: ``"ones"``, ``"zeros"`` or ``"ignore"`` (NaN) for -1 cells.
        transform, cache, on_error: as in :class:`LabelledImageDataset`.
    """

    label_names = CHEXPERT_LABELS
    SPLITS = ("train", "validate", "test")

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        frontal_only: bool = True,
        uncertainty: str = "ignore",
        transform: Callable[[Image], Image] | None = None,
        cache: PreprocessCache | None = None,
        on_error: str = "raise",
    ) -> None:
        if split not in self.SPLITS:
            raise ValueError(f"split must be one of {self.SPLITS}, got {split!r}")
        policies = _uncertainty_policies(uncertainty, CHEXPERT_LABELS)
        root = Path(root)
        split_path = root / "mimic-cxr-2.0.0-split.csv.gz"
        metadata_path = root / "mimic-cxr-2.0.0-metadata.csv.gz"
        labels_path = root / "mimic-cxr-2.0.0-chexpert.csv.gz"
        split_rows = read_table(split_path, ("dicom_id", "split"))
        in_split = {row["dicom_id"] for row in split_rows if row["split"] == split}
        label_rows = read_table(labels_path, ("subject_id", "study_id", *CHEXPERT_LABELS))
        study_labels = {
            (row["subject_id"], row["study_id"]): tuple(
                _apply_policy(_label_value(row[name]), policy) for name, policy in zip(CHEXPERT_LABELS, policies)
            )
            for row in label_rows
        }
        unknown = (math.nan,) * len(CHEXPERT_LABELS)
        metadata_rows = read_table(
            metadata_path, ("dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns")
        )
        records = []
        for row in metadata_rows:
            if row["dicom_id"] not in in_split:
                continue
            if frontal_only and row["ViewPosition"].strip().upper() not in ("PA", "AP"):
                continue
            subject, study = row["subject_id"], row["study_id"]
            path = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{row['dicom_id']}.jpg"
            shape = (int(float(row["Rows"])), int(float(row["Columns"])))
            records.append(
                ImageRecord(
                    path=path,
                    labels=study_labels.get((subject, study), unknown),
                    id=row["dicom_id"],
                    modality=XRAY_MODALITY,
                    info=ImageInfo(shape, _nominal_spacing(shape), XRAY_MODALITY),
                    split=split,
                    group=path.parent.parent.name,
                )
            )
        super().__init__(records, CHEXPERT_LABELS, transform, cache, on_error)


class CheXpert(_RadiographDataset):
    """CheXpert (or CheXpert-small): chest radiographs listed in ``train.csv`` / ``valid.csv``.

    The table's ``Path`` column starts with the dataset folder's name
    (``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``); it is resolved inside ``root``.
    A record's split is the folder after the data set's (``train`` or ``valid``), its group the patient's.

    Args:
        root: the dataset folder holding the tables and ``train/`` / ``valid/``.
        csv: the table, relative to ``root`` (``"train.csv"`` or ``"valid.csv"``) or absolute.
        uncertainty: ``"ones"`` (U-Ones), ``"zeros"`` (U-Zeros) or ``"ignore"`` (U-Ignore, NaN) for -1
            cells; one policy for all labels or a mapping from label name to policy (others: ``"ignore"``).
        labels: which labels, in order; default all 14 (:data:`CHEXPERT_LABELS`). The five scored in the
            competition are :data:`CHEXPERT_COMPETITION_LABELS`.
        frontal_only: keep frontal views only (the ``Frontal/Lateral`` column).
        transform, cache, on_error: as in :class:`LabelledImageDataset`.
    """

    COMPETITION_LABELS = CHEXPERT_COMPETITION_LABELS
    # The splits, each listed in the table of its name (train.csv, valid.csv).
    SPLITS = ("train", "valid")

    def __init__(
        self,
        root: str | os.PathLike,
        csv: str | os.PathLike = "train.csv",
        uncertainty: str | dict[str, str] = "ignore",
        labels: Sequence[str] = CHEXPERT_LABELS,
        frontal_only: bool = True,
        transform: Callable[[Image], Image] | None = None,
        cache: PreprocessCache | None = None,
        on_error: str = "raise",
    ) -> None:
        labels = tuple(labels)
        unknown_labels = [name for name in labels if name not in CHEXPERT_LABELS]
        if unknown_labels or not labels:
            raise ValueError(f"labels must be a non-empty subset of {CHEXPERT_LABELS}, got unknown {unknown_labels}")
        policies = _uncertainty_policies(uncertainty, labels)
        root = Path(root)
        table_path = root / csv
        rows = read_table(table_path, ("Path", "Frontal/Lateral", *labels))
        records = []
        for row in rows:
            if frontal_only and row["Frontal/Lateral"].strip().lower() != "frontal":
                continue
            relative = Path(row["Path"])
            path = root.joinpath(*relative.parts[1:])
            records.append(
                ImageRecord(
                    path=path,
                    labels=tuple(_apply_policy(_label_value(row[name]), p) for name, p in zip(labels, policies)),
                    id=row["Path"],
                    modality=XRAY_MODALITY,
                    split=relative.parts[1] if len(relative.parts) > 2 else "",
                    group=path.parent.parent.name,
                )
            )
        super().__init__(records, labels, transform, cache, on_error)


def _uncertainty_policies(uncertainty: str | dict[str, str], labels: Sequence[str]) -> tuple[str, ...]:
    if isinstance(uncertainty, str):
        policies = {name: uncertainty for name in labels}
    elif isinstance(uncertainty, dict):
        extra = [name for name in uncertainty if name not in labels]
        if extra:
            raise ValueError(f"uncertainty names labels that are not used: {extra}")
        policies = {name: uncertainty.get(name, "ignore") for name in labels}
    else:
        raise TypeError(
            f"uncertainty must be a policy name or a dict label -> policy, got {type(uncertainty).__name__}"
        )
    for name, policy in policies.items():
        if policy not in _UNCERTAINTY_POLICIES:
            raise ValueError(f"uncertainty policy for {name!r} must be one of {_UNCERTAINTY_POLICIES}, got {policy!r}")
    return tuple(policies[name] for name in labels)


def _apply_policy(value: float, policy: str) -> float:
    if value != -1.0:
        return value
    return {"ones": 1.0, "zeros": 0.0, "ignore": math.nan}[policy]


class CtRate(LabelledImageDataset):
    """CT-RATE: chest CT volumes (``.nii.gz``) with 18 abnormality labels.

    Layout under ``root`` (or ``root/dataset``): ``{split}/{split}_{pid}/{split}_{pid}_{scan}/{name}.nii.gz``
    (``{split}_fixed/`` with ``fixed=True``), ``metadata/{train,validation}_metadata.csv`` and
    ``multi_abnormality_labels/{train,valid}_predicted_labels.csv``. Volumes listed in the metadata but
    absent on disk are left out, so a partial download works.

    Intensities and spacing come from the NIfTI header when it carries them and from the metadata table
    (RescaleSlope, RescaleIntercept, XYSpacing, ZSpacing) when it does not, never both: the original
    volumes have blank headers, the ``_fixed`` copies carry both, and applying the table to those again
    would shift air from -1000 to about -2000 HU.

    Args:
        root: the CT-RATE directory.
        split: ``"train"`` or ``"valid"``.
        fixed: read the header-fixed copies.
        transform, cache, on_error: as in :class:`LabelledImageDataset`.
    """

    label_names = CT_RATE_LABELS
    SPLITS = ("train", "valid")

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        fixed: bool = False,
        transform: Callable[[Image], Image] | None = None,
        cache: PreprocessCache | None = None,
        on_error: str = "raise",
    ) -> None:
        if split not in self.SPLITS:
            raise ValueError(f"split must be one of {self.SPLITS}, got {split!r}")
        root = Path(root)
        if (root / "dataset").is_dir():
            root = root / "dataset"
        metadata_path = root / "metadata" / f"{'validation' if split == 'valid' else 'train'}_metadata.csv"
        labels_path = root / "multi_abnormality_labels" / f"{split}_predicted_labels.csv"
        metadata_rows = read_table(
            metadata_path,
            ("VolumeName", "Rows", "Columns", "NumberofSlices", "XYSpacing", "ZSpacing")
            + ("RescaleSlope", "RescaleIntercept"),
        )
        label_rows = read_table(labels_path, ("VolumeName", *CT_RATE_LABELS))
        labels = {row["VolumeName"]: tuple(_label_value(row[name]) for name in CT_RATE_LABELS) for row in label_rows}
        unknown = (math.nan,) * len(CT_RATE_LABELS)
        volumes = root / (f"{split}_fixed" if fixed else split)
        records = []
        for row in metadata_rows:
            name = row["VolumeName"]
            path = volumes / _ct_rate_relative_path(name)
            if not path.is_file():
                continue
            spacing = (float(row["ZSpacing"]), *_parse_xy_spacing(row["XYSpacing"], metadata_path))
            shape = (int(float(row["NumberofSlices"])), int(float(row["Rows"])), int(float(row["Columns"])))
            records.append(
                ImageRecord(
                    path=path,
                    labels=labels.get(name, unknown),
                    id=name.removesuffix(".nii.gz"),
                    modality=CT_MODALITY,
                    info=ImageInfo(shape, spacing, CT_MODALITY),
                    hu_scaling=(float(row["RescaleSlope"]), float(row["RescaleIntercept"])),
                    spacing=spacing,
                    split=split,
                    group=path.parent.parent.name,
                )
            )
        super().__init__(records, CT_RATE_LABELS, transform, cache, on_error)


_CT_RATE_NAME = re.compile(r"^(?P<split>[a-z]+)_(?P<patient>\d+)_(?P<scan>[a-z]+)_(?P<recon>\d+)$")


def _ct_rate_relative_path(volume_name: str) -> Path:
    stem = volume_name.removesuffix(".nii.gz")
    match = _CT_RATE_NAME.match(stem)
    if match is None:
        raise ValueError(f"VolumeName {volume_name!r} is not split_patient_scan_recon (e.g. valid_53_a_1)")
    patient = f"{match['split']}_{match['patient']}"
    return Path(patient) / f"{patient}_{match['scan']}" / f"{stem}.nii.gz"


def _parse_xy_spacing(text: str, table: Path) -> tuple[float, float]:
    values = [float(value) for value in re.findall(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?", text)]
    if len(values) != 2 or not all(value > 0 for value in values):
        raise ValueError(f"{table}: XYSpacing must hold two positive numbers like '[0.7, 0.7]', got {text!r}")
    return values[0], values[1]


class Manifest(LabelledImageDataset):
    """Any images listed in a CSV table with a path, a modality and label columns.

    Paths are relative to the table's folder unless absolute. Label cells are numbers or blank (NaN). The
    table ``mmv phantom`` writes is one such manifest. The optional columns ``split`` and ``group``
    (:data:`MANIFEST_ROW_COLUMNS`) describe rows: each record's :attr:`~ImageRecord.split` and
    :attr:`~ImageRecord.group` are their cells (blank without the column), and :meth:`in_splits` selects rows
    by split. This class is the one reader of those columns.

    Args:
        csv: the table.
        path_column, modality_column: the columns holding the file (or DICOM directory) and the modality.
        label_columns: the label columns, in order; default every column except the path, modality and id
            columns and the row-describing columns ``split`` and ``group``.
        id_column: a column of sample ids; default ``id`` when the table has one, else the path as written.
        transform, cache, on_error: as in :class:`LabelledImageDataset`.

    Attributes:
        table: the table read (for messages).
        id_column: the column the ids come from (the path column when the table has no id column).
        split_column, group_column: ``"split"`` and ``"group"`` when the table has them, else None.
    """

    _shared_settings = (*LabelledImageDataset._shared_settings, "id_column", "split_column", "group_column")

    def __init__(
        self,
        csv: str | os.PathLike,
        path_column: str = "path",
        modality_column: str = "modality",
        label_columns: Sequence[str] | None = None,
        id_column: str | None = None,
        transform: Callable[[Image], Image] | None = None,
        cache: PreprocessCache | None = None,
        on_error: str = "raise",
    ) -> None:
        table = Path(csv)
        rows = read_table(table)
        header = list(rows[0]) if rows else []
        if id_column is None:
            id_column = "id" if "id" in header else path_column
        self.table = table
        self.id_column = id_column
        self.split_column = MANIFEST_SPLIT_COLUMN if MANIFEST_SPLIT_COLUMN in header else None
        self.group_column = MANIFEST_GROUP_COLUMN if MANIFEST_GROUP_COLUMN in header else None
        fixed_columns = list(dict.fromkeys([path_column, modality_column, id_column]))
        if label_columns is None:
            described = {*fixed_columns, *MANIFEST_ROW_COLUMNS}
            label_columns = [column for column in header if column not in described]
        label_columns = tuple(label_columns)
        missing = [column for column in (*fixed_columns, *label_columns) if rows and column not in header]
        if missing:
            raise TableError(table, f"missing columns {missing}")
        records = []
        for line, row in enumerate(rows, start=2):
            labels = tuple(_manifest_label(table, line, column, row[column]) for column in label_columns)
            modality = row[modality_column].strip()
            if not modality:
                raise ValueError(f"{table}: line {line}: empty {modality_column!r} cell")
            records.append(
                ImageRecord(
                    path=table.parent / row[path_column],
                    labels=labels,
                    id=row[id_column],
                    modality=modality,
                    split=row[self.split_column].strip() if self.split_column else "",
                    group=row[self.group_column].strip() if self.group_column else "",
                )
            )
        super().__init__(records, label_columns, transform, cache, on_error)

    def in_splits(self, splits: str | Sequence[str]) -> Manifest:
        """The rows whose ``split`` cell is one of ``splits`` (compared regardless of case), in table order.

        Raises:
            ValueError: ``splits`` is empty or holds a blank name, the table has no ``split`` column, or one
                of ``splits`` has no row.
        """
        splits = (splits,) if isinstance(splits, str) else tuple(splits)
        if not splits or not all(isinstance(split, str) and split.strip() for split in splits):
            raise ValueError(f"splits must be one or more non-blank split names, got {splits!r}")
        if self.split_column is None:
            raise ValueError(f"{self.table}: selecting splits {list(splits)} needs a {MANIFEST_SPLIT_COLUMN!r} column")
        present = {record.split.lower() for record in self.records}
        missing = [split for split in splits if split.strip().lower() not in present]
        if missing:
            held = sorted({record.split for record in self.records})
            raise ValueError(f"{self.table}: no rows with split {missing}; the split column holds {held}")
        wanted = {split.strip().lower() for split in splits}
        return self.subset(lambda record: record.split.lower() in wanted)


def _manifest_label(table: Path, line: int, column: str, text: str | None) -> float:
    try:
        return _label_value(text)
    except ValueError:
        raise ValueError(
            f"{table}: line {line}, column {column!r}: label cells must be numbers or blank, got {text!r} "
            "(pass label_columns to choose the label columns)"
        ) from None


class MixedDataset(torch.utils.data.Dataset):
    """Several datasets (2D and 3D alike) behind one index, with a sampling weight per source.

    Index ``i`` runs through the sources in order. :meth:`sample_weights` gives each sample its source's
    weight divided by the source's size, for :class:`mmv.data.TokenBudgetBatchSampler` (``weights=``): a
    source's share of an epoch is then its weight's share, whatever its size.

    Args:
        sources: the datasets (each a :class:`LabelledImageDataset`, or any dataset with ``token_counts``).
        weights: one non-negative weight per source; default proportional to source size (uniform samples).
    """

    def __init__(self, sources: Sequence[torch.utils.data.Dataset], weights: Sequence[float] | None = None) -> None:
        self.sources = list(sources)
        if not self.sources:
            raise ValueError("sources must hold at least one dataset")
        sizes = [len(source) for source in self.sources]
        if weights is None:
            weights = [float(size) for size in sizes]
        weights = [float(weight) for weight in weights]
        if len(weights) != len(self.sources):
            raise ValueError(f"weights must have one entry per source ({len(self.sources)}), got {len(weights)}")
        if any(not math.isfinite(weight) or weight < 0 for weight in weights) or sum(weights) <= 0:
            raise ValueError(f"weights must be finite, non-negative and not all zero, got {weights}")
        if any(weight > 0 and size == 0 for weight, size in zip(weights, sizes)):
            raise ValueError(f"a source with positive weight is empty (sizes {sizes}, weights {weights})")
        self.weights = tuple(weights)
        self.offsets = [0]
        for size in sizes:
            self.offsets.append(self.offsets[-1] + size)

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """(source number, index within that source) of a global index."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a MixedDataset of {len(self)} samples")
        index %= len(self)
        source = next(s for s in range(len(self.sources)) if index < self.offsets[s + 1])
        return source, index - self.offsets[source]

    def __getitem__(self, index: int):
        source, local = self.locate(index)
        return self.sources[source][local]

    def sample_weights(self) -> torch.Tensor:
        """float64 ``(len(self),)``: each sample's probability of being drawn, up to a constant."""
        parts = [
            torch.full((len(source),), weight / len(source), dtype=torch.float64)
            for source, weight in zip(self.sources, self.weights)
            if len(source) > 0
        ]
        return torch.cat(parts)

    def token_counts(self, patch_size: Sequence[int], progress: bool = True) -> list[int]:
        """Token counts of every sample, source after source."""
        counts = []
        for source in self.sources:
            counts.extend(source.token_counts(patch_size, progress=progress))
        return counts
