"""The inference side of the API: the exported ONNX classifier behind a batchable BentoML service.

`InferenceEngine` runs batches of preprocessed slices [B, C, S, S] and answers one plain dict per slice
(probabilities, logits, class activation maps, out-of-distribution score, batch size, the forward pass's
wall and CPU time), so the answer travels between processes as built-in types. `InferenceService` wraps it
with BentoML's adaptive batching: concurrent requests of the API service are merged into one forward pass.

`SliceModel` is what an analysis needs of a model (its config, labels, identity, OOD threshold and `run`):
an `InferenceEngine` in this process, or the API worker's view of the inference service
(`serving.api.RemoteModel`), so the mounted demo and the REST API share one batched ONNX session.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cthub.errors import ConfigError, ModelNotFoundError
from export.classifier import Classifier
from export.session import OnnxClassifier
from hub.config import ModelConfig
from serving.settings import ServeSettings

log = logging.getLogger(__name__)


def onnx_path(model_dir: Path, variant: str) -> Path:
    """The ONNX file of a variant; ModelNotFoundError with the command that makes it when missing (a cheap
    check for start-up; `OnnxClassifier.from_model_dir` verifies the file itself)."""
    from export.integrity import ONNX_FILES

    if variant not in ONNX_FILES:
        raise ConfigError(f"unknown ONNX variant {variant!r}; choose one of {', '.join(ONNX_FILES)}")
    path = model_dir / ONNX_FILES[variant]
    if not path.is_file():
        how = "cthub export" + (" --int8" if variant == "int8" else "")
        raise ModelNotFoundError(f"no {path.name} in {model_dir}: run `{how} {model_dir}` first")
    return path


def verify_export(model_dir: Path, variant: str) -> Path:
    """The ONNX file of a variant after the checks `OnnxClassifier.from_model_dir` makes before loading
    (recorded checksum, exported from the folder's current weights and preprocessing), without creating a
    session: the CLI and the API service run it at start-up so a bad file stops the server at once."""
    from export.integrity import check_fresh, verify_onnx_file
    from export.session import read_metadata, weights_sha256

    path = onnx_path(model_dir, variant)
    verify_onnx_file(path)
    check_fresh(
        read_metadata(path), path, config=ModelConfig.load(model_dir), source_sha256=weights_sha256(model_dir)
    )
    return path


class SliceModel(Protocol):
    """A model as analyses use it: preprocessed slices [B, C, S, S] -> one `InferenceEngine.run` dict each."""

    @property
    def config(self) -> ModelConfig: ...

    @property
    def labels(self) -> list[str]: ...

    @property
    def identity(self) -> dict[str, Any]: ...

    @property
    def ood_threshold(self) -> float | None: ...

    def run(self, batch: np.ndarray) -> list[dict[str, Any]]: ...


class InferenceEngine:
    """Preprocessed slices -> per-slice outputs of one classifier (in the service: a verified ONNX one)."""

    def __init__(self, classifier: Classifier) -> None:
        self.classifier = classifier

    @classmethod
    def open(cls, settings: ServeSettings) -> InferenceEngine:
        """The engine named by the settings: the model folder's ONNX file of the chosen variant, verified
        (checksum, exported from the folder's weights and preprocessing); ModelNotFoundError /
        IntegrityError / StaleModelError / ConfigError otherwise."""
        from serving.predictor import resolve_model_dir

        model_dir = resolve_model_dir(settings.model)
        onnx_path(model_dir, settings.variant)
        clf = OnnxClassifier.from_model_dir(model_dir, settings.variant, threads=settings.ort_threads)
        missing = [n for n in ("cam", "embedding") if n not in clf.output_names]
        if missing:
            raise ConfigError(
                f"{clf.path.name} has no {' / '.join(missing)} output (exported by an older version): "
                f"re-export it with `cthub export {model_dir}`"
            )
        return cls(clf)

    @property
    def config(self) -> ModelConfig:
        return self.classifier.config

    @property
    def labels(self) -> list[str]:
        return self.classifier.labels

    @property
    def identity(self) -> dict[str, Any]:
        """The classifier's identity; an ONNX one adds its variant and the file's sha256."""
        clf = self.classifier
        if isinstance(clf, OnnxClassifier):
            return clf.identity | {"variant": clf.variant, "onnx_sha256": clf.file_sha256}
        return clf.identity

    @property
    def ood_threshold(self) -> float | None:
        return self.classifier.ood_threshold

    def describe(self) -> dict[str, Any]:
        """What the API needs to know about the model: identity, config, labels, OOD threshold, outputs."""
        clf = self.classifier
        return {
            "identity": self.identity,
            "labels": clf.labels,
            "config": self.config.to_dict(),
            "input_shape": list(clf.input_shape),
            "ood_threshold": clf.ood_threshold,
            "ood": clf.ood.summary() if clf.ood is not None else None,
            "has_cam": True,
        }

    def run(self, batch: np.ndarray) -> list[dict[str, Any]]:
        """One forward pass over `batch` [B, C, S, S]; one dict of built-in types per slice, in order."""
        t0, c0 = time.perf_counter(), time.process_time()
        out = self.classifier.outputs(batch)
        ood = self.classifier.ood_score(out.embedding) if self.classifier.ood is not None else None
        ms = round(1000 * (time.perf_counter() - t0), 3)
        cpu_ms = round(1000 * (time.process_time() - c0), 3)  # this process's CPU: wall minus preemption
        n = len(out.logits)
        return [
            {
                "logits": out.logits[i].tolist(),
                "probabilities": out.probabilities[i].tolist(),
                "cam": out.cam[i].tolist(),
                "ood_score": None if ood is None else float(ood[i]),
                "batch_size": n,
                "model_ms": ms,
                "model_cpu_ms": cpu_ms,
            }
            for i in range(n)
        ]
