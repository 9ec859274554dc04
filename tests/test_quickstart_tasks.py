"""`cthub quickstart` on a labeled source that is not OrganAMNIST: the head CT folder (labels.csv) and a CSV
manifest of the same files, at the tiny budget (real images, a real short SparK run on them, real
fine-tunes and export). Checks the task preset (input size, brain window recorded for DICOM input, served
folders apart from OrganAMNIST's), the held-out split (fold 0 of the paper's stratified 5 folds, the same
slices for the served model and its random-init baseline), the input expectation in the card, and the
encoder ranking for a task (a study or kNN monitor on the task's data outranks other figures)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctdata.datasets import labeled_files
from hub import ModelConfig
from quickstart.pipeline import best_local_encoder, finetune_args, plan
from quickstart.splitfile import needs_split, write_split_manifest
from quickstart.tasks import TASKS, task_for
from serving.launch import QUIET, ROOT

pytestmark = pytest.mark.shared


def _rows(manifest: Path) -> list[dict[str, str]]:
    with manifest.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_the_data_names_the_task_and_a_source_without_split_gets_fold_0(
    head_ct_dir: Path, tmp_path: Path
) -> None:
    assert task_for("x/organamnist.npz").name == "organamnist"
    assert task_for(head_ct_dir).name == "head-ct" and task_for(tmp_path).name == "slices"
    assert TASKS["head-ct"].budget("quick").image_size == 224 and TASKS["head-ct"].window == "brain"
    assert needs_split(head_ct_dir)
    files, labels, groups, column, _ = labeled_files(head_ct_dir, split="all")
    assert len(files) == 200 and column == "hemorrhage" and groups is None
    manifest = write_split_manifest(head_ct_dir, tmp_path / "split.csv")
    rows = _rows(manifest)
    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    assert counts == {"train": 144, "val": 16, "test": 40}  # 5 folds of 200, 10% of training for validation
    test = [r for r in rows if r["split"] == "test"]
    assert sum(r["hemorrhage"] == "1" for r in test) == 20  # stratified: half of each class
    again = (tmp_path / "split.csv").read_bytes()
    write_split_manifest(head_ct_dir, tmp_path / "split.csv")
    assert (tmp_path / "split.csv").read_bytes() == again  # the same split every run
    # a CSV manifest of the same files is split the same way
    src = tmp_path / "manifest.csv"
    with src.open("w", newline="") as fh:
        csv.writer(fh).writerows(
            [["path", "hemorrhage"], *[[str(f), y] for f, y in zip(files, labels, strict=True)]]
        )
    assert [r["split"] for r in _rows(write_split_manifest(src, tmp_path / "split2.csv"))] == [
        r["split"] for r in rows
    ]


def test_a_task_ranks_encoders_by_what_was_measured_on_it(tmp_path: Path) -> None:
    def encoder(name: str, metrics: dict, monitor: str | None = None) -> None:
        d = tmp_path / name
        d.mkdir()
        prov = {"recipe": {"monitor_data": monitor}} if monitor else {}
        ModelConfig(name=name, method=name.split("-")[0], metrics=metrics, provenance=prov).save(d)
        (d / "model.safetensors").write_bytes(b"")

    probe = {"frozen_features": {"encoder": {"recalibrated": {"linear_probe": {"auc": 0.97}}}}}
    encoder("spark-organamnist-cpu", probe)
    assert best_local_encoder(tmp_path, "head-ct") == "spark-organamnist-cpu"  # nothing measured on head CT
    # as `cthub pretrain --publish` writes it for unlabeled shards: a sentence where the probe table would be
    unprobed = {"knn_monitor_last": {"knn_auc": 0.71}, "frozen_features": "not measured (no labeled splits)"}
    encoder("spark-realct128-cpu", unprobed, monitor="../shared/data/head_ct")
    assert best_local_encoder(tmp_path, "head-ct") == "spark-realct128-cpu"
    assert best_local_encoder(tmp_path, "organamnist") == "spark-organamnist-cpu"
    study = {"head_ct:kfold": {"test": {"100%": {"delta_auc_vs_scratch": 0.12}}}}
    encoder("mocov2-from-organ-realct128-cpu", {"finetune_study": study})
    assert best_local_encoder(tmp_path, "head-ct") == "mocov2-from-organ-realct128-cpu"


def test_quickstart_tiny_on_the_head_ct_folder(head_ct_dir: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    cmd = [sys.executable, "-m", "cthub", "quickstart", "--data", str(head_ct_dir), "--budget", "tiny"]
    cmd += ["--models", str(models)]
    env = dict(os.environ) | QUIET | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    state = json.loads((models / "quickstart-head-ct.json").read_text())
    assert state["task"] == "head-ct" and state["encoder"] == "spark-head-ct-tiny"
    assert state["classifier"] == str(models / "head-ct-ssl") and not (models / "organamnist-ssl").exists()
    ours, base = ModelConfig.load(models / "head-ct-ssl"), ModelConfig.load(models / "head-ct-scratch")
    assert ours.labels == ["no hemorrhage", "hemorrhage"]
    assert ours.preprocessing.input_size == 64 and ours.preprocessing.window == "brain"  # tiny: 64 px
    assert ours.metrics["input_expectation"] == "whole slice"
    # both were trained and tested on the same split: the manifest the job wrote
    manifest = models / "head-ct-split.csv"
    assert ours.provenance["data"] == base.provenance["data"] == str(manifest)
    assert ours.metrics["test"]["n"] == base.metrics["test"]["n"] == 40
    assert ours.metrics["vs_random_init"]["baseline_test"]["n"] == 40
    assert (models / "head-ct-ssl" / "model.onnx").is_file()
    p = plan(head_ct_dir, "tiny", models)
    assert "--window" in finetune_args(p, p.encoder, p.classifier)


def test_a_dicom_and_csv_source_is_split_by_patient(tmp_path: Path) -> None:
    """real_ct/siim_contrast: 100 DICOM slices of 54 patients, labels.csv with a patient column. No patient's
    slices may be on two sides of the served model's split."""
    from conftest import shared_file

    source = shared_file("real_ct", "siim_contrast")
    assert task_for(source).name == "slices" and needs_split(source)
    files, _, groups, _, _ = labeled_files(source, split="all")
    assert len(files) == 100 and groups is not None and len(set(groups)) == 54
    assert all(f.suffix == ".dcm" and f.is_file() for f in files)
    rows = _rows(write_split_manifest(source, tmp_path / "split.csv"))
    sides: dict[str, set[str]] = {}
    for r in rows:
        sides.setdefault(r["group"], set()).add(r["split"])
    assert all(len(s) == 1 for s in sides.values())  # every patient on one side only
    assert {r["split"] for r in rows} == {"train", "val", "test"}
