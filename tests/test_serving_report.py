"""The SR writer (`serving.report.write_sr`) in-process on real DICOM headers: a Comprehensive SR (TID 1500)
that references its sources (and frames), names the model in the Contributing Equipment Sequence, is
UNVERIFIED and "not for diagnostic use", gets new UIDs per report, reads back with pydicom, passes
`dciodvfy` (Debian dicom3tools) without errors, and leaks no patient data through warnings or logs."""

from __future__ import annotations

import io
import logging
import shutil
import subprocess
import warnings
from pathlib import Path

import pydicom
import pytest

from cthub.errors import UnprocessableInputError
from serving.report import ModelIdentity, ReportContent, SliceFinding, to_bytes, write_sr

LABELS = ["normal", "hemorrhage"]
MODEL = ModelIdentity("tiny-head", "v1.2", "ab" * 32, "int8", "ct-ssl-hub 0.1.0")
PATIENT = "Zyxwvutsky"  # single-component name: highdicom warns about it, quoting it


def header(name: str) -> pydicom.Dataset:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"needs {name} (pydicom-data)")
    return pydicom.dcmread(path, stop_before_pixels=True)


def content(n_slices: int, frames: bool = False) -> ReportContent:
    slices = [
        SliceFinding(
            source=0 if frames else i,
            label=LABELS[i % 2],
            probabilities={"normal": 0.8 - 0.1 * i, "hemorrhage": 0.2 + 0.1 * i},
            frame=i + 1 if frames else None,
            ood_score=1.0 + i,
        )
        for i in range(n_slices)
    ]
    return ReportContent(
        model=MODEL,
        labels=LABELS,
        label="hemorrhage",
        scores={"normal": 0.7, "hemorrhage": 0.3},
        rule="top-k mean",
        slices=slices,
        ood_score=1.5,
        ood_threshold=2.5,
        ood_warning=False,
    )


