"""Accuracy, AUC and F1 as the paper reports them (scikit-learn), thresholds, and mean ± std over runs.

In the hub, not in fine-tuning: these are the numbers a model card reports (`hub.io.record_metrics`), and
every stage that measures a classifier (fine-tuning, the int8 check in `export.quantize`, robustness tables)
must compute them the same way; finetune and export are peers, so the shared definition sits below both."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score, roc_curve

from cthub.errors import ShapeError


def _check(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).reshape(-1).astype(np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or len(p) != len(y):
        raise ShapeError(f"probs must be [N, K] with N = len(y_true) = {len(y)}, got {p.shape}")
    return y, p


def predict_labels(probs: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Binary with a threshold: positive when P(class 1) >= threshold; otherwise argmax."""
    p = np.asarray(probs)
    if p.shape[1] == 2 and threshold is not None:
        return (p[:, 1] >= threshold).astype(np.int64)
    return p.argmax(axis=1).astype(np.int64)


def auc_score(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Binary: ROC AUC of the positive-class score; multi-class: one-vs-rest macro AUC. NaN if undefined."""
    y, p = _check(y_true, probs)
    k = p.shape[1]
    try:
        if k == 2:
            return float(roc_auc_score(y, p[:, 1]))
        present = np.unique(y)
        if len(present) < 2:
            return float("nan")
        if len(present) < k:  # macro over the classes present (sklearn needs every column otherwise)
            return float(np.mean([roc_auc_score(y == c, p[:, c]) for c in present]))
        pn = p / p.sum(axis=1, keepdims=True)
        return float(roc_auc_score(y, pn, multi_class="ovr", average="macro", labels=np.arange(k)))
    except ValueError:
        return float("nan")


def classification_metrics(
    y_true: np.ndarray, probs: np.ndarray, threshold: float | None = None
) -> dict[str, Any]:
    """accuracy, auc, f1 (binary: positive class; multi-class: macro), and the confusion matrix."""
    y, p = _check(y_true, probs)
    k = p.shape[1]
    pred = predict_labels(p, threshold)
    average = "binary" if k == 2 else "macro"
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "auc": auc_score(y, p),
        "f1": float(
            f1_score(y, pred, average=average, labels=None if k == 2 else np.arange(k), zero_division=0)
        ),
        "n": len(y),
        "confusion_matrix": confusion_matrix(y, pred, labels=np.arange(k)).tolist(),
    }


def log_loss(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (probabilities clipped at 1e-12)."""
    y, p = _check(y_true, probs)
    return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1.0)).mean())


def selection_score(metrics: dict[str, Any], metric: str) -> float:
    """`metrics[metric]` oriented so that higher is better (the loss is negated); NaN stays NaN."""
    value = float(metrics[metric])
    return -value if metric == "loss" else value


def choose_threshold(y_true: np.ndarray, pos_scores: np.ndarray) -> float:
    """Operating threshold on validation: the ROC point that maximizes F1 (ties: Youden's J)."""
    y = np.asarray(y_true).reshape(-1).astype(np.int64)
    s = np.asarray(pos_scores, dtype=np.float64).reshape(-1)
    if len(np.unique(y)) < 2:
        return 0.5
    _, _, thr = roc_curve(y, s)
    cand = np.unique(np.clip(thr, 0.0, 1.0))
    best, best_key = 0.5, (-1.0, -1.0)
    for t in cand:
        pred = (s >= t).astype(np.int64)
        f1 = f1_score(y, pred, zero_division=0)
        tpr = pred[y == 1].mean()
        fpr = pred[y == 0].mean()
        key = (round(float(f1), 12), float(tpr - fpr))
        if key > best_key:
            best, best_key = float(t), key
    return best


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1; 0 for one value) ignoring NaN."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def format_pm(mean: float, std: float) -> str:
    """Paper style: 0.971 ± .001."""
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.3f} ± {std:.3f}".replace("± 0.", "± .")
