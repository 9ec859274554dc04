"""A real BentoML server (`cthub serve` in a subprocess) answering real DICOM uploads, junk, the demo at /ui
through gradio_client, and a real headless browser rendering the demo page."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from ctdata.preprocess import PreprocessConfig, prepare
from cthub.cli import main as cthub_main
from export import export_onnx
from hub import ModelConfig, ResNet50, save_pretrained
from hub.io import load_dir

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["liver", "kidney", "lung"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ct_512() -> Path:
    """A 512x512 uncompressed CT slice from pydicom-data (installed by the dev extra)."""
    from pydicom.data import get_testdata_file

    p = get_testdata_file("693_UNCI.dcm", download=False)
    if not p:
        pytest.skip("needs pydicom-data (693_UNCI.dcm)")
    return Path(p)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """Export a real 3-class ResNet50, start `cthub serve` on a free port, yield (base URL, model dir, log)."""
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    cfg = ModelConfig(name="tiny-serve", num_classes=3, labels=LABELS,
                      preprocessing=PreprocessConfig(input_size=64))
    model_dir = save_pretrained(ResNet50(num_classes=3), root / "model", cfg)
    export_onnx(model_dir)
    port = free_port()
    log = root / "server.log"
    env = os.environ | {"PYTHONPATH": str(ROOT), "BENTOML_HOME": str(root / "bentoml"),
                        "BENTOML_DO_NOT_TRACK": "True", "GRADIO_ANALYTICS_ENABLED": "False",
                        "CTHUB_MAX_UPLOAD_MB": "2"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cthub", "serve", "--model", str(model_dir),
                                 "--port", str(port)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"server exited during start-up:\n{log.read_text()[-3000:]}")
            if "cthub is ready" in log.read_text():
                break
            time.sleep(1)
        else:
            pytest.fail(f"server not ready in 240 s:\n{log.read_text()[-3000:]}")
        yield base, model_dir, log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the session we started: cthub serve and its BentoML children
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def post(base: str, path: Path | bytes, route: str = "/predict", **fields: str) -> httpx.Response:
    data = path.read_bytes() if isinstance(path, Path) else path
    # curl's default part type; application/dicom is accepted the same way
    files = {"file": ("upload.dcm", data, "application/octet-stream")}
    return httpx.post(base + route, files=files, data=fields, timeout=60)


def torch_reference(model_dir: Path, dcm: Path) -> np.ndarray:
    model = load_dir(model_dir)
    x = prepare(dcm, model.config.preprocessing)[None]
    with torch.inference_mode():
        return torch.softmax(model(x).double(), 1)[0].numpy()


def test_start_up_prints_urls_and_health_endpoints_answer(server) -> None:
    base, _, log = server
    text = log.read_text()
    for part in ("/predict", "/ui/", "cthub: serving", "with onnx"):
        assert part in text
    assert httpx.get(base + "/readyz", timeout=10).status_code == 200
    assert httpx.get(base + "/livez", timeout=10).status_code == 200
    spec = httpx.get(base + "/docs.json", timeout=10).json()
    assert {"/predict", "/predict_batched", "/model"} <= set(spec["paths"])


@pytest.mark.parametrize("which", ["ct_small", "ct_512"])
def test_predict_real_dicom_matches_in_process_torch(server, ct_small_dcm: Path, which: str) -> None:
    base, model_dir, _ = server
    dcm = ct_small_dcm if which == "ct_small" else ct_512()
    r = post(base, dcm)
    assert r.status_code == 200, r.text
    body = r.json()
    probs = body["probabilities"]
    assert list(probs) == LABELS and abs(sum(probs.values()) - 1.0) < 1e-5
    ref = torch_reference(model_dir, dcm)
    assert np.allclose([probs[k] for k in LABELS], ref, atol=1e-4)
    assert body["label"] == LABELS[int(np.argmax(ref))]
    assert body["model"]["name"] == "tiny-serve" and body["model"]["backend"] == "onnx"
    assert len(body["model"]["sha256"]) == 64
    assert body["preprocessing"]["input_size"] == 64 and body["warnings"] == []
    assert body["image"]["rows"] == (128 if which == "ct_small" else 512)


def test_junk_and_truncated_uploads_are_400_json(server, ct_small_dcm: Path) -> None:
    base, _, _ = server
    junk = post(base, os.urandom(4096))
    assert junk.status_code == 400
    assert junk.json()["error"] == "invalid_input" and "DICOM" in junk.json()["detail"]
    truncated = post(base, ct_small_dcm.read_bytes()[:3000])
    assert truncated.status_code == 400 and truncated.json()["error"] == "invalid_input"
    empty = post(base, b"")
    assert empty.status_code == 400
    fake = post(base, b"\0" * 128 + b"DICM" + os.urandom(2048))  # the magic marker, then garbage
    assert fake.status_code == 400 and fake.json()["error"] == "invalid_input"
    text = post(base, ROOT.joinpath("tests", "conftest.py").read_bytes())  # text with a .dcm name
    assert text.status_code == 400
    big = post(base, b"\0" * (3 * 2**20))  # the server was started with a 2 MB limit
    assert big.status_code == 413 and big.json()["error"] == "payload_too_large"
    # the server is still healthy after bad input
    assert post(base, ct_small_dcm).status_code == 200


def test_window_override_unknown_preset_and_unknown_model(server, ct_small_dcm: Path) -> None:
    base, _, _ = server
    plain = post(base, ct_small_dcm).json()
    lung = post(base, ct_small_dcm, window="lung")
    assert lung.status_code == 200
    body = lung.json()
    assert body["preprocessing"]["mapping"] == "window" and body["preprocessing"]["window"] == "lung"
    assert any("window override" in w for w in body["warnings"])
    assert body["probabilities"] != plain["probabilities"]  # a different input reached the model
    explicit = post(base, ct_small_dcm, window_center="-600", window_width="1500").json()
    assert np.allclose(list(explicit["probabilities"].values()), list(body["probabilities"].values()), atol=1e-6)
    bad = post(base, ct_small_dcm, window="nonsense")
    assert bad.status_code == 400 and bad.json()["error"] == "config_error"
    half = post(base, ct_small_dcm, window_center="40")
    assert half.status_code == 400
    other = post(base, ct_small_dcm, model="some-other-model")
    assert other.status_code == 404 and other.json()["error"] == "model_not_found"


def test_batched_endpoint_under_concurrency(server, ct_small_dcm: Path) -> None:
    base, _, _ = server
    single = post(base, ct_small_dcm).json()["probabilities"]
    data = ct_small_dcm.read_bytes()

    def one(i: int) -> httpx.Response:
        payload = data if i % 3 else b"not a dicom"
        return httpx.post(base + "/predict_batched", files={"files": ("x.dcm", payload)}, timeout=120)

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(6)))
    for i, r in enumerate(results):
        assert r.status_code == 200, r.text
        (item,) = r.json()
        if i % 3:
            assert np.allclose(list(item["probabilities"].values()), list(single.values()), atol=1e-5)
        else:
            assert item["status"] == 400 and item["error"] == "invalid_input"


def test_demo_at_ui_through_gradio_client(server, ct_small_dcm: Path) -> None:
    from gradio_client import Client, handle_file

    base, _, _ = server
    api = post(base, ct_small_dcm, window="bone").json()
    client = Client(f"{base}/ui/", verbose=False)
    image, label, details = client.predict(handle_file(str(ct_small_dcm)), "bone", 400, 1800, True,
                                           api_name="/predict")
    assert Path(image).is_file()
    assert label["label"] == api["label"]
    conf = {c["label"]: c["confidence"] for c in label["confidences"]}
    assert np.allclose([conf[k] for k in LABELS], [api["probabilities"][k] for k in LABELS], atol=1e-5)
    details = details if isinstance(details, dict) else json.loads(Path(details).read_text())
    assert details["preprocessing"]["window_center"] == 400 and details["model"]["name"] == "tiny-serve"
    assert details["class_activation_map"] is True  # ONNX backend: torch loaded on demand for the CAM


def test_demo_page_renders_in_headless_chromium(server) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("needs Debian's chromium (apt-get install -y chromium)")
    base, _, _ = server
    with tempfile.TemporaryDirectory() as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-background-networking", "--disable-component-update", "--no-first-run",
               f"--user-data-dir={profile}", "--virtual-time-budget=20000", "--dump-dom", f"{base}/ui/"]
        dom = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=150).stdout
    # rendered by Gradio's JavaScript, not present in the served HTML
    assert 'id="dicom-upload"' not in httpx.get(f"{base}/ui/", timeout=10).text
    for elem_id in ("dicom-upload", "window-preset", "window-center", "show-cam", "predict-button",
                    "windowed-image"):
        assert f'id="{elem_id}"' in dom, elem_id
    assert "Window preset" in dom and "not a medical device" in dom


def test_serve_with_missing_model_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cthub_main(["serve", "--model", str(tmp_path / "absent"), "--port", str(free_port())]) == 2
    assert "not found" in capsys.readouterr().err
