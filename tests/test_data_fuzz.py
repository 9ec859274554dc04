"""Property-based: random bytes and random header/byte mutations of a real CT file give a usable image or
the one typed error (InputError), never another exception."""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
import pydicom
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctdata import PreprocessConfig, load_image, prepare
from ctdata.dicom import DicomPolicy, read_dicom
from cthub.errors import InputError

CT_SMALL = Path(pydicom.data.get_testdata_file("CT_small.dcm", download=False))
BASE = CT_SMALL.read_bytes()
CFG = PreprocessConfig(input_size=16, in_chans=1)
POLICY = DicomPolicy(max_pixels=1 << 22)  # keep absurd-but-allowed decodes small in the fuzz loop
EXAMPLES = int(os.environ.get("CTHUB_FUZZ_EXAMPLES", "120"))  # deeper runs: CTHUB_FUZZ_EXAMPLES=3000
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=EXAMPLES <= 120,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

FIELDS = [
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "SamplesPerPixel",
    "NumberOfFrames",
    "RescaleSlope",
    "RescaleIntercept",
    "PhotometricInterpretation",
    "Modality",
    "PixelPaddingValue",
    "SOPClassUID",
    "PixelData",
    "ImagePositionPatient",
    "PlanarConfiguration",
]
VALUES = st.one_of(
    st.none(),
    st.integers(-(2**33), 2**33),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.binary(max_size=64),
    st.sampled_from(
        [
            "MONOCHROME1",
            "RGB",
            "PALETTE COLOR",
            "YBR_FULL",
            "CT",
            "MR",
            "",
            "nan",
            "inf",
            "-0",
            "1.2.840.10008.5.1.4.1.1.481.5",
            "1e39",
        ]
    ),
)


def _ok(img) -> None:
    assert img.pixels.ndim == 3 and img.pixels.dtype == np.float32 and np.isfinite(img.pixels).all()


def _check(data: bytes) -> None:
    with contextlib.suppress(InputError):
        _ok(read_dicom(data, policy=POLICY))
    with contextlib.suppress(InputError):
        x = prepare(data, CFG)
        assert x.shape == (1, 16, 16) and bool(x.isfinite().all())


@SETTINGS
@given(st.binary(max_size=4096), st.booleans())
def test_random_bytes(data: bytes, dicm: bool) -> None:
    if dicm:
        data = bytes(128) + b"DICM" + data
    _check(data)


@SETTINGS
@given(
    st.lists(st.tuples(st.integers(0, len(BASE) - 1), st.integers(0, 255)), max_size=24),
    st.integers(132, len(BASE)),
)
def test_byte_mutations_and_truncation(edits: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(BASE)
    for pos, val in edits:
        data[pos] = val
    _check(bytes(data[:cut]))


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(FIELDS), VALUES), min_size=1, max_size=4))
def test_header_mutations(changes: list[tuple[str, object]]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(BASE))
        for name, value in changes:
            try:
                if value is None:
                    if name in ds:
                        delattr(ds, name)
                else:
                    setattr(ds, name, value)
            except (ValueError, TypeError, OverflowError, AttributeError):
                return  # pydicom refuses to hold this value: nothing to read
        buf = io.BytesIO()
        try:
            ds.save_as(buf, enforce_file_format=True)
        except Exception:  # noqa: BLE001 - pydicom cannot write it either: not a file a PACS could send
            return
    _check(buf.getvalue())
    with contextlib.suppress(InputError):
        _ok(load_image(buf.getvalue(), policy=DicomPolicy(modality="reject", max_pixels=1 << 22)))
