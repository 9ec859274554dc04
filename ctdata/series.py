"""One series from a folder, a zip, or a list of DICOM blobs -> slices sorted along the patient axis.

Order: position along the slice normal (ImagePositionPatient · (row × column direction)), then
InstanceNumber, then file name. Multi-frame objects contribute all their frames. Non-DICOM files
(DICOMDIR, notes, thumbnails) are skipped; several series in one source is an error.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctdata.dicom import CTImage, DicomError, DicomPolicy, is_dicom, read_dicom
from cthub.errors import InputError

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


def _blobs(source: str | Path | list[bytes]) -> list[tuple[str, bytes]]:
    if isinstance(source, list):
        return [(f"{i:06d}", b) for i, b in enumerate(source)]
    p = Path(source)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.name != "DICOMDIR")
        return [(f.relative_to(p).as_posix(), f.read_bytes()) for f in files]
    if p.is_file() and zipfile.is_zipfile(p):
        try:
            with zipfile.ZipFile(p) as z:
                infos = [i for i in z.infolist() if not i.is_dir() and not i.filename.startswith("__MACOSX")]
                total = sum(i.file_size for i in infos)
                if len(infos) > MAX_ZIP_MEMBERS or total > MAX_ZIP_BYTES:
                    raise InputError(
                        f"zip holds {len(infos)} files / {total:,} bytes uncompressed, "
                        "above the limit for one series"
                    )
                return [(i.filename, z.read(i)) for i in sorted(infos, key=lambda i: i.filename)]
        except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as e:
            raise InputError(f"the zip file cannot be read ({type(e).__name__})") from None
    raise InputError(f"{p.name}: expected a folder or a zip file of one DICOM series")


def _normal(orientation: list[float] | None) -> np.ndarray | None:
    if not orientation or len(orientation) != 6:
        return None
    n = np.cross(np.asarray(orientation[:3]), np.asarray(orientation[3:]))
    return n if np.linalg.norm(n) > 0 else None


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
        orientation, stored = img.meta.get("orientation"), img.meta.get("positions")
        n = _normal(orientation if isinstance(orientation, list) else None)
        positions: list[Any] = stored if isinstance(stored, list) else []
        inst = img.meta.get("instance_number")
        for f, frame in enumerate(img.pixels):
            pos = positions[f] if f < len(positions) else None
            z = float(np.dot(n, pos)) if n is not None and pos is not None else None
            key = (
                0 if z is not None else 1,
                z if z is not None else 0.0,
                inst if isinstance(inst, int) else 1 << 30,
                name,
                f,
            )
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
