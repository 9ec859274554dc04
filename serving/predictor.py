"""One model folder -> predictions on uploaded images, through one `export.Classifier` (ONNX Runtime when
model.onnx is fresh, else torch).

Every upload goes through `Predictor.predict` / `predict_many`: the size limit is checked there once, the
image is decoded and preprocessed only through `ctdata` with the model's own config, or a window the caller
chose (which is reported back as a warning: the model was trained on its own mapping).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctdata import PreprocessConfig, load_image, to_unit, unit_to_input
from cthub.errors import ConfigError, CTHubError, InputError, ModelNotFoundError, PayloadTooLargeError
from export.classifier import Classifier, TorchClassifier
from hub.config import CONFIG_NAME, WEIGHTS_NAME, ModelConfig
from hub.io import hub_dir, load_dir, sha256_file
from hub.resnet import ResNet50
from serving.results import decide
from serving.settings import BACKENDS, MODEL_ENV

log = logging.getLogger(__name__)

MAX_UPLOAD_ENV = "CTHUB_MAX_UPLOAD_MB"
DEFAULT_MAX_UPLOAD_MB = 64.0

Upload = bytes | str | Path


def max_upload_bytes() -> int:
    """The upload limit from $CTHUB_MAX_UPLOAD_MB (megabytes, default 64)."""
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
    raise ModelNotFoundError(
        f"model {str(name_or_path)!r} not found: no {WEIGHTS_NAME} + {CONFIG_NAME} at "
        f"{p} or in the hub directory {hub_dir()}"
    )


def open_classifier(model_dir: Path, backend: str = "auto", threads: int | None = None) -> Classifier:
    """The classifier for a model folder. auto: ONNX Runtime when model.onnx matches the weights and the
    preprocessing, else torch. The weights are hashed once (twice only when a stale model.onnx exists)."""
    from export.exporter import ONNX_NAME, matches_source
    from export.session import OnnxClassifier

    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    config = ModelConfig.load(model_dir)
    if config.num_classes <= 0:
        raise ConfigError(f"{model_dir} is an encoder without a classification head")
    onnx_path = model_dir / ONNX_NAME
    sha256: str | None = None
    if backend != "torch" and onnx_path.is_file():
        try:
            onnx = OnnxClassifier(onnx_path, threads=threads, config=config)
        except CTHubError as e:
            log.warning("%s cannot be used (%s)", ONNX_NAME, e)
        else:
            sha256 = sha256_file(model_dir / WEIGHTS_NAME)
            if matches_source(onnx.metadata, config, sha256):
                return onnx
    if backend == "onnx":
        raise ModelNotFoundError(f"no up-to-date {ONNX_NAME} in {model_dir}: run `cthub export` first")
    if onnx_path.is_file():
        log.warning(
            "%s is older than the weights or the preprocessing: serving with torch "
            "(run `cthub export` to use ONNX Runtime)",
            ONNX_NAME,
        )
    return TorchClassifier.from_dir(model_dir, sha256=sha256)


def effective_preprocessing(
    base: PreprocessConfig, window: str | None = None, center: float | None = None, width: float | None = None
) -> PreprocessConfig:
    """The model's preprocessing, or the same with a window preset / explicit center+width instead."""
    if center is not None and width is not None:
        return base.replace(
            mapping="window", window=None, window_center=float(center), window_width=float(width)
        )
    if center is not None or width is not None:
        raise ConfigError("give both window_center and window_width, or neither")
    if window:
        return base.replace(mapping="window", window=window, window_center=None, window_width=None)
    return base


def read_upload(source: Upload, limit: int) -> bytes:
    """The upload's bytes; a file's size is checked before it is read. PayloadTooLargeError over `limit`."""
    try:
        if isinstance(source, bytes):
            size = len(source)
            _check_size(size, limit)
            data = source
        else:
            path = Path(source)
            _check_size(path.stat().st_size, limit)
            data = path.read_bytes()
    except OSError:
        raise InputError("the upload could not be read") from None
    if not data:
        raise InputError("empty upload: expected a DICOM file")
    return data


def _check_size(size: int, limit: int) -> None:
    if size > limit:
        raise PayloadTooLargeError(
            f"upload of {size / 2**20:.1f} MB exceeds the limit of {limit / 2**20:.0f} MB"
        )


@dataclass
class Prediction:
    """One image's result. `unit` is the [0, 1] image (before resizing) the model saw, for display;
    `model_input` the preprocessed tensor [C, S, S] (class activation maps need it)."""

    label: str
    probabilities: dict[str, float]
    preprocessing: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    unit: np.ndarray | None = None
    image: dict[str, Any] = field(default_factory=dict)
    model_input: torch.Tensor | None = None

    def to_json(self, model: dict[str, Any]) -> dict[str, Any]:
        """The REST answer: {label, probabilities, model, preprocessing, warnings, image}."""
        return {
            "label": self.label,
            "probabilities": self.probabilities,
            "model": model,
            "preprocessing": self.preprocessing,
            "warnings": self.warnings,
            "image": self.image,
        }


