"""Gradio demo for radiologists: a small viewer of one CT series with the model's answer and why.

Upload one DICOM file, several slices or a zip of a series; page through the slices in anatomical order,
window them (presets, or center/width) at their own resolution, click a pixel to read its HU value, and see
the model's probabilities, its thresholded decision, the out-of-distribution warning, the model's identity
and card metrics, and the class activation map of any class over the slice. A picker offers the served
models (`cthub serve --also` serves several) and the exported classifiers of the local hub. The model card
says what input the model expects; a model trained on organ-centred crops (OrganAMNIST) is shown a region
of the slices (a box x0,y0,x1,y1, read off the pixel probe) instead of the whole slice, and warns while it
is shown whole slices.

`layout` builds the page, `Handlers` answers its events, `wire` connects the two; everything that is not
Gradio is in `serving.viewer`. Uploads are read into memory and their files deleted from Gradio's upload
directory at once; that directory is private to the server (`private_upload_dir`) and Gradio's cache of
rendered slices is swept every few minutes and emptied at shutdown. User errors (`cthub.errors`) become a
message in the page, never a stack trace. Analytics are off, there are no share links, and only Gradio's
public API is used. Mounted under the BentoML service at /ui (`asgi_app`) or alone (`cthub demo`).
"""

from __future__ import annotations

import dataclasses
import functools
import html
import logging
import shutil
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import gradio as gr
import numpy as np
from fastapi import FastAPI

from ctdata import heatmap
from cthub.errors import CTHubError, InputError, ModelNotFoundError
from export.integrity import ONNX_NAME
from hub.config import CONFIG_NAME, WEIGHTS_NAME, ModelConfig
from hub.io import hub_dir
from serving import viewer
from serving.inference import InferenceEngine, ServedModel, open_classifier, resolve_model_dir
from serving.inputs import CROP_EXPECTATION, crop_region, http_status, input_expectation, parse_region
from serving.results import SERIES_RULE, series_ood_note
from serving.settings import ServeSettings
from serving.viewer import CUSTOM, MODEL_DEFAULT, Study, private_upload_dir

log = logging.getLogger(__name__)

TITLE = "ct-ssl-hub: CT slice viewer and classifier"
NOTICE = (
    '<div id="research-notice" role="note" style="border:2px solid #b45309;background:#fffbeb;color:#78350f;'
    'padding:8px 12px;border-radius:6px;font-weight:600">Research use only, not for diagnosis. This is a '
    "research prototype, not a medical device: its output must not be used to diagnose, treat or triage "
    "patients.</div>"
)
OOD_STYLE = "border:2px solid #b91c1c;background:#fef2f2;color:#7f1d1d;padding:8px 12px;border-radius:6px"
CACHE_SWEEP = (300, 900)  # Gradio's delete_cache: every 5 min the files older than 15 min; all at shutdown
STATE_TTL_S = 1800  # a session's study (its pixels) is dropped 30 min after it was loaded
ERROR_TITLES = {
    400: "This file cannot be read",
    404: "Model not found",
    413: "Too large",
    415: "Unsupported encoding",
    422: "Not an image this model can analyse",
}
PRIVACY_OPTIONS: dict[str, Any] = {"run_history": False, "mcp_server": False}  # see `launch_options`
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class DemoModel:
    """A model the demo analyses with: its folder (the picker's value) and the `ServedModel` that runs it.
    Mounted under the API, the served models are the server's batched sessions (`ApiWorker.demo_models`)."""

    model_dir: Path
    model: ServedModel

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @classmethod
    def local(cls, model_dir: str | Path, backend: str = "auto") -> DemoModel:
        """A model folder or local hub name, run in this process (one cached classifier per folder)."""
        return _local_model(str(model_dir), backend)


