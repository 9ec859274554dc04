"""The BentoML services: `cthub` (the HTTP API and the demo at /ui) and `cthub-inference` (the ONNX model
behind adaptive batching), which `bentoml serve serving.entry:CTHubService` starts together.

    POST /predict          one DICOM -> label, probabilities, decision, OOD verdict, model, timing (cam=true:
                           the class activation map as a PNG overlay)
    POST /predict_series   DICOM files and/or zips of one series -> slices in anatomical order + series result
    POST /predict_image    a PNG/JPEG slice already windowed for display -> the same answer as /predict
    POST /report           the series analysis as a DICOM Comprehensive SR (application/dicom)
    POST /predict_batched  several independent DICOM slices -> one answer each
    GET|POST /model        the served model: identity, labels, preprocessing, thresholds, card metrics
    GET /readyz /livez /healthz /metrics /docs.json   (BentoML)

The API service decodes and preprocesses (`serving.analysis.Analyzer`); model inputs go to the inference
service, where concurrent requests are merged into one forward pass (max batch / max latency
configurable). Settings come from the environment (`serving.settings`): `build_services` declares the two
services from them (BentoML reads batching, workers, timeouts and CORS when a service is declared; its
entry point `serving.entry` calls it at start-up) and each service reads them again when it starts.
Importing this module changes no environment variable, creates no directory and reads no setting. User
errors are 4xx JSON `{error, type, detail}`; the gateway middleware (`serving.gateway`) adds auth, body
limits and the audit log.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, cast

import aiohttp
import bentoml
import numpy as np
from starlette.responses import JSONResponse, Response

from cthub.errors import CTHubError, ServiceBusyError, UnprocessableInputError
from export.session import quiet_onnxruntime_process
from serving.analysis import Analyzer, Options
from serving.audit import AUDIT_KEY, AuditLog
from serving.demo import DemoModel, asgi_app, build_demo
from serving.gateway import Gateway
from serving.inference import InferenceEngine, ServedModel, resolve_model_dir, verify_export
from serving.inputs import error_body, http_status, read_upload
from serving.settings import ServeSettings

log = logging.getLogger(__name__)
# BentoML's server logging config shows only its own logger at INFO; these packages log at INFO in a worker.
WORKER_LOGGERS = ("serving", "export", "hub", "ctdata")
QUIET_LOGGERS = ("highdicom",)  # may quote header values (patient data) in warnings
INFER_ATTEMPTS = 3
# the inter-service client's errors for a connection the server closed (BentoML's proxy uses aiohttp)
STALE_CONNECTION_ERRORS = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionResetError)
DicomFile = Annotated[Path, bentoml.validators.ContentType("application/dicom")]  # the /report answer (docs)
SINGLE_IMAGE_ROUTES = ("/predict", "/predict_image", "/model")
SERIES_ROUTES = ("/predict_series", "/report", "/predict_batched")


def served_demo_model() -> DemoModel:
    """The mounted demo's default model: this API worker's own service (`bentoml.get_current_service`, set
    when the worker starts), so the demo's analyses go through the inference service's batched ONNX
    session like every REST request, instead of a second session in the API worker."""
    service = cast(ApiWorker, bentoml.get_current_service())
    return service.demo_model()


def configure_worker() -> None:
    """Process-wide settings of a serving worker (this module is its entry point): log levels of the
    project's loggers, quiet third-party loggers, ONNX Runtime's process logger and telemetry."""
    for name in WORKER_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="highdicom")
    warnings.filterwarnings("ignore", module="pydicom")
    quiet_onnxruntime_process()


def stop_server_after_startup_failure() -> None:
    """Inside a BentoML worker, ask the serving process to shut down instead of respawning us forever."""
    if bentoml.server_context.worker_index is not None:
        os.kill(os.getppid(), signal.SIGTERM)


def fail_start(what: str, err: CTHubError) -> None:
    log.error("cthub: cannot start the %s: %s", what, err)
    stop_server_after_startup_failure()


class InferenceWorker:
    """The exported ONNX classifier; concurrent requests are batched into one forward pass (`build_services`
    adds the batchable `infer` endpoint, whose batch size and latency budget are settings)."""

    def __init__(self) -> None:
        configure_worker()
        settings = ServeSettings.from_env()
        try:
            self.engine = InferenceEngine.open(settings)
        except CTHubError as e:
            fail_start("inference service", e)
            raise
        ident = self.engine.classifier.identity
        log.info(
            "cthub: serving %s (onnx %s, %s)", ident["name"], settings.variant, ", ".join(ident["providers"])
        )

    @bentoml.api
    def describe(self) -> dict[str, Any]:
        """Identity, config, labels, OOD threshold and outputs of the loaded model."""
        return self.engine.describe()


def _with_demo(cls: type, settings: ServeSettings) -> type:
    """Mount the Gradio demo at /ui unless the operator turned it off (CTHUB_DEMO=0)."""
    if not settings.demo:
        return cls
    return bentoml.asgi_app(asgi_app(build_demo(served_demo_model)), path="/ui", name="demo")(cls)


def _json_error(ctx: bentoml.Context, err: CTHubError, audit: dict[str, Any]) -> JSONResponse:
    """The 4xx JSON answer of a user error (BentoML applies `ctx.response.status_code` to the response)."""
    body = error_body(err)
    audit["error"] = body.get("reason", body["error"])  # a code, never the message
    ctx.response.status_code = http_status(err)
    return JSONResponse(body, status_code=ctx.response.status_code)


class ApiWorker:
    """CT slice and series classification with one exported model (see the module docstring)."""

    inference: Any  # `bentoml.depends` on the inference service, set by `build_services`

    def __init__(self) -> None:
        configure_worker()
        self.settings = ServeSettings.from_env()
        try:
            # the inference service verifies too; failing here as well stops the server at once (a failing
            # dependency alone leaves this worker draining for the traffic timeout)
            verify_export(resolve_model_dir(self.settings.model), self.settings.variant)
        except CTHubError as e:
            fail_start("API service", e)
            raise
        self._served: ServedModel | None = None
        self._lock = threading.Lock()

    def served(self) -> ServedModel:
        """The inference service's model: its description (asked once, on first use) and `_infer`."""
        with self._lock:
            if self._served is None:
                self._served = ServedModel.from_description(self.inference.describe(), self._infer)
            return self._served

    def demo_model(self) -> DemoModel:
        """The served model as the mounted demo analyses with it: through `_infer`, like the REST API."""
        return DemoModel(resolve_model_dir(self.settings.model), self.served())

    def _infer(self, batch: np.ndarray) -> list[dict[str, Any]]:
        """The inference service's outputs for a batch. A pooled connection the inference server closed
        while idle (keep-alive timeout) fails on reuse: the call is retried (inference is idempotent)."""
        for attempt in range(INFER_ATTEMPTS):
            try:
                return list(self.inference.infer(batch))
            except STALE_CONNECTION_ERRORS:
                if attempt + 1 == INFER_ATTEMPTS:
                    raise
                log.info("inference connection was closed by the server; retrying")
            except bentoml.exceptions.BentoMLException as e:
                if getattr(e, "error_code", None) == 503:
                    budget = self.settings.max_latency_ms
                    raise ServiceBusyError(
                        f"the model is busy beyond its {budget} ms budget; retry"
                    ) from None
                raise
        raise AssertionError("unreachable")

    def _call(self, ctx: bentoml.Context, work: Callable[[Analyzer, dict[str, Any]], Any]) -> Any:
        """Run `work(analyzer, audit)`; user errors become 4xx JSON, the audit details go to the gateway.
        An unexpected failure is logged by type and traceback only (exception messages may quote header
        values) and answered 500 in the API's error shape."""
        audit: dict[str, Any] = {}
        try:
            served = self.served()
            audit["model_sha256"] = served.sha256
            return work(Analyzer(self.settings, served), audit)
        except CTHubError as e:
            return _json_error(ctx, e, audit)
        except Exception as e:  # noqa: BLE001 -- a bug must not leak the upload through BentoML's log line
            log.error(
                "unexpected %s on %s:\n%s",
                type(e).__name__,
                ctx.request.url.path,
                "".join(traceback.format_tb(e.__traceback__)),
            )
            audit["error"] = "internal_error"
            ctx.response.status_code = 500
            body = {"error": "internal_error", "type": "InternalError", "detail": "the server failed"}
            return JSONResponse(body, status_code=500)
        finally:
            setattr(ctx.request.state, AUDIT_KEY, audit)

    @bentoml.api(route="/predict")
    def predict(
        self,
        file: Path,
        ctx: bentoml.Context,
        cam: bool = False,
        window: str | None = None,
        window_center: float | None = None,
        window_width: float | None = None,
        model: str | None = None,
    ) -> dict[str, Any]:
        """Classify one DICOM slice (multipart field `file`; the first frame of multi-frame objects).

        Answers {label, probabilities, decision, ood, model, preprocessing, warnings, image, timing_ms}, with
        `cam` {png_base64, class} when cam=true. Optional window preset or center/width (reported as a
        warning: the model was trained with its own mapping); `model` must name the served model if given.
        """
        opts = Options(cam, window, window_center, window_width)

        def work(a: Analyzer, audit: dict[str, Any]) -> dict[str, Any]:
            a.model.require(model)
            return a.predict_dicom(read_upload(file, self.settings.max_upload_bytes), opts, audit)

        return self._call(ctx, work)

    @bentoml.api(route="/predict_image")
    def predict_image(self, file: Path, ctx: bentoml.Context, cam: bool = False) -> dict[str, Any]:
        """Classify a PNG or JPEG of a slice already windowed for display (grey 0-255, not HU)."""

        def work(a: Analyzer, audit: dict[str, Any]) -> dict[str, Any]:
            return a.predict_picture(read_upload(file, self.settings.max_upload_bytes), Options(cam), audit)

        return self._call(ctx, work)

    @bentoml.api(route="/predict_series")
    def predict_series(self, files: list[Path], ctx: bentoml.Context) -> dict[str, Any]:
        """Classify one series: DICOM files and/or zips (multipart field `files`, repeatable).

        Answers {series, slices, model, preprocessing, warnings, other_series, rejected, skipped, timing_ms}:
        slices in anatomical order (position along the slice normal), the series result by the rule stated
        in `series.rule` (mean of each class's top-k slice probabilities). Objects of other series or
        modalities are listed in `other_series`, never mixed in; files are named by their upload index.
        """
        return self._call(ctx, lambda a, audit: a.analyse_series(list(files), audit)[0])

    @bentoml.api(route="/report")
    def report(self, files: list[Path], ctx: bentoml.Context) -> DicomFile:
        """The /predict_series analysis as a DICOM Comprehensive SR (TID 1500), `application/dicom`.

        References the source study, series and instances; the model's identity is in the Contributing
        Equipment Sequence; VerificationFlag UNVERIFIED; "NOT FOR DIAGNOSTIC USE" series description.
        """

        def work(a: Analyzer, audit: dict[str, Any]) -> Response:
            try:
                body = a.report(list(files), audit)
            except CTHubError:
                raise
            except Exception as e:  # noqa: BLE001 -- the SR writer fails only on what the headers hold
                raise UnprocessableInputError(
                    f"no valid report can be written for these images ({type(e).__name__})"
                ) from None
            return Response(
                body,
                media_type="application/dicom",
                headers={"Content-Disposition": 'attachment; filename="cthub-report.dcm"'},
            )

        return self._call(ctx, work)  # a Response passes through BentoML

    @bentoml.api(route="/predict_batched")
    def predict_batched(self, files: list[Path], ctx: bentoml.Context) -> list[dict[str, Any]]:
        """Several independent DICOM slices (multipart field `files`) -> one answer each, in order; a file
        that cannot be used gives {error, type, detail, status} in its place."""

        def work(a: Analyzer, audit: dict[str, Any]) -> list[dict[str, Any]]:
            blobs: list[bytes | CTHubError] = []
            for f in files:
                try:
                    blobs.append(read_upload(f, self.settings.max_upload_bytes))
                except CTHubError as e:
                    blobs.append(e)
            return a.predict_many(blobs, audit)

        return self._call(ctx, work)

    @bentoml.api(route="/model")
    def model_info(self, ctx: bentoml.Context) -> dict[str, Any]:
        """The served model (also as GET): identity, labels, preprocessing, operating point, OOD threshold
        and the metrics of its model card."""
        return self._call(ctx, lambda a, audit: a.model.card())


