"""The `cthub.*` metadata of an exported ONNX classifier (config, checksums, labels, the out-of-distribution
reference): reading it without ONNX Runtime. Below both `export.classifier` and `export.session`."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cthub.errors import CTHubError
from export.integrity import ONNX_NAME, check_fresh, verify_onnx_file
from export.ood import OodReference
from hub.config import ModelConfig

log = logging.getLogger(__name__)

META_PREFIX = "cthub."


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


def ood_reference_of(model_dir: Path, source_sha256: str, config: ModelConfig) -> OodReference | None:
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
    return OodReference.from_metadata(ood) if isinstance(ood, dict) else None