@functools.lru_cache(maxsize=4)
def _local_model(name_or_path: str, backend: str) -> DemoModel:
    """One in-process model per (folder, backend) and process: the picker's folders are opened once."""
    model_dir = resolve_model_dir(name_or_path)
    return DemoModel(model_dir, InferenceEngine(open_classifier(model_dir, backend)).served())


ModelSource = str | Path | Callable[[], DemoModel | list[DemoModel]]
REGION_NOTE = "region classified:"  # the study note that says the slices were cut to a box


def expectation_of(cfg: ModelConfig) -> str | None:
    return input_expectation(cfg.metrics, cfg.provenance)


def region_of(study: Study) -> str | None:
    """The box the study's slices were cut to ('x0,y0,x1,y1 ...'), None for whole slices."""
    return next((n[len(REGION_NOTE) :].strip() for n in study.notes if n.startswith(REGION_NOTE)), None)


def expectation_text(cfg: ModelConfig, study: Study | None = None) -> str:
    """The card's line on what the model expects, and whether this study gives it that."""
    said = expectation_of(cfg)
    line = f"- Input expected: {said or 'not recorded in its card'}"
    if said == CROP_EXPECTATION:
        region = region_of(study) if study is not None else None
        line += (
            f"; classifying the region {region}"
            if region
            else "; **whole slices are not what it was trained on**: enter the organ's region (x0,y0,x1,y1, "
            "from the pixel probe) and press *Classify region*"
        )
    return line


def cropped(study: Study, box: tuple[int, int, int, int]) -> Study:
    """The study with every slice cut to `box` (coordinates of the displayed slices); analysis dropped."""
    slices = [
        dataclasses.replace(sl, pixels=np.ascontiguousarray(crop_region(sl.pixels, box)))
        for sl in study.slices
    ]
    x0, y0, x1, y1 = box
    earlier = region_of(study)
    where = f"{x0},{y0},{x1},{y1}" + (f" of the earlier region {earlier}" if earlier else "")
    notes = [n for n in study.notes if not n.startswith(REGION_NOTE)] + [f"{REGION_NOTE} {where}"]
    return dataclasses.replace(study, slices=slices, notes=notes, analysis=None)


def local_classifiers(root: Path | None = None) -> list[Path]:
    """Exported classifiers of the local hub: folders with weights, model.onnx and a config with a head."""
    hub = root or hub_dir()
    if not hub.is_dir():
        return []
    found = []
    for d in sorted(p for p in hub.iterdir() if p.is_dir()):
        if not all((d / n).is_file() for n in (WEIGHTS_NAME, CONFIG_NAME, ONNX_NAME)):
            continue
        try:
            cfg = ModelConfig.load(d)
        except CTHubError:
            continue
        if cfg.num_classes > 0:
            found.append(d.resolve())
    return found


def model_label(cfg: ModelConfig, note: str = "") -> str:
    """How the picker names a model."""
    extra = f", {note}" if note else ""
    return f"{cfg.name} ({cfg.method}, {cfg.num_classes} classes{extra})"


def user_errors(fn: F) -> F:
    """Errors a user can cause become a message in the page (title by kind, the error's own text); anything
    else is logged by type and traceback only (messages may quote header values) and answered generically."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except CTHubError as e:
            title = ERROR_TITLES.get(http_status(e), "Cannot use this input")
            raise gr.Error(html.escape(str(e)), title=title, print_exception=False) from None
        except Exception as e:  # noqa: BLE001 -- a bug must not show a stack trace or leak the upload
            log.error(
                "demo: unexpected %s:\n%s", type(e).__name__, "".join(traceback.format_tb(e.__traceback__))
            )
            raise gr.Error(
                "The demo could not process this request (an internal error, logged on the server).",
                print_exception=False,
            ) from None

    return wrapper  # type: ignore[return-value]


@dataclass(frozen=True)
class View:
    """The viewer's controls: slice (1-based, as the slider shows it), window, class activation map."""

    slice: int
    preset: str
    center: float
    width: float
    cam: bool
    cam_class: str | None
    opacity: float

    def index(self, study: Study) -> int:
        return slice_index(study, self.slice)


