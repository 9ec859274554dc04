"""Calibration of a classifier's probabilities: temperature scaling, expected calibration error, reliability
plots, and the binary operating point with a bootstrap confidence interval.

Temperature scaling (Guo et al., ICML 2017) divides the logits by one scalar T > 0 fitted by minimising the
negative log-likelihood on held-out labeled images: the ranking (AUC) and the argmax stay, only how
confident the probabilities are changes. The calibration record (`calibration_record`) is what a model's
`config.metrics["calibration"]` holds and what the export copies into the ONNX metadata (`cthub.calibration`),
where serving reads the temperature from (`export.classifier`).

Expected calibration error: top-label, `ECE_BINS` equal-width bins of the top probability over (0, 1],
ECE = sum_b |B_b| / n * |accuracy(B_b) - mean confidence(B_b)|.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cthub.errors import DataError

ECE_BINS = 15
METHOD = "temperature scaling"
MIN_FIT_IMAGES = 10  # fewer held-out images than this: no temperature is fitted (T = 1 is kept)
T_BOUNDS = (0.01, 1000.0)


def scaled_probs(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / T) row-wise, float64."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def config_temperature(metrics: dict[str, Any]) -> float:
    """The T a model's config records (`metrics["calibration"]["temperature"]`), 1.0 without a valid one:
    the same rule as the export's `served_calibration`, so torch-side checks read what is served."""
    rec = metrics.get("calibration")
    t = rec.get("temperature") if isinstance(rec, dict) else None
    return float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0 else 1.0


def mean_nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / T)."""
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64)) / float(temperature)
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    return float(torch.nn.functional.cross_entropy(z, y))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T minimising the mean NLL of softmax(logits / T) (L-BFGS on log T, float64), clipped to
    `T_BOUNDS`. DataError when there are no images or the labels do not fit the logits."""
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if z.ndim != 2 or len(z) == 0 or len(z) != len(y):
        raise DataError(
            f"temperature fitting needs logits [N, K] and N labels, got {tuple(z.shape)} / {len(y)}"
        )
    if int(y.min()) < 0 or int(y.max()) >= z.shape[1]:
        raise DataError(f"labels outside 0..{z.shape[1] - 1} for a {z.shape[1]}-class model")
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [log_t], lr=0.5, max_iter=200, tolerance_grad=1e-10, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    return float(np.clip(t, *T_BOUNDS)) if math.isfinite(t) else 1.0


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict[str, Any]:
    """Top-label reliability of probabilities [N, K]: per equal-width bin of the top probability
    (lo, hi], its image count, mean confidence and accuracy (empty bins: n 0, nulls); ECE; n."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    if len(p) == 0:
        raise DataError("no images to measure calibration on")
    conf, correct = p.max(axis=1), (p.argmax(axis=1) == y)
    which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        inside = which == b
        n = int(inside.sum())
        row: dict[str, Any] = {"lo": round(b / bins, 6), "hi": round((b + 1) / bins, 6), "n": n}
        if n:
            c, a = float(conf[inside].mean()), float(correct[inside].mean())
            ece += n / len(p) * abs(a - c)
            row |= {"confidence": round(c, 6), "accuracy": round(a, 6)}
        else:
            row |= {"confidence": None, "accuracy": None}
        rows.append(row)
    return {"ece": round(ece, 6), "n": len(p), "bins": rows, "accuracy": round(float(correct.mean()), 6)}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-label ECE with `bins` equal-width bins (see the module docstring)."""
    return float(reliability(probs, labels, bins)["ece"])


# --- the binary operating point -----------------------------------------------------------------------------


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold on p(positive) and what it gives on the set it was chosen on."""

    threshold: float
    sensitivity: float
    specificity: float
    rule: str  # "sensitivity>=0.9" | "youden"

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "sensitivity": round(self.sensitivity, 6),
            "specificity": round(self.specificity, 6),
            "rule": self.rule,
        }


def operating_point(
    labels: np.ndarray, scores: np.ndarray, sensitivity: float | None = None
) -> OperatingPoint:
    """The threshold t (positive when score >= t) with the highest specificity among those reaching
    `sensitivity`, or, without one, the one maximising Youden's J = sensitivity + specificity - 1. DataError
    unless both classes are present."""
    from sklearn.metrics import roc_curve

    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    if y.min() == y.max():
        raise DataError("an operating point needs positive and negative images; the set holds one class")
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    finite = np.isfinite(thr)  # roc_curve's first threshold is +inf (nothing positive)
    fpr, tpr, thr = fpr[finite], tpr[finite], thr[finite]
    if sensitivity is not None:
        if not 0.0 < sensitivity <= 1.0:
            raise DataError(f"--sensitivity must lie in (0, 1], got {sensitivity}")
        i = int(np.flatnonzero(tpr >= sensitivity - 1e-12)[0])  # the first (highest) threshold reaching it
        rule = f"sensitivity>={sensitivity:g}"
    else:
        i = int(np.argmax(tpr - fpr))
        rule = "youden"
    return OperatingPoint(float(thr[i]), float(tpr[i]), float(1.0 - fpr[i]), rule)


def bootstrap_operating_point(
    labels: np.ndarray,
    scores: np.ndarray,
    sensitivity: float | None = None,
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """95% percentile intervals of the threshold, and of the sensitivity and specificity it gives, over
    `resamples` stratified bootstrap resamples of the set (the rule re-applied on each; the calibrated scores
    fixed)."""
    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    got = []
    for _ in range(resamples):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        op = operating_point(y[idx], s[idx], sensitivity)
        got.append((op.threshold, op.sensitivity, op.specificity))
    arr = np.asarray(got)

    def ci(col: int) -> list[float]:
        return [round(float(v), 6) for v in np.percentile(arr[:, col], [2.5, 97.5])]

    return {
        "resamples": resamples,
        "level": 0.95,
        "threshold": ci(0),
        "sensitivity": ci(1),
        "specificity": ci(2),
    }


# --- records ------------------------------------------------------------------------------------------------


def now_utc() -> str:
    """The time now, UTC, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def calibration_id(record: dict[str, Any]) -> str:
    """12 hex digits naming a calibration by what it changes (method, T, threshold, where it was fitted)."""
    core = {
        k: record.get(k) for k in ("method", "temperature", "version", "fitted_on", "operating_point", "site")
    }
    return hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()[:12]


