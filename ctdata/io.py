"""Load any supported image source: DICOM (bytes or path) or an ordinary image (PNG/JPEG/TIFF/BMP)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from ctdata.dicom import DEFAULT_MAX_PIXELS, CTImage, DicomPolicy, is_dicom, read_dicom
from cthub.errors import InputError

_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM")


def load_image(source: bytes | str | Path, *, policy: DicomPolicy | None = None) -> CTImage:
    """DICOM -> HU image; PNG/JPEG/TIFF/BMP -> grey image (not HU). Anything else: InputError."""
    pol = policy or DicomPolicy()
    if isinstance(source, (str, Path)):
        p = Path(source)
        if not p.is_file():
            raise InputError(f"no such file: {p.name}")
        if p.stat().st_size > pol.max_bytes:
            raise InputError(f"file of {p.stat().st_size:,} bytes exceeds the {pol.max_bytes:,} byte limit")
        data = p.read_bytes()
    else:
        data = bytes(source)
    if is_dicom(data):
        return read_dicom(data, policy=pol)
    if data.startswith(_IMAGE_MAGIC):
        return read_picture(data, max_pixels=pol.max_pixels)
    raise InputError("unsupported file: expected DICOM (Part 10) or a PNG/JPEG/TIFF/BMP image")


def read_picture(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> CTImage:
    """An ordinary picture as grey 0..255 float32 [1,H,W]; alpha is dropped, colour averaged (luma)."""

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise InputError(f"refusing a {w} x {h} picture (limit {max_pixels:,} pixels)")
                im.load()
                if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                    arr = np.asarray(im, dtype=np.float32)
                    grey = arr * (255.0 / max(float(arr.max()), 1.0)) if arr.max() > 255 else arr
                else:
                    grey = np.asarray(im.convert("L"), dtype=np.float32)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - Pillow raises OSError, ValueError, DecompressionBombError, SyntaxError...
        raise InputError(
            f"the image could not be decoded; it may be truncated or corrupt ({type(e).__name__})"
        ) from None
    if grey.ndim != 2 or grey.size == 0:
        raise InputError("the image has no usable pixels")
    return CTImage(pixels=grey[None], is_hu=False, source="picture", meta={"rows": h, "columns": w})
