"""The SIIM contrast slices (real_ct/siim_contrast: 100 JPEG-LS DICOM slices of 54 patients, labels.csv with
id,label,patient) as the fine-tune and `cthub study --protocol kfold` read them: DICOM in HU, folds split
by patient so that no patient is in two of train/val/test of any fold."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from conftest import shared_file

from ctdata.labeled import kfold_pool, load_splits
from ctdata.preprocess import PreprocessConfig
from ctdata.splits import kfold_splits
from finetune.config import FinetuneConfig
from finetune.study import Cell, StudySpec, cell_splits

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def siim():
    return shared_file("real_ct", "siim_contrast")


def test_siim_reads_as_dicom_csv_with_patients_as_groups(siim) -> None:
    pool = kfold_pool(load_splits(siim))
    assert len(pool) == 100
    assert pool.class_names == ["contrast", "no_contrast"]
    assert np.bincount(pool.labels).tolist() == [50, 50]
    assert pool.groups is not None and len(set(pool.groups)) == 54  # the `patient` column
    rows = (siim / "labels.csv").read_text().splitlines()[1:]
    assert sorted(pool.groups) == sorted(r.split(",")[2] for r in rows)


def test_siim_dicom_pixels_are_mapped_from_hu(siim) -> None:
    """Loaded at the native 512 px with the mediastinal window: equal to the window applied by hand to
    pydicom's decoded pixels x RescaleSlope + RescaleIntercept (the values HU are stored as)."""
    name = (siim / "labels.csv").read_text().splitlines()[1].split(",")[0]
    ds = pydicom.dcmread(siim / name)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    lo, hi = 40 - 400 / 2, 40 + 400 / 2
    expected = np.clip((hu - lo) / (hi - lo), 0, 1) * 255
    pp = PreprocessConfig.for_window("mediastinum")
    loaded = kfold_pool(load_splits(siim, pp, storage_size=512)).images[0].astype(np.float64)
    assert loaded.shape == expected.shape == (512, 512)
    assert np.abs(loaded - expected).mean() < 1.0
    # the paper's interval maps the same HU to other grey levels (so the test tells the mappings apart)
    wide = kfold_pool(load_splits(siim, PreprocessConfig(), storage_size=512)).images[0].astype(np.float64)
    assert np.abs(wide - expected).mean() > 10.0


def test_siim_study_folds_never_share_a_patient(siim) -> None:
    """The study's own cells (5 folds, 10% of training for validation), as `cthub study --protocol kfold`
    trains them: train/val/test of every fold are patient-disjoint and hold both classes."""
    spec = StudySpec(
        data=str(siim),
        encoders=["scratch"],
        fractions=[1.0],
        seeds=[0],
        out="unused",
        recipe=FinetuneConfig(seed=42),
        protocol="kfold",
        folds=5,
        val_fraction=0.1,
    )
    tested = 0
    for cell in spec.cells():
        parts = cell_splits(spec, cell)
        pats = [set(p.groups) for p in parts]
        assert not pats[0] & pats[1] and not pats[0] & pats[2] and not pats[1] & pats[2], cell.key
        assert all(set(p.labels.tolist()) == {0, 1} for p in parts), cell.key
        assert sum(map(len, parts)) == 100
        tested += len(parts.test)
    assert tested == 100
    # every slice tested exactly once over the folds (the index view of the same partition)
    pool = kfold_pool(load_splits(siim))
    folds = kfold_splits(pool.labels, 5, 0.1, 42, pool.groups)
    assert np.array_equal(np.sort(np.concatenate([f.test for f in folds])), np.arange(100))
    # a split that ignored patients would share some (several patients have more than one slice)
    ungrouped = kfold_splits(pool.labels, 5, 0.1, 42)
    assert any(set(pool.groups[f.train]) & set(pool.groups[f.test]) for f in ungrouped)


def test_cell_splits_pass_the_study_settings_through(siim) -> None:
    """The study's wiring passes its settings through: another split seed gives other folds, and the
    study's window (`cthub study --window`) maps the same slices' HU to other grey levels."""
    kw = dict(data=str(siim), encoders=["scratch"], fractions=[1.0], seeds=[0], out="x", protocol="kfold")
    cell = Cell("scratch", 1.0, 0, 0)
    a = cell_splits(StudySpec(**kw, recipe=FinetuneConfig(seed=42)), cell)
    b = cell_splits(StudySpec(**kw, recipe=FinetuneConfig(seed=7)), cell)
    assert set(a.test.groups) != set(b.test.groups)
    w = cell_splits(StudySpec(**kw, recipe=FinetuneConfig(seed=42), window="mediastinum"), cell)
    assert w.test.groups.tolist() == a.test.groups.tolist()  # the same partition
    pool = kfold_pool(load_splits(siim, PreprocessConfig.for_window("mediastinum")))
    fold = kfold_splits(pool.labels, 5, 0.1, 42, pool.groups)[0]
    assert np.array_equal(w.test.images, pool.images[fold.test])
    assert np.abs(w.test.images.astype(float) - a.test.images.astype(float)).mean() > 10.0
