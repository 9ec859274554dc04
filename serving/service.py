"""The BentoML services: `cthub` (the HTTP API and the demo at /ui), which `bentoml serve
serving.entry:CTHubService` starts, and, in the two-service layout, `cthub-inference` (the ONNX model behind
BentoML's adaptive batching) beside it.

    POST /predict          one DICOM -> label, probabilities, decision, OOD verdict, model, timing (cam=true:
                           the class activation map as a PNG overlay)
    POST /predict_series   DICOM files and/or zips of one series -> slices in anatomical order + series result
    POST /predict_image    a PNG/JPEG slice already windowed for display -> the same answer as /predict
    POST /report           the series analysis as a DICOM Comprehensive SR (application/dicom)
    POST /predict_batched  several independent DICOM slices -> one answer each
    GET|POST /model        the served model: identity, labels, preprocessing, thresholds, card metrics, and
                           `served_models`, every model this server serves
    GET /readyz /livez /healthz /metrics /docs.json   (BentoML)

The API service decodes and preprocesses (`serving.analysis.Analyzer`). Where the model runs is a setting
(CTHUB_INFERENCE): `in-process` (the default) keeps the ONNX sessions in the API worker, whose one
forward-pass thread merges concurrent requests (`serving.batching`); `service` sends the model inputs to
the inference service, where BentoML's batcher merges them, one copy of the model for every API worker.
Either way max batch and max latency are settings. More models can be served beside the default one
(`CTHUB_SERVE_ALSO`, `cthub serve --also`): each has its own ONNX session, and a `model` field (its name,
version or sha256) on /predict, /predict_image, /predict_series and /model selects it; without it the
default model answers, and a name that is not served is a 404. Settings come from the environment
(`serving.settings`): `build_services` declares the service(s) from them (BentoML reads batching, workers,
timeouts and CORS when a service is declared; its entry point `serving.entry` calls it at start-up) and
each service reads them again when it starts.
Importing this module changes no environment variable, creates no directory and reads no setting. User
errors are 4xx JSON `{error, type, detail}`; the gateway middleware (`serving.gateway`) adds auth, body
limits and the audit log.
"""

from __future__ import annotations

import dataclasses
import functools
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

from cthub.errors import CTHubError, ModelNotFoundError, ServiceBusyError, UnprocessableInputError
from export.session import quiet_onnxruntime_process
from serving.analysis import Analyzer, Options
from serving.audit import AUDIT_KEY, AuditLog
from serving.batching import ForwardQueue
from serving.demo import DemoModel, asgi_app, build_demo
from serving.gateway import Gateway
from serving.inference import InferenceEngine, ServedModel, resolve_model_dir, verify_export
from serving.inputs import error_body, http_status, input_expectation, parse_region, read_upload
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


def served_demo_models() -> list[DemoModel]:
    """The mounted demo's models, the default first: this API worker's own service
    (`bentoml.get_current_service`, set when the worker starts), so the demo's analyses go through the
    server's batched ONNX sessions like every REST request, instead of second sessions of its own."""
    service = cast(ApiWorker, bentoml.get_current_service())
    return service.demo_models()


def also_settings(settings: ServeSettings) -> list[ServeSettings]:
    """The settings of each model served beside the default one: its folder, and the default's variant
    when that file was exported for it, else fp32 (quickstart keeps int8 only within tolerance)."""
    out = []
    for folder in settings.also:
        model_dir = resolve_model_dir(folder)
        variant = settings.variant
        if variant != "fp32":
            try:
                verify_export(model_dir, variant)
            except CTHubError:
                log.info("cthub: %s has no usable %s export; serving its fp32 one", model_dir.name, variant)
                variant = "fp32"
        out.append(dataclasses.replace(settings, model=str(model_dir), variant=variant, also=()))
    return out


def model_summary(served: ServedModel) -> dict[str, Any]:
    """One line of /model's `served_models`: what selects it and what it expects."""
    cfg = served.config
    return {
        "name": served.identity.get("name"),
        "version": served.identity.get("version"),
        "sha256": served.sha256,
        "variant": served.identity.get("variant"),
        "task": cfg.task,
        "labels": served.labels,
        "input_size": cfg.preprocessing.input_size,
        "input_expectation": input_expectation(cfg.metrics, cfg.provenance),
    }


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


