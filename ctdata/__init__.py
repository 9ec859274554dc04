"""CT data: DICOM reading, the shared preprocessing path, and labeled/unlabeled datasets."""

from ctdata.datasets import ArraySplit, load_labeled, load_medmnist, load_unlabeled, source_preprocessing
from ctdata.dicom import CTImage, DicomError, DicomPolicy, read_dicom
from ctdata.io import load_image
from ctdata.preprocess import (
    WINDOW_PRESETS,
    PreprocessConfig,
    finalize,
    grey_to_unit,
    hu_to_unit,
    intensities_to_unit,
    prepare,
    prepare_batch,
    resize_unit,
    to_unit,
    unit_to_input,
    unit_to_uint8,
)

__all__ = [
    "WINDOW_PRESETS",
    "ArraySplit",
    "CTImage",
    "DicomError",
    "DicomPolicy",
    "PreprocessConfig",
    "finalize",
    "grey_to_unit",
    "hu_to_unit",
    "intensities_to_unit",
    "load_image",
    "load_labeled",
    "load_medmnist",
    "load_unlabeled",
    "prepare",
    "prepare_batch",
    "read_dicom",
    "resize_unit",
    "source_preprocessing",
    "to_unit",
    "unit_to_input",
    "unit_to_uint8",
]
