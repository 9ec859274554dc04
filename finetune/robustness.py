"""Robustness of fine-tuned classifiers to shifts of the test images, in the manner of Ghesu et al.

Each shift perturbs the stored uint8 grey test images (what `predict_proba` feeds through the shared
preprocessing), then every classifier is measured on them with its own preprocessing:

    hu_offset   d HU added to every pixel: grey + d / (high - low) x 255, (low, high) the HU bounds of the
                classifier's HU -> grey mapping (OrganAMNIST: abdominal window 40/400: 0.6375 grey/HU)
    hu_scale    HU h -> c + s (h - c) about the mapping's centre c (grey 127.5)
    rotation    degrees, counter-clockwise as displayed, bilinear, reflected border
    zoom        s > 1 magnifies (field of view / s), s < 1 shrinks; bilinear, reflected border
    resolution  downsampled by a factor (antialiased, as the pipeline resizes), then bilinear back up

Saturated pixels (grey 0 or 255) hold HU beyond the mapping's bounds whose true value is unknown (air, bone):
intensity shifts of the sizes used here leave them saturated, as the same shift of the scanner's HU would.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ctdata.datasets import ArraySplit
from ctdata.labeled import limit
from ctdata.preprocess import PreprocessConfig
from cthub.errors import ConfigError, DataError
from finetune.calibration import config_temperature, scaled_probs
from finetune.train import predict_logits
from hub.config import ModelConfig, data_source
from hub.io import from_pretrained
from hub.metrics import classification_metrics
from hub.model_data import recorded_splits

log = logging.getLogger(__name__)

KINDS = ("hu_offset", "hu_scale", "rotation", "zoom", "resolution")


@dataclass(frozen=True)
class Shift:
    """A named perturbation of the test images: `kind` (one of KINDS) at `severity` (HU, factor, degrees)."""

    name: str
    kind: str
    severity: float

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown shift kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.kind in ("hu_scale", "zoom") and self.severity <= 0:
            raise ConfigError(f"{self.kind} needs a positive factor, got {self.severity}")
        if self.kind == "resolution" and self.severity < 1:
            raise ConfigError(f"resolution needs a downsampling factor >= 1, got {self.severity}")

    @property
    def description(self) -> str:
        s = self.severity
        return {
            "hu_offset": f"{s:+g} HU added",
            "hu_scale": f"HU scaled by {s:g} about the window centre",
            "rotation": f"rotated {s:+g}°",
            "zoom": f"zoomed ×{s:g}",
            "resolution": f"downsampled ÷{s:g}, then back up",
        }[self.kind]


SHIFTS: tuple[Shift, ...] = (
    Shift("hu+20", "hu_offset", 20.0),
    Shift("hu-20", "hu_offset", -20.0),
    Shift("hu+50", "hu_offset", 50.0),
    Shift("hu-50", "hu_offset", -50.0),
    Shift("hu*0.9", "hu_scale", 0.9),
    Shift("hu*1.1", "hu_scale", 1.1),
    Shift("rot+10", "rotation", 10.0),
    Shift("rot-10", "rotation", -10.0),
    Shift("rot+20", "rotation", 20.0),
    Shift("rot-20", "rotation", -20.0),
    Shift("zoom0.8", "zoom", 0.8),
    Shift("zoom1.2", "zoom", 1.2),
    Shift("res/2", "resolution", 2.0),
    Shift("res/3", "resolution", 3.0),
)


def shift_by_name(name: str) -> Shift:
    """The entry of SHIFTS called `name`; ConfigError otherwise."""
    for s in SHIFTS:
        if s.name == name:
            return s
    raise ConfigError(f"unknown shift {name!r}; choose from {', '.join(s.name for s in SHIFTS)}")


# --- perturbations ------------------------------------------------------------------------------------------


def hu_bounds(pp: PreprocessConfig) -> tuple[float, float]:
    """(low, high) HU that the classifier's mapping sends to grey 0 and 255."""
    if pp.mapping == "window":
        return pp.window_bounds()
    if pp.mapping == "interval":
        lo, hi = pp.hu_range
        return float(lo), float(hi)
    raise ConfigError(
        f"HU shifts need a fixed HU -> grey mapping (window or interval); this model's is {pp.mapping!r}"
    )


