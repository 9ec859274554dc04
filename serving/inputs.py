"""What the API accepts, and the HTTP status of everything it refuses.

Uploads are read into memory (size checked before reading) and decoded only through `ctdata`; every
refusal is a `CTHubError` whose JSON body is `{error, type, detail}` (plus `reason` for DICOM errors) and
whose status comes from `http_status`:

    400  not DICOM / not a picture, truncated, corrupt header, undecodable pixel data
    413  upload, unzipped series, slice count or declared pixel count over the configured limits
    415  unsupported transfer syntax (no decoder), a DICOM file sent to the picture endpoint
    422  no pixel data, a non-image object (SR, presentation state), a modality the operator did not
         allow, colour or 1-bit images, non-finite pixel values

Messages come from `ctdata` and describe the file, never the patient; file names are never echoed.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ctdata.dicom import CTImage, DicomError, DicomPolicy, dataset_to_image, is_dicom, parse_dicom
from ctdata.io import load_image
from ctdata.preprocess import PreprocessConfig
from cthub.errors import (
    ConfigError,
    CTHubError,
    InputError,
    PayloadTooLargeError,
    UnprocessableInputError,
    UnsupportedMediaError,
)
from serving.settings import ServeSettings

# The status of each `DicomError.reason` (ctdata.dicom); reasons not listed keep the error's own (400).
STATUS_BY_REASON: dict[str, int] = {
    "too_large": 413,
    "unsupported_transfer_syntax": 415,
    "no_pixel_data": 422,
    "non_image": 422,
    "modality": 422,
    "non_finite": 422,
    "colour": 422,
    "bit_depth": 422,
}
COLOUR_PHOTOMETRIC = ("RGB", "YBR", "PALETTE")
PICTURE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff")


def http_status(err: CTHubError) -> int:
    """The HTTP status of a user error: by DICOM reason where one applies, else the error's own."""
    if isinstance(err, DicomError):
        return STATUS_BY_REASON.get(err.reason, err.http_status)
    return err.http_status


CODE_BY_STATUS = {413: "payload_too_large", 415: "unsupported_media_type", 422: "unprocessable_input"}


def error_body(err: CTHubError) -> dict[str, Any]:
    """`{error, type, detail}` (+ `reason` for DICOM errors): what a refused request answers. `error` is
    the code of the HTTP status class (e.g. unsupported_media_type for 415), `reason` the DICOM case."""
    body = err.to_dict()
    body["error"] = CODE_BY_STATUS.get(http_status(err), body["error"])
    return body


def policy(settings: ServeSettings) -> DicomPolicy:
    """The DICOM policy of the API: refuse modalities outside the operator's list, pixel budget applied."""
    return DicomPolicy(
        max_pixels=settings.max_pixels,
        max_bytes=max(settings.max_series_bytes, settings.max_upload_bytes),
        modality="reject",
        allowed_modalities=settings.allowed_modalities,
    )


def effective_preprocessing(
    base: PreprocessConfig, window: str | None = None, center: float | None = None, width: float | None = None
) -> PreprocessConfig:
    """The model's preprocessing, or the same with a window preset / explicit center+width the request
    chose instead (answers report it as a warning: the model was trained with its own mapping)."""
    if center is not None and width is not None:
        return base.replace(
            mapping="window", window=None, window_center=float(center), window_width=float(width)
        )
    if center is not None or width is not None:
        raise ConfigError("give both window_center and window_width, or neither")
    if window:
        return base.replace(mapping="window", window=window, window_center=None, window_width=None)
    return base


