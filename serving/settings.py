"""Serving settings: every operator choice, read once from the environment into a frozen dataclass.

BentoML reads batching, timeout, CORS and worker settings when a service is declared, so the BentoML entry
point (`serving.entry`) declares the services from `ServeSettings.from_env()` at start-up; everything else
is read by the services when they start. Nothing here loads a model.

| variable | default | meaning |
|---|---|---|
| CTHUB_SERVE_MODEL | (required to serve) | model folder or local hub name |
| CTHUB_SERVE_VARIANT | fp32 | ONNX file: fp32 (model.onnx) or int8 (model.int8.onnx) |
| CTHUB_SERVE_ALSO | (none) | more model folders served beside it, comma-separated (`model=` selects one) |
| CTHUB_INFERENCE | in-process | where the model runs: in-process (each API worker) or service (one shared) |
| CTHUB_FORWARD_THREADS | 1 | in-process: passes run at once (2 x 1 thread: more img/s, slower alone) |
| CTHUB_ORT_THREADS | CPUs / forward threads | intra-op threads of each forward pass |
| CTHUB_BATCH_MAX_SIZE | 16 | adaptive batching: most slices in one forward pass |
| CTHUB_BATCH_MAX_LATENCY_MS | 30000 | adaptive batching: latency budget (waited longer: 503) |
| CTHUB_API_WORKERS | 1 | API worker processes (decode + preprocessing run there) |
| CTHUB_API_THREADS | 32 | requests one API worker handles at once (while some wait for the model) |
| CTHUB_MAX_UPLOAD_MB | 64 | request body limit of the one-image endpoints (413) |
| CTHUB_MAX_SERIES_MB | 1024 | request body and unzipped limit of /predict_series and /report (413) |
| CTHUB_MAX_SLICES | 2000 | most slices in one series request (413) |
| CTHUB_MAX_PIXELS | 67108864 | most pixels one image may declare (413, checked before decoding) |
| CTHUB_ALLOW_MODALITIES | CT | accepted DICOM modalities, comma-separated (others: 422) |
| CTHUB_REQUEST_TIMEOUT_S | 120 | BentoML request timeout |
| CTHUB_CORS_ORIGINS | (off) | comma-separated origins allowed by CORS, `*` for any |
| CTHUB_API_TOKEN / CTHUB_API_TOKEN_FILE | (off) | bearer token required on every endpoint but health |
| CTHUB_AUDIT_SALT / CTHUB_AUDIT_SALT_FILE | random per process | salt of the UID hashes in the audit log |
| CTHUB_SERIES_TOP_K | 3 | series score of a class: mean of its k highest slice probabilities |
| CTHUB_SERIES_OOD_SHARE | 0.1 | series out of distribution: this share of its slices (at least one) is |
| CTHUB_DEMO | 1 | mount the Gradio demo at /ui (0: off); uploads: a private 0700 dir, deleted once read |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cthub.errors import ConfigError

MODEL_ENV = "CTHUB_SERVE_MODEL"
ALSO_ENV = "CTHUB_SERVE_ALSO"
VARIANT_ENV = "CTHUB_SERVE_VARIANT"
VARIANTS = ("fp32", "int8")
# Where the model runs. in-process: each API worker holds the ONNX sessions and batches its own requests
# (serving.batching), no second process and no hop (measured faster on a small machine:
# docs/results/bench-224px.md); service: one BentoML inference service behind adaptive batching, shared by
# every API worker (one copy of the model however many workers decode).
INFERENCE_MODES = ("in-process", "service")
INFERENCE_ENV = "CTHUB_INFERENCE"
BACKENDS = ("auto", "onnx", "torch")  # serving.inference.open_classifier's backends (`cthub demo`)
MB = 2**20
# A series is out of distribution when this share of its scored slices is (serving.results.series_ood); the
# measurement behind the value: docs/results/ood-shifts.md.
DEFAULT_SERIES_OOD_SHARE = 0.1
# Environment every serving process starts with unless the operator set it (`serving.entry`): telemetry off,
# two glibc malloc arenas (bounded RSS of the API worker's request threads).
PROCESS_ENV_DEFAULTS: dict[str, str] = {
    "BENTOML_DO_NOT_TRACK": "True",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "ORT_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "MALLOC_ARENA_MAX": "2",
}


def _number(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    raw = env.get(name, "")
    if raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum:g}, got {raw!r}")
    return value


def _secret(env: Mapping[str, str], name: str) -> str | None:
    """A secret from $NAME or from the file named by $NAME_FILE (whitespace stripped); None when unset."""
    value, path = env.get(name, ""), env.get(name + "_FILE", "")
    if value and path:
        raise ConfigError(f"set {name} or {name}_FILE, not both")
    if path:
        try:
            value = Path(path).read_text().strip()
        except OSError as e:
            raise ConfigError(f"{name}_FILE cannot be read ({type(e).__name__})") from None
        if not value:
            raise ConfigError(f"{name}_FILE names an empty file")
    return value.strip() or None


def _csv(env: Mapping[str, str], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = env.get(name)
    if raw is None:
        return default
    return tuple(p.strip() for p in raw.split(",") if p.strip())


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: taskset, cgroup cpusets), else the CPU count.
    ONNX Runtime's own default counts the machine's cores and oversubscribes a restricted process."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True)
class ServeSettings:
    """What the operator chose (see the module docstring for the environment variables)."""

    model: str = ""
    variant: str = "fp32"
    also: tuple[str, ...] = ()  # more model folders served beside `model` (each its `variant` if exported)
    inference: str = "in-process"  # INFERENCE_MODES
    forward_threads: int = 1  # in-process: passes run at once, each on ort_threads
    ort_threads: int | None = None
    max_batch: int = 16
    max_latency_ms: int = 30000
    api_workers: int = 1
    api_threads: int = 32
    max_upload_bytes: int = 64 * MB
    max_series_bytes: int = 1024 * MB
    max_slices: int = 2000
    max_pixels: int = 4096 * 4096 * 4
    allowed_modalities: tuple[str, ...] = ("CT",)
    request_timeout_s: float = 120.0
    cors_origins: tuple[str, ...] = ()
    api_token: str | None = field(default=None, repr=False)
    audit_salt: str | None = field(default=None, repr=False)
    series_top_k: int = 3
    series_ood_share: float = DEFAULT_SERIES_OOD_SHARE
    demo: bool = True

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"{VARIANT_ENV} must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.inference not in INFERENCE_MODES:
            modes = ", ".join(INFERENCE_MODES)
            raise ConfigError(f"{INFERENCE_ENV} must be one of {modes}, got {self.inference!r}")
        if not 0.0 < self.series_ood_share <= 1.0:
            raise ConfigError(f"CTHUB_SERIES_OOD_SHARE must be in (0, 1], got {self.series_ood_share}")
        if self.max_batch < 2:
            raise ConfigError("CTHUB_BATCH_MAX_SIZE must be at least 2 (1 disables nothing: use 2)")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServeSettings:
        """Settings from `env` (default: os.environ); ConfigError names the variable that is wrong."""
        e = os.environ if env is None else env
        forward = int(_number(e, "CTHUB_FORWARD_THREADS", 1, 1))
        threads = int(_number(e, "CTHUB_ORT_THREADS", 0)) or max(1, usable_cpus() // forward)
        return cls(
            model=e.get(MODEL_ENV, ""),
            variant=e.get(VARIANT_ENV, "fp32").strip().lower() or "fp32",
            also=_csv(e, ALSO_ENV, ()),
            inference=e.get(INFERENCE_ENV, "in-process").strip().lower() or "in-process",
            forward_threads=forward,
            ort_threads=threads or None,
            max_batch=int(_number(e, "CTHUB_BATCH_MAX_SIZE", 16, 2)),
            max_latency_ms=int(_number(e, "CTHUB_BATCH_MAX_LATENCY_MS", 30000, 1)),
            api_workers=int(_number(e, "CTHUB_API_WORKERS", 1, 1)),
            api_threads=int(_number(e, "CTHUB_API_THREADS", 32, 1)),
            max_upload_bytes=int(_number(e, "CTHUB_MAX_UPLOAD_MB", 64) * MB),
            max_series_bytes=int(_number(e, "CTHUB_MAX_SERIES_MB", 1024) * MB),
            max_slices=int(_number(e, "CTHUB_MAX_SLICES", 2000, 1)),
            max_pixels=int(_number(e, "CTHUB_MAX_PIXELS", 4096 * 4096 * 4, 1)),
            allowed_modalities=tuple(m.upper() for m in _csv(e, "CTHUB_ALLOW_MODALITIES", ("CT",))),
            request_timeout_s=_number(e, "CTHUB_REQUEST_TIMEOUT_S", 120.0, 1),
            cors_origins=_csv(e, "CTHUB_CORS_ORIGINS", ()),
            api_token=_secret(e, "CTHUB_API_TOKEN"),
            audit_salt=_secret(e, "CTHUB_AUDIT_SALT"),
            series_top_k=int(_number(e, "CTHUB_SERIES_TOP_K", 3, 1)),
            series_ood_share=_number(e, "CTHUB_SERIES_OOD_SHARE", DEFAULT_SERIES_OOD_SHARE),
            demo=e.get("CTHUB_DEMO", "1").strip().lower() not in ("0", "false", "no", "off"),
        )

    def http_config(self) -> dict[str, object]:
        """BentoML's `http` service option: CORS when origins are configured (GET/POST, bearer header)."""
        if not self.cors_origins:
            return {}
        return {
            "cors": {
                "enabled": True,
                "access_control_allow_origins": list(self.cors_origins),
                "access_control_allow_methods": ["GET", "POST", "OPTIONS"],
                "access_control_allow_headers": ["Authorization", "Content-Type"],
                "access_control_max_age": 600,
            }
        }
