"""A series on disk -> the DICOM SR to store with it, in this process, through the serving code.

The loop runs the model itself rather than posting each series to a running `cthub serve`: `SeriesReporter`
is the REST API's `/report` without HTTP. It uses the same `serving.analysis.Analyzer` (decoding, the one
preprocessing path, anatomical ordering, the series rule), the same verified ONNX model
(`serving.inference.InferenceEngine`: checksum, exported from these weights and this preprocessing) and the
same SR writer (`serving.report.write_sr` fed by `serving.analysis.report_content`), so a series gets the
same SR from the PACS loop as from `POST /report`. What doing it here adds: no second server to start and keep
running, no series of hundreds of megabytes sent once more over HTTP, and the per-instance outcome (which
instances were refused and why), which the failure records need and the SR cannot carry.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cthub.errors import CTHubError, UnprocessableInputError
from serving.settings import ServeSettings

log = logging.getLogger(__name__)


class SeriesRefused(UnprocessableInputError):
    """Nothing in a series could be analysed: the analysis's error, and what each object was left out for."""

    def __init__(
        self,
        error: CTHubError,
        rejected: list[dict[str, Any]],
        skipped: list[dict[str, Any]],
        other_series: list[dict[str, Any]],
    ) -> None:
        super().__init__(str(error))
        self.error, self.rejected, self.skipped, self.other_series = error, rejected, skipped, other_series


@dataclass
class SeriesReport:
    """The SR of one series and what went into it (indices and reasons only, no header values)."""

    sr: Any  # pydicom Dataset (highdicom ComprehensiveSR)
    label: str
    slices: int
    overlays: list[Any] = field(default_factory=list)  # Secondary Capture datasets (`cam=True`)
    maps: list[Any] = field(default_factory=list)  # Parametric Map datasets (`cam=True`)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    other_series: list[dict[str, Any]] = field(default_factory=list)


