"""From model outputs to answers: the thresholded decision, the series aggregation rule, the
out-of-distribution verdict and the class activation map as a PNG overlay.

Series rule (documented in the README and in every series answer): the series score of class c is the mean
of the k highest per-slice probabilities of c (k = min(top_k, number of slices), top_k = 3 by default), so one
confident slice is not enough but a finding on a few adjacent slices is not diluted by the many slices
without it; the series decision applies the slice decision rule (binary operating point, else argmax) to
these scores. The series OOD score is the median of the slice scores; the series is out of distribution
when at least a stated share of its scored slices is (`series_ood`: share `CTHUB_SERIES_OOD_SHARE`, default
0.1, with at least one slice), so a series whose slices are mostly in distribution is not flagged by one or
two outliers, and one with many flagged slices is flagged whatever its median says.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image

from ctdata.heatmap import heat, overlay
from serving.settings import DEFAULT_SERIES_OOD_SHARE

SERIES_RULE = (
    "series score of a class = mean of its k highest slice probabilities (k = min(top_k, slices)); "
    "decision = slice rule applied to the scores; OOD score = median of the slice scores"
)


def decide(p: np.ndarray, labels: list[str], threshold: float | None) -> str:
    """The label for one score vector: the binary operating point when configured, else argmax."""
    if len(labels) == 2 and threshold is not None:
        return labels[1] if p[1] >= threshold else labels[0]
    return labels[int(np.argmax(p))]


def decision(p: np.ndarray, labels: list[str], threshold: float | None) -> dict[str, Any]:
    """{label, rule, threshold, positive_label, score}: how the label was decided."""
    label = decide(p, labels, threshold)
    if len(labels) == 2 and threshold is not None:
        return {
            "label": label,
            "rule": "threshold",
            "threshold": threshold,
            "positive_label": labels[1],
            "score": float(p[1]),
        }
    return {"label": label, "rule": "argmax", "threshold": None, "score": float(np.max(p))}


def ood(score: float | None, threshold: float | None) -> dict[str, Any]:
    """{score, threshold, warning}: warning when the score exceeds the model's threshold; null values
    when the exported model carries no out-of-distribution reference."""
    if score is None or threshold is None:
        return {"score": score, "threshold": threshold, "warning": None, "available": False}
    return {
        "score": float(score),
        "threshold": threshold,
        "warning": bool(score > threshold),
        "available": True,
    }


def ood_note(verdict: dict[str, Any]) -> str | None:
    """The warning text for an answer whose input lies outside the model's training data."""
    if verdict.get("warning"):
        return (
            f"out-of-distribution: score {verdict['score']:.3g} above the model's threshold "
            f"{verdict['threshold']:.3g}; this image does not resemble the model's training data and the "
            "prediction should not be trusted"
        )
    if not verdict.get("available"):
        return "no out-of-distribution reference in this export: re-export the model to get one"
    return None


def series_ood_rule(share: float) -> str:
    """The series OOD rule in words, as every series answer states it."""
    return (
        f"series out of distribution when at least {100 * share:.0f}% of its scored slices (and at least "
        "one) score above the model's threshold"
    )


def series_ood(ood_scores: list[float | None], threshold: float | None, share: float) -> dict[str, Any]:
    """The series verdict {score (median), threshold, warning, available, flagged, scored, share, rule,
    detail}: warning when at least `share` of the scored slices (and at least one) is above `threshold`."""
    known = np.asarray([s for s in ood_scores if s is not None], dtype=np.float64)
    median = float(np.median(known)) if known.size else None
    verdict = ood(median, threshold)
    if not verdict["available"] or not known.size or threshold is None:
        return verdict | {
            "flagged": None,
            "scored": int(known.size),
            "share": share,
            "rule": None,
            "detail": None,
        }
    flagged = int(np.count_nonzero(known > threshold))
    needed = max(1, int(np.ceil(share * known.size - 1e-9)))
    return verdict | {
        "warning": flagged >= needed,
        "flagged": flagged,
        "scored": int(known.size),
        "share": share,
        "rule": series_ood_rule(share),
        "detail": f"{flagged} of {known.size} slices out of distribution",
    }


def series_ood_note(verdict: dict[str, Any]) -> str | None:
    """The warning text of a series verdict (`series_ood`), naming the rule and the count."""
    if verdict.get("warning"):
        return (
            f"out-of-distribution series: {verdict['detail']} (score above the model's threshold "
            f"{verdict['threshold']:.3g}; rule: {verdict['rule']}); the series does not resemble the model's "
            "training data and its prediction should not be trusted"
        )
    return ood_note(verdict)


def aggregate_series(
    probs: np.ndarray,
    labels: list[str],
    threshold: float | None,
    top_k: int,
    ood_scores: list[float | None],
    *,
    ood_threshold: float | None = None,
    ood_share: float = DEFAULT_SERIES_OOD_SHARE,
) -> dict[str, Any]:
    """The series result from per-slice probabilities [N, K] in anatomical order (see the module doc), with
    its `ood` verdict (`series_ood`; not available without `ood_threshold`) and the slices' median score."""
    n = len(probs)
    k = max(1, min(top_k, n))
    scores = np.sort(probs, axis=0)[-k:].mean(axis=0)
    decided = decision(scores, labels, threshold)
    c = labels.index(decided["label"])
    known = [s for s in ood_scores if s is not None]
    out: dict[str, Any] = {
        "label": decided["label"],
        "scores": {lab: float(v) for lab, v in zip(labels, scores, strict=True)},
        "decision": decided,
        "rule": SERIES_RULE,
        "top_k": k,
        "slices": n,
        "peak_slice": int(np.argmax(probs[:, c])),
        "ood_median": float(np.median(known)) if known else None,
    }
    out["ood"] = series_ood(ood_scores, ood_threshold, ood_share)
    return out


def cam_overlay_png(unit: np.ndarray, cam: np.ndarray) -> str:
    """Base64 PNG: the slice in [0, 1] [H, W] with a class activation map [h, w] (ReLU'd, scaled to its
    maximum, upsampled) blended in (`ctdata.heatmap`: jet, as the demo and `finetune.cam` draw it)."""
    rgb = overlay(np.asarray(unit, dtype=np.float32), heat(cam))
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")
