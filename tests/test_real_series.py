"""Real CT series from ../shared/data/real_ct end to end: through a running `cthub serve` (/predict_series,
/report, /predict) and through the PACS loop (`cthub pacs --cam` with Debian's Orthanc).

- fnndsc_chest: 275 slices, JPEG 2000 lossless, file order not anatomical, every slice its own frame of
  reference: all within the default limits, answered in anatomical order, the SR referencing all 275;
- lung_pet_ct_dx: JPEG-LS lossless; an upload holding two patients' series keeps them apart (one analysed,
  the other listed, never mixed into the answer or the SR); through the PACS loop: SR and Parametric Map
  stored in the study, referencing the instances;
- ge_head_tilt: gantry tilt 18.5 degrees and uneven gaps (4, 1.1, 7 mm), uploaded shuffled: anatomical order
  along the tilted slice normal;
- de-identified slices (Type 2 attributes stripped here) through POST /report; a 12-bit JPEG Extended copy
  of a real slice (encoded here with imagecodecs) answered like the original; a retired syntax answered 415;
- the demo mounted at /ui of the same server, driven through gradio_client as the page drives it: a series
  uploaded as its files (ge_head_tilt) or a zip (a Lung-PET-CT-Dx study folder of two series; fnndsc_chest),
  the series slider covering every slice and walking them in anatomical order (ImagePositionPatient along
  the slice normal, read here from the headers), each shown slice with its own pixels and the model's answer.

One server (with its demo) and one PACS loop per module, one small model (ResNet50 at 64 px, random weights
calibrated on real slices). Files are read from ../shared (read-only) and edited copies made in memory or
in tmp_path.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from conftest import shared_file
from helpers import calibrated_resnet, png_pixels
from test_serving_demo import ANALYSIS, SLICE_OUTPUTS, view_args, windowed

from ctdata import read_dicom
from ctdata.preprocess import PreprocessConfig, prepare
from export import export_onnx
from export.session import OnnxClassifier
from hub import ModelConfig, save_pretrained
from pacs.orthanc import missing_parts
from pacs.records import read_records
from serving.audit import AuditLog
from serving.launch import QUIET, free_port, running_server
from serving.viewer import MODEL_DEFAULT, preset_window

pytestmark = pytest.mark.shared

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["chest", "head", "other"]
ATOL = 1e-5  # the server's ONNX Runtime session vs the same ONNX file called here on the same bytes
COMPREHENSIVE_SR, PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.30"
HANG_GUARD_S = 600.0  # only so a broken loop fails instead of hanging; no test measures speed
SALT = "real-series-salt"
TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
)


def real(folder: str, pattern: str = "*.dcm") -> list[Path]:
    files = sorted(shared_file("real_ct", folder).glob(pattern))
    if not files:
        pytest.skip(f"no {pattern} under ../shared/data/real_ct/{folder}")
    return files


def lung_series(patient: str) -> list[Path]:
    """The first (2.000000-...) series of a Lung-PET-CT-Dx patient."""
    return real("lung_pet_ct_dx", f"Lung_Dx-{patient}/*/2.*/*.dcm")


def header(src: Path | bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(src) if isinstance(src, bytes) else src, stop_before_pixels=True)


def along_normal(ds: pydicom.Dataset) -> float:
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    return float(np.array([float(v) for v in ds.ImagePositionPatient]) @ np.cross(iop[:3], iop[3:]))


def post_files(base: str, route: str, blobs: list[bytes], **fields: str) -> httpx.Response:
    parts = [("files", (f"f{i}.dcm", b, "application/dicom")) for i, b in enumerate(blobs)]
    return httpx.post(base + route, files=parts, data=fields, timeout=600)


def dciodvfy_errors(data: bytes, tmp_path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian dicom3tools) is not installed")
    path = tmp_path / "object.dcm"
    path.write_bytes(data)
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=300)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def evidence_sops(sr: pydicom.Dataset) -> list[str]:
    return [
        str(i.ReferencedSOPInstanceUID)
        for st in sr.CurrentRequestedProcedureEvidenceSequence
        for se in st.ReferencedSeriesSequence
        for i in se.ReferencedSOPSequence
    ]


def slice_groups(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    (measurements,) = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    return list(measurements.ContentSequence)[1:]  # the first group is the series result


def group_number(group: pydicom.Dataset, meaning: str) -> float:
    (item,) = [i for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeMeaning == meaning]
    return float(item.MeasuredValueSequence[0].NumericValue)


def group_image(group: pydicom.Dataset) -> str:
    (image,) = [i for i in group.ContentSequence if i.ValueType == "IMAGE"]
    return str(image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("real_series_model")
    cfg = ModelConfig(
        name="tiny-real", num_classes=3, labels=LABELS, preprocessing=PreprocessConfig(input_size=64)
    )
    calibration = [real("fnndsc_chest")[0], real("ge_head_tilt")[0]]
    out = save_pretrained(calibrated_resnet(cfg, calibration), root / "model", cfg)
    export_onnx(out, tolerance=1e-3)  # random weights: logits differ by ~1e-4 between runtimes
    return out


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> Callable[[bytes], np.ndarray]:
    """Probabilities of the exported model.onnx called here on ctdata.prepare of the bytes sent."""
    clf = OnnxClassifier(model_dir / "model.onnx", threads=1)
    pp = clf.config.preprocessing
    return lambda blob: clf.predict_proba(prepare(blob, pp)[None])[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[str]:
    """`cthub serve` with its default limits (the 275-slice series must fit them) and its demo at /ui."""
    root = tmp_path_factory.mktemp("real_series_serve")
    env = {"BENTOML_HOME": str(root / "bentoml"), "TMPDIR": str(root), "CTHUB_DEMO": "1"}
    with running_server(model_dir, root / "server.log", env=env) as srv:
        yield srv.base


# -- through the API --------------------------------------------------------------------------------------


def test_275_slice_jpeg2000_series_whole_and_in_order_and_its_sr_references_every_slice(
    server: str, reference: Callable[[bytes], np.ndarray], tmp_path: Path
) -> None:
    """One request, /report (the /predict_series analysis written as an SR): the order and the values are
    read back from the SR's per-slice groups."""
    files = real("fnndsc_chest")
    assert len(files) == 275
    blobs = [f.read_bytes() for f in files]
    heads = [header(b) for b in blobs]
    r = post_files(server, "/report", blobs)
    assert r.status_code == 200, r.text[:500]
    sr = pydicom.dcmread(io.BytesIO(r.content))
    assert sr.SOPClassUID == COMPREHENSIVE_SR and sr.StudyInstanceUID == heads[0].StudyInstanceUID
    assert sorted(evidence_sops(sr)) == sorted(str(h.SOPInstanceUID) for h in heads)  # every slice used
    order = sorted(range(275), key=lambda i: along_normal(heads[i]))
    assert order != list(range(275))  # the file order is not the anatomical one
    groups = slice_groups(sr)
    assert [group_image(g) for g in groups] == [str(heads[i].SOPInstanceUID) for i in order]
    for g, i in list(zip(groups, order, strict=True))[::91]:  # a few slices against the model called here
        got = np.array([group_number(g, f"Probability: {k}") for k in LABELS])
        np.testing.assert_allclose(got, reference(blobs[i]), atol=ATOL)
    assert dciodvfy_errors(r.content, tmp_path) == []


