"""The `cthub.*` metadata of an exported ONNX classifier (config, checksums, labels, the out-of-distribution
reference, the calibration): reading it without ONNX Runtime. Below both `export.classifier` and
`export.session`.

`cthub.calibration` holds the temperature T that serving divides the logits by (probabilities =
softmax(logits / T)), with what it was fitted on, its version and the binary operating point: it is part of
the file, so the file's sha256 covers it. A file without it is served with T = 1 and says "uncalibrated"."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cthub.errors import CTHubError
from export.integrity import ONNX_NAME, check_fresh, verify_onnx_file
from export.ood import AnyOodReference, reference_from_metadata
from hub.config import ModelConfig

log = logging.getLogger(__name__)

META_PREFIX = "cthub."
CALIBRATION_KEY = "calibration"
UNCALIBRATED: dict[str, Any] = {
    "method": "none",
    "status": "uncalibrated",
    "temperature": 1.0,
    "version": None,
    "id": None,
}
# what of a config's `metrics["calibration"]` record travels in the file and in every answer
SERVED_KEYS = (
    "method",
    "status",
    "temperature",
    "version",
    "id",
    "fitted_on",
    "evaluated_on",
    "operating_point",
    "site",
    "bins",
)


def served_calibration(record: Any) -> dict[str, Any]:
    """The calibration that travels in the ONNX metadata and every answer, from a config's
    `metrics["calibration"]` record: method, status, temperature, version and id, fitted on what / when / n,
    the operating point, the site, ECE (and, after a site recalibration, its cross-validated estimate) and the
    reliability bins after calibration (for the demo's plain-language line); `UNCALIBRATED` (T = 1) without a
    valid temperature."""
    if not isinstance(record, dict):
        return dict(UNCALIBRATED)
    t = record.get("temperature")
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not t > 0:
        return dict(UNCALIBRATED)
    out = {k: record[k] for k in SERVED_KEYS if k in record}
    out["temperature"] = float(t)
    out.setdefault("status", "calibrated")
    rel = record.get("reliability")
    if isinstance(rel, dict):  # a config's record: before / after
        out["ece"], out["reliability"] = record.get("ece_after"), rel.get("after")
        cv = record.get("ece_after_cross_validated")
    else:  # already the served form (an ONNX file's metadata)
        out["ece"], out["reliability"] = record.get("ece"), rel
        cv = record.get("ece_cross_validated")
    if isinstance(cv, (int, float)) and not isinstance(cv, bool):
        # a site recalibration's `ece` is measured on the set T was fitted on; this is its held-out estimate
        out["ece_cross_validated"] = float(cv)
    return out


def calibration_of(metadata: dict[str, Any]) -> dict[str, Any]:
    """The calibration an exported file carries (`cthub.calibration`), else `UNCALIBRATED` (T = 1)."""
    return served_calibration(metadata.get(CALIBRATION_KEY))


def decode_metadata(props: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """The `cthub.*` entries of ONNX metadata properties, the prefix removed, JSON values decoded."""
    out: dict[str, Any] = {}
    for key, value in props:
        if key.startswith(META_PREFIX):
            try:
                out[key[len(META_PREFIX) :]] = json.loads(value)
            except json.JSONDecodeError:
                out[key[len(META_PREFIX) :]] = value
    return out


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The `cthub.*` metadata of an exported model, JSON values decoded (config, labels, sha256...)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return decode_metadata((p.key, p.value) for p in model.metadata_props)


def ood_reference_of(model_dir: Path, source_sha256: str, config: ModelConfig) -> AnyOodReference | None:
    """The out-of-distribution reference of the folder's model.onnx when that file is verified and was
    exported from these weights and preprocessing; None (logged) otherwise."""
    path = model_dir / ONNX_NAME
    if not path.is_file():
        return None
    try:
        verify_onnx_file(path)
        meta = read_metadata(path)
        check_fresh(meta, path, config=config, source_sha256=source_sha256)
    except CTHubError as e:
        log.warning("no out-of-distribution reference: %s", e)
        return None
    ood = meta.get("ood")
    return reference_from_metadata(ood) if isinstance(ood, dict) else None
