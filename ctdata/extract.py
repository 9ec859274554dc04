"""Resumable extraction of CT into pretraining shards: DICOM series (any folder layout) and image folders.

`cthub data extract ROOT [ROOT ...] --out DIR --size 256` walks each root, groups the DICOM files by
SeriesInstanceUID (a folder may hold several series, as TCIA and challenge downloads do; one series may span
folders), reads each series through `ctdata.series` (sorted along the patient axis, any transfer syntax the
readers decode, gantry tilt and uneven gaps included), maps it with the configured intensity mapping (default
the paper's -1024..3071 HU interval) and stores uint8 slices at `size` (256 by default: room for the
recipes' random crops to 224). Folders of already-windowed images (PNG/JPEG/TIFF, such as a head CT export)
are one unit each and go through the same per-image path as the fine-tuning datasets. A unit is listed in
the manifest only once its shard is on disk, so re-running resumes; its key is a hash, never a UID or path.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ctdata.datasets import image_to_storage
from ctdata.dicom import DicomPolicy, is_dicom
from ctdata.preprocess import PreprocessConfig, intensities_to_unit, resize_unit, unit_to_uint8
from ctdata.series import read_series
from ctdata.shards import ShardWriter, unit_key
from cthub.errors import CTHubError, DataError

log = logging.getLogger(__name__)

IMAGE_FILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass(frozen=True)
class ExtractUnit:
    """One unit of work: a DICOM series (its files, wherever they lie under the root) or one folder of image
    files. `key` is a hash of the root's name and the series UID or folder: nothing identifying is stored."""

    key: str
    kind: str  # "series" | "images"
    files: tuple[Path, ...]


def find_units(root: str | Path) -> list[ExtractUnit]:
    """The units under `root`, in the order of their first file: DICOM files grouped by SeriesInstanceUID
    (files whose header gives none form one series per folder), then each folder of image files."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root.name}: not a folder")
    series: dict[str, list[Path]] = {}
    folders: dict[Path, list[Path]] = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if f.name == "DICOMDIR":
            continue
        if _is_dicom_file(f):
            uid = _series_uid(f) or f"folder:{f.parent.relative_to(root).as_posix()}"
            series.setdefault(uid, []).append(f)
        elif f.suffix.lower() in IMAGE_FILE_SUFFIXES:
            folders.setdefault(f.parent, []).append(f)
    units = [ExtractUnit(unit_key(f"{root.name}|series|{k}"), "series", tuple(v)) for k, v in series.items()]
    units += [
        ExtractUnit(unit_key(f"{root.name}|images|{d.relative_to(root).as_posix()}"), "images", tuple(v))
        for d, v in folders.items()
    ]
    return units


def unit_images(
    unit: ExtractUnit, cfg: PreprocessConfig, size: int, policy: DicomPolicy
) -> tuple[np.ndarray, list[str]]:
    """A unit's slices as uint8 [n,size,size] through the shared preprocessing path, and its warnings."""
    if unit.kind == "images":
        return np.stack([image_to_storage(f, cfg, size) for f in unit.files]), []
    s = read_series([f.read_bytes() for f in unit.files], policy=policy)
    px = torch.from_numpy(intensities_to_unit(s.pixels, s.is_hu, cfg))
    chunks = [unit_to_uint8(resize_unit(px[i : i + 64, None], size))[:, 0] for i in range(0, len(px), 64)]
    return np.concatenate(chunks), s.warnings


def extract_series(
    roots: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    size: int = 256,
    preprocessing: PreprocessConfig | None = None,
    policy: DicomPolicy | None = None,
    progress: bool = True,
    limit: int | None = None,
) -> dict[str, int]:
    """Extract every CT series and image folder under `roots` into uint8 shards at `size` (resumable).

    Returns counts: `units` found (series + image folders, after `limit`), `done_before` (finished by an
    earlier run), `written`, `skipped` (not CT, unreadable, mixed sizes: each logged with its reason, never
    its path) and `slices` written. Series that are not CT (LIDC also holds chest X-rays) are skipped.
    """
    cfg = preprocessing or PreprocessConfig()
    pol = policy or DicomPolicy(modality="reject")
    root_list = [roots] if isinstance(roots, (str, Path)) else list(roots)
    units = [u for r in root_list for u in find_units(r)][:limit]
    writer = ShardWriter(out, size, cfg.to_dict())
    stats = {"units": len(units), "done_before": 0, "written": 0, "skipped": 0, "slices": 0}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(units), desc="extract", unit="unit")
    for n, unit in enumerate(units, 1):
        if unit.key in writer.done:
            stats["done_before"] += 1
        else:
            try:
                images, warns = unit_images(unit, cfg, size, pol)
                writer.write(unit.key, images, warns)
                stats["written"] += 1
                stats["slices"] += len(images)
            except CTHubError as e:
                stats["skipped"] += 1
                log.warning("unit %d (%s) skipped: %s", n, unit.kind, e)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(slices=stats["slices"], skipped=stats["skipped"])
    if bar is not None:
        bar.close()
    return stats


def _is_dicom_file(path: Path) -> bool:
    """A Part 10 file by its marker ('DICM' at byte 128), whatever its name says."""
    try:
        with path.open("rb") as fh:
            return is_dicom(fh.read(132))
    except OSError:
        return False


def _series_uid(path: Path) -> str | None:
    """SeriesInstanceUID from the header alone (pixels not read); None when the header cannot be read."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
    except Exception:  # noqa: BLE001 - pydicom raises many types on a corrupt header; read_series reports it
        return None
    uid = ds.get("SeriesInstanceUID")
    return str(uid) if uid else None