def read_upload(path: Path | str, limit: int) -> bytes:
    """The bytes of an uploaded file, its size checked first (413 over `limit`, 400 when empty)."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > limit:
            raise PayloadTooLargeError(
                f"upload of {size / 2**20:.1f} MB exceeds the limit of {limit / 2**20:.0f} MB"
            )
        data = p.read_bytes()
    except OSError:
        raise InputError("the upload could not be read") from None
    if not data:
        raise InputError("empty upload: expected a file")
    return data


@dataclass
class DicomSlice:
    """One decoded DICOM object: its header without pixel data (UIDs for the report) and its image."""

    header: Any
    image: CTImage


def load_dicom(data: bytes, settings: ServeSettings) -> DicomSlice:
    """DICOM bytes -> header + HU image, or a CTHubError; only grey-level images are accepted."""
    return decode_dataset(parse_dicom(data), settings)


def decode_dataset(ds: Any, settings: ServeSettings) -> DicomSlice:
    """A parsed Dataset -> DicomSlice; its pixel data is dropped from the header once decoded."""
    try:
        image = dataset_to_image(ds, policy(settings))
    except DicomError as e:
        if e.reason == "no_pixel_data" and "SOPClassUID" not in ds:
            # no SOP class and no pixels: not a document without pixels but a damaged or fake file
            raise DicomError(
                "corrupt", "the file carries the DICOM marker but neither a SOP Class UID nor pixel data"
            ) from None
        raise
    check_grey_level(image)
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            delattr(ds, keyword)
    return DicomSlice(ds, image)


def check_grey_level(image: CTImage) -> None:
    """422 for colour and 1-bit images: a CT classifier cannot analyse them (DicomError reasons
    `colour` and `bit_depth`)."""
    photometric = str(image.meta.get("photometric", ""))
    if photometric.startswith(COLOUR_PHOTOMETRIC):
        raise DicomError(
            "colour", f"a {photometric} colour image is not a grey-level CT slice; send the CT series"
        )
    if image.meta.get("bits_stored") == 1:
        raise DicomError("bit_depth", "a 1-bit image (a mask or bitmap) is not a grey-level CT slice")


def load_picture(data: bytes, settings: ServeSettings) -> CTImage:
    """A PNG/JPEG of a slice already windowed for display -> grey image (not HU)."""
    if is_dicom(data):
        raise UnsupportedMediaError("this endpoint takes PNG or JPEG pictures; send DICOM to /predict")
    if not data.startswith(PICTURE_MAGIC):
        raise InputError("not a PNG or JPEG picture")
    _check_picture_size(data, settings.max_pixels)
    image = load_image(data, policy=policy(settings))
    if image.pixels.size == 0 or not np.isfinite(image.pixels).all():
        raise UnprocessableInputError("the picture has no usable pixels")
    return image


def _check_picture_size(data: bytes, max_pixels: int) -> None:
    """413 before decoding when the picture's header declares more pixels than allowed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
    except Image.DecompressionBombError:
        raise PayloadTooLargeError("the picture declares more pixels than any limit allows") from None
    except Exception as e:  # noqa: BLE001 -- Pillow raises many types for corrupt headers
        raise InputError(f"the picture cannot be decoded ({type(e).__name__})") from None
    if w * h > max_pixels:
        raise PayloadTooLargeError(f"the picture is {w} x {h} pixels, above the limit of {max_pixels:,}")


# -- the region a crop-trained model classifies -------------------------------------------------------------

CROP_EXPECTATION = "organ-centred crop"
CROP_SOURCES = ("organamnist", "organcmnist", "organsmnist")  # MedMNIST's organ-centred crop datasets


def input_expectation(metrics: dict[str, Any], provenance: dict[str, Any]) -> str | None:
    """What the model expects to be shown: its card's `input_expectation` (`cthub quickstart` records it),
    else an organ-centred crop when it was trained on a MedMNIST organ set, else None (not recorded)."""
    said = metrics.get("input_expectation")
    if isinstance(said, str) and said:
        return said
    data = Path(str(provenance.get("data") or "")).name.lower()
    return CROP_EXPECTATION if data.startswith(CROP_SOURCES) else None


def parse_region(region: str | None) -> tuple[int, int, int, int] | None:
    """'x0,y0,x1,y1' (pixel columns and rows of the uploaded image, end exclusive) -> a box; None when
    empty; InputError when it is not four integers with x0 < x1 and y0 < y1."""
    if region is None or not str(region).strip():
        return None
    parts = [p.strip() for p in str(region).replace(" ", ",").split(",") if p.strip()]
    try:
        x0, y0, x1, y1 = (int(float(p)) for p in parts)
    except ValueError:
        raise InputError("region must be four integers x0,y0,x1,y1 (pixel columns and rows)") from None
    if x0 < 0 or y0 < 0 or x1 <= x0 or y1 <= y0:
        raise InputError("region x0,y0,x1,y1 needs 0 <= x0 < x1 and 0 <= y0 < y1")
    return x0, y0, x1, y1


def crop_region(frame: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The box of a 2-D frame; InputError when it reaches outside the image (no silent clipping)."""
    x0, y0, x1, y1 = box
    h, w = frame.shape[-2:]
    if x1 > w or y1 > h:
        raise InputError(f"region {x0},{y0},{x1},{y1} reaches outside the {w} x {h} image")
    if min(x1 - x0, y1 - y0) < 8:
        raise InputError("region must be at least 8 x 8 pixels")
    return frame[..., y0:y1, x0:x1]


def region_warning(expectation: str | None, box: tuple[int, int, int, int] | None) -> str | None:
    """The input-expectation warning: a whole slice sent to a model trained on organ-centred crops."""
    if expectation != CROP_EXPECTATION or box is not None:
        return None
    return (
        "input expectation: this model was trained on organ-centred crops (OrganAMNIST), and a whole slice "
        "was sent; its answer on a whole slice is not what it was measured on. Select the organ's region "
        "(region=x0,y0,x1,y1) to classify that box."
    )