def test_two_patients_in_one_upload_are_kept_apart(server: str) -> None:
    first, second = lung_series("A0001")[:24], lung_series("A0002")[:8]  # JPEG-LS lossless; part of each
    blobs = [f.read_bytes() for f in first + second]
    order = [int(i) for i in np.random.default_rng(3).permutation(len(blobs))]
    sent = [blobs[i] for i in order]
    heads = [header(b) for b in sent]
    assert len({h.PatientID for h in heads}) == 2
    r = post_files(server, "/predict_series", sent)
    assert r.status_code == 200, r.text[:500]
    answer = r.json()
    analysed = {s["file"] for s in answer["slices"]}
    assert len(analysed) == len(first) and len({heads[i].PatientID for i in analysed}) == 1
    assert {heads[i].SeriesInstanceUID for i in analysed} == {header(first[0]).SeriesInstanceUID}
    (other,) = answer["other_series"]
    assert sorted(other["files"]) == sorted(set(range(len(sent))) - analysed)

    r = post_files(server, "/report", sent)
    assert r.status_code == 200, r.text[:500]
    sr = pydicom.dcmread(io.BytesIO(r.content))
    assert sr.PatientID == header(first[0]).PatientID
    assert sorted(evidence_sops(sr)) == sorted(str(header(f).SOPInstanceUID) for f in first)


