"""The brain protocol end to end on the real head CT folder: 5-fold CV via `cthub finetune --protocol
kfold`, its reported metrics recomputed from the saved model's predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ctdata.labeled import load_splits, select_splits
from ctdata.preprocess import PreprocessConfig
from finetune.calibration import scaled_probs
from finetune.train import predict_logits
from hub import from_pretrained
from hub.metrics import classification_metrics


def test_kfold_cli_on_head_ct(head_ct_dir: Path, tmp_path: Path, capsys) -> None:
    from cthub.cli import main

    out = tmp_path / "brain"
    rc = main(
        [
            "finetune",
            "--data",
            str(head_ct_dir),
            "--protocol",
            "kfold",
            "--folds",
            "5",
            "--out",
            str(out),
            "--image-size",
            "32",
            "--epochs",
            "1",
            "--head-epochs",
            "0",
            "--batch-size",
            "32",
            "--threads",
            "1",
            "--seed",
            "0",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    folds = summary["folds"]
    # 100 + 100 images: each fold tests 40 once, validates on 10% of the other 160, trains on the rest
    assert [(f["n_train"], f["n_val"], f["n_test"]) for f in folds] == [(144, 16, 40)] * 5
    assert summary["cv"]["auc"]["mean"] == pytest.approx(np.mean([f["auc"] for f in folds]))
    assert set(summary["cv"]) == {"accuracy", "auc", "f1"} and "±" in summary["table"]["auc"]
    model = from_pretrained(out)
    cfg = model.config
    assert cfg.num_classes == 2 and cfg.threshold is not None  # binary: operating point chosen on validation
    assert cfg.metrics["cv"]["auc"]["mean"] == summary["cv"]["auc"]["mean"]
    assert "fold" in cfg.provenance["note"] and "--protocol kfold" in cfg.provenance["command"]
    assert json.loads((out / "cv_results.json").read_text())["protocol"] == "5-fold"

    # the saved model is the fold with the best validation AUC (the default selection signal) ...
    sel = cfg.metrics["saved_fold"] - 1
    assert sel == int(np.argmax([f["val"]["auc"] for f in folds]))
    # ... and its reported test metrics are what its predictions on that fold's test images give
    splits = load_splits(head_ct_dir, PreprocessConfig(input_size=32))
    test = select_splits(splits, fold=sel, folds=5, val_fraction=0.1, split_seed=0).test
    assert np.bincount(test.labels).tolist() == [20, 20]  # stratified
    # served probabilities: softmax(logits / T) in float32, T fitted on validation; the threshold is theirs
    probs = scaled_probs(
        predict_logits(model, test.images, cfg.preprocessing, amp=False),
        cfg.metrics["calibration"]["temperature"],
    )
    m = classification_metrics(test.labels, probs, cfg.threshold)
    assert m["auc"] == pytest.approx(folds[sel]["auc"], abs=1e-6)
    assert m["accuracy"] == pytest.approx(folds[sel]["accuracy"], abs=1e-6)
    assert m["f1"] == pytest.approx(folds[sel]["f1"], abs=1e-6)
