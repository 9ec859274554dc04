"""Export: classifiers to ONNX (dynamic batch, config in metadata), verified against torch; one inference
interface (`Classifier`) with ONNX Runtime and torch implementations."""

from export.classifier import Classifier, TorchClassifier, softmax
from export.exporter import (
    ONNX_NAME,
    PARITY_TOLERANCE,
    ExportReport,
    check_parity,
    export_onnx,
    matches_source,
    onnx_is_fresh,
)
from export.session import OnnxClassifier, quiet_onnxruntime_process, read_metadata

__all__ = [
    "ONNX_NAME",
    "PARITY_TOLERANCE",
    "Classifier",
    "ExportReport",
    "OnnxClassifier",
    "TorchClassifier",
    "check_parity",
    "export_onnx",
    "matches_source",
    "onnx_is_fresh",
    "quiet_onnxruntime_process",
    "read_metadata",
    "softmax",
]
