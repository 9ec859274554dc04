"""The classifier's own data for export checks: parity, int8 calibration and evaluation, the OOD reference.

A fine-tuned classifier records its data source in `config.provenance["data"]` and how it was split
(`finetune.seed`, `max_val`, `max_test`, or the saved fold of k-fold cross-validation); the same rule
(`hub.model_data.recorded_splits`, by `ctdata.labeled.select_splits`) gives back its train / val / test
images here. Without that data (a model from elsewhere, or the file is not on this machine) the checks fall
back to the real CT DICOMs bundled with pydicom, and there is no int8 calibration and no OOD reference.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ctdata.datasets import ArraySplit
from ctdata.labeled import limit
from ctdata.preprocess import PreprocessConfig, prepare, prepare_batch
from cthub.errors import InputError
from hub.config import ModelConfig
from hub.model_data import recorded_splits

log = logging.getLogger(__name__)

# Real CT slices shipped inside the pydicom wheel (no download): a 128² CT and two 512² JPEG 2000 CTs.
PYDICOM_SAMPLES: tuple[str, ...] = ("CT_small.dcm", "J2K_pixelrep_mismatch.dcm", "693_J2KI.dcm")


@dataclass
class ModelData:
    """The classifier's train / val / test images (uint8, as fine-tuning stores them) and labels."""

    source: str
    train: ArraySplit
    val: ArraySplit
    test: ArraySplit
    preprocessing: PreprocessConfig

    def take(self, split: str, n: int, seed: int = 0) -> ArraySplit:
        """A stratified subset of at most `n` images of one split (all when it has no more)."""
        part: ArraySplit = getattr(self, split)
        return limit(part, n, seed) if n < len(part) else part

    def describe(self, split: str, n: int) -> str:
        return f"{Path(self.source).name} {split} split: {n} images"


def batches(images: np.ndarray, cfg: PreprocessConfig, size: int = 64) -> Iterator[np.ndarray]:
    """Model inputs [b, C, S, S] float32 for stored uint8 images [N, H, W], `size` at a time."""
    for i in range(0, len(images), size):
        yield prepare_batch(images[i : i + size], cfg).numpy()


def load_model_data(config: ModelConfig, source: Path) -> ModelData:
    """Train / val / test of `source` split as fine-tuning split it for this classifier."""
    train, val, test = recorded_splits(config, source)
    pp = config.preprocessing
    return ModelData(str(source), train, val, test, pp)


def pydicom_sources(extra: Sequence[str | Path] = ()) -> list[Path]:
    """The user's files, then the real CT DICOMs bundled with pydicom."""
    from pydicom.data import get_testdata_file

    out = [Path(p) for p in extra]
    for name in PYDICOM_SAMPLES:
        try:
            p = get_testdata_file(name, download=False)
        except (ValueError, OSError):  # pydicom's documented error; an unreadable data folder
            p = None
        if p:
            out.append(Path(p))
    return out


def prepare_files(cfg: PreprocessConfig, sources: Sequence[Path]) -> tuple[torch.Tensor | None, list[str]]:
    """Preprocess every readable file with the model's own preprocessing into one batch (None if none)."""
    tensors, names = [], []
    for src in sources:
        try:
            tensors.append(prepare(src, cfg))
            names.append(src.name)
        except InputError as e:  # a sample that cannot be decoded here is skipped, not fatal
            log.warning("parity: skipping %s (%s)", src.name, e)
    return (torch.stack(tensors) if tensors else None), names
