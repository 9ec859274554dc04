"""Labeled data: a source's splits, and the one rule that picks train/val/test from them.

Data-level (it knows images and labels, not models), so fine-tuning, export checks and pretraining monitors
all split the same way from here."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ctdata.datasets import ArraySplit, load_labeled, load_medmnist, source_preprocessing
from ctdata.preprocess import PreprocessConfig
from ctdata.splits import kfold_splits, stratified_subset, train_val_split
from cthub.errors import DataError, MissingSplitError

SPLITS = ("train", "val", "test")


class TrainValTest(NamedTuple):
    """The three parts one fit uses: train on `train`, select on `val`, report `test`."""

    train: ArraySplit
    val: ArraySplit
    test: ArraySplit


def labels_of(split: ArraySplit) -> np.ndarray:
    """The labels of a labeled split (a typed error for an unlabeled one)."""
    if split.labels is None:
        raise DataError("this step needs labeled images")
    return split.labels


def _csv_of(source: Path) -> Path | None:
    if source.is_file() and source.suffix.lower() in (".csv", ".tsv"):
        return source
    if source.is_dir() and (source / "labels.csv").is_file():
        return source / "labels.csv"
    return None


def predefined_splits(source: str | Path) -> set[str] | None:
    """Which of train/val/test a source defines: npz keys, or the values of a CSV 'split' column.

    None for sources without splits (class folders, CSVs without a 'split' column). Mirrors the rules of
    `ctdata.datasets.load_labeled` (header stripped and lower-cased, split values compared lower-cased)."""
    p = Path(source)
    if p.suffix == ".npz":
        if not p.is_file():
            raise DataError(f"MedMNIST file not found: {p}")
        with np.load(p) as z:
            return {s for s in SPLITS if f"{s}_images" in z.files}
    table = _csv_of(p)
    if table is None:
        return None
    try:
        with table.open(newline="", encoding="utf-8-sig") as fh:
            rows = [r for r in csv.reader(fh) if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read {table.name} ({type(e).__name__})") from None
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if "split" not in header:
        return None
    col = header.index("split")
    return {r[col].strip().lower() for r in rows[1:] if len(r) > col} & set(SPLITS)


def data_preprocessing(
    source: str | Path, window: str | None = None, input_size: int = 224
) -> PreprocessConfig:
    """How the labeled data's grey levels come from HU: an explicit window preset (DICOM sources are read
    with it), else the known mapping of a published dataset (`ctdata.source_preprocessing`: OrganAMNIST's
    abdominal window), else the default interval mapping. A classifier records it, so serving maps an
    uploaded DICOM the way its training images were made."""
    if window:
        return PreprocessConfig.for_window(window, input_size=input_size)
    return source_preprocessing(source, input_size=input_size) or PreprocessConfig(input_size=input_size)


def load_splits(
    source: str | Path, preprocessing: PreprocessConfig | None = None, storage_size: int | None = None
) -> dict[str, ArraySplit]:
    """{'train', 'test'[, 'val']} where the source defines them; a source without test split gives {'all'}."""
    p = Path(source)
    present = predefined_splits(p)
    pp = preprocessing or PreprocessConfig()

    def load(split: str) -> ArraySplit:
        return load_labeled(p, preprocessing=pp, storage_size=storage_size, split=split, progress=False)

    if present is None:
        return {"all": load("all")}
    if p.suffix == ".npz":  # native size: `finalize` resizes at batch time
        loaded = {s: load_medmnist(p, s) for s in SPLITS if s in present}
    else:
        loaded = {s: load(s) for s in SPLITS if s in present}
    if "train" not in loaded:
        raise MissingSplitError(f"{p.name}: no training rows")
    if "test" not in loaded:
        return {"all": loaded["train"]}
    return loaded


def limit(split: ArraySplit, size: float | None, seed: int) -> ArraySplit:
    """A stratified subset (count or fraction); None or >= len keeps everything."""
    if size is None or (isinstance(size, int) and size >= len(split)) or size == 1.0:
        return split
    return split.subset(stratified_subset(labels_of(split), size, seed))


def kfold_pool(splits: dict[str, ArraySplit]) -> ArraySplit:
    """The images k-fold cross-validation draws from: 'all', else the training split."""
    if "all" in splits:
        return splits["all"]
    if "train" in splits:
        return splits["train"]
    raise MissingSplitError(f"the data has neither 'all' nor 'train' images (has {sorted(splits)})")


def select_splits(
    splits: dict[str, ArraySplit],
    *,
    fold: int | None = None,
    folds: int = 5,
    val_fraction: float = 0.1,
    split_seed: int = 42,
    train_size: float | None = None,
    train_seed: int = 0,
    max_val: int | None = None,
    max_test: int | None = None,
) -> TrainValTest:
    """Train/val/test for one fit, the same rule for `cthub finetune`, k-fold and every study cell.

    1. the partition, fixed by `split_seed`: with `fold=None` the source's own train/test, validation its
       own or else a stratified (group-aware) `val_fraction` of train; with `fold=i` fold i of stratified
       (group-aware) k-fold over 'all' (or 'train'), `val_fraction` of each training part for validation;
    2. val/test reduced to `max_val`/`max_test` (stratified, `split_seed`; None or 0 keeps all);
    3. train reduced to `train_size` (count or fraction, stratified, `train_seed`): label reduction comes
       last, so every fraction and seed is validated and tested on the same images."""
    if fold is None:
        if "train" not in splits or "test" not in splits:
            raise MissingSplitError(
                f"the data has no predefined train/test split (has {sorted(splits)}); use the k-fold protocol"
            )
        pool, test = splits["train"], splits["test"]
        if "val" in splits:
            train, val = pool, splits["val"]
        else:
            tr, va = train_val_split(labels_of(pool), val_fraction, split_seed, pool.groups)
            train, val = pool.subset(tr), pool.subset(va)
    else:
        data = kfold_pool(splits)
        f = kfold_splits(labels_of(data), folds, val_fraction, split_seed, data.groups)[fold]
        train, val, test = data.subset(f.train), data.subset(f.val), data.subset(f.test)
    val, test = limit(val, max_val or None, split_seed), limit(test, max_test or None, split_seed)
    return TrainValTest(limit(train, train_size, train_seed), val, test)


def describe(split: ArraySplit) -> str:
    """'N images, per class [..]' for logs."""
    if split.labels is None:
        return f"{len(split)} images, unlabeled"
    counts = np.bincount(split.labels, minlength=len(split.class_names))
    return f"{len(split)} images, per class {list(map(int, counts))}"
