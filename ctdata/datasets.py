"""Labeled and unlabeled image sets as uint8 arrays (already mapped to 0..255), ready for `prepare_batch`.

Storage path for every file-based source (image folder, CSV manifest, head_ct layout, DICOM + CSV):

    load_image(file) -> to_unit(image, cfg) -> resize_unit(., storage_size) -> unit_to_uint8

Serving runs `load_image -> to_unit -> finalize` (which calls the same `resize_unit`). The one deliberate
difference is the uint8 storage quantization: a stored pixel differs from the float path by at most
0.5/255 in the unit interval (0.5/255/std after normalization). `tests/test_data_datasets.py` measures it.
When `storage_size` differs from the model's `input_size`, `finalize` resizes a second time at batch time.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from ctdata.io import load_image
from ctdata.preprocess import PreprocessConfig, resize_unit, to_unit, unit_to_uint8
from ctdata.shards import is_shard_dir, open_shards
from cthub.errors import CTHubError, DataError

log = logging.getLogger(__name__)

ORGANAMNIST_LABELS: list[str] = [
    "bladder",
    "femur-left",
    "femur-right",
    "heart",
    "kidney-left",
    "kidney-right",
    "liver",
    "lung-left",
    "lung-right",
    "pancreas",
    "spleen",
]
# How a known dataset's grey levels were made from HU. MedMNIST v2 on Organ{A,C,S}MNIST: "Hounsfield-Unit (HU)
# of the 3D images are transformed into gray-scale with an abdominal window"; the window's values are not
# published, so the abdomen preset (W400/L40) stands for it, checked on data: a real abdominal CT slice mapped
# with it has a grey-level histogram close to the training images' (tests/test_data_datasets.py).
SOURCE_WINDOWS: dict[str, str] = {name: "abdomen" for name in ("organamnist", "organcmnist", "organsmnist")}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom", "")


@dataclass
class ArraySplit:
    """Images [N,H,W] uint8, integer labels [N] (or None for unlabeled), optional groups (patient ids)."""

    images: np.ndarray
    labels: np.ndarray | None
    groups: np.ndarray | None = None
    class_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: np.ndarray) -> ArraySplit:
        return ArraySplit(
            self.images[idx],
            None if self.labels is None else self.labels[idx],
            None if self.groups is None else self.groups[idx],
            self.class_names,
        )


def source_preprocessing(source: str | Path, **kw: Any) -> PreprocessConfig | None:
    """The HU -> grey mapping that made a known dataset's images (`organamnist.npz`, `organamnist_64.npz`...),
    as a PreprocessConfig (other fields from `kw`); None when the source is not one of SOURCE_WINDOWS."""
    window = SOURCE_WINDOWS.get(Path(source).stem.lower().split("_")[0])
    return None if window is None else PreprocessConfig.for_window(window, **kw)


def load_medmnist(path: str | Path, split: str, class_names: list[str] | None = None) -> ArraySplit:
    """One split ('train', 'val', 'test') of a MedMNIST npz (2-D variants, any size)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"MedMNIST file not found: {p}")
    try:
        with np.load(p) as z:
            key = f"{split}_images"
            if key not in z:
                raise DataError(f"{p.name} has no split {split!r} (keys: {sorted(z.files)})")
            images = np.asarray(z[key])
            labels = np.asarray(z[f"{split}_labels"])
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{p.name} is not a readable MedMNIST npz ({type(e).__name__})") from None
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise DataError(f"{p.name} is multi-label ({labels.shape[1]} labels per image); not supported here")
    labels = labels.reshape(-1).astype(np.int64)
    if images.ndim == 4 and images.shape[-1] == 3:  # colour variants: to grey
        images = images.mean(axis=-1).round().astype(np.uint8)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{p.name}: expected uint8 [N,H,W] images, got {images.dtype} {images.shape}")
    default = ORGANAMNIST_LABELS if "organ" in p.name else [str(i) for i in range(labels.max() + 1)]
    names = class_names or default
    return ArraySplit(images, labels, None, names)


