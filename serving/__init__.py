"""Serving: the BentoML service (`serving.service:CTHubService`, POST /predict, demo at /ui), the Gradio demo
and the Predictor both use. Importing this package does not import BentoML or Gradio."""

from serving.predictor import (
    MODEL_ENV,
    PayloadTooLargeError,
    Prediction,
    Predictor,
    effective_preprocessing,
    get_predictor,
    open_classifier,
    read_upload,
    resolve_model_dir,
)

__all__ = [
    "MODEL_ENV",
    "PayloadTooLargeError",
    "Prediction",
    "Predictor",
    "effective_preprocessing",
    "get_predictor",
    "open_classifier",
    "read_upload",
    "resolve_model_dir",
]
