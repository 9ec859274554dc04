"""Export: classifiers to ONNX (dynamic batch; logits, probabilities, class activation maps, embeddings;
config, checksums and an out-of-distribution reference in metadata), verified against torch on the
classifier's own data, int8 static quantization; one inference interface (`Classifier`) with ONNX Runtime
and torch implementations, verified on load."""

from export.classifier import Classifier, InferenceOutputs, TorchClassifier, softmax
from export.exporter import (
    PARITY_TOLERANCE,
    ExportReport,
    check_parity,
    export_onnx,
    matches_source,
    onnx_is_fresh,
)
from export.integrity import INT8_NAME, ONNX_FILES, ONNX_NAME
from export.ood import OodReference
from export.quantize import Int8Report, Int8Tolerance, QuantSettings, quantize_int8
from export.session import OnnxClassifier, quiet_onnxruntime_process, read_metadata

__all__ = [
    "INT8_NAME",
    "ONNX_FILES",
    "ONNX_NAME",
    "PARITY_TOLERANCE",
    "Classifier",
    "ExportReport",
    "InferenceOutputs",
    "Int8Report",
    "Int8Tolerance",
    "OnnxClassifier",
    "OodReference",
    "QuantSettings",
    "TorchClassifier",
    "check_parity",
    "export_onnx",
    "matches_source",
    "onnx_is_fresh",
    "quantize_int8",
    "quiet_onnxruntime_process",
    "read_metadata",
    "softmax",
]