class Predictor:
    """Loads a model folder once; `predict(upload)` -> Prediction, `predict_many` -> one forward pass."""

    def __init__(
        self,
        model_dir: str | Path,
        backend: str = "auto",
        threads: int | None = None,
        max_upload: int | None = None,
    ) -> None:
        self.model_dir = resolve_model_dir(model_dir)
        self.classifier = open_classifier(self.model_dir, backend, threads)
        self.max_upload = max_upload_bytes() if max_upload is None else int(max_upload)
        self._cam_model: ResNet50 | None = None
        self._cam_lock = threading.Lock()

    @property
    def config(self) -> ModelConfig:
        return self.classifier.config

    @property
    def backend(self) -> str:
        return self.classifier.backend

    @property
    def providers(self) -> list[str]:
        return self.classifier.providers

    @property
    def labels(self) -> list[str]:
        return self.classifier.labels

    @property
    def sha256(self) -> str:
        return self.classifier.sha256

    @property
    def info(self) -> dict[str, Any]:
        """Model identity for responses: name, version, weights sha256, backend, providers, labels, task."""
        return self.classifier.identity | {"labels": self.labels, "task": self.config.task}

    def require_model(self, requested: str | None) -> None:
        """ModelNotFoundError unless `requested` is empty or names the served model (name/version/sha256)."""
        ident = self.classifier.identity
        if requested and requested not in (ident["name"], ident["version"], ident["sha256"]):
            raise ModelNotFoundError(
                f"model {requested!r} is not served here; this server serves {ident['name']!r}"
            )

    def cam_model(self) -> ResNet50:
        """The torch model for class activation maps (loaded on first use with the ONNX backend)."""
        module = self.classifier.torch_module()
        if isinstance(module, ResNet50):
            return module
        with self._cam_lock:
            if self._cam_model is None:
                self._cam_model = load_dir(self.model_dir, sha256=self.sha256).eval()
            return self._cam_model

    def decide(self, p: np.ndarray) -> str:
        """Label for one probability vector: the binary operating point when configured, else argmax."""
        return decide(p, self.labels, self.config.threshold)

    def _prepare(
        self,
        source: Upload,
        window: str | None = None,
        center: float | None = None,
        width: float | None = None,
    ) -> Prediction:
        """Upload -> a Prediction without probabilities yet (model input, preprocessing, warnings, image)."""
        data = read_upload(source, self.max_upload)
        base = self.config.preprocessing
        cfg = effective_preprocessing(base, window, center, width)
        image = load_image(data)
        notes = list(image.warnings)
        if cfg != base:
            notes.append(
                "window override: the model was trained with its own preprocessing "
                f"({base.mapping}); predictions under another window may be unreliable"
            )
            if not image.is_hu:
                notes.append("window override ignored: the image is not in Hounsfield units")
        if image.pixels.ndim == 3 and image.pixels.shape[0] > 1:
            notes.append(f"multi-frame image ({image.pixels.shape[0]} frames): only the first frame was used")
        unit = to_unit(image, cfg)
        return Prediction(
            label="",
            probabilities={},
            preprocessing=cfg.to_dict(),
            warnings=notes,
            unit=unit,
            image={
                "source": image.source,
                "rows": int(unit.shape[-2]),
                "columns": int(unit.shape[-1]),
                "hounsfield": bool(image.is_hu),
            },
            model_input=unit_to_input(unit, cfg),
        )

    def _finish(self, pred: Prediction, p: np.ndarray) -> Prediction:
        pred.probabilities = {k: float(v) for k, v in zip(self.labels, p, strict=True)}
        pred.label = self.decide(p)
        return pred

    def predict(
        self,
        source: Upload,
        window: str | None = None,
        center: float | None = None,
        width: float | None = None,
    ) -> Prediction:
        """One upload (bytes or a file path) -> Prediction. Raises CTHubError for unusable input."""
        pred = self._prepare(source, window, center, width)
        return self._finish(pred, self.classifier.predict_proba(_model_input(pred)[None])[0])

    def predict_many(self, sources: list[Upload]) -> list[Prediction | CTHubError]:
        """One forward pass for every usable upload; per-item errors are returned in place, not raised."""
        prepared: list[Prediction | CTHubError] = []
        for source in sources:
            try:
                prepared.append(self._prepare(source))
            except CTHubError as e:
                prepared.append(e)
        ok = [_model_input(p) for p in prepared if isinstance(p, Prediction)]
        probs = iter(self.classifier.predict_proba(torch.stack(ok)) if ok else [])
        return [p if isinstance(p, CTHubError) else self._finish(p, next(probs)) for p in prepared]


def _model_input(pred: Prediction) -> torch.Tensor:
    assert pred.model_input is not None, "set by Predictor._prepare"
    return pred.model_input


@functools.lru_cache(maxsize=4)
def get_predictor(model_dir: str, backend: str = "auto") -> Predictor:
    """One Predictor per (folder, backend) and process, shared by the API and the mounted demo."""
    return Predictor(model_dir, backend=backend)
