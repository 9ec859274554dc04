"""Index splits of a labeled set (scikit-learn): stratified label reduction, stratified (group-aware)
train/val and k-fold with a validation share. Data-level, so every stage splits the same way
(`ctdata.labeled.select_splits` applies them to images)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

from cthub.errors import ConfigError, DataError

PAPER_FRACTIONS: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25, 0.1, 0.05)


@dataclass(frozen=True)
class Fold:
    """Indices into one labeled set: train / val / test (disjoint)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def stratified_subset(labels: np.ndarray, size: float, seed: int) -> np.ndarray:
    """Sorted indices of a class-stratified subset: `size` items (int) or that fraction (float <= 1).

    Every class keeps at least one example; a different seed draws a different subset."""
    y = np.asarray(labels).reshape(-1)
    n = len(y)
    k = round(size * n) if isinstance(size, float) else int(size)
    if isinstance(size, float) and not 0 < size <= 1:
        raise ConfigError(f"fraction must be in (0, 1], got {size}")
    if k >= n:
        return np.arange(n)
    classes = np.unique(y)
    if k < len(classes):
        raise ConfigError(f"a stratified subset of {k} cannot hold all {len(classes)} classes")
    idx, _ = train_test_split(np.arange(n), train_size=k, stratify=y, random_state=seed)
    return np.sort(idx)


def _group_val_split(
    y: np.ndarray, groups: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split positions 0..n-1 into (train, val) by group, stratified as far as groups allow."""
    n_splits = max(2, round(1 / val_fraction))
    n_groups = len(np.unique(groups))
    n_splits = min(n_splits, n_groups)
    if n_splits < 2:
        raise DataError("group-aware validation split needs at least two groups in the training data")
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    tr, va = next(sgkf.split(np.zeros(len(y)), y, groups))
    return tr, va


def train_val_split(
    labels: np.ndarray, val_fraction: float, seed: int, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (and, with groups, group-disjoint) split of 0..n-1 into (train, val) indices."""
    y = np.asarray(labels).reshape(-1)
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if groups is not None:
        tr, va = _group_val_split(y, np.asarray(groups), val_fraction, seed)
    else:
        tr, va = train_test_split(np.arange(len(y)), test_size=val_fraction, stratify=y, random_state=seed)
    return np.sort(tr), np.sort(va)


def kfold_splits(
    labels: np.ndarray,
    k: int = 5,
    val_fraction: float = 0.1,
    seed: int = 42,
    groups: np.ndarray | None = None,
) -> list[Fold]:
    """The paper's brain protocol: stratified k-fold; each fold's training part gives `val_fraction` to
    validation. With `groups` (patient ids) no group is in two of train/val/test of a fold."""
    y = np.asarray(labels).reshape(-1)
    if k < 2:
        raise ConfigError(f"k-fold needs k >= 2, got {k}")
    counts = np.bincount(y)
    if counts[counts > 0].min() < k:
        raise DataError(f"the smallest class has {counts[counts > 0].min()} items, fewer than k={k} folds")
    if groups is not None:
        g = np.asarray(groups)
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        parts = splitter.split(np.zeros(len(y)), y, g)
    else:
        g = None
        parts = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)
    folds = []
    for i, (trval, test) in enumerate(parts):
        tr, va = train_val_split(y[trval], val_fraction, seed + i, None if g is None else g[trval])
        folds.append(Fold(train=np.sort(trval[tr]), val=np.sort(trval[va]), test=np.sort(test)))
    return folds


def group_train_test_split(
    labels: np.ndarray, groups: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices with no group on both sides, stratified as far as groups allow."""
    return train_val_split(labels, test_fraction, seed, groups)