class SeriesReporter:
    """One model, loaded once: `report(files)` -> SeriesReport, or SeriesRefused when nothing in the files
    can be analysed (messages describe the files, never the patient)."""

    def __init__(self, model: str | Path, settings: ServeSettings | None = None, cam: bool = False) -> None:
        from serving.inference import InferenceEngine, resolve_model_dir

        base = settings or ServeSettings.from_env()
        self.settings = dataclasses.replace(base, model=str(resolve_model_dir(model)))
        self.engine = InferenceEngine.open(self.settings)
        self.model = self.engine.served()
        self.cam = cam

    @property
    def allowed_modalities(self) -> tuple[str, ...]:
        return self.settings.allowed_modalities

    @property
    def max_slices(self) -> int:
        return self.settings.max_slices

    @property
    def identity(self) -> dict[str, Any]:
        return self.model.identity

    def report(self, files: list[Path]) -> SeriesReport:
        """Analyse the files of one series as `POST /report` does and write its SR (not stored yet), and
        with `cam` the overlay series (`pacs.overlay`)."""
        from serving.analysis import Analyzer, report_content
        from serving.report import quiet_header_warnings, write_sr

        outputs: list[dict[str, Any]] = []  # the model's outputs, in the order of the answer's slices

        def infer(batch: Any) -> list[dict[str, Any]]:
            out = self.engine.run(batch, maps=self.cam)  # the map nodes run only when overlays are wanted
            outputs.extend(out)
            return out

        try:
            model = dataclasses.replace(self.model, run=infer, run_without_maps=None)
            answer, request = Analyzer(self.settings, model).analyse_series(files, {})
        except CTHubError as e:
            raise SeriesRefused(e, *self._explain(files)) from None
        content = report_content(answer, request, self.model)
        sr = write_sr(request.headers, content)
        overlays: list[Any] = []
        maps: list[Any] = []
        if self.cam:
            try:
                with quiet_header_warnings():  # highdicom warns quoting unusual patient names
                    overlays = self._overlays(files, answer, request, outputs)
            except Exception as e:  # noqa: BLE001 -- optional: the SR goes to the PACS without them
                log.warning("no overlay series (%s): the SR is stored without it", type(e).__name__)
            try:
                maps = self._parametric_maps(answer, request, outputs, content.model)
            except Exception as e:  # noqa: BLE001 -- optional, as the overlays
                log.warning("no parametric map (%s): the SR is stored without it", type(e).__name__)
        return SeriesReport(
            sr=sr,
            label=str(answer["series"]["label"]),
            slices=len(answer["slices"]),
            overlays=overlays,
            maps=maps,
            rejected=[_reason(r, files) for r in request.rejected],
            skipped=list(request.skipped),
            other_series=list(request.other_series),
        )

    def _overlays(
        self, files: list[Path], answer: dict[str, Any], request: Any, outputs: list[dict[str, Any]]
    ) -> list[Any]:
        """The overlay series of the k slices that decided the series (see `pacs.overlay`)."""
        import numpy as np

        from ctdata.preprocess import intensities_to_unit
        from pacs.overlay import overlay_image, overlay_series
        from serving.inputs import load_dicom

        series, slices = answer["series"], answer["slices"]
        label, name = str(series["label"]), str(self.model.identity.get("name", "model"))
        c = self.model.labels.index(label)
        top = sorted(range(len(slices)), key=lambda i: -slices[i]["probabilities"][label])[: series["top_k"]]
        index = {where: i for i, where in enumerate(request.sources)}
        images = []
        for i in sorted(top):  # anatomical order
            s, cam = slices[i], outputs[i].get("cam")
            if cam is None:
                return []
            image = load_dicom(files[s["file"]].read_bytes(), self.settings).image
            frame = image.pixels[s["frame"]] if image.pixels.ndim == 3 else image.pixels
            unit = intensities_to_unit(frame, image.is_hu, self.model.config.preprocessing)
            rgb = overlay_image(unit, np.asarray(cam, dtype=np.float32)[c], label, name)
            images.append((index[(s["file"], s["member"])], rgb))
        return overlay_series(request.headers, images, label, name)

    def _parametric_maps(
        self, answer: dict[str, Any], request: Any, outputs: list[dict[str, Any]], identity: Any
    ) -> list[Any]:
        """The decided class's maps of the k deciding slices as a Parametric Map series on those slices
        (`serving.parametric_map`); [] when the model has no `cam` output."""
        import numpy as np

        from serving.parametric_map import write_parametric_maps

        series, slices = answer["series"], answer["slices"]
        label = str(series["label"])
        c = self.model.labels.index(label)
        top = sorted(range(len(slices)), key=lambda i: -slices[i]["probabilities"][label])[: series["top_k"]]
        index = {where: i for i, where in enumerate(request.sources)}
        if any(outputs[i].get("cam") is None for i in top):
            return []
        headers = [request.headers[index[(slices[i]["file"], slices[i]["member"])]] for i in sorted(top)]
        maps = [np.asarray(outputs[i]["cam"], dtype=np.float32)[c] for i in sorted(top)]
        return write_parametric_maps(headers, maps, label, identity)

    def _explain(self, files: list[Path]) -> tuple[list[dict[str, Any]], ...]:
        """Why each object of a refused series was left out (the analysis's own steps, run again on the
        failure path only: its error names the counts, the record wants each instance's reason)."""
        from serving.series import SeriesRequest, choose_series, decode_series, expand_uploads, parse_members

        request = SeriesRequest()
        try:
            parsed = parse_members(expand_uploads(files, self.settings), request)
            decode_series(choose_series(parsed, self.settings, request), self.settings, request)
        except CTHubError:
            pass  # a limit of the whole request: its error already says it
        return [_reason(r, files) for r in request.rejected], request.skipped, request.other_series


def _reason(rejected: dict[str, Any], files: list[Path]) -> dict[str, Any]:
    """An instance the analysis refused: its index in the PACS's listing of the series (the number its file
    is named by), the status the API would answer and the error."""
    i = rejected.get("file")
    index = int(files[i].stem) if isinstance(i, int) and files[i].stem.isdigit() else i
    keep = ("status", "error", "type", "reason", "detail")
    return {"index": index, "stage": "analyse"} | {k: rejected[k] for k in keep if k in rejected}