def resize_uint8(images: np.ndarray, size: int | None, batch: int = 256) -> np.ndarray:
    """Resize stored uint8 [N,H,W] with the pipeline's `resize_unit` (no-op when already that size)."""
    if size is None or images.shape[-2:] == (size, size):
        return images
    out = np.empty((len(images), size, size), dtype=np.uint8)
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch]))[:, None].float() / 255.0
        out[i : i + batch] = unit_to_uint8(resize_unit(x, size))[:, 0]
    return out


def image_to_storage(source: Any, cfg: PreprocessConfig, size: int) -> np.ndarray:
    """One file (path/bytes) -> uint8 [size,size] through load_image -> to_unit -> resize_unit."""

    unit = to_unit(load_image(source), cfg)
    x = torch.from_numpy(np.ascontiguousarray(unit, dtype=np.float32))[None, None]
    return unit_to_uint8(resize_unit(x, size))[0, 0]


def _progress(items: list, desc: str, progress: bool) -> Iterable:
    if not progress or len(items) < 20:
        return items

    return tqdm(items, desc=desc, unit="img", leave=False)


def _load_files(
    files: list[Path], cfg: PreprocessConfig, size: int, *, on_error: str, progress: bool, desc: str
) -> tuple[np.ndarray, np.ndarray]:
    """Files -> (uint8 [N,size,size], indices kept). on_error: 'raise' or 'skip' (counted in a log line)."""
    out = np.empty((len(files), size, size), dtype=np.uint8)
    keep: list[int] = []
    for i, f in enumerate(_progress(files, desc, progress)):
        try:
            out[len(keep)] = image_to_storage(f, cfg, size)
        except CTHubError as e:
            if on_error != "skip":
                kind = f"{f.suffix or 'no suffix'} file"
                raise DataError(f"item {i + 1} of {len(files)} ({kind}): {e}") from None
            continue
        keep.append(i)
    if len(keep) < len(files):
        log.warning("skipped %d of %d unreadable images", len(files) - len(keep), len(files))
    return out[: len(keep)], np.asarray(keep, dtype=np.int64)