def slice_index(study: Study, number: float) -> int:
    """The 0-based index of the slider's 1-based slice number, within the study."""
    return int(np.clip(int(number) - 1, 0, len(study.slices) - 1))


def loaded(study: Study | None) -> Study:
    """The session's study; InputError when there is none (never loaded, cleared, or expired)."""
    if study is None or study.analysis is None:
        raise InputError(
            f"no study in this session: upload one (a study is kept {STATE_TTL_S // 60} min after loading)"
        )
    return study


@dataclass(frozen=True)
class Panels:
    """The page's components (see `layout`)."""

    study: Any
    model: Any
    upload: Any
    slice: Any
    preset: Any
    center: Any
    width: Any
    cam: Any
    cam_class: Any
    opacity: Any
    region: Any
    classify_region: Any
    image: Any
    probe_x: Any
    probe_y: Any
    readout: Any
    info: Any
    banner: Any
    prediction: Any
    rule: Any
    probabilities: Any
    series: Any
    card: Any
    metadata: Any
    notes: Any
    details: Any

    def view(self) -> list[Any]:
        """The controls that say what to draw, in `View`'s order."""
        return [self.slice, self.preset, self.center, self.width, self.cam, self.cam_class, self.opacity]

    def study_outputs(self) -> list[Any]:
        """What depends on the study and the model (`Handlers.study_panels`)."""
        return [self.slice, self.cam_class, self.prediction, self.rule, self.series, self.card, self.notes]

    def slice_outputs(self) -> list[Any]:
        """What depends on the displayed slice (`Handlers.slice_panels`)."""
        return [
            self.image,
            self.probabilities,
            self.info,
            self.banner,
            self.metadata,
            self.details,
            self.readout,
        ]

    def analysis_outputs(self) -> list[Any]:
        return [self.study, *self.study_outputs(), *self.slice_outputs()]