def open_engines(settings: ServeSettings, what: str) -> list[InferenceEngine]:
    """The verified ONNX engines of the default model and of each model served beside it, in that order;
    a model that cannot be served stops the server (`what` names the service in the log line)."""
    try:
        engines = [InferenceEngine.open(s) for s in [settings, *also_settings(settings)]]
    except CTHubError as e:
        fail_start(what, e)
        raise
    for engine in engines:
        clf = engine.classifier
        ident = clf.identity
        variant = getattr(clf, "variant", "fp32")
        log.info("cthub: serving %s (onnx %s, %s)", ident["name"], variant, ", ".join(ident["providers"]))
    return engines


def forward_pass_metric(max_batch: int) -> Any:
    """`cthub_forward_batch_size` on /metrics: the slices of each forward pass the API worker ran, by
    model and by pass (with or without the maps); its count is the number of passes. In the two-service
    layout BentoML's own `bentoml_service_adaptive_batch_size` says the same for the inference service.
    Made when the worker starts (bentoml.metrics: multiprocess-safe)."""
    buckets = sorted({1, 2, 4, 8, 16, 32, 64, max_batch})
    return bentoml.metrics.Histogram(
        name="cthub_forward_batch_size",
        documentation="slices in each forward pass of the served model (in-process inference)",
        labelnames=["model", "maps"],
        buckets=[b for b in buckets if b <= max_batch],
    )


class InferenceWorker:
    """The exported ONNX classifier; concurrent requests are batched into one forward pass (`build_services`
    adds the batchable `infer` endpoint, whose batch size and latency budget are settings)."""

    def __init__(self) -> None:
        configure_worker()
        self.engine, *self.others = open_engines(ServeSettings.from_env(), "inference service")

    @bentoml.api
    def describe(self) -> dict[str, Any]:
        """Identity, config, labels, OOD threshold and outputs of the loaded model."""
        return self.engine.describe()

    @bentoml.api
    def describe_others(self) -> list[dict[str, Any]]:
        """`describe` of each model served beside the default one, in `CTHUB_SERVE_ALSO`'s order."""
        return [e.describe() for e in self.others]

    @bentoml.api
    def infer_other(self, index: int, inputs: np.ndarray, maps: bool = True) -> list[dict[str, Any]]:
        """Model inputs [B, C, S, S] of the `index`-th model beside the default one -> per-slice outputs
        (its own session, unbatched across requests: the adaptive batcher serves the default model); the
        class activation maps only with `maps`."""
        if not 0 <= index < len(self.others):
            raise ModelNotFoundError(f"no served model number {index}")
        return self.others[index].run(inputs, maps=maps)


def _with_demo(cls: type, settings: ServeSettings) -> type:
    """Mount the Gradio demo at /ui unless the operator turned it off (CTHUB_DEMO=0)."""
    if not settings.demo:
        return cls
    return bentoml.asgi_app(asgi_app(build_demo(served_demo_models)), path="/ui", name="demo")(cls)


def _json_error(ctx: bentoml.Context, err: CTHubError, audit: dict[str, Any]) -> JSONResponse:
    """The 4xx JSON answer of a user error (BentoML applies `ctx.response.status_code` to the response)."""
    body = error_body(err)
    audit["error"] = body.get("reason", body["error"])  # a code, never the message
    ctx.response.status_code = http_status(err)
    return JSONResponse(body, status_code=ctx.response.status_code)


