"""Series sorting (folder / zip), shard extraction (LIDC layout and real multi-source CT, resumable),
MedMNIST fetch (offline, --path)."""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import shared_file

from ctdata import PreprocessConfig, load_unlabeled
from ctdata.datasets import image_to_storage
from ctdata.extract import extract_series, find_units
from ctdata.fetch import fetch_medmnist, md5sum, medmnist_file
from ctdata.series import read_series
from ctdata.shards import ShardWriter, open_shards, read_manifest
from cthub.errors import DataError, InputError, IntegrityError


def _slice(ct_small: Path, z: float, inst: int, series: str = "1.2.3.4.5", modality: str = "CT") -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(ct_small)
    ds.ImagePositionPatient = [-158.0, -179.0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.InstanceNumber, ds.SeriesInstanceUID, ds.Modality = inst, series, modality
    ds.PixelData = (ds.pixel_array + int(z)).astype(np.int16).tobytes()  # each slice recognisable by z
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _series_dir(root: Path, ct_small: Path, zs: list[float], **kw) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, z in enumerate(zs):  # file names in the reverse of anatomical order
        (root / f"{len(zs) - i:04d}.dcm").write_bytes(_slice(ct_small, z, inst=i + 1, **kw))
    return root


def test_series_sorted_by_position_folder_and_zip(tmp_path: Path, ct_small_dcm: Path) -> None:
    zs = [30.0, -10.0, 50.0, 10.0]
    d = _series_dir(tmp_path / "s", ct_small_dcm, zs)
    (d / "DICOMDIR").write_bytes(b"x")
    (d / "readme.txt").write_text("exported")
    s = read_series(d)
    assert s.pixels.shape == (4, 128, 128) and s.is_hu and s.skipped == 1
    assert s.positions == sorted(zs)
    base = read_series([_slice(ct_small_dcm, 0.0, 1)]).pixels[0]
    for k, z in enumerate(sorted(zs)):
        np.testing.assert_array_equal(s.pixels[k], base + z)
    zf = tmp_path / "s.zip"
    with zipfile.ZipFile(zf, "w") as z:
        for f in sorted(d.iterdir()):
            z.write(f, f"export/{f.name}")
    np.testing.assert_array_equal(read_series(zf).pixels, s.pixels)


def test_series_falls_back_to_instance_number_and_rejects_mixtures(
    tmp_path: Path, ct_small_dcm: Path
) -> None:
    blobs = []
    for inst in (3, 1, 2):
        ds = pydicom.dcmread(io.BytesIO(_slice(ct_small_dcm, float(inst), inst)))
        del ds.ImagePositionPatient
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        blobs.append(buf.getvalue())
    s = read_series(blobs)
    assert s.positions == [None] * 3
    assert [float(np.median(p - s.pixels[0])) for p in s.pixels] == [0.0, 1.0, 2.0]
    with pytest.raises(InputError, match="2 different series"):
        read_series([_slice(ct_small_dcm, 0, 1, "1.2.3"), _slice(ct_small_dcm, 1, 2, "1.2.4")])
    with pytest.raises(InputError):
        read_series(tmp_path)  # empty folder


def test_extract_lidc_layout_resumable(tmp_path: Path, ct_small_dcm: Path) -> None:
    root = tmp_path / "LIDC-IDRI"
    _series_dir(root / "LIDC-IDRI-0001" / "study1" / "series1", ct_small_dcm, [0, 2, 4], series="1.1")
    _series_dir(root / "LIDC-IDRI-0001" / "study2" / "xray", ct_small_dcm, [0], series="1.2", modality="DX")
    _series_dir(root / "LIDC-IDRI-0002" / "study1" / "series1", ct_small_dcm, [5, 1], series="2.1")
    out = tmp_path / "shards"
    stats = extract_series(root, out, size=32, progress=False, limit=1)
    assert stats["written"] == 1 and stats["slices"] == 3
    stats = extract_series(root, out, size=32, progress=False)  # resume: the first series is not redone
    assert stats == {"units": 3, "done_before": 1, "written": 1, "skipped": 1, "slices": 2}
    shards = open_shards(out)
    assert len(shards) == 5 and shards[0].shape == (32, 32) and shards[0].dtype == np.uint8
    assert isinstance(shards.arrays[0], np.memmap)
    assert shards.preprocessing["mapping"] == "interval"
    assert all("LIDC" not in json.dumps(e) for e in read_manifest(out))  # no patient ids stored
    arr = shards.to_array()
    assert arr.shape == (5, 32, 32) and (arr[1].astype(int) - arr[0]).mean() > 0  # sorted by z: brighter
    np.testing.assert_array_equal(load_unlabeled(out, None), arr)
    # one path: a shard slice is what the datasets store for that slice file (file names run against z)
    files = sorted((root / "LIDC-IDRI-0001" / "study1" / "series1").iterdir(), reverse=True)
    np.testing.assert_array_equal(arr[:3], [image_to_storage(f, PreprocessConfig(), 32) for f in files])


def _ipp_z(f: Path) -> float:
    ds = pydicom.dcmread(f, stop_before_pixels=True)
    normal = np.cross(np.asarray(ds.ImageOrientationPatient[:3]), np.asarray(ds.ImageOrientationPatient[3:]))
    return float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float)))