class Handlers:
    """The demo's event handlers (each wrapped by `user_errors` when wired)."""

    def __init__(self, model_source: ModelSource, settings: ServeSettings, upload_dir: Path) -> None:
        self._source = model_source
        self.settings = viewer.demo_settings(settings)
        self.upload_dir = upload_dir

    # -- models ------------------------------------------------------------------------------------------

    def served(self) -> list[DemoModel]:
        """The served models, the default first (loaded on first use)."""
        if not callable(self._source):
            return [DemoModel.local(self._source)]
        got = self._source()
        return list(got) if isinstance(got, list) else [got]

    def default(self) -> DemoModel:
        """The served (default) model."""
        return self.served()[0]

    def choices(self) -> list[tuple[str, str]]:
        """(label, folder) of the served models, then of the other exported classifiers in the local hub."""
        served = self.served()
        out = [(model_label(m.config, "served"), str(m.model_dir)) for m in served]
        folders = {m.model_dir for m in served}
        for d in local_classifiers():
            if d not in folders:
                out.append((model_label(ModelConfig.load(d)), str(d)))
        return out

    def model(self, model_dir: str | None) -> DemoModel:
        """The model of a folder the picker offers (never an arbitrary path a client sends)."""
        served = self.served()
        if not model_dir:
            return served[0]
        for m in served:
            if model_dir == str(m.model_dir):
                return m
        if model_dir not in {folder for _, folder in self.choices()}:
            raise ModelNotFoundError("this model is not offered here: pick one from the list")
        return DemoModel.local(model_dir)

    # -- events ------------------------------------------------------------------------------------------

    def on_page_load(self) -> tuple[Any, float, float]:
        """The picker's choices; the window sliders at the served model's own mapping."""
        choices = self.choices()
        c, w = viewer.preset_window(MODEL_DEFAULT, self.default().config.preprocessing) or (40.0, 400.0)
        return gr.update(choices=choices, value=choices[0][1]), c, w

    def on_upload(self, files: list[str] | None, model_dir: str | None, *view: Any) -> tuple[Any, ...]:
        """Read the uploads (then delete their files), analyse every slice, show the peak slice."""
        # files of earlier uploads still listed by the page were read (and deleted) then: not this study
        paths = [Path(f) for f in files or [] if Path(f).is_file()]
        if not paths:
            raise InputError("upload a DICOM file, several slices of one series, or a zip of a series")
        try:
            study = viewer.read_study(paths, self.settings)
        finally:
            self.forget(paths)
        return self.analysed(study, model_dir, View(*view), keep_view=False)

    def on_model(self, study: Study | None, model_dir: str | None, *view: Any) -> tuple[Any, ...]:
        """Analyse the loaded study with the model just picked (its card alone when nothing is loaded)."""
        if study is None:
            picked = self.model(model_dir)
            return self.blank(
                card=f"**{picked.config.name}** is selected: upload a study to see its answer.\n"
                + expectation_text(picked.config)
            )
        return self.analysed(study, model_dir, View(*view), keep_view=True)

    def on_region(
        self, study: Study | None, model_dir: str | None, region: str, *view: Any
    ) -> tuple[Any, ...]:
        """Cut every slice of the loaded study to the box x0,y0,x1,y1 (pixel columns and rows of the
        displayed slices, as the probe reads them) and analyse that region with the picked model."""
        box = parse_region(region)
        if box is None:
            raise InputError("enter the region as x0,y0,x1,y1 (pixel columns and rows of the slice)")
        return self.analysed(cropped(loaded(study), box), model_dir, View(*view), keep_view=True)

    def on_read(self) -> None:
        """Empty the upload box once its files are read: their names may carry patient data, and the
        files themselves are gone (`forget`)."""
        return None

    def on_clear(self) -> tuple[Any, ...]:
        return self.blank()

    def on_slice(self, study: Study | None, *view: Any) -> tuple[Any, ...]:
        return self.slice_panels(loaded(study), View(*view))

    def on_preset(self, study: Study | None, *view: Any) -> tuple[Any, Any, Any]:
        """The sliders at the preset's window, and the slice redrawn."""
        v = View(*view)
        base = (
            study.analysis.preprocessing if study and study.analysis else self.default().config.preprocessing
        )
        c, w = viewer.preset_window(v.preset, base) or (v.center, v.width)
        v = dataclasses.replace(v, center=c, width=w)
        return c, w, self.image(study, v) if study else gr.update()

    def on_window(self, study: Study | None, *view: Any) -> tuple[Any, Any]:
        """Sliders moved by hand: a custom window."""
        v = dataclasses.replace(View(*view), preset=CUSTOM)
        return CUSTOM, self.image(study, v) if study else gr.update()

    def on_cam(self, study: Study | None, *view: Any) -> Any:
        return self.image(study, View(*view)) if study else gr.update()

    def on_select(self, evt: gr.SelectData) -> tuple[int | None, int | None]:
        """The clicked pixel (column, row) of the displayed slice; None beside the image."""
        try:
            x, y = (int(v) for v in evt.index)
        except (TypeError, ValueError):  # Gradio sends NaN for a click outside the picture
            return None, None
        return x, y

    def on_probe(self, study: Study | None, slice_number: float, x: float | None, y: float | None) -> str:
        """The value under the probe, e.g. 'x 12, y 40: -998 HU'."""
        study = loaded(study)
        if x is None or y is None:
            return ""
        sl = study.slices[slice_index(study, slice_number)]
        value = viewer.pixel_value(sl, int(x), int(y))
        unit = "HU" if sl.is_hu else "grey level (not HU)"
        return f"x {int(x)}, y {int(y)}: {value:g} {unit}"

    # -- panels ------------------------------------------------------------------------------------------

    def analysed(self, study: Study, model_dir: str | None, view: View, keep_view: bool) -> tuple[Any, ...]:
        """Run the model on the study; the view starts at the peak slice with the decided class's map."""
        picked = self.model(model_dir)
        a = viewer.analyse(
            study,
            picked.model,
            str(picked.model_dir),
            self.settings.max_batch,
            self.settings.series_top_k,
            self.settings.series_ood_share,
        )
        study = study.with_analysis(a)
        decided = (a.series or {}).get("label") or a.slices[0].label
        start = view.slice if keep_view else 1 + int((a.series or {}).get("peak_slice", 0))
        cam_class = view.cam_class if keep_view and view.cam_class in a.labels else decided
        view = dataclasses.replace(view, slice=start, cam_class=cam_class)
        view = dataclasses.replace(view, slice=view.index(study) + 1)
        return (study, *self.study_panels(study, picked, view), *self.slice_panels(study, view))

    def study_panels(self, study: Study, picked: DemoModel, view: View) -> tuple[Any, ...]:
        """Slider, class choices, decision, rule, series scores, model card, notes."""
        a = study.analysis
        assert a is not None, "set by analysed()"
        n = len(study.slices)
        overall = a.series["decision"] if a.series else a.slices[0].decision
        rule = f"**Decision rule**: {viewer.rule_text(overall, a.labels)}"
        if a.series:
            rule += f", applied to the series scores ({SERIES_RULE})"
        cfg = picked.config
        return (
            gr.update(
                maximum=max(n, 2), value=view.slice, interactive=n > 1, visible=n > 1, label=slider_label(n)
            ),
            gr.update(choices=a.labels, value=view.cam_class),
            overall["label"],
            rule,
            gr.update(value=a.series["scores"] if a.series else None, visible=a.series is not None),
            viewer.model_card_text(a, cfg.method, cfg.pretraining_data, cfg.metrics)
            + "\n"
            + viewer.calibration_text(picked.model.calibration)
            + "\n"
            + expectation_text(cfg, study),
            notes_text(study, cfg),
        )

    def slice_panels(self, study: Study, view: View) -> tuple[Any, ...]:
        """Image, probabilities, slice line, OOD banner, metadata, details, probe readout (cleared)."""
        a = study.analysis
        assert a is not None, "set by analysed()"
        i = view.index(study)
        sl, r = study.slices[i], a.slices[i]
        metadata = study.metadata[sl.source] | {
            "preprocessing_applied": viewer.preprocessing_applied(a.preprocessing, sl.is_hu)
        }
        return (
            self.image(study, view),
            r.probabilities,
            slice_text(study, i),
            ood_banner(study, i),
            metadata,
            details(study, i),
            "",
        )

    def image(self, study: Study, view: View) -> np.ndarray:
        """The displayed slice: the chosen window at its own resolution, the chosen class's map if on."""
        a = study.analysis
        assert a is not None, "set by analysed()"
        i = view.index(study)
        cfg = viewer.display_config(a.preprocessing, view.preset, view.center, view.width)
        heat = None
        if view.cam and view.cam_class in a.labels:
            heat = heatmap.heat(a.slices[i].cam[a.labels.index(str(view.cam_class))])
        return viewer.render(study.slices[i], cfg, heat, view.opacity)

    def blank(self, card: Any = None) -> tuple[Any, ...]:
        """Every analysis output emptied (no study); the model card kept unless given."""
        return (
            None,
            gr.update(maximum=2, value=1, interactive=False, visible=False, label=slider_label(0)),
            gr.update(choices=[], value=None),
            "",
            "",
            gr.update(value=None, visible=False),
            gr.update() if card is None else card,
            "",
            None,
            None,
            "",
            gr.update(value="", visible=False),
            None,
            None,
            "",
        )

    def forget(self, paths: list[Path]) -> None:
        """Delete uploaded files (and their folders) that Gradio stored in its upload directory; files
        anywhere else, e.g. local paths given in-process, are never touched."""
        for p in paths:
            try:
                resolved = p.resolve()
            except OSError:
                continue
            if resolved.is_relative_to(self.upload_dir) and resolved.parent != self.upload_dir:
                shutil.rmtree(resolved.parent, ignore_errors=True)
            elif resolved.is_relative_to(self.upload_dir):
                resolved.unlink(missing_ok=True)


