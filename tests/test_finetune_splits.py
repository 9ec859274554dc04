"""Protocols on real labels: stratified disjoint k-fold, class-ratio-preserving reduction, no group leak."""

from __future__ import annotations

import numpy as np
import pytest

from ctdata.datasets import load_medmnist
from ctdata.splits import group_train_test_split, kfold_splits, stratified_subset


@pytest.fixture(scope="module")
def labels(organamnist_npz) -> np.ndarray:
    return load_medmnist(organamnist_npz, "val").labels[:3000]


def test_kfold_folds_are_stratified_and_disjoint(labels: np.ndarray) -> None:
    folds = kfold_splits(labels, k=5, val_fraction=0.1, seed=42)
    assert len(folds) == 5
    tests = np.concatenate([f.test for f in folds])
    assert np.array_equal(np.sort(tests), np.arange(len(labels)))  # each item tested exactly once
    ratio = np.bincount(labels, minlength=11) / len(labels)
    for f in folds:
        tr, va, te = set(f.train), set(f.val), set(f.test)
        assert not tr & va and not tr & te and not va & te
        assert len(f.train) + len(f.val) + len(f.test) == len(labels)
        assert abs(len(f.val) / (len(f.train) + len(f.val)) - 0.1) < 0.01
        for part in (f.test, f.train, f.val):
            r = np.bincount(labels[part], minlength=11) / len(part)
            assert np.abs(r - ratio).max() < 0.02


@pytest.mark.parametrize("fraction", [0.5, 0.1, 0.05])
def test_reduction_keeps_class_ratios_and_differs_per_seed(labels: np.ndarray, fraction: float) -> None:
    a = stratified_subset(labels, fraction, seed=0)
    b = stratified_subset(labels, fraction, seed=1)
    assert len(a) == round(fraction * len(labels))
    counts, sub = np.bincount(labels, minlength=11), np.bincount(labels[a], minlength=11)
    assert np.all(np.abs(sub - counts * fraction) <= 1.0)
    assert not np.array_equal(a, b)
    assert np.array_equal(a, stratified_subset(labels, fraction, seed=0))


def test_group_split_never_leaks(labels: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 60, size=len(labels))  # 60 "patients", several slices each
    tr, te = group_train_test_split(labels, groups, 0.2, seed=3)
    assert not set(groups[tr]) & set(groups[te])
    assert len(tr) + len(te) == len(labels)
    for f in kfold_splits(labels, k=5, val_fraction=0.1, seed=7, groups=groups):
        g_tr, g_va, g_te = set(groups[f.train]), set(groups[f.val]), set(groups[f.test])
        assert not g_tr & g_te and not g_tr & g_va and not g_va & g_te
