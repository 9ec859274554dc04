"""`cthub study` on real OrganAMNIST: runs cells, writes CSV/JSON/Table 2/Figure 5, resumes without redoing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cthub.errors import ConfigError
from finetune.config import FinetuneConfig
from finetune.study import StudySpec, available_encoders, run_path, run_study

RECIPE = FinetuneConfig(image_size=32, epochs=1, head_epochs=0, batch_size=32, threads=1, lr=1e-3)


def _spec(npz: Path, out: Path, fractions: list[float], recipe: FinetuneConfig = RECIPE) -> StudySpec:
    return StudySpec(data=str(npz), encoders=["scratch"], fractions=fractions, seeds=[0], out=str(out),
                     recipe=recipe, max_val=150, max_test=200)


def test_study_resumes_and_reports(organamnist_npz: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "study"
    first = run_study(_spec(organamnist_npz, out, [0.005]))
    assert first["ran"] == 1 and first["skipped_finished"] == 0
    done = run_path(out, _spec(organamnist_npz, out, [0.005]).cells()[0])
    stamp = done.stat().st_mtime_ns

    from cthub.cli import main

    rc = main(["study", "--data", str(organamnist_npz), "--encoders", "scratch,no-such-encoder-xyz",
               "--fractions", "0.005,0.003", "--seeds", "1", "--out", str(out), "--image-size", "32",
               "--epochs", "1", "--head-epochs", "0", "--batch-size", "32", "--lr", "0.001",
               "--max-val", "150", "--max-test", "200", "--threads", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "skipping encoder 'no-such-encoder-xyz'" in printed
    summary = json.loads(printed[printed.index("{"):printed.rindex("}") + 1])
    assert summary["ran"] == 1 and summary["skipped_finished"] == 1  # the finished run was not redone
    assert done.stat().st_mtime_ns == stamp
    rows = (out / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and rows[0].startswith("encoder,fraction,seed")
    table = (out / "table2.md").read_text()
    assert "| scratch |" in table and "| 0.5% AUC | 0.5% F1 | 0.3% AUC |" in table
    assert "±" not in table and "one run each" in table  # one seed: no spread is claimed
    assert (out / "figure5.png").read_bytes()[:4] == b"\x89PNG"
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert {r["n_train"] for r in runs} == {round(0.005 * 34561), round(0.003 * 34561)}
    assert all(0.0 <= r["test"]["auc"] <= 1.0 and r["test"]["n"] == 200 for r in runs)

    with pytest.raises(ConfigError):  # resuming with another recipe would mix incomparable runs
        run_study(_spec(organamnist_npz, out, [0.005], RECIPE.replace(lr=0.5)))


def test_missing_encoder_is_a_clear_skip() -> None:
    ok, skipped = available_encoders(["scratch", "definitely-not-a-model"])
    assert ok == ["scratch"] and "definitely-not-a-model" in skipped