def slider_label(n: int) -> str:
    return f"Slice ({n} in anatomical order)" if n else "Slice"


def slice_text(study: Study, i: int) -> str:
    """One line about the displayed slice: where it is, what the model said about it, and whether the upload
    held other series (the demo shows one; the notes list the others)."""
    a = study.analysis
    assert a is not None
    sl, r = study.slices[i], a.slices[i]
    parts = [f"Slice **{i + 1}** of {len(study.slices)}"]
    if sl.position is not None:
        parts.append(f"position {sl.position:.1f} mm")
    if sl.instance_number is not None:
        parts.append(f"instance {sl.instance_number}")
    parts.append(f"this slice: **{r.label}** ({r.probabilities[r.label]:.2f})")
    if r.ood.get("warning"):
        parts.append("out of distribution")
    if not sl.is_hu:
        parts.append("not in HU: the window does not apply")
    if others := len(study.left_out.get("other_series", [])):
        parts.append(f"{others} other series of the upload not shown (see Notes)")
    return " · ".join(parts)


def ood_banner(study: Study, i: int) -> Any:
    """The out-of-distribution warning (series and/or slice), shown only when it fires."""
    a = study.analysis
    assert a is not None
    texts = []
    if a.series is not None and (t := series_ood_note(a.series["ood"])):
        texts.append(f"Series: {t}")
    if t := viewer.ood_text(a.slices[i].ood):
        texts.append(("This slice: " if a.series is not None else "") + t)
    if not texts:
        return gr.update(value="", visible=False)
    body = "<br>".join(html.escape(t) for t in texts)
    return gr.update(
        value=f'<div role="alert" style="{OOD_STYLE}"><b>Warning.</b> {body}</div>', visible=True
    )


