"""One series from a folder, a zip, or a list of DICOM blobs -> slices sorted along the patient axis.

Order: position along the slice normal (ImagePositionPatient · (row × column direction)), then
InstanceNumber, then file name. Multi-frame objects contribute all their frames. Non-DICOM files
(DICOMDIR, notes, thumbnails) are skipped; several series in one source is an error.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctdata.dicom import CTImage, DicomError, DicomPolicy, is_dicom, read_dicom
from cthub.errors import InputError, PayloadTooLargeError

MAX_ZIP_BYTES = 8 << 30
MAX_ZIP_MEMBERS = 20000


@dataclass
class Series:
    """Slices [S,H,W] float32 (HU when `is_hu`), with per-slice positions along the normal (or None)."""

    pixels: np.ndarray
    is_hu: bool
    positions: list[float | None] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped: int = 0


def is_zip(data: bytes) -> bool:
    """True for bytes that start like a zip archive (local file header or an empty archive)."""
    return data[:4] in (b"PK\x03\x04", b"PK\x05\x06")


def iter_zip_members(
    source: str | Path | bytes, *, max_bytes: int = MAX_ZIP_BYTES, max_members: int = MAX_ZIP_MEMBERS
) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every file in a zip, sorted by name, read one at a time. The member count and the
    declared uncompressed total are checked against the limits before anything is decompressed
    (`PayloadTooLargeError`); a member that decompresses to more than it declared fails its CRC check."""
    try:
        with zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source) as z:
            infos = [i for i in z.infolist() if not i.is_dir() and not i.filename.startswith("__MACOSX")]
            total = sum(i.file_size for i in infos)
            if len(infos) > max_members or total > max_bytes:
                raise PayloadTooLargeError(
                    f"zip holds {len(infos)} files / {total:,} bytes uncompressed, above the limit of "
                    f"{max_members} files / {max_bytes:,} bytes for one series"
                )
            for info in sorted(infos, key=lambda i: i.filename):
                yield info.filename, z.read(info)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, RuntimeError, ValueError) as e:
        raise InputError(f"the zip file cannot be read ({type(e).__name__})") from None


def _blobs(source: str | Path | list[bytes]) -> list[tuple[str, bytes]]:
    if isinstance(source, list):
        return [(f"{i:06d}", b) for i, b in enumerate(source)]
    p = Path(source)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.name != "DICOMDIR")
        return [(f.relative_to(p).as_posix(), f.read_bytes()) for f in files]
    if p.is_file() and zipfile.is_zipfile(p):
        return list(iter_zip_members(p))
    raise InputError(f"{p.name}: expected a folder or a zip file of one DICOM series")


def _normal(orientation: list[float] | None) -> np.ndarray | None:
    if not orientation or len(orientation) != 6:
        return None
    n = np.cross(np.asarray(orientation[:3]), np.asarray(orientation[3:]))
    return n if np.linalg.norm(n) > 0 else None


def slice_position(meta: dict[str, object], frame: int = 0) -> float | None:
    """Position of one frame along its slice normal (ImagePositionPatient · (row × column direction)), in
    mm, from `CTImage.meta`; None without orientation or position."""
    orientation, stored = meta.get("orientation"), meta.get("positions")
    n = _normal(orientation if isinstance(orientation, list) else None)
    positions: list[Any] = stored if isinstance(stored, list) else []
    pos = positions[frame] if frame < len(positions) else None
    return float(np.dot(n, pos)) if n is not None and pos is not None else None


def slice_sort_key(position: float | None, instance_number: object, name: str, frame: int) -> tuple:
    """THE order of slices in a series: position along the normal (slices without one last), then
    InstanceNumber, then the source's name (file or zip member), then the frame."""
    return (
        0 if position is not None else 1,
        position if position is not None else 0.0,
        instance_number if isinstance(instance_number, int) else 1 << 30,
        name,
        frame,
    )


def read_series(source: str | Path | list[bytes], *, policy: DicomPolicy | None = None) -> Series:
    """Read and sort one series. Unreadable DICOMs raise; non-DICOM files are counted in `skipped`."""
    items: list[tuple[tuple, np.ndarray, float | None]] = []
    kinds: set[bool] = set()
    series_keys: set[str] = set()
    warns: list[str] = []
    skipped = 0
    for name, data in _blobs(source):
        if not is_dicom(data):
            skipped += 1
            continue
        try:
            img: CTImage = read_dicom(data, policy=policy)
        except DicomError as e:
            if e.reason == "non_image":  # e.g. a presentation state or SR stored with the images
                skipped += 1
                continue
            raise
        kinds.add(img.is_hu)
        series_keys.add(str(img.meta.get("series_key", "")))
        warns.extend(w for w in img.warnings if w not in warns)
        inst = img.meta.get("instance_number")
        for f, frame in enumerate(img.pixels):
            z = slice_position(img.meta, f)
            key = slice_sort_key(z, inst, name, f)
            items.append((key, frame, z))
    if not items:
        raise InputError("no DICOM images found in the series source")
    if len(series_keys - {""}) > 1:
        raise InputError(f"the source holds {len(series_keys - {''})} different series; provide one series")
    if len(kinds) > 1:
        raise InputError("the series mixes HU images with non-HU (colour or non-CT) images")
    shapes = {it[1].shape for it in items}
    if len(shapes) > 1:
        raise InputError(f"slices of one series have different sizes: {sorted(shapes)}")
    items.sort(key=lambda it: it[0])
    return Series(np.stack([it[1] for it in items]), kinds.pop(), [it[2] for it in items], warns, skipped)
