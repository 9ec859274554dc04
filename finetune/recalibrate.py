"""Recalibration at a site: a classifier's temperature (and, for binary models, its operating point) refitted
on a small local labeled set, written as a new model version beside the old one (which is never modified).

`recalibrate(model_dir, data, out, site=...)` reads the set in any labeled form fine-tuning reads
(`ctdata.labeled.load_splits`: a folder with labels.csv, class folders, a CSV manifest with DICOM paths, a
MedMNIST .npz; every split pooled), runs the model (torch, the shared preprocessing), and:

- fits T on the set's logits (`finetune.calibration.fit_temperature`); ECE before (the model's current T) and
  after, on the whole set and cross-validated (T fitted on 4/5, measured on the held-out 1/5, pooled);
- binary models: the threshold for a stated sensitivity, or Youden's J, on the calibrated probabilities,
  with a 95% bootstrap interval; without a rule the current decisions are kept (the threshold carried over);
- writes `out`: the same weights, a config whose `metrics["calibration"]` is the new record (version + 1,
  the previous one under `previous`), `revision` `<weights sha256[:12]>+cal<version>`, the card's
  "Recalibrated at SITE on N images" section, `calibration.png` and `calibration.json`.

Exporting the new version (its ONNX file carries the new T) is the caller's step (`cthub calibrate` does it
with `export.export_onnx`): finetune does not import export.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from ctdata.datasets import ArraySplit
from ctdata.labeled import load_splits
from cthub.errors import ConfigError, DataError
from finetune.calibration import (
    ECE_BINS,
    METHOD,
    binary_threshold_after,
    bootstrap_operating_point,
    calibration_id,
    config_temperature,
    fit_temperature,
    mean_nll,
    now_utc,
    operating_point,
    reliability,
    reliability_plot,
    scaled_probs,
)
from finetune.train import hub_config, predict_logits
from hub.config import ModelConfig
from hub.io import load_dir, save_pretrained

log = logging.getLogger(__name__)

MIN_IMAGES = 20  # fewer: a temperature (and surely a threshold) fitted on the set says little
MIN_PER_CLASS = 5  # binary operating point: positives and negatives each
CV_FOLDS = 5
RECORD_NAME = "calibration.json"
FIGURE_NAME = "calibration.png"


class ClassMismatchError(DataError):
    """The local set's classes are not the model's."""


def pooled(splits: dict[str, ArraySplit]) -> ArraySplit:
    """Every image of every split of a labeled source, as one set."""
    parts = [splits[k] for k in sorted(splits)]
    if any(p.labels is None for p in parts):
        raise DataError("recalibration needs labels for every image")
    first = parts[0]
    if len(parts) == 1:
        return first
    if len({p.images.shape[1:] for p in parts}) != 1:
        raise DataError("the splits of the set have images of different sizes")
    labels = [p.labels for p in parts if p.labels is not None]
    return ArraySplit(
        images=np.concatenate([p.images for p in parts]),
        labels=np.concatenate(labels),
        class_names=list(first.class_names),
    )


def check_classes(model_labels: list[str], data: ArraySplit, source: str) -> None:
    """ClassMismatchError naming both when the set's classes are not the model's (by name when the set
    names them, else by count)."""
    assert data.labels is not None
    names = list(data.class_names)
    if names and names != list(model_labels):
        raise ClassMismatchError(
            f"the classes of {source} ({', '.join(names)}) are not the model's ({', '.join(model_labels)}): "
            "recalibrate on a set labeled with the model's classes, in its order"
        )
    if int(data.labels.max()) >= len(model_labels) or int(data.labels.min()) < 0:
        raise ClassMismatchError(
            f"{source} has labels 0..{int(data.labels.max())}, the model has {len(model_labels)} classes "
            f"({', '.join(model_labels)})"
        )


def check_size(labels: np.ndarray, num_classes: int, source: str) -> None:
    """DataError when the set is too small to fit a temperature or, for a binary model, a threshold."""
    if len(labels) < MIN_IMAGES:
        raise DataError(
            f"{source} holds {len(labels)} labeled images; recalibration needs at least {MIN_IMAGES}"
        )
    if num_classes == 2:
        counts = np.bincount(labels, minlength=2)
        if counts.min() < MIN_PER_CLASS:
            raise DataError(
                f"{source} holds {int(counts[0])} negative and {int(counts[1])} positive images; a binary "
                f"operating point needs at least {MIN_PER_CLASS} of each"
            )


def cross_validated_probs(
    logits: np.ndarray, labels: np.ndarray, folds: int = CV_FOLDS, seed: int = 0
) -> np.ndarray:
    """Held-out calibrated probabilities: each image scored with a T fitted on the other folds."""
    order = np.random.default_rng(seed).permutation(len(labels))
    out = np.zeros(logits.shape, dtype=np.float64)
    for held in np.array_split(order, folds):
        rest = np.setdiff1d(order, held)
        out[held] = scaled_probs(logits[held], fit_temperature(logits[rest], labels[rest]))
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "site"


def default_out(model_dir: Path, site: str, version: int) -> Path:
    """`<model folder>-cal<version>-<site>` beside the model folder."""
    return model_dir.with_name(f"{model_dir.name}-cal{version}-{_slug(site)}")


def _current(cfg: ModelConfig) -> tuple[dict[str, Any] | None, float, int]:
    """(current calibration record, the T served with it, its version (0 without a record)). T is read by
    the one rule (`config_temperature`: a number > 0, else 1), so "before" is what was served; a record
    whose T that rule refuses keeps its place in the history (its version is not reused)."""
    rec = cfg.metrics.get("calibration")
    if not isinstance(rec, dict):
        return None, 1.0, 0
    v = rec.get("version")
    version = v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 1
    return rec, config_temperature(cfg.metrics), version


def _operating_point(
    y: np.ndarray,
    scores: np.ndarray,
    sensitivity: float | None,
    youden: bool,
    carried: float | None,
    resamples: int,
) -> dict[str, Any] | None:
    """The binary operating point on the set's calibrated scores (bootstrap interval when refitted)."""
    if sensitivity is None and not youden:
        if carried is None:
            return None
        pred = scores >= carried
        return {
            "threshold": carried,
            "rule": "carried over from the previous calibration (the same decisions)",
            "sensitivity": round(float(pred[y == 1].mean()), 6),
            "specificity": round(float((~pred[y == 0]).mean()), 6),
        }
    op = operating_point(y, scores, sensitivity)
    return op.to_dict() | {"ci": bootstrap_operating_point(y, scores, sensitivity, resamples=resamples)}


