"""Labeled and unlabeled image sets as uint8 arrays (already mapped to 0..255), ready for `prepare_batch`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cthub.errors import DataError

ORGANAMNIST_LABELS: list[str] = [
    "bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right",
    "liver", "lung-left", "lung-right", "pancreas", "spleen",
]


@dataclass
class ArraySplit:
    """Images [N,H,W] uint8, integer labels [N] (or None for unlabeled), optional groups (patient ids)."""

    images: np.ndarray
    labels: np.ndarray | None
    groups: np.ndarray | None = None
    class_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: np.ndarray) -> "ArraySplit":
        return ArraySplit(self.images[idx], None if self.labels is None else self.labels[idx],
                          None if self.groups is None else self.groups[idx], self.class_names)


def load_medmnist(path: str | Path, split: str, class_names: list[str] | None = None) -> ArraySplit:
    """One split ('train', 'val', 'test') of a MedMNIST npz (2-D variants, any size)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"MedMNIST file not found: {p}")
    with np.load(p) as z:
        key = f"{split}_images"
        if key not in z:
            raise DataError(f"{p.name} has no split {split!r} (keys: {sorted(z.files)})")
        images = np.asarray(z[key])
        labels = np.asarray(z[f"{split}_labels"]).reshape(-1).astype(np.int64)
    if images.ndim == 4 and images.shape[-1] == 3:  # colour variants: to grey
        images = images.mean(axis=-1).round().astype(np.uint8)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{p.name}: expected uint8 [N,H,W] images, got {images.dtype} {images.shape}")
    names = class_names or (ORGANAMNIST_LABELS if "organ" in p.name else [str(i) for i in range(labels.max() + 1)])
    return ArraySplit(images, labels, None, names)
