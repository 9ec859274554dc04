"""DICOM reading: bytes or path -> HU array [frames,H,W], with one typed error and no PHI in any message.

Handles RescaleSlope/Intercept (per frame for enhanced multi-frame CT; defaults recorded as warnings),
signed/unsigned pixels, PixelPaddingValue, MONOCHROME1, classic and enhanced multi-frame, compressed
transfer syntaxes through pydicom's permissive decoders (pylibjpeg-openjpeg/-rle, pyjpegls, python-gdcm,
Pillow, and imagecodecs for the JPEG family incl. 12-bit JPEG Extended: `ctdata.codestream`),
RGB / palette secondary captures (converted to grey, flagged not HU). Every failure is a `DicomError`
(an `InputError`) whose `reason` names the case; messages describe the file, never the patient.

MONOCHROME1: for CT the rescaled values are HU whatever the photometric interpretation (the inversion is
a display step applied after the modality LUT), so HU are kept and a warning is recorded; images that are
not HU are inverted so that they look like MONOCHROME2.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ctdata.codestream import IMAGECODECS_SYNTAXES, PLUGIN_LABEL, codestream_size, register_jpeg_plugin
from ctdata.dicom_utils import _meta, _native_fast, _padding_mask
from cthub.errors import CTHubError, InputError

DEFAULT_MAX_PIXELS = 4096 * 4096 * 4
DEFAULT_MAX_BYTES = 1 << 30
_PREFERRED_PLUGIN = dict.fromkeys(IMAGECODECS_SYNTAXES, PLUGIN_LABEL)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class DicomError(InputError):
    """A DICOM file that cannot be used. `reason`: not_dicom, corrupt, truncated, no_pixel_data, non_image,
    too_large, unsupported_transfer_syntax, decode_failed, bad_header, non_finite, modality."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "reason": self.reason}


@dataclass(frozen=True)
class DicomPolicy:
    """What to accept. modality: 'reject' | 'warn' | 'allow' for modalities outside `allowed_modalities`."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    modality: str = "warn"
    allowed_modalities: tuple[str, ...] = ("CT",)
    default_intercept: float | None = None  # None: -1024 for unsigned pixels (the paper's code), 0 for signed


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


def read_dicom(
    source: bytes | str | Path, *, max_pixels: int | None = None, policy: DicomPolicy | None = None
) -> CTImage:
    """Read one DICOM object into HU (or grey for non-HU images). Raises only `DicomError`."""
    pol = policy or DicomPolicy()
    if max_pixels is not None:
        pol = replace(pol, max_pixels=max_pixels)
    if isinstance(source, (str, Path)):
        p = Path(source)
        if not p.is_file():
            raise DicomError("not_found", f"no such file: {p.name}")
        if p.stat().st_size > pol.max_bytes:
            raise DicomError(
                "too_large", f"file of {p.stat().st_size:,} bytes exceeds the {pol.max_bytes:,} limit"
            )
        data = p.read_bytes()
    else:
        data = bytes(source)
    if len(data) > pol.max_bytes:
        raise DicomError("too_large", f"file of {len(data):,} bytes exceeds the {pol.max_bytes:,} limit")
    return dataset_to_image(parse_dicom(data), pol)


def parse_dicom(data: bytes) -> Any:
    """Bytes -> pydicom Dataset (pixels not decoded yet)."""
    import pydicom

    if not is_dicom(data):
        raise DicomError(
            "not_dicom",
            "not a DICOM file: the 'DICM' marker at byte 128 is missing "
            "(send a DICOM Part 10 file, e.g. as exported by the PACS)",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - pydicom raises many types on corrupt input
        raise DicomError(
            "corrupt",
            f"the DICOM file is truncated or corrupt: its header cannot be read ({type(e).__name__})",
        ) from None


def dataset_to_image(ds: Any, policy: DicomPolicy | None = None) -> CTImage:
    """A parsed Dataset -> CTImage. Anything unexpected in the header becomes a DicomError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _convert(ds, policy or DicomPolicy())
    except CTHubError:
        raise
    except MemoryError:
        raise DicomError("too_large", "not enough memory to decode this image") from None
    except Exception as e:  # noqa: BLE001 - any other failure on a header value is the file's fault
        raise DicomError(
            "bad_header", f"the DICOM header holds invalid values ({type(e).__name__})"
        ) from None


