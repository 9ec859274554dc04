"""The BentoML service: `POST /predict` (DICOM upload -> JSON), `POST /predict_batched` (adaptive batching),
`/model`, BentoML's health/metrics/docs endpoints, and the Gradio demo at /ui.

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

from cthub.errors import CTHubError
from serving.demo import asgi_app, build_demo
from serving.predictor import BACKEND_ENV, MODEL_ENV, Predictor, get_predictor

log = logging.getLogger(__name__)
MAX_BATCH = 16
# BentoML answers 503 when it predicts a batch will miss this; ResNet50 at 224 px on a few CPU cores needs
# seconds.
BATCH_MAX_LATENCY_MS = int(v) if (v := os.environ.get("CTHUB_BATCH_MAX_LATENCY_MS", "")).isdigit() else 20000
# BentoML's server logging config shows only its own logger at INFO; these packages log at INFO in a worker.
WORKER_LOGGERS = ("serving", "export", "hub", "ctdata")


def predictor_from_env() -> Predictor:
    """The Predictor named by $CTHUB_SERVE_MODEL / $CTHUB_SERVE_BACKEND (cached per process)."""
    return get_predictor(os.environ.get(MODEL_ENV, ""), os.environ.get(BACKEND_ENV, "auto"))


def error_response(err: CTHubError) -> JSONResponse:
    return JSONResponse(err.to_dict(), status_code=err.http_status)


def configure_worker() -> None:
    """Process-wide settings of a serving worker (this module is its entry point): log levels of the
    project's loggers, and ONNX Runtime's process logger/telemetry (see `quiet_onnxruntime_process`)."""
    from export.session import quiet_onnxruntime_process

    for name in WORKER_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    quiet_onnxruntime_process()


def stop_server_after_startup_failure() -> None:
    """Inside a BentoML worker, ask the serving process to shut down instead of respawning us forever."""
    if bentoml.server_context.worker_index is not None:
        os.kill(os.getppid(), signal.SIGTERM)


@bentoml.service(name="cthub", traffic={"timeout": 120}, workers=1)
@bentoml.asgi_app(asgi_app(build_demo(predictor_from_env)), path="/ui", name="demo")
class CTHubService:
    """Classifies uploaded CT slices with one model folder."""

    def __init__(self) -> None:
        configure_worker()
        try:
            self.predictor = predictor_from_env()
        except CTHubError as e:
            log.error("cthub: cannot start the service: %s", e)
            stop_server_after_startup_failure()
            raise
        p = self.predictor
        log.info("cthub: serving %s (%s, %s)", p.config.name, p.backend, ", ".join(p.providers))

    @bentoml.api(route="/predict")
    def predict(
        self,
        file: Path,
        window: str | None = None,
        window_center: float | None = None,
        window_width: float | None = None,
        model: str | None = None,
    ) -> dict[str, Any]:
        """Classify one DICOM upload (multipart field `file`); optional window preset or center/width.

        Returns {label, probabilities, model, preprocessing, warnings, image}; user errors give 4xx JSON.
        """
        p = self.predictor
        try:
            p.require_model(model)
            pred = p.predict(file, window=window, center=window_center, width=window_width)
        except CTHubError as e:
            return error_response(e)  # type: ignore[return-value]
        return pred.to_json(p.info)

    @bentoml.api(
        route="/predict_batched",
        batchable=True,
        max_batch_size=MAX_BATCH,
        max_latency_ms=BATCH_MAX_LATENCY_MS,
    )
    def predict_batched(self, files: list[Path]) -> list[dict[str, Any]]:
        """One or more DICOM uploads (multipart field `files`, repeatable) -> one result per file, in order.

        Uses the model's own preprocessing; concurrent requests are merged into one forward pass (adaptive
        batching). A file that cannot be used gives an item {error, type, detail, status} in its place.
        """
        p = self.predictor
        results = p.predict_many(list(files))
        usable = sum(not isinstance(r, CTHubError) for r in results)
        log.info("predict_batched: batch of %d uploads, %d usable, one forward pass", len(results), usable)
        return [
            r.to_dict() | {"status": r.http_status} if isinstance(r, CTHubError) else r.to_json(p.info)
            for r in results
        ]

    @bentoml.api(route="/model")
    def model_info(self) -> dict[str, Any]:
        """The served model: name, version, sha256, backend, labels, preprocessing, metrics."""
        p = self.predictor
        return p.info | {
            "preprocessing": p.config.preprocessing.to_dict(),
            "metrics": p.config.metrics,
            "threshold": p.config.threshold,
        }
