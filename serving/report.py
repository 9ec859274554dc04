"""Classification results as a DICOM Comprehensive SR (TID 1500 Measurement Report), written with highdicom.

`write_sr(sources, content)` takes the header-only datasets of the analysed images and the result, and
returns a new SR instance that can be stored with the study:

- TID 1500 "Imaging Measurement Report": a device observer (the model), an image library of the sources, one
  measurement group for the series result (decided class, per-class series scores, out-of-distribution score
  and warning) and one per slice (its class, probabilities, OOD score), each referencing its source
  instance (and frame);
- the model's identity (name, version, weights sha256, ONNX variant) in the Contributing Equipment Sequence
  (purpose: Processing Equipment) and in the algorithm identification of every group, whose parameters also
  name the calibration in use (version and id, temperature, binary operating point); the series group
  measures the calibration temperature and the operating threshold (private codes CTHUB005, CTHUB006);
- VerificationFlag UNVERIFIED, PreliminaryFlag PRELIMINARY, CompletionFlag COMPLETE, a series description that
  says "not for diagnostic use", a new Series and SOP Instance UID per report.

Patient and study attributes are copied from the sources by highdicom (the SR belongs to that study).
Standard codes where DICOM has them: the decided class is a "Finding" (DCM 121071), the out-of-distribution
warning SCT Yes/No, units UCUM, the observer and equipment DCM. The private coding scheme `99CTHUB`,
declared in the Coding Scheme Identification Sequence, holds only what is the model's own: its classes,
the per-class probabilities and series scores, its out-of-distribution score and warning concepts, and its
calibration temperature and operating threshold.
Kept free of HTTP so a PACS integration can call it directly.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from cthub.errors import UnprocessableInputError

SCHEME = "99CTHUB"
SCHEME_NAME = "ct-ssl-hub classifier concepts"
MANUFACTURER = "ct-ssl-hub"
SERIES_DESCRIPTION = "AI classification - NOT FOR DIAGNOSTIC USE"
DEFAULT_SERIES_NUMBER = 9001
LO_MAX = 64  # DICOM LO (long string) limit: code meanings, software versions, descriptions


@dataclass(frozen=True)
class ModelIdentity:
    """What identifies the model that produced a result."""

    name: str
    version: str
    sha256: str
    variant: str = "fp32"
    software_version: str = ""


@dataclass(frozen=True)
class SliceFinding:
    """One analysed slice: index of its source in `sources`, 1-based frame for multi-frame objects."""

    source: int
    label: str
    probabilities: dict[str, float]
    frame: int | None = None
    ood_score: float | None = None


@dataclass(frozen=True)
class ReportContent:
    """The result to report: the series decision and scores, OOD verdict, and the slices behind them."""

    model: ModelIdentity
    labels: list[str]
    label: str
    scores: dict[str, float]
    rule: str
    slices: list[SliceFinding] = field(default_factory=list)
    ood_score: float | None = None
    ood_threshold: float | None = None
    ood_warning: bool | None = None
    calibration: dict[str, Any] | None = None  # the answer's `calibration` block (export.metadata)


def _lo(text: str) -> str:
    return text if len(text) <= LO_MAX else text[: LO_MAX - 1] + "…"


def _concept(code: str, meaning: str) -> Any:
    from highdicom.sr import CodedConcept

    return CodedConcept(code, SCHEME, _lo(meaning))


def _class_code(labels: list[str], label: str) -> Any:
    return _concept(f"CLASS{labels.index(label)}", label)


def _unitless() -> Any:
    from highdicom.sr import CodedConcept

    return CodedConcept("1", "UCUM", "no units")


def calibration_parameters(calibration: dict[str, Any] | None) -> list[str]:
    """The calibration in use as algorithm parameters: its version and id (or "uncalibrated"), the
    temperature, and the binary operating point with its sensitivity / specificity where it was set."""
    cal = calibration or {}
    if cal.get("status") != "calibrated":
        return ["calibration=uncalibrated", "temperature=1"]
    where = f" site={cal['site']}" if cal.get("site") else ""
    params = [
        f"calibration=version {cal.get('version')} id {cal.get('id')}{where}",
        f"temperature={float(cal['temperature']):.6g}",
    ]
    op = cal.get("operating_point")
    if isinstance(op, dict) and op.get("threshold") is not None:
        params.append(
            f"operating_point=threshold {float(op['threshold']):.6g} ({op.get('rule')}), sensitivity "
            f"{op.get('sensitivity')}, specificity {op.get('specificity')}"
        )
    return params


def _algorithm(model: ModelIdentity, calibration: dict[str, Any] | None = None) -> Any:
    from highdicom.sr import AlgorithmIdentification

    return AlgorithmIdentification(
        name=_lo(model.name),
        version=_lo(model.version),
        parameters=[
            f"sha256={model.sha256[:16]}",
            f"variant={model.variant}",
            *calibration_parameters(calibration),
        ],
    )


def _calibration_measurements(calibration: dict[str, Any] | None) -> list[Any]:
    """The series group's calibration temperature and, for a binary model with one, operating threshold."""
    from highdicom.sr import Measurement

    cal = calibration or {}
    t = float(cal.get("temperature") or 1.0)
    out = [Measurement(_concept("CTHUB005", "Calibration temperature"), t, _unitless())]
    op = cal.get("operating_point")
    if isinstance(op, dict) and op.get("threshold") is not None:
        out.append(
            Measurement(_concept("CTHUB006", "Operating threshold"), float(op["threshold"]), _unitless())
        )
    return out


