"""One held-out split for a labeled source that has none (a labeled folder, CSV manifest or DICOM+CSV).

`cthub finetune` runs every fold of k-fold on such a source; the main job trains and serves one model, so it
takes fold 0 of the paper's protocol (`ctdata.splits.kfold_splits`: 5 stratified folds, patient-grouped
when the source names patients, 10% of training for validation) and writes it as a CSV manifest
(path, label, [group,] split) beside the models. The fine-tunes then read that manifest with
`--protocol split`, so the served model and its baseline see the same train/val/test slices, and the card's
command names the file that holds the split. The manifest holds file paths and labels only; it lives in the
models folder (not in git)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ctdata.datasets import labeled_files
from ctdata.labeled import predefined_splits
from ctdata.splits import kfold_splits

SPLIT_SEED = 42  # `cthub finetune --protocol kfold`'s default split seed (its --seed 0 + 42 is not used)
FOLDS = 5
VAL_FRACTION = 0.1


def needs_split(source: str | Path) -> bool:
    """True for a labeled source without its own train/test split (a MedMNIST .npz has one)."""
    p = Path(source)
    if p.suffix == ".npz":
        return False
    present = predefined_splits(p)
    return present is None or not {"train", "test"} <= present


def write_split_manifest(source: str | Path, out: Path, seed: int = SPLIT_SEED) -> Path:
    """Fold 0 of the paper's protocol over `source`, as a manifest at `out` (rewritten only when it
    changes, so the fine-tunes' inputs stay current)."""
    files, raw, groups, column, _ = labeled_files(source, split="all")
    column = column or "label"  # class folders name no label column
    _, y = np.unique(np.asarray(raw), return_inverse=True)
    fold = kfold_splits(y, FOLDS, VAL_FRACTION, seed, None if groups is None else np.asarray(groups))[0]
    split = np.full(len(files), "train", dtype=object)
    split[fold.val], split[fold.test] = "val", "test"
    header = ["path", column] + (["group"] if groups is not None else []) + ["split"]
    lines = [header]
    for i, f in enumerate(files):
        lines.append([str(f.resolve()), raw[i]] + ([groups[i]] if groups is not None else []) + [split[i]])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(lines)
    if out.is_file() and out.read_bytes() == tmp.read_bytes():
        tmp.unlink()
    else:
        tmp.replace(out)
    return out
