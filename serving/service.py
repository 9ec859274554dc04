"""The BentoML service: `POST /predict` (DICOM upload -> JSON), `POST /predict_batched` (adaptive batching),
BentoML's health/metrics/docs endpoints, and the Gradio demo at /ui.

The model folder comes from $CTHUB_SERVE_MODEL (a path or a local hub name), read when the service starts,
never at import: `bentoml build` and tests can import this module without a model. User errors become 4xx
JSON with the `CTHubError.to_dict()` body; nothing a client sends can crash the worker.

    CTHUB_SERVE_MODEL=models/organamnist-demo bentoml serve serving.service:CTHubService
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

import bentoml
from starlette.responses import JSONResponse

from cthub.errors import CTHubError, ModelNotFoundError
from serving.demo import build_demo, prepare_for_mount
from serving.predictor import (
    BACKEND_ENV,
    MODEL_ENV,
    PayloadTooLargeError,
    Predictor,
    get_predictor,
    max_upload_bytes,
)

log = logging.getLogger(__name__)
MAX_BATCH = 16
# BentoML answers 503 when it predicts a batch will miss this; ResNet50 at 224 px on a few CPU cores needs seconds.
BATCH_MAX_LATENCY_MS = int(v) if (v := os.environ.get("CTHUB_BATCH_MAX_LATENCY_MS", "")).isdigit() else 20000


def predictor_from_env() -> Predictor:
    """The Predictor named by $CTHUB_SERVE_MODEL / $CTHUB_SERVE_BACKEND (cached per process)."""
    return get_predictor(os.environ.get(MODEL_ENV, ""), os.environ.get(BACKEND_ENV, "auto"))


def error_response(err: CTHubError) -> JSONResponse:
    return JSONResponse(err.to_dict(), status_code=err.http_status)


def read_upload(path: Path) -> bytes:
    size = path.stat().st_size
    if size > max_upload_bytes():
        raise PayloadTooLargeError(f"upload of {size / 2**20:.1f} MB exceeds the limit of "
                                   f"{max_upload_bytes() / 2**20:.0f} MB")
    return path.read_bytes()


def stop_server_after_startup_failure() -> None:
    """Inside a BentoML worker, ask the serving process to shut down instead of respawning us forever."""
    from bentoml._internal.context import server_context

    if server_context.worker_index is not None:
        os.kill(os.getppid(), signal.SIGTERM)


@bentoml.service(name="cthub", traffic={"timeout": 120}, workers=1)
@bentoml.gradio.mount_gradio_app(prepare_for_mount(build_demo(predictor_from_env)), path="/ui")
class CTHubService:
    """Classifies uploaded CT slices with one model folder."""

    def __init__(self) -> None:
        try:
            self.predictor = predictor_from_env()
        except CTHubError as e:
            log.error("cthub: cannot start the service: %s", e)
            stop_server_after_startup_failure()
            raise
        log.info("cthub: serving %s (%s, %s)", self.predictor.config.name, self.predictor.backend,
                 ", ".join(self.predictor.providers))

    @bentoml.api(route="/predict")
    def predict(self, file: Path, window: str | None = None, window_center: float | None = None,
                window_width: float | None = None, model: str | None = None) -> dict[str, Any]:
        """Classify one DICOM upload (multipart field `file`); optional window preset or center/width override.

        Returns {label, probabilities, model, preprocessing, warnings, image}; user errors give 4xx JSON.
        """
        p = self.predictor
        try:
            if model and model not in (p.config.name, p.info["version"], p.sha256):
                raise ModelNotFoundError(f"model {model!r} is not served here; this server serves "
                                         f"{p.config.name!r}")
            pred = p.predict(read_upload(file), window=window, center=window_center, width=window_width)
        except CTHubError as e:
            return error_response(e)  # type: ignore[return-value]
        return pred.to_json(p.info)

    @bentoml.api(route="/predict_batched", batchable=True, max_batch_size=MAX_BATCH,
                 max_latency_ms=BATCH_MAX_LATENCY_MS)
    def predict_batched(self, files: list[Path]) -> list[dict[str, Any]]:
        """One or more DICOM uploads (multipart field `files`, repeatable) -> one result per file, in order.

        Uses the model's own preprocessing; concurrent requests are merged into one forward pass (adaptive
        batching). A file that cannot be used gives an item {error, type, detail, status} in its place.
        """
        p = self.predictor
        data: list[bytes | CTHubError] = []
        for f in files:
            try:
                data.append(read_upload(f))
            except CTHubError as e:
                data.append(e)
        results = iter(p.predict_many([d for d in data if isinstance(d, bytes)]))
        out: list[Any] = []
        for d in data:
            r = d if isinstance(d, CTHubError) else next(results)
            out.append(r.to_dict() | {"status": r.http_status} if isinstance(r, CTHubError) else r.to_json(p.info))
        return out

    @bentoml.api(route="/model")
    def model_info(self) -> dict[str, Any]:
        """The served model: name, version, sha256, backend, labels, preprocessing, metrics."""
        p = self.predictor
        return p.info | {"preprocessing": p.config.preprocessing.to_dict(), "metrics": p.config.metrics,
                         "threshold": p.config.threshold}