def _group(
    identifier: str,
    model: ModelIdentity,
    labels: list[str],
    label: str,
    values: dict[str, float],
    value_name: str,
    sources: list[Any],
    ood_score: float | None,
    ood_warning: bool | None,
    calibration: dict[str, Any] | None = None,
    extra: Sequence[Any] = (),
) -> Any:
    """One TID 1501 group: the decided class, one measurement per class, the OOD score and warning (and
    `extra` measurements); the algorithm identification names the calibration in use."""
    from highdicom.sr import (
        Measurement,
        MeasurementsAndQualitativeEvaluations,
        QualitativeEvaluation,
        TrackingIdentifier,
    )
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    evaluations = [QualitativeEvaluation(codes.DCM.Finding, _class_code(labels, label))]  # DCM 121071
    if ood_warning is not None:
        flag = codes.SCT.Yes if ood_warning else codes.SCT.No
        evaluations.append(QualitativeEvaluation(_concept("CTHUB004", "Out-of-distribution warning"), flag))
    measurements = [
        Measurement(_concept(f"P{labels.index(k)}", f"{value_name}: {k}"), float(v), _unitless())
        for k, v in values.items()
    ]
    if ood_score is not None:
        measurements.append(
            Measurement(_concept("CTHUB003", "Out-of-distribution score"), float(ood_score), _unitless())
        )
    measurements += list(extra)
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=generate_uid(), identifier=_lo(identifier)),
        algorithm_id=_algorithm(model, calibration),
        source_images=sources,
        qualitative_evaluations=evaluations,
        measurements=measurements,
    )


def _source_image(ds: Any, frame: int | None) -> Any:
    from highdicom.sr import SourceImageForMeasurementGroup

    frames = [frame] if frame is not None and int(ds.get("NumberOfFrames", 1) or 1) > 1 else None
    return SourceImageForMeasurementGroup(
        str(ds.SOPClassUID), str(ds.SOPInstanceUID), referenced_frame_numbers=frames
    )


def _equipment(model: ModelIdentity) -> Any:
    from highdicom import ContributingEquipment
    from pydicom.sr.codedict import codes

    versions = [v for v in (model.software_version, _lo(model.version), model.sha256[:LO_MAX]) if v]
    return ContributingEquipment(
        MANUFACTURER,
        codes.DCM.ProcessingEquipment,
        manufacturer_model_name=_lo(model.name),
        software_versions=versions,
        device_serial_number=model.sha256[:16],
        contribution_datetime=datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S"),
        contribution_description=(
            f"Automated classification by {model.name} {model.version} ({model.variant} ONNX, weights "
            f"sha256 {model.sha256}); research use only, not for diagnostic use"
        ),
    )


