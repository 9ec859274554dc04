"""`OnnxClassifier`: an ONNX Runtime session around an exported classifier, with its config from metadata.

Providers are asked for CUDA then CPU; what the session really uses is read back from `get_providers()`
(onnxruntime-gpu without CUDA libraries silently falls back to CPU after logging a load error, which the
logger severity below silences).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cthub.errors import ConfigError, InputError, ModelNotFoundError, ShapeError
from hub.config import ModelConfig

META_PREFIX = "cthub."
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
PREFERRED_PROVIDERS: tuple[str, ...] = ("CUDAExecutionProvider", "CPUExecutionProvider")


def _import_ort() -> Any:
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("onnxruntime is not installed: pip install 'ct-ssl-hub[cpu]' (or [gpu])") from None
    ort.set_default_logger_severity(3)  # errors only: hides the CUDA library load error on CPU hosts
    return ort


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The `cthub.*` metadata of an exported model, JSON values decoded (config, labels, sha256...)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    out: dict[str, Any] = {}
    for prop in model.metadata_props:
        if prop.key.startswith(META_PREFIX):
            key = prop.key[len(META_PREFIX):]
            try:
                out[key] = json.loads(prop.value)
            except json.JSONDecodeError:
                out[key] = prop.value
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class OnnxClassifier:
    """Predicts from preprocessed tensors [B, C, S, S] with an exported `model.onnx`."""

    def __init__(self, path: str | Path, *, providers: Sequence[str] | None = None,
                 threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelNotFoundError(f"no ONNX model at {self.path}")
        ort = _import_ort()
        available = set(ort.get_available_providers())
        wanted = [p for p in (providers or PREFERRED_PROVIDERS) if p in available] or ["CPUExecutionProvider"]
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=wanted)
        except Exception as e:  # noqa: BLE001 -- onnxruntime raises its own exception types for unreadable models
            raise InputError(f"{self.path.name} is not a loadable ONNX model ({type(e).__name__})") from None
        self.providers: list[str] = list(self.session.get_providers())
        self.metadata = read_metadata(self.path)
        cfg = self.metadata.get("config")
        self.config = ModelConfig.from_dict(cfg) if isinstance(cfg, dict) else ModelConfig()
        shape = self.session.get_inputs()[0].shape  # ['batch', C, S, S]
        self.input_shape: tuple[int, int, int] = tuple(int(d) for d in shape[1:])  # type: ignore[assignment]

    @property
    def device(self) -> str:
        return "cuda" if self.providers and self.providers[0] == "CUDAExecutionProvider" else "cpu"

    @property
    def labels(self) -> list[str]:
        n = self.session.get_outputs()[0].shape[-1]
        labels = list(self.config.labels)
        return labels if len(labels) == n else [f"class_{i}" for i in range(int(n))]

    def logits(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Raw logits [B, num_classes] for inputs [B, C, S, S] (or one [C, S, S])."""
        arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or tuple(arr.shape[1:]) != self.input_shape:
            raise ShapeError(
                f"expected input [B, {', '.join(map(str, self.input_shape))}], got {tuple(arr.shape)}"
            )
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: arr})[0]

    def predict_proba(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Class probabilities (softmax over logits) [B, num_classes]."""
        return softmax(self.logits(x).astype(np.float64)).astype(np.float32)

    __call__ = predict_proba
