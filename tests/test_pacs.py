"""PACS in the loop against a real Orthanc (Debian's orthanc + orthanc-dicomweb), started by `cthub pacs` in a
temporary directory on free loopback ports, with a real exported classifier (ResNet50, 64 px).

Real CT files (pydicom, pydicom-data) rewritten into one series are pushed through Orthanc's REST API; the
SR is awaited in the same study through Orthanc's REST API, downloaded and read back: its labels and
probabilities (equal to the ONNX model called here on the same files), the series scores (the documented
series rule), its references to the study, series and instances it read, UNVERIFIED, `dciodvfy`; and the
`--cam` overlays of the deciding slices. Then a series with one malformed instance (reported without it),
WADO-RS fetching instances as stored (whole series and one by one), an unreadable series (a failure record
with each instance's reason, and the loop goes on), a non-CT series and the loop's own outputs (skipped,
with a record each), every StableSeries change answered by exactly one record, no patient data or UID in
records or logs, a restart that resumes from the saved position without processing anything twice, and no
Orthanc left behind by a killed command. Waits are bounded only as hang guards; nothing is mocked.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from helpers import calibrated_resnet

from ctdata.preprocess import PreprocessConfig, prepare
from export import export_onnx
from export.session import OnnxClassifier
from hub import ModelConfig, save_pretrained
from pacs.orthanc import missing_parts
from pacs.records import read_records
from serving.audit import AuditLog
from serving.launch import QUIET, free_port

ROOT = Path(__file__).resolve().parents[1]
MISSING = missing_parts()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"needs Debian's Orthanc: {MISSING}")

LABELS = ["liver", "kidney", "lung"]
SERIES = ("CT_small.dcm", "J2K_pixelrep_mismatch.dcm", "693_UNCI.dcm", "693_UNCR.dcm")  # JPEG 2000 included
PATIENT_NAME, PATIENT_ID = "Qwertzuiop^Pacsloop", "PACSLOOP-4711"
SALT = "pacs-test-salt"
HANG_GUARD_S = 300.0  # only so a broken loop fails instead of hanging; no test measures speed
ATOL = 1e-5  # the loop's ONNX Runtime session vs the same ONNX file called here on the same bytes
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def ct_file(name: str) -> Path:
    from pydicom.data import get_testdata_file

    p = get_testdata_file(name, download=False)
    if p is None:
        pytest.skip(f"needs {name} (pydicom-data)")
    return Path(p)


@dataclass
class Series:
    """A series made here: its UIDs, each instance's bytes, and which instances were damaged."""

    study_uid: str
    series_uid: str
    sops: list[str]
    blobs: list[bytes]
    bad: set[int] = field(default_factory=set)

    def good(self) -> list[int]:
        return [i for i in range(len(self.sops)) if i not in self.bad]


def make_series(names: tuple[str, ...], bad: frozenset[int] = frozenset(), modality: str = "CT") -> Series:
    """Real files given one patient, study and series, distinct SOP Instance UIDs, positions 5 mm apart
    along z in upload order; instances in `bad` get their pixel data cut to 1000 bytes (Orthanc stores
    them: it does not decode pixels)."""
    from pydicom.uid import generate_uid

    study, series, frame_of_ref = generate_uid(), generate_uid(), generate_uid()
    sops: list[str] = []
    blobs: list[bytes] = []
    for i, name in enumerate(names):
        ds = pydicom.dcmread(ct_file(name))
        sop = generate_uid()
        ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_ref
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.Modality = modality
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0.0, 0.0, 5.0 * i]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        if i in bad:
            ds.PixelData = ds.PixelData[:1000]
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        sops.append(str(sop))
        blobs.append(buf.getvalue())
    return Series(study, series, sops, blobs, set(bad))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pacs_model")
    cfg = ModelConfig(
        name="tiny-pacs", num_classes=3, labels=LABELS, preprocessing=PreprocessConfig(input_size=64)
    )
    out = save_pretrained(calibrated_resnet(cfg, [ct_file(n) for n in SERIES[:3]]), root / "model", cfg)
    export_onnx(out, tolerance=1e-3)  # random weights: logits differ by ~1e-4 between runtimes
    return out


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> Callable[[bytes], np.ndarray]:
    """Probabilities of the exported model.onnx called here on ctdata.prepare of the bytes sent."""
    clf = OnnxClassifier(model_dir / "model.onnx", threads=1)
    pp = clf.config.preprocessing
    return lambda blob: clf.predict_proba(prepare(blob, pp)[None])[0]


