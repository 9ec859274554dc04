"""Fine-tuning and evaluation: the seed paper's recipe and protocols, label-reduction studies, CAMs.

Stable public API (other stages call it):
    fit(encoder, train, val, test, cfg) -> FitResult      full recipe, selection on validation
    linear_probe(encoder, train, val, test) -> dict       frozen features + logistic regression
    evaluate_encoder(encoder, train, val, test) -> dict   kNN + probe + collapse, BN stored and recalibrated
    select_splits(splits, ...) -> TrainValTest            the one train/val/test rule (CLI, k-fold, study)
    recalibrate(model_dir, data, site=...) -> (dir, record)   a site's temperature (+ binary threshold)
    fit_temperature, expected_calibration_error, training_calibration   temperature scaling and its measure
    FinetuneConfig, FitResult, classification_metrics, save_classifier

Names are imported on first use (PEP 562) so that `cthub --help` does not load scikit-learn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cthub.lazy import lazy_package

if TYPE_CHECKING:
    from ctdata.labeled import select_splits
    from finetune.artifact import save_classifier
    from finetune.calibration import expected_calibration_error, fit_temperature, training_calibration
    from finetune.config import FinetuneConfig
    from finetune.evaluate import evaluate_encoder, knn_eval
    from finetune.probe import extract_features, linear_probe
    from finetune.recalibrate import recalibrate
    from finetune.train import FitResult, fit, predict_logits, predict_proba
    from hub.metrics import choose_threshold, classification_metrics

__getattr__, __all__ = lazy_package(__name__, __file__)
