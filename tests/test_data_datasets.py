"""Labeled / unlabeled loaders on real data (OrganAMNIST, head_ct PNGs, pydicom CT files) and the
storage-vs-serving difference."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom.data import get_testdata_file

from ctdata import PreprocessConfig, intensities_to_unit, load_labeled, load_unlabeled, prepare, prepare_batch
from cthub.errors import DataError

CFG = PreprocessConfig(input_size=32, mean=(0.5,), std=(0.25,))


def test_medmnist_npz_splits(organamnist_npz: Path) -> None:
    s = load_labeled(organamnist_npz, preprocessing=CFG, split="val")
    assert s.images.dtype == np.uint8 and s.images.shape == (6491, 28, 28)
    assert s.labels.dtype == np.int64 and set(np.unique(s.labels)) == set(range(11))
    assert s.class_names[0] == "bladder" and len(s.class_names) == 11
    r = load_labeled(organamnist_npz, preprocessing=CFG, split="test", storage_size=32)
    assert r.images.shape == (17778, 32, 32)
    with pytest.raises(DataError):
        load_labeled(organamnist_npz, preprocessing=CFG, split="holdout")


def test_head_ct_labels_csv_layout(head_ct_dir: Path) -> None:
    s = load_labeled(head_ct_dir, preprocessing=CFG, progress=False)
    assert s.images.shape == (200, 32, 32) and s.images.dtype == np.uint8
    assert s.class_names == ["no hemorrhage", "hemorrhage"]
    assert s.labels[:100].tolist() == [1] * 100 and s.labels[100:].tolist() == [0] * 100
    assert s.groups is None and s.images.std() > 10  # real content, not blank


def _head_subset(head_ct_dir: Path, tmp: Path, n: int = 6) -> list[Path]:
    files = sorted(head_ct_dir.glob("*.png"))
    return [files[i] for i in np.linspace(0, len(files) - 1, n).astype(int)]


def test_class_folders_and_manifest_with_groups(head_ct_dir: Path, tmp_path: Path) -> None:
    picks = _head_subset(head_ct_dir, tmp_path)
    for f in picks:
        cls = "bleed" if int(f.stem) < 100 else "normal"
        (tmp_path / "folders" / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, tmp_path / "folders" / cls / f.name)
    s = load_labeled(tmp_path / "folders", preprocessing=CFG)
    assert s.class_names == ["bleed", "normal"] and np.bincount(s.labels).tolist() == [3, 3]
    rows = ["path,label,group"] + [
        f"{f},{'bleed' if int(f.stem) < 100 else 'normal'},p{i // 2}" for i, f in enumerate(picks)
    ]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    m = load_labeled(tmp_path / "m.csv", preprocessing=CFG)
    assert m.class_names == s.class_names and m.groups.tolist() == ["p0", "p0", "p1", "p1", "p2", "p2"]
    np.testing.assert_array_equal(np.sort(m.images.reshape(6, -1), 0), np.sort(s.images.reshape(6, -1), 0))


def _dicoms(tmp: Path) -> list[Path]:
    names = ["CT_small.dcm", "693_J2KR.dcm", "693_UNCI.dcm", "eCT_Supplemental.dcm"]
    paths = [get_testdata_file(n, download=False) for n in names]
    if any(p is None for p in paths):
        pytest.skip("needs pydicom-data")
    out = []
    for i, p in enumerate(paths):
        out.append(tmp / f"{i:03d}.dcm")
        shutil.copy(p, out[-1])
    return out


def test_dicom_plus_csv_and_storage_quantization_bound(tmp_path: Path) -> None:
    """The documented difference: uint8 storage vs serving's float path, <= 0.5/255 in unit scale."""
    files = _dicoms(tmp_path)
    rows = "".join(f"{i}, {i % 2}\n" for i in range(len(files)))
    (tmp_path / "labels.csv").write_text("id, finding\n" + rows)
    for cfg in (
        PreprocessConfig(input_size=64),
        PreprocessConfig.for_window("brain", input_size=64),
        PreprocessConfig(mapping="minmax", input_size=64, in_chans=1, std=(0.2,)),
    ):
        s = load_labeled(tmp_path, preprocessing=cfg)
        assert s.labels.tolist() == [0, 1, 0, 1] and s.class_names == ["no finding", "finding"]
        stored = prepare_batch(s.images, cfg)
        served = torch.stack([prepare(f, cfg) for f in files])
        diff = (stored - served).abs().max().item() * min(cfg.std)
        assert diff <= 0.5 / 255 + 1e-6, (cfg.mapping, diff)
        assert served.std() > 0.1  # the images are not blank under this mapping


def test_bad_file_is_a_data_error_or_skipped(tmp_path: Path) -> None:
    files = _dicoms(tmp_path)
    files[1].write_bytes(files[1].read_bytes()[:5000])  # truncated
    (tmp_path / "labels.csv").write_text("id,label\n" + "".join(f"{i},{i % 2}\n" for i in range(4)))
    with pytest.raises(DataError, match="item 2 of 4"):
        load_labeled(tmp_path, preprocessing=CFG)
    s = load_labeled(tmp_path, preprocessing=CFG, on_error="skip")
    assert len(s) == 3 and s.labels.tolist() == [0, 0, 1]
    with pytest.raises(DataError):
        load_labeled(tmp_path / "nope", preprocessing=CFG)


