"""One real 512² CT slice in every transfer syntax a CT archive holds, decoded through `ctdata.read_dicom`.

The slice (fnndsc_chest, Philips, unsigned 12-bit stored in 16) is decoded once, then re-encoded at test time
into tmp_path with encoders from PyPI: pydicom (deflate, big endian, RLE), pyjpegls (JPEG-LS),
pylibjpeg-openjpeg (JPEG 2000) and imagecodecs (JPEG baseline, 12-bit JPEG Extended, JPEG lossless
processes 14 and 14 SV1).
Lossless syntaxes must give the same HU and the same model input, bit for bit; lossy ones must stay close.
Retired and unknown syntaxes are refused with a typed error (415 in the API) that names the syntax.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import shared_file
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate

from ctdata.dicom import DicomError, read_dicom
from ctdata.preprocess import PreprocessConfig, prepare

imagecodecs = pytest.importorskip("imagecodecs", reason="imagecodecs (a ctdata dependency) is not installed")
pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def native() -> Dataset:
    """The real slice as explicit VR little endian, pixels decoded from its JPEG 2000 lossless original."""
    ds = pydicom.dcmread(shared_file("real_ct", "fnndsc_chest", "000001.dcm"))
    arr = ds.pixel_array
    assert arr.dtype == np.uint16 and arr.shape == (512, 512) and int(ds.BitsStored) == 12
    out = _copy(ds, uid.ExplicitVRLittleEndian)
    out.PixelData = arr.astype("<u2").tobytes()
    out["PixelData"].VR = "OW"
    return out


def _copy(ds: Dataset, syntax: str) -> Dataset:
    """A deep copy as a new Dataset (no encoding remembered from the read), to be saved in `syntax`."""
    out = Dataset()
    out.update(copy.deepcopy(ds))
    out.file_meta = copy.deepcopy(ds.file_meta)
    out.file_meta.TransferSyntaxUID = syntax
    return out


def _save(ds: Dataset, path: Path) -> Path:
    """Written in the encoding its file meta's transfer syntax names."""
    ds.save_as(path, enforce_file_format=True)
    return path


def _encapsulated(ds: Dataset, syntax: str, fragments: list[bytes] | bytes, path: Path) -> Path:
    """`ds` with its pixels replaced by the given codestream (one frame, one or more fragments)."""
    out = _copy(ds, syntax)
    if isinstance(fragments, bytes):
        out.PixelData = encapsulate([fragments])
    else:  # one frame split across several fragments, as some archives store it
        out.PixelData = encapsulate([b"".join(fragments)], fragments_per_frame=len(fragments))
    out["PixelData"].VR = "OB"
    out["PixelData"].is_undefined_length = True
    return _save(out, path)


def _pydicom_compressed(ds: Dataset, syntax: str, path: Path, **kwargs: object) -> Path:
    out = _copy(ds, uid.ExplicitVRLittleEndian)
    out.compress(syntax, **kwargs)  # type: ignore[arg-type]
    return _save(out, path)


def _big_endian(ds: Dataset, path: Path) -> Path:
    out = _copy(ds, uid.ExplicitVRBigEndian)
    out.PixelData = ds.pixel_array.astype(">u2").tobytes()  # OW is written as given: swap it ourselves
    return _save(out, path)


def _sof(codestream: bytes) -> int:
    """The JPEG start-of-frame marker of a codestream (0xC0 baseline, 0xC1 extended, 0xC3 lossless)."""
    for i in range(len(codestream) - 1):
        if codestream[i] == 0xFF and codestream[i + 1] in (0xC0, 0xC1, 0xC2, 0xC3):
            return codestream[i + 1]
    raise AssertionError("no SOF marker")


def _pixels(ds: Dataset) -> np.ndarray:
    return ds.pixel_array


# name -> (transfer syntax, builder(native, path) -> file, lossless)
Builder = Callable[[Dataset, Path], Path]


def _jpeg12(ds: Dataset, path: Path) -> Path:
    stream = imagecodecs.jpeg8_encode(_pixels(ds), level=95, bitspersample=12)
    assert _sof(stream) == 0xC1  # extended (process 4), 12-bit samples
    return _encapsulated(ds, uid.JPEGExtended12Bit, stream, path)