def _convert(ds: Any, pol: DicomPolicy) -> CTImage:
    """Check what the object is, decode its pixels, then map them to HU (CT) or to grey (anything else)."""
    warns: list[str] = []
    fm = getattr(ds, "file_meta", None)
    _check_is_image(ds, fm)
    modality = _check_modality(ds, pol, warns)
    rows, cols, frames, spp, bits = _geometry(ds, pol)
    ts = _transfer_syntax(fm)
    _check_pixel_data(ds, ts, rows, cols, frames, spp, bits, pol)
    try:
        arr = _decode(ds, ts)
    except Exception as e:  # noqa: BLE001 - decoders raise many types
        raise DicomError(
            "decode_failed",
            f"the {ts.name} pixel data could not be decoded; the file may be "
            f"truncated or corrupt ({type(e).__name__})",
        ) from None
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").upper().strip()
    arr = arr.reshape((frames, rows, cols, 3) if spp == 3 else (frames, rows, cols))
    meta = _meta(ds, modality, rows, cols, frames, ts, pi)
    if spp == 3 or pi == "PALETTE COLOR":
        return _colour(ds, arr, pi, warns, meta)
    values = arr.astype(np.float32)  # a fresh, writable copy: the steps below work in place
    if arr.dtype.kind == "f" and not np.isfinite(values).all():
        raise DicomError("non_finite", "the pixel data contains NaN or infinite values")
    pad = _padding_mask(ds, arr)
    if modality != "CT" and not (modality == "" and _has_rescale(ds)):
        return _grey(ds, values, pad, pi, warns, meta)
    hu = _to_hu(ds, values, float_input=arr.dtype.kind == "f", bits=bits, pol=pol, warns=warns)
    if pad is not None and pad.any():
        _fill_padding(hu, pad)
        meta["padding_fraction"] = round(np.count_nonzero(pad) / pad.size, 4)
    if pi == "MONOCHROME1":
        warns.append("MONOCHROME1: HU kept as rescaled (the inversion is a display step)")
    return CTImage(pixels=hu, is_hu=True, warnings=warns, meta=meta)


def _check_is_image(ds: Any, fm: Any) -> None:
    """An image object with pixel data: not a report, presentation state or truncated file."""
    from pydicom.uid import UID

    sop = UID(str(ds.get("SOPClassUID", "") or (fm.get("MediaStorageSOPClassUID", "") if fm else "") or ""))
    if sop and sop.name != sop and "Image Storage" not in sop.name:
        raise DicomError(
            "non_image", f"this DICOM object is a '{sop.name}', not an image; send the image series"
        )
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        if "Image Storage" in sop.name or "Rows" in ds or len(ds) == 0:
            raise DicomError(
                "truncated",
                "the image file ends before its pixel data: it is truncated "
                "(an incomplete transfer or export); send it again",
            )
        raise DicomError(
            "no_pixel_data", "the DICOM file has no pixel data (a report or document, not an image)"
        )


def _check_modality(ds: Any, pol: DicomPolicy, warns: list[str]) -> str:
    """The upper-case Modality; one outside the policy's list is refused or recorded as a warning."""
    modality = str(ds.get("Modality", "") or "").upper()
    if modality not in pol.allowed_modalities:
        msg = f"modality {modality or '(missing)'} is not {'/'.join(pol.allowed_modalities)}"
        if pol.modality == "reject":
            raise DicomError("modality", msg + "; only CT images are accepted")
        if pol.modality == "warn":
            warns.append(msg)
    return modality


def _geometry(ds: Any, pol: DicomPolicy) -> tuple[int, int, int, int, int]:
    """(rows, columns, frames, samples per pixel, bits allocated), validated and within the pixel budget."""
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    spp, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("BitsAllocated", 0) or 0)
    if rows <= 0 or cols <= 0 or frames <= 0 or spp not in (1, 3) or bits not in (1, 8, 16, 32, 64):
        raise DicomError(
            "bad_header",
            "Rows, Columns, NumberOfFrames, SamplesPerPixel or BitsAllocated is missing or invalid",
        )
    n = rows * cols * frames * spp
    if n > pol.max_pixels:
        raise DicomError(
            "too_large",
            f"the header declares {frames} x {rows} x {cols} pixels ({n:,}), above "
            f"the limit of {pol.max_pixels:,}; refusing to decode",
        )
    return rows, cols, frames, spp, bits


