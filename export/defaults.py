"""Export defaults and choices, in a module that imports nothing: `cthub export --help` reads them without
loading torch, ONNX or ONNX Runtime. `export.exporter`, `export.ood` and `export.quantize` import them."""

from __future__ import annotations

DEFAULT_OPSET = 18
# The exported graph's outputs, as a version: a file of another version is stale (`export.integrity`).
# 3: a `stage_pool` output (pooled layers 1-3) for the multi-layer OOD score (export.ood); 2: `cam` is
# Grad-CAM at the stride-16 stage (S/16); 1 was the last stage's CAM (S/32).
GRAPH_VERSION = 3
EXPORTERS = ("dynamo", "torchscript")
PARITY_TOLERANCE = 1e-4  # fp32 parity: atol on logits (see export.exporter for the full rule)
DEFAULT_PARITY_IMAGES = 256
DEFAULT_OOD_IMAGES = 500
DEFAULT_QUANTILE = 0.99  # OOD threshold: this quantile of held-out in-distribution scores
DEFAULT_OOD_FOLDS = 5  # ... validation images pooled with training images cross-fitted in this many folds

DEFAULT_CALIBRATION_IMAGES = 256
DEFAULT_EVAL_IMAGES = 2000
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
DEFAULT_MAX_AUC_DROP = 0.005  # int8 refused when its test AUC falls more than this behind fp32
