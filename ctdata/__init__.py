"""CT data: DICOM reading, the shared preprocessing path, and labeled/unlabeled datasets.

Names are imported on first use (PEP 562) so that `cthub --help` does not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cthub.lazy import lazy_exports

if TYPE_CHECKING:
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

_EXPORTS: dict[str, str] = {
    "WINDOW_PRESETS": "ctdata.preprocess",
    "ArraySplit": "ctdata.datasets",
    "CTImage": "ctdata.dicom",
    "DicomError": "ctdata.dicom",
    "DicomPolicy": "ctdata.dicom",
    "PreprocessConfig": "ctdata.preprocess",
    "finalize": "ctdata.preprocess",
    "grey_to_unit": "ctdata.preprocess",
    "hu_to_unit": "ctdata.preprocess",
    "intensities_to_unit": "ctdata.preprocess",
    "load_image": "ctdata.io",
    "load_labeled": "ctdata.datasets",
    "load_medmnist": "ctdata.datasets",
    "load_unlabeled": "ctdata.datasets",
    "prepare": "ctdata.preprocess",
    "prepare_batch": "ctdata.preprocess",
    "read_dicom": "ctdata.dicom",
    "resize_unit": "ctdata.preprocess",
    "source_preprocessing": "ctdata.datasets",
    "to_unit": "ctdata.preprocess",
    "unit_to_input": "ctdata.preprocess",
    "unit_to_uint8": "ctdata.preprocess",
}
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


__getattr__ = lazy_exports(__name__, _EXPORTS)
