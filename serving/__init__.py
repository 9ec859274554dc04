"""Serving: the BentoML services (`serving.service:CTHubService` and its `InferenceService`), the Gradio
demo, the SR writer (`serving.report.write_sr`) and the pieces they share. Importing this package does not
import BentoML, Gradio or highdicom.

Names are imported on first use (PEP 562) so that `cthub --help` does not load torch either."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cthub.lazy import lazy_exports

if TYPE_CHECKING:
    from serving.predictor import (
        PayloadTooLargeError,
        Prediction,
        Predictor,
        effective_preprocessing,
        get_predictor,
        open_classifier,
        read_upload,
        resolve_model_dir,
    )
    from serving.report import ModelIdentity, ReportContent, SliceFinding, write_sr
    from serving.settings import MODEL_ENV, ServeSettings

_EXPORTS: dict[str, str] = {
    "MODEL_ENV": "serving.settings",
    "ModelIdentity": "serving.report",
    "PayloadTooLargeError": "serving.predictor",
    "Prediction": "serving.predictor",
    "Predictor": "serving.predictor",
    "ReportContent": "serving.report",
    "ServeSettings": "serving.settings",
    "SliceFinding": "serving.report",
    "effective_preprocessing": "serving.predictor",
    "get_predictor": "serving.predictor",
    "open_classifier": "serving.predictor",
    "read_upload": "serving.predictor",
    "resolve_model_dir": "serving.predictor",
    "write_sr": "serving.report",
}
__all__ = [
    "MODEL_ENV",
    "ModelIdentity",
    "PayloadTooLargeError",
    "Prediction",
    "Predictor",
    "ReportContent",
    "ServeSettings",
    "SliceFinding",
    "effective_preprocessing",
    "get_predictor",
    "open_classifier",
    "read_upload",
    "resolve_model_dir",
    "write_sr",
]


__getattr__ = lazy_exports(__name__, _EXPORTS)
