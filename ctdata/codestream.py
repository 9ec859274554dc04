"""Image size declared inside a compressed codestream (JPEG family, JPEG 2000), read before decoding.

A decompression bomb can declare a small image in the DICOM header and a huge one in the codestream;
reading the codestream's own size lets `read_dicom` refuse it without decoding.
"""

from __future__ import annotations

import struct

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
