"""A series request: uploads (DICOM files and/or zips) -> the slices of ONE series in anatomical order, with
everything else reported instead of mixed in.

Objects are grouped by (SeriesInstanceUID, Modality). The analysed group is the largest one whose modality
the operator allows (the first one uploaded on a tie); other groups are listed in `other_series` (modality,
file indices, slice count, why they were left out), files that are not usable DICOM images in `rejected`
(with their error) or `skipped` (not DICOM, or non-image objects such as reports). Slices are ordered with
`ctdata.series.slice_sort_key`: position along the slice normal, InstanceNumber, upload order, frame.
Nothing here echoes file names or UIDs: files are named by their index in the upload (and in the zip).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.uid import UID

from ctdata.dicom import is_dicom, parse_dicom
from ctdata.series import is_zip, iter_zip_members, slice_position, slice_sort_key
from cthub.errors import CTHubError, InputError, PayloadTooLargeError, UnprocessableInputError
from serving.inputs import DicomSlice, decode_dataset, error_body, http_status, read_upload
from serving.settings import ServeSettings


@dataclass
class Member:
    """One object of the request: upload `file` (0-based) and, inside a zip, `member` (0-based)."""

    file: int
    member: int | None
    data: bytes

    def where(self) -> dict[str, int | None]:
        return {"file": self.file, "member": self.member}


@dataclass
class Parsed:
    """A parsed DICOM object (pixels not decoded yet) and its grouping key."""

    member: Member
    dataset: Any
    series_uid: str
    study_uid: str
    modality: str


@dataclass
class SliceInput:
    """One frame of the analysed series, ready for the model."""

    member: Member
    frame: int
    position: float | None
    instance_number: int | None
    sort_key: tuple
    unit_shape: tuple[int, int]
    warnings: list[str]
    model_input: Any = None  # torch.Tensor [C, S, S]


@dataclass
class SeriesRequest:
    """What a series request holds after grouping and decoding."""

    slices: list[SliceInput] = field(default_factory=list)
    headers: list[Any] = field(default_factory=list)  # header-only datasets of the analysed objects
    sources: list[tuple[int, int | None]] = field(default_factory=list)  # (file, member) of each header
    modality: str = ""
    study_uid: str = ""
    series_uid: str = ""
    other_series: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    errors: list[CTHubError] = field(default_factory=list, repr=False)

    def reject(self, member: Member, err: CTHubError) -> None:
        """Record one object that cannot be used (its error, as a refused single upload would answer)."""
        self.errors.append(err)
        self.rejected.append(member.where() | {"status": http_status(err)} | error_body(err))

    def report(self) -> dict[str, Any]:
        """The parts of the answer about what was left out (indices and reasons only)."""
        return {"other_series": self.other_series, "rejected": self.rejected, "skipped": self.skipped}


def expand_uploads(paths: list[Path], settings: ServeSettings) -> Iterator[Member]:
    """Every object of the request: each upload, or each member of an uploaded zip. The request's total
    (uploads and unzipped members) and its object count are bounded by the settings (413)."""
    budget = settings.max_series_bytes
    count = 0
    for i, path in enumerate(paths):
        data = read_upload(path, budget)
        budget -= len(data)
        if is_zip(data):
            members = iter_zip_members(data, max_bytes=budget, max_members=settings.max_slices)
            for j, (_, blob) in enumerate(members):
                budget -= len(blob)
                count += 1
                _check_count(count, settings)
                yield Member(i, j, blob)
        else:
            count += 1
            _check_count(count, settings)
            yield Member(i, None, data)


def _check_count(count: int, settings: ServeSettings) -> None:
    if count > settings.max_slices:
        raise PayloadTooLargeError(f"more than {settings.max_slices} objects in one request")


def parse_members(members: Iterator[Member], request: SeriesRequest) -> list[Parsed]:
    """Parse every DICOM member; non-DICOM members are skipped, unreadable ones rejected (both reported)."""
    parsed: list[Parsed] = []
    for m in members:
        if not is_dicom(m.data):
            request.skipped.append(m.where() | {"reason": "not a DICOM Part 10 file"})
            continue
        try:
            ds = parse_dicom(m.data)
        except CTHubError as e:
            request.reject(m, e)
            continue
        m.data = b""  # the dataset holds what is needed from here on
        if kind := _non_image_kind(ds):
            request.skipped.append(m.where() | {"reason": f"a {kind} object, not an image"})
            continue
        parsed.append(
            Parsed(
                m,
                ds,
                str(ds.get("SeriesInstanceUID", "") or ""),
                str(ds.get("StudyInstanceUID", "") or ""),
                str(ds.get("Modality", "") or "").upper(),
            )
        )
    return parsed


def _non_image_kind(ds: Any) -> str | None:
    """The SOP class name of a known non-image object (SR, presentation state...), else None."""
    sop = UID(str(ds.get("SOPClassUID", "") or ""))
    return sop.name if sop and sop.name != sop and "Image Storage" not in sop.name else None


def choose_series(parsed: list[Parsed], settings: ServeSettings, request: SeriesRequest) -> list[Parsed]:
    """The analysed group (see the module doc); the others go to `request.other_series`."""
    groups: dict[tuple[str, str], list[Parsed]] = {}
    for p in parsed:
        groups.setdefault((p.series_uid, p.modality), []).append(p)
    allowed = [g for g in groups.values() if g[0].modality in settings.allowed_modalities]
    main = max(allowed, key=len) if allowed else []  # max keeps the first of equal sizes
    for group in groups.values():
        if group is main:
            continue
        modality = group[0].modality or "(missing)"
        why = (
            "another series than the analysed one"
            if group[0].modality in settings.allowed_modalities
            else f"modality {modality} is not among the accepted ({'/'.join(settings.allowed_modalities)})"
        )
        request.other_series.append(
            {
                "modality": modality,
                "files": sorted({p.member.file for p in group}),
                "objects": len(group),
                "reason": why,
            }
        )
    return main


def decode_series(group: list[Parsed], settings: ServeSettings, request: SeriesRequest) -> list[DicomSlice]:
    """Decode the analysed group; objects that fail are rejected (reported), the rest kept."""
    kept: list[DicomSlice] = []
    for p in group:
        try:
            s = decode_dataset(p.dataset, settings)
        except CTHubError as e:
            request.reject(p.member, e)
            continue
        except Exception as e:  # noqa: BLE001 -- anything else about one file's content is that file's fault
            request.reject(
                p.member, UnprocessableInputError(f"the image could not be processed ({type(e).__name__})")
            )
            continue
        kept.append(s)
        request.headers.append(s.header)
        request.sources.append((p.member.file, p.member.member))
    return kept


def slice_inputs(p: Parsed, s: DicomSlice) -> Iterator[tuple[SliceInput, Any]]:
    """Each frame of one decoded object with its position and order key; yields (slice, HU/grey frame)."""
    inst = s.image.meta.get("instance_number")
    name = f"{p.member.file:06d}/{-1 if p.member.member is None else p.member.member:06d}"
    for f, frame in enumerate(s.image.pixels):
        z = slice_position(s.image.meta, f)
        yield (
            SliceInput(
                p.member,
                f,
                z,
                inst if isinstance(inst, int) else None,
                slice_sort_key(z, inst, name, f),
                (int(frame.shape[-2]), int(frame.shape[-1])),
                list(s.image.warnings),
            ),
            frame,
        )


def no_series_error(request: SeriesRequest) -> CTHubError:
    """The error of a request in which nothing could be analysed: the one file's own error when a single
    object was sent, else 422 naming what was found."""
    if len(request.errors) == 1 and not request.skipped and not request.other_series:
        return request.errors[0]
    if request.skipped and not (request.errors or request.other_series):
        return InputError("no DICOM file in the upload (send DICOM Part 10 files or a zip of them)")
    found = (
        f"{len(request.other_series)} series of other modalities, "
        f"{len(request.rejected)} unusable and {len(request.skipped)} skipped objects"
    )
    return UnprocessableInputError(f"no image series this model can analyse in the upload ({found})")
