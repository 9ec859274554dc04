"""Checksums that make every load verifiable: a sidecar next to the weights and a manifest in the hub dir.

- Sidecar `model.safetensors.sha256` (the `sha256sum` format) travels with every folder that
  `save_pretrained` writes, so a folder loaded by explicit path is verified when it carries one.
- `<hub>/manifest.json` records, outside the model folders, the sha256 of every model published into the hub
  (`publish_local`, `cthub hub import`, `cthub pretrain --publish`) and of every file pulled from the Hugging
  Face Hub whose registry entry has no published checksum yet (key `hf:<repo>@<commit>`). Writes are atomic
  and serialised by a lock file, so parallel publishers do not lose each other's entries.
- A model converted from the authors' own checkpoint (`cthub hub pull`, source "original") also records that
  file under `origin` (its URL and sha256): a later pull that gets a different file is refused
  (hub/convert.py, `--allow-changed-origin`).

These check files. Which *weights* a file holds is `weights_digest`: safetensors writes the header's
`__metadata__` keys in a random order per process (safetensors issue #584), so saving the same tensors twice
can give two file checksums.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cthub.errors import IntegrityError

MANIFEST_NAME = "manifest.json"
SIDECAR_SUFFIX = ".sha256"


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _safetensors_header(path: str | Path) -> bytes:
    """The JSON header of a safetensors file, as written (padding included)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return f.read(n)


def weights_digest(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of the tensors of a safetensors file: each tensor's name, dtype, shape and bytes, in name
    order. Header layout and `__metadata__` do not enter, so the same weights give the same digest however
    the file was written (the file's own sha256 can differ: see the module docstring)."""
    header = _safetensors_header(path)
    tensors = json.loads(header)
    tensors.pop("__metadata__", None)
    h = hashlib.sha256(b"ct-ssl-hub weights v1\0")
    with open(path, "rb") as f:
        for name in sorted(tensors):
            t = tensors[name]
            start, end = t["data_offsets"]
            h.update(json.dumps([name, t["dtype"], t["shape"]]).encode() + b"\0")
            f.seek(8 + len(header) + start)
            left = end - start
            while left > 0:
                block = f.read(min(chunk, left))
                if not block:
                    raise IntegrityError(f"{path} is truncated (tensor {name})")
                h.update(block)
                left -= len(block)
    return h.hexdigest()


def sha256_any_metadata_order(path: str | Path, max_keys: int = 4) -> frozenset[str]:
    """The sha256 of the file under every order safetensors could have written its `__metadata__` keys in
    (the file's own among them): a file checksum recorded when the same weights were saved by another process
    is one of these. Only the file's own when the metadata has one key, or more than `max_keys`."""
    header = _safetensors_header(path)
    meta = json.loads(header).get("__metadata__") or {}
    as_written = _compact_json(meta)
    if not 2 <= len(meta) <= max_keys or header.count(as_written) != 1:
        return frozenset({sha256_file(path)})
    shas = set()  # the order as written is one of the permutations: the file's own hash comes out of the loop
    prefix = struct.pack("<Q", len(header))
    for order in itertools.permutations(meta.items()):
        h = hashlib.sha256(prefix + header.replace(as_written, _compact_json(dict(order))))
        with open(path, "rb") as f:
            f.seek(8 + len(header))
            while block := f.read(1 << 22):
                h.update(block)
        shas.add(h.hexdigest())
    return frozenset(shas)


def _compact_json(obj: dict[str, str]) -> bytes:
    """JSON without spaces, keys in the dict's order, as the safetensors header is written."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def sidecar_path(weights: str | Path) -> Path:
    w = Path(weights)
    return w.with_name(w.name + SIDECAR_SUFFIX)


def write_sidecar(weights: str | Path, sha256: str) -> Path:
    """Write `<weights>.sha256` as `sha256sum` would (`sha256sum -c` verifies it)."""
    p = sidecar_path(weights)
    p.write_text(f"{sha256}  {Path(weights).name}\n")
    return p


def read_sidecar(weights: str | Path) -> str | None:
    """The checksum recorded beside `weights`, or None when there is no sidecar."""
    p = sidecar_path(weights)
    if not p.is_file():
        return None
    text = p.read_text().split()
    if not text or len(text[0]) != 64 or any(c not in "0123456789abcdef" for c in text[0].lower()):
        raise IntegrityError(f"{p} is not a sha256 sidecar (expected '<64 hex>  {Path(weights).name}')")
    return text[0].lower()


def verify(weights: Path, expected: dict[str, str | None], actual: str | None = None) -> str:
    """Compare the hash of `weights` (computed unless given) with every expectation (source -> sha256)."""
    actual = actual or sha256_file(weights)
    for source, sha in expected.items():
        if sha is not None and sha.lower() != actual:
            raise IntegrityError(
                f"{weights} does not match the sha256 recorded in {source} (expected {sha[:12]}..., "
                f"found {actual[:12]}...): the file is truncated, corrupted or was replaced. Nothing was "
                "loaded; delete the folder and pull, import or publish the model again."
            )
    return actual


def manifest_path(hub: Path) -> Path:
    return hub / MANIFEST_NAME


def read_manifest(hub: Path) -> dict[str, dict[str, Any]]:
    """All records of the hub dir's manifest (empty when there is none)."""
    p = manifest_path(hub)
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise IntegrityError(f"{p} is not valid JSON ({e}); restore it or delete it and re-publish") from None
    return dict(data.get("models", {}))


@contextlib.contextmanager
def _locked(hub: Path) -> Iterator[None]:
    hub.mkdir(parents=True, exist_ok=True)
    with open(hub / (MANIFEST_NAME + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def record(hub: Path, key: str, sha256: str, **info: Any) -> dict[str, Any]:
    """Record (or replace) the checksum of `key` in the manifest; returns the record."""
    entry = {"sha256": sha256, "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **info}
    with _locked(hub):
        models = read_manifest(hub)
        models[key] = entry
        _write(hub, models)
    return entry


def update(hub: Path, key: str, **info: Any) -> dict[str, Any]:
    """Add `info` to the existing record of `key` (IntegrityError when there is none); returns the record."""
    with _locked(hub):
        models = read_manifest(hub)
        if key not in models:
            raise IntegrityError(f"{manifest_path(hub)} has no record of {key!r} to update")
        models[key] = {**models[key], **info}
        _write(hub, models)
    return models[key]


def _write(hub: Path, models: dict[str, dict[str, Any]]) -> None:
    """Replace the manifest atomically (the caller holds the lock)."""
    tmp = manifest_path(hub).with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"format_version": 1, "models": models}, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, manifest_path(hub))


def remote_key(repo_id: str, commit: str) -> str:
    return f"hf:{repo_id}@{commit}"


def file_key(model: str, filename: str) -> str:
    """The manifest key of a derived file of a hub model (e.g. its ONNX export): `<model>/<filename>`."""
    return f"{model}/{filename}"
