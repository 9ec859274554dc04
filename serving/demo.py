"""Gradio demo for radiologists: upload a DICOM, pick a window, see the windowed slice (optionally with the
class activation map of the predicted class from `finetune.cam`) and the prediction.

`build_demo(model_source)` takes a model folder (or a callable returning a Predictor) and loads the model
lazily on the first request, so the Blocks can be built when the service module is imported without a model.
Mounted under the BentoML service at /ui (serving.service) or run alone with `cthub demo --model DIR`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ctdata.preprocess import WINDOW_PRESETS
from cthub.errors import CTHubError
from serving.predictor import Predictor, get_predictor

MODEL_DEFAULT = "model default"
TITLE = "ct-ssl-hub: CT slice classifier"
DISCLAIMER = ("Research prototype, not a medical device: predictions come from a model trained on a small "
              "public dataset and must not be used for diagnosis.")


def window_choices() -> list[str]:
    return [MODEL_DEFAULT, *WINDOW_PRESETS]


def preset_values(preset: str) -> tuple[float, float]:
    """(center, width) for a preset; the abdomen window for "model default" (sliders are then unused)."""
    return WINDOW_PRESETS.get(preset, WINDOW_PRESETS["abdomen"])


def to_display(unit: np.ndarray) -> np.ndarray:
    """[0, 1] slice -> uint8 RGB."""
    return (np.repeat(np.clip(unit, 0.0, 1.0)[..., None], 3, axis=-1) * 255.0).round().astype(np.uint8)


def cam_overlay(predictor: Predictor, x: Any, unit: np.ndarray, label: str) -> np.ndarray | None:
    """The slice with the class activation map of `label` blended in (finetune.cam); None if unavailable."""
    try:
        from finetune.cam import class_activation_map, overlay
    except ImportError:
        return None
    import torch

    model = predictor.torch_model()
    device = next(model.parameters()).device
    with torch.inference_mode():
        maps, _ = class_activation_map(model, x[None].to(device), target=predictor.labels.index(label))
    return overlay(unit, maps[0].float().cpu().numpy())


def analyze(predictor: Predictor, file_path: str | None, preset: str, center: float, width: float,
            show_cam: bool = False) -> tuple[np.ndarray, dict[str, float], dict[str, Any]]:
    """The demo's one action: (display image, probabilities, details). Raises CTHubError on bad input."""
    from cthub.errors import InputError

    if not file_path:
        raise InputError("upload a DICOM file first")
    data = Path(file_path).read_bytes()
    override = {} if preset == MODEL_DEFAULT else {"center": float(center), "width": float(width)}
    x, shell = predictor.prepare(data, **override)
    pred = predictor.finish(shell, predictor.proba(x[None])[0])
    cam = cam_overlay(predictor, x, pred.unit, pred.label) if show_cam else None
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

    def run(file_path: str | None, preset: str, center: float, width: float, show_cam: bool):
        try:
            return analyze(load(), file_path, preset, center, width, show_cam)
        except CTHubError as e:
            raise gr.Error(str(e)) from None

    def on_preset(preset: str):
        c, w = preset_values(preset)
        interactive = preset != MODEL_DEFAULT
        return gr.update(value=c, interactive=interactive), gr.update(value=w, interactive=interactive)

    c0, w0 = preset_values(MODEL_DEFAULT)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"# {TITLE}\n{DISCLAIMER}")
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="DICOM file", type="filepath", elem_id="dicom-upload")
                preset = gr.Dropdown(window_choices(), value=MODEL_DEFAULT, label="Window preset",
                                     elem_id="window-preset")
                center = gr.Slider(-1200, 3000, value=c0, step=1, label="Window center (HU)",
                                   interactive=False, elem_id="window-center")
                width = gr.Slider(1, 4000, value=w0, step=1, label="Window width (HU)",
                                  interactive=False, elem_id="window-width")
                show_cam = gr.Checkbox(value=False, label="Overlay the class activation map",
                                       elem_id="show-cam")
                button = gr.Button("Predict", variant="primary", elem_id="predict-button")
            with gr.Column():
                image = gr.Image(label="Windowed slice", type="numpy", elem_id="windowed-image")
                probs = gr.Label(label="Prediction", num_top_classes=5, elem_id="prediction")
                details = gr.JSON(label="Details (model, preprocessing, warnings)", elem_id="details")
        preset.change(on_preset, inputs=preset, outputs=[center, width], api_name=False)
        button.click(run, inputs=[upload, preset, center, width, show_cam], outputs=[image, probs, details],
                     api_name="predict")
    return demo


def prepare_for_mount(demo: Any) -> Any:
    """Gradio 6 sets theme/css/js only in launch(); set them so the Blocks can be mounted (BentoML /ui)."""
    from gradio import utils

    demo.theme = utils.get_theme(None)
    demo.css, demo.js, demo.head = None, None, None
    demo.css_paths, demo.head_paths = [], []
    demo._set_html_css_theme_variables()
    return demo