def _jpeg_lossless(predictor: int, syntax: str) -> Builder:
    def build(ds: Dataset, path: Path) -> Path:
        stream = imagecodecs.jpeg8_encode(_pixels(ds), lossless=True, predictor=predictor, bitspersample=12)
        assert _sof(stream) == 0xC3
        return _encapsulated(ds, syntax, stream, path)

    return build


def _resaved(syntax: str) -> Builder:
    """The native pixels written in an uncompressed (or deflated) syntax."""
    return lambda ds, path: _save(_copy(ds, syntax), path)


def _j2k_fragments(ds: Dataset, path: Path) -> Path:
    stream = imagecodecs.jpeg2k_encode(_pixels(ds), level=0, codecformat="J2K")  # level 0: reversible
    third = len(stream) // 3
    return _encapsulated(
        ds, uid.JPEG2000Lossless, [stream[:third], stream[third : 2 * third], stream[2 * third :]], path
    )


LOSSLESS: dict[str, tuple[str, Builder]] = {
    "implicit_le": (uid.ImplicitVRLittleEndian, _resaved(uid.ImplicitVRLittleEndian)),
    "explicit_le": (uid.ExplicitVRLittleEndian, _resaved(uid.ExplicitVRLittleEndian)),
    "explicit_be": (uid.ExplicitVRBigEndian, _big_endian),
    "deflate": (uid.DeflatedExplicitVRLittleEndian, _resaved(uid.DeflatedExplicitVRLittleEndian)),
    "rle": (uid.RLELossless, lambda ds, p: _pydicom_compressed(ds, uid.RLELossless, p)),
    "jpeg_lossless_p14": (uid.JPEGLossless, _jpeg_lossless(6, uid.JPEGLossless)),
    "jpeg_lossless_sv1": (uid.JPEGLosslessSV1, _jpeg_lossless(1, uid.JPEGLosslessSV1)),
    "jpegls_lossless": (uid.JPEGLSLossless, lambda ds, p: _pydicom_compressed(ds, uid.JPEGLSLossless, p)),
    "j2k_lossless": (uid.JPEG2000Lossless, lambda ds, p: _pydicom_compressed(ds, uid.JPEG2000Lossless, p)),
    "j2k_lossless_3_fragments": (uid.JPEG2000Lossless, _j2k_fragments),
}
LOSSY: dict[str, tuple[str, Builder]] = {
    "jpeg_extended_12bit": (uid.JPEGExtended12Bit, _jpeg12),
    "jpegls_near_lossless": (
        uid.JPEGLSNearLossless,
        lambda ds, p: _pydicom_compressed(ds, uid.JPEGLSNearLossless, p, jls_error=3),
    ),
    "j2k_lossy": (uid.JPEG2000, lambda ds, p: _pydicom_compressed(ds, uid.JPEG2000, p, j2k_cr=[10])),
}


@pytest.fixture(scope="module")
def reference(native: Dataset, tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray]:
    path = _save(native, tmp_path_factory.mktemp("native") / "native.dcm")
    img = read_dicom(path)
    return img.pixels, prepare(path.read_bytes(), PreprocessConfig()).numpy()