def notes_text(study: Study, cfg: ModelConfig | None = None) -> str:
    """Decoder warnings, the input-expectation warning (whole slices shown to a model trained on crops), a
    missing OOD reference and what was left out of the upload, as a list."""
    a = study.analysis
    lines = list(study.notes)
    if cfg is not None and expectation_of(cfg) == CROP_EXPECTATION and region_of(study) is None:
        lines.append(
            "input expectation: this model was trained on organ-centred crops (OrganAMNIST) and was shown "
            "whole slices; classify the organ's region (x0,y0,x1,y1) instead"
        )
    if a is not None and a.ood_threshold is None:
        lines.append("no out-of-distribution reference in this export: re-export the model to get one")
    lines += viewer.left_out_text(study.left_out)
    return "\n".join(f"- {html.escape(x)}" for x in lines) if lines else "Nothing to report."


def details(study: Study, i: int) -> dict[str, Any]:
    """The displayed slice's answer as the REST API words it, with the series result and the model."""
    a = study.analysis
    assert a is not None
    sl, r = study.slices[i], a.slices[i]
    return {
        "label": (a.series or {}).get("label") or r.label,
        "slice": {
            "index": i,
            "file": sl.file,
            "member": sl.member,
            "frame": sl.frame,
            "instance_number": sl.instance_number,
            "position_mm": sl.position,
            "label": r.label,
            "probabilities": r.probabilities,
            "decision": r.decision,
            "ood": r.ood,
        },
        "series": a.series,
        "model": a.identity | {"labels": a.labels},
        "preprocessing": a.preprocessing.to_dict(),
        "warnings": list(study.notes),
        **study.left_out,
    }


# ---- the page ---------------------------------------------------------------------------------------------


