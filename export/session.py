"""`OnnxClassifier`: an ONNX Runtime session around an exported classifier, with its config from metadata.

Providers are asked for CUDA then CPU; what the session really uses is read back from `get_providers()`
(onnxruntime-gpu without CUDA libraries silently falls back to CPU). Logging is set per session; the one
process-wide ONNX Runtime setting is `quiet_onnxruntime_process`, for entry points only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from cthub.errors import ConfigError, InputError, ModelNotFoundError
from export.classifier import Classifier, softmax
from hub.config import ModelConfig

META_PREFIX = "cthub."
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
PREFERRED_PROVIDERS: tuple[str, ...] = ("CUDAExecutionProvider", "CPUExecutionProvider")
ORT_ERRORS_ONLY = 3  # ONNX Runtime severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal

__all__ = [
    "INPUT_NAME",
    "META_PREFIX",
    "OUTPUT_NAME",
    "OnnxClassifier",
    "quiet_onnxruntime_process",
    "read_metadata",
    "softmax",
]


def _import_ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("onnxruntime is not installed: pip install 'ct-ssl-hub[cpu]' (or [gpu])") from None
    return ort


def quiet_onnxruntime_process() -> bool:
    """For entry points only (`cthub export`, the serving worker): process-wide ONNX Runtime settings.
    False when onnxruntime is not installed (nothing to configure).

    onnxruntime-gpu on a host without CUDA libraries logs a provider load error through ORT's *default*
    logger while a session is created; `SessionOptions.log_severity_level` covers only the session's own
    logger, so the public process-wide `set_default_logger_severity` is the one switch that hides it. It and
    the telemetry opt-out change the whole process, which is why library code never calls this.
    """
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    try:
        ort = _import_ort()
    except ConfigError:
        return False
    ort.set_default_logger_severity(ORT_ERRORS_ONLY)
    return True


def _decode_metadata(props: Iterable[tuple[str, str]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in props:
        if key.startswith(META_PREFIX):
            try:
                out[key[len(META_PREFIX) :]] = json.loads(value)
            except json.JSONDecodeError:
                out[key[len(META_PREFIX) :]] = value
    return out


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The `cthub.*` metadata of an exported model, JSON values decoded (config, labels, sha256...)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return _decode_metadata((p.key, p.value) for p in model.metadata_props)


class OnnxClassifier(Classifier):
    """Predicts from preprocessed tensors [B, C, S, S] with an exported `model.onnx`.

    `config` defaults to the one stored in the file's metadata; `sha256` is that of the weights it was
    exported from (metadata `source_sha256`).
    """

    backend: ClassVar[str] = "onnx"

    def __init__(
        self,
        path: str | Path,
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        config: ModelConfig | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelNotFoundError(f"no ONNX model at {self.path}")
        ort = _import_ort()
        available = set(ort.get_available_providers())
        wanted = [p for p in (providers or PREFERRED_PROVIDERS) if p in available] or ["CPUExecutionProvider"]
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        opts.log_severity_level = ORT_ERRORS_ONLY
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=wanted)
        except Exception as e:  # noqa: BLE001 -- onnxruntime raises its own exception types for unreadable models
            raise InputError(f"{self.path.name} is not a loadable ONNX model ({type(e).__name__})") from None
        self.providers = list(self.session.get_providers())
        self.metadata = _decode_metadata(self.session.get_modelmeta().custom_metadata_map.items())
        stored = self.metadata.get("config")
        self.config = config or (ModelConfig.from_dict(stored) if isinstance(stored, dict) else ModelConfig())
        self.sha256 = str(self.metadata.get("source_sha256", ""))
        try:
            c, h, w = (int(d) for d in self.session.get_inputs()[0].shape[1:])  # ['batch', C, S, S]
            self.num_classes = int(self.session.get_outputs()[0].shape[-1])
        except (TypeError, ValueError):
            raise InputError(f"{self.path.name} is not a classifier with input [batch, C, S, S]") from None
        self.input_shape = (c, h, w)

    @property
    def device(self) -> str:
        return "cuda" if self.providers and self.providers[0] == "CUDAExecutionProvider" else "cpu"

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0])
