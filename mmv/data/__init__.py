"""Medical image data: ITK readers, preprocessing, datasets (opened by kind, path and splits), a preprocessing
cache and token-budget packing.

Importing this package is light: ITK is imported only when a file is first read.
"""

from mmv.data.cache import PreprocessCache
from mmv.data.collate import LabelledPackedBatch, PackedCollate
from mmv.data.dataset_spec import DATASET_KINDS, DatasetSpec, open_dataset
from mmv.data.datasets import (
    CHEXPERT_COMPETITION_LABELS,
    CHEXPERT_LABELS,
    CT_MODALITY,
    CT_RATE_LABELS,
    XRAY_MODALITY,
    CheXpert,
    CtRate,
    ImageRecord,
    LabelledImageDataset,
    Manifest,
    MimicCxr,
    MixedDataset,
    Sample,
)
from mmv.data.io import (
    ImageInfo,
    ImageReadError,
    NiftiHeaderFacts,
    inspect_nifti_header,
    list_dicom_series,
    read_image,
    read_image_info,
)
from mmv.data.preprocess import (
    CtPreprocess,
    ModalityPreprocess,
    XrayPreprocess,
    crop_or_pad,
    ct_window,
    normalize_xray,
    resample_to_spacing,
    resize_xray,
)
from mmv.data.sampler import TokenBudgetBatchSampler
from mmv.data.tables import TableError, read_table

__all__ = [
    "CHEXPERT_COMPETITION_LABELS",
    "CHEXPERT_LABELS",
    "CT_MODALITY",
    "CT_RATE_LABELS",
    "DATASET_KINDS",
    "XRAY_MODALITY",
    "CheXpert",
    "CtPreprocess",
    "CtRate",
    "DatasetSpec",
    "ImageInfo",
    "ImageReadError",
    "ImageRecord",
    "LabelledImageDataset",
    "LabelledPackedBatch",
    "Manifest",
    "MimicCxr",
    "MixedDataset",
    "ModalityPreprocess",
    "NiftiHeaderFacts",
    "PackedCollate",
    "PreprocessCache",
    "Sample",
    "TableError",
    "TokenBudgetBatchSampler",
    "read_table",
    "XrayPreprocess",
    "crop_or_pad",
    "ct_window",
    "inspect_nifti_header",
    "list_dicom_series",
    "normalize_xray",
    "open_dataset",
    "read_image",
    "read_image_info",
    "resample_to_spacing",
    "resize_xray",
]
