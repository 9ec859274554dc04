"""The API's work without BentoML: uploads -> JSON answers and SR reports, with inference injected.

`Analyzer` decodes and preprocesses through `ctdata` (the one preprocessing path, with the served model's
config), sends model inputs to the `ServedModel`'s `run` (in the server: the API worker's batcher or the
inference service; elsewhere an `InferenceEngine.run`) and builds the answers. Every refusal is a `CTHubError`
(`serving.inputs.http_status` gives its status); `audit` dicts passed in receive the request's audit details
(model sha256, slice count, Study/Series Instance UIDs, which `serving.audit` turns into pseudonyms).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctdata.dicom import CTImage
from ctdata.preprocess import PreprocessConfig, intensities_to_unit, unit_to_input
from cthub.errors import CTHubError, PayloadTooLargeError
from serving import results
from serving.inference import ServedModel
from serving.inputs import (
    crop_region,
    effective_preprocessing,
    error_body,
    http_status,
    input_expectation,
    load_dicom,
    load_picture,
    region_warning,
)
from serving.report import ReportContent, SliceFinding, to_bytes, write_sr
from serving.series import (
    Parsed,
    SeriesRequest,
    SliceInput,
    choose_series,
    decode_series,
    expand_uploads,
    no_series_error,
    parse_members,
    slice_inputs,
)
from serving.settings import ServeSettings


@dataclass(frozen=True)
class Options:
    """Per-request choices of the single-image endpoints."""

    cam: bool = False
    window: str | None = None
    window_center: float | None = None
    window_width: float | None = None
    region: tuple[int, int, int, int] | None = None  # x0,y0,x1,y1 of the image: only that box is classified


@dataclass
class _Prepared:
    """One image ready for the model, with what its answer reports besides the model's output."""

    unit: np.ndarray
    model_input: torch.Tensor
    preprocessing: PreprocessConfig
    warnings: list[str]
    image: dict[str, Any]
    timing: dict[str, float]


def _ms(t0: float) -> float:
    return round(1000 * (time.perf_counter() - t0), 2)