def test_gantry_tilt_and_uneven_gaps_in_anatomical_order(server: str, tmp_path: Path) -> None:
    files = real("ge_head_tilt")
    blobs = [f.read_bytes() for f in files]
    shuffled = [int(i) for i in np.random.default_rng(5).permutation(len(blobs))]
    sent = [blobs[i] for i in shuffled]
    heads = [header(b) for b in sent]
    assert {float(h.GantryDetectorTilt) for h in heads} == {18.5}
    r = post_files(server, "/predict_series", sent)
    assert r.status_code == 200, r.text[:500]
    slices = r.json()["slices"]
    assert [s["instance_number"] for s in slices] == list(range(1, 29))  # instance order is anatomical here
    for s in slices:
        assert s["position_mm"] == pytest.approx(along_normal(heads[s["file"]]), abs=1e-3)
    gaps = np.diff([s["position_mm"] for s in slices])
    assert (gaps > 0).all() and gaps.min() < 1.5 and gaps.max() > 6.5  # 4, 1.1 and 7 mm apart
    r = post_files(server, "/report", sent)
    assert r.status_code == 200, r.text[:500]
    sr = pydicom.dcmread(io.BytesIO(r.content))
    assert len(evidence_sops(sr)) == 28 and len(slice_groups(sr)) == 28
    assert dciodvfy_errors(r.content, tmp_path) == []


@pytest.mark.parametrize("how", ["absent", "empty"])
def test_report_on_deidentified_slices(server: str, how: str, tmp_path: Path) -> None:
    for src in real("siim_contrast")[:3]:
        ds = pydicom.dcmread(src)
        for keyword in TYPE2:
            if how == "absent":
                ds.pop(keyword, None)
            else:
                setattr(ds, keyword, None)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        r = post_files(server, "/report", [buf.getvalue()])
        assert r.status_code == 200, r.text[:500]
        sr = pydicom.dcmread(io.BytesIO(r.content))
        assert evidence_sops(sr) == [str(ds.SOPInstanceUID)]
        assert all(str(sr[k].value or "") == "" for k in TYPE2)
        assert dciodvfy_errors(r.content, tmp_path) == []


@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "StudyInstanceUID"])
def test_report_without_a_type1_reference_is_422_naming_it(server: str, keyword: str) -> None:
    ds = pydicom.dcmread(real("siim_contrast")[0])
    setattr(ds, keyword, "")  # emptied by a broken anonymiser: the SR cannot reference the image
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    r = post_files(server, "/report", [buf.getvalue()])
    assert r.status_code == 422, r.text[:500]
    assert keyword in r.json()["detail"]


def _as_jpeg(src: Path, syntax: str, stream: bytes) -> bytes:
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(src)
    ds.PixelData = encapsulate([stream])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = syntax
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_12bit_jpeg_extended_is_answered_and_a_retired_syntax_is_415(
    server: str, reference: Callable[[bytes], np.ndarray]
) -> None:
    imagecodecs = pytest.importorskip("imagecodecs")
    src = real("fnndsc_chest")[0]
    pixels = pydicom.dcmread(src).pixel_array
    stream = imagecodecs.jpeg8_encode(pixels, level=95, bitspersample=12)
    jpeg12 = _as_jpeg(src, "1.2.840.10008.1.2.4.51", stream)
    r = httpx.post(server + "/predict", files={"file": ("a.dcm", jpeg12)}, timeout=120)
    assert r.status_code == 200, r.text[:500]
    got = np.array([r.json()["probabilities"][k] for k in LABELS])
    np.testing.assert_allclose(got, reference(src.read_bytes()), atol=0.02)  # lossy: close, not equal

    retired = _as_jpeg(src, "1.2.840.10008.1.2.4.55", stream)
    r = httpx.post(server + "/predict", files={"file": ("a.dcm", retired)}, timeout=120)
    assert r.status_code == 415, r.text[:500]
    body = r.json()
    assert body["error"] == "unsupported_media_type" and body["reason"] == "unsupported_transfer_syntax"
    assert "1.2.840.10008.1.2.4.55" in body["detail"] and "retired" in body["detail"]


# -- through the demo's series slider (the demo mounted at /ui of the same server) ------------------------


class DemoPage:
    """One gradio_client session on the mounted demo: `load` is the upload box, `show` the slice slider."""

    def __init__(self, base: str, downloads: Path) -> None:
        from gradio_client import Client

        self.client = Client(f"{base}/ui/", verbose=False, download_files=str(downloads))

    def call(self, api: str, *args: Any, names: tuple[str, ...]) -> dict[str, Any]:
        out = self.client.predict(*args, api_name=api)
        assert len(out) == len(names), (api, len(out))
        return dict(zip(names, out, strict=True))

    def load(self, files: list[Path]) -> dict[str, Any]:
        from gradio_client import handle_file

        return self.call("/load", [handle_file(str(f)) for f in files], None, *view_args(), names=ANALYSIS)

    def show(self, number: int) -> dict[str, Any]:
        return self.call("/show_slice", *view_args(slice=number), names=SLICE_OUTPUTS)


