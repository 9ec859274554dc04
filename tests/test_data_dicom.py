"""DICOM reading on real files (pydicom, pydicom-data) and on files built from them for each edge case."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from ctdata.dicom import DicomError, DicomPolicy, read_dicom
from cthub.errors import InputError

PHI = ("DOE^JANE", "PID-778899", "19520314", "20240102", "ACC-4242")


def sample(name: str) -> Path:
    p = get_testdata_file(name, download=False)
    if p is None:
        pytest.skip(f"{name} needs pydicom-data")
    return Path(p)


def dataset(name: str = "CT_small.dcm") -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(sample(name))
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PHI[0], PHI[1], PHI[2]
    ds.StudyDate, ds.AccessionNumber = PHI[3], PHI[4]
    return ds


def to_bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def reason(data: bytes, **kw) -> str:
    with pytest.raises(DicomError) as ei:
        read_dicom(data, **kw)
    assert isinstance(ei.value, InputError)
    msg = str(ei.value)
    assert not any(p.lower() in msg.lower() for p in PHI), msg
    return ei.value.reason


def hu(data: bytes | Path, **kw) -> np.ndarray:
    img = read_dicom(data, **kw)
    assert img.is_hu
    return img.pixels


# --- real files --------------------------------------------------------------------------------------


def test_ct_small_hu_matches_pydicom_modality_lut(ct_small_dcm: Path) -> None:
    ds = pydicom.dcmread(ct_small_dcm)
    expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    img = read_dicom(ct_small_dcm)
    assert img.pixels.shape == (1, 128, 128) and img.warnings == []
    np.testing.assert_array_equal(img.pixels[0], expected)
    assert img.meta["modality"] == "CT" and img.meta["transfer_syntax"] == "Explicit VR Little Endian"


@pytest.mark.parametrize(
    "compressed, reference",
    [
        ("693_J2KR.dcm", "693_UNCR.dcm"),  # JPEG 2000 lossless == its uncompressed source
        ("693_J2KI.dcm", "693_UNCI.dcm"),  # JPEG 2000 lossy == its decoded uncompressed copy
        ("MR_small_RLE.dcm", "MR_small.dcm"),  # RLE
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),  # JPEG-LS
    ],
)
def test_compressed_transfer_syntaxes_decode_exactly(compressed: str, reference: str) -> None:
    a, b = read_dicom(sample(compressed)), read_dicom(sample(reference))
    assert a.is_hu == b.is_hu and a.meta["transfer_syntax"] != b.meta["transfer_syntax"]
    np.testing.assert_array_equal(a.pixels, b.pixels)


def test_jpeg_lossless_ct_and_rle_roundtrip_we_encode() -> None:
    img = read_dicom(sample("bad_sequence.dcm"))  # JPEG lossless process 14, a 512x512 CT
    assert img.is_hu and img.pixels.shape == (1, 512, 512) and "Lossless" in str(img.meta["transfer_syntax"])
    assert -1100 < img.pixels.min() < img.pixels.max() < 4000
    ds = dataset()
    ds.compress(pydicom.uid.RLELossless)
    np.testing.assert_array_equal(hu(to_bytes(ds)), hu(sample("CT_small.dcm")))


def test_enhanced_multiframe_ct_per_frame_rescale() -> None:
    ds = dataset("eCT_Supplemental.dcm")
    img = read_dicom(to_bytes(ds))
    assert img.pixels.shape == (2, 512, 512) and img.meta["sop_class"] == "Enhanced CT Image Storage"
    stored = ds.pixel_array.astype(np.float32)
    np.testing.assert_array_equal(img.pixels, stored - 1024)  # shared group: intercept -1024
    for f, inter in enumerate(("-1024", "0")):  # per-frame groups win over the shared group
        pvt = pydicom.Dataset()
        pvt.RescaleIntercept, pvt.RescaleSlope, pvt.RescaleType = inter, "1", "HU"
        ds.PerFrameFunctionalGroupsSequence[f].PixelValueTransformationSequence = [pvt]
    img = read_dicom(to_bytes(ds))
    np.testing.assert_array_equal(img.pixels[0], stored[0] - 1024)
    np.testing.assert_array_equal(img.pixels[1], stored[1])
    assert len(img.meta["positions"]) == 2


def test_classic_multiframe_shares_rescale() -> None:
    ds = dataset()
    frames = np.stack([ds.pixel_array, ds.pixel_array[::-1], ds.pixel_array.T]).astype(np.int16)
    ds.NumberOfFrames = 3
    ds.PixelData = frames.tobytes()
    img = read_dicom(to_bytes(ds))
    np.testing.assert_array_equal(img.pixels, frames.astype(np.float32) - 1024)


@pytest.mark.parametrize("name", ["SC_rgb.dcm", "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle.dcm"])
def test_rgb_secondary_capture_is_grey_and_flagged_not_hu(name: str) -> None:
    img = read_dicom(sample(name))
    assert not img.is_hu and img.pixels.shape == (1, 100, 100)
    assert img.pixels.min() >= 0 and img.pixels.max() <= 255
    assert any("not HU" in w for w in img.warnings)
    rgb = pydicom.dcmread(sample(name)).pixel_array.astype(np.float32)
    np.testing.assert_allclose(img.pixels[0], rgb @ np.array([0.299, 0.587, 0.114]), atol=1e-3)


def test_non_image_sop_class() -> None:
    assert reason(sample("rtplan.dcm").read_bytes()) == "non_image"
    assert reason(sample("liver.dcm").read_bytes()) == "non_image"  # segmentation: pixels, not an image


def test_12bit_jpeg_extended_decodes_with_imagecodecs() -> None:
    """pydicom's 12-bit JPEG Extended sample (GDCM and Pillow refuse it): the imagecodecs plugin decodes it to
    what imagecodecs gives for the bare codestream (tests/test_decoders.py compares a real CT slice)."""
    import imagecodecs
    from pydicom.encaps import generate_frames

    path = sample("JPEG-lossy.dcm")
    ds = pydicom.dcmread(path)
    assert int(ds.BitsStored) == 12 and ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.51"
    img = read_dicom(path, policy=DicomPolicy(modality="allow"))
    stream = next(generate_frames(ds.PixelData, number_of_frames=1))
    expected = imagecodecs.jpeg8_decode(stream).astype(np.float32)
    assert img.pixels.shape == (1, *expected.shape) and expected.max() > 255  # really 12-bit samples
    lo, hi = expected.min(), expected.max()  # not CT: the reader stretches grey values to 0..255
    np.testing.assert_allclose(img.pixels[0], (expected - lo) / (hi - lo) * 255.0, atol=1e-3)


# --- files built for each edge case ---------------------------------------------------------------


def test_unsigned_and_missing_intercept_defaults_with_warning() -> None:
    ref = hu(sample("CT_small.dcm"))
    ds = dataset()
    stored = ds.pixel_array
    assert stored.min() >= 0
    ds.PixelRepresentation = 0
    ds.PixelData = stored.astype(np.uint16).tobytes()
    np.testing.assert_array_equal(hu(to_bytes(ds)), ref)  # unsigned with explicit intercept
    del ds.RescaleIntercept, ds.RescaleSlope
    img = read_dicom(to_bytes(ds))
    np.testing.assert_array_equal(img.pixels, ref)  # unsigned default intercept -1024 (the paper's code)
    assert any("RescaleIntercept missing" in w for w in img.warnings)
    assert any("RescaleSlope missing" in w for w in img.warnings)
    img = read_dicom(to_bytes(ds), policy=DicomPolicy(default_intercept=0.0))
    np.testing.assert_array_equal(img.pixels, ref + 1024)


def test_signed_pixels_already_in_hu() -> None:
    ref = hu(sample("CT_small.dcm"))
    ds = dataset()
    ds.PixelData = ref[0].astype(np.int16).tobytes()
    ds.RescaleIntercept = 0
    assert (ref < 0).any()
    np.testing.assert_array_equal(hu(to_bytes(ds)), ref)
    del ds.RescaleIntercept  # signed without intercept: 0 assumed
    np.testing.assert_array_equal(hu(to_bytes(ds)), ref)


def test_monochrome1() -> None:
    ref = hu(sample("CT_small.dcm"))
    ds = dataset()
    ds.PhotometricInterpretation = "MONOCHROME1"
    img = read_dicom(to_bytes(ds))
    np.testing.assert_array_equal(img.pixels, ref)  # CT: HU are physical, inversion is display-only
    assert any("MONOCHROME1" in w for w in img.warnings)
    ds.Modality = "CR"
    del ds.RescaleIntercept, ds.RescaleSlope
    inverted = read_dicom(to_bytes(ds)).pixels
    ds.PhotometricInterpretation = "MONOCHROME2"
    normal = read_dicom(to_bytes(ds)).pixels
    np.testing.assert_allclose(inverted, 255.0 - normal, atol=1e-3)  # grey image: shown as MONOCHROME2


def test_pixel_padding_value() -> None:
    ds = dataset()
    del ds.PixelPaddingValue  # CT_small declares -2000 without using it
    stored = ds.pixel_array.copy()
    stored[:10] = -2000  # outside the field of view
    ds.PixelData = stored.astype(np.int16).tobytes()
    unpadded = read_dicom(to_bytes(ds)).pixels
    assert unpadded.min() == -3024
    ds.add_new(0x00280120, "SS", -2000)  # PixelPaddingValue, signed like the pixels
    img = read_dicom(to_bytes(ds))
    rest = img.pixels[0, 10:]
    assert (img.pixels[0, :10] == rest.min()).all() and img.meta["padding_fraction"] > 0
    np.testing.assert_array_equal(rest, unpadded[0, 10:])


@pytest.mark.parametrize("modality", ["MR", "OT"])
def test_wrong_modality_reject_or_warn(modality: str) -> None:
    ds = dataset()
    ds.Modality = modality
    data = to_bytes(ds)
    assert reason(data, policy=DicomPolicy(modality="reject")) == "modality"
    img = read_dicom(data, policy=DicomPolicy(modality="warn"))
    assert not img.is_hu and any(f"modality {modality}" in w for w in img.warnings)


def test_huge_dimensions_refused_before_decoding() -> None:
    ds = dataset()
    ds.Rows = ds.Columns = 65535  # pixel data stays 32 KB: decoding would fail differently
    assert reason(to_bytes(ds)) == "too_large"
    assert reason(sample("CT_small.dcm").read_bytes(), max_pixels=128 * 127) == "too_large"
    read_dicom(sample("CT_small.dcm"), max_pixels=128 * 128)


def test_codestream_larger_than_header_is_refused() -> None:
    ds = dataset("693_J2KR.dcm")
    ds.Rows = ds.Columns = 64  # the JPEG 2000 codestream still says 512 x 512
    assert reason(to_bytes(ds)) == "too_large"


@pytest.mark.parametrize("keep", [60, 140, 400, 1200, 20000, 38000])
def test_truncated_bytes(keep: int) -> None:
    data = to_bytes(dataset())
    assert reason(data[:keep]) in ("not_dicom", "corrupt", "truncated")


def test_truncated_jpeg2000() -> None:
    data = to_bytes(dataset("693_J2KR.dcm"))
    assert reason(data[: len(data) * 2 // 3]) in ("corrupt", "truncated", "decode_failed")


def test_no_pixel_data_not_dicom_and_unknown_transfer_syntax(tmp_path: Path) -> None:
    ds = dataset()
    del ds.PixelData
    assert reason(to_bytes(ds)) in ("truncated", "no_pixel_data")
    assert reason(b"\x89PNG\r\n\x1a\n" + bytes(200)) == "not_dicom"
    ds = dataset()
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.9.9999.7"  # a vendor's private compression
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True, implicit_vr=False, little_endian=True)
    assert reason(buf.getvalue()) == "unsupported_transfer_syntax"


def test_nan_and_inf_after_rescale() -> None:
    ds = dataset()
    ds.RescaleSlope = "1e36"  # finite slope, values overflow float32 after rescale
    assert reason(to_bytes(ds)) == "non_finite"
    ds.RescaleSlope = "1e300"  # not representable as float32
    assert reason(to_bytes(ds)) == "non_finite"


def test_no_phi_in_inspect_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cthub.cli import main

    f = tmp_path / "x.dcm"
    f.write_bytes(to_bytes(dataset()))
    assert main(["data", "inspect", str(f)]) == 0
    out = capsys.readouterr()
    assert "CT" in out.out and "value_range" in out.out
    assert not any(p in out.out + out.err for p in PHI)
    ds = dataset()
    ds.Modality = "MR"
    f.write_bytes(to_bytes(ds))
    assert main(["data", "inspect", "--reject-non-ct", str(f)]) == 2
    out = capsys.readouterr()
    assert "modality" in out.err and not any(p in out.out + out.err for p in PHI)


@pytest.mark.parametrize("name", ["CT_small.dcm", "693_UNCI.dcm", "MR_small.dcm", "eCT_Supplemental.dcm"])
def test_native_fast_path_equals_pydicom_decoder(name: str) -> None:
    from ctdata.dicom_utils import _native_fast

    ds = dataset(name)
    fast = _native_fast(ds, ds.file_meta.TransferSyntaxUID)
    assert fast is not None
    np.testing.assert_array_equal(fast.reshape(ds.pixel_array.shape), ds.pixel_array)


def test_signed_12_bit_stored_in_16_is_sign_extended() -> None:
    ds = dataset()
    hu12 = np.clip(ds.pixel_array.astype(np.int16) - 1024, -2048, 2047)  # fits 12-bit signed
    raw = (hu12.astype(np.uint16) & 0x0FFF) | 0xA000  # garbage in the 4 unused high bits
    ds.BitsStored, ds.HighBit, ds.RescaleIntercept = 12, 11, 0
    ds.PixelData = raw.astype(np.uint16).tobytes()
    ds = pydicom.dcmread(io.BytesIO(to_bytes(ds)))
    np.testing.assert_array_equal(ds.pixel_array, hu12)  # pydicom's own reading of the file
    np.testing.assert_array_equal(hu(to_bytes(ds))[0], hu12)