def dciodvfy_errors(data: bytes, tmp_path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian dicom3tools) is not installed")
    path = tmp_path / "sr.dcm"
    path.write_bytes(data)
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def groups(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    """The TID 1501 measurement groups under 'Imaging Measurements'."""
    (measurements,) = [
        item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "126010"
    ]
    return list(measurements.ContentSequence)


def values(group: pydicom.Dataset) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in group.ContentSequence:
        name = item.ConceptNameCodeSequence[0].CodeMeaning
        if item.ValueType == "NUM":
            out[name] = float(item.MeasuredValueSequence[0].NumericValue)
        elif item.ValueType == "CODE":
            out[name] = item.ConceptCodeSequence[0].CodeMeaning
        elif item.ValueType == "IMAGE":
            ref = item.ReferencedSOPSequence[0]
            frames = ref.get("ReferencedFrameNumber")
            frames = (
                [] if frames is None else [int(f) for f in (frames if isinstance(frames, list) else [frames])]
            )
            out.setdefault("images", []).append((ref.ReferencedSOPInstanceUID, frames))  # type: ignore[union-attr]
    return out


def test_sr_of_a_series_references_every_source(tmp_path: Path) -> None:
    from pydicom.uid import generate_uid

    sources = []
    for i in range(3):
        ds = header("CT_small.dcm")
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        sources.append(ds)
    sr = write_sr(sources, content(3))
    data = to_bytes(sr)
    back = pydicom.dcmread(io.BytesIO(data))
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33" and back.Modality == "SR"
    assert back.VerificationFlag == "UNVERIFIED" and back.CompletionFlag == "COMPLETE"
    assert back.PreliminaryFlag == "PRELIMINARY"
    assert "NOT FOR DIAGNOSTIC USE" in back.SeriesDescription
    assert back.StudyInstanceUID == sources[0].StudyInstanceUID
    assert back.PatientID == sources[0].PatientID  # the report belongs to the patient's study
    assert back.ConceptNameCodeSequence[0].CodeValue == "126000"  # TID 1500 Imaging Measurement Report
    evidence = back.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert {r.ReferencedSOPInstanceUID for r in evidence.ReferencedSOPSequence} == {
        s.SOPInstanceUID for s in sources
    }
    ours = [e for e in back.ContributingEquipmentSequence if e.Manufacturer == "ct-ssl-hub"]
    assert len(ours) == 1 and MODEL.sha256 in list(ours[0].SoftwareVersions)
    assert (
        "int8" in ours[0].ContributionDescription
        and "not for diagnostic use" in ours[0].ContributionDescription
    )
    assert [s.CodingSchemeDesignator for s in back.CodingSchemeIdentificationSequence] == ["99CTHUB"]
    (finding,) = [  # the decided class under the standard concept, its value a class of the model's own
        item
        for item in groups(back)[0].ContentSequence
        if item.ValueType == "CODE" and item.ConceptNameCodeSequence[0].CodeValue == "121071"
    ]
    assert finding.ConceptNameCodeSequence[0].CodingSchemeDesignator == "DCM"
    assert finding.ConceptCodeSequence[0].CodingSchemeDesignator == "99CTHUB"
    series, *per_slice = (values(g) for g in groups(back))
    assert series["Finding"] == "hemorrhage" and series["Series score: normal"] == 0.7
    assert series["Out-of-distribution warning"] == "No" and series["Out-of-distribution score"] == 1.5
    assert len(series["images"]) == 3  # type: ignore[arg-type]
    assert len(per_slice) == 3
    for i, g in enumerate(per_slice):
        assert g["Finding"] == LABELS[i % 2]
        assert g["Probability: hemorrhage"] == pytest.approx(0.2 + 0.1 * i)
        assert g["images"] == [(sources[i].SOPInstanceUID, [])]
    again = write_sr(sources, content(3))
    assert again.SOPInstanceUID != sr.SOPInstanceUID and again.SeriesInstanceUID != sr.SeriesInstanceUID
    assert dciodvfy_errors(data, tmp_path) == []


def test_sr_of_a_multi_frame_ct_references_frames(tmp_path: Path) -> None:
    ds = header("eCT_Supplemental.dcm")
    sr = write_sr([ds], content(int(ds.NumberOfFrames), frames=True))
    back = pydicom.dcmread(io.BytesIO(to_bytes(sr)))
    per_slice = [values(g) for g in groups(back)[1:]]
    assert [g["images"] for g in per_slice] == [[(ds.SOPInstanceUID, [1])], [(ds.SOPInstanceUID, [2])]]
    assert dciodvfy_errors(to_bytes(sr), tmp_path) == []


def test_sources_without_uids_are_refused() -> None:
    ds = header("CT_small.dcm")
    del ds.StudyInstanceUID
    with pytest.raises(UnprocessableInputError, match="StudyInstanceUID"):
        write_sr([ds], content(1))
    with pytest.raises(UnprocessableInputError):
        write_sr([], content(0))


def test_writing_leaks_no_patient_data_through_warnings_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    ds = header("CT_small.dcm")
    ds.PatientName = PATIENT  # one component: highdicom would warn, quoting the name
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        sr = write_sr([ds], content(1))
    assert str(sr.PatientName) == PATIENT
    assert all(PATIENT not in str(w.message) for w in caught)
    assert PATIENT not in caplog.text


# --- de-identified real CT: Type 2 attributes removed or emptied, as anonymisers leave them ---------------

STRIPPED = (
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
REAL_SLICES = [
    ("ge_head_tilt", "01.dcm"),  # PatientIdentityRemoved YES with an empty DeidentificationMethod
    ("fnndsc_chest", "000001.dcm"),
    ("siim_contrast", "ID_0000_AGE_0060_CONTRAST_1_CT.dcm"),
    ("siim_contrast", "ID_0002_AGE_0074_CONTRAST_1_CT.dcm"),  # a Procedure Code without its Code Meaning
    # a Referenced Study Sequence item without its SOP Class UID
    ("lung_pet_ct_dx", "Lung_Dx-A0001/04-04-2007-NA-Chest-07990/2.000000-5mm-40805/1-01.dcm"),
]


def real_header(folder: str, name: str) -> pydicom.Dataset:
    from conftest import shared_file

    return pydicom.dcmread(shared_file("real_ct", folder, name), stop_before_pixels=True)


@pytest.mark.shared
@pytest.mark.parametrize("how", ["absent", "empty"])
@pytest.mark.parametrize(("folder", "name"), REAL_SLICES)
def test_sr_of_a_deidentified_real_slice_is_valid(folder: str, name: str, how: str, tmp_path: Path) -> None:
    ds = real_header(folder, name)
    for keyword in STRIPPED:
        if how == "absent":
            ds.pop(keyword, None)
        else:
            setattr(ds, keyword, None)
    before = set(ds.keys())
    sr = write_sr([ds], content(1))
    assert set(ds.keys()) == before  # the caller's header is not modified
    assert "ProcedureCodeSequence" not in ds or all(  # broken coded entries stay in the source, not the SR
        "CodeMeaning" in item for item in sr.get("ProcedureCodeSequence", [])
    )
    data = to_bytes(sr)
    back = pydicom.dcmread(io.BytesIO(data))
    for keyword in STRIPPED:  # Type 2: present and empty, as the IOD allows
        assert keyword in back and str(back[keyword].value or "") == ""
    assert back.StudyInstanceUID == ds.StudyInstanceUID
    evidence = back.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert [r.ReferencedSOPInstanceUID for r in evidence.ReferencedSOPSequence] == [ds.SOPInstanceUID]
    assert dciodvfy_errors(data, tmp_path) == []


@pytest.mark.shared
@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_missing_type1_attribute_is_named(keyword: str) -> None:
    for how in ("absent", "empty"):
        ds = real_header("fnndsc_chest", "000001.dcm")
        if how == "absent":
            del ds[keyword]
        else:
            setattr(ds, keyword, "")
        with pytest.raises(UnprocessableInputError, match=keyword):
            write_sr([ds], content(1))