@pytest.mark.shared
def test_extract_real_ct_from_every_source_by_series(tmp_path: Path) -> None:
    """Real public CT as downloaded (../shared/data/real_ct: JPEG 2000 and JPEG-LS lossless, several series of
    one patient in one folder, single-slice series of many patients in one folder, a head series with gantry
    tilt) and a folder of head CT PNGs -> one shard unit per series and per image folder, in anatomical order,
    through the same per-image path as the fine-tuning datasets; resumable; nothing identifying stored."""
    real = shared_file("real_ct")
    head = shared_file("head_ct")
    root = tmp_path / "ct"
    picks = {
        "chest": sorted((real / "fnndsc_chest").glob("*.dcm"))[:6],  # one series, file order != anatomy
        "tilt": sorted((real / "ge_head_tilt").iterdir())[:4],
        "contrast": sorted((real / "siim_contrast").glob("*.dcm"))[:3],  # three patients, one folder
    }
    lung = sorted(f for f in (real / "lung_pet_ct_dx").rglob("*.dcm"))
    by_series: dict[str, list[Path]] = {}
    for f in lung:
        by_series.setdefault(str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID), []).append(f)
    assert len(by_series) == 4
    picks["lung"] = [f for fs in by_series.values() for f in fs[:2]]  # 4 series of 2 patients, one folder
    for name, files in picks.items():
        (root / name).mkdir(parents=True)
        for i, f in enumerate(files):
            if f.is_file() and f.name != "LICENSE":
                (root / name / f"{i:02d}-{f.name}").symlink_to(f)
    (root / "png").mkdir()
    for f in sorted(head.glob("*.png"))[:3]:
        (root / "png" / f.name).symlink_to(f)

    units = find_units(root)
    kinds = sorted(u.kind for u in units)
    n_tilt = sum(1 for f in picks["tilt"] if f.is_file() and f.name != "LICENSE")
    assert kinds == ["images"] + ["series"] * (1 + 1 + 3 + 4)
    out = tmp_path / "shards"
    stats = extract_series([root], out, size=64, progress=False)
    assert stats == {
        "units": 10,
        "done_before": 0,
        "written": 10,
        "skipped": 0,
        "slices": 6 + n_tilt + 3 + 8 + 3,
    }
    assert extract_series(root, out, size=64, progress=False)["done_before"] == 10  # resumed: nothing redone
    manifest = json.dumps(read_manifest(out))
    assert "1.3.6" not in manifest and "fnndsc" not in manifest and "TCGA" not in manifest
    # the chest unit: its slices in anatomical order, each what the datasets store for that file
    chest = next(u for u in units if u.files[0].parent.name == "chest")
    shard = open_shards(out).arrays[[u.key for u in units].index(chest.key)]
    order = sorted(chest.files, key=lambda f: _ipp_z(f.resolve()))
    assert order != sorted(chest.files)  # the file names do not give the anatomy
    np.testing.assert_array_equal(shard, [image_to_storage(f, PreprocessConfig(), 64) for f in order])


def test_shard_writer_rejects_other_size(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, 16)
    w.write("a", np.zeros((2, 16, 16), np.uint8))
    w.write("a", np.ones((2, 16, 16), np.uint8))  # already done: ignored
    assert len(open_shards(tmp_path)) == 2 and open_shards(tmp_path)[1].max() == 0
    with pytest.raises(DataError):
        ShardWriter(tmp_path, 32)
    with pytest.raises(DataError):
        w.write("b", np.zeros((2, 8, 8), np.uint8))


def test_fetch_register_path_checks_md5(organamnist_npz: Path, tmp_path: Path) -> None:
    fname, md5 = medmnist_file("organamnist")
    assert fname == "organamnist.npz" and md5 == "68e3f8846a6bd62f0c9bf841c0d9eacc"
    p = fetch_medmnist("organamnist", tmp_path / "data", path=organamnist_npz)
    assert p == tmp_path / "data" / "organamnist.npz" and md5sum(p) == md5
    bad = tmp_path / "bad.npz"
    raw = organamnist_npz.read_bytes()
    bad.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))  # one flipped bit
    with pytest.raises(IntegrityError):
        fetch_medmnist("organamnist", tmp_path / "other", path=bad)
    assert fetch_medmnist("organamnist", tmp_path / "data") == p  # already present: no network


@pytest.mark.timeout(120)  # a hang fails the test instead of blocking the suite
def test_fetch_offline_is_a_fast_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a local port with nothing listening: a real refused connection
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError) as ei:
        fetch_medmnist("organsmnist", tmp_path, url=f"http://127.0.0.1:{port}/x.npz", timeout=2, mirror=False)
    msg = str(ei.value)
    assert "--root" in msg and "--path" in msg and "9ab87b696fb54e2a387ebe992d6ed5f1" in msg
    assert not list(tmp_path.glob("*.npz"))
    with pytest.raises(DataError):
        medmnist_file("organamnist", size=32)


def test_cli_fetch_with_path(
    organamnist_npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cthub.cli import main

    assert (
        main(
            [
                "data",
                "fetch",
                "organamnist",
                "--root",
                str(tmp_path),
                "--path",
                str(organamnist_npz),
                "--symlink",
            ]
        )
        == 0
    )
    assert (tmp_path / "organamnist.npz").is_symlink() and str(tmp_path) in capsys.readouterr().out