class Loop:
    """`cthub pacs --cam` in a subprocess (it starts and stops Orthanc) and Orthanc's REST API."""

    def __init__(self, root: Path, model_dir: Path) -> None:
        self.root, self.model_dir = root, model_dir
        self.workdir = root / "pacs"
        self.http_port, self.dicom_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.records_path = self.workdir / "records.jsonl"
        self.proc: subprocess.Popen | None = None
        self.logs: list[Path] = []
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def start(self) -> None:
        log = self.root / f"cthub-pacs-{len(self.logs)}.log"
        self.logs.append(log)
        env = (
            dict(os.environ)
            | QUIET
            | {
                "PYTHONPATH": str(ROOT),
                "CTHUB_HOME": str(self.root / "home"),
                "CTHUB_AUDIT_SALT": SALT,
            }
        )
        cmd = [
            sys.executable, "-m", "cthub", "pacs", "--model", str(self.model_dir), "--dir", str(self.workdir),
            "--http-port", str(self.http_port), "--dicom-port", str(self.dicom_port),
            "--stable-age", "1", "--poll", "0.2", "--cam",
        ]  # fmt: skip
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.wait(lambda: "cthub pacs is ready" in self.log(), "cthub pacs to start", need_running=True)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=60)
        return self.proc.returncode

    def log(self) -> str:
        return self.logs[-1].read_text(errors="replace") if self.logs else ""

    def all_logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs)

    def wait(self, ready: Callable[[], Any], what: str, need_running: bool = True) -> Any:
        deadline = time.monotonic() + HANG_GUARD_S
        while time.monotonic() < deadline:
            if (value := ready()) is not None and value is not False:
                return value
            if need_running and self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"cthub pacs exited ({self.proc.returncode}) waiting for {what}:\n{self.log()}"
                )
            time.sleep(0.2)
        raise AssertionError(f"no {what} within {HANG_GUARD_S:.0f} s (hang guard):\n{self.log()[-4000:]}")

    # -- Orthanc ---------------------------------------------------------------------------------------

    def push(self, series: Series) -> None:
        for blob in series.blobs:
            r = self.http.post("/instances", content=blob, headers={"Content-Type": "application/dicom"})
            assert r.status_code == 200, r.text

    def study_id(self, study_uid: str) -> str:
        (hit,) = [
            h for h in self.http.post("/tools/lookup", content=study_uid).json() if h["Type"] == "Study"
        ]
        return str(hit["ID"])

    def series_of(self, study_uid: str, modality: str) -> list[dict[str, Any]]:
        found = self.http.get(f"/studies/{self.study_id(study_uid)}/series").json()
        return [s for s in found if s["MainDicomTags"].get("Modality") == modality]

    def srs(self, study_uid: str, modality: str = "SR") -> list[pydicom.Dataset]:
        """Every instance of the study's series of `modality`, downloaded."""
        out: list[pydicom.Dataset] = []
        for s in self.series_of(study_uid, modality):
            for inst in s["Instances"]:
                data = self.http.get(f"/instances/{inst}/file").content
                out.append(pydicom.dcmread(io.BytesIO(data)))
        return out

    def last_change(self) -> int:
        return int(self.http.get("/changes", params={"last": ""}).json()["Last"])

    def stable_series_changes(self) -> list[int]:
        changes = self.http.get("/changes", params={"since": 0, "limit": 100000}).json()["Changes"]
        return [c["Seq"] for c in changes if c["ChangeType"] == "StableSeries"]

    # -- records ---------------------------------------------------------------------------------------

    def records(self) -> list[dict[str, Any]]:
        return read_records(self.records_path)

    def record_of(self, series: Series) -> dict[str, Any]:
        return self.record_of_pseudonym(AuditLog(SALT).pseudonym(series.series_uid))

    def record_of_pseudonym(self, pseudonym: str | None) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            hits = [r for r in self.records() if r["series"] == pseudonym]
            assert len(hits) <= 1, hits
            return hits[0] if hits else None

        return self.wait(found, "record of the series")

    def all_answered(self) -> list[dict[str, Any]]:
        """Wait until every SR the loop stored has become stable in Orthanc and every StableSeries change
        Orthanc lists has its record; the records."""
        for r in self.records():
            if r["event"] == "stored":
                for output in (r["report_series"], r["overlay_series"]):
                    if output is not None:
                        self.record_of_pseudonym(output)

        def answered() -> list[dict[str, Any]] | None:
            wanted = self.stable_series_changes()
            recs = self.records()
            return recs if {r["change"] for r in recs} >= set(wanted) else None

        return self.wait(answered, "a record for every StableSeries change")


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Loop]:
    lp = Loop(tmp_path_factory.mktemp("pacs_loop"), model_dir)
    lp.start()
    try:
        yield lp
    finally:
        lp.stop()
        lp.http.close()


