"""`cthub study` on real data: runs cells, writes CSV/JSON/Table 2/Figure 5, resumes without redoing, and
records a failing cell without stopping the others."""

from __future__ import annotations

import csv
import dataclasses
import json
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from ctdata.labeled import load_splits, select_splits
from cthub.errors import ConfigError
from cthub.runtime import hardware
from finetune import study
from finetune.config import FinetuneConfig
from finetune.report import table2_markdown
from finetune.study import Cell, StudySpec, available_encoders, run_path, run_study

RECIPE = FinetuneConfig(image_size=32, epochs=1, head_epochs=0, batch_size=32, threads=1, lr=1e-3)


def _spec(npz: Path, out: Path, fractions: list[float], recipe: FinetuneConfig = RECIPE) -> StudySpec:
    return StudySpec(
        data=str(npz),
        encoders=["scratch"],
        fractions=fractions,
        seeds=[0],
        out=str(out),
        recipe=recipe,
        max_val=150,
        max_test=200,
    )


def _macro_f1(cm: np.ndarray) -> float:
    """Macro F1 over every class from a confusion matrix (rows = truth), 0 where undefined."""
    tp = np.diag(cm).astype(float)
    den = cm.sum(0) + cm.sum(1)
    return float(np.mean(np.divide(2 * tp, den, out=np.zeros_like(tp), where=den > 0)))


