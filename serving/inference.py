"""The inference side of the API: the exported ONNX classifier behind a batchable BentoML service, and the
served model as every analysis sees it.

`InferenceEngine` runs batches of preprocessed slices [B, C, S, S] and answers one plain dict per slice
(calibrated probabilities, raw logits, class activation maps, out-of-distribution score, batch size, the
forward pass's wall and CPU time), so the answer travels between processes as built-in types.
`InferenceService` wraps it with BentoML's adaptive batching: concurrent requests of the API service are
merged into one forward pass.

`ServedModel` is what an analysis needs of a model: its description (`InferenceEngine.describe`: identity,
labels, config, OOD threshold) and `run`, the batched inference. In the API worker `run` is the inference
service, in-process (the PACS loop, `cthub demo`) an engine's own `run`, so the mounted demo and the REST
API share one batched ONNX session.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from cthub.errors import ConfigError, CTHubError, ModelNotFoundError
from export.classifier import Classifier, TorchClassifier
from export.exporter import matches_source
from export.integrity import ONNX_NAME, check_fresh, onnx_file, verify_onnx_file
from export.metadata import UNCALIBRATED
from export.session import OnnxClassifier, read_metadata, weights_sha256
from hub.config import WEIGHTS_NAME, ModelConfig
from hub.io import hub_dir, local_model_dir, sha256_file
from serving.report import ModelIdentity
from serving.settings import BACKENDS, MODEL_ENV, ServeSettings

log = logging.getLogger(__name__)

Infer = Callable[[np.ndarray], list[dict[str, Any]]]


def resolve_model_dir(name_or_path: str | Path | None) -> Path:
    """The model folder to serve: a path, or a local hub name or registry alias resolved as
    `hub.from_pretrained` resolves it (`hub.io.local_model_dir`); ModelNotFoundError with what was tried."""
    if not name_or_path:
        raise ModelNotFoundError(f"no model given: pass --model DIR (or set {MODEL_ENV})")
    found = local_model_dir(name_or_path)
    if found is None:
        raise ModelNotFoundError(
            f"model {str(name_or_path)!r} not found: no {WEIGHTS_NAME} + config.json at "
            f"{Path(name_or_path).expanduser()} or in the hub directory {hub_dir()}"
        )
    return found.resolve()


def verify_export(model_dir: Path, variant: str) -> Path:
    """The ONNX file of a variant after the checks `OnnxClassifier.from_model_dir` makes before loading
    (recorded checksum, exported from the folder's current weights and preprocessing), without creating a
    session: the CLI and the API service run it at start-up so a bad file stops the server at once."""
    path = onnx_file(model_dir, variant)
    verify_onnx_file(path)
    check_fresh(
        read_metadata(path), path, config=ModelConfig.load(model_dir), source_sha256=weights_sha256(model_dir)
    )
    return path


def open_classifier(model_dir: Path, backend: str = "auto", threads: int | None = None) -> Classifier:
    """The classifier of a model folder for `cthub demo`. auto: ONNX Runtime when model.onnx matches the
    weights and the preprocessing, else torch. The weights are hashed once (twice only when a stale
    model.onnx exists)."""
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


@dataclass(frozen=True)
class ServedModel:
    """A model as analyses use it: what `InferenceEngine.describe` says of it, and `run`, preprocessed
    slices [B, C, S, S] -> one `InferenceEngine.run` dict each; `run_without_maps` the same without the
    class activation maps (cheaper: the map nodes are not run), `run` itself where there is none."""

    identity: dict[str, Any]
    labels: list[str]
    config: ModelConfig
    ood_threshold: float | None
    has_cam: bool
    run: Infer
    ood_reference: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None  # export.metadata.served_calibration: the file's own
    run_without_maps: Infer | None = None

    @classmethod
    def from_description(
        cls, d: dict[str, Any], run: Infer, run_without_maps: Infer | None = None
    ) -> ServedModel:
        return cls(
            identity=dict(d["identity"]),
            labels=list(d["labels"]),
            config=ModelConfig.from_dict(d["config"]),
            ood_threshold=d.get("ood_threshold"),
            has_cam=bool(d.get("has_cam")),
            run=run,
            ood_reference=d.get("ood"),
            calibration=d.get("calibration"),
            run_without_maps=run_without_maps,
        )

    def infer(self, batch: np.ndarray, maps: bool) -> list[dict[str, Any]]:
        """`run` when the maps are wanted, else `run_without_maps` (or `run` where there is none)."""
        if maps or self.run_without_maps is None:
            return self.run(batch)
        return self.run_without_maps(batch)

    @property
    def sha256(self) -> str:
        return str(self.identity.get("sha256", ""))

    @property
    def info(self) -> dict[str, Any]:
        """The `model` field of every answer: name, version, sha256, backend, variant, providers, labels."""
        return self.identity | {"labels": self.labels, "task": self.config.task}

    @property
    def calibration_block(self) -> dict[str, Any]:
        """The `calibration` field of every answer: method, status, temperature T (probabilities are
        softmax(logits / T)), version and id, fitted on what / when / n, the operating point and its
        sensitivity / specificity; `/model` adds the reliability bins."""
        cal = dict(self.calibration or UNCALIBRATED)
        cal.pop("reliability", None)
        return cal

    def card(self) -> dict[str, Any]:
        """GET /model: identity, labels, preprocessing, operating point, calibration (with its reliability
        bins), OOD threshold, card metrics."""
        return self.info | {
            "calibration": dict(self.calibration or UNCALIBRATED),
            "preprocessing": self.config.preprocessing.to_dict(),
            "threshold": self.config.threshold,
            "ood_threshold": self.ood_threshold,
            "ood_reference": self.ood_reference,
            "metrics": self.config.metrics,
            "method": self.config.method,
            "pretraining_data": self.config.pretraining_data,
            "outputs": ["probabilities", "decision", "ood"] + (["cam"] if self.has_cam else []),
        }

    def report_identity(self) -> ModelIdentity:
        try:
            software = f"ct-ssl-hub {version('ct-ssl-hub')}"
        except PackageNotFoundError:
            software = "ct-ssl-hub"
        return ModelIdentity(
            name=str(self.identity.get("name", "model")),
            version=str(self.identity.get("version", "")),
            sha256=self.sha256,
            variant=str(self.identity.get("variant", "fp32")),
            software_version=software,
        )

    def require(self, requested: str | None) -> None:
        """404 unless `requested` is empty or names the served model (name, version or sha256)."""
        ident = self.identity
        if requested and requested not in (ident.get("name"), ident.get("version"), ident.get("sha256")):
            raise ModelNotFoundError(
                f"model {requested!r} is not served here; this server serves {ident.get('name')!r}"
            )


class InferenceEngine:
    """Preprocessed slices -> per-slice outputs of one classifier (in the service: a verified ONNX one)."""

    def __init__(self, classifier: Classifier) -> None:
        self.classifier = classifier

    @classmethod
    def open(cls, settings: ServeSettings) -> InferenceEngine:
        """The engine named by the settings: the model folder's ONNX file of the chosen variant, verified
        (checksum, exported from the folder's weights and preprocessing); ModelNotFoundError /
        IntegrityError / StaleModelError / ConfigError otherwise."""
        model_dir = resolve_model_dir(settings.model)
        clf = OnnxClassifier.from_model_dir(model_dir, settings.variant, threads=settings.ort_threads)
        missing = [n for n in ("cam", "embedding") if n not in clf.output_names]
        if missing:
            raise ConfigError(
                f"{clf.path.name} has no {' / '.join(missing)} output (exported by an older version): "
                f"re-export it with `cthub export {model_dir}`"
            )
        clf.prepare_without_maps()  # at start-up, not on the first request
        return cls(clf)

    def describe(self) -> dict[str, Any]:
        """What the API needs to know about the model: identity (an ONNX classifier adds its variant and
        the file's sha256), config, labels, OOD threshold, outputs."""
        clf = self.classifier
        identity = clf.identity
        if isinstance(clf, OnnxClassifier):
            identity = identity | {"variant": clf.variant, "onnx_sha256": clf.file_sha256}
        return {
            "identity": identity,
            "labels": clf.labels,
            "config": clf.config.to_dict(),
            "input_shape": list(clf.input_shape),
            "ood_threshold": clf.ood_threshold,
            "ood": clf.ood.summary() if clf.ood is not None else None,
            "calibration": clf.calibration,
            "has_cam": True,
        }

    def served(self) -> ServedModel:
        """This engine as analyses in this process use it (its description, `run` as inference)."""
        return ServedModel.from_description(self.describe(), self.run, self.run_without_maps)

    def run_without_maps(self, batch: np.ndarray) -> list[dict[str, Any]]:
        """`run` without the class activation maps (their `cam` is None): the map nodes are not computed."""
        return self.run(batch, maps=False)

    def run(self, batch: np.ndarray, maps: bool = True) -> list[dict[str, Any]]:
        """One forward pass over `batch` [B, C, S, S]; one dict of built-in types per slice, in order; `cam`
        is None without `maps`."""
        t0, c0 = time.perf_counter(), time.process_time()
        out = self.classifier.outputs(batch, maps=maps)
        ood = self.classifier.ood_score(out) if self.classifier.ood is not None else None
        ms = round(1000 * (time.perf_counter() - t0), 3)
        cpu_ms = round(1000 * (time.process_time() - c0), 3)  # this process's CPU: wall minus preemption
        n = len(out.logits)
        return [
            {
                "logits": out.logits[i].tolist(),
                "probabilities": out.probabilities[i].tolist(),
                "cam": None if out.cam is None else out.cam[i].tolist(),
                "ood_score": None if ood is None else float(ood[i]),
                "batch_size": n,
                "model_ms": ms,
                "model_cpu_ms": cpu_ms,
            }
            for i in range(n)
        ]
