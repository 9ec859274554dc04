"""The brain protocol end to end on the real head CT folder: 5-fold CV via `cthub finetune --protocol kfold`."""

from __future__ import annotations

import json
from pathlib import Path

from hub import from_pretrained


def test_kfold_cli_on_head_ct(head_ct_dir: Path, tmp_path: Path, capsys) -> None:
    from cthub.cli import main

    out = tmp_path / "brain"
    rc = main(["finetune", "--data", str(head_ct_dir), "--protocol", "kfold", "--folds", "5", "--out", str(out),
               "--image-size", "32", "--epochs", "1", "--head-epochs", "0", "--batch-size", "32",
               "--threads", "1", "--seed", "0"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    folds = summary["folds"]
    assert len(folds) == 5 and sum(f["n_test"] for f in folds) == 200  # every image tested exactly once
    assert all(0.0 <= f["auc"] <= 1.0 for f in folds)
    assert set(summary["cv"]) == {"accuracy", "auc", "f1"} and "±" in summary["table"]["auc"]
    model = from_pretrained(out)
    cfg = model.config
    assert cfg.num_classes == 2 and cfg.threshold is not None  # binary: operating point chosen on validation
    assert cfg.metrics["cv"]["auc"]["mean"] == summary["cv"]["auc"]["mean"]
    assert "fold" in cfg.provenance["note"] and "--protocol kfold" in cfg.provenance["command"]
    assert json.loads((out / "cv_results.json").read_text())["protocol"] == "5-fold"
