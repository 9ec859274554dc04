"""Protocols that train, measure and save: a given split, or stratified (group-aware) k-fold CV."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ctdata.datasets import ArraySplit
from ctdata.labeled import select_splits
from ctdata.preprocess import PreprocessConfig
from finetune.artifact import default_note, save_classifier
from finetune.config import FinetuneConfig
from finetune.train import FitResult, fit
from hub.metrics import format_pm, mean_std, selection_score

log = logging.getLogger(__name__)
REPORTED = ("accuracy", "auc", "f1")


def _note(result: FitResult, note: str | None, n_train: int) -> str:
    return note or default_note(result.encoder, len(result.history), n_train, result.config.image_size)


def _metrics(m: dict[str, Any] | None, keys: tuple[str, ...] = REPORTED) -> dict[str, Any]:
    assert m is not None, "protocols always measure a test split"
    return {k: m[k] for k in keys}


def run_split(
    encoder: str | Path | nn.Module,
    train: ArraySplit,
    val: ArraySplit,
    test: ArraySplit,
    cfg: FinetuneConfig,
    *,
    out: str | Path | None = None,
    command: str = "",
    data: str = "",
    note: str | None = None,
    name: str | None = None,
    extra: dict[str, Any] | None = None,
    preprocessing: PreprocessConfig | None = None,
) -> dict[str, Any]:
    """Fit on train, select on val, measure test; save the classifier to `out` when given."""
    res = fit(encoder, train, val, test, cfg, preprocessing=preprocessing)
    summary = {
        "protocol": "split",
        "encoder": res.encoder,
        "best_epoch": res.best_epoch,
        "epochs_run": len(res.history),
        "converged": res.converged,
        "test": _metrics(res.test_metrics, (*REPORTED, "n")),
        "val": _metrics(res.val_metrics),
        "threshold": res.threshold,
        "wall_time_s": round(res.wall_time_s, 1),
        "train_images_per_s": round(res.train_images_per_s, 1),
    }
    if out is not None:
        kw: dict[str, Any] = {
            "command": command,
            "data": data,
            "note": _note(res, note, len(train)),
            "extra_provenance": {k: v for k, v in (extra or {}).items() if v is not None},
        }
        if name:
            kw["name"] = name
        save_classifier(res, out, **kw)
        summary["saved"] = str(out)
    return summary


def run_kfold(
    encoder: str | Path | nn.Module,
    data: ArraySplit,
    cfg: FinetuneConfig,
    *,
    k: int = 5,
    val_fraction: float = 0.1,
    size: float | None = None,
    out: str | Path | None = None,
    command: str = "",
    data_desc: str = "",
    note: str | None = None,
    name: str | None = None,
    preprocessing: PreprocessConfig | None = None,
) -> dict[str, Any]:
    """The brain protocol: k stratified folds (group-disjoint with groups), 10% of each training part for
    validation; mean ± std of test metrics over folds. Saves the fold with the best validation score."""
    results: list[FitResult] = []
    per_fold = []
    for i in range(k):
        part = select_splits(
            {"all": data},
            fold=i,
            folds=k,
            val_fraction=val_fraction,
            split_seed=cfg.seed,
            train_size=size,
            train_seed=cfg.seed + i,
        )
        log.info("fold %d/%d: train %d val %d test %d", i + 1, k, *map(len, part))
        res = fit(encoder, *part, cfg.replace(seed=cfg.seed + i), preprocessing=preprocessing)
        results.append(res)
        per_fold.append(
            {
                "fold": i,
                **_metrics(res.test_metrics),
                "n_train": len(part.train),
                "n_val": len(part.val),
                "n_test": len(part.test),
                "val": _metrics(res.val_metrics),
                "best_epoch": res.best_epoch,
                "converged": res.converged,
                "wall_time_s": round(res.wall_time_s, 1),
            }
        )
    cv = {
        m: dict(zip(("mean", "std"), mean_std(_metrics(r.test_metrics)[m] for r in results), strict=True))
        for m in REPORTED
    }
    summary: dict[str, Any] = {
        "protocol": f"{k}-fold",
        "encoder": results[0].encoder,
        "cv": cv,
        "table": {m: format_pm(cv[m]["mean"], cv[m]["std"]) for m in REPORTED},
        "folds": per_fold,
        "wall_time_s": round(sum(r.wall_time_s for r in results), 1),
    }
    for m in REPORTED:
        log.info("%d-fold test %s: %s", k, m, summary["table"][m])
    if out is not None:
        scores = [selection_score(r.val_metrics, cfg.select_metric) for r in results]
        sel = int(np.argmax([-math.inf if math.isnan(s) else s for s in scores]))
        best = results[sel]
        kw: dict[str, Any] = {
            "command": command,
            "data": data_desc,
            "note": _note(best, note, best.n_train) + f" (fold {sel + 1} of {k}-fold CV, chosen on "
            "validation)",
            "extra_metrics": {"cv": cv, "cv_folds": per_fold, "saved_fold": sel + 1},
        }
        if name:
            kw["name"] = name
        save_classifier(best, out, **kw)
        Path(out, "cv_results.json").write_text(json.dumps(summary, indent=2) + "\n")
        summary["saved"] = str(out)
    return summary