def recalibrate(
    model_dir: str | Path,
    data: str | Path,
    out: str | Path | None = None,
    *,
    site: str = "site",
    sensitivity: float | None = None,
    youden: bool = False,
    command: str = "",
    resamples: int = 1000,
    threads: int | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Refit the calibration of the classifier in `model_dir` on the labeled set `data` and write the new
    version to `out` (default `default_out`); (new folder, calibration record). The old folder is only
    read. Typed errors: ConfigError (not a classifier, `out` exists, both rules given), ClassMismatchError,
    DataError (too few images, one class only)."""
    import torch

    from cthub.runtime import num_threads

    src = Path(model_dir)
    if sensitivity is not None and youden:
        raise ConfigError("choose one operating-point rule: --sensitivity or --youden")
    model = load_dir(src)
    cfg = hub_config(model)
    assert cfg is not None, "load_dir attaches the config"
    if cfg.num_classes <= 0:
        raise ConfigError(f"{src} is an encoder without a classification head: nothing to calibrate")
    if (sensitivity is not None or youden) and cfg.num_classes != 2:
        raise ConfigError(
            f"{cfg.name} has {cfg.num_classes} classes: an operating point is for binary models; "
            "a multi-class model is recalibrated by its temperature only"
        )
    previous, t_old, version = _current(cfg)
    version += 1
    dest = Path(out) if out is not None else default_out(src, site, version)
    if dest.resolve() == src.resolve():
        raise ConfigError(
            "the recalibrated version is written to a new folder: --out must not be the model's"
        )
    if dest.exists() and any(dest.iterdir()):
        raise ConfigError(f"{dest} exists and is not empty: choose another --out")
    source = str(data)
    pp = cfg.preprocessing
    local = pooled(load_splits(data, pp, storage_size=pp.input_size))
    assert local.labels is not None
    check_classes(list(cfg.labels), local, Path(source).name)
    y = local.labels.astype(np.int64)
    check_size(y, cfg.num_classes, Path(source).name)
    with num_threads(threads), torch.inference_mode():
        logits = predict_logits(model, local.images, pp, amp=False, channels_last=False)
    t_new = fit_temperature(logits, y)
    before = reliability(scaled_probs(logits, t_old), y)
    after = reliability(scaled_probs(logits, t_new), y)
    held_out = reliability(cross_validated_probs(logits, y), y)
    carried = None
    if cfg.num_classes == 2 and cfg.threshold is not None:  # the same decisions, expressed under the new T
        raw = binary_threshold_after(cfg.threshold, 1.0 / t_old)  # back to softmax(z)[1]
        carried = binary_threshold_after(raw, t_new)
    op = None
    if cfg.num_classes == 2:
        op = _operating_point(y, scaled_probs(logits, t_new)[:, 1], sensitivity, youden, carried, resamples)
    n = len(y)
    record: dict[str, Any] = {
        "method": METHOD,
        "status": "calibrated",
        "temperature": round(t_new, 6),
        "version": version,
        "site": site,
        "fitted_on": {"data": source, "split": "all", "n": n, "when": now_utc(), "site": site},
        "evaluated_on": {"data": source, "split": "all (the set it was fitted on)", "n": n},
        "bins": ECE_BINS,
        "ece_before": before["ece"],
        "ece_after": after["ece"],
        "ece_after_cross_validated": held_out["ece"],
        "cross_validation": f"{CV_FOLDS}-fold: T fitted on 4/5 of the set, ECE on the held-out 1/5, pooled",
        "nll_before": round(mean_nll(logits, y, t_old), 6),
        "nll_after": round(mean_nll(logits, y, t_new), 6),
        "temperature_before": round(t_old, 6),
        "reliability": {"before": before["bins"], "after": after["bins"]},
        "operating_point": op,
        "previous": None
        if previous is None
        else {k: previous.get(k) for k in ("version", "id", "temperature", "site", "fitted_on", "ece_after")},
        "figure": FIGURE_NAME,
        "command": command,
    }
    record["id"] = calibration_id(record)
    new_cfg = _new_config(cfg, record, op, src)
    save_pretrained(model, dest, new_cfg)
    reliability_plot(record, dest / FIGURE_NAME, title=f"{new_cfg.name} at {site}")
    (dest / RECORD_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    log.info(
        "recalibrated %s at %s on %d images: T %.3f -> %.3f, ECE %.4f -> %.4f (cross-validated %.4f); %s",
        cfg.name,
        site,
        n,
        t_old,
        t_new,
        before["ece"],
        after["ece"],
        held_out["ece"],
        dest,
    )
    return dest, record


def _new_config(
    cfg: ModelConfig, record: dict[str, Any], op: dict[str, Any] | None, src: Path
) -> ModelConfig:
    """The new version's config: the new calibration record and threshold, a revision naming both, the old
    ONNX figures dropped (the new file is exported afterwards), where it came from in provenance."""
    prov = copy.deepcopy(cfg.provenance)
    loaded = prov.pop("loaded", None) or {}
    sha = str(loaded.get("sha256") or "")
    prov["recalibrated_from"] = {
        "folder": str(src.resolve()),
        "name": cfg.name,
        "version": cfg.revision or sha[:12],
        "weights_sha256": sha,
        "calibration_version": (record.get("previous") or {}).get("version"),
    }
    metrics = {k: v for k, v in cfg.metrics.items() if k != "onnx"} | {"calibration": record}
    return dataclasses.replace(
        cfg,
        threshold=op["threshold"] if op is not None else cfg.threshold,
        revision=f"{sha[:12]}+cal{record['version']}",
        metrics=metrics,
        provenance=prov,
    )
