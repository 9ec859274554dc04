"""CT data: DICOM reading, the shared preprocessing path, and labeled/unlabeled datasets."""

from ctdata.dicom import CTImage, read_dicom
from ctdata.io import load_image
from ctdata.preprocess import (
    WINDOW_PRESETS,
    PreprocessConfig,
    finalize,
    hu_to_unit,
    prepare,
    prepare_batch,
)

__all__ = [
    "CTImage",
    "PreprocessConfig",
    "WINDOW_PRESETS",
    "finalize",
    "hu_to_unit",
    "load_image",
    "prepare",
    "prepare_batch",
    "read_dicom",
]