def test_study_resumes_and_reports(organamnist_npz: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "study"
    first = run_study(_spec(organamnist_npz, out, [0.005]))
    assert first["ran"] == 1 and first["skipped_finished"] == 0
    done = run_path(out, _spec(organamnist_npz, out, [0.005]).cells()[0])
    stamp = done.stat().st_mtime_ns

    from cthub.cli import main

    rc = main(
        [
            "study",
            "--data",
            str(organamnist_npz),
            "--encoders",
            "scratch,no-such-encoder-xyz",
            "--fractions",
            "0.005,0.003",
            "--seeds",
            "1",
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
            "--lr",
            "0.001",
            "--max-val",
            "150",
            "--max-test",
            "200",
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "not running the cells of 'no-such-encoder-xyz'" in printed
    summary = json.loads(printed[printed.index("{") : printed.rindex("}") + 1])
    assert summary["ran"] == 1 and summary["skipped_finished"] == 1  # the finished run was not redone
    assert done.stat().st_mtime_ns == stamp

    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["fraction"] for r in runs] == [0.003, 0.005]  # smallest fraction first (StudySpec.cells)
    assert [r["n_train"] for r in runs] == [round(0.003 * 34561), round(0.005 * 34561)]
    # every cell is measured on the same stratified val/test subsets (fixed by the recipe seed)
    part = select_splits(load_splits(organamnist_npz), split_seed=RECIPE.seed, max_val=150, max_test=200)
    test_labels = part.test.labels
    for r in runs:
        t, cm = r["test"], np.asarray(r["test"]["confusion_matrix"])
        assert r["n_val"] == 150 and t["n"] == cm.sum() == 200
        assert np.array_equal(cm.sum(1), np.bincount(test_labels, minlength=11))
        # the reported metrics are the ones the saved predictions (confusion matrix) give
        assert t["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
        assert t["f1"] == pytest.approx(_macro_f1(cm))
        assert r["converged"] is False  # 1 epoch: the best is the last

    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [row["fraction"] for row in rows] == ["0.003", "0.005"]
    assert all(row["converged"] == "False" for row in rows)
    assert (out / "summary.csv").read_text().count("\n") == 3  # header + one row per (encoder, fraction)
    table = (out / "table2.md").read_text()
    line = next(row for row in table.splitlines() if row.startswith("| scratch |"))
    assert "| 0.5% AUC | 0.5% F1 | 0.3% AUC |" in table and "–" not in line and line.count("|") == 6
    assert "±" not in table and "one run each" in table  # one seed: no spread is claimed
    assert "2 of 2 runs were still improving when their epoch budget ended" in table
    assert (out / "figure5.png").read_bytes()[:4] == b"\x89PNG"

    with pytest.raises(ConfigError):  # resuming with another recipe would mix incomparable runs
        run_study(_spec(organamnist_npz, out, [0.005], RECIPE.replace(lr=0.5)))


def test_remaining_estimate_follows_the_pace_so_far() -> None:
    assert study.remaining_estimate(600.0, 2, 6) == "; ~20 min left for 4 run(s)"
    assert study.remaining_estimate(600.0, 6, 6) == "" and study.remaining_estimate(0.0, 0, 6) == ""


def test_same_run_within_a_new_epoch_budget() -> None:
    stopped = {"epoch_budget": 60, "epochs_run": 41}  # early stopping ended it at epoch 41
    full = {"epoch_budget": 60, "epochs_run": 60}  # still improving when the budget ran out
    assert study.same_run_within(stopped, 120) and study.same_run_within(stopped, 41)
    assert not study.same_run_within(stopped, 40)  # a smaller budget would have cut it short
    assert study.same_run_within(full, 60) and not study.same_run_within(full, 120)


def test_raising_the_epoch_budget_reruns_only_the_cells_that_used_all_of_it(
    organamnist_npz: Path, tmp_path: Path
) -> None:
    out = tmp_path / "study"
    spec = _spec(organamnist_npz, out, [0.003, 0.005])
    assert run_study(spec)["ran"] == 2  # 1 epoch: both ran their whole budget
    first, second = (run_path(out, c) for c in spec.cells())
    # a record from before cells kept their budget, and one that (as if) stopped early within 2 epochs
    legacy = json.loads(first.read_text())
    del legacy["epoch_budget"]
    first.write_text(json.dumps(legacy))
    early = json.loads(second.read_text()) | {"epoch_budget": 3, "epochs_run": 2}
    second.write_text(json.dumps(early))
    stamp = second.stat().st_mtime_ns
    longer = run_study(_spec(organamnist_npz, out, [0.003, 0.005], RECIPE.replace(epochs=2)))
    assert longer["ran"] == 1 and longer["skipped_finished"] == 1
    redone = json.loads(first.read_text())
    assert redone["epoch_budget"] == 2 and redone["epochs_run"] == 2
    assert second.stat().st_mtime_ns == stamp  # kept: the same run under a budget of 2
    assert json.loads((out / "study.json").read_text())["recipe"]["epochs"] == 2
    assert len(json.loads((out / "results.json").read_text())["runs"]) == 2


def test_cells_in_worker_processes_match_serial_runs_show_progress_and_report_part_way(
    organamnist_npz: Path, tmp_path: Path, capfd
) -> None:
    def spec(out: str, seeds: list[int]) -> StudySpec:
        return dataclasses.replace(_spec(organamnist_npz, tmp_path / out, [0.003]), seeds=seeds)

    assert run_study(spec("serial", [0]))["ran"] == 1
    assert run_study(spec("parallel", [0, 1]), workers=2, threads_per_worker=1)["ran"] == 2
    # same seed, one thread each: the process a cell ran in changes nothing
    c = spec("x", [0]).cells()[0]
    a, b = (json.loads(run_path(tmp_path / d, c).read_text()) for d in ("serial", "parallel"))
    assert a["test"]["confusion_matrix"] == b["test"]["confusion_matrix"]
    assert a["test"]["auc"] == pytest.approx(b["test"]["auc"], abs=1e-6)
    err = capfd.readouterr().err
    for seed in (0, 1):  # each worker reports its cell's epochs (training's own log is quiet there)
        assert f"scratch__f0.003__s{seed}: epoch 1/1 [full] val auc " in err, err[-2000:]

    # `--report-only` on a larger grid: the tables from the two finished cells, nothing run
    out = tmp_path / "parallel"
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    from cthub.cli import main

    argv = ["study", "--data", str(organamnist_npz), "--encoders", "scratch", "--fractions", "0.003,0.005"]
    argv += ["--seeds", "2", "--out", str(out), "--image-size", "32", "--epochs", "1", "--head-epochs", "0"]
    argv += ["--batch-size", "32", "--lr", "0.001", "--max-val", "150", "--max-test", "200", "--report-only"]
    assert main(argv) == 0
    printed = capfd.readouterr().out
    summary = json.loads(printed[printed.index("{") : printed.rindex("}") + 1])
    assert (summary["ran"], summary["skipped_finished"], summary["not_run"]) == (0, 2, 2)
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == stamps  # nothing was rerun
    line = next(r for r in (out / "table2.md").read_text().splitlines() if r.startswith("| scratch |"))
    assert line.count("±") == 2 and line.count("–") == 2  # 0.3%: both seeds; 0.5%: none yet


def test_table2_says_how_many_runs_a_cell_has_when_it_has_fewer() -> None:
    def row(frac: float, runs: int) -> dict:
        cell = {"encoder": "scratch", "fraction": frac, "runs": runs, "n_train": 10}
        return cell | {"auc": "0.9", "f1": "0.5"}

    table = table2_markdown([row(0.05, 3), row(0.01, 1)], "t")
    line = next(r for r in table.splitlines() if r.startswith("| scratch |"))
    assert line == "| scratch | 0.9 | 0.5 | 0.9 (n=1) | 0.5 (n=1) |"
    assert "mean ± std over 1/3 runs" in table


def test_failing_cell_is_recorded_and_the_others_finish(
    head_ct_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a train/test source without validation (a KeyError in every cell before), one cell fails."""
    rows = [
        f"{head_ct_dir / f'{i:03d}.png'},{int(i < 100)},{'test' if i % 5 == 0 else 'train'}"
        for i in range(80, 120)
    ]
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    spec = StudySpec(
        data=str(manifest),
        encoders=["scratch", "random"],
        fractions=[1.0],
        seeds=[0],
        out=str(tmp_path / "study"),
        recipe=RECIPE,
        val_fraction=0.25,
    )
    real_fit = study.fit

    def flaky(encoder, *args, **kw):
        if encoder == "random":
            raise RuntimeError("boom")
        return real_fit(encoder, *args, **kw)

    monkeypatch.setattr(study, "fit", flaky)
    s = run_study(spec)
    key = Cell("random", 1.0, 0).key
    assert s["ran"] == 1 and list(s["failed"]) == [key] and "boom" in s["failed"][key]
    assert "boom" in json.loads(run_path(spec.out, Cell("random", 1.0, 0)).read_text())["error"]
    results = json.loads((Path(spec.out) / "results.json").read_text())
    assert [r["encoder"] for r in results["runs"]] == ["scratch"] and key in results["failed"]
    assert results["runs"][0]["n_train"] == 24 and results["runs"][0]["n_val"] == 8
    table = (Path(spec.out) / "table2.md").read_text()
    assert "| random | – | – |" in table and "1 run(s) failed" in table

    monkeypatch.setattr(study, "fit", real_fit)  # resume: the failed cell is retried, the finished one kept
    again = run_study(spec)
    assert again["ran"] == 1 and again["skipped_finished"] == 1 and not again["failed"]


def test_missing_encoder_is_a_clear_skip() -> None:
    ok, skipped = available_encoders(["scratch", "definitely-not-a-model"])
    assert ok == ["scratch"] and "definitely-not-a-model" in skipped


def test_study_writes_each_local_encoders_rows_into_its_card(organamnist_npz: Path, tmp_path: Path) -> None:
    """A hub encoder's card carries its own study rows beside scratch's, with the delta, after a study."""
    import torch

    from hub import ModelConfig, ResNet50, hub_dir, save_pretrained

    torch.manual_seed(0)
    enc_dir = save_pretrained(
        ResNet50(num_classes=0), hub_dir() / "tiny-enc", ModelConfig(name="tiny-enc", method="random")
    )
    spec = _spec(organamnist_npz, tmp_path / "study", [0.005])
    spec.encoders = ["scratch", "tiny-enc"]
    s = run_study(spec, command="cthub study --encoders scratch,tiny-enc")
    assert s["cards_updated"] == ["tiny-enc"]
    cfg = ModelConfig.load(enc_dir)
    entry = cfg.metrics["finetune_study"][f"{organamnist_npz.name}:split"]
    row = entry["test"]["0.5%"]
    runs = {r["encoder"]: r for r in json.loads((Path(spec.out) / "results.json").read_text())["runs"]}
    assert row["auc"]["mean"] == pytest.approx(runs["tiny-enc"]["test"]["auc"], abs=1e-4)
    assert row["scratch_auc"]["mean"] == pytest.approx(runs["scratch"]["test"]["auc"], abs=1e-4)
    assert row["delta_auc_vs_scratch"] == pytest.approx(
        runs["tiny-enc"]["test"]["auc"] - runs["scratch"]["test"]["auc"], abs=2e-4
    )
    assert entry["command"].startswith("cthub study") and entry["recipe"]["image_size"] == 32
    card = (enc_dir / "README.md").read_text()
    assert "finetune_study" in card and "delta_auc_vs_scratch" in card
    # and as a table: this encoder's mean AUC beside random init's on the same cells, and the difference
    line = next(r for r in card.splitlines() if r.startswith("| 0.5% |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == f"{round(0.005 * 34561):,}" and cells[2] == f"{row['auc']['mean']:.4f}"
    assert cells[4] == f"{row['scratch_auc']['mean']:.4f}"  # one run each: no spread claimed
    assert cells[5] == f"{row['delta_auc_vs_scratch']:+.4f}"


def test_cells_of_an_encoder_made_again_are_run_again(
    organamnist_npz: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    with_metadata_reversed: Callable[[Path, Path], None],
) -> None:
    """Re-publishing an encoder under the same name (new weights) makes its finished cells stale: they are
    run again, and left out of the reports until then; other encoders' cells are kept."""
    import torch

    from hub import ModelConfig, ResNet50, hub_dir, manifest, save_pretrained
    from hub.config import WEIGHTS_NAME
    from hub.manifest import sha256_file

    def publish(seed: int) -> str:
        torch.manual_seed(seed)
        d = save_pretrained(
            ResNet50(num_classes=0), hub_dir() / "remade", ModelConfig(name="remade", method="random")
        )
        return sha256_file(d / WEIGHTS_NAME)

    first_sha = publish(0)
    spec = _spec(organamnist_npz, tmp_path / "study", [0.005])
    spec.encoders = ["scratch", "remade"]
    assert run_study(spec)["ran"] == 2
    scratch_rec = run_path(spec.out, Cell("scratch", 0.005, 0))
    remade_rec = run_path(spec.out, Cell("remade", 0.005, 0))
    assert json.loads(remade_rec.read_text())["encoder_sha256"] == first_sha
    scratch_stamp = scratch_rec.stat().st_mtime_ns
    assert run_study(spec)["ran"] == 0  # same weights: nothing to do

    # made again to the same tensors by another process: safetensors may write the metadata in another
    # order, so the file's sha256 differs, but the weights are the ones measured
    weights = hub_dir() / "remade" / WEIGHTS_NAME
    with_metadata_reversed(weights, weights)
    manifest.write_sidecar(weights, sha256_file(weights))
    manifest.record(hub_dir(), "remade", sha256_file(weights))
    assert sha256_file(weights) != first_sha
    assert run_study(spec)["ran"] == 0
    # a record from before digests (the file's sha256 only) stands too, and is given the digest
    rec = json.loads(remade_rec.read_text())
    digest = rec.pop("encoder_digest")
    remade_rec.write_text(json.dumps(rec))
    assert run_study(spec)["ran"] == 0
    assert json.loads(remade_rec.read_text())["encoder_digest"] == digest == manifest.weights_digest(weights)

    second_sha = publish(1)
    assert second_sha != first_sha
    assert len(study.load_runs(spec, spec.out)) == 1  # the stale record is not reported
    with caplog.at_level("WARNING", logger=study.log.name):
        again = run_study(spec)
    assert again["ran"] == 1 and again["skipped_finished"] == 1
    assert any("remade__f0.005__s0 measured remade weights" in r.getMessage() for r in caplog.records)
    assert json.loads(remade_rec.read_text())["encoder_sha256"] == second_sha
    assert scratch_rec.stat().st_mtime_ns == scratch_stamp
    assert len(json.loads((Path(spec.out) / "results.json").read_text())["runs"]) == 2

    # the encoder is gone (as on a fresh clone): its finished cells are still reported, its new ones not run
    shutil.rmtree(hub_dir() / "remade")
    spec.fractions = [0.005, 0.01]
    gone = run_study(spec)
    assert gone["ran"] == 1 and gone["not_run"] == 1 and "remade" in gone["skipped_encoders"]
    runs = json.loads((Path(spec.out) / "results.json").read_text())["runs"]
    assert {(r["encoder"], r["fraction"]) for r in runs} == {
        ("scratch", 0.005),
        ("remade", 0.005),
        ("scratch", 0.01),
    }


def test_progress_of_a_resumed_cell_says_so(caplog: pytest.LogCaptureFixture) -> None:
    """A cell continuing from its checkpoint says where it resumed, and its best is the best since then."""
    progress = study.EpochProgress(Cell("scratch", 0.05, 1), budget=120)

    def rec(epoch: int, auc: float, best: bool) -> dict[str, object]:
        return {"epoch": epoch, "phase": "full", "val_auc": auc, "best": best, "epoch_s": 30.0}

    with caplog.at_level("INFO", logger=study.log.name):
        progress(rec(10, 0.90, False))
        progress(rec(11, 0.92, True))
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "scratch__f0.05__s1: resumed from its checkpoint at epoch 10 of 120"
    assert lines[1].endswith("val auc 0.900 (no new best since the resume), 30 s/epoch")
    assert lines[2].endswith("val auc 0.920 (best since the resume 0.920 at 11), 30 s/epoch")

    fresh = study.EpochProgress(Cell("scratch", 0.05, 1), budget=120)
    caplog.clear()
    with caplog.at_level("INFO", logger=study.log.name):
        fresh(rec(1, 0.5, True))
    assert [r.getMessage() for r in caplog.records] == [
        "scratch__f0.05__s1: epoch 1/120 [full] val auc 0.500 (best 0.500 at 1), 30 s/epoch"
    ]


def test_workers_stop_when_the_study_process_is_killed(organamnist_npz: Path, tmp_path: Path) -> None:
    """`kill -9` of `cthub study` leaves no worker training on alone (an orphan would keep writing the
    checkpoint that a restarted study resumes from, and race it)."""
    import psutil

    argv = [sys.executable, "-m", "cthub", "study", "--data", str(organamnist_npz), "--encoders", "scratch"]
    argv += ["--fractions", "0.003", "--seeds", "2", "--out", str(tmp_path / "s"), "--image-size", "32"]
    argv += ["--epochs", "500", "--head-epochs", "0", "--patience", "500", "--batch-size", "32"]
    argv += ["--lr", "0.001", "--max-val", "150", "--max-test", "200", "--workers", "2", "--threads", "1"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, cwd=Path(study.__file__).parents[1])
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stderr or []], daemon=True).start()
    workers: list[psutil.Process] = []
    try:
        deadline, seen = time.monotonic() + 240, set()
        while len(seen) < 2 and time.monotonic() < deadline:  # both workers are training
            try:
                line = lines.get(timeout=5)
            except queue.Empty:
                continue
            if m := re.search(r"(scratch__\S+): epoch ", line):
                seen.add(m.group(1))
        assert len(seen) == 2, "the two workers never reported an epoch"
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert len(workers) >= 2
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        _, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        proc.kill()
        for w in workers:
            if w.is_running():
                w.kill()


def test_a_run_over_a_subset_adds_its_rows_to_the_folders_tables(
    organamnist_npz: Path, tmp_path: Path
) -> None:
    out = tmp_path / "study"
    assert run_study(_spec(organamnist_npz, out, [0.003]))["ran"] == 1
    first_design = json.loads((out / "study.json").read_text())
    # another invocation, at another thread count: one more fraction and another seed, nothing repeated
    more = dataclasses.replace(_spec(organamnist_npz, out, [0.005], RECIPE.replace(threads=2)), seeds=[1])
    assert run_study(more)["ran"] == 1
    design = json.loads((out / "study.json").read_text())
    assert (design["encoders"], design["fractions"], design["seeds"]) == (["scratch"], [0.003, 0.005], [0, 1])
    # how an invocation ran is not part of the design (side-by-side runs would rewrite it): records say it
    assert design["recipe"] == first_design["recipe"] and not {"threads", "device"} & set(design["recipe"])
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert sorted((r["fraction"], r["seed"], r["threads"]) for r in runs) == [(0.003, 0, 1), (0.005, 1, 2)]
    assert all(r["hardware"] == hardware() for r in runs)  # and on which CPU, flags and torch
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["threads"] for r in rows) == ["1", "2"]  # a column of every record's fields
    assert all(r["hardware"].startswith(f"{hardware()['cpu']} (") for r in rows)  # one readable cell
    table = (out / "table2.md").read_text()
    assert "| 0.5% AUC | 0.5% F1 | 0.3% AUC | 0.3% F1 |" in table
    line = next(r for r in table.splitlines() if r.startswith("| scratch |"))
    assert "–" not in line  # both cells reported, neither replaced by the other
    # a report asked for lists the encoders it names first; one with no cells yet is a row of '–'
    asked = dataclasses.replace(more, encoders=["not-run-yet", "scratch"])
    assert run_study(asked, report_only=True)["ran"] == 0
    assert json.loads((out / "study.json").read_text())["encoders"] == ["not-run-yet", "scratch"]
    lines = (out / "table2.md").read_text().splitlines()
    names = [r.split("|")[1].strip() for r in lines if r.startswith("| ")]
    assert names == ["pretraining", "not-run-yet", "scratch"]


def test_a_cell_running_in_another_process_is_left_to_it(organamnist_npz: Path, tmp_path: Path) -> None:
    """Two studies into one folder: the cell another process holds is neither run twice (their checkpoints
    would clash) nor recorded as failed; a cell finished since the study listed it is not run again."""
    spec = _spec(organamnist_npz, tmp_path / "study", [0.003, 0.005])
    held, free = Cell("scratch", 0.003, 0), Cell("scratch", 0.005, 0)
    with study.cell_lock(spec.out, held):  # what the other study's process holds while it trains the cell
        s = run_study(spec)
        with pytest.raises(study.CellTakenError, match="running in another process"):
            study.run_cell(spec, held)
    assert s["ran"] == 1 and not s["failed"] and list(s["taken"]) == [held.key]
    assert not run_path(spec.out, held).exists() and study.is_done(spec.out, free)
    # released (the other process ended): the next study runs it
    assert run_study(spec)["ran"] == 1 and study.is_done(spec.out, held)
    # listed as to do, then finished by another process before this one reached it
    with pytest.raises(study.CellTakenError, match="finished by another process"):
        study.run_cell(spec, held, unless_finished=True)
