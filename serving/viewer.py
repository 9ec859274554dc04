"""The demo's viewer without Gradio: a study held in memory and the pure functions that show it.

- `read_study`: uploads (DICOM files and/or zips) -> the frames of ONE series in anatomical order, through the
  API's own series reader (`serving.series`: grouping, limits, per-file errors, `slice_sort_key`); the pixels
  stay in HU (grey 0..255 for images that are not CT) at their own resolution.
- `analyse`: every frame through the one preprocessing path (`ctdata.preprocess`, the model's own config) and
  a `ServedModel` (mounted under the API: the server's batched ONNX session, the one the REST endpoints
  use): probabilities, the thresholded decision, the out-of-distribution verdict and the class
  activation maps of every class from the model's `cam` output (computed inside the ONNX graph: no torch
  model is loaded for them). Series results follow the API's rule (`serving.results.aggregate_series`).
- rendering: `display_config` (the model's own mapping, or a window) -> `render` (window at the slice's own
  resolution, map blended in with `ctdata.heatmap.overlay`), `pixel_value` for the HU readout.
- `safe_metadata`: an allow-list of technical header fields; patient and study attributes are never read.
- `private_upload_dir`: where Gradio may put uploads (patient data): a directory private to the server.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctdata.heatmap import overlay
from ctdata.preprocess import WINDOW_PRESETS, PreprocessConfig, intensities_to_unit, unit_to_input
from cthub.errors import CTHubError, InputError, PayloadTooLargeError
from serving import results
from serving.inference import ServedModel
from serving.inputs import effective_preprocessing
from serving.series import (
    SeriesRequest,
    choose_series,
    decode_series,
    expand_uploads,
    no_series_error,
    parse_members,
    slice_inputs,
)
from serving.settings import DEFAULT_SERIES_OOD_SHARE, ServeSettings

MODEL_DEFAULT = "model's own mapping"
CUSTOM = "custom"
DEMO_MAX_SLICES = 300  # frames one demo session holds in memory (HU at full resolution)
# (DICOM keyword, panel key): the only header fields the metadata panel shows
SAFE_FIELDS: tuple[tuple[str, str], ...] = (
    ("Modality", "modality"),
    ("Manufacturer", "manufacturer"),
    ("ManufacturerModelName", "model_name"),
    ("SliceThickness", "slice_thickness_mm"),
    ("PixelSpacing", "pixel_spacing_mm"),
    ("KVP", "kvp"),
    ("ConvolutionKernel", "convolution_kernel"),
    ("Rows", "rows"),
    ("Columns", "columns"),
)
FUNCTIONAL_GROUPS = ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence")
MAX_TEXT = 64
UPLOAD_DIR_ENV = "GRADIO_TEMP_DIR"


def private_upload_dir() -> Path:
    """For entry points, before Gradio is imported (some of its modules read the variable on import):
    Gradio's upload and cache directory, $GRADIO_TEMP_DIR. The operator's when set, else a new directory
    only this user can open (0700), removed when the process exits. Gradio's default, /tmp/gradio, is
    shared by every user of the machine and never emptied: uploaded DICOM files (patient data) would
    stay there. `serving.demo.build_demo` calls it too, for entry points that did not."""
    configured = os.environ.get(UPLOAD_DIR_ENV)
    if configured:
        path = Path(configured)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path.resolve()
    path = Path(tempfile.mkdtemp(prefix="cthub-demo-"))
    os.environ[UPLOAD_DIR_ENV] = str(path)
    atexit.register(shutil.rmtree, path, True)
    return path.resolve()


def window_choices() -> list[str]:
    """The window presets of the viewer: the model's own mapping, the named CT windows, custom."""
    return [MODEL_DEFAULT, *WINDOW_PRESETS, CUSTOM]