# -- reading the SR ---------------------------------------------------------------------------------------


def groups(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    """The TID 1501 measurement groups under 'Imaging Measurements' (126010)."""
    (measurements,) = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    return list(measurements.ContentSequence)


def group_values(group: pydicom.Dataset) -> dict[str, Any]:
    """Concept meaning -> number, code meaning or text; 'images': the referenced SOP Instance UIDs."""
    out: dict[str, Any] = {"images": []}
    for item in group.ContentSequence:
        name = item.ConceptNameCodeSequence[0].CodeMeaning
        if item.ValueType == "NUM":
            out[name] = float(item.MeasuredValueSequence[0].NumericValue)
        elif item.ValueType == "CODE":
            out[name] = item.ConceptCodeSequence[0].CodeMeaning
        elif item.ValueType == "TEXT":
            out[name] = item.TextValue
        elif item.ValueType == "IMAGE":
            out["images"].append(str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
    return out


def evidence(sr: pydicom.Dataset) -> tuple[set[str], set[str], set[str]]:
    """(study UIDs, series UIDs, SOP Instance UIDs) of the Current Requested Procedure Evidence."""
    studies: set[str] = set()
    series: set[str] = set()
    sops: set[str] = set()
    for st in sr.CurrentRequestedProcedureEvidenceSequence:
        studies.add(str(st.StudyInstanceUID))
        for se in st.ReferencedSeriesSequence:
            series.add(str(se.SeriesInstanceUID))
            sops.update(str(i.ReferencedSOPInstanceUID) for i in se.ReferencedSOPSequence)
    return studies, series, sops


def dciodvfy_errors(ds: pydicom.Dataset, tmp_path: Path) -> list[str] | None:
    """dciodvfy's errors on a downloaded object; None (not checked) without dicom3tools."""
    if shutil.which("dciodvfy") is None:
        return None  # the SR writer's own test says so; the rest of this test still runs
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def check_sr(
    sr: pydicom.Dataset, series: Series, reference: Callable[[bytes], np.ndarray], top_k: int = 3
) -> None:
    """The SR of `series` says what the model says about its readable instances and references them."""
    good = series.good()
    assert sr.SOPClassUID == COMPREHENSIVE_SR and sr.Modality == "SR"
    assert sr.StudyInstanceUID == series.study_uid and sr.PatientID == PATIENT_ID
    assert sr.SeriesInstanceUID != series.series_uid
    assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
    assert "NOT FOR DIAGNOSTIC USE" in sr.SeriesDescription.upper()
    assert sr.Manufacturer == "ct-ssl-hub"
    ours = [e for e in sr.ContributingEquipmentSequence if e.Manufacturer == "ct-ssl-hub"]
    assert [e.ManufacturerModelName for e in ours] == ["tiny-pacs"]
    assert evidence(sr) == ({series.study_uid}, {series.series_uid}, {series.sops[i] for i in good})

    series_group, *slice_groups = [group_values(g) for g in groups(sr)]
    # one group per readable slice, in anatomical order (z ascending = upload order here)
    assert [g["images"] for g in slice_groups] == [[series.sops[i]] for i in good]
    probs = np.stack([reference(series.blobs[i]) for i in good])
    for g, p in zip(slice_groups, probs, strict=True):
        got = np.array([g[f"Probability: {lab}"] for lab in LABELS])
        np.testing.assert_allclose(got, p, atol=ATOL)
        assert g["Finding"] == LABELS[int(np.argmax(p))]
    # the series rule: mean of each class's k highest slice probabilities, argmax (no operating point)
    k = min(top_k, len(good))
    scores = np.sort(probs, axis=0)[-k:].mean(axis=0)
    got = np.array([series_group[f"Series score: {lab}"] for lab in LABELS])
    np.testing.assert_allclose(got, scores, atol=ATOL)
    assert series_group["Finding"] == LABELS[int(np.argmax(scores))]
    assert sorted(series_group["images"]) == sorted(series.sops[i] for i in good)


def check_overlays(
    images: list[pydicom.Dataset], series: Series, reference: Callable[[bytes], np.ndarray], top_k: int = 3
) -> None:
    """`--cam`: one Secondary Capture per slice that decided the series (the k highest probabilities of the
    decided class), each referencing its slice, in its study, RGB at its size, warning burned in."""
    good = series.good()
    probs = np.stack([reference(series.blobs[i]) for i in good])
    k = min(top_k, len(good))
    decided = int(np.argmax(np.sort(probs, axis=0)[-k:].mean(axis=0)))
    deciding = {series.sops[good[i]] for i in np.argsort(-probs[:, decided])[:k]}
    assert len(images) == k and len({im.SeriesInstanceUID for im in images}) == 1
    sources = set()
    for im in images:
        assert im.SOPClassUID == SECONDARY_CAPTURE and im.Modality == "OT" and im.Manufacturer == "ct-ssl-hub"
        assert im.StudyInstanceUID == series.study_uid and im.PatientID == PATIENT_ID
        assert "NOT FOR DIAGNOSTIC USE" in im.SeriesDescription and im.BurnedInAnnotation == "YES"
        assert list(im.PatientOrientation) == ["L", "P"]
        (src,) = im.SourceImageSequence
        sources.add(str(src.ReferencedSOPInstanceUID))
        source = pydicom.dcmread(io.BytesIO(series.blobs[series.sops.index(src.ReferencedSOPInstanceUID)]))
        rgb = im.pixel_array
        f = -(-256 // source.Columns)  # enlarged by an integer factor to >= 256 px
        assert rgb.shape == (source.Rows * f, source.Columns * f, 3) and im.PhotometricInterpretation == "RGB"
        band = rgb[: rgb.shape[0] // 8]
        assert (band.min(axis=-1) > 200).any() and (band.max(axis=-1) == 0).any()  # white text on black
        assert (rgb[:, :, 0] != rgb[:, :, 2]).any()  # the colour map, not only the grey slice
    assert sources == deciding


def assert_no_phi(text: str, *series: Series) -> None:
    for secret in (*PATIENT_NAME.split("^"), PATIENT_ID):
        assert secret not in text
    for s in series:
        for uid in (s.study_uid, s.series_uid, *s.sops):
            assert uid not in text


# -- the tests --------------------------------------------------------------------------------------------


def test_a_ct_series_gets_its_sr_in_the_same_study(
    loop: Loop, reference: Callable[[bytes], np.ndarray], tmp_path: Path
) -> None:
    series = make_series(SERIES)
    loop.push(series)
    record = loop.record_of(series)
    assert record["event"] == "stored", record
    assert record["slices"] == 4 and record["instances"] == 4 and record["rejected"] == []
    assert record["modality"] == "CT" and record["study"] == AuditLog(SALT).pseudonym(series.study_uid)

    (sr,) = loop.srs(series.study_uid)
    check_sr(sr, series, reference)
    assert record["report_series"] == AuditLog(SALT).pseudonym(sr.SeriesInstanceUID)
    overlays = loop.srs(series.study_uid, "OT")
    check_overlays(overlays, series, reference)
    errors = dciodvfy_errors(overlays[0], tmp_path)
    assert not errors, errors
    assert record["overlays"] == 3
    assert record["overlay_series"] == AuditLog(SALT).pseudonym(overlays[0].SeriesInstanceUID)
    errors = dciodvfy_errors(sr, tmp_path)
    assert not errors, errors
    assert_no_phi(loop.records_path.read_text() + loop.all_logs(), series)


def test_a_malformed_instance_is_left_out_and_the_rest_reported(
    loop: Loop, reference: Callable[[bytes], np.ndarray]
) -> None:
    series = make_series(
        ("CT_small.dcm", "693_UNCI.dcm", "693_UNCR.dcm", "J2K_pixelrep_mismatch.dcm"), frozenset({1})
    )
    loop.push(series)
    record = loop.record_of(series)
    assert record["event"] == "stored", record
    assert record["slices"] == 3 and record["instances"] == 4
    (rejected,) = record["rejected"]
    assert rejected["stage"] == "analyse" and rejected["status"] in (400, 422) and rejected["detail"]

    (sr,) = loop.srs(series.study_uid)
    check_sr(sr, series, reference)  # three slices, the malformed instance referenced nowhere
    assert series.sops[1] not in json.dumps(sr.to_json_dict())
    assert_no_phi(loop.records_path.read_text() + loop.all_logs(), series)


def test_series_are_fetched_as_stored_whole_or_instance_by_instance(loop: Loop, tmp_path: Path) -> None:
    """WADO-RS as the watcher uses it: the whole series, and the per-instance path it falls back to, give
    back every instance as sent: same elements, same transfer syntax (JPEG 2000 stays JPEG 2000)."""
    from pacs.client import PacsClient

    series = make_series(SERIES, frozenset({2}))  # the malformed one travels too: Orthanc stores it
    loop.push(series)
    loop.record_of(series)  # stable and handled: nothing else will be added to it
    (hit,) = loop.http.post("/tools/lookup", content=series.series_uid).json()
    with PacsClient(loop.url) as client:
        info = client.series(hit["ID"])
        assert info is not None and (info.study_uid, info.series_uid) == (series.study_uid, series.series_uid)
        assert (info.modality, info.instances, info.manufacturer) == ("CT", 4, "GE MEDICAL SYSTEMS")
        for name, fetch in (("whole", client.fetch_series), ("each", client.fetch_instances)):
            (tmp_path / name).mkdir()
            fetched = fetch(info, tmp_path / name)
            assert fetched.unreadable == [] and len(fetched.files) == 4
            got = {str(d.SOPInstanceUID): d for d in (pydicom.dcmread(f) for f in fetched.files)}
            for sop, blob in zip(series.sops, series.blobs, strict=True):
                sent = pydicom.dcmread(io.BytesIO(blob))
                assert got[sop] == sent, name
                assert got[sop].file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
        assert client.series("0" * 8 + "-" + "0" * 8) is None  # gone from the PACS: None, not an error


def test_an_unreadable_series_gives_a_failure_record_and_the_loop_goes_on(
    loop: Loop, reference: Callable[[bytes], np.ndarray]
) -> None:
    broken = make_series(("CT_small.dcm", "693_UNCR.dcm"), frozenset({0, 1}))
    loop.push(broken)
    record = loop.record_of(broken)
    assert record["event"] == "failed", record
    assert record["stage"] == "analyse" and record["error"] and record["detail"]
    assert record["modality"] == "CT" and record["instances"] == 2
    assert sorted(r["index"] for r in record["rejected"]) == [0, 1]  # each instance with its reason
    assert {r["reason"] for r in record["rejected"]} == {"truncated"}
    assert loop.srs(broken.study_uid) == []  # the record is written after any store: none came

    assert loop.proc is not None and loop.proc.poll() is None  # neither the watcher nor Orthanc stopped
    assert loop.http.get("/system").status_code == 200
    after = make_series(("CT_small.dcm",))
    loop.push(after)
    assert loop.record_of(after)["event"] == "stored"
    (sr,) = loop.srs(after.study_uid)
    check_sr(sr, after, reference)
    assert_no_phi(loop.records_path.read_text() + loop.all_logs(), broken, after)


def test_other_modalities_and_the_loops_own_reports_get_a_skipped_record(loop: Loop) -> None:
    mr = make_series(("MR_small.dcm",), modality="MR")
    loop.push(mr)
    record = loop.record_of(mr)
    assert record["event"] == "skipped" and "modality MR" in record["why"], record
    assert loop.series_of(mr.study_uid, "SR") == []

    records = loop.all_answered()
    by_change = [r["change"] for r in records]
    assert len(by_change) == len(set(by_change))  # exactly one record per change
    assert set(by_change) == set(loop.stable_series_changes())
    own = [r for r in records if r["modality"] in ("SR", "OT")]
    stored = [r for r in records if r["event"] == "stored"]
    outputs = {r["report_series"] for r in stored} | {r["overlay_series"] for r in stored}
    assert {r["series"] for r in own} == outputs  # each SR and overlay series seen, and skipped
    assert all(r["event"] == "skipped" and r["why"] == "an output of ct-ssl-hub" for r in own)


def test_a_restarted_loop_resumes_without_processing_anything_twice(
    loop: Loop, reference: Callable[[bytes], np.ndarray]
) -> None:
    before = loop.all_answered()
    last = loop.last_change()
    assert loop.stop() == 0
    assert "Orthanc has stopped" in (loop.workdir / "orthanc.log").read_text()  # a clean shutdown
    with pytest.raises(httpx.HTTPError):
        loop.http.get("/system")  # Orthanc stopped with the command
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", loop.http_port)) != 0

    loop.start()
    loop.wait(
        lambda: any(
            int(line.rsplit(" ", 1)[1]) >= last
            for line in loop.log().splitlines()
            if line.startswith("caught up at change ")
        ),
        "the restarted loop to catch up",
    )
    assert loop.records() == before  # nothing processed again

    series = make_series(("693_UNCR.dcm", "CT_small.dcm"))
    loop.push(series)
    assert loop.record_of(series)["event"] == "stored"
    (sr,) = loop.srs(series.study_uid)
    check_sr(sr, series, reference)
    after = loop.all_answered()
    assert after[: len(before)] == before
    new = [r["event"] for r in after[len(before) :]]
    assert new == ["stored", "skipped", "skipped"]  # the series, then its SR and its overlays


def test_a_killed_loop_leaves_no_orthanc_behind(loop: Loop) -> None:
    assert loop.proc is not None and loop.proc.poll() is None
    os.kill(loop.proc.pid, signal.SIGKILL)  # no chance to stop Orthanc itself
    loop.proc.wait(timeout=60)

    def port_closed() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", loop.http_port)) != 0

    loop.wait(port_closed, "Orthanc to stop after cthub pacs was killed", need_running=False)
