"""Protocols that train, measure and save: a given split, or stratified (group-aware) k-fold CV."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ctdata.datasets import ArraySplit
from ctdata.preprocess import PreprocessConfig
from finetune.artifact import save_classifier
from finetune.config import FinetuneConfig
from finetune.data import limit
from finetune.metrics import format_pm, mean_std
from finetune.splits import kfold_splits
from finetune.train import FitResult, fit

log = logging.getLogger("finetune")
REPORTED = ("accuracy", "auc", "f1")


def _note(result: FitResult, note: str | None, n_train: int) -> str:
    from finetune.cli import default_note

    return note or default_note(result.encoder, len(result.history), n_train, result.config.image_size)


def run_split(encoder: str | Path | nn.Module, train: ArraySplit, val: ArraySplit, test: ArraySplit,
              cfg: FinetuneConfig, *, out: str | Path | None = None, command: str = "", data: str = "",
              note: str | None = None, name: str | None = None, extra: dict[str, Any] | None = None,
              preprocessing: PreprocessConfig | None = None) -> dict[str, Any]:
    """Fit on train, select on val, measure test; save the classifier to `out` when given."""
    res = fit(encoder, train, val, test, cfg, preprocessing=preprocessing)
    summary = {"protocol": "split", "encoder": res.encoder, "best_epoch": res.best_epoch,
               "test": {k: res.test_metrics[k] for k in (*REPORTED, "n")},
               "val": {k: res.val_metrics[k] for k in REPORTED}, "threshold": res.threshold,
               "wall_time_s": round(res.wall_time_s, 1), "train_images_per_s": round(res.train_images_per_s, 1)}
    if out is not None:
        kw: dict[str, Any] = {"command": command, "data": data, "note": _note(res, note, len(train)),
                              "extra_provenance": {k: v for k, v in (extra or {}).items() if v is not None}}
        if name:
            kw["name"] = name
        save_classifier(res, out, **kw)
        summary["saved"] = str(out)
    return summary


def run_kfold(encoder: str | Path | nn.Module, data: ArraySplit, cfg: FinetuneConfig, *, k: int = 5,
              val_fraction: float = 0.1, size: float | None = None, out: str | Path | None = None,
              command: str = "", data_desc: str = "", note: str | None = None, name: str | None = None,
              preprocessing: PreprocessConfig | None = None) -> dict[str, Any]:
    """The brain protocol: k stratified folds (group-disjoint with groups), 10% of each training part for
    validation; mean ± std of test metrics over folds. Saves the fold with the best validation score."""
    folds = kfold_splits(data.labels, k, val_fraction, cfg.seed, data.groups)
    results: list[FitResult] = []
    per_fold = []
    for i, f in enumerate(folds):
        log.info("fold %d/%d: train %d val %d test %d", i + 1, k, len(f.train), len(f.val), len(f.test))
        train = limit(data.subset(f.train), size, cfg.seed + i)
        res = fit(encoder, train, data.subset(f.val), data.subset(f.test), cfg.replace(seed=cfg.seed + i),
                  preprocessing=preprocessing)
        results.append(res)
        per_fold.append({"fold": i, **{m: res.test_metrics[m] for m in REPORTED}, "n_test": len(f.test),
                         "best_epoch": res.best_epoch, "wall_time_s": round(res.wall_time_s, 1)})
    cv = {m: dict(zip(("mean", "std"), mean_std(r.test_metrics[m] for r in results))) for m in REPORTED}
    summary: dict[str, Any] = {"protocol": f"{k}-fold", "encoder": results[0].encoder, "cv": cv,
                               "table": {m: format_pm(cv[m]["mean"], cv[m]["std"]) for m in REPORTED},
                               "folds": per_fold, "wall_time_s": round(sum(r.wall_time_s for r in results), 1)}
    for m in REPORTED:
        log.info("%d-fold test %s: %s", k, m, summary["table"][m])
    if out is not None:
        sel = int(np.argmax([r.val_metrics[cfg.select_metric] for r in results]))
        best = results[sel]
        kw: dict[str, Any] = {
            "command": command, "data": data_desc,
            "note": _note(best, note, best.n_train) + f" (fold {sel + 1} of {k}-fold CV, chosen on validation)",
            "extra_metrics": {"cv": cv, "cv_folds": per_fold, "saved_fold": sel + 1}}
        if name:
            kw["name"] = name
        save_classifier(best, out, **kw)
        Path(out, "cv_results.json").write_text(json.dumps(summary, indent=2) + "\n")
        summary["saved"] = str(out)
    return summary
