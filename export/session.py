"""`OnnxClassifier`: the one ONNX Runtime session class (serving, the demo, the CLI and the benchmark), around
an exported classifier, verified on load, with its config and out-of-distribution reference from metadata.

Providers are asked for CUDA then CPU; what the session really uses is read back from `get_providers()`
(onnxruntime-gpu without CUDA libraries silently falls back to CPU). Logging is set per session; the
process-wide ONNX Runtime settings (telemetry off, the default logger's level that hides the CUDA provider's
load error on CPU-only hosts) are in `quiet_onnxruntime_process`, for entry points only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from cthub.errors import ConfigError, InputError, IntegrityError, ModelNotFoundError
from export.classifier import Classifier, RunOutputs, softmax
from export.integrity import check_fresh, onnx_file, verify_onnx_file
from export.metadata import META_PREFIX, decode_metadata, ood_reference_of, read_metadata
from export.ood import reference_from_metadata
from hub.config import WEIGHTS_NAME, ModelConfig
from hub.manifest import read_sidecar, sha256_file, verify

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OUTPUT_NAMES: tuple[str, ...] = ("logits", "probabilities", "cam", "embedding", "stage_pool")
# outputs the graph without maps drops: Grad-CAM of every class (6.9x a forward pass at 224 px, 11 classes;
# docs/results/bench-224px.md) and the uncalibrated softmax (probabilities are softmax(logits / T) here)
MAP_OUTPUTS: tuple[str, ...] = ("cam", "probabilities")
PREFERRED_PROVIDERS: tuple[str, ...] = ("CUDAExecutionProvider", "CPUExecutionProvider")
ORT_ERRORS_ONLY = 3  # ONNX Runtime severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")

__all__ = [
    "INPUT_NAME",
    "META_PREFIX",
    "OUTPUT_NAME",
    "OUTPUT_NAMES",
    "OnnxClassifier",
    "ood_reference_of",
    "quiet_onnxruntime_process",
    "read_metadata",
    "softmax",
    "weights_sha256",
]


def _import_ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("onnxruntime is not installed: pip install 'ct-ssl-hub[cpu]' (or [gpu])") from None
    return ort


def quiet_onnxruntime_process() -> bool:
    """For entry points only (`cthub export`, the serving worker, benchmarks): process-wide ONNX Runtime
    settings. False when onnxruntime is not installed (nothing to configure).

    onnxruntime-gpu on a host without CUDA libraries logs a provider load error through ORT's *default*
    logger while a session is created; `SessionOptions.log_severity_level` covers only the session's own
    logger, so the public process-wide `set_default_logger_severity` is the one switch that hides it. It,
    the telemetry opt-out and `disable_telemetry_events` change the whole process, which is why library code
    never calls this.
    """
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    try:
        ort = _import_ort()
    except ConfigError:
        return False
    ort.set_default_logger_severity(ORT_ERRORS_ONLY)
    ort.disable_telemetry_events()
    return True


def _session_options(ort: Any, threads: int | None, optimization: str) -> Any:
    if optimization not in OPTIMIZATION_LEVELS:
        raise ConfigError(f"optimization must be one of {', '.join(OPTIMIZATION_LEVELS)}")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1  # one chain of convolutions: parallelism is inside each operator
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    opts.log_severity_level = ORT_ERRORS_ONLY
    return opts


class OnnxClassifier(Classifier):
    """Predicts from preprocessed tensors [B, C, S, S] with an exported ONNX file (fp32 or int8).

    A pass without maps (`outputs(x, maps=False)`) runs a second session on the same verified file's graph
    pruned to the outputs that do not depend on the map nodes (`onnx.utils.Extractor`), built on first use
    or by `prepare_without_maps`. Asking the full graph for logits alone does not give that speed: measured
    at 224 px, 11 classes, ORT 2.06 img/s for logits from the full graph against 7.79 from the pruned one
    (docs/results/bench-224px.md).

    With `verify` (the default) the file must match the sha256 recorded beside it at export (and in the hub
    manifest for hub models), and, when given, have been exported from `source_sha256` with the
    preprocessing of `config`: IntegrityError / StaleModelError otherwise, and nothing is loaded.
    `config` defaults to the one stored in the file's metadata; `sha256` is that of the source weights.
    """

    backend: ClassVar[str] = "onnx"

    def __init__(
        self,
        path: str | Path,
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        config: ModelConfig | None = None,
        verify: bool = True,
        source_sha256: str | None = None,
        optimization: str = "all",
    ) -> None:
        self.path = Path(path)
        self._threads, self._optimization = threads, optimization
        self._without_maps: Any = None
        self._lock = threading.Lock()
        if not self.path.is_file():
            raise ModelNotFoundError(f"no ONNX model at {self.path}")
        ort = _import_ort()
        self.file_sha256 = verify_onnx_file(self.path) if verify else None
        available = set(ort.get_available_providers())
        wanted = [p for p in (providers or PREFERRED_PROVIDERS) if p in available] or ["CPUExecutionProvider"]
        opts = _session_options(ort, threads, optimization)
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=wanted)
        except Exception as e:  # noqa: BLE001 -- onnxruntime raises its own exception types for unreadable models
            raise InputError(f"{self.path.name} is not a loadable ONNX model ({type(e).__name__})") from None
        self.providers = list(self.session.get_providers())
        self.metadata = decode_metadata(self.session.get_modelmeta().custom_metadata_map.items())
        if verify:
            check_fresh(self.metadata, self.path, config=config, source_sha256=source_sha256)
        stored = self.metadata.get("config")
        self.config = config or (ModelConfig.from_dict(stored) if isinstance(stored, dict) else ModelConfig())
        self.sha256 = str(self.metadata.get("source_sha256", ""))
        self.variant = str(self.metadata.get("variant", "fp32"))
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_shape, self.num_classes = self._shapes()
        ood = self.metadata.get("ood")
        self.ood = reference_from_metadata(ood) if isinstance(ood, dict) else None

    def _shapes(self) -> tuple[tuple[int, int, int], int]:
        try:
            c, h, w = (int(d) for d in self.session.get_inputs()[0].shape[1:])  # ['batch', C, S, S]
            out = next(o for o in self.session.get_outputs() if o.name == OUTPUT_NAME)
            return (c, h, w), int(out.shape[-1])
        except (TypeError, ValueError, StopIteration):
            raise InputError(f"{self.path.name} is not a classifier with input [batch, C, S, S]") from None

    @classmethod
    def from_model_dir(
        cls,
        model_dir: str | Path,
        variant: str = "fp32",
        *,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        optimization: str = "all",
    ) -> OnnxClassifier:
        """The verified ONNX classifier of a model folder: its checksum, and that it was exported from the
        folder's current weights and preprocessing (IntegrityError / StaleModelError otherwise)."""
        model_dir = Path(model_dir)
        path = onnx_file(model_dir, variant)
        config = ModelConfig.load(model_dir)
        return cls(
            path,
            providers=providers,
            threads=threads,
            config=config,
            source_sha256=weights_sha256(model_dir),
            optimization=optimization,
        )

    @property
    def device(self) -> str:
        return "cuda" if self.providers and self.providers[0] == "CUDAExecutionProvider" else "cpu"

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0])

    def _run_outputs(self, batch: np.ndarray, maps: bool) -> RunOutputs:
        missing = [n for n in ("cam", "embedding") if n not in self.output_names]
        if missing:
            raise ConfigError(
                f"{self.path.name} has no {' / '.join(missing)} output (exported by an older version): "
                "re-export it with `cthub export`"
            )
        pooled = ["stage_pool"] if "stage_pool" in self.output_names else []  # graph version 3 on
        if not maps:
            got = self.prepare_without_maps().run(["logits", "embedding", *pooled], {INPUT_NAME: batch})
            return np.asarray(got[0]), None, np.asarray(got[1]), np.asarray(got[2]) if pooled else None
        got = self.session.run(["logits", "cam", "embedding", *pooled], {INPUT_NAME: batch})
        stage_pool = np.asarray(got[3]) if pooled else None
        return np.asarray(got[0]), np.asarray(got[1]), np.asarray(got[2]), stage_pool

    def prepare_without_maps(self) -> Any:
        """The session of the graph without the map nodes (built once, thread-safe): every output but
        `MAP_OUTPUTS`, from the bytes whose sha256 was verified at load (IntegrityError if the file changed
        since)."""
        with self._lock:
            if self._without_maps is None:
                self._without_maps = self._build_without_maps()
            return self._without_maps

    def _build_without_maps(self) -> Any:
        import onnx
        import onnx.utils

        data = self.path.read_bytes()
        if self.file_sha256 is not None and hashlib.sha256(data).hexdigest() != self.file_sha256:
            raise IntegrityError(f"{self.path.name} changed on disk since it was verified and loaded")
        keep = [n for n in self.output_names if n not in MAP_OUTPUTS]
        pruned = onnx.utils.Extractor(onnx.load_from_string(data)).extract_model([INPUT_NAME], keep)
        ort = _import_ort()
        opts = _session_options(ort, self._threads, self._optimization)
        return ort.InferenceSession(pruned.SerializeToString(), sess_options=opts, providers=self.providers)


def weights_sha256(model_dir: Path) -> str:
    """The sha256 of the folder's weights, checked against their sidecar when there is one."""
    weights = model_dir / WEIGHTS_NAME
    if not weights.is_file():
        raise ModelNotFoundError(f"no {WEIGHTS_NAME} in {model_dir}")

    expected = {f"the sidecar {weights.name}.sha256": read_sidecar(weights)}
    return verify(weights, expected, sha256_file(weights))