@pytest.mark.parametrize("name", list(LOSSLESS))
def test_lossless_syntax_gives_identical_hu_and_model_input(
    name: str, native: Dataset, reference: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    syntax, build = LOSSLESS[name]
    path = build(native, tmp_path / f"{name}.dcm")
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    img = read_dicom(path)
    hu, model_input = reference
    assert img.is_hu and img.pixels.shape == (1, 512, 512)
    np.testing.assert_array_equal(img.pixels, hu)
    np.testing.assert_array_equal(prepare(path.read_bytes(), PreprocessConfig()).numpy(), model_input)


@pytest.mark.parametrize("name", list(LOSSY))
def test_lossy_syntax_stays_close(
    name: str, native: Dataset, reference: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    syntax, build = LOSSY[name]
    path = build(native, tmp_path / f"{name}.dcm")
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    img = read_dicom(path)
    hu, model_input = reference
    assert img.is_hu and img.pixels.shape == (1, 512, 512)
    assert not np.array_equal(img.pixels, hu)  # really lossy, so "close" is a real check
    assert float(np.abs(img.pixels - hu).mean()) < 10.0  # HU, over a 512² slice spanning ~2500 HU
    assert np.corrcoef(img.pixels.ravel(), hu.ravel())[0, 1] > 0.999
    got = prepare(path.read_bytes(), PreprocessConfig()).numpy()
    assert float(np.abs(got - model_input).mean()) < 0.01 * float(np.ptp(model_input))


def test_jpeg_baseline_8bit_matches_its_native_copy(native: Dataset, tmp_path: Path) -> None:
    """JPEG baseline holds 8-bit samples only: the slice is quantised to 8 bits (RescaleSlope 16) and the
    baseline copy compared with the native 8-bit copy."""
    eight = _copy(native, uid.ExplicitVRLittleEndian)
    stored = np.clip(np.round(native.pixel_array / 16.0), 0, 255).astype(np.uint8)
    eight.BitsAllocated, eight.BitsStored, eight.HighBit = 8, 8, 7
    eight.RescaleSlope = 16
    eight.PixelData = stored.tobytes()
    eight["PixelData"].VR = "OB"
    ref = read_dicom(_save(eight, tmp_path / "native8.dcm")).pixels
    stream = imagecodecs.jpeg8_encode(stored, level=95)
    assert _sof(stream) == 0xC0
    img = read_dicom(_encapsulated(eight, uid.JPEGBaseline8Bit, stream, tmp_path / "baseline.dcm"))
    assert img.is_hu and img.pixels.shape == (1, 512, 512)
    assert float(np.abs(img.pixels - ref).mean()) < 16.0  # within one 8-bit step on average
    assert np.corrcoef(img.pixels.ravel(), ref.ravel())[0, 1] > 0.999


@pytest.mark.parametrize(
    ("syntax", "retired"),
    [
        ("1.2.840.10008.1.2.4.53", True),  # JPEG spectral selection (process 6 and 8)
        ("1.2.840.10008.1.2.4.55", True),  # JPEG full progression (process 10 and 12)
        ("1.2.840.10008.1.2.4.100", False),  # MPEG2: a video syntax nothing here decodes
    ],
)
def test_retired_or_undecodable_syntax_is_refused_naming_it(
    syntax: str, retired: bool, native: Dataset, tmp_path: Path
) -> None:
    stream = imagecodecs.jpeg8_encode(_pixels(native), level=95, bitspersample=12)
    path = _encapsulated(native, syntax, stream, tmp_path / "retired.dcm")
    with pytest.raises(DicomError) as e:
        read_dicom(path)
    assert e.value.reason == "unsupported_transfer_syntax"
    assert syntax in str(e.value) and uid.UID(syntax).name in str(e.value)
    assert ("retired" in str(e.value)) == retired


def test_unsupported_syntax_is_415_in_the_api(native: Dataset, tmp_path: Path) -> None:
    from serving.inputs import error_body, http_status

    path = _encapsulated(native, "1.2.840.10008.1.2.4.53", b"\xff\xd8\xff\xd9", tmp_path / "r.dcm")
    buf = io.BytesIO(path.read_bytes())
    with pytest.raises(DicomError) as e:
        read_dicom(buf.getvalue())
    assert http_status(e.value) == 415
    assert error_body(e.value)["error"] == "unsupported_media_type"


@pytest.mark.parametrize("bits", [16, 12])
def test_signed_jpeg_lossless_gives_identical_hu(bits: int) -> None:
    """A signed slice (GE, PixelRepresentation 1, -1500..1712) as JPEG lossless SV1 at 16 and at 12 bits
    stored (two's complement in the codestream): the sign survives the imagecodecs plugin."""
    src = shared_file("real_ct", "ge_head_tilt", "05.dcm")
    ds = pydicom.dcmread(src)
    pixels = ds.pixel_array
    assert pixels.dtype == np.int16 and pixels.min() < 0
    stored = (pixels.astype(np.int32) & ((1 << bits) - 1)).astype(np.uint16)
    stream = imagecodecs.jpeg8_encode(stored, lossless=True, predictor=1, bitspersample=bits)
    out = _copy(ds, uid.JPEGLosslessSV1)
    out.BitsStored, out.HighBit = bits, bits - 1
    out.PixelData = encapsulate([stream])
    out["PixelData"].VR = "OB"
    buf = io.BytesIO()
    out.save_as(buf, enforce_file_format=True)
    np.testing.assert_array_equal(read_dicom(buf.getvalue()).pixels, read_dicom(src).pixels)