def build_services(settings: ServeSettings) -> bentoml.Service[Any]:
    """The API service `cthub` and the inference service it depends on, configured by `settings` (BentoML
    reads workers, threads, timeouts, batching and CORS when a service is declared), with the demo at /ui
    and the gateway middleware (auth, body limits, audit log)."""

    max_batch, max_latency = settings.max_batch, settings.max_latency_ms

    class InferenceService(InferenceWorker):
        __doc__ = InferenceWorker.__doc__

        @bentoml.api(batchable=True, max_batch_size=max_batch, max_latency_ms=max_latency)
        def infer(self, inputs: np.ndarray) -> list[dict[str, Any]]:
            """Model inputs [B, C, S, S] float32 -> per-slice outputs (probabilities, cam, ood score...)."""
            return self.engine.run(inputs)

    inference_service = bentoml.service(
        name="cthub-inference", workers=1, traffic={"timeout": settings.request_timeout_s}
    )(InferenceService)

    class CTHubService(ApiWorker):
        __doc__ = ApiWorker.__doc__
        inference = bentoml.depends(inference_service)

    api = bentoml.service(
        name="cthub",
        workers=settings.api_workers,
        threads=settings.api_threads,  # sync endpoints: requests decode while others wait for the model
        traffic={"timeout": settings.request_timeout_s},
        http=settings.http_config(),
    )(_with_demo(CTHubService, settings))
    api.add_asgi_middleware(
        Gateway,
        token=settings.api_token,
        audit=AuditLog(settings.audit_salt),
        limits={r: settings.max_upload_bytes for r in SINGLE_IMAGE_ROUTES}
        | {r: settings.max_series_bytes for r in SERIES_ROUTES},
        default_limit=settings.max_upload_bytes,
        api_paths=frozenset(SINGLE_IMAGE_ROUTES + SERIES_ROUTES),
    )
    return api