def layout() -> Panels:
    """The components, inside an open `gr.Blocks`: notice, then controls | viewer | result."""
    gr.Markdown(f"# {TITLE}")
    gr.HTML(NOTICE)
    study = gr.State(None, time_to_live=STATE_TTL_S)
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=260):
            controls = controls_column()
        with gr.Column(scale=2, min_width=400):
            view = viewer_column()
        with gr.Column(scale=1, min_width=260):
            answer = answer_column()
    return Panels(study=study, **controls, **view, **answer)


def controls_column() -> dict[str, Any]:
    """Model picker, upload, slice slider, window, class activation map."""
    return {
        "model": gr.Dropdown([], label="Model", elem_id="model-picker", interactive=True),
        "upload": gr.File(
            label="DICOM file(s) or a zip of a series",
            file_count="multiple",
            type="filepath",
            elem_id="dicom-upload",
        ),
        "slice": gr.Slider(
            1, 2, value=1, step=1, label=slider_label(0), interactive=False, visible=False, elem_id="slice"
        ),
        "preset": gr.Dropdown(
            viewer.window_choices(), value=MODEL_DEFAULT, label="Window preset", elem_id="window-preset"
        ),
        "center": gr.Slider(
            -1024, 3071, value=40, step=1, label="Window center (HU)", elem_id="window-center"
        ),
        "width": gr.Slider(1, 4096, value=400, step=1, label="Window width (HU)", elem_id="window-width"),
        "cam": gr.Checkbox(False, label="Show the class activation map", elem_id="show-cam"),
        # a value from the previous model may arrive with the next event after a model switch: the handlers
        # ignore a class the model does not have (allow_custom_value avoids a spurious validation error)
        "cam_class": gr.Dropdown(
            [], label="Map of class", elem_id="cam-class", interactive=True, allow_custom_value=True
        ),
        "opacity": gr.Slider(0, 1, value=0.4, step=0.05, label="Map opacity", elem_id="cam-opacity"),
        "region": gr.Textbox(
            label="Region to classify: x0,y0,x1,y1 (pixel columns and rows, from the probe)",
            placeholder="e.g. 120,140,260,280",
            elem_id="region",
        ),
        "classify_region": gr.Button("Classify region", elem_id="classify-region"),
    }


def viewer_column() -> dict[str, Any]:
    """The slice, the pixel probe and the line about the slice."""
    image = gr.Image(
        label="Slice (click a pixel for its HU value)",
        type="numpy",
        format="png",
        interactive=False,
        buttons=["fullscreen"],
        elem_id="windowed-image",
    )
    with gr.Row():
        probe_x = gr.Number(None, label="Pixel x (column)", precision=0, interactive=False, elem_id="probe-x")
        probe_y = gr.Number(None, label="Pixel y (row)", precision=0, interactive=False, elem_id="probe-y")
        readout = gr.Textbox(label="Value under the probe", interactive=False, elem_id="hu-readout")
    info = gr.Markdown(elem_id="slice-info")
    return {"image": image, "probe_x": probe_x, "probe_y": probe_y, "readout": readout, "info": info}


def answer_column() -> dict[str, Any]:
    """OOD warning, decision and rule, probabilities, series scores, model card, metadata and details."""
    out = {
        "banner": gr.HTML(visible=False, elem_id="ood-warning"),
        "prediction": gr.Textbox(label="Decision", interactive=False, elem_id="prediction"),
        "rule": gr.Markdown(elem_id="decision-rule"),
        "probabilities": gr.Label(
            label="Class probabilities (this slice)", show_heading=False, elem_id="probabilities"
        ),
        "series": gr.Label(label="Series scores", show_heading=False, visible=False, elem_id="series-scores"),
        "card": gr.Markdown(elem_id="model-card"),
    }
    with gr.Accordion("Image metadata (technical fields only)", open=False):
        out["metadata"] = gr.JSON(label="Metadata", elem_id="metadata")
    with gr.Accordion("Notes and details", open=False):
        out["notes"] = gr.Markdown(elem_id="notes")
        out["details"] = gr.JSON(label="Details", elem_id="details")
    return out


