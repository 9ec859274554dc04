"""Frozen-feature evaluation and the online kNN monitor on real OrganAMNIST images.

Bounds are relative to the majority-class accuracy (what always answering the largest class scores), and
each check is paired with a broken encoder that must fail it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ctdata.labeled import limit, load_splits
from ctdata.preprocess import PreprocessConfig
from cthub.cli import main as cthub_main
from finetune.evaluate import collapse_std, evaluate_encoder, knn_eval, majority_accuracy
from finetune.probe import extract_features, linear_probe, recalibrate_bn
from finetune.train import model_inputs
from hub.config import ModelConfig
from hub.resnet import ResNet50
from pretrain.publishing import _random_like


@pytest.fixture(scope="module")
def organ(organamnist_npz: Path) -> dict:
    s = load_splits(organamnist_npz)
    return {
        "train": limit(s["train"], 400, 0),
        "val": limit(s["val"], 150, 0),
        "test": limit(s["test"], 400, 0),
    }


def _broken() -> ResNet50:
    """Every convolution zeroed: all images map to the same feature vector."""
    m = ResNet50(num_classes=0)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 4:
                p.zero_()
    return m


def test_random_features_beat_the_majority_class_and_a_broken_encoder_does_not(organ: dict) -> None:
    """A random ResNet50 with identity BN (as stored: running mean 0, var 1) is a random ReLU network whose
    pooled features separate OrganAMNIST well; re-estimating its BN statistics on clean images (no training)
    makes the same network far weaker. Both views are reported, and a collapsed encoder fails every bound."""
    torch.manual_seed(0)
    good = evaluate_encoder(
        ResNet50(num_classes=0),
        organ["train"],
        organ["val"],
        organ["test"],
        image_size=32,
        threads=1,
        n_recalibrate=256,
    )
    major = good["majority_accuracy"]
    assert major == pytest.approx(majority_accuracy(organ["train"].labels, organ["test"].labels))
    assert 0.1 < major < 0.3  # OrganAMNIST's largest class: a bound of 1/11 would be far below it
    stored, recal = good["stored"], good["recalibrated"]
    assert stored["knn"]["accuracy"] > major + 0.2, stored["knn"]
    assert stored["linear_probe"]["test"]["accuracy"] > major + 0.2, stored["linear_probe"]["test"]
    assert stored["knn"]["auc"] > 0.8 and stored["collapse_std"] > 0.05
    assert recal["knn"]["accuracy"] < stored["knn"]["accuracy"] - 0.1  # the BN convention is most of the gap
    bad = evaluate_encoder(
        _broken(),
        organ["train"],
        organ["val"],
        organ["test"],
        image_size=32,
        threads=1,
        bn_modes=("stored",),
        probe=False,
    )
    assert bad["stored"]["collapse_std"] < 1e-3
    assert bad["stored"]["knn"]["accuracy"] < major + 0.1


def test_knn_on_constant_or_shuffled_labels_falls_to_the_baseline(organ: dict) -> None:
    pp = PreprocessConfig(input_size=32)
    torch.manual_seed(0)
    enc = ResNet50(num_classes=0).eval()
    fb, fq = extract_features(enc, organ["train"].images, pp), extract_features(enc, organ["test"].images, pp)
    real = knn_eval(fb, organ["train"].labels, fq, organ["test"].labels, 11)
    shuffled = knn_eval(
        fb, np.random.default_rng(0).permutation(organ["train"].labels), fq, organ["test"].labels, 11
    )
    assert real["accuracy"] > shuffled["accuracy"] + 0.3
    assert shuffled["accuracy"] < real["majority_accuracy"] + 0.1
    assert collapse_std(np.ones((10, 2048))) == pytest.approx(0.0, abs=1e-6)


def test_recalibrated_bn_holds_the_exact_statistics_of_clean_images(organ: dict) -> None:
    pp = PreprocessConfig(input_size=32)
    torch.manual_seed(0)
    enc = ResNet50(num_classes=0)
    images = organ["train"].images[:128]
    cal = recalibrate_bn(enc, images, pp, n_images=128, batch_size=64)
    assert torch.equal(enc.bn1.running_mean, torch.zeros(64))  # the caller's model is untouched
    with torch.no_grad():
        out = enc.conv1(model_inputs(images, pp))
    torch.testing.assert_close(cal.bn1.running_mean, out.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert not cal.training and cal.bn1.momentum == 0.1


def test_knn_monitor_uses_disjoint_stratified_halves_of_val(organamnist_npz: Path) -> None:
    from pretrain.monitor import KnnMonitor

    mon = KnnMonitor.from_source(organamnist_npz, PreprocessConfig(input_size=32), n=150)
    assert len(mon.bank) == len(mon.query) == 150 and mon.num_classes == 11
    bank = {img.tobytes() for img in mon.bank.images}
    assert not any(img.tobytes() in bank for img in mon.query.images)
    assert len(np.unique(mon.bank.labels)) == 11
    torch.manual_seed(0)
    enc = ResNet50(num_classes=0)
    m = mon.measure(enc.train())
    assert enc.training  # the monitor restores the training mode
    assert m["knn_accuracy"] > m["majority_accuracy"] + 0.2
    broken = mon.measure(_broken())
    assert broken["knn_accuracy"] < m["majority_accuracy"] + 0.1 and broken["collapse_std"] < 1e-3


def test_evaluate_cli_writes_json(organamnist_npz: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ff.json"
    rc = cthub_main(
        [
            "evaluate",
            "scratch",
            "--data",
            str(organamnist_npz),
            "--max-train",
            "200",
            "--max-test",
            "200",
            "--no-probe",
            "--bn",
            "stored",
            "--image-size",
            "32",
            "--threads",
            "1",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    (r,) = json.loads(out.read_text())
    assert r["encoder"] == "scratch" and r["stored"]["knn"]["accuracy"] > r["majority_accuracy"] + 0.2
    assert "majority" in capsys.readouterr().out


def test_probe_and_the_random_baseline_are_reproducible_and_leave_the_callers_rng_alone(organ: dict) -> None:
    """Library code seeds only its own generators: the caller's torch and numpy RNG states are unchanged,
    and a random-init probe (and publish's random baseline) is the same on every call."""
    encoder = ResNet50(num_classes=0)
    small = {s: limit(organ[s], 120, 0) for s in ("train", "val", "test")}
    torch.manual_seed(1234)
    np.random.seed(7)
    torch_before, numpy_before = torch.get_rng_state(), np.random.get_state()[1].copy()
    runs = [
        linear_probe(None, small["train"], small["val"], small["test"], image_size=32, threads=1, bn="stored")
        for _ in range(2)
    ]
    baselines = [_random_like(encoder, ModelConfig()) for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), torch_before)
    assert np.array_equal(np.random.get_state()[1], numpy_before)
    assert runs[0]["test"] == runs[1]["test"] and runs[0]["C"] == runs[1]["C"]
    assert all(torch.equal(a, b) for a, b in zip(*(m.state_dict().values() for m in baselines), strict=True))
