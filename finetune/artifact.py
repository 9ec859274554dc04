"""The classifier artifact: encoder + head + labels + threshold + preprocessing + metrics + the command."""

from __future__ import annotations

import datetime as _dt
import platform
from pathlib import Path
from typing import Any

import torch

from finetune.calibration import reliability_plot
from finetune.train import FitResult
from hub import ModelConfig, save_pretrained

CALIBRATION_FIGURE = "calibration.png"


def _round(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 6)
    if isinstance(v, dict):
        return {k: _round(x) for k, x in v.items()}
    return v


def default_note(encoder: str, epochs: int, n_train: int, image_size: int) -> str:
    """What a fine-tuned model is, in one line, when the user gives no --note."""
    init = "random-init" if encoder == "scratch" else f"{encoder}-pretrained"
    kind = "a demo" if epochs < 20 or n_train < 1000 else "a research model"
    return (
        f"{init} encoder, {epochs} epochs on {n_train:,} images at {image_size} px: {kind}, "
        "not a clinical model"
    )


def classifier_config(
    result: FitResult,
    *,
    name: str,
    command: str,
    data: str,
    note: str,
    task: str | None = None,
    extra_metrics: dict[str, Any] | None = None,
    extra_provenance: dict[str, Any] | None = None,
) -> ModelConfig:
    """The ModelConfig of a fine-tuned classifier, stating only what was measured and how."""
    enc = result.encoder_config
    metrics: dict[str, Any] = {
        "val": _round(result.val_metrics),
        "selected_on": f"validation {result.config.select_metric}",
    }
    if result.test_metrics is not None:  # flat numbers are what the model card lists
        metrics.update({f"test_{m}": round(result.test_metrics[m], 4) for m in ("accuracy", "auc", "f1")})
        metrics["test"] = _round(result.test_metrics)
    if result.calibration is not None:
        metrics["calibration"] = result.calibration | {
            "fitted_on": result.calibration["fitted_on"] | {"data": data},
            "evaluated_on": result.calibration["evaluated_on"] | {"data": data},
            "figure": CALIBRATION_FIGURE,
        }
    metrics.update(extra_metrics or {})
    prov: dict[str, Any] = {
        "command": command,
        "data": data,
        "note": note,
        "encoder": result.encoder,
        "encoder_method": enc.get("method", "random"),
        "encoder_sha256": ((enc.get("provenance") or {}).get("loaded") or {}).get("sha256"),  # as verified
        "encoder_pretraining": {  # what the encoder's own card records of its pretraining
            k: (enc.get("provenance") or {}).get(k) for k in ("steps", "epochs", "wall_time_s", "command")
        }
        if enc
        else None,
        "wall_time_s": round(result.wall_time_s, 1),
        "epochs": len(result.history),
        "best_epoch": result.best_epoch,
        "converged": result.converged,
        "n_train": result.n_train,
        "n_val": result.n_val,
        "finetune": result.config.to_dict(),
        "history": [_round(h) for h in result.history],
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    prov.update(extra_provenance or {})
    return ModelConfig(
        name=name,
        architecture="resnet50",
        method=enc.get("method", "random"),
        pretraining_data=enc.get("pretraining_data", "none"),
        num_classes=len(result.class_names),
        labels=list(result.class_names),
        threshold=result.threshold,
        task=task,
        preprocessing=result.preprocessing,
        metrics=metrics,
        provenance=prov,
    )


def save_classifier(result: FitResult, out: str | Path, **kw: Any) -> Path:
    """`hub.save_pretrained` of the selected model with its `classifier_config`, and the reliability plot
    of its calibration (`calibration.png`)."""
    kw.setdefault("name", Path(out).name)
    cfg = classifier_config(result, **kw)
    folder = save_pretrained(result.model, out, cfg)
    if "calibration" in cfg.metrics:
        reliability_plot(cfg.metrics["calibration"], folder / CALIBRATION_FIGURE, title=cfg.name)
    return folder
