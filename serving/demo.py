"""Gradio demo for radiologists: upload a DICOM, pick a window, see the windowed slice (optionally with the
class activation map of the predicted class from `finetune.cam`) and the prediction.

`build_demo(model_source)` takes a model folder (or a callable returning a Predictor) and loads the model
lazily on the first request, so the Blocks can be built when the service module is imported without a model.
Mounted under the BentoML service at /ui (serving.service, through `asgi_app`) or run alone with
`cthub demo --model DIR`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ctdata.preprocess import WINDOW_PRESETS
from cthub.errors import CTHubError, InputError
from serving.predictor import Prediction, Predictor, get_predictor

MODEL_DEFAULT = "model default"
TITLE = "ct-ssl-hub: CT slice classifier"
DISCLAIMER = (
    "Research prototype, not a medical device: predictions come from a model trained on a small "
    "public dataset and must not be used for diagnosis."
)


def window_choices() -> list[str]:
    return [MODEL_DEFAULT, *WINDOW_PRESETS]


def preset_values(preset: str) -> tuple[float, float]:
    """(center, width) for a preset; the abdomen window for "model default" (sliders are then unused)."""
    return WINDOW_PRESETS.get(preset, WINDOW_PRESETS["abdomen"])


def to_display(unit: np.ndarray) -> np.ndarray:
    """[0, 1] slice -> uint8 RGB."""
    return (np.repeat(np.clip(unit, 0.0, 1.0)[..., None], 3, axis=-1) * 255.0).round().astype(np.uint8)


def cam_overlay(predictor: Predictor, pred: Prediction) -> np.ndarray | None:
    """The slice with the class activation map of the predicted label blended in (finetune.cam); None if
    finetune is not installed."""
    try:
        from finetune.cam import class_activation_map, overlay
    except ImportError:
        return None
    import torch

    if pred.unit is None or pred.model_input is None:
        return None
    model = predictor.cam_model()
    device = next(model.parameters()).device
    with torch.inference_mode():
        maps, _ = class_activation_map(
            model, pred.model_input[None].to(device), target=predictor.labels.index(pred.label)
        )
    return overlay(pred.unit, maps[0].float().cpu().numpy())


def analyze(
    predictor: Predictor,
    file_path: str | None,
    preset: str,
    center: float,
    width: float,
    show_cam: bool = False,
) -> tuple[np.ndarray, dict[str, float], dict[str, Any]]:
    """The demo's one action: (display image, probabilities, details). Raises CTHubError on bad input."""
    if not file_path:
        raise InputError("upload a DICOM file first")
    if preset == MODEL_DEFAULT:
        pred = predictor.predict(file_path)
    else:
        pred = predictor.predict(file_path, center=float(center), width=float(width))
    assert pred.unit is not None, "set by Predictor.predict"
    cam = cam_overlay(predictor, pred) if show_cam else None
    image = to_display(pred.unit) if cam is None else cam
    details = pred.to_json(predictor.info) | {"class_activation_map": cam is not None}
    details.pop("probabilities")
    return image, pred.probabilities, details


def build_demo(model_source: str | Path | Callable[[], Predictor]) -> Any:
    """The Gradio Blocks; `model_source` is a model folder or a zero-argument Predictor factory."""
    import gradio as gr

    def load() -> Predictor:
        if callable(model_source):
            return model_source()
        return get_predictor(str(model_source))

    def run(
        file_path: str | None, preset: str, center: float, width: float, show_cam: bool
    ) -> tuple[np.ndarray, str, dict[str, float], dict[str, Any]]:
        try:
            image, probabilities, details = analyze(load(), file_path, preset, center, width, show_cam)
        except CTHubError as e:
            raise gr.Error(str(e)) from None
        return image, details["label"], probabilities, details

    def on_preset(preset: str) -> tuple[Any, Any]:
        c, w = preset_values(preset)
        interactive = preset != MODEL_DEFAULT
        return gr.update(value=c, interactive=interactive), gr.update(value=w, interactive=interactive)

    c0, w0 = preset_values(MODEL_DEFAULT)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"# {TITLE}\n{DISCLAIMER}")
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="DICOM file", type="filepath", elem_id="dicom-upload")
                preset = gr.Dropdown(
                    window_choices(), value=MODEL_DEFAULT, label="Window preset", elem_id="window-preset"
                )
                center = gr.Slider(
                    -1200,
                    3000,
                    value=c0,
                    step=1,
                    label="Window center (HU)",
                    interactive=False,
                    elem_id="window-center",
                )
                width = gr.Slider(
                    1,
                    4000,
                    value=w0,
                    step=1,
                    label="Window width (HU)",
                    interactive=False,
                    elem_id="window-width",
                )
                show_cam = gr.Checkbox(
                    value=False, label="Overlay the class activation map", elem_id="show-cam"
                )
                button = gr.Button("Predict", variant="primary", elem_id="predict-button")
            with gr.Column():
                image = gr.Image(label="Windowed slice", type="numpy", elem_id="windowed-image")
                # The decision (the binary operating point when configured) is shown on its own: gr.Label's
                # heading can only be the most probable class, so it is hidden.
                decision = gr.Textbox(label="Prediction", interactive=False, elem_id="prediction")
                probs = gr.Label(
                    label="Class probabilities",
                    num_top_classes=5,
                    show_heading=False,
                    elem_id="probabilities",
                )
                details = gr.JSON(label="Details (model, preprocessing, warnings)", elem_id="details")
        preset.change(on_preset, inputs=preset, outputs=[center, width], api_visibility="private")
        button.click(
            run,
            inputs=[upload, preset, center, width, show_cam],
            outputs=[image, decision, probs, details],
            api_name="predict",
        )
    return demo


def asgi_app(demo: Any) -> Any:
    """The demo as an ASGI (FastAPI) app to mount under another server, e.g. BentoML's /ui.

    Gradio's public `gr.mount_gradio_app` sets what Gradio 6 otherwise sets only in `launch()` (theme, css,
    js, head) and runs the demo's start-up events (its queue) in the returned app's lifespan, which the
    mounting server enters.
    """
    import gradio as gr
    from fastapi import FastAPI

    return gr.mount_gradio_app(
        FastAPI(openapi_url=None, docs_url=None, redoc_url=None), demo, path="/", show_error=True
    )
