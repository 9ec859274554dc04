"""Export defaults and choices, in a module that imports nothing: `cthub export --help` reads them without
loading torch, ONNX or ONNX Runtime. `export.exporter`, `export.ood` and `export.quantize` import them."""

from __future__ import annotations

DEFAULT_OPSET = 18
EXPORTERS = ("dynamo", "torchscript")
PARITY_TOLERANCE = 1e-4  # fp32 parity: atol on logits (see export.exporter for the full rule)
DEFAULT_PARITY_IMAGES = 256
DEFAULT_OOD_IMAGES = 500
DEFAULT_QUANTILE = 0.99  # OOD threshold: this quantile of the validation images' scores

DEFAULT_CALIBRATION_IMAGES = 256
DEFAULT_EVAL_IMAGES = 2000
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
DEFAULT_MAX_AUC_DROP = 0.005  # int8 refused when its test AUC falls more than this behind fp32
