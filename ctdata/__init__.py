"""CT data: DICOM reading, the shared preprocessing path, and labeled/unlabeled datasets.

Names are imported on first use (PEP 562) so that `cthub --help` does not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cthub.lazy import lazy_package

if TYPE_CHECKING:
    from ctdata.datasets import (
        ArraySplit,
        LabeledFiles,
        labeled_files,
        load_labeled,
        load_medmnist,
        load_unlabeled,
        source_preprocessing,
    )
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

__getattr__, __all__ = lazy_package(__name__, __file__)
