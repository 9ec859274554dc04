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

from ctdata.datasets import IMAGE_SUFFIXES
from ctdata.labeled import predefined_splits
from ctdata.splits import kfold_splits
from cthub.errors import DataError

SPLIT_SEED = 42  # `cthub finetune --protocol kfold`'s default split seed (its --seed 0 + 42 is not used)
FOLDS = 5
VAL_FRACTION = 0.1
GROUP_HEADERS = ("group", "patient", "patient_id", "patientid", "subject")


def needs_split(source: str | Path) -> bool:
    """True for a labeled source without its own train/test split (a MedMNIST .npz has one)."""
    p = Path(source)
    if p.suffix == ".npz":
        return False
    present = predefined_splits(p)
    return present is None or not {"train", "test"} <= present


def _read_table(path: Path) -> tuple[list[str], list[list[str]]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = [[c.strip() for c in r] for r in csv.reader(fh) if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read {path.name} ({type(e).__name__})") from None
    if len(rows) < 2 or len(rows[0]) < 2:
        raise DataError(f"{path.name}: expected a header and rows of at least two columns (file, label)")
    return [h.lower() for h in rows[0]], rows[1:]


def _group_index(header: list[str]) -> int | None:
    return next((i for i, h in enumerate(header) if h in GROUP_HEADERS), None)


def _by_stem(folder: Path, ident: str, index: dict[str, Path]) -> Path:
    """A labels.csv id -> its file, as `ctdata.datasets.load_labeled` matches it ('0' matches '000.png')."""
    stem = Path(ident).stem if Path(ident).suffix.lower() in IMAGE_SUFFIXES else ident
    for key in (stem, stem.zfill(3), stem.zfill(4), stem.zfill(5), str(int(stem)) if stem.isdigit() else ""):
        if key in index:
            return index[key]
    raise DataError(f"{folder.name}/labels.csv: an id matches no image file")


def labeled_files(source: str | Path) -> tuple[list[Path], list[str], list[str] | None, str]:
    """(files, raw labels, groups or None, label column name) of a labeled folder or CSV manifest."""
    src = Path(source)
    if src.is_file() and src.suffix.lower() in (".csv", ".tsv"):
        header, rows = _read_table(src)
        pcol = header.index("path") if "path" in header else 0
        lcol = header.index("label") if "label" in header else 1
        files = [Path(r[pcol]) if Path(r[pcol]).is_absolute() else src.parent / r[pcol] for r in rows]
        g = _group_index(header)
        return files, [r[lcol] for r in rows], None if g is None else [r[g] for r in rows], header[lcol]
    if src.is_dir() and (src / "labels.csv").is_file():
        header, rows = _read_table(src / "labels.csv")
        index = {
            f.stem: f
            for f in sorted(src.rglob("*"))
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and f.name != "labels.csv"
        }
        g = _group_index(header)
        files = [_by_stem(src, r[0], index) for r in rows]
        return files, [r[1] for r in rows], None if g is None else [r[g] for r in rows], header[1]
    if src.is_dir():
        files, labels = [], []
        for d in sorted(x for x in src.iterdir() if x.is_dir() and not x.name.startswith(".")):
            for f in sorted(d.rglob("*")):
                if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(f)
                    labels.append(d.name)
        if files:
            return files, labels, None, "label"
    raise DataError(f"{src.name}: expected a folder with labels.csv or class folders, or a CSV manifest")


def write_split_manifest(source: str | Path, out: Path, seed: int = SPLIT_SEED) -> Path:
    """Fold 0 of the paper's protocol over `source`, as a manifest at `out` (rewritten only when it
    changes, so the fine-tunes' inputs stay current)."""
    files, raw, groups, column = labeled_files(source)
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
