"""One model folder -> predictions on uploaded images, through ONNX Runtime (fresh model.onnx) or torch.

Preprocessing goes only through `ctdata` (load_image, to_unit, finalize) with the model's own config, or a
window the caller chose (which is reported back as a warning: the model was trained on its own mapping).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctdata import PreprocessConfig, load_image, to_unit, unit_to_input
from cthub.errors import ConfigError, CTHubError, InputError, ModelNotFoundError, PayloadTooLargeError
from hub.config import CONFIG_NAME, WEIGHTS_NAME, ModelConfig
from hub.io import hub_dir, sha256_file

MODEL_ENV = "CTHUB_SERVE_MODEL"
BACKEND_ENV = "CTHUB_SERVE_BACKEND"
MAX_UPLOAD_ENV = "CTHUB_MAX_UPLOAD_MB"
DEFAULT_MAX_UPLOAD_MB = 64.0
BACKENDS = ("auto", "onnx", "torch")


def max_upload_bytes() -> int:
    try:
        return int(float(os.environ.get(MAX_UPLOAD_ENV, DEFAULT_MAX_UPLOAD_MB)) * 2**20)
    except ValueError:
        raise ConfigError(f"{MAX_UPLOAD_ENV} must be a number of megabytes") from None


def resolve_model_dir(name_or_path: str | Path | None) -> Path:
    """A model folder from a path or a local hub name; ModelNotFoundError with what was tried."""
    if not name_or_path:
        raise ModelNotFoundError(f"no model given: pass --model DIR (or set {MODEL_ENV})")
    p = Path(name_or_path).expanduser()
    for cand in (p, hub_dir() / str(name_or_path)):
        if (cand / WEIGHTS_NAME).is_file() and (cand / CONFIG_NAME).is_file():
            return cand.resolve()
    raise ModelNotFoundError(f"model {str(name_or_path)!r} not found: no {WEIGHTS_NAME} + {CONFIG_NAME} at "
                             f"{p} or in the hub directory {hub_dir()}")


def effective_preprocessing(base: PreprocessConfig, window: str | None = None, center: float | None = None,
                            width: float | None = None) -> PreprocessConfig:
    """The model's preprocessing, or the same with a window preset / explicit center+width instead."""
    if (center is None) != (width is None):
        raise ConfigError("give both window_center and window_width, or neither")
    if center is not None:
        return base.replace(mapping="window", window=None, window_center=float(center), window_width=float(width))
    if window:
        return base.replace(mapping="window", window=window, window_center=None, window_width=None)
    return base


@dataclass
class Prediction:
    """One image's result; `unit` is the [0, 1] image (before resizing) the model saw, for display."""

    label: str
    probabilities: dict[str, float]
    preprocessing: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    unit: np.ndarray | None = None
    image: dict[str, Any] = field(default_factory=dict)

    def to_json(self, model: dict[str, Any]) -> dict[str, Any]:
        return {"label": self.label, "probabilities": self.probabilities, "model": model,
                "preprocessing": self.preprocessing, "warnings": self.warnings, "image": self.image}