def _observer(model: ModelIdentity) -> Any:
    from highdicom.sr import DeviceObserverIdentifyingAttributes, ObservationContext, ObserverContext
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    device = DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=[MANUFACTURER, model.sha256, model.variant]),  # stable per model
        name=_lo(model.name),
        manufacturer_name=MANUFACTURER,
        model_name=_lo(f"{model.name} {model.version}"),
        serial_number=model.sha256[:16],
    )
    return ObservationContext(observer_device_context=ObserverContext(codes.DCM.Device, device))


def _coding_scheme() -> Any:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodingSchemeDesignator = SCHEME
    item.CodingSchemeName = SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = MANUFACTURER
    return item


def _measurement_report(model: ModelIdentity, groups: list[Any], sources: Sequence[Any]) -> Any:
    """TID 1500 with an image library of the sources; without one when highdicom cannot describe them
    (enhanced multi-frame images keep their geometry in functional groups it does not read)."""
    from highdicom.sr import MeasurementReport
    from pydicom.sr.codedict import codes

    for library in (list(sources), None):
        try:
            return MeasurementReport(
                observation_context=_observer(model),
                procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
                imaging_measurements=groups,
                referenced_images=library,
            )
        except AttributeError:
            if library is None:
                raise
    raise AssertionError("unreachable")


# Type 2 attributes of the Patient and General Study modules that highdicom copies from the first source (it
# reads them as attributes): de-identified images often lack them; the IOD allows them empty.
STUDY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
# Type 1 attributes a report must copy or reference from every source
REFERENCE_TYPE1 = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def copyable_header(ds: Any, keywords: Sequence[str] = STUDY_TYPE2) -> Any:
    """What highdicom may copy from a source (it copies every root attribute of the Patient and Study
    modules): `ds` itself when it is fit, else a header-only copy where the absent Type 2 `keywords` are
    present and empty ("required, may be empty"), and coded entries or SOP references that lack a Type 1
    attribute (as some anonymisers leave them) are left out. The source is never modified."""
    from pydicom.dataset import Dataset

    missing = [k for k in keywords if k not in ds]
    broken = {elem.tag: _valid_items(elem.value) for elem in ds if elem.VR == "SQ"}  # iterating converts
    broken = {tag: kept for tag, kept in broken.items() if len(kept) != len(ds[tag].value)}
    if not missing and not broken:
        return ds
    out = Dataset()
    out.update({tag: elem for tag, elem in ds.items() if tag != 0x7FE00010 and tag not in broken})
    for keyword in missing:
        setattr(out, keyword, None)
    for tag, kept in broken.items():
        if kept:
            out.add_new(tag, "SQ", kept)
    return out


def _valid_items(items: Sequence[Any]) -> list[Any]:
    """The items of a sequence, less coded entries without their code value, scheme or meaning and SOP
    references without their class or instance UID (both Type 1 in their macros)."""

    def filled(item: Any, keywords: Sequence[str]) -> bool:
        return all(str(item.get(k, "") or "").strip() for k in keywords)

    def fit(item: Any) -> bool:
        if any(k in item for k in ("CodeValue", "CodingSchemeDesignator", "CodeMeaning")):
            value = any(filled(item, [k]) for k in ("CodeValue", "LongCodeValue", "URNCodeValue"))
            return value and filled(item, ("CodingSchemeDesignator", "CodeMeaning"))
        if any(k in item for k in ("ReferencedSOPClassUID", "ReferencedSOPInstanceUID")):
            return filled(item, ("ReferencedSOPClassUID", "ReferencedSOPInstanceUID"))
        return True

    return [item for item in items if fit(item)]