def _keep_saturated(grey: np.ndarray, shifted: np.ndarray) -> np.ndarray:
    out = np.clip(np.rint(shifted), 0, 255).astype(np.uint8)
    saturated = (grey == 0) | (grey == 255)
    out[saturated] = grey[saturated]
    return out


def _affine(x: torch.Tensor, degrees: float, zoom: float) -> torch.Tensor:
    """[N,1,H,W] rotated counter-clockwise (as displayed, rows downwards) and zoomed about the centre."""
    n, _, h, w = x.shape
    a = math.radians(degrees)
    c, s = math.cos(a) / zoom, math.sin(a) / zoom
    # output pixel -> input pixel in normalized coordinates (x right, y down), aspect ratio kept
    theta = torch.tensor([[c, -s * h / w, 0.0], [s * w / h, c, 0.0]], dtype=x.dtype)
    grid = F.affine_grid(theta.expand(n, 2, 3), [n, 1, h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _resolution(x: torch.Tensor, factor: float) -> torch.Tensor:
    h, w = x.shape[-2:]
    small = (max(1, round(h / factor)), max(1, round(w / factor)))
    low = F.interpolate(x, size=small, mode="bilinear", align_corners=False, antialias=True)
    return F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)


def perturb(images: np.ndarray, shift: Shift, pp: PreprocessConfig | None = None) -> np.ndarray:
    """uint8 grey images [N,H,W] under `shift` -> uint8 [N,H,W]. HU shifts need the classifier's
    preprocessing `pp` (its HU -> grey mapping); geometric ones ignore it."""
    grey = np.asarray(images)
    if grey.dtype != np.uint8 or grey.ndim != 3:
        raise DataError(f"expected uint8 images [N,H,W], got {grey.dtype} {grey.shape}")
    if shift.kind in ("hu_offset", "hu_scale"):
        if pp is None:
            raise ConfigError(f"{shift.name}: HU shifts need the classifier's preprocessing")
        lo, hi = hu_bounds(pp)
        g = grey.astype(np.float64)
        if shift.kind == "hu_offset":
            return _keep_saturated(grey, g + shift.severity * 255.0 / (hi - lo))
        # about the centre of the mapped HU interval (the window centre): grey 127.5 for either mapping
        return _keep_saturated(grey, 127.5 + shift.severity * (g - 127.5))
    x = torch.from_numpy(np.ascontiguousarray(grey)).float()[:, None]
    if shift.kind == "resolution":
        y = _resolution(x, shift.severity)
    else:
        degrees = shift.severity if shift.kind == "rotation" else 0.0
        y = _affine(x, degrees, shift.severity if shift.kind == "zoom" else 1.0)
    return y[:, 0].round_().clamp_(0, 255).to(torch.uint8).numpy()


# --- evaluation ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RobustnessRow:
    """One classifier: clean test metrics and, per shift, metrics with Δ = shifted − clean."""

    model: str
    path: str
    sha256: str
    data: str
    n_test: int
    clean: dict[str, float]
    shifted: dict[str, dict[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_test_split(
    config: ModelConfig, source: Path, n_test: int | None = None, seed: int = 0
) -> ArraySplit:
    """The classifier's own test images (the partition `cthub finetune` recorded in its provenance: seed,
    max_test, saved k-fold fold), reduced to a stratified `n_test` (seed `seed`) when given."""

    test = recorded_splits(config, source)[2]
    return limit(test, n_test or None, seed)


def _metrics(labels: np.ndarray, probs: np.ndarray, threshold: float | None) -> dict[str, float]:

    m = classification_metrics(labels, probs, threshold)
    return {"auc": float(m["auc"]), "accuracy": float(m["accuracy"])}


def evaluate_model(
    model_dir: str | Path,
    data: str | Path | None = None,
    n_test: int | None = None,
    seed: int = 0,
    shifts: Sequence[Shift] = SHIFTS,
) -> RobustnessRow:
    """Clean and shifted test metrics of one classifier (folder or hub name) with its own preprocessing."""

    model = from_pretrained(str(model_dir))
    cfg = model.config
    if cfg.num_classes <= 0:
        raise ConfigError(f"{model_dir} is an encoder without a classification head")
    source = data_source(cfg, data)
    if source is None:
        raise ConfigError(f"{cfg.name}: its data is not on this machine; pass --data FILE")
    test = model_test_split(cfg, source, n_test, seed)
    labels = test.labels
    assert labels is not None
    pp = cfg.preprocessing
    temperature = config_temperature(cfg.metrics)

    def measure(images: np.ndarray) -> dict[str, float]:
        # the served probabilities: a binary threshold applies to softmax(logits / T) (finetune.calibration)
        return _metrics(labels, scaled_probs(predict_logits(model, images, pp), temperature), cfg.threshold)

    clean = measure(test.images)
    shifted = {}
    for s in shifts:
        m = measure(perturb(test.images, s, pp))
        shifted[s.name] = m | {f"delta_{k}": m[k] - clean[k] for k in ("auc", "accuracy")}
        log.info("%s %s: AUC %.4f (%+.4f)", cfg.name, s.name, m["auc"], shifted[s.name]["delta_auc"])
    sha = str((cfg.provenance.get("loaded") or {}).get("sha256", ""))
    name = Path(str(model_dir)).name or cfg.name  # as the user named it (folder or hub name)
    # the data by its name: a folder on this machine means nothing to readers of the committed table
    return RobustnessRow(name, str(model_dir), sha, Path(source).name, len(test), clean, shifted)


def robustness_table(
    model_dirs: Sequence[str | Path],
    data: str | Path | None = None,
    n_test: int | None = None,
    seed: int = 0,
    shifts: Sequence[Shift] = SHIFTS,
) -> list[RobustnessRow]:
    """One row per classifier: test AUC / accuracy clean and under every shift (each its own data and
    preprocessing; `data` overrides the recorded source for all)."""
    return [evaluate_model(m, data, n_test, seed, shifts) for m in model_dirs]


def _cell(m: dict[str, float], key: str) -> str:
    v, d = m[key], round(m[f"delta_{key}"], 3) + 0.0  # + 0.0: no "-0.000"
    if math.isnan(v):
        return "n/a"
    return f"{v:.3f} ({d:+.3f})".replace("-", "−")


def markdown_table(rows: Sequence[RobustnessRow], shifts: Sequence[Shift] = SHIFTS, key: str = "auc") -> str:
    """Rows = models, columns = clean then shifts; cells `value (Δ vs clean)` of `key` (auc or accuracy)."""
    head = ["model", "n", "clean", *(s.name for s in shifts)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for r in rows:
        cells = [
            r.model,
            str(r.n_test),
            f"{r.clean[key]:.3f}",
            *(_cell(r.shifted[s.name], key) for s in shifts),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(rows: Sequence[RobustnessRow], shifts: Sequence[Shift] = SHIFTS, command: str = "") -> str:
    """robustness.md: what was measured, the AUC table, the accuracy table and the shifts' legend."""
    sources = sorted({Path(r.data).name for r in rows})
    legend = "\n".join(f"- `{s.name}`: {s.description}" for s in shifts)
    return (
        "# Robustness to shifts of the test images\n\n"
        f"Command: `{command}`\n\n"
        f"Each classifier on its own test images ({', '.join(sources)}), clean and shifted; the shifts act "
        "on the stored grey images before each model's preprocessing (HU shifts through its recorded "
        "HU → grey mapping; `finetune/robustness.py`). Cells: metric under the shift (Δ vs clean).\n\n"
        f"## Test AUC (macro one-vs-rest)\n\n{markdown_table(rows, shifts, 'auc')}\n\n"
        f"## Test accuracy\n\n{markdown_table(rows, shifts, 'accuracy')}\n\n"
        f"## Shifts\n\n{legend}\n"
    )