# ---- the study --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewSlice:
    """One frame: pixels [H, W] (HU when `is_hu`, else grey 0..255; int16 when that is lossless) and where it
    came from (upload `file`, zip `member`, `frame`; `source` indexes `Study.metadata`)."""

    pixels: np.ndarray
    is_hu: bool
    position: float | None
    instance_number: int | None
    file: int
    member: int | None
    frame: int
    source: int

    def values(self) -> np.ndarray:
        """The intensities as float32 (what `ctdata.preprocess` maps)."""
        return self.pixels.astype(np.float32)


@dataclass(frozen=True)
class SliceResult:
    """The model's answer for one frame; `cam` [K, h, w] holds the map of every class."""

    probabilities: dict[str, float]
    decision: dict[str, Any]
    ood: dict[str, Any]
    cam: np.ndarray

    @property
    def label(self) -> str:
        return str(self.decision["label"])


@dataclass(frozen=True)
class Analysis:
    """A model's answers for every frame of a study, the series result and what the model is."""

    model_dir: str
    identity: dict[str, Any]
    labels: list[str]
    preprocessing: PreprocessConfig
    slices: list[SliceResult]
    series: dict[str, Any] | None
    ood_threshold: float | None


@dataclass(frozen=True)
class Study:
    """The analysed series: frames in anatomical order, safe metadata per source object, notes for the user
    (decoder warnings, what was left out), and the current model's analysis."""

    slices: list[ViewSlice]
    metadata: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    left_out: dict[str, Any] = field(default_factory=dict)
    analysis: Analysis | None = None

    def with_analysis(self, analysis: Analysis) -> Study:
        return dataclasses.replace(self, analysis=analysis)


def demo_settings(settings: ServeSettings) -> ServeSettings:
    """The API's settings with the demo's own bound on the slices one session holds."""
    return dataclasses.replace(settings, max_slices=min(settings.max_slices, DEMO_MAX_SLICES))


def compact(pixels: np.ndarray, is_hu: bool) -> np.ndarray:
    """HU as int16 when that is lossless (integral values in range: most CT), else float32."""
    arr = np.asarray(pixels, dtype=np.float32)
    if (
        is_hu
        and arr.size
        and np.array_equal(arr, np.rint(arr))
        and arr.min() >= -32768
        and arr.max() <= 32767
    ):
        return arr.astype(np.int16)
    return arr


def read_study(paths: list[Path], settings: ServeSettings) -> Study:
    """Uploads -> the frames of one series in anatomical order (see the module doc). Raises the single
    file's own CTHubError when nothing usable was sent, PayloadTooLargeError over the slice limit."""
    request = SeriesRequest()
    parsed = parse_members(expand_uploads(paths, settings), request)
    group = choose_series(parsed, settings, request)
    decoded = decode_series(group, settings, request)
    if not decoded:
        raise _nothing_usable(request)
    by_header = {id(p.dataset): p for p in group}
    keyed: list[tuple[tuple, ViewSlice]] = []
    metadata: list[dict[str, Any]] = []
    notes: list[str] = []
    for source, s in enumerate(decoded):
        metadata.append(safe_metadata(s.header))
        notes.extend(w for w in s.image.warnings if w not in notes)
        for sl, frame in slice_inputs(by_header[id(s.header)], s):
            view = ViewSlice(
                compact(frame, s.image.is_hu),
                s.image.is_hu,
                sl.position,
                sl.instance_number,
                sl.member.file,
                sl.member.member,
                sl.frame,
                source,
            )
            keyed.append((sl.sort_key, view))
        if len(keyed) > settings.max_slices:
            raise PayloadTooLargeError(f"more than {settings.max_slices} slices: the demo shows at most that")
        s.image.pixels = np.empty((0, 0, 0), np.float32)  # the frames above hold what is needed
    keyed.sort(key=lambda kv: kv[0])
    if any(v.position is None for _, v in keyed) and len(keyed) > 1:
        notes.append("some slices have no position: ordered by InstanceNumber, then upload order")
    return Study([v for _, v in keyed], metadata, notes, request.report())


def _nothing_usable(request: SeriesRequest) -> CTHubError:
    """The single file's own error, else the API's summary with what happened to each file."""
    err = no_series_error(request)
    lines = left_out_text(request.report())
    if any(err is e for e in request.errors) or not lines:
        return err
    return type(err)(f"{err}: {'; '.join(lines)}")


