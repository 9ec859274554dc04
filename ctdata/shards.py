"""Compact, memory-mapped uint8 slice shards for pretraining (written by `ctdata.extract`).

Layout of a shard directory:

    index.json        {"format": "ct-ssl-hub-shards", "version": 1, "size": S, "preprocessing": {...}}
    manifest.jsonl    one line per finished unit (series): {"key", "file", "count", "warnings"}
    shards/00000.npy  uint8 [n,S,S], written to a temp name then renamed (a crash never leaves half a shard)

A unit is only listed in the manifest after its shard is on disk, so an interrupted extraction resumes
by skipping listed keys. Keys are hashes of the series' relative path: no patient ids in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cthub.errors import DataError

FORMAT = "ct-ssl-hub-shards"
INDEX, MANIFEST, SHARDS = "index.json", "manifest.jsonl", "shards"


def is_shard_dir(path: str | Path) -> bool:
    return (Path(path) / INDEX).is_file()


def unit_key(name: str) -> str:
    """A stable, non-identifying key for a unit of work (e.g. a series path); not a security hash."""
    return hashlib.sha1(name.encode("utf-8"), usedforsecurity=False).hexdigest()[:16]


class ShardWriter:
    """Append units of uint8 slices [n,S,S] to a shard directory; resumable via the manifest."""

    def __init__(self, out: str | Path, size: int, preprocessing: dict[str, Any] | None = None) -> None:
        self.out = Path(out)
        (self.out / SHARDS).mkdir(parents=True, exist_ok=True)
        index = self.out / INDEX
        if index.is_file():
            meta = json.loads(index.read_text())
            if meta.get("size") != size or (preprocessing and meta.get("preprocessing") != preprocessing):
                raise DataError(
                    f"{self.out.name} already holds shards of size {meta.get('size')} with other "
                    "preprocessing; use a new --out directory"
                )
        else:
            _atomic_write(
                index,
                json.dumps(
                    {"format": FORMAT, "version": 1, "size": size, "preprocessing": preprocessing or {}},
                    indent=2,
                ).encode(),
            )
        self.size = size
        self.done: set[str] = {e["key"] for e in read_manifest(self.out)}

    def write(self, key: str, images: np.ndarray, warnings: list[str] | None = None) -> None:
        """Store one unit; a no-op when `key` is already finished."""
        if key in self.done:
            return
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (self.size, self.size):
            raise DataError(
                f"shard unit must be uint8 [n,{self.size},{self.size}], got {images.dtype} {images.shape}"
            )
        name = f"{len(self.done):05d}-{key}.npy"
        tmp = self.out / SHARDS / (name + ".tmp")
        with tmp.open("wb") as fh:
            np.save(fh, images)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.out / SHARDS / name)
        entry = {"key": key, "file": name, "count": len(images), "warnings": warnings or []}
        with (self.out / MANIFEST).open("a") as fh:
            fh.write(json.dumps(entry) + "\n")
        self.done.add(key)


def read_manifest(out: str | Path) -> list[dict[str, Any]]:
    """Finished units; a torn last line (crash mid-write) is ignored."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


@dataclass
class ShardSet:
    """Read-only view over all shards: memory-mapped, indexable like one [N,S,S] uint8 array."""

    arrays: list[np.ndarray]
    size: int
    preprocessing: dict[str, Any]

    def __post_init__(self) -> None:
        self._offsets = np.cumsum([0] + [len(a) for a in self.arrays])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        k = int(np.searchsorted(self._offsets, i, side="right") - 1)
        return np.asarray(self.arrays[k][i - self._offsets[k]])

    def __iter__(self) -> Iterator[np.ndarray]:
        for a in self.arrays:
            yield from a

    def to_array(self) -> np.ndarray:
        """All slices in memory as one uint8 [N,S,S] array."""
        if not self.arrays:
            return np.empty((0, self.size, self.size), dtype=np.uint8)
        return np.concatenate(self.arrays, axis=0)


def open_shards(path: str | Path) -> ShardSet:
    """Open a shard directory (memory-mapped, nothing loaded until read)."""
    p = Path(path)
    try:
        meta = json.loads((p / INDEX).read_text())
    except (OSError, json.JSONDecodeError):
        raise DataError(f"{p.name} is not a shard directory (missing or invalid {INDEX})") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"{p.name}/{INDEX} is not a {FORMAT} index")
    arrays = []
    for e in read_manifest(p):
        f = p / SHARDS / e["file"]
        try:
            arrays.append(np.load(f, mmap_mode="r"))
        except (OSError, ValueError):
            raise DataError(
                f"shard {e['file']} is missing or damaged; delete its manifest line and re-run the extraction"
            ) from None
    return ShardSet(arrays, int(meta["size"]), meta.get("preprocessing", {}))


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
