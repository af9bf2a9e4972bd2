"""Medical image data: ITK readers, preprocessing, datasets, a preprocessing cache and token-budget packing.

Importing this package is light: ITK is imported only when a file is first read.
"""

from mmv.data.io import (
    ImageInfo,
    ImageReadError,
    NiftiHeaderFacts,
    inspect_nifti_header,
    list_dicom_series,
    read_image,
    read_image_info,
)

__all__ = [
    "ImageInfo",
    "ImageReadError",
    "NiftiHeaderFacts",
    "inspect_nifti_header",
    "list_dicom_series",
    "read_image",
    "read_image_info",
]