class Analyzer:
    """Answers of every inference endpoint for one served model."""

    def __init__(self, settings: ServeSettings, model: ServedModel) -> None:
        self.settings, self.model = settings, model

    # -- single images ---------------------------------------------------------------------------------

    def predict_dicom(self, data: bytes, opts: Options, audit: dict[str, Any]) -> dict[str, Any]:
        """POST /predict: one DICOM object (its first frame) -> answer."""
        t0 = time.perf_counter()
        cfg = effective_preprocessing(
            self.model.config.preprocessing, opts.window, opts.window_center, opts.window_width
        )
        s = load_dicom(data, self.settings)
        audit.update(study_uid=s.header.get("StudyInstanceUID"), series_uid=s.header.get("SeriesInstanceUID"))
        decode_ms = _ms(t0)
        prepared = self._prepare(s.image, cfg, decode_ms, opts.region)
        return self._answer_one(prepared, opts.cam, audit)

    def predict_picture(self, data: bytes, opts: Options, audit: dict[str, Any]) -> dict[str, Any]:
        """POST /predict_image: a PNG/JPEG of a slice already windowed for display -> answer."""
        t0 = time.perf_counter()
        image = load_picture(data, self.settings)
        prepared = self._prepare(image, self.model.config.preprocessing, _ms(t0), opts.region)
        prepared.warnings.append(
            "picture input: taken as already windowed (grey 0-255), not Hounsfield units; the model's "
            f"own mapping ({self.model.config.preprocessing.mapping}) was not applied"
        )
        return self._answer_one(prepared, opts.cam, audit)

    def predict_many(
        self,
        blobs: list[bytes | CTHubError],
        audit: dict[str, Any],
        region: tuple[int, int, int, int] | None = None,
    ) -> list[dict[str, Any]]:
        """POST /predict_batched: several DICOM objects -> one answer each, in order (errors in place);
        `region` classifies the same box of each (a slice it does not fit is answered with its error)."""
        prepared: list[_Prepared | CTHubError] = []
        for blob in blobs:
            try:
                if isinstance(blob, CTHubError):
                    raise blob
                t0 = time.perf_counter()
                s = load_dicom(blob, self.settings)
                prepared.append(self._prepare(s.image, self.model.config.preprocessing, _ms(t0), region))
            except CTHubError as e:
                prepared.append(e)
        ok = [p for p in prepared if isinstance(p, _Prepared)]
        items = iter(self._run([p.model_input for p in ok]))
        audit.update(slices=len(ok))
        out: list[dict[str, Any]] = []
        for p in prepared:
            if isinstance(p, CTHubError):
                out.append(error_body(p) | {"status": http_status(p)})
            else:
                out.append(self._slice_answer(next(items), p))
        return out

    def _prepare(
        self,
        image: CTImage,
        cfg: PreprocessConfig,
        decode_ms: float,
        region: tuple[int, int, int, int] | None = None,
    ) -> _Prepared:
        t1 = time.perf_counter()
        base = self.model.config.preprocessing
        notes = list(image.warnings)
        expectation = input_expectation(self.model.config.metrics, self.model.config.provenance)
        if note := region_warning(expectation, region):
            notes.append(note)
        if cfg != base:
            notes.append(
                "window override: the model was trained with its own preprocessing "
                f"({base.mapping}); predictions under another window may be unreliable"
            )
            if not image.is_hu:
                notes.append("window override ignored: the image is not in Hounsfield units")
        frames = image.pixels.shape[0] if image.pixels.ndim == 3 else 1
        if frames > 1:
            notes.append(f"multi-frame image ({frames} frames): only the first frame was used")
        frame = image.pixels[0] if image.pixels.ndim == 3 else image.pixels
        if region is not None:
            frame = crop_region(frame, region)
        unit = intensities_to_unit(frame, image.is_hu, cfg)
        x = unit_to_input(unit, cfg)
        return _Prepared(
            unit=unit,
            model_input=x,
            preprocessing=cfg,
            warnings=notes,
            image={
                "source": image.source,
                "rows": int(unit.shape[-2]),
                "columns": int(unit.shape[-1]),
                "hounsfield": bool(image.is_hu),
                "region": None if region is None else list(region),
            },
            timing={"decode": decode_ms, "preprocess": _ms(t1)},
        )

    def _answer_one(self, p: _Prepared, cam: bool, audit: dict[str, Any]) -> dict[str, Any]:
        t2 = time.perf_counter()
        item = self._run([p.model_input], maps=cam)[0]
        p.timing["inference"] = _ms(t2)
        answer = self._slice_answer(item, p)
        if cam:
            answer["cam"] = self._cam(item, p.unit, answer["label"])
        audit.update(slices=1)
        return answer

    def _slice_answer(self, item: dict[str, Any], p: _Prepared) -> dict[str, Any]:
        probs = np.asarray(item["probabilities"], dtype=np.float64)
        decided = results.decision(probs, self.model.labels, self.model.config.threshold)
        verdict = results.ood(item.get("ood_score"), self.model.ood_threshold)
        warnings = list(p.warnings)
        if note := results.ood_note(verdict):
            warnings.append(note)
        return {
            "label": decided["label"],
            "probabilities": {k: float(v) for k, v in zip(self.model.labels, probs, strict=True)},
            "decision": decided,
            "ood": verdict,
            "calibration": self.model.calibration_block,
            "model": self.model.info,
            "preprocessing": p.preprocessing.to_dict(),
            "warnings": warnings,
            "image": p.image,
            "timing_ms": p.timing
            | {
                "model": item.get("model_ms"),
                "model_cpu": item.get("model_cpu_ms"),
                "batch_size": item.get("batch_size"),
            },
        }

    def _cam(self, item: dict[str, Any], unit: np.ndarray, label: str) -> dict[str, Any]:
        """The class activation map of the decided class as a PNG overlay (base64), or why there is none."""
        cam = item.get("cam")
        if cam is None:
            return {"available": False, "detail": "the exported model has no 'cam' output: re-export it"}
        maps = np.asarray(cam, dtype=np.float32)
        c = self.model.labels.index(label)
        return {
            "available": True,
            "class": label,
            "map_size": list(maps.shape[-2:]),
            "png_base64": results.cam_overlay_png(unit, maps[c]),
            "media_type": "image/png",
        }

    def _run(self, inputs: list[torch.Tensor], maps: bool = False) -> list[dict[str, Any]]:
        """Model outputs for model inputs, sent in chunks of at most the service's batch size; the class
        activation maps only with `maps` (otherwise their nodes are not run)."""
        out: list[dict[str, Any]] = []
        step = self.settings.max_batch
        for i in range(0, len(inputs), step):
            batch = torch.stack(inputs[i : i + step]).numpy()
            out.extend(self.model.infer(batch, maps))
        return out

    # -- series ----------------------------------------------------------------------------------------

    def analyse_series(
        self, paths: list[Path], audit: dict[str, Any]
    ) -> tuple[dict[str, Any], SeriesRequest]:
        """POST /predict_series (and /report): uploads -> per-slice results in anatomical order + the series
        result; other series, unusable and skipped objects reported by index."""
        t0 = time.perf_counter()
        request = SeriesRequest()
        parsed = parse_members(expand_uploads(paths, self.settings), request)
        group = choose_series(parsed, self.settings, request)
        decoded = decode_series(group, self.settings, request)
        if not decoded:
            raise no_series_error(request)
        cfg = self.model.config.preprocessing
        slices, inputs = self._series_inputs(group, decoded, cfg, request)
        first = group[0]
        request.study_uid, request.series_uid, request.modality = (
            first.study_uid,
            first.series_uid,
            first.modality,
        )
        audit.update(study_uid=request.study_uid, series_uid=request.series_uid, slices=len(slices))
        prep_ms = _ms(t0)
        t1 = time.perf_counter()
        items = self._run(inputs)
        answer = self._series_answer(slices, items, request)
        answer["timing_ms"] = {"decode_and_preprocess": prep_ms, "inference": _ms(t1), "total": _ms(t0)}
        return answer, request

    def _series_inputs(
        self, group: list[Parsed], decoded: list[Any], cfg: PreprocessConfig, request: SeriesRequest
    ) -> tuple[list[SliceInput], list[torch.Tensor]]:
        """Every frame of the decoded objects, preprocessed, in anatomical order."""
        by_header = {id(p.dataset): p for p in group}
        pairs: list[tuple[SliceInput, torch.Tensor]] = []
        for s in decoded:
            p = by_header[id(s.header)]
            for sl, frame in slice_inputs(p, s):
                unit = intensities_to_unit(frame, s.image.is_hu, cfg)
                pairs.append((sl, unit_to_input(unit, cfg)))
            s.image.pixels = np.empty((0, 0, 0), np.float32)  # decoded pixels are no longer needed
        if len(pairs) > self.settings.max_slices:
            raise PayloadTooLargeError(f"more than {self.settings.max_slices} slices in one request")
        pairs.sort(key=lambda pair: pair[0].sort_key)
        return [a for a, _ in pairs], [b for _, b in pairs]

    def _series_answer(
        self, slices: list[SliceInput], items: list[dict[str, Any]], request: SeriesRequest
    ) -> dict[str, Any]:
        labels, threshold = self.model.labels, self.model.config.threshold
        probs = np.asarray([it["probabilities"] for it in items], dtype=np.float64)
        ood_scores = [it.get("ood_score") for it in items]
        per_slice = []
        warnings: list[str] = []
        for i, (sl, it) in enumerate(zip(slices, items, strict=True)):
            verdict = results.ood(it.get("ood_score"), self.model.ood_threshold)
            per_slice.append(
                {
                    "index": i,
                    "file": sl.member.file,
                    "member": sl.member.member,
                    "frame": sl.frame,
                    "instance_number": sl.instance_number,
                    "position_mm": sl.position,
                    "label": results.decide(probs[i], labels, threshold),
                    "probabilities": {k: float(v) for k, v in zip(labels, probs[i], strict=True)},
                    "ood": verdict,
                }
            )
            warnings.extend(w for w in sl.warnings if w not in warnings)
        series = results.aggregate_series(
            probs,
            labels,
            threshold,
            self.settings.series_top_k,
            ood_scores,
            ood_threshold=self.model.ood_threshold,
            ood_share=self.settings.series_ood_share,
        )
        series.pop("ood_median")
        series["modality"] = request.modality
        if note := results.series_ood_note(series["ood"]):
            warnings.append(note)
        if any(sl.position is None for sl in slices):
            warnings.append("some slices have no position: ordered by InstanceNumber, then upload order")
        return {
            "series": series,
            "slices": per_slice,
            "calibration": self.model.calibration_block,
            "model": self.model.info,
            "preprocessing": self.model.config.preprocessing.to_dict(),
            "warnings": warnings,
            **request.report(),
        }

    def report(self, paths: list[Path], audit: dict[str, Any]) -> bytes:
        """POST /report: the series analysis as a DICOM Comprehensive SR (Part 10 bytes)."""
        answer, request = self.analyse_series(paths, audit)
        content = report_content(answer, request, self.model)
        return to_bytes(write_sr(request.headers, content))


def report_content(answer: dict[str, Any], request: SeriesRequest, model: ServedModel) -> ReportContent:
    """The SR content of a series answer: slices point at their source header (and 1-based frame)."""
    index = {where: i for i, where in enumerate(request.sources)}
    findings = []
    for s in answer["slices"]:
        source = index[(s["file"], s["member"])]
        frames = int(request.headers[source].get("NumberOfFrames", 1) or 1)
        findings.append(
            SliceFinding(
                source=source,
                label=s["label"],
                probabilities=s["probabilities"],
                frame=s["frame"] + 1 if frames > 1 else None,
                ood_score=s["ood"]["score"],
            )
        )
    series = answer["series"]
    return ReportContent(
        model=model.report_identity(),
        labels=model.labels,
        label=series["label"],
        scores=series["scores"],
        rule=series["rule"],
        slices=findings,
        ood_score=series["ood"]["score"],
        ood_threshold=model.ood_threshold,
        ood_warning=series["ood"]["warning"],
        calibration=model.calibration_block,
    )
