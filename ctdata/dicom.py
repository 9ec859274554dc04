"""DICOM reading: bytes or path -> HU array, with typed errors and no PHI in any message."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cthub.errors import InputError

DEFAULT_MAX_PIXELS = 4096 * 4096 * 4


@dataclass
class CTImage:
    """A loaded image. `pixels` is [frames, H, W] float32: HU when `is_hu`, else grey 0..255."""

    pixels: np.ndarray
    is_hu: bool
    source: str = "dicom"
    warnings: list[str] = field(default_factory=list)
    meta: dict[str, object] = field(default_factory=dict)


def is_dicom(data: bytes) -> bool:
    """True for Part 10 files (preamble + 'DICM')."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def read_dicom(source: bytes | str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> CTImage:
    """Read one DICOM object into HU (RescaleSlope/Intercept applied)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    data = Path(source).read_bytes() if isinstance(source, (str, Path)) else bytes(source)
    if not is_dicom(data):
        raise InputError("not a DICOM file: the 'DICM' marker at byte 128 is missing")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, ValueError, KeyError, OSError) as e:
        raise InputError(f"the DICOM file could not be parsed ({type(e).__name__})") from None
    if "PixelData" not in ds:
        raise InputError("the DICOM file has no pixel data (is it an image?)")
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if rows <= 0 or cols <= 0 or rows * cols * frames > max_pixels:
        raise InputError(f"refusing image of {frames}x{rows}x{cols} pixels (limit {max_pixels})")
    try:
        arr = ds.pixel_array
    except Exception as e:  # decoders raise many types; the user only needs to know it failed
        raise InputError(f"pixel data could not be decoded ({type(e).__name__})") from None
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    hu = arr * slope + intercept
    if not np.isfinite(hu).all():
        raise InputError("pixel values are not finite after applying RescaleSlope/RescaleIntercept")
    return CTImage(pixels=hu.astype(np.float32), is_hu=True, source="dicom",
                   meta={"modality": str(ds.get("Modality", "")), "rows": rows, "columns": cols})
