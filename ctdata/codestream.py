"""Image size declared inside a compressed codestream (JPEG family, JPEG 2000), read before decoding.

A decompression bomb can declare a small image in the DICOM header and a huge one in the codestream;
reading the codestream's own size lets `read_dicom` refuse it without decoding.
"""

from __future__ import annotations

import functools
import struct
import threading
from typing import Any

_SOC_SIZ = b"\xff\x4f\xff\x51"
# SOF markers of baseline/extended/progressive/lossless JPEG (not DHT C4, JPG C8, DAC CC) and JPEG-LS SOF55
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}


def codestream_size(data: bytes) -> tuple[int, int] | None:
    """(rows, columns) of the first JPEG / JPEG 2000 codestream found in `data`, or None."""
    j2k = data.find(_SOC_SIZ)
    if j2k >= 0 and len(data) >= j2k + 4 + 2 + 2 + 16:
        # SIZ: Lsiz(2) Rsiz(2) Xsiz(4) Ysiz(4) XOsiz(4) YOsiz(4)
        xsiz, ysiz, xo, yo = struct.unpack(">IIII", data[j2k + 8 : j2k + 24])
        return max(ysiz - yo, 0), max(xsiz - xo, 0)
    soi = data.find(b"\xff\xd8\xff")
    if soi < 0:
        return None
    pos = soi + 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in _SOF:
            if pos + 9 > len(data):
                return None
            rows, cols = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return rows, cols
        if marker == 0xDA or length < 2:  # start of scan without a frame header: give up
            return None
        pos += 2 + length
    return None


# --- A pydicom decoder plugin for the JPEG (ISO 10918) syntaxes, by imagecodecs (BSD-3-Clause) -------------
# pydicom's own plugins for 12-bit JPEG Extended (1.2.840.10008.1.2.4.51) are GDCM and Pillow, which both
# refuse 12-bit samples, and pylibjpeg-libjpeg (GPL-3.0), which the project cannot ship. imagecodecs'
# jpeg8_decode (libjpeg-turbo 3) decodes 8 and 12-bit lossy and 2-16 bit lossless JPEG. pydicom 3 takes
# extra decoders through its public `Decoder.add_plugin(label, (module, function))`; this module is that
# plugin: it defines `is_available`, `DECODER_DEPENDENCIES` and `decode_frame` as pydicom's decoder-plugin
# guide asks.

PLUGIN_LABEL = "imagecodecs"
_REGISTER_LOCK = threading.Lock()
JPEG_BASELINE, JPEG_EXTENDED = "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"
JPEG_LOSSLESS, JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"
IMAGECODECS_SYNTAXES = (JPEG_BASELINE, JPEG_EXTENDED, JPEG_LOSSLESS, JPEG_LOSSLESS_SV1)
DECODER_DEPENDENCIES = {uid: ("numpy", "imagecodecs") for uid in IMAGECODECS_SYNTAXES}


def is_available(uid: str) -> bool:
    """pydicom plugin hook: imagecodecs is importable and handles the transfer syntax `uid`."""
    if str(uid) not in IMAGECODECS_SYNTAXES:
        return False
    try:
        import imagecodecs
    except ImportError:
        return False
    return bool(imagecodecs.JPEG8.available)


def decode_frame(src: bytes, runner: Any) -> bytes:
    """pydicom plugin hook: one JPEG codestream -> the frame's pixel bytes (little endian, 8 or 16 bits per
    sample, colour samples interleaved; pydicom sign-extends signed samples stored in fewer bits)."""
    import imagecodecs
    import numpy as np

    arr = imagecodecs.jpeg8_decode(src)  # colour comes back as RGB (libjpeg converts YCbCr)
    if arr.ndim == 3 and arr.shape[-1] > 1:
        runner.set_option("photometric_interpretation", "RGB")
    dtype = np.dtype("<u1" if int(runner.bits_allocated) <= 8 else "<u2")
    return np.ascontiguousarray(arr, dtype=dtype).tobytes()


@functools.cache
def register_jpeg_plugin() -> None:
    """Add the imagecodecs plugin to pydicom's JPEG decoders, once per process (pydicom's `add_plugin` is not
    thread-safe: the lock keeps two first requests from registering at the same time)."""
    from pydicom.pixels import get_decoder

    with _REGISTER_LOCK:
        _register(get_decoder)


def _register(get_decoder: Any) -> None:
    for uid in IMAGECODECS_SYNTAXES:
        decoder = get_decoder(uid)
        try:
            decoder.add_plugin(PLUGIN_LABEL, ("ctdata.codestream", "decode_frame"))
        except ValueError:  # pydicom's answer when the label is already registered
            continue
