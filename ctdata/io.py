"""Load any supported image source: DICOM (bytes or path) or an ordinary image (PNG/JPEG)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from cthub.errors import InputError
from ctdata.dicom import CTImage, is_dicom, read_dicom

_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM")


def load_image(source: bytes | str | Path) -> CTImage:
    """DICOM -> HU image; PNG/JPEG/TIFF/BMP -> grey image (not HU). Anything else: InputError."""
    if isinstance(source, (str, Path)):
        p = Path(source)
        if not p.is_file():
            raise InputError(f"no such file: {p.name}")
        data = p.read_bytes()
    else:
        data = bytes(source)
    if is_dicom(data):
        return read_dicom(data)
    if data.startswith(_IMAGE_MAGIC):
        return read_picture(data)
    raise InputError("unsupported file: expected DICOM (Part 10) or a PNG/JPEG/TIFF image")


def read_picture(data: bytes) -> CTImage:
    """An ordinary picture as grey 0..255 float32 [1,H,W]; alpha is dropped, colour averaged."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            grey = np.asarray(im.convert("L"), dtype=np.float32)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"the image could not be decoded ({type(e).__name__})") from None
    return CTImage(pixels=grey[None], is_hu=False, source="picture")
