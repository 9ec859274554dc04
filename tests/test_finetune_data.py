"""One train/val/test rule (`select_splits`) for the CLI, k-fold and the study; split discovery by type."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ctdata.datasets import ArraySplit
from ctdata.labeled import load_splits, predefined_splits, select_splits
from ctdata.preprocess import PreprocessConfig
from cthub.errors import DataError, MissingSplitError


def _split(labels: list[int], offset: int = 0) -> ArraySplit:
    y = np.asarray(labels, dtype=np.int64)
    images = (np.arange(len(y)) + offset).astype(np.uint8)[:, None, None] * np.ones((1, 4, 4), np.uint8)
    return ArraySplit(images, y, None, ["a", "b"])


def _ids(s: ArraySplit) -> set[int]:
    """Image identities (each synthetic image is filled with its own index)."""
    return set(s.images[:, 0, 0].tolist())


def test_train_test_without_val_carves_a_stratified_validation_share() -> None:
    splits = {"train": _split([0] * 60 + [1] * 40), "test": _split([0, 1] * 10, offset=100)}
    train, val, test = select_splits(splits, val_fraction=0.2, split_seed=3)
    assert len(val) == 20 and np.bincount(val.labels).tolist() == [12, 8]  # class ratio of train kept
    assert len(train) == 80 and not _ids(train) & _ids(val) and len(test) == 20
    again = select_splits(splits, val_fraction=0.2, split_seed=3)
    assert _ids(again.val) == _ids(val)  # the partition is a function of split_seed


def test_label_reduction_never_changes_validation_or_test() -> None:
    splits = {"train": _split([0] * 60 + [1] * 40), "test": _split([0, 1] * 50, offset=100)}
    full = select_splits(splits, split_seed=1, max_test=40)
    for size, seed in ((0.5, 0), (0.5, 1), (20, 2)):
        part = select_splits(splits, split_seed=1, max_test=40, train_size=size, train_seed=seed)
        assert _ids(part.val) == _ids(full.val) and _ids(part.test) == _ids(full.test)
        assert _ids(part.train) < _ids(full.train)
    a = select_splits(splits, split_seed=1, train_size=0.5, train_seed=0).train
    b = select_splits(splits, split_seed=1, train_size=0.5, train_seed=1).train
    assert _ids(a) != _ids(b)  # each seed draws its own training subset
    assert len(full.test) == 40 and np.bincount(full.test.labels).tolist() == [20, 20]


def test_folds_cover_every_image_once() -> None:
    data = {"all": _split([0] * 30 + [1] * 20)}
    tests = [select_splits(data, fold=i, folds=5, split_seed=0).test for i in range(5)]
    assert sorted(i for t in tests for i in _ids(t)) == list(range(50))
    assert all(np.bincount(t.labels).tolist() == [6, 4] for t in tests)


def test_missing_splits_are_typed_errors() -> None:
    with pytest.raises(MissingSplitError):
        select_splits({"all": _split([0, 1] * 10)})  # no train/test: k-fold only
    with pytest.raises(MissingSplitError):
        select_splits({"test": _split([0, 1] * 10)}, fold=0)
    assert issubclass(MissingSplitError, DataError)


def test_csv_split_column_without_val(head_ct_dir: Path, tmp_path: Path) -> None:
    """A manifest with train/test rows only: found in the 'split' column, validation carved from train."""
    rows = [
        f"{head_ct_dir / f'{i:03d}.png'},{int(i < 100)},{'test' if i % 5 == 0 else 'Train'}"
        for i in range(80, 120)
    ]
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    assert predefined_splits(manifest) == {"train", "test"}
    assert predefined_splits(head_ct_dir) is None  # labels.csv without a split column
    odd = tmp_path / "odd.csv"
    odd.write_text("path,label,split\n" + "\n".join(r.rsplit(",", 1)[0] + ",holdout" for r in rows) + "\n")
    assert predefined_splits(odd) == set()
    with pytest.raises(MissingSplitError):  # a split column without training rows is an error, not "all"
        load_splits(odd)
    splits = load_splits(manifest, PreprocessConfig(input_size=32))
    assert set(splits) == {"train", "test"} and len(splits["test"]) == 8
    train, val, test = select_splits(splits, val_fraction=0.25, split_seed=0)
    assert (len(train), len(val), len(test)) == (24, 8, 8)