def _transfer_syntax(fm: Any) -> Any:
    """The file meta's transfer syntax UID, which must be one pydicom knows."""
    from pydicom.uid import UID

    ts = UID(str(fm.get("TransferSyntaxUID", "") or "")) if fm is not None else UID("")
    if not ts:
        raise DicomError("bad_header", "the file meta information has no transfer syntax")
    if not ts.is_transfer_syntax:
        raise DicomError(
            "unsupported_transfer_syntax",
            f"the transfer syntax {ts} is unknown; no decoder "
            "can read it (export uncompressed or as JPEG 2000)",
        )
    return ts


def _has_rescale(ds: Any) -> bool:
    """Whether the header carries a rescale (top level or shared functional groups)."""
    shared = _pvt(_fg_item(ds, "SharedFunctionalGroupsSequence", 0))
    return "RescaleSlope" in ds or "RescaleIntercept" in ds or shared is not None


def _to_hu(
    ds: Any, values: np.ndarray, *, float_input: bool, bits: int, pol: DicomPolicy, warns: list[str]
) -> np.ndarray:
    """Stored values [frames,H,W] float32 -> HU in place, by the per-frame RescaleSlope/Intercept."""
    slope, intercept = _rescale(ds, len(values), warns, pol)
    if (slope != 1).any():
        values *= slope[:, None, None]
    if (intercept != 0).any():
        values += intercept[:, None, None]
    # integers times a finite slope stay finite unless the bound overflows float32: check only then
    bound = 2.0 ** min(bits, 64) * float(np.abs(slope).max()) + float(np.abs(intercept).max())
    if (float_input or bound > 1e37) and not np.isfinite(values).all():
        raise DicomError(
            "non_finite", "pixel values are not finite after applying RescaleSlope/RescaleIntercept"
        )
    return values


def _fill_padding(hu: np.ndarray, pad: np.ndarray) -> None:
    """Padding pixels take their frame's lowest real value (-1024 HU when a frame is all padding)."""
    for f in range(len(hu)):
        if pad[f].any():
            m = np.min(hu[f], where=~pad[f], initial=np.inf)
            hu[f][pad[f]] = m if np.isfinite(m) else -1024.0


def _decode(ds: Any, ts: Any) -> np.ndarray:
    """Decode all frames. JPEG 2000 prefers pylibjpeg-openjpeg (measured 1-5x faster than gdcm/Pillow), the
    JPEG syntaxes imagecodecs (the only permissive decoder of 12-bit JPEG Extended); when the preferred
    plugin fails, pydicom tries every installed one."""
    from pydicom.pixels import pixel_array

    fast = _native_fast(ds, ts)
    if fast is not None:
        return fast
    preferred = _PREFERRED_PLUGIN.get(str(ts)) or ("pylibjpeg" if ts.name.startswith("JPEG 2000") else None)
    if preferred and "PixelData" in ds:
        try:
            return np.asarray(pixel_array(ds, decoding_plugin=preferred))
        except Exception:  # noqa: BLE001, S110 - plugin missing or failed: pydicom tries every plugin
            pass
    return np.asarray(ds.pixel_array)