# ---- the model --------------------------------------------------------------------------------------------


def _chunks(items: list[ViewSlice], size: int) -> Iterator[list[ViewSlice]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def model_inputs(slices: list[ViewSlice], cfg: PreprocessConfig) -> np.ndarray:
    """Frames -> model inputs [B, C, S, S] through `ctdata.preprocess` (as the API prepares them)."""
    return np.stack(
        [unit_to_input(intensities_to_unit(s.values(), s.is_hu, cfg), cfg).numpy() for s in slices]
    )


def analyse(
    study: Study,
    model: ServedModel,
    model_dir: str,
    batch: int = 16,
    top_k: int = 3,
    ood_share: float = DEFAULT_SERIES_OOD_SHARE,
) -> Analysis:
    """Every frame through the model in batches of `batch`; the series result when there are several, its
    out-of-distribution verdict by the API's series rule (`results.series_ood`, share `ood_share`)."""
    cfg, labels = model.config.preprocessing, model.labels
    threshold, ood_threshold = model.config.threshold, model.ood_threshold
    answers: list[SliceResult] = []
    probs: list[np.ndarray] = []
    scores: list[float | None] = []
    for chunk in _chunks(study.slices, max(1, batch)):
        for out in model.run(model_inputs(chunk, cfg)):
            p = np.asarray(out["probabilities"], dtype=np.float64)
            s = out.get("ood_score")
            answers.append(
                SliceResult(
                    {k: float(v) for k, v in zip(labels, p, strict=True)},
                    results.decision(p, labels, threshold),
                    results.ood(s, ood_threshold),
                    np.asarray(out["cam"], dtype=np.float32),
                )
            )
            probs.append(p)
            scores.append(s)
    series = None
    if len(answers) > 1:
        series = results.aggregate_series(
            np.stack(probs),
            labels,
            threshold,
            top_k,
            scores,
            ood_threshold=ood_threshold,
            ood_share=ood_share,
        )
        series.pop("ood_median")
    return Analysis(model_dir, dict(model.identity), list(labels), cfg, answers, series, ood_threshold)


# ---- rendering --------------------------------------------------------------------------------------------


def preset_window(preset: str, base: PreprocessConfig) -> tuple[float, float] | None:
    """(center, width) the sliders show for a preset: a named window, or the bounds of the model's own
    interval/window mapping; None for per-slice min-max and for custom."""
    if preset in WINDOW_PRESETS:
        return WINDOW_PRESETS[preset]
    if preset != MODEL_DEFAULT or base.mapping == "minmax":
        return None
    lo, hi = base.hu_range if base.mapping == "interval" else base.window_bounds()
    return (lo + hi) / 2.0, hi - lo


def display_config(base: PreprocessConfig, preset: str, center: float, width: float) -> PreprocessConfig:
    """The display mapping: the model's own for MODEL_DEFAULT, else the window center/width (the sliders)."""
    if preset == MODEL_DEFAULT:
        return base
    return effective_preprocessing(base, center=float(center), width=float(width))


def render(
    sl: ViewSlice, cfg: PreprocessConfig, heat: np.ndarray | None = None, opacity: float = 0.4
) -> np.ndarray:
    """The frame at its own resolution through the display mapping, as RGB uint8 [H, W, 3]; with `heat`
    ([h, w] in [0, 1], upsampled to the frame) blended in at `opacity` (jet colour map)."""
    unit = intensities_to_unit(sl.values(), sl.is_hu, cfg)
    if heat is None or opacity <= 0:
        grey = np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    return overlay(unit, heat, alpha=float(np.clip(opacity, 0.0, 1.0)))


def pixel_value(sl: ViewSlice, x: int, y: int) -> float:
    """The stored value (HU, or grey for non-CT images) at column `x`, row `y`; InputError outside."""
    h, w = sl.pixels.shape
    if not (0 <= x < w and 0 <= y < h):
        raise InputError(f"pixel (x {x}, y {y}) is outside the {w} x {h} slice")
    return float(sl.pixels[y, x])


# ---- what the panels say ----------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A header value as JSON: numbers, short strings, lists of them."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [_plain(v) for v in value]
    if isinstance(value, bool):
        return value
    if isinstance(value, int):  # pydicom's IS
        return int(value)
    if isinstance(value, float):  # pydicom's DS
        return float(value)
    return str(value).strip()[:MAX_TEXT]


def _find(ds: Any, keyword: str) -> Any:
    """`keyword` at the top level, else in the first item of a functional group's macros (enhanced CT)."""
    if keyword in ds:
        return ds[keyword].value
    for group in FUNCTIONAL_GROUPS:
        seq = ds.get(group)
        if not seq:
            continue
        for elem in seq[0]:
            if elem.VR == "SQ" and elem.value and keyword in elem.value[0]:
                return elem.value[0][keyword].value
    return None


def safe_metadata(ds: Any) -> dict[str, Any]:
    """The allow-listed technical fields of a header (`SAFE_FIELDS`) and its transfer syntax; nothing else."""
    out: dict[str, Any] = {}
    for keyword, key in SAFE_FIELDS:
        value = _find(ds, keyword)
        if value is not None and value != "":
            out[key] = _plain(value)
    fm = getattr(ds, "file_meta", None)
    ts = fm.get("TransferSyntaxUID") if fm is not None else None
    if ts:
        out["transfer_syntax"] = ts.name or str(ts)
    return out


def mapping_text(cfg: PreprocessConfig) -> str:
    """The intensity mapping in words, e.g. 'window 35/80 HU' or 'interval -1024..3071 HU'."""
    if cfg.mapping == "window":
        lo, hi = cfg.window_bounds()
        name = f"{cfg.window} " if cfg.window and cfg.window_center is None else ""
        return f"window {name}{(lo + hi) / 2:g}/{hi - lo:g} HU"
    if cfg.mapping == "interval":
        return f"interval {cfg.hu_range[0]:g}..{cfg.hu_range[1]:g} HU"
    return "per-slice min-max"


def preprocessing_applied(cfg: PreprocessConfig, is_hu: bool) -> dict[str, Any]:
    """What the model's input was made of, in words and numbers."""
    return {
        "intensities": mapping_text(cfg)
        if is_hu
        else "grey 0..255 / 255 (not HU: the mapping does not apply)",
        "resize": f"bilinear with antialiasing to {cfg.input_size} x {cfg.input_size}",
        "channels": cfg.in_chans,
        "normalize": {"mean": list(cfg.mean), "std": list(cfg.std)},
    }


def rule_text(decision: dict[str, Any], labels: list[str]) -> str:
    """How a label was decided, in words."""
    if decision.get("rule") == "threshold":
        pos, neg = decision["positive_label"], next(x for x in labels if x != decision["positive_label"])
        return f"{pos} when p({pos}) ≥ {decision['threshold']:.2f}, else {neg} (operating point)"
    return "the most probable class"


def card_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The flat numbers a model card states (as `hub.card` lists them)."""
    return {
        k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def ood_text(verdict: dict[str, Any]) -> str | None:
    """The warning when the out-of-distribution verdict fires, else None."""
    if not verdict.get("warning"):
        return None
    return (
        f"Out of distribution: score {verdict['score']:.3g} is above the model's threshold "
        f"{verdict['threshold']:.3g}. This image does not resemble the model's training data; "
        "do not trust the prediction."
    )


def model_card_text(analysis: Analysis, method: str, pretraining_data: str, metrics: dict[str, Any]) -> str:
    """The model panel (Markdown): identity, pretraining, decision rule, input mapping, card metrics."""
    ident, cfg = analysis.identity, analysis.preprocessing
    stated = card_metrics(metrics)
    shown = " · ".join(f"{k} {v:.3g}" for k, v in sorted(stated.items())) or "none stated in its card"
    first = analysis.slices[0].decision if analysis.slices else {"rule": "argmax"}
    ood = (
        f"threshold {analysis.ood_threshold:.3g}"
        if analysis.ood_threshold is not None
        else "none in this export (re-export the model with its data to get one)"
    )
    return "\n".join(
        [
            f"**{ident.get('name', '?')}** · version `{ident.get('version', '?')}` · "
            f"{ident.get('backend', '?')} ({', '.join(ident.get('providers', []))})",
            f"- Pretraining: {method} on {pretraining_data}",
            f"- Classes: {', '.join(analysis.labels)}; decision: {rule_text(first, analysis.labels)}",
            f"- Model input: {mapping_text(cfg)}, {cfg.input_size} px",
            f"- Card metrics: {shown}",
            f"- Out-of-distribution reference: {ood}",
        ]
    )


def left_out_text(left_out: dict[str, Any]) -> list[str]:
    """One line per object that was not analysed (files by their index in the upload, as the API does)."""
    lines = []
    for r in left_out.get("rejected", []):
        lines.append(f"file {_where(r)} was not used: {r.get('detail', r.get('error', ''))}")
    for r in left_out.get("skipped", []):
        lines.append(f"file {_where(r)} was skipped: {r.get('reason', '')}")
    for r in left_out.get("other_series", []):
        files = ", ".join(str(f) for f in r.get("files", []))
        lines.append(
            f"files {files} ({r.get('objects')} objects, {r.get('modality')}) left out: {r.get('reason')}"
        )
    return lines


def _where(item: dict[str, Any]) -> str:
    member = item.get("member")
    return f"{item.get('file')}" + ("" if member is None else f" (zip member {member})")


PLAIN_SCORE = 0.8  # the score the calibration line explains
MIN_BIN_IMAGES = 5  # a reliability bin with fewer images says nothing in words


def _scored_bin(bins: list[dict[str, Any]], score: float = PLAIN_SCORE) -> dict[str, Any] | None:
    """The reliability bin holding `score` if it has `MIN_BIN_IMAGES` images, else the nearest that has."""
    filled = [b for b in bins if isinstance(b, dict) and (b.get("n") or 0) >= MIN_BIN_IMAGES]
    if not filled:
        return None
    return min(
        filled,
        key=lambda b: 0.0 if b["lo"] < score <= b["hi"] else min(abs(b["lo"] - score), abs(b["hi"] - score)),
    )


def calibration_text(calibration: dict[str, Any] | None) -> str:
    """One plain-language line on what the probabilities mean, from the calibration in use (`calibration` of
    `/model`): where T was fitted and, from the reliability data measured after calibration, how often the
    model was right on the slices it scored about 0.8 there (the nearest bin with enough slices)."""
    cal = calibration or {}
    if cal.get("status") != "calibrated":
        return (
            "- Calibration: none (uncalibrated): the probabilities are the model's raw softmax; what a "
            "score of 0.8 means on real data has not been measured."
        )
    fit, ev = cal.get("fitted_on") or {}, cal.get("evaluated_on") or {}
    data = Path(str(fit.get("data") or "its data")).name
    t = f"T = {float(cal['temperature']):.3g}, version {cal.get('version')}"
    if cal.get("site"):
        line = f"- Recalibrated at {cal['site']} on {fit.get('n')} images of {data} ({t})"
        on = "on that set"
    else:
        line = f"- Calibrated on the {fit.get('n')} {fit.get('split')} images of {data} ({t})"
        on = f"on {ev.get('n')} {ev.get('split')} images"
    b = _scored_bin(cal.get("reliability") or [])
    if b is not None:
        line += (
            f": {on}, of the slices scored {b['lo']:.2f}-{b['hi']:.2f} for their top class, "
            f"{100 * b['accuracy']:.0f}% were that class ({b['n']} slices)"
        )
    op = cal.get("operating_point")
    if isinstance(op, dict) and op.get("sensitivity") is not None:
        line += (
            f"; operating threshold {float(op['threshold']):.2f}: sensitivity "
            f"{float(op['sensitivity']):.2f}, specificity {float(op['specificity']):.2f} there"
        )
    return line + "."