def _label_ids(raw: list[str], column: str, class_names: list[str] | None) -> tuple[np.ndarray, list[str]]:
    """Labels as strings -> int64 ids and class names. Integer labels keep their values."""
    vals = [r.strip() for r in raw]
    if class_names and all(v in class_names for v in vals):
        return np.asarray([class_names.index(v) for v in vals], dtype=np.int64), list(class_names)
    try:
        ids = np.asarray([int(float(v)) for v in vals], dtype=np.int64)
    except ValueError:
        names = sorted(set(vals))
        return np.asarray([names.index(v) for v in vals], dtype=np.int64), names
    if ids.size and ids.min() < 0:
        raise DataError(f"negative label in column {column!r}")
    k = int(ids.max()) + 1 if ids.size else 0
    if class_names:
        if len(class_names) < k:
            raise DataError(f"{k} label values but only {len(class_names)} class names")
        return ids, list(class_names)
    names = [f"no {column}", column] if k <= 2 and column else [str(i) for i in range(k)]
    return ids, names


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = [r for r in csv.reader(fh) if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read {path.name} ({type(e).__name__})") from None
    if len(rows) < 2:
        raise DataError(f"{path.name} has no data rows")
    header = [h.strip().lower() for h in rows[0]]
    for n, r in enumerate(rows[1:], start=2):
        if len(r) < len(header):
            raise DataError(f"{path.name} line {n} has {len(r)} columns, the header has {len(header)}")
    return header, [[c.strip() for c in r] for r in rows[1:]]


def _find_by_stem(folder: Path, ident: str, index: dict[str, Path]) -> Path:
    """An id from labels.csv -> the file with that stem ('0' also matches '000.png'; an id written as a
    file name, 'x.dcm', matches by its stem)."""
    named = Path(ident)
    if named.suffix.lower() in IMAGE_SUFFIXES and named.stem in index:
        return index[named.stem]
    for key in (ident, ident.zfill(3), ident.zfill(4), ident.zfill(5)):
        if key in index:
            return index[key]
    if ident.isdigit() and str(int(ident)) in index:
        return index[str(int(ident))]
    raise DataError(f"labels.csv id on row with value of length {len(ident)} matches no image file")


class LabeledFiles(NamedTuple):
    """The files of a labeled source, before any pixel is read: paths, raw labels, groups (patients) or
    None, the label column's name ('' for class folders) and, for class folders, every class name."""

    files: list[Path]
    labels: list[str]
    groups: list[str] | None
    column: str
    class_names: list[str] | None = None


def labeled_files(source: str | Path, split: str = "train") -> LabeledFiles:
    """The files, labels and groups of a CSV manifest, a folder with labels.csv or a folder of class
    folders (the rows of `split` where the table has a 'split' column), as `load_labeled` reads them."""
    src = Path(source)
    if src.is_file() and src.suffix.lower() in (".csv", ".tsv"):
        return _manifest_files(src, split)
    if src.is_dir() and (src / "labels.csv").is_file():
        return _labels_csv_files(src, split)
    if src.is_dir() and any(d.is_dir() for d in src.iterdir()):
        return _class_folder_files(src, split)
    raise DataError(f"{src.name}: expected a folder with labels.csv or class folders, or a CSV manifest")


def _labels_csv_files(folder: Path, split: str) -> LabeledFiles:
    header, rows = _read_csv(folder / "labels.csv")
    rows = _select_split(header, rows, split, "labels.csv")
    if len(header) < 2:
        raise DataError("labels.csv needs at least two columns: id, label")
    index = {
        p.stem: p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and p.name != "labels.csv"
    }
    files = [_find_by_stem(folder, r[0], index) for r in rows]
    gcol = _group_column(header)
    groups = [r[gcol] for r in rows] if gcol is not None else None
    return LabeledFiles(files, [r[1] for r in rows], groups, header[1])


def _from_labels_csv(folder: Path, cfg: PreprocessConfig, size: int, opts: dict) -> ArraySplit:
    f = _labels_csv_files(folder, opts.get("split", "train"))
    return _build(f.files, f.labels, f.column, f.groups, cfg, size, opts)


def _group_column(header: list[str], label_col: int = 1) -> int | None:
    """A named group column (group, patient, patient_id, subject), else the first extra one (not 'split')."""
    for i, h in enumerate(header):
        if h in ("group", "patient", "patient_id", "patientid", "subject"):
            return i
    extra = [i for i, h in enumerate(header) if i > label_col and h not in ("split", "path", "label")]
    return extra[0] if extra else None


def _select_split(header: list[str], rows: list[list[str]], split: str, name: str) -> list[list[str]]:
    """Rows of one split: a 'split' column filters them; without it only 'train'/'all' (everything) exist."""
    if "split" in header:
        col = header.index("split")
        chosen = rows if split == "all" else [r for r in rows if r[col].lower() == split.lower()]
        if not chosen:
            raise DataError(f"{name} has no rows with split {split!r}")
        return chosen
    if split not in ("train", "all"):
        raise DataError(f"{name} has no predefined {split!r} split (add a 'split' column, or use 'all')")
    return rows


def _manifest_files(path: Path, split: str) -> LabeledFiles:
    header, rows = _read_csv(path)
    rows = _select_split(header, rows, split, path.name)
    pcol = header.index("path") if "path" in header else 0
    lcol = header.index("label") if "label" in header else 1
    gcol = _group_column(header, max(pcol, lcol))
    if len(header) < 2:
        raise DataError(f"{path.name}: a manifest needs columns path,label[,group]")
    files = [
        (path.parent / r[pcol]).resolve() if not Path(r[pcol]).is_absolute() else Path(r[pcol]) for r in rows
    ]
    groups = [r[gcol] for r in rows] if gcol is not None else None
    return LabeledFiles(files, [r[lcol] for r in rows], groups, header[lcol])


def _from_manifest(path: Path, cfg: PreprocessConfig, size: int, opts: dict) -> ArraySplit:
    f = _manifest_files(path, opts.get("split", "train"))
    return _build(f.files, f.labels, f.column, f.groups, cfg, size, opts)


def _class_folder_files(folder: Path, split: str) -> LabeledFiles:
    _select_split([], [], split, folder.name)
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    files, labels = [], []
    for c in classes:
        for f in sorted((folder / c).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."):
                files.append(f)
                labels.append(c)
    if not files:
        raise DataError(f"{folder.name}: no images in its class subfolders")
    return LabeledFiles(files, labels, None, "", classes)


def _from_class_folders(folder: Path, cfg: PreprocessConfig, size: int, opts: dict) -> ArraySplit:
    f = _class_folder_files(folder, opts.get("split", "train"))
    opts = {**opts, "class_names": opts.get("class_names") or f.class_names}
    return _build(f.files, f.labels, f.column, None, cfg, size, opts)


def _build(
    files: list[Path],
    raw_labels: list[str],
    column: str,
    groups: list[str] | None,
    cfg: PreprocessConfig,
    size: int,
    opts: dict,
) -> ArraySplit:
    ids, names = _label_ids(raw_labels, column, opts.get("class_names"))
    images, keep = _load_files(
        files,
        cfg,
        size,
        on_error=opts.get("on_error", "raise"),
        progress=opts.get("progress", True),
        desc="loading images",
    )
    g = None if groups is None else np.asarray(groups, dtype=object)[keep].astype(str)
    return ArraySplit(images, ids[keep], g, names)


def load_labeled(
    source: str | Path,
    *,
    preprocessing: PreprocessConfig,
    storage_size: int | None = None,
    split: str = "train",
    **opts: Any,
) -> ArraySplit:
    """A labeled set as uint8 [N,S,S] + int64 labels (+ groups), dispatching on the source.

    - MedMNIST `.npz`: the `split` ('train'/'val'/'test'); kept at native size unless `storage_size` is
      given (already mapped uint8; `finalize` resizes at batch time with the same `resize_unit`).
    - CSV manifest file: columns path,label[,group]; paths relative to the CSV. DICOM paths work too.
    - folder with `labels.csv` (first column an id matching file stems, e.g. head_ct `id, hemorrhage`).
    - folder with one subfolder per class.
    Options: class_names (list), on_error ('raise' | 'skip'), progress (bool). `split`: the npz split, or
    the rows of a CSV whose 'split' column equals it; other sources only have 'train' (= 'all', everything).
    Files are stored at `storage_size` (default `preprocessing.input_size`), see the module docstring.
    """
    src = Path(source)
    if src.is_file() and src.suffix == ".npz":
        s = load_medmnist(src, split, opts.get("class_names"))
        return ArraySplit(resize_uint8(s.images, storage_size), s.labels, s.groups, s.class_names)
    size = storage_size or preprocessing.input_size
    opts = {**opts, "split": split}
    if src.is_file() and src.suffix.lower() in (".csv", ".tsv"):
        return _from_manifest(src, preprocessing, size, opts)
    if src.is_dir():
        if (src / "labels.csv").is_file():
            return _from_labels_csv(src, preprocessing, size, opts)
        if any(d.is_dir() for d in src.iterdir()):
            return _from_class_folders(src, preprocessing, size, opts)
        raise DataError(f"{src.name}: a folder needs labels.csv or one subfolder per class")
    raise DataError(
        f"dataset source not found or not supported: {src.name} (expected .npz, .csv, or a folder)"
    )


def load_unlabeled(
    source: str | Path,
    storage_size: int | None = None,
    *,
    preprocessing: PreprocessConfig | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Pretraining images uint8 [N,H,W]: MedMNIST npz (train split), a shard directory, or an image folder.

    npz and shards keep their stored size unless `storage_size` is given; an image folder is stored at
    `storage_size` (default `preprocessing.input_size`) via the same path as `load_labeled`.
    """
    src = Path(source)
    if src.is_file() and src.suffix == ".npz":
        return resize_uint8(load_medmnist(src, "train").images, storage_size)
    if src.is_dir() and is_shard_dir(src):
        return resize_uint8(open_shards(src).to_array(), storage_size)
    if src.is_dir():
        cfg = preprocessing or PreprocessConfig()
        files = sorted(
            f
            for f in src.rglob("*")
            if f.is_file()
            and not f.name.startswith(".")
            and f.suffix.lower() in IMAGE_SUFFIXES
            and f.name != "labels.csv"
        )
        if not files:
            raise DataError(f"{src.name}: no images found")
        images, _ = _load_files(
            files,
            cfg,
            storage_size or cfg.input_size,
            on_error="skip",
            progress=progress,
            desc="loading images",
        )
        return images
    raise DataError(f"unlabeled source not found or not supported: {src.name}")