def probabilities(label: dict[str, Any]) -> np.ndarray:
    got = {c["label"]: c["confidence"] for c in label["confidences"]}
    return np.array([got[k] for k in LABELS])


def zipped(path: Path, members: dict[str, Path]) -> list[Path]:
    """A zip of real files under the given member names (stored: the files are compressed already); the
    files in the order the demo numbers the members (by name, as `ctdata.series.iter_zip_members` reads)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, src in members.items():
            z.write(src, name)
    return [members[name] for name in sorted(members)]


def walk_slider(
    page: DemoPage, loaded: dict[str, Any], n: int, step: int = 1
) -> Iterator[tuple[int, dict[str, Any]]]:
    """The slider as loaded (all `n` slices reachable), then moved to slice 1, 1 + step, ... and n: each
    slice number with its view."""
    slider = loaded["slice"]
    assert slider["maximum"] == n and slider["interactive"] is True and slider["visible"] is True
    assert slider["label"] == f"Slice ({n} in anatomical order)"
    for k in sorted({*range(1, n + 1, step), n}):
        shown = page.show(k)
        assert shown["details"]["slice"]["index"] == k - 1 and f"Slice **{k}** of {n}" in shown["info"]
        yield k, shown


def shows_the_slice(shown: dict[str, Any], src: Path, window: tuple[float, float]) -> None:
    """The displayed image is `src`'s own pixels at their resolution, in the model's own mapping."""
    hu = read_dicom(src).pixels[0]
    image = png_pixels(shown["image"])
    assert image.shape == (*hu.shape, 3) and np.abs(image[..., 0] - windowed(hu, *window)).max() <= 1


@pytest.fixture
def page(server: str, gradio_client_temp_dir: Path) -> Iterator[DemoPage]:
    """A new session (its own study) on the demo of the module's server; closed after the test (its open
    heartbeat stream would otherwise hold the server's graceful shutdown)."""
    session = DemoPage(server, gradio_client_temp_dir / "downloads")
    try:
        yield session
    finally:
        session.client.close()


@pytest.fixture(scope="module")
def window(model_dir: Path) -> tuple[float, float]:
    """(center, width) of the model's own mapping: what the demo shows before a preset is picked."""
    found = preset_window(MODEL_DEFAULT, ModelConfig.load(model_dir).preprocessing)
    assert found is not None
    return found


def test_demo_slider_walks_the_gantry_tilted_series_in_anatomical_order(
    page: DemoPage, reference: Callable[[bytes], np.ndarray], window: tuple[float, float]
) -> None:
    """ge_head_tilt uploaded as its 28 files in a shuffled order: the slider reaches every slice once, in
    increasing position along the tilted slice normal (gaps of 1.1 to 7 mm), each with its own answer."""
    files = real("ge_head_tilt")
    assert len(files) == 28
    sent = [files[int(i)] for i in np.random.default_rng(7).permutation(len(files))]
    heads = [header(f) for f in sent]
    order = []
    for _, shown in walk_slider(page, page.load(sent), 28):
        d = shown["details"]["slice"]
        head = heads[d["file"]]
        assert d["member"] is None and d["instance_number"] == int(head.InstanceNumber)
        assert "other series" not in shown["info"]
        assert d["position_mm"] == pytest.approx(along_normal(head), abs=1e-3)
        got = probabilities(shown["probabilities"])
        np.testing.assert_allclose(got, reference(sent[d["file"]].read_bytes()), atol=ATOL)
        shows_the_slice(shown, sent[d["file"]], window)
        order.append(d["file"])
    assert sorted(order) == list(range(28)) and order != list(range(28))  # every file once, not upload order
    gaps = np.diff([along_normal(heads[i]) for i in order])
    assert (gaps > 0).all() and gaps.min() < 1.5 and gaps.max() > 6.5


