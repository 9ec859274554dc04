"""Export: classifiers to ONNX (dynamic batch; logits, probabilities, class activation maps, embeddings;
config, checksums and an out-of-distribution reference in metadata), verified against torch on the
classifier's own data, int8 static quantization; one inference interface (`Classifier`) with ONNX Runtime
and torch implementations, verified on load.

Names are imported on first use (PEP 562) so that `cthub --help` does not load torch or ONNX Runtime."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cthub.lazy import lazy_exports

if TYPE_CHECKING:
    from export.classifier import Classifier, InferenceOutputs, TorchClassifier, softmax
    from export.defaults import PARITY_TOLERANCE
    from export.exporter import ExportReport, check_parity, export_onnx, matches_source, onnx_is_fresh
    from export.integrity import INT8_NAME, ONNX_FILES, ONNX_NAME
    from export.ood import OodReference
    from export.quantize import Int8Report, Int8Tolerance, QuantSettings, quantize_int8
    from export.session import OnnxClassifier, quiet_onnxruntime_process, read_metadata

_EXPORTS: dict[str, str] = {
    "INT8_NAME": "export.integrity",
    "ONNX_FILES": "export.integrity",
    "ONNX_NAME": "export.integrity",
    "PARITY_TOLERANCE": "export.defaults",
    "Classifier": "export.classifier",
    "ExportReport": "export.exporter",
    "InferenceOutputs": "export.classifier",
    "Int8Report": "export.quantize",
    "Int8Tolerance": "export.quantize",
    "OnnxClassifier": "export.session",
    "OodReference": "export.ood",
    "QuantSettings": "export.quantize",
    "TorchClassifier": "export.classifier",
    "check_parity": "export.exporter",
    "export_onnx": "export.exporter",
    "matches_source": "export.exporter",
    "onnx_is_fresh": "export.exporter",
    "quantize_int8": "export.quantize",
    "quiet_onnxruntime_process": "export.session",
    "read_metadata": "export.session",
    "softmax": "export.classifier",
}
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


__getattr__ = lazy_exports(__name__, _EXPORTS)
