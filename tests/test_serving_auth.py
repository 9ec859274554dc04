"""A second real server, configured as a hospital would: bearer-token auth from a secret file, CORS for one
origin, MR allowed besides CT, the demo off, the int8 ONNX variant of an abdominal OrganAMNIST classifier
whose export carries an out-of-distribution reference. Also: start-up fails fast, with a clear message,
when the ONNX file fails verification."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from helpers import calibrated, need, png_bytes, post

from ctdata.datasets import ORGANAMNIST_LABELS
from ctdata.preprocess import PreprocessConfig, prepare, prepare_batch
from export import export_onnx
from export.session import OnnxClassifier
from hub import ModelConfig, ResNet50, save_pretrained
from serving.launch import ROOT, free_port, running_server

TOKEN = "s3cr3t-token-for-tests"
ORIGIN = "https://viewer.hospital.example"
ATOL = 1e-5
ORGANS = ORGANAMNIST_LABELS


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def organ_model(root: Path, npz: Path) -> Path:
    """An 11-organ ResNet50 at 64 px (random weights, BatchNorm statistics from OrganAMNIST training images),
    exported with its OOD reference (train embeddings, threshold on val) and quantized to int8."""
    from export.quantize import Int8Tolerance, QuantSettings, quantize_int8

    cfg = ModelConfig(
        name="organ-tiny",
        num_classes=len(ORGANS),
        labels=ORGANS,
        preprocessing=PreprocessConfig(input_size=64),
        provenance={"data": str(npz)},
    )
    torch.manual_seed(0)
    images = np.load(npz)["train_images"][:256]
    model = calibrated(
        ResNet50(num_classes=len(ORGANS)), prepare_batch(images, cfg.preprocessing), flip=False
    )
    model_dir = save_pretrained(model, root / "organ", cfg)
    export_onnx(model_dir, data=npz, tolerance=1e-3, parity_images=32, ood_images=300)
    quantize_int8(
        model_dir,
        data=npz,
        settings=QuantSettings(calibration_images=32),
        eval_images=100,
        tolerance=Int8Tolerance(max_auc_drop=1.0),  # random weights: only the mechanics are tested here
        ood_images=300,
    )
    return model_dir


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, organamnist_npz: Path):
    root = tmp_path_factory.mktemp("serve-auth")
    model_dir = organ_model(root, organamnist_npz)
    secret = root / "token"
    secret.write_text(TOKEN + "\n")
    env = {
        "BENTOML_HOME": str(root / "bentoml"),
        "CTHUB_API_TOKEN_FILE": str(secret),
        "CTHUB_CORS_ORIGINS": ORIGIN,
        "CTHUB_ALLOW_MODALITIES": "CT,MR",
        "CTHUB_DEMO": "0",
    }
    with running_server(model_dir, root / "server.log", env=env, args=("--variant", "int8")) as srv:
        yield srv, model_dir


def test_bearer_token_required_everywhere_but_health(server) -> None:
    srv, _ = server
    ct = need("CT_small.dcm").read_bytes()
    for headers in (None, auth("wrong-token"), {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}):
        r = post(srv.base, ct, headers=headers)
        assert r.status_code == 401, headers
        assert r.json() == {
            "error": "unauthorized",
            "type": "AuthError",
            "detail": "this server requires 'Authorization: Bearer <token>'",
        }
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert post(srv.base, ct, headers=auth()).status_code == 200
    for path in ("/model", "/metrics", "/docs.json", "/"):
        assert httpx.get(srv.base + path, timeout=10).status_code == 401, path
        assert httpx.get(srv.base + path, headers=auth(), timeout=10).status_code == 200, path
    for probe in ("/readyz", "/livez", "/healthz"):
        assert httpx.get(srv.base + probe, timeout=10).status_code == 200, probe
    assert httpx.get(srv.base + "/ui/", headers=auth(), timeout=10).status_code == 404  # CTHUB_DEMO=0
    assert TOKEN not in srv.text()


def test_cors_allows_the_configured_origin_only(server) -> None:
    srv, _ = server
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    ok = httpx.options(srv.base + "/predict", headers={"Origin": ORIGIN} | preflight, timeout=10)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    other = httpx.options(srv.base + "/predict", headers={"Origin": "https://evil.example"} | preflight)
    assert other.headers.get("access-control-allow-origin") != "https://evil.example"
    r = post(srv.base, need("CT_small.dcm").read_bytes(), headers=auth() | {"Origin": ORIGIN})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN


def test_int8_variant_is_served_and_matches_its_file(server) -> None:
    srv, model_dir = server
    card = httpx.get(srv.base + "/model", headers=auth(), timeout=10).json()
    assert card["variant"] == "int8" and card["labels"] == ORGANS
    sidecar = (model_dir / "model.int8.onnx.sha256").read_text().split()[0]
    assert card["onnx_sha256"] == sidecar and card["ood_threshold"] is not None
    clf = OnnxClassifier.from_model_dir(model_dir, "int8", threads=1)
    for name in ("CT_small.dcm", "693_UNCI.dcm"):
        path = need(name)
        body = post(srv.base, path.read_bytes(), headers=auth()).json()
        ref = clf.predict_proba(prepare(path, clf.config.preprocessing)[None])[0]
        assert np.allclose([body["probabilities"][k] for k in ORGANS], ref, atol=ATOL), name
        assert body["model"]["variant"] == "int8"


def test_operator_allowed_modality_is_analysed_with_a_warning(server) -> None:
    srv, _ = server
    r = post(srv.base, need("MR_small.dcm").read_bytes(), headers=auth())
    assert r.status_code == 200, r.text
    assert r.json()["image"]["hounsfield"] is False
    assert any("not a CT image in HU" in w for w in r.json()["warnings"])
    rgb = post(srv.base, need("SC_rgb.dcm").read_bytes(), headers=auth())
    assert rgb.status_code == 422  # OT is still not allowed


def test_ood_signal_in_every_answer(server, organamnist_npz: Path, head_ct_dir: Path) -> None:
    """Its own test images (OrganAMNIST, as PNG) are rarely flagged; head CT slices mostly are."""
    srv, _ = server
    test = np.load(organamnist_npz)["test_images"]
    own = [
        post(srv.base, png_bytes(img), "/predict_image", headers=auth()).json()
        for img in test[:: len(test) // 30][:30]
    ]
    heads = sorted(head_ct_dir.glob("*.png"))[::20]
    foreign = [post(srv.base, p.read_bytes(), "/predict_image", headers=auth()).json() for p in heads]
    for body in own + foreign:
        assert set(body["ood"]) >= {"score", "threshold", "warning"} and body["ood"]["available"] is True
    threshold = own[0]["ood"]["threshold"]
    own_flagged = np.mean([b["ood"]["warning"] for b in own])
    head_flagged = np.mean([b["ood"]["warning"] for b in foreign])
    assert own_flagged <= 0.1, own_flagged  # the threshold is the 99th percentile of validation scores
    flagged = [b for b in foreign if b["ood"]["warning"]]
    for b in flagged:
        assert b["ood"]["score"] > threshold and any("out-of-distribution" in w for w in b["warnings"])
    # measured with this fixture (PPCA-Mahalanobis reference of export.ood): 1 of 30 own test images and
    # 84% of all 200 head CT slices (8 of these 10) above the threshold
    assert head_flagged >= 0.6, sorted(round(b["ood"]["score"], 1) for b in foreign)


def test_start_up_fails_fast_when_the_onnx_file_fails_verification(server, tmp_path: Path) -> None:
    """`cthub serve` refuses before starting BentoML; `bentoml serve` (a container's entry point) stops as
    soon as its services find the file bad, instead of serving or respawning."""
    _, model_dir = server
    bad = tmp_path / "tampered"
    shutil.copytree(model_dir, bad)
    with open(bad / "model.onnx", "ab") as f:
        f.write(b"\0")  # one byte more than the export recorded
    env = os.environ | {"PYTHONPATH": str(ROOT), "BENTOML_HOME": str(tmp_path / "bentoml")}
    cli = [sys.executable, "-m", "cthub", "serve", "--model", str(bad), "--port", str(free_port())]
    t0 = time.monotonic()
    out = subprocess.run(cli, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 2 and "model.onnx" in out.stderr and "sha256" in out.stderr, out.stderr[-2000:]
    assert "Nothing was loaded" in out.stderr and time.monotonic() - t0 < 60
    direct = [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        "serving.entry:CTHubService",
        "--port",
        str(free_port()),
    ]
    t0 = time.monotonic()
    out = subprocess.run(
        direct,
        cwd=ROOT,
        env=env | {"CTHUB_SERVE_MODEL": str(bad)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    text = out.stdout + out.stderr
    # the default layout: the model is verified and loaded in the API worker, which stops the server
    assert "cthub: cannot start the API service: model.onnx" in text, text[-3000:]
    assert "cthub-inference" not in text
    assert time.monotonic() - t0 < 150  # start-up itself takes ~20-50 s on a busy core