class ApiWorker:
    """CT slice and series classification with one exported model (see the module docstring)."""

    inference: Any  # `bentoml.depends` on the inference service (CTHUB_INFERENCE=service), `build_services`

    def __init__(self) -> None:
        configure_worker()
        self.settings = ServeSettings.from_env()
        self._served: list[ServedModel] | None = None
        self._lock = threading.Lock()
        if self.settings.inference == "in-process":
            # the models in this worker, every forward pass through one batching thread
            engines = open_engines(self.settings, "API service")
            self._forward = ForwardQueue(
                self.settings.max_batch, self.settings.max_latency_ms, self.settings.forward_threads
            )
            passes = forward_pass_metric(self.settings.max_batch)
            self._served = []
            for e in engines:
                name = str(e.classifier.identity.get("name", ""))
                run = self._forward.bind(e.run, passes.labels(model=name, maps="true").observe)
                plain = self._forward.bind(
                    e.run_without_maps, passes.labels(model=name, maps="false").observe
                )
                self._served.append(ServedModel.from_description(e.describe(), run, plain))
            return
        try:
            # the inference service verifies too; failing here as well stops the server at once (a failing
            # dependency alone leaves this worker draining for the traffic timeout)
            verify_export(resolve_model_dir(self.settings.model), self.settings.variant)
            for other in also_settings(self.settings):
                verify_export(Path(other.model), other.variant)
        except CTHubError as e:
            fail_start("API service", e)
            raise

    def served_models(self) -> list[ServedModel]:
        """The served models, the default first: in this worker (in-process), or the inference service's,
        their descriptions asked once, on first use, with their inference calls."""
        with self._lock:
            if self._served is None:
                main = ServedModel.from_description(
                    self.inference.describe(), self._infer, self._infer_without_maps
                )
                others = [
                    ServedModel.from_description(
                        d,
                        functools.partial(self._infer_other, i, maps=True),
                        functools.partial(self._infer_other, i, maps=False),
                    )
                    for i, d in enumerate(self.inference.describe_others())
                ]
                self._served = [main, *others]
            return self._served

    def served(self, requested: str | None = None) -> ServedModel:
        """The model a request names (name, version or sha256), the default one when it names none; a
        404 naming the served models when no served model matches."""
        models = self.served_models()
        if not requested:
            return models[0]
        for m in models:
            if requested in (m.identity.get("name"), m.identity.get("version"), m.sha256):
                return m
        names = ", ".join(repr(m.identity.get("name")) for m in models)
        raise ModelNotFoundError(f"model {requested!r} is not served here; this server serves {names}")

    def demo_models(self) -> list[DemoModel]:
        """The served models as the mounted demo analyses with them: through the server's batched sessions."""
        folders = [self.settings.model, *self.settings.also]
        return [
            DemoModel(resolve_model_dir(f), m) for f, m in zip(folders, self.served_models(), strict=True)
        ]

    def _infer(self, batch: np.ndarray) -> list[dict[str, Any]]:
        """The default model's outputs for a batch, with the maps (the inference service's batcher)."""
        return self._with_retry(lambda: self.inference.infer(batch))

    def _infer_without_maps(self, batch: np.ndarray) -> list[dict[str, Any]]:
        """The default model's outputs without the maps (their own adaptive batcher)."""
        return self._with_retry(lambda: self.inference.infer_without_maps(batch))

    def _infer_other(self, index: int, batch: np.ndarray, maps: bool) -> list[dict[str, Any]]:
        """The outputs of the `index`-th model served beside the default one."""
        return self._with_retry(lambda: self.inference.infer_other(index, batch, maps))

    def _with_retry(self, call: Callable[[], Any]) -> list[dict[str, Any]]:
        """The inference service's answer. A pooled connection the inference server closed while idle
        (keep-alive timeout) fails on reuse: the call is retried (inference is idempotent)."""
        for attempt in range(INFER_ATTEMPTS):
            try:
                return list(call())
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

    def _call(
        self, ctx: bentoml.Context, work: Callable[[Analyzer, dict[str, Any]], Any], model: str | None = None
    ) -> Any:
        """Run `work(analyzer, audit)` with the model `model` names (the default one when None); user errors
        become 4xx JSON, the audit details go to the gateway.
        An unexpected failure is logged by type and traceback only (exception messages may quote header
        values) and answered 500 in the API's error shape."""
        audit: dict[str, Any] = {}
        try:
            served = self.served(model)
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
        region: str | None = None,
    ) -> dict[str, Any]:
        """Classify one DICOM slice (multipart field `file`; the first frame of multi-frame objects).

        Answers {label, probabilities, decision, ood, model, preprocessing, warnings, image, timing_ms}, with
        `cam` {png_base64, class} when cam=true. Optional window preset or center/width (reported as a
        warning: the model was trained with its own mapping); `model` selects a served model (name, version
        or sha256; default: the default model); `region` "x0,y0,x1,y1" classifies only that box of the image
        (a model trained on organ-centred crops warns when it is sent a whole slice).
        """

        def work(a: Analyzer, audit: dict[str, Any]) -> dict[str, Any]:
            opts = Options(cam, window, window_center, window_width, parse_region(region))
            return a.predict_dicom(read_upload(file, self.settings.max_upload_bytes), opts, audit)

        return self._call(ctx, work, model)

    @bentoml.api(route="/predict_image")
    def predict_image(
        self,
        file: Path,
        ctx: bentoml.Context,
        cam: bool = False,
        model: str | None = None,
        region: str | None = None,
    ) -> dict[str, Any]:
        """Classify a PNG or JPEG of a slice already windowed for display (grey 0-255, not HU); `model` and
        `region` as for /predict."""

        def work(a: Analyzer, audit: dict[str, Any]) -> dict[str, Any]:
            opts = Options(cam, region=parse_region(region))
            return a.predict_picture(read_upload(file, self.settings.max_upload_bytes), opts, audit)

        return self._call(ctx, work, model)

    @bentoml.api(route="/predict_series")
    def predict_series(
        self, files: list[Path], ctx: bentoml.Context, model: str | None = None
    ) -> dict[str, Any]:
        """Classify one series: DICOM files and/or zips (multipart field `files`, repeatable).

        Answers {series, slices, model, preprocessing, warnings, other_series, rejected, skipped, timing_ms}:
        slices in anatomical order (position along the slice normal), the series result by the rule stated
        in `series.rule` (mean of each class's top-k slice probabilities). Objects of other series or
        modalities are listed in `other_series`, never mixed in; files are named by their upload index.
        """
        return self._call(ctx, lambda a, audit: a.analyse_series(list(files), audit)[0], model)

    @bentoml.api(route="/report")
    def report(self, files: list[Path], ctx: bentoml.Context, model: str | None = None) -> DicomFile:
        """The /predict_series analysis as a DICOM Comprehensive SR (TID 1500), `application/dicom`.

        References the source study, series and instances; the model's identity is in the Contributing
        Equipment Sequence; VerificationFlag UNVERIFIED; "NOT FOR DIAGNOSTIC USE" series description.
        `model` selects a served model, as for /predict.
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

        return self._call(ctx, work, model)  # a Response passes through BentoML

    @bentoml.api(route="/predict_batched")
    def predict_batched(
        self,
        files: list[Path],
        ctx: bentoml.Context,
        model: str | None = None,
        region: str | None = None,
    ) -> list[dict[str, Any]]:
        """Several independent DICOM slices (multipart field `files`) -> one answer each, in order; a file
        that cannot be used gives {error, type, detail, status} in its place. `model` selects a served
        model and `region` "x0,y0,x1,y1" classifies that box of every slice, as for /predict."""

        def work(a: Analyzer, audit: dict[str, Any]) -> list[dict[str, Any]]:
            box = parse_region(region)
            blobs: list[bytes | CTHubError] = []
            for f in files:
                try:
                    blobs.append(read_upload(f, self.settings.max_upload_bytes))
                except CTHubError as e:
                    blobs.append(e)
            return a.predict_many(blobs, audit, box)

        return self._call(ctx, work, model)

    @bentoml.api(route="/model")
    def model_info(self, ctx: bentoml.Context, model: str | None = None) -> dict[str, Any]:
        """The served model (also as GET; `model` selects another served one): identity, labels,
        preprocessing, operating point, OOD threshold, the metrics of its model card, what input it
        expects (`input_expectation`, e.g. "organ-centred crop"), and `served_models`, every model served."""

        def work(a: Analyzer, audit: dict[str, Any]) -> dict[str, Any]:
            cfg = a.model.config
            return a.model.card() | {
                "input_expectation": input_expectation(cfg.metrics, cfg.provenance),
                "served_models": [model_summary(m) for m in self.served_models()],
            }

        return self._call(ctx, work, model)


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

        @bentoml.api(batchable=True, max_batch_size=max_batch, max_latency_ms=max_latency)
        def infer_without_maps(self, inputs: np.ndarray) -> list[dict[str, Any]]:
            """`infer` without the class activation maps (`cam` None): every request that does not ask
            for a map (cam=false, series, batches), so that it does not pay for the Grad-CAM nodes."""
            return self.engine.run(inputs, maps=False)

    attrs: dict[str, Any] = {"__doc__": ApiWorker.__doc__}
    if settings.inference == "service":  # else the API worker runs the model itself (serving.batching)
        attrs["inference"] = bentoml.depends(
            bentoml.service(
                name="cthub-inference", workers=1, traffic={"timeout": settings.request_timeout_s}
            )(InferenceService)
        )
    CTHubService = type("CTHubService", (ApiWorker,), attrs)  # type() calls the descriptors' __set_name__

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