class Predictor:
    """Loads a model folder once; `predict(bytes)` -> Prediction. Backend: fresh ONNX when present, else torch."""

    def __init__(self, model_dir: str | Path, backend: str = "auto", threads: int | None = None) -> None:
        from export.exporter import ONNX_NAME, onnx_is_fresh

        if backend not in BACKENDS:
            raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.model_dir = resolve_model_dir(model_dir)
        self.config = ModelConfig.load(self.model_dir)
        if self.config.num_classes <= 0:
            raise ConfigError(f"{self.model_dir} is an encoder without a classification head")
        self.sha256 = sha256_file(self.model_dir / WEIGHTS_NAME)
        fresh = onnx_is_fresh(self.model_dir)
        if backend == "onnx" and not fresh:
            raise ModelNotFoundError(f"no up-to-date {ONNX_NAME} in {self.model_dir}: run `cthub export` first")
        self.backend = "onnx" if backend == "onnx" or (backend == "auto" and fresh) else "torch"
        if self.backend == "onnx":
            from export.session import OnnxClassifier

            self._onnx = OnnxClassifier(self.model_dir / ONNX_NAME, threads=threads)
            self.providers = self._onnx.providers
        else:
            from cthub.runtime import select_device
            from hub.io import load_dir

            self.device = select_device()
            self._torch = load_dir(self.model_dir, sha256=self.sha256).to(self.device).eval()
            self.providers = [f"torch:{self.device.type}"]
        n = self.config.num_classes
        self.labels = list(self.config.labels) if len(self.config.labels) == n else [f"class_{i}" for i in range(n)]

    def torch_model(self) -> torch.nn.Module:
        """The torch model (loaded on first use with the ONNX backend, e.g. for class activation maps)."""
        model = getattr(self, "_torch", None)
        if model is None:
            from hub.io import load_dir

            model = self._torch = load_dir(self.model_dir, sha256=self.sha256).eval()
        return model

    @property
    def info(self) -> dict[str, Any]:
        """Model identity for responses: name, version, weights sha256, backend."""
        return {"name": self.config.name, "version": self.config.revision or self.sha256[:12],
                "sha256": self.sha256, "backend": self.backend, "providers": self.providers,
                "labels": self.labels, "task": self.config.task}

    def proba(self, x: torch.Tensor) -> np.ndarray:
        """Probabilities [B, num_classes] for preprocessed inputs [B, C, S, S]."""
        if self.backend == "onnx":
            return self._onnx.predict_proba(x).astype(np.float64)
        from cthub.errors import ShapeError

        pp = self.config.preprocessing
        if x.ndim != 4 or tuple(x.shape[1:]) != (pp.in_chans, pp.input_size, pp.input_size):
            raise ShapeError(f"expected input [B, {pp.in_chans}, {pp.input_size}, {pp.input_size}], "
                             f"got {tuple(x.shape)}")
        with torch.inference_mode():
            logits = self._torch(x.to(self.device).float()).float().cpu()
        return torch.softmax(logits.double(), dim=-1).numpy()

    def decide(self, p: np.ndarray) -> str:
        """Label for one probability vector: the binary operating point when configured, else argmax."""
        t = self.config.threshold
        if len(self.labels) == 2 and t is not None:
            return self.labels[1] if p[1] >= t else self.labels[0]
        return self.labels[int(np.argmax(p))]

    def prepare(self, data: bytes, window: str | None = None, center: float | None = None,
                width: float | None = None) -> tuple[torch.Tensor, Prediction]:
        """Bytes -> model input [C, S, S] and a Prediction shell (preprocessing, warnings, display image)."""
        if len(data) > max_upload_bytes():
            raise PayloadTooLargeError(f"upload of {len(data) / 2**20:.1f} MB exceeds the limit of "
                                       f"{max_upload_bytes() / 2**20:.0f} MB")
        if not data:
            raise InputError("empty upload: expected a DICOM file")
        base = self.config.preprocessing
        cfg = effective_preprocessing(base, window, center, width)
        image = load_image(data)
        notes = list(image.warnings)
        if cfg != base:
            notes.append("window override: the model was trained with its own preprocessing "
                         f"({base.mapping}); predictions under another window may be unreliable")
            if not image.is_hu:
                notes.append("window override ignored: the image is not in Hounsfield units")
        if image.pixels.ndim == 3 and image.pixels.shape[0] > 1:
            notes.append(f"multi-frame image ({image.pixels.shape[0]} frames): only the first frame was used")
        unit = to_unit(image, cfg)
        x = unit_to_input(unit, cfg)
        shell = Prediction(label="", probabilities={}, preprocessing=cfg.to_dict(), warnings=notes, unit=unit,
                           image={"source": image.source, "rows": int(unit.shape[-2]), "columns": int(unit.shape[-1]),
                                  "hounsfield": bool(image.is_hu)})
        return x, shell

    def finish(self, shell: Prediction, p: np.ndarray) -> Prediction:
        shell.probabilities = {k: float(v) for k, v in zip(self.labels, p)}
        shell.label = self.decide(p)
        return shell

    def predict(self, data: bytes, window: str | None = None, center: float | None = None,
                width: float | None = None) -> Prediction:
        x, shell = self.prepare(data, window, center, width)
        return self.finish(shell, self.proba(x[None])[0])

    def predict_many(self, items: list[bytes]) -> list[Prediction | CTHubError]:
        """One forward pass for every readable item; per-item errors are returned in place, not raised."""
        prepared: list[tuple[torch.Tensor, Prediction] | CTHubError] = []
        for data in items:
            try:
                prepared.append(self.prepare(data))
            except CTHubError as e:
                prepared.append(e)
        ok = [p for p in prepared if not isinstance(p, CTHubError)]
        probs = iter(self.proba(torch.stack([x for x, _ in ok])) if ok else [])
        return [p if isinstance(p, CTHubError) else self.finish(p[1], next(probs)) for p in prepared]


@functools.lru_cache(maxsize=4)
def get_predictor(model_dir: str, backend: str = "auto") -> Predictor:
    """One Predictor per (folder, backend) and process, shared by the API and the mounted demo."""
    return Predictor(model_dir, backend=backend)
