"""One inference interface for exported and native classifiers.

`Classifier` turns preprocessed inputs [B, C, S, S] into logits and probabilities and carries the model's
identity (config, weights sha256, backend, providers). Its input check and softmax live here, once;
an implementation only runs a checked float32 batch. `OnnxClassifier` (export.session) runs `model.onnx`
with ONNX Runtime; `TorchClassifier` runs the safetensors weights with torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from cthub.errors import ConfigError, ShapeError
from hub.config import ModelConfig


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in the dtype of `logits` (numerically stable)."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def model_config(model: torch.nn.Module) -> ModelConfig:
    """The ModelConfig that `hub.io.load_dir` attaches to a loaded model."""
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, ModelConfig):
        raise ConfigError("the model carries no ModelConfig: load it with hub.io.load_dir")
    return cfg


def loaded_sha256(config: ModelConfig) -> str:
    """The weights' sha256 that `hub.io.load_dir` verified while loading (recorded in the provenance)."""
    loaded = config.provenance.get("loaded")
    if not isinstance(loaded, dict) or not loaded.get("sha256"):
        raise ConfigError("the model was not loaded through hub.io.load_dir: its weights' sha256 is unknown")
    return str(loaded["sha256"])


def class_labels(config: ModelConfig, num_classes: int) -> list[str]:
    """The configured labels when there is one per output, else class_0..class_{n-1}."""
    labels = list(config.labels)
    return labels if len(labels) == num_classes else [f"class_{i}" for i in range(num_classes)]


class Classifier(ABC):
    """Probabilities for a batch of preprocessed inputs, plus what identifies the model that gave them.

    Subclasses set `config`, `sha256` (of the source weights), `providers`, `input_shape` [C, S, S] and
    `num_classes`, and implement `_run` on a batch already checked and converted to float32.
    """

    backend: ClassVar[str]
    config: ModelConfig
    sha256: str
    providers: list[str]
    input_shape: tuple[int, int, int]
    num_classes: int

    @abstractmethod
    def _run(self, batch: np.ndarray) -> np.ndarray:
        """Logits [B, num_classes] for a C-contiguous float32 batch of the expected shape."""

    @property
    def labels(self) -> list[str]:
        return class_labels(self.config, self.num_classes)

    @property
    def identity(self) -> dict[str, Any]:
        """What a response names the model by: {name, version, sha256, backend, providers}."""
        return {
            "name": self.config.name,
            "version": self.config.revision or self.sha256[:12],
            "sha256": self.sha256,
            "backend": self.backend,
            "providers": list(self.providers),
        }

    def logits(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Raw logits [B, num_classes] for inputs [B, C, S, S] (or one [C, S, S])."""
        arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or tuple(arr.shape[1:]) != self.input_shape:
            raise ShapeError(
                f"expected input [B, {', '.join(map(str, self.input_shape))}], got {tuple(arr.shape)}"
            )
        return self._run(np.ascontiguousarray(arr, dtype=np.float32))

    def predict_proba(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Class probabilities [B, num_classes] as float64 (softmax over the logits)."""
        return softmax(self.logits(x).astype(np.float64))

    __call__ = predict_proba

    def torch_module(self) -> torch.nn.Module | None:
        """The torch model behind this classifier, when it is one (class activation maps need it)."""
        return None


class TorchClassifier(Classifier):
    """A classifier folder's safetensors weights run with torch (CUDA when available)."""

    backend: ClassVar[str] = "torch"

    def __init__(
        self, model: torch.nn.Module, config: ModelConfig, sha256: str, device: torch.device | None = None
    ) -> None:
        if config.num_classes <= 0:
            raise ConfigError(f"{config.name} is an encoder without a classification head")
        self.device = device or next(model.parameters()).device
        self.module = model.to(self.device).float().eval()
        self.config, self.sha256 = config, sha256
        self.providers = [f"torch:{self.device.type}"]
        pp = config.preprocessing
        self.input_shape = (pp.in_chans, pp.input_size, pp.input_size)
        self.num_classes = config.num_classes

    @classmethod
    def from_dir(
        cls, model_dir: str | Path, *, sha256: str | None = None, device: torch.device | None = None
    ) -> TorchClassifier:
        """Load a model folder strictly; its weights are hashed once, while loading, and verified."""
        from cthub.runtime import select_device
        from hub.io import load_dir

        model = load_dir(model_dir, sha256=sha256)
        cfg = model_config(model)
        return cls(model, cfg, loaded_sha256(cfg), device or select_device())

    def _run(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = self.module(torch.from_numpy(batch).to(self.device))
        return out.float().cpu().numpy()

    def torch_module(self) -> torch.nn.Module:
        return self.module
