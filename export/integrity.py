"""Integrity of exported ONNX files: a sha256 sidecar written at export, verified at every load.

`cthub export` writes `<file>.sha256` (the `sha256sum` format, like the weights' `model.safetensors.sha256`)
beside each ONNX file and, when the model folder lives in the hub dir, records the same checksum in the hub
manifest under `<model>/<file>`. Loading refuses, each with its own message:

- a file without a recorded checksum (not written by `cthub export`, or its sidecar was lost);
- a truncated file (its checksum differs and it is not a complete ONNX model);
- a tampered file (a complete ONNX model whose checksum differs from the one recorded at export);
- a stale file (`StaleModelError`): exported from other weights, or with other preprocessing, than the
  model folder now holds, or by a version of ct-ssl-hub whose graph has other outputs (`GRAPH_VERSION`).

Nothing is ever re-exported silently: the messages name the command that makes a fresh file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cthub.errors import ConfigError, IntegrityError, ModelNotFoundError, StaleModelError
from export.defaults import GRAPH_VERSION
from hub import manifest
from hub.config import ModelConfig
from hub.manifest import read_sidecar, sha256_file

log = logging.getLogger(__name__)

ONNX_NAME = "model.onnx"
INT8_NAME = "model.int8.onnx"
ONNX_FILES: dict[str, str] = {"fp32": ONNX_NAME, "int8": INT8_NAME}
# what each graph version changed, as the stale-file message says it
GRAPH_CHANGES = {
    2: "its class activation maps are Grad-CAM at stride 16",
    3: "a stage_pool output for the multi-layer out-of-distribution score",
}


def onnx_file(model_dir: Path, variant: str = "fp32") -> Path:
    """The ONNX file of a variant in a model folder (fp32: model.onnx, int8: model.int8.onnx): ConfigError
    for an unknown variant, ModelNotFoundError naming the command that makes the file when it is missing.
    A cheap check; the file itself is verified when it is loaded."""
    if variant not in ONNX_FILES:
        raise ConfigError(f"unknown ONNX variant {variant!r}; choose one of {', '.join(ONNX_FILES)}")
    path = model_dir / ONNX_FILES[variant]
    if not path.is_file():
        how = "cthub export" + (" --int8" if variant == "int8" else "")
        raise ModelNotFoundError(f"no {path.name} in {model_dir}: run `{how} {model_dir}` first")
    return path


def int8_path(fp32_path: Path) -> Path:
    """`model.onnx` -> `model.int8.onnx` (any `<stem>.onnx` -> `<stem>.int8.onnx`)."""
    return fp32_path.with_name(fp32_path.name.removesuffix(".onnx") + ".int8.onnx")


def _hub_key(path: Path) -> tuple[Path, str] | None:
    """(hub dir, manifest key) when `path` lies in a model folder directly inside the hub dir."""
    from hub.io import hub_dir

    hub = hub_dir()
    try:
        inside = path.resolve().parent.parent == hub.resolve()
    except OSError:
        return None
    return (hub, manifest.file_key(path.parent.name, path.name)) if inside else None


def record_onnx(path: Path) -> str:
    """Write `<path>.sha256` (and the manifest entry for a model folder in the hub dir); the sha256."""
    sha = sha256_file(path)
    manifest.write_sidecar(path, sha)
    where = _hub_key(path)
    if where is not None:
        manifest.record(where[0], where[1], sha, source="export")
    return sha


def _is_complete_onnx(path: Path) -> bool:
    import onnx

    try:
        onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 -- protobuf raises DecodeError (and others) for incomplete files
        return False
    return True


def verify_onnx_file(path: Path) -> str:
    """The file's sha256 after checking it against its sidecar and hub manifest entry; IntegrityError with
    a message per case (no checksum recorded, truncated, modified after export)."""
    sidecar = manifest.sidecar_path(path)
    recorded = read_sidecar(path)
    if recorded is None:
        raise IntegrityError(
            f"{path.name} has no recorded checksum ({sidecar.name} is missing): it was not written by "
            f"`cthub export` or its sidecar was lost. Nothing was loaded; re-export the model."
        )
    expected: dict[str, str] = {f"the sidecar {sidecar.name}": recorded}
    where = _hub_key(path)
    if where is not None:
        known = manifest.read_manifest(where[0]).get(where[1], {}).get("sha256")
        if known:
            expected[f"the hub manifest ({where[1]})"] = str(known)
    actual = sha256_file(path)
    for source, sha in expected.items():
        if sha.lower() == actual:
            continue
        size = path.stat().st_size
        if not _is_complete_onnx(path):
            raise IntegrityError(
                f"{path.name} is truncated or incomplete ({size:,} bytes, not a complete ONNX model; its "
                f"sha256 {actual[:12]}... differs from {sha[:12]}... recorded in {source}). Nothing was "
                "loaded; copy the file again or re-export the model."
            )
        raise IntegrityError(
            f"{path.name} was modified after export: it is a complete ONNX model but its sha256 "
            f"{actual[:12]}... differs from {sha[:12]}... recorded in {source}. Nothing was loaded; "
            "re-export the model (`cthub export MODEL_DIR`) instead of editing the file."
        )
    return actual


def check_fresh(
    metadata: dict[str, Any],
    path: Path,
    *,
    config: ModelConfig | None = None,
    source_sha256: str | None = None,
) -> None:
    """StaleModelError when the file was exported from other weights or with other preprocessing than
    `source_sha256` / `config` (each check skipped when its expectation is None)."""
    how = f"run `cthub export {path.parent}`" + (" --int8" if path.name.endswith(".int8.onnx") else "")
    stored_sha = str(metadata.get("source_sha256", ""))
    if source_sha256 is not None and stored_sha != source_sha256:
        raise StaleModelError(
            f"{path.name} is stale: it was exported from weights {stored_sha[:12] or 'unknown'}... but the "
            f"model now has weights {source_sha256[:12]}... (retrained or replaced since export); {how}"
        )
    stored_graph = metadata.get("graph_version", 1)
    if stored_graph != GRAPH_VERSION:
        raise StaleModelError(
            f"{path.name} is stale: it holds version {stored_graph} of the exported graph, this ct-ssl-hub "
            f"writes version {GRAPH_VERSION} ({GRAPH_CHANGES.get(GRAPH_VERSION, 'other outputs')}); {how}"
        )
    if config is not None:
        raw = metadata.get("preprocessing")
        stored: dict[str, Any] = raw if isinstance(raw, dict) else {}
        current = config.preprocessing.to_dict()
        if stored != current:
            changed = sorted(k for k in set(current) | set(stored) if stored.get(k) != current.get(k))
            raise StaleModelError(
                f"{path.name} is stale: it was exported with other preprocessing than config.json now "
                f"gives (changed: {', '.join(changed) or 'all'}); {how}"
            )
