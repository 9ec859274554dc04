"""Export: classifiers to ONNX (dynamic batch, config in metadata), verified against torch; ORT inference."""

from export.exporter import (
    ONNX_NAME,
    PARITY_TOLERANCE,
    ExportReport,
    check_parity,
    export_onnx,
    onnx_is_fresh,
)
from export.session import OnnxClassifier, read_metadata

__all__ = [
    "ONNX_NAME",
    "PARITY_TOLERANCE",
    "ExportReport",
    "OnnxClassifier",
    "check_parity",
    "export_onnx",
    "onnx_is_fresh",
    "read_metadata",
]
