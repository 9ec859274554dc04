"""A short fine-tune on real OrganAMNIST beats chance on the test split; the artifact round-trips via the hub."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ctdata.datasets import load_medmnist
from cthub.errors import ConfigError, ModelNotFoundError
from finetune import FinetuneConfig, fit, linear_probe, predict_proba, save_classifier
from finetune.data import limit
from hub import from_pretrained

# 1 thread: on 2 shared cores a 1-thread job is faster and steadier than a 2-thread one
TINY = {"image_size": 32, "epochs": 3, "head_epochs": 1, "backbone_lr_ratio": 1.0, "lr": 1e-3, "batch_size": 32,
        "threads": 1, "eval_batch_size": 256}


@pytest.fixture(scope="module")
def organ(organamnist_npz: Path):
    train = limit(load_medmnist(organamnist_npz, "train"), 440, 0)
    val = limit(load_medmnist(organamnist_npz, "val"), 220, 0)
    test = limit(load_medmnist(organamnist_npz, "test"), 660, 0)  # different patients from train/val
    return train, val, test


@pytest.fixture(scope="module")
def fitted(organ):
    train, val, test = organ
    return fit("scratch", train, val, test, FinetuneConfig(**TINY, seed=1))


def test_short_finetune_beats_chance_on_test(fitted) -> None:
    m = fitted.test_metrics
    assert m["n"] == 660
    # chance: accuracy 1/11 (sd ~0.011 at n=660), macro AUC 0.5; the margins are > 5 sd
    assert m["accuracy"] > 1 / 11 + 0.06
    assert m["auc"] > 0.62
    assert len(fitted.history) == 3 and fitted.history[0]["phase"] == "head"
    assert fitted.history[-1]["train_loss"] < fitted.history[0]["train_loss"]
    assert 1 <= fitted.best_epoch <= 3


def test_classifier_artifact_roundtrip(fitted, organ, tmp_path: Path) -> None:
    out = save_classifier(fitted, tmp_path / "clf", command="pytest", data="organamnist (test subset)",
                          note="test model: 3 epochs on 440 images, not a clinical model")
    model = from_pretrained(out)
    cfg = model.config
    assert cfg.num_classes == 11 and cfg.labels[1] == "femur-left"
    assert cfg.preprocessing.input_size == 32
    assert cfg.metrics["test"]["accuracy"] == pytest.approx(fitted.test_metrics["accuracy"], abs=1e-6)
    assert cfg.provenance["command"] == "pytest" and "not a clinical model" in cfg.provenance["note"]
    _, _, test = organ
    p1 = predict_proba(fitted.model, test.images[:64], fitted.preprocessing, amp=False)
    p2 = predict_proba(model, test.images[:64], cfg.preprocessing, amp=False)
    np.testing.assert_allclose(p1, p2, atol=1e-5)
    assert "not a clinical model" in (out / "README.md").read_text()


def test_binary_task_stores_validation_threshold(organ, tmp_path: Path) -> None:
    train, val, test = organ
    def two(s):  # liver (6) vs spleen (10): a real binary task
        keep = np.isin(s.labels, (6, 10))
        sub = s.subset(np.flatnonzero(keep))
        sub.labels = (sub.labels == 10).astype(np.int64)
        sub.class_names = ["liver", "spleen"]
        return sub
    res = fit(None, two(train), two(val), two(test), FinetuneConfig(**{**TINY, "epochs": 2}, balance="sampler"))
    assert res.threshold is not None and 0.0 <= res.threshold <= 1.0
    out = save_classifier(res, tmp_path / "bin", command="pytest", data="liver vs spleen", note="test")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["threshold"] == pytest.approx(res.threshold) and cfg["labels"] == ["liver", "spleen"]


def test_linear_probe_on_frozen_features(organ) -> None:
    train, val, test = organ
    r = linear_probe("scratch", train, val, test, image_size=32, threads=1, cs=(0.1,))
    assert r["test"]["n"] == len(test) and r["test"]["accuracy"] > 1 / 11


def test_bad_inputs_are_typed_errors(organ) -> None:
    train, val, test = organ
    with pytest.raises(ConfigError):
        FinetuneConfig(head_epochs=5, epochs=2)
    with pytest.raises(ModelNotFoundError):
        fit("no-such-encoder-xyz", train, val, test, FinetuneConfig(**TINY))


def test_cli_finetune_writes_loadable_model(organamnist_npz: Path, tmp_path: Path, capsys) -> None:
    from cthub.cli import main

    out = tmp_path / "demo"
    rc = main(["finetune", "--data", str(organamnist_npz), "--encoder", "scratch", "--out", str(out),
               "--image-size", "32", "--epochs", "1", "--head-epochs", "1", "--max-train", "200",
               "--max-val", "200", "--max-test", "500", "--seed", "3", "--threads", "1"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["test"]["n"] == 500
    model = from_pretrained(out)
    prov = model.config.provenance
    assert "--max-train 200" in prov["command"] and prov["n_train"] == 200
    assert "random-init encoder, 1 epochs on 200 images" in prov["note"]
    assert isinstance(model(torch.zeros(1, 3, 32, 32)), torch.Tensor)
