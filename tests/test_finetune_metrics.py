"""Metrics equal scikit-learn on fixed arrays; thresholds; mean ± std formatting."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from hub.metrics import choose_threshold, classification_metrics, format_pm, mean_std

Y_MULTI = np.array([0, 1, 2, 2, 1, 0, 2, 1, 0, 2])
P_MULTI = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.1, 0.6, 0.3],
        [0.2, 0.2, 0.6],
        [0.3, 0.4, 0.3],
        [0.5, 0.4, 0.1],
        [0.4, 0.4, 0.2],
        [0.1, 0.1, 0.8],
        [0.2, 0.5, 0.3],
        [0.6, 0.1, 0.3],
        [0.2, 0.3, 0.5],
    ]
)
Y_BIN = np.array([0, 0, 1, 1, 0, 1, 1, 0, 1, 0, 1, 1])
S_BIN = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9, 0.55, 0.6, 0.45, 0.05, 0.7, 0.3])


def test_multiclass_metrics_equal_sklearn() -> None:
    m = classification_metrics(Y_MULTI, P_MULTI)
    pred = P_MULTI.argmax(1)
    assert m["accuracy"] == pytest.approx(accuracy_score(Y_MULTI, pred))
    assert m["f1"] == pytest.approx(f1_score(Y_MULTI, pred, average="macro"))
    assert m["auc"] == pytest.approx(roc_auc_score(Y_MULTI, P_MULTI, multi_class="ovr", average="macro"))
    assert np.trace(np.array(m["confusion_matrix"])) == (pred == Y_MULTI).sum()


def test_binary_metrics_use_positive_score_and_threshold() -> None:
    probs = np.stack([1 - S_BIN, S_BIN], 1)
    m = classification_metrics(Y_BIN, probs, threshold=0.5)
    pred = (S_BIN >= 0.5).astype(int)
    assert m["auc"] == pytest.approx(roc_auc_score(Y_BIN, S_BIN))
    assert m["f1"] == pytest.approx(f1_score(Y_BIN, pred))
    assert m["accuracy"] == pytest.approx(accuracy_score(Y_BIN, pred))
    m2 = classification_metrics(Y_BIN, probs, threshold=0.3)
    assert m2["f1"] == pytest.approx(f1_score(Y_BIN, (S_BIN >= 0.3).astype(int)))


def test_threshold_maximizes_validation_f1() -> None:
    y, scores = Y_BIN, S_BIN
    t = choose_threshold(y, scores)
    best = max(f1_score(y, (scores >= c).astype(int)) for c in np.unique(scores))
    assert f1_score(y, (scores >= t).astype(int)) == pytest.approx(best)


def test_mean_std_and_paper_format() -> None:
    mu, sd = mean_std([0.97, 0.972, 0.971, float("nan")])
    assert mu == pytest.approx(0.971)
    assert sd == pytest.approx(np.std([0.97, 0.972, 0.971], ddof=1))
    assert format_pm(0.9712, 0.0012) == "0.971 ± .001"
    assert mean_std([0.5]) == (0.5, 0.0)


def test_auc_with_absent_class_is_macro_over_present() -> None:
    y = np.array([0, 1, 0, 1])
    p = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.3, 0.3, 0.4]])
    m = classification_metrics(y, p)
    expect = np.mean([roc_auc_score(y == 0, p[:, 0]), roc_auc_score(y == 1, p[:, 1])])
    assert m["auc"] == pytest.approx(expect)