def test_load_unlabeled_sources(organamnist_npz: Path, tmp_path: Path) -> None:
    u = load_unlabeled(organamnist_npz, None)
    assert u.shape == (34561, 28, 28) and u.dtype == np.uint8
    files = _dicoms(tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")
    imgs = load_unlabeled(tmp_path, 48)
    assert imgs.shape == (len(files), 48, 48) and imgs.dtype == np.uint8


def test_manifest_split_column_and_missing_splits(head_ct_dir: Path, tmp_path: Path) -> None:
    picks = _head_subset(head_ct_dir, tmp_path, n=5)
    splits = ["train", "train", "val", "test", "train"]
    rows = ["path,label,patient,split"] + [
        f"{f},{int(int(f.stem) < 100)},pt{i},{sp}"
        for i, (f, sp) in enumerate(zip(picks, splits, strict=True))
    ]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    tr = load_labeled(tmp_path / "m.csv", preprocessing=CFG)
    assert len(tr) == 3 and tr.groups.tolist() == ["pt0", "pt1", "pt4"]
    assert len(load_labeled(tmp_path / "m.csv", preprocessing=CFG, split="val")) == 1
    assert len(load_labeled(tmp_path / "m.csv", preprocessing=CFG, split="all")) == 5
    (tmp_path / "n.csv").write_text("path,label\n" + f"{picks[0]},1\n")
    with pytest.raises(DataError, match="no predefined 'val'"):
        load_labeled(tmp_path / "n.csv", preprocessing=CFG, split="val")
    (tmp_path / "r.csv").write_text("path,label\n" + f"{picks[0]}\n")
    with pytest.raises(DataError, match="line 2"):
        load_labeled(tmp_path / "r.csv", preprocessing=CFG)


def test_nearly_black_picture_stays_nearly_black(tmp_path: Path) -> None:
    """Pictures are grey 0..255 whatever their content: one whose brightest pixel is 1 is not stretched to
    white, served (`prepare`) or stored (datasets, shards): all go through `intensities_to_unit`."""
    from PIL import Image

    grey = np.zeros((40, 40), np.uint8)
    grey[10:30, 10:30] = 1
    Image.fromarray(grey).save(tmp_path / "dark.png")
    cfg = PreprocessConfig(input_size=40, in_chans=1, mean=(0.0,), std=(1.0,))
    served = prepare(tmp_path / "dark.png", cfg)
    assert float(served.max()) == pytest.approx(1 / 255, abs=1e-6)
    assert load_unlabeled(tmp_path, 40, preprocessing=cfg, progress=False).max() == 1
    np.testing.assert_array_equal(intensities_to_unit(np.array([[0.0, 255.0]]), False, cfg), [[0.0, 1.0]])
    assert float(prepare(grey, cfg).max()) == pytest.approx(1 / 255, abs=1e-6)  # uint8 array: by dtype


def test_ctdata_modules_import_without_cycles() -> None:
    """The ctdata modules form layers (preprocess < dicom/io/series < shards < datasets): no import cycle,
    counting imports inside functions too."""
    import ast

    pkg = Path(__file__).resolve().parents[1] / "ctdata"
    names = {f.stem for f in pkg.glob("*.py")} - {"__init__"}
    deps: dict[str, set[str]] = {}
    for n in names:
        tree = ast.parse((pkg / f"{n}.py").read_text())
        mods = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        deps[n] = {m.removeprefix("ctdata.") for m in mods if m.removeprefix("ctdata.") in names} - {n}

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        return any(d == target or (d not in seen and reaches(d, target, seen | {d})) for d in deps[start])

    assert [n for n in sorted(names) if reaches(n, n, set())] == []


def _grey_histogram_distance(a: np.ndarray, b: np.ndarray) -> float:
    """1-D Wasserstein distance between two sets of 0..255 grey levels (difference of their CDFs)."""
    bins = np.arange(257)
    ca = np.cumsum(np.histogram(a, bins)[0]) / a.size
    cb = np.cumsum(np.histogram(b, bins)[0]) / b.size
    return float(np.abs(ca - cb).sum())


def test_organamnist_mapping_reproduces_its_grey_levels_from_a_real_abdominal_ct(
    organamnist_npz: Path,
) -> None:
    """MedMNIST made OrganAMNIST's grey levels from HU with an abdominal window: a real abdominal CT slice
    (pydicom's pancreas CT) mapped by the recorded config looks like the training images; the interval
    mapping (-1024..3071 HU) squeezes soft tissue into a narrow dark band the model never saw."""
    from ctdata import load_image, source_preprocessing, to_unit

    pp = source_preprocessing(organamnist_npz)
    assert pp is not None and pp.mapping == "window" and pp.window == "abdomen"
    assert source_preprocessing("organamnist_64.npz") == pp and source_preprocessing("head_ct") is None
    encoder_pp = PreprocessConfig(mean=(0.3,), std=(0.2,), input_size=64)  # a pretrained encoder's own
    clf_pp = encoder_pp.with_intensity_of(pp)  # what fine-tuning records: the data's HU mapping
    assert (clf_pp.mean, clf_pp.input_size, clf_pp.mapping, clf_pp.window) == (
        (0.3,),
        64,
        "window",
        "abdomen",
    )
    train = np.load(organamnist_npz)["train_images"][:4000]
    slice_ = load_image(get_testdata_file("explicit_VR-UN.dcm"))  # BodyPartExamined PANCREAS, 512x512 CT
    assert slice_.is_hu
    h, w = slice_.pixels.shape[-2:]

    def centre(cfg: PreprocessConfig) -> np.ndarray:  # the body, without the air around it
        return (to_unit(slice_, cfg) * 255)[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4]

    served = _grey_histogram_distance(centre(pp), train)
    interval = _grey_histogram_distance(centre(PreprocessConfig()), train)
    # measured: 10 (abdominal window) vs 69 (interval) grey levels
    assert served < 20 and interval > 3 * served
