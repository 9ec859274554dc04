"""`make run` end to end at the tiny budget: the Makefile path a newcomer takes (SparK encoder -> few-label
classifier and its random-init baseline -> ONNX fp32/int8 -> API + demo), ending in a live /readyz, one
/predict answer on a real DICOM slice, a second `make run` that reuses everything, and a clean shutdown."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from serving.launch import QUIET, READY_LINE, free_port

ROOT = Path(__file__).resolve().parents[1]


def _make_run(tmp: Path, port: int, log: Path) -> subprocess.Popen:
    # -o: the venv is what runs this test; never let make reinstall it
    cmd = ["make", "-o", ".venv/.installed", "run", "BUDGET=tiny", f"MODELS={tmp / 'models'}", f"PORT={port}"]
    env = dict(os.environ) | QUIET | {"CTHUB_HOME": str(tmp / "home")}
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _wait_ready(proc: subprocess.Popen, log: Path, timeout: float = 900) -> str:
    deadline = time.monotonic() + timeout
    while log.read_text(errors="replace").count(READY_LINE) < 1:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"make run did not serve:\n{log.read_text(errors='replace')[-4000:]}")
        time.sleep(1)
    return log.read_text(errors="replace")


def _stop(proc: subprocess.Popen) -> int:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_run_builds_serves_predicts_and_reuses(tmp_path: Path, ct_small_dcm: Path) -> None:
    port = free_port()
    log = tmp_path / "make-run.log"
    proc = _make_run(tmp_path, port, log)
    try:
        text = _wait_ready(proc, log)
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/readyz", timeout=30).status_code == 200
        with open(ct_small_dcm, "rb") as f:
            r = httpx.post(
                f"{base}/predict", files={"file": ("slice.dcm", f, "application/dicom")}, timeout=120
            )
        assert r.status_code == 200, r.text
        answer = r.json()
        state = json.loads((tmp_path / "models" / "quickstart.json").read_text())
        assert answer["model"]["name"] == Path(state["classifier"]).name
        assert answer["label"] in answer["probabilities"] and len(answer["probabilities"]) == 11
        # the served card says what the pretraining bought, measured against a random-init baseline
        card = (Path(state["classifier"]) / "README.md").read_text()
        assert "## What the pretraining bought" in card and "random-init" in card
        assert state["encoder"] == "spark-organamnist-tiny" and state["vs_random_init"]["n_train"] == 66
        assert "[1/3] encoder spark-organamnist-tiny" in text and "(running;" in text
    finally:
        rc = _stop(proc)
    assert rc in (0, -signal.SIGTERM, 128 + signal.SIGTERM, 2)  # make reports the server's SIGTERM as 2
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/livez", timeout=5)  # nothing left listening

    # a second run reuses every step and serves again
    log2 = tmp_path / "make-run-2.log"
    proc = _make_run(tmp_path, port, log2)
    try:
        text = _wait_ready(proc, log2, timeout=300)
        assert text.count("current, reused") == 3
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=30).status_code == 200
    finally:
        _stop(proc)


def test_the_main_job_prefers_the_encoder_whose_card_shows_it_helped_most(tmp_path: Path) -> None:
    """`make pretrain` encoders in the hub: a measured fine-tune gain outranks frozen-feature figures; an
    encoder without either is never preferred; no such encoder: the job's own short SparK run."""
    from hub import ModelConfig
    from quickstart import best_local_encoder

    def encoder(name: str, metrics: dict) -> None:
        d = tmp_path / name
        d.mkdir()
        ModelConfig(name=name, method=name.split("-")[0], metrics=metrics).save(d)
        (d / "model.safetensors").write_bytes(b"")

    def probe(auc: float) -> dict:
        return {"frozen_features": {"encoder": {"recalibrated": {"linear_probe": {"auc": auc}}}}}

    assert best_local_encoder(tmp_path) is None
    encoder("byol-organamnist-cpu", probe(0.95))
    encoder("swav-organamnist-cpu", {})
    encoder("spark-organamnist-quick", probe(0.99))  # the job's own short run is not a candidate
    assert best_local_encoder(tmp_path) == "byol-organamnist-cpu"
    study = {"organamnist.npz:split": {"test": {"1%": {"delta_auc_vs_scratch": 0.01}}}}
    encoder("spark-organamnist-cpu", probe(0.90) | {"finetune_study": study})
    assert best_local_encoder(tmp_path) == "spark-organamnist-cpu"