def binary_threshold_after(threshold: float, temperature: float) -> float:
    """The threshold on softmax(z / T)[1] that decides exactly as `threshold` on softmax(z)[1]:
    sigmoid(logit(threshold) / T) (both are monotone in z1 - z0)."""
    t = min(max(float(threshold), 1e-12), 1.0 - 1e-12)
    return float(1.0 / (1.0 + math.exp(-math.log(t / (1.0 - t)) / temperature)))


def training_calibration(
    val_logits: np.ndarray,
    val_labels: np.ndarray,
    test_logits: np.ndarray | None,
    test_labels: np.ndarray | None,
    *,
    threshold: float | None = None,
) -> tuple[dict[str, Any], float | None]:
    """(record, threshold on the calibrated probabilities) for a model just fine-tuned: T fitted on the
    validation logits, ECE and reliability before/after on test (else on validation, said so). With fewer
    than `MIN_FIT_IMAGES` validation images T stays 1 and the record says "uncalibrated"."""
    n_val = len(val_labels)
    fitted = n_val >= MIN_FIT_IMAGES
    t = fit_temperature(val_logits, val_labels) if fitted else 1.0
    on_test = test_logits is not None and test_labels is not None and len(test_labels) > 0
    eval_logits, eval_labels = (test_logits, test_labels) if on_test else (val_logits, val_labels)
    assert eval_logits is not None and eval_labels is not None
    before = reliability(scaled_probs(eval_logits, 1.0), eval_labels)
    after = reliability(scaled_probs(eval_logits, t), eval_labels)
    record: dict[str, Any] = {
        "method": METHOD if fitted else "none",
        "status": "calibrated" if fitted else f"uncalibrated (fewer than {MIN_FIT_IMAGES} validation images)",
        "temperature": round(t, 6),
        "version": 1,
        "fitted_on": {"data": "training data", "split": "val", "n": n_val, "when": now_utc()},
        "evaluated_on": {"split": "test" if on_test else "val", "n": len(eval_labels)},
        "bins": ECE_BINS,
        "ece_before": before["ece"],
        "ece_after": after["ece"],
        "nll_before": round(mean_nll(eval_logits, eval_labels, 1.0), 6),
        "nll_after": round(mean_nll(eval_logits, eval_labels, t), 6),
        "val_nll_before": round(mean_nll(val_logits, val_labels, 1.0), 6),
        "val_nll_after": round(mean_nll(val_logits, val_labels, t), 6),
        "reliability": {"before": before["bins"], "after": after["bins"]},
        "operating_point": None,
    }
    new_threshold = None
    if threshold is not None:
        new_threshold = binary_threshold_after(threshold, t)
        p = scaled_probs(eval_logits, t)[:, 1] >= new_threshold
        y = np.asarray(eval_labels) == 1
        record["operating_point"] = {
            "threshold": new_threshold,  # full precision: the config's threshold decides with it
            "threshold_uncalibrated": float(threshold),
            "rule": "best validation F1 (chosen before calibration; the same decisions)",
            "sensitivity": round(float(p[y].mean()), 6) if y.any() else None,
            "specificity": round(float((~p[~y]).mean()), 6) if (~y).any() else None,
            "measured_on": record["evaluated_on"],
        }
    record["id"] = calibration_id(record)
    return record, new_threshold


def reliability_plot(record: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """A PNG of the reliability diagrams before and after calibration (per confidence bin: accuracy as a bar,
    mean confidence as an outline, the image count inside; the diagonal is perfect calibration), from a
    calibration record."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rel = record.get("reliability") or {}
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True)
    for ax, key in zip(axes, ("before", "after"), strict=True):
        rows = rel.get(key) or []
        width = 1.0 / max(len(rows), 1)
        for r in rows:
            if r.get("n"):
                ax.bar(r["lo"], r["accuracy"], width=width, align="edge", color="#4878a8", edgecolor="white")
                ax.bar(
                    r["lo"],
                    r["confidence"],
                    width=width,
                    align="edge",
                    fill=False,
                    edgecolor="#c03030",
                    lw=1.2,
                )
                ax.text(
                    r["lo"] + width / 2, 0.02, str(r["n"]), ha="center", fontsize=6, rotation=90, color="w"
                )
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        t = record.get("temperature_before", 1.0) if key == "before" else record.get("temperature", 1.0)
        ece = record.get("ece_before" if key == "before" else "ece_after")
        ax.set_title(f"{key} (T = {t:.3g}): ECE {ece:.3f}")
        ax.set_xlabel("top-class probability")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy (blue bars); mean confidence (red outlines)")
    ev = record.get("evaluated_on") or {}
    fig.suptitle(
        (title + ": " if title else "")
        + f"{record.get('bins', ECE_BINS)} bins, {ev.get('n')} {ev.get('split', '')} images".strip()
    )
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