def _check_pixel_data(
    ds: Any, ts: Any, rows: int, cols: int, frames: int, spp: int, bits: int, pol: DicomPolicy
) -> None:
    """Before decoding: a decoder exists, native data is long enough, codestreams fit the header's size."""
    if "PixelData" not in ds:
        return
    if not ts.is_compressed:
        expected = (rows * cols * frames * spp * bits + 7) // 8
        if len(ds.PixelData) < expected:
            raise DicomError(
                "truncated",
                f"the pixel data is truncated: {len(ds.PixelData):,} of {expected:,} bytes present",
            )
        return
    from pydicom.pixels import get_decoder

    register_jpeg_plugin()
    try:
        available = get_decoder(ts).is_available
    except (NotImplementedError, ValueError, KeyError):
        available = False
    if not available:
        kind = "a retired transfer syntax" if ts.is_retired else "a transfer syntax"
        raise DicomError(
            "unsupported_transfer_syntax",
            f"the pixel data is compressed as {kind} no installed decoder reads: '{ts.name or ts}' "
            f"({ts}); export it uncompressed, JPEG-LS or JPEG 2000",
        )
    size = codestream_size(bytes(ds.PixelData[:65536]))
    if size is not None and size[0] * size[1] > rows * cols:
        raise DicomError(
            "too_large",
            f"the compressed image is {size[0]} x {size[1]} pixels, larger than "
            f"the {rows} x {cols} its header declares; refusing to decode",
        )


def _rescale(ds: Any, frames: int, warns: list[str], pol: DicomPolicy) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame (slope, intercept): per-frame groups, shared groups, the top level, then defaults."""
    slopes, inters = np.ones(frames, np.float32), np.zeros(frames, np.float32)
    shared = _fg_item(ds, "SharedFunctionalGroupsSequence", 0)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    missing = set()
    for f in range(frames):
        item = None
        if per_frame is not None and f < len(per_frame):
            item = _pvt(per_frame[f])
        item = item or _pvt(shared) or ds
        s, i = item.get("RescaleSlope"), item.get("RescaleIntercept")
        if s is None or str(s).strip() == "":
            missing.add("RescaleSlope")
            s = 1.0
        if i is None or str(i).strip() == "":
            missing.add("RescaleIntercept")
            i = pol.default_intercept
            if i is None:
                i = -1024.0 if int(ds.get("PixelRepresentation", 0) or 0) == 0 else 0.0
        slopes[f], inters[f] = float(s), float(i)
    if not (np.isfinite(slopes).all() and np.isfinite(inters).all()):
        raise DicomError("non_finite", "RescaleSlope or RescaleIntercept is not a finite number")
    for m in sorted(missing):
        warns.append(f"{m} missing: assumed {'1' if m == 'RescaleSlope' else f'{inters[0]:g}'}")
    return slopes, inters


def _fg_item(ds: Any, keyword: str, index: int) -> Any:
    seq = ds.get(keyword)
    return seq[index] if seq is not None and len(seq) > index else None


def _pvt(item: Any) -> Any:
    if item is None:
        return None
    seq = item.get("PixelValueTransformationSequence")
    return seq[0] if seq is not None and len(seq) else None


def _grey(ds: Any, arr: np.ndarray, pad: np.ndarray | None, pi: str, warns: list[str], meta: dict) -> CTImage:
    """Non-HU monochrome (MR, X-ray, secondary capture): MONOCHROME1 inverted, then stretched to 0..255."""
    if pi == "MONOCHROME1":
        bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        arr = (lo + hi) - arr
        warns.append("MONOCHROME1 image inverted")
    valid = arr[~pad] if pad is not None and pad.any() else arr
    lo, hi = (float(valid.min()), float(valid.max())) if valid.size else (0.0, 1.0)
    grey = np.clip((arr - lo) / (hi - lo if hi > lo else 1.0), 0, 1) * 255.0
    if pad is not None:
        grey[pad] = 0.0
    warns.append("not a CT image in HU: grey values stretched to 0..255")
    meta["value_range"] = [lo, hi]
    return CTImage(pixels=grey.astype(np.float32), is_hu=False, warnings=warns, meta=meta)


def _colour(ds: Any, arr: np.ndarray, pi: str, warns: list[str], meta: dict) -> CTImage:
    if pi == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr = apply_color_lut(arr, ds)
    rgb = arr.astype(np.float32)
    if rgb.max(initial=0) > 255:
        rgb = rgb * (255.0 / float(rgb.max()))
    grey = rgb @ _LUMA
    warns.append(f"colour image ({pi}) converted to grey; values are not HU")
    meta["value_range"] = [float(grey.min()), float(grey.max())]
    return CTImage(pixels=grey.astype(np.float32), is_hu=False, warnings=warns, meta=meta)
