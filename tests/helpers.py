"""Helpers the serving, demo and PACS tests share: real DICOM test files, DICOM bytes edited from them,
PNG encoding/decoding and one upload posted as curl sends it. Imported by test modules as `helpers`."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from ctdata.preprocess import prepare
from hub import ModelConfig, ResNet50

# Distinctive stand-ins for patient data, planted into real DICOM files; none may come back, be shown or be
# logged. The needles: each value and the parts and date forms it could be echoed in.
PHI = {
    "PatientName": "Zyxwvutsky^Quorabelle",
    "PatientID": "PHI-ID-83417729",
    "PatientBirthDate": "19070214",
    "StudyDate": "19990531",
    "InstitutionName": "Xanthoria Memorial Clinic",
    "ReferringPhysicianName": "Oxbridgeworth^Ambrosine",
    "AccessionNumber": "ACC-55190277",
}
PHI_NEEDLES = (
    "Zyxwvutsky",
    "Quorabelle",
    "PHI-ID-83417729",
    "83417729",
    "19070214",
    "1907-02-14",
    "19990531",
    "1999-05-31",
    "Xanthoria",
    "Oxbridgeworth",
    "55190277",
)


def pydicom_file(name: str) -> Path | None:
    """A DICOM file of pydicom's test data (its wheel, then pydicom-data), None when not installed."""
    from pydicom.data import get_testdata_file

    p = get_testdata_file(name, download=False)
    return Path(p) if p else None


def need(name: str) -> Path:
    """`pydicom_file(name)`, or skip the test when it is not installed."""
    p = pydicom_file(name)
    if p is None:
        pytest.skip(f"needs {name} (pydicom-data)")
    return p


def to_bytes(ds: Any) -> bytes:
    """A pydicom Dataset as a DICOM Part 10 file."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def edited(src: Path, drop: tuple[str, ...] = (), **values: Any) -> bytes:
    """A real DICOM file with the `drop` attributes removed and `values` set (by keyword)."""
    import pydicom

    ds = pydicom.dcmread(src)
    for keyword in drop:
        if keyword in ds:
            delattr(ds, keyword)
    for k, v in values.items():
        setattr(ds, k, v)
    return to_bytes(ds)


def colour_ct(src: Path) -> bytes:
    """A real CT slice turned into an RGB image (its grey levels in three different channels)."""
    import pydicom

    pixels = pydicom.dcmread(src).pixel_array
    grey = (pixels.astype(np.float32) / max(float(pixels.max()), 1.0) * 255).astype(np.uint8)
    rgb = np.stack([grey, grey // 2, 255 - grey], axis=-1)
    return edited(
        src,
        drop=("RescaleSlope", "RescaleIntercept"),
        SamplesPerPixel=3,
        PhotometricInterpretation="RGB",
        PlanarConfiguration=0,
        BitsAllocated=8,
        BitsStored=8,
        HighBit=7,
        PixelRepresentation=0,
        PixelData=rgb.tobytes(),
    )


def zip_of(blobs: list[bytes], extra: dict[str, bytes] | None = None) -> bytes:
    """A zip of a series: `series/IM0000`... and any `extra` members by name."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for i, b in enumerate(blobs):
            z.writestr(f"series/IM{i:04d}", b)
        for name, b in (extra or {}).items():
            z.writestr(name, b)
    return buf.getvalue()


def calibrated(model: ResNet50, batch: torch.Tensor, flip: bool = True) -> ResNet50:
    """The model with BatchNorm statistics estimated on real images (`batch`, and its mirror image with
    `flip`). With the default statistics (mean 0, var 1) a random ResNet50's softmax saturates at ~1.0 for
    one class on every input, so every answer looks alike and a swapped answer would pass unnoticed; with
    real statistics the probabilities differ between slices by several hundredths."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the calibration batch
    model.train()
    with torch.no_grad():
        model(torch.cat([batch, batch.flip(-1)]) if flip else batch)
    return model.eval()


def calibrated_resnet(cfg: ModelConfig, sources: list[Path]) -> ResNet50:
    """A random-init ResNet50 (seed 0) for `cfg`, calibrated on real slices (`ctdata.prepare` of each)."""
    torch.manual_seed(0)
    x = torch.stack([prepare(p, cfg.preprocessing) for p in sources])
    return calibrated(ResNet50(num_classes=cfg.num_classes), x)


def png_bytes(image: np.ndarray) -> bytes:
    """An image array encoded as PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def png_pixels(source: str | Path | bytes) -> np.ndarray:
    """A PNG (a path or its bytes) decoded to RGB uint8 [H, W, 3]."""
    from PIL import Image

    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
        return np.asarray(im.convert("RGB"))


def post(
    base: str,
    data: Path | bytes,
    route: str = "/predict",
    name: str = "upload.dcm",
    headers: dict[str, str] | None = None,
    **fields: str,
) -> httpx.Response:
    """One upload as curl sends it (multipart field `file`, application/octet-stream part)."""
    body = data.read_bytes() if isinstance(data, Path) else data
    files = {"file": (name, body, "application/octet-stream")}
    return httpx.post(base + route, files=files, data=fields, headers=headers, timeout=120)
