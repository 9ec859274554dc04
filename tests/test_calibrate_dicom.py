"""`cthub calibrate` on a DICOM+CSV local set of real CT: the SIIM contrast slices (real_ct/siim_contrast,
JPEG-LS DICOM in HU, labels.csv id,label,patient). A small contrast / no-contrast classifier is fine-tuned
(random init, 32 px, mediastinal window) on the slices of half of the patients; the other half is the
site's set, handed over as DICOM files + labels.csv, read in HU through the model's own window.

What a test this short can hold: the command reads the DICOM+CSV set, writes the new version beside the old
one, and its ECE figures are those of the site's slices. Measured (2026-12-07): the 2-epoch model is near
chance on the other patients (Youden: sensitivity 0.6, specificity 0.4 on 55 slices) and overconfident
(its validation T 0.097), so the site's T reaches its bound (1000: flat probabilities) and the
cross-validated ECE (T fitted on 4/5 of the set, measured on the held-out 1/5) drops 0.195 -> 0.064. That is
the recalibration removing false confidence, not a better classifier; tests/test_calibration.py holds the
held-out ECE on a larger shifted set."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import shared_file

from ctdata.labeled import kfold_pool, load_splits
from ctdata.preprocess import PreprocessConfig
from cthub.cli import main as cthub_main
from finetune import FinetuneConfig, fit, save_classifier
from finetune.calibration import reliability, scaled_probs
from finetune.train import predict_logits
from hub.config import ModelConfig
from hub.io import load_dir

pytestmark = [pytest.mark.shared, pytest.mark.slow]

SIZE = 32
RECIPE = {"image_size": SIZE, "epochs": 2, "head_epochs": 1, "backbone_lr_ratio": 1.0, "lr": 1e-3}


def dicom_csv_set(siim: Path, rows: list[dict[str, str]], folder: Path) -> Path:
    """A DICOM+CSV folder (labels.csv id,label,patient and the DICOM files, linked, not copied)."""
    folder.mkdir(parents=True)
    with (folder / "labels.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "label", "patient"])
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in ("id", "label", "patient")})
            (folder / r["id"]).symlink_to(siim / r["id"])
    return folder


def digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


def test_calibrate_on_a_dicom_csv_set_of_other_patients_writes_a_new_version(
    tmp_path: Path, capsys: Any
) -> None:
    siim = shared_file("real_ct", "siim_contrast")
    with (siim / "labels.csv").open() as f:
        rows = list(csv.DictReader(f))
    patients = sorted({r["patient"] for r in rows})
    own, site = set(patients[0::2]), set(patients[1::2])  # no patient in both
    pp = PreprocessConfig.for_window("mediastinum", input_size=SIZE)
    mine = kfold_pool(
        load_splits(dicom_csv_set(siim, [r for r in rows if r["patient"] in own], tmp_path / "a"), pp, SIZE)
    )
    idx = np.random.default_rng(0).permutation(len(mine))
    thirds = np.array_split(idx, 3)
    train, val, test = (mine.subset(np.sort(i)) for i in thirds)
    res = fit("scratch", train, val, test, FinetuneConfig(**RECIPE, threads=1, seed=0), preprocessing=pp)
    model_dir = save_classifier(res, tmp_path / "contrast", command="pytest", data="siim half a", note="test")
    before = digest(model_dir)
    site_rows = [r for r in rows if r["patient"] in site]
    site_dir = dicom_csv_set(siim, site_rows, tmp_path / "site-b")
    out = tmp_path / "contrast-cal2-site-b"
    argv = ["calibrate", "--model", str(model_dir), "--data", str(site_dir), "--site", "site-b"]
    argv += ["--out", str(out), "--youden", "--resamples", "100", "--threads", "1", "--no-export"]
    assert cthub_main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    n = len(site_rows)
    assert summary["n"] == n and summary["calibration_version"] == 2 and summary["saved"] == str(out)
    assert digest(model_dir) == before  # the old version is only read
    cfg = ModelConfig.load(out)
    cal = cfg.metrics["calibration"]
    assert (
        cal["fitted_on"]["n"] == n and cal["fitted_on"]["data"] == str(site_dir) and cal["site"] == "site-b"
    )
    assert (
        cfg.revision
        and cfg.revision.endswith("+cal2")
        and cfg.threshold == cal["operating_point"]["threshold"]
    )
    assert f"## Recalibrated at site-b on {n} images" in (out / "README.md").read_text()
    # the figures are those of the site's DICOM slices in HU through the model's window: recomputed here
    # from the same files with the old model's T and the new one
    local = kfold_pool(load_splits(site_dir, pp, SIZE))
    assert local.labels is not None and len(local) == n
    logits = predict_logits(load_dir(model_dir), local.images, pp, amp=False, channels_last=False)
    t_old = ModelConfig.load(model_dir).metrics["calibration"]["temperature"]
    assert cal["temperature_before"] == pytest.approx(t_old, abs=1e-6)
    assert cal["ece_before"] == pytest.approx(
        reliability(scaled_probs(logits, t_old), local.labels)["ece"], abs=1e-5
    )
    assert cal["ece_after_cross_validated"] < cal["ece_before"]  # held out within the set (see above)
    assert cal["ece_after"] == pytest.approx(
        reliability(scaled_probs(logits, cal["temperature"]), local.labels)["ece"], abs=1e-5
    )
