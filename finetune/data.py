"""Labeled data for fine-tuning: MedMNIST npz now, any `ctdata.datasets.load_labeled` source when present."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ctdata.datasets import ArraySplit, load_medmnist
from ctdata.preprocess import PreprocessConfig
from cthub.errors import DataError
from finetune.splits import stratified_subset


def load_splits(source: str | Path, preprocessing: PreprocessConfig | None = None,
                storage_size: int | None = None) -> dict[str, ArraySplit]:
    """{'train', 'val', 'test'} where the source defines them; a folder/CSV without splits gives {'all'}."""
    p = Path(source)
    if p.suffix == ".npz":
        return {s: load_medmnist(p, s) for s in ("train", "val", "test")}
    from ctdata import datasets

    load_labeled = getattr(datasets, "load_labeled", None)
    if load_labeled is None:
        raise DataError(f"{p}: only MedMNIST .npz files are supported by this version of ctdata")
    pp = preprocessing or PreprocessConfig()

    def load(split: str) -> ArraySplit | None:
        try:
            return load_labeled(p, preprocessing=pp, storage_size=storage_size, split=split, progress=False)
        except DataError as e:
            if "split" in str(e):
                return None
            raise

    train = load("train")  # without a 'split' column this is everything
    val, test = load("val"), load("test")
    if train is None:
        raise DataError(f"{p.name}: no training rows")
    if test is None:
        return {"all": train}
    return {k: v for k, v in (("train", train), ("val", val), ("test", test)) if v is not None}


def limit(split: ArraySplit, size: float | None, seed: int) -> ArraySplit:
    """A stratified subset (count or fraction); None or >= len keeps everything."""
    if size is None or (isinstance(size, int) and size >= len(split)) or size == 1.0:
        return split
    return split.subset(stratified_subset(split.labels, size, seed))


def describe(split: ArraySplit) -> str:
    counts = np.bincount(split.labels, minlength=len(split.class_names) or 0) if split.labels is not None else []
    return f"{len(split)} images, per class {list(map(int, counts))}"