def wire(demo: Any, p: Panels, h: Handlers) -> None:
    """Connect the events; each public one has an API name (gradio_client and the tests call them)."""
    analysis = p.analysis_outputs()
    view = p.view()
    live = {"trigger_mode": "always_last"}
    demo.load(user_errors(h.on_page_load), outputs=[p.model, p.center, p.width], api_name="models")
    p.upload.upload(
        user_errors(h.on_upload), inputs=[p.upload, p.model, *view], outputs=analysis, api_name="load"
    ).success(h.on_read, outputs=[p.upload], api_visibility="private")
    p.upload.clear(user_errors(h.on_clear), outputs=analysis, api_name="clear")
    p.model.input(
        user_errors(h.on_model), inputs=[p.study, p.model, *view], outputs=analysis, api_name="pick_model"
    )
    p.slice.input(
        user_errors(h.on_slice),
        inputs=[p.study, *view],
        outputs=p.slice_outputs(),
        api_name="show_slice",
        **live,
    )
    p.preset.input(
        user_errors(h.on_preset),
        inputs=[p.study, *view],
        outputs=[p.center, p.width, p.image],
        api_name="set_preset",
    )
    gr.on(
        [p.center.input, p.width.input],
        user_errors(h.on_window),
        inputs=[p.study, *view],
        outputs=[p.preset, p.image],
        api_name="set_window",
        **live,
    )
    gr.on(
        [p.cam.input, p.cam_class.input, p.opacity.input],
        user_errors(h.on_cam),
        inputs=[p.study, *view],
        outputs=[p.image],
        api_name="cam",
        **live,
    )
    gr.on(
        [p.classify_region.click, p.region.submit],
        user_errors(h.on_region),
        inputs=[p.study, p.model, p.region, *view],
        outputs=analysis,
        api_name="classify_region",
    )
    p.image.select(user_errors(h.on_select), outputs=[p.probe_x, p.probe_y], api_visibility="private").then(
        user_errors(h.on_probe),
        inputs=[p.study, p.slice, p.probe_x, p.probe_y],
        outputs=[p.readout],
        api_name="hu_at",
    )


def build_demo(model_source: ModelSource, settings: ServeSettings | None = None) -> gr.Blocks:
    """The Gradio Blocks. `model_source` is a model folder (or local hub name) or a zero-argument DemoModel
    factory, called on first use, so the page can be built before a model is loaded (the service module
    builds it at import). Makes Gradio's upload directory private first (`private_upload_dir`)."""
    handlers = Handlers(model_source, settings or ServeSettings.from_env(), private_upload_dir())
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=CACHE_SWEEP) as demo:
        panels = layout()
        wire(demo, panels, handlers)
    return demo


def launch_options() -> dict[str, Any]:
    """What `cthub demo` passes to `Blocks.launch`: never a share link, no run history (Gradio otherwise
    keeps every run, uploads and answers included, in the browser and offers to copy it to a Hugging Face
    bucket), no MCP server."""
    return {"share": False, "show_error": True} | PRIVACY_OPTIONS


def asgi_app(demo: gr.Blocks) -> Any:
    """The demo as an ASGI (FastAPI) app to mount under another server, e.g. BentoML's /ui.

    Gradio's public `gr.mount_gradio_app` sets what Gradio 6 otherwise sets only in `launch()` (theme, css,
    js, head) and runs the demo's start-up events (its queue) in the returned app's lifespan, which the
    mounting server enters.
    """
    return gr.mount_gradio_app(
        FastAPI(openapi_url=None, docs_url=None, redoc_url=None),
        demo,
        path="/",
        show_error=True,
        **PRIVACY_OPTIONS,
    )