def complete_deidentification(ds: Any) -> None:
    """A copied PatientIdentityRemoved YES needs a de-identification method (Type 1C); sources that leave it
    empty get a truthful placeholder rather than an invalid object."""
    if str(ds.get("PatientIdentityRemoved", "") or "").upper() != "YES":
        return
    method = str(ds.get("DeidentificationMethod", "") or "").strip()
    if method or ds.get("DeidentificationMethodCodeSequence"):
        return
    ds.DeidentificationMethod = "not recorded in the source images"


def check_type1(sources: Sequence[Any], keywords: Sequence[str] = REFERENCE_TYPE1) -> None:
    """UnprocessableInputError naming the Type 1 attributes some source lacks (or holds empty)."""
    for ds in sources:
        missing = [k for k in keywords if str(ds.get(k, "") or "").strip() == ""]
        if missing:
            raise UnprocessableInputError(
                f"a source image lacks {', '.join(missing)} (Type 1): no report can reference it"
            )


def write_sr(
    sources: Sequence[Any],
    content: ReportContent,
    *,
    series_number: int = DEFAULT_SERIES_NUMBER,
    institution_name: str | None = None,
) -> Any:
    """A new Comprehensive SR (pydicom Dataset) reporting `content` on the images `sources` (header-only
    datasets of one study). UnprocessableInputError when the sources lack what an SR must reference."""
    import highdicom as hd
    from highdicom.sr import ComprehensiveSR
    from pydicom.uid import generate_uid

    if not sources:
        raise UnprocessableInputError("a report needs at least one source image")
    check_type1(sources)
    sources = [copyable_header(ds) for ds in sources]
    try:
        with quiet_header_warnings():
            sr = ComprehensiveSR(
                evidence=list(sources),
                content=_measurement_report(content.model, _groups(sources, content), sources),
                series_instance_uid=generate_uid(),
                series_number=series_number,
                sop_instance_uid=generate_uid(),
                instance_number=1,
                manufacturer=MANUFACTURER,
                is_complete=True,
                is_final=False,
                is_verified=False,
                institution_name=institution_name,
                contributing_equipment=[_equipment(content.model)],
                series_description=SERIES_DESCRIPTION,
            )
    except AttributeError as e:  # a required attribute is absent: its keyword is no patient data
        raise UnprocessableInputError(
            f"the source images lack {e.name or 'an attribute'} that the report must copy"
        ) from None
    except (ValueError, TypeError, KeyError) as e:
        # highdicom's messages may quote header values (patient data): only the type is reported
        raise UnprocessableInputError(
            f"the source images' headers do not allow a valid report ({type(e).__name__})"
        ) from None
    sr.CodingSchemeIdentificationSequence = [_coding_scheme()]
    complete_deidentification(sr)
    assert isinstance(sr, hd.SOPClass)
    return sr


def _groups(sources: Sequence[Any], content: ReportContent) -> list[Any]:
    """The series group (all sources) then one group per slice (its source and frame)."""
    model, labels = content.model, content.labels
    every = [_source_image(ds, None) for ds in sources]
    groups = [
        _group(
            "series result",
            model,
            labels,
            content.label,
            content.scores,
            "Series score",
            every,
            content.ood_score,
            content.ood_warning,
            content.calibration,
            _calibration_measurements(content.calibration),
        )
    ]
    for i, s in enumerate(content.slices):
        warn = None
        if s.ood_score is not None and content.ood_threshold is not None:
            warn = s.ood_score > content.ood_threshold
        source = [_source_image(sources[s.source], s.frame)]
        groups.append(
            _group(
                f"slice {i + 1}",
                model,
                labels,
                s.label,
                s.probabilities,
                "Probability",
                source,
                s.ood_score,
                warn,
                content.calibration,
            )
        )
    return groups


@contextlib.contextmanager
def quiet_header_warnings() -> Iterator[None]:
    """No warnings out of highdicom/pydicom while writing: they quote header values (patient names)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def to_bytes(sr: Any) -> bytes:
    """The SR as a DICOM Part 10 file (preamble, file meta, explicit VR little endian)."""
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
