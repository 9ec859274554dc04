"""Optional (`cthub pacs --cam`): the class activation maps behind a series decision, as a Secondary Capture
series stored next to the SR, labeled "NOT FOR DIAGNOSTIC USE" in its description and burned into every
image (BurnedInAnnotation YES).

One image for each of the k slices that decided the series (the k highest probabilities of the decided class,
k as in the series rule): the slice as the model saw it before resizing (the model's own intensity mapping,
grey 0-1, at the slice's resolution; slices narrower than 256 px enlarged by an integer factor) with the
decided class's map from the ONNX model's `cam` output blended in (jet, as the demo draws it). Each image
copies its CT slice's patient and study attributes (highdicom), references it in the Source Image Sequence
and carries its orientation letters; Modality OT, Manufacturer ct-ssl-hub (so the loop never analyses its
own overlays), series number 9002.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ctdata.heatmap import heat, overlay
from serving.report import MANUFACTURER

OVERLAY_DESCRIPTION = "AI class activation map - NOT FOR DIAGNOSTIC USE"
OVERLAY_SERIES_NUMBER = 9002
WARNING_TEXT = "NOT FOR DIAGNOSTIC USE"
MIN_WIDTH = 256  # narrower slices are enlarged (integer factor) so the warning stays legible
_AXES = (("L", "R"), ("P", "A"), ("H", "F"))  # patient +x, +y, +z and their opposites (LPS)


def orientation_letters(iop: Sequence[float]) -> tuple[str, str] | None:
    """Patient Orientation (row, column directions) from Image Orientation (Patient), dominant axis of each
    direction cosine; None when the attribute is missing or malformed."""
    try:
        values = [float(v) for v in iop]
    except (TypeError, ValueError):
        return None
    if len(values) != 6:
        return None
    letters = []
    for cosines in (values[:3], values[3:]):
        axis = int(np.argmax(np.abs(cosines)))
        if cosines[axis] == 0:
            return None
        letters.append(_AXES[axis][0] if cosines[axis] > 0 else _AXES[axis][1])
    return letters[0], letters[1]


def burn_in(rgb: np.ndarray, lines: list[str]) -> np.ndarray:
    """`lines` in white on a black band at the top of the image (Pillow's built-in font, as large as fits
    the width, from 1/32 of it down to 6 px)."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.fromarray(rgb)
    draw = ImageDraw.Draw(img)
    draw.fontmode = "1"  # no anti-aliasing: crisp white pixels even at 6 px
    width = rgb.shape[1]
    font: Any = ImageFont.load_default()
    size = 11  # the fixed bitmap font of Pillow < 10.1
    for size in range(max(6, width // 32), 5, -1):
        try:
            font = ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1: one size only
            break
        if max(draw.textlength(t, font=font) for t in lines) <= width - 6:
            break
    step = int(1.25 * size) + 1
    draw.rectangle((0, 0, width, step * len(lines) + 4), fill=(0, 0, 0))
    for i, text in enumerate(lines):
        draw.text((3, 2 + step * i), text, fill=(255, 255, 255), font=font)
    return np.asarray(img)


def upscale(unit: np.ndarray, min_width: int = MIN_WIDTH) -> np.ndarray:
    """The slice enlarged by the smallest integer factor that makes it `min_width` wide (bilinear), so the
    burned-in warning stays legible on small images; unchanged when it is wide enough."""
    from PIL import Image

    factor = -(-min_width // unit.shape[1])
    if factor <= 1:
        return unit
    size = (unit.shape[1] * factor, unit.shape[0] * factor)
    return np.asarray(Image.fromarray(unit, mode="F").resize(size, Image.Resampling.BILINEAR))


def overlay_image(unit: np.ndarray, cam: np.ndarray, label: str, model_name: str) -> np.ndarray:
    """RGB uint8 [H, W, 3]: the slice in [0, 1] with the class's map (ReLU'd, scaled to its maximum,
    upsampled) blended in, and the warning burned in."""
    rgb = overlay(upscale(np.asarray(unit, dtype=np.float32)), heat(cam))
    return burn_in(rgb, [WARNING_TEXT, f"class activation map: {label}"[:48], model_name[:48]])


def overlay_series(
    headers: Sequence[Any], images: Sequence[tuple[int, np.ndarray]], label: str, model_name: str
) -> list[Any]:
    """Secondary Capture datasets, one per (index of its source header, RGB image); [] when a source has no
    usable Image Orientation (Patient) (orientation letters cannot be given)."""
    import highdicom as hd
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    series_uid = generate_uid()
    out = []
    for n, (source, rgb) in enumerate(images, start=1):
        ref = headers[source]
        letters = orientation_letters(ref.get("ImageOrientationPatient", []))
        if letters is None:
            return []
        sc = hd.sc.SCImage.from_ref_dataset(
            ref,
            rgb,
            "RGB",
            8,
            "PATIENT",
            series_uid,
            OVERLAY_SERIES_NUMBER,
            generate_uid(),
            n,
            MANUFACTURER,
            patient_orientation=letters,
            transfer_syntax_uid="1.2.840.10008.1.2.1",
        )
        # General Series Laterality (type 2C): the slice's when it has one, else empty: unknown here
        sc.Laterality = str(ref.get("Laterality", "") or "")
        sc.SeriesDescription = OVERLAY_DESCRIPTION
        sc.BurnedInAnnotation = "YES"
        sc.ImageComments = f"{WARNING_TEXT}: class activation map of {label!r} by {model_name}"[:10240]
        sc.DerivationDescription = "class activation map blended over the source slice; not for diagnosis"
        item = Dataset()
        item.ReferencedSOPClassUID = ref.SOPClassUID
        item.ReferencedSOPInstanceUID = ref.SOPInstanceUID
        sc.SourceImageSequence = [item]
        out.append(sc)
    return out
