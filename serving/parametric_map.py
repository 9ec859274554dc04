"""Class activation maps as a DICOM Parametric Map (highdicom), which a DICOM viewer overlays on the CT.

`write_parametric_maps(sources, maps, label, model)` takes the header-only datasets of the analysed slices
(one series, single-frame images) and, for each, the decided class's activation map from the ONNX model's
`cam` output (any resolution: the model saw the whole slice resized, so the map is resized back to the
slice's Rows x Columns, bilinear). It returns the instances of one Parametric Map series: one multi-frame
instance per frame of reference and orientation (one for most series; a series whose slices each carry
their own Frame of Reference UID, or whose gantry tilt varies, gets one per group):

- one float frame per source slice, its plane position and orientation those of the slice (highdicom derives
  them from the sources), the sources in the Source Image Sequence and the shared Frame of Reference, so a
  viewer that supports parametric maps can fuse it with the CT;
- the values are the map's, not rescaled: a Real World Value Mapping (unitless, identity) says so, and the
  default window spans 0 to the largest value (negative evidence stays in the data, below the window);
- Modality that of the sources (CT), Content Qualification RESEARCH, a series description that says "not
  for diagnostic use", the model as manufacturer model name, software versions and serial number, patient
  and study copied from the sources (absent Type 2 attributes written empty, broken coded entries left out,
  as in `serving.report`).

Kept free of HTTP so the PACS loop (`pacs.analysis`) calls it directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cthub.errors import UnprocessableInputError
from serving.report import (
    LO_MAX,
    MANUFACTURER,
    ModelIdentity,
    check_type1,
    complete_deidentification,
    copyable_header,
)

MAP_DESCRIPTION = "AI class activation map (parametric) - NOT FOR DIAGNOSTIC USE"
MAP_SERIES_NUMBER = 9003
# Image Plane attributes every source must hold for the map to sit on it (Type 1 of the Image Plane module)
GEOMETRY_TYPE1 = ("FrameOfReferenceUID", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")


def resize_map(cam: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """A 2-D map -> float32 [rows, columns], bilinear (as `ctdata.heatmap.overlay` draws it)."""
    import torch
    import torch.nn.functional as F

    m = torch.as_tensor(np.asarray(cam, dtype=np.float32))
    if m.ndim != 2:
        raise UnprocessableInputError(f"a class activation map must be 2-D, got shape {tuple(m.shape)}")
    if tuple(m.shape) != (rows, columns):
        m = F.interpolate(m[None, None], size=(rows, columns), mode="bilinear", align_corners=False)[0, 0]
    return m.numpy().astype(np.float32, copy=False)


def _plane_key(ds: Any) -> tuple[str, tuple[float, ...]]:
    """Slices that one multi-frame map can cover: one frame of reference, one orientation (gantry tilt that
    varies along a series gives several)."""
    return str(ds.FrameOfReferenceUID), tuple(round(float(v), 4) for v in ds.ImageOrientationPatient)


def write_parametric_maps(
    sources: Sequence[Any],
    maps: Sequence[np.ndarray],
    label: str,
    model: ModelIdentity,
    *,
    series_number: int = MAP_SERIES_NUMBER,
) -> list[Any]:
    """Parametric Maps (pydicom Datasets, one series) of `maps` (one per source, the class `label`'s
    activation) over the single-frame slices `sources` of one series: one multi-frame instance per frame of
    reference and orientation (most series: one). UnprocessableInputError when the sources cannot carry
    them, naming the missing attribute."""
    from pydicom.uid import generate_uid

    if not sources or len(sources) != len(maps):
        raise UnprocessableInputError("a parametric map needs one map for each of at least one source image")
    check_type1(sources)
    check_type1(sources, GEOMETRY_TYPE1)
    if len({str(ds.SeriesInstanceUID) for ds in sources}) != 1:
        raise UnprocessableInputError("the maps of one parametric map must lie on slices of one series")
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in sources):
        raise UnprocessableInputError("parametric maps are written for single-frame slices only")
    groups: dict[tuple[str, tuple[float, ...]], list[int]] = {}
    for i, ds in enumerate(sources):
        groups.setdefault(_plane_key(ds), []).append(i)
    series_uid = generate_uid()
    return [
        _parametric_map(
            [sources[i] for i in members],
            [maps[i] for i in members],
            label,
            model,
            series_uid,
            (series_number, n),
        )
        for n, members in enumerate(groups.values(), start=1)
    ]


def _window(high: float) -> Any:
    """The default display: 0 (no evidence) to the largest value. LINEAR_EXACT, because activation maps
    span far less than one unit and the LINEAR function does not allow a window narrower than 1."""
    import highdicom as hd

    width = high if high > 0 else 1.0
    return hd.VOILUTTransformation(
        window_center=width / 2,
        window_width=width,
        window_explanation="0 to the largest activation",
        voi_lut_function=hd.VOILUTFunctionValues.LINEAR_EXACT,
    )


def _parametric_map(
    sources: list[Any],
    maps: list[np.ndarray],
    label: str,
    model: ModelIdentity,
    series_uid: str,
    numbers: tuple[int, int],
) -> Any:
    """One multi-frame Parametric Map over slices that share a frame of reference and orientation."""
    import highdicom as hd
    from highdicom.pm import ParametricMap, RealWorldValueMapping
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    from serving.report import quiet_header_warnings

    (series_number, instance_number), rows, columns = numbers, int(sources[0].Rows), int(sources[0].Columns)
    if any((int(ds.Rows), int(ds.Columns)) != (rows, columns) for ds in sources):
        raise UnprocessableInputError("the slices of the series differ in Rows or Columns")
    pixels = np.stack([resize_map(m, rows, columns) for m in maps])
    if not np.isfinite(pixels).all():
        raise UnprocessableInputError("a class activation map holds NaN or infinite values")
    low, high = float(pixels.min()), float(pixels.max())
    mapping = RealWorldValueMapping(
        lut_label="CAM",
        lut_explanation=f"class activation: {label}"[:LO_MAX],
        unit=codes.UCUM.NoUnits,
        value_range=(low, high if high > low else low + 1.0),
        slope=1.0,
        intercept=0.0,
    )
    versions = [v for v in (model.software_version, model.version[:LO_MAX], model.sha256[:LO_MAX]) if v]
    try:
        with quiet_header_warnings():
            pm = ParametricMap(
                source_images=[copyable_header(ds) for ds in sources],
                pixel_array=pixels,
                series_instance_uid=series_uid,
                series_number=series_number,
                sop_instance_uid=generate_uid(),
                instance_number=instance_number,
                manufacturer=MANUFACTURER,
                manufacturer_model_name=model.name[:LO_MAX],
                software_versions=versions,  # type: ignore[arg-type]  # typed tuple[str]; pydicom warns on tuples
                device_serial_number=model.sha256[:16],
                contains_recognizable_visual_features=False,
                real_world_value_mappings=[mapping],
                voi_lut_transformations=[_window(high)],
                content_label="CAM",
                content_description=f"class activation map of {label}"[:LO_MAX],
            )
    except AttributeError as e:  # a required attribute is absent: its keyword is no patient data
        raise UnprocessableInputError(
            f"the source images lack {e.name or 'an attribute'} that the parametric map must copy"
        ) from None
    except (ValueError, TypeError, KeyError) as e:
        # highdicom's messages may quote header values (patient data): only the type is reported
        raise UnprocessableInputError(
            f"the source images' headers do not allow a valid parametric map ({type(e).__name__})"
        ) from None
    pm.SeriesDescription = MAP_DESCRIPTION
    # highdicom writes OT; the Parametric Map Series module takes the defined terms of Modality, and maps
    # derived from CT keep CT (as quantitative MR maps keep MR), so viewers file them with the images
    pm.Modality = str(sources[0].get("Modality", "") or "OT")
    # General Series Laterality (Type 2C): the slices' when they have one, else empty: unknown here
    pm.Laterality = str(sources[0].get("Laterality", "") or "")
    complete_deidentification(pm)
    assert isinstance(pm, hd.SOPClass)
    return pm
