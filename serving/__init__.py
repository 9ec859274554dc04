"""Serving: the BentoML services (`serving.service:CTHubService` and its `InferenceService`), the Gradio
demo, the SR writer (`serving.report.write_sr`) and the pieces they share. Importing this package does not
import BentoML, Gradio or highdicom."""

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
