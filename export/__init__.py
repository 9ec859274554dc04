"""Export: classifiers to ONNX (dynamic batch; logits, probabilities, class activation maps, embeddings;
config, checksums and an out-of-distribution reference in metadata), verified against torch on the
classifier's own data, int8 static quantization; one inference interface (`Classifier`) with ONNX Runtime
and torch implementations, verified on load.

Names are imported on first use (PEP 562) so that `cthub --help` does not load torch or ONNX Runtime."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cthub.lazy import lazy_package

if TYPE_CHECKING:
    from export.classifier import Classifier, InferenceOutputs, TorchClassifier, softmax
    from export.defaults import PARITY_TOLERANCE
    from export.exporter import ExportReport, check_parity, export_onnx, matches_source, onnx_is_fresh
    from export.integrity import INT8_NAME, ONNX_FILES, ONNX_NAME
    from export.metadata import calibration_of, read_metadata, served_calibration
    from export.ood import LayeredOodReference, OodReference, reference_from_metadata
    from export.ood_shifts import Evaluation, OodTable, compare_scores, evaluate_shifts
    from export.quantize import Int8Report, Int8Tolerance, QuantSettings, quantize_int8
    from export.session import OnnxClassifier, quiet_onnxruntime_process

__getattr__, __all__ = lazy_package(__name__, __file__)