def test_demo_keeps_the_series_of_a_jpegls_study_apart(
    page: DemoPage, reference: Callable[[bytes], np.ndarray], window: tuple[float, float], tmp_path: Path
) -> None:
    """A Lung-PET-CT-Dx study folder zipped as downloaded (JPEG-LS): two series of 30 slices at the same
    positions (B70f and B40f kernels). The slider shows one series, all of it, in anatomical order; the
    other is named in the notes, never mixed in."""
    study = shared_file("real_ct", "lung_pet_ct_dx", "Lung_Dx-A0002")
    archive = tmp_path / "study.zip"
    files = zipped(archive, {f.relative_to(study).as_posix(): f for f in study.glob("*/*/*.dcm")})
    heads = [header(f) for f in files]
    assert len(files) == 60 and len({h.SeriesInstanceUID for h in heads}) == 2
    loaded = page.load([archive])
    assert "files 0 (30 objects, CT) left out: another series than the analysed one" in loaded["notes"]
    assert loaded["details"]["other_series"] == [
        {"modality": "CT", "files": [0], "objects": 30, "reason": "another series than the analysed one"}
    ]
    order = []
    for k, shown in walk_slider(page, loaded, 30):
        assert "1 other series of the upload not shown (see Notes)" in shown["info"]
        d = shown["details"]["slice"]
        assert d["file"] == 0 and d["position_mm"] == pytest.approx(
            along_normal(heads[d["member"]]), abs=1e-3
        )
        if k % 6 == 1:  # a few slices against the model and the pixels read here
            got = probabilities(shown["probabilities"])
            np.testing.assert_allclose(got, reference(files[d["member"]].read_bytes()), atol=ATOL)
            shows_the_slice(shown, files[d["member"]], window)
        order.append(d["member"])
    assert len(set(order)) == 30 and len({heads[m].SeriesInstanceUID for m in order}) == 1
    assert (np.diff([along_normal(heads[m]) for m in order]) > 0).all()


def test_demo_slider_covers_the_275_slice_jpeg2000_series(
    page: DemoPage, reference: Callable[[bytes], np.ndarray], window: tuple[float, float], tmp_path: Path
) -> None:
    """fnndsc_chest zipped in file order (not anatomical): within the demo's limits, the slider spans all 275
    slices; moved by 11 (26 stops, first and last included: showing each of the 275 would triple the
    test's time) it passes slices of increasing position along the normal, from the lowest to the highest."""
    archive = tmp_path / "chest.zip"
    files = zipped(archive, {f.name: f for f in real("fnndsc_chest")})
    assert len(files) == 275
    heads = [header(f) for f in files]
    positions = sorted(along_normal(h) for h in heads)
    seen = []
    for k, shown in walk_slider(page, page.load([archive]), 275, step=11):
        d = shown["details"]["slice"]
        head = heads[d["member"]]
        assert d["file"] == 0 and d["position_mm"] == pytest.approx(along_normal(head), abs=1e-3)
        assert along_normal(head) == positions[k - 1]  # the k-th slice in anatomical order
        if k in (1, 133, 275):  # a few slices against the model and the pixels read here
            got = probabilities(shown["probabilities"])
            np.testing.assert_allclose(got, reference(files[d["member"]].read_bytes()), atol=ATOL)
            shows_the_slice(shown, files[d["member"]], window)
        seen.append(d["member"])
    assert len(set(seen)) == len(seen) == 26 and seen != sorted(seen)  # not the file order


# -- through the PACS loop --------------------------------------------------------------------------------


class PacsLoop:
    """`cthub pacs --cam` in a subprocess (it starts and stops its Orthanc) and that Orthanc's REST API."""

    def __init__(self, root: Path, model_dir: Path) -> None:
        self.root, self.workdir = root, root / "pacs"
        self.http_port, self.dicom_port = free_port(), free_port()
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.http_port}", timeout=120)
        self.log = root / "cthub-pacs.log"
        env = dict(os.environ) | QUIET | {"PYTHONPATH": str(ROOT), "CTHUB_AUDIT_SALT": SALT}
        cmd = [
            sys.executable, "-m", "cthub", "pacs", "--model", str(model_dir), "--dir", str(self.workdir),
            "--http-port", str(self.http_port), "--dicom-port", str(self.dicom_port),
            "--stable-age", "5", "--poll", "0.2", "--cam",
        ]  # fmt: skip
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.wait(lambda: "cthub pacs is ready" in self.text(), "cthub pacs to start")

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, ready: Callable[[], Any], what: str) -> Any:
        deadline = time.monotonic() + HANG_GUARD_S
        while time.monotonic() < deadline:
            if (value := ready()) is not None and value is not False:
                return value
            if self.proc.poll() is not None:
                raise AssertionError(f"cthub pacs exited waiting for {what}:\n{self.text()[-4000:]}")
            time.sleep(0.3)
        raise AssertionError(f"no {what} within {HANG_GUARD_S:.0f} s (hang guard):\n{self.text()[-4000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=60)
        self.http.close()

    def push(self, blobs: list[bytes]) -> None:
        for blob in blobs:
            r = self.http.post("/instances", content=blob, headers={"Content-Type": "application/dicom"})
            assert r.status_code == 200, r.text

    def record_of(self, series_uid: str, instances: int) -> dict[str, Any]:
        """The record of the series once all its `instances` were in the PACS (a push slower than the
        stable age lets Orthanc call a series stable early: the loop reports it again when it grows)."""
        pseudonym = AuditLog(SALT).pseudonym(series_uid)

        def found() -> dict[str, Any] | None:
            records = read_records(self.workdir / "records.jsonl")
            hits = [r for r in records if r["series"] == pseudonym and r.get("instances") == instances]
            return hits[0] if hits else None

        return self.wait(found, "the record of the series")

    def instances_of_series(self, series_uid: str) -> list[pydicom.Dataset]:
        hits = self.http.post("/tools/lookup", content=series_uid).json()
        (hit,) = [h for h in hits if h["Type"] == "Series"]
        ids = self.http.get(f"/series/{hit['ID']}").json()["Instances"]
        return [pydicom.dcmread(io.BytesIO(self.http.get(f"/instances/{i}/file").content)) for i in ids]


@pytest.fixture(scope="module")
def pacs_loop(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[PacsLoop]:
    missing = missing_parts()
    if missing is not None:
        pytest.skip(f"needs Debian's Orthanc: {missing}")
    loop = PacsLoop(tmp_path_factory.mktemp("real_series_pacs"), model_dir)
    try:
        yield loop
    finally:
        loop.stop()


def test_pacs_loop_stores_sr_and_parametric_map_for_a_real_jpegls_series(
    pacs_loop: PacsLoop, tmp_path: Path
) -> None:
    files = lung_series("A0001")[:24]  # 24 consecutive slices of the 64: the loop's time stays small
    heads = [header(f) for f in files]
    pacs_loop.push([f.read_bytes() for f in files])
    series_uid = str(heads[0].SeriesInstanceUID)
    record = pacs_loop.record_of(series_uid, len(files))
    assert record["event"] == "stored", record
    assert record["slices"] == len(files) and record["rejected"] == [] and record["maps"] == 1

    audit = AuditLog(SALT)
    (sr,) = pacs_loop.instances_of_series(_series_uid_of(pacs_loop, record["report_series"], audit))
    assert sr.SOPClassUID == COMPREHENSIVE_SR and sr.StudyInstanceUID == heads[0].StudyInstanceUID
    assert sorted(evidence_sops(sr)) == sorted(str(h.SOPInstanceUID) for h in heads)  # every instance used
    assert dciodvfy_errors(_bytes(sr), tmp_path) == []

    (pm,) = pacs_loop.instances_of_series(_series_uid_of(pacs_loop, record["map_series"], audit))
    assert pm.SOPClassUID == PARAMETRIC_MAP and pm.Modality == "CT" and pm.Manufacturer == "ct-ssl-hub"
    assert pm.StudyInstanceUID == heads[0].StudyInstanceUID
    assert pm.FrameOfReferenceUID == heads[0].FrameOfReferenceUID
    by_sop = {str(h.SOPInstanceUID): h for h in heads}
    assert int(pm.NumberOfFrames) == 3  # the k = 3 slices that decided the series
    for frame in pm.PerFrameFunctionalGroupsSequence:
        (ref,) = frame.DerivationImageSequence[0].SourceImageSequence
        src = by_sop[str(ref.ReferencedSOPInstanceUID)]
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, [float(v) for v in src.ImagePositionPatient], atol=1e-3)
    assert dciodvfy_errors(_bytes(pm), tmp_path) == []
    assert str(heads[0].PatientName) not in pacs_loop.text()  # single-component names: no warning quotes them


def _series_uid_of(loop: PacsLoop, pseudonym: str, audit: AuditLog) -> str:
    """The Series Instance UID, among the PACS's series, whose pseudonym the record carries."""
    for orthanc_id in loop.http.get("/series").json():
        uid = loop.http.get(f"/series/{orthanc_id}").json()["MainDicomTags"]["SeriesInstanceUID"]
        if audit.pseudonym(uid) == pseudonym:
            return str(uid)
    raise AssertionError("no series of the PACS has the recorded pseudonym")


def _bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
