"""A real BentoML server (`cthub serve` in a subprocess) answering real DICOM uploads, junk, concurrent
batched uploads, the demo at /ui through gradio_client and through a real headless Chromium, and never
echoing or logging patient data planted in the uploads."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from ctdata.preprocess import PreprocessConfig, prepare
from cthub.cli import main as cthub_main
from export import export_onnx
from hub import ModelConfig, ResNet50, save_pretrained
from hub.io import load_dir, sha256_file
from serving.demo import MODEL_DEFAULT

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["liver", "kidney", "lung"]
# Real CT slices with pairwise different content at the model's input (693_J2KI/J2KR decode to the same
# pixels as 693_UNCI/UNCR, so they are not listed): pydicom's wheel, then pydicom-data (dev extra).
DISTINCT_CT = (
    "CT_small.dcm",
    "J2K_pixelrep_mismatch.dcm",
    "693_UNCI.dcm",
    "693_UNCR.dcm",
    "eCT_Supplemental.dcm",
)
ATOL = 1e-4  # ONNX Runtime (server) vs torch (here) on the same preprocessed input
BATCH_LOG = re.compile(r"predict_batched: batch of (\d+) uploads")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pydicom_file(name: str) -> Path | None:
    from pydicom.data import get_testdata_file

    p = get_testdata_file(name, download=False)
    return Path(p) if p else None


def ct_512() -> Path:
    """A 512x512 uncompressed CT slice from pydicom-data (installed by the dev extra)."""
    p = pydicom_file("693_UNCI.dcm")
    if p is None:
        pytest.skip("needs pydicom-data (693_UNCI.dcm)")
    return p


@pytest.fixture(scope="module")
def distinct_ct() -> list[Path]:
    files = [p for name in DISTINCT_CT if (p := pydicom_file(name)) is not None]
    if len(files) < 3:
        pytest.skip("needs at least three distinct real CT DICOM files (install pydicom-data)")
    return files


def calibrated_resnet(cfg: ModelConfig, sources: list[Path]) -> ResNet50:
    """A random-init 3-class ResNet50 whose BatchNorm statistics are estimated on real CT slices.

    With the default statistics (mean 0, var 1) a random ResNet50's softmax saturates at ~1.0 for one class
    on every input, so every answer looks alike and a swapped answer would pass unnoticed; with real
    statistics the probabilities differ between slices by several hundredths.
    """
    torch.manual_seed(0)
    model = ResNet50(num_classes=cfg.num_classes)
    x = torch.stack([prepare(p, cfg.preprocessing) for p in sources])
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration passes
    model.train()
    with torch.no_grad():
        model(torch.cat([x, x.flip(-1)]))
    return model.eval()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, distinct_ct: list[Path]):
    """Export a real 3-class ResNet50, start `cthub serve` on a free port; yield (base URL, model, log)."""
    root = tmp_path_factory.mktemp("serve")
    cfg = ModelConfig(
        name="tiny-serve", num_classes=3, labels=LABELS, preprocessing=PreprocessConfig(input_size=64)
    )
    model_dir = save_pretrained(calibrated_resnet(cfg, distinct_ct[:2]), root / "model", cfg)
    export_onnx(model_dir)
    port = free_port()
    log = root / "server.log"
    env = os.environ | {
        "PYTHONPATH": str(ROOT),
        "BENTOML_HOME": str(root / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "True",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "CTHUB_MAX_UPLOAD_MB": "2",
    }
    with open(log, "wb") as out:  # the server's stdout and stderr, both
        proc = subprocess.Popen(
            [sys.executable, "-m", "cthub", "serve", "--model", str(model_dir), "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
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


@pytest.fixture(scope="module")
def reference(server) -> Callable[[Path], np.ndarray]:
    """Probabilities of the served model's torch weights, called here on ctdata.prepare of each file."""
    _, model_dir, _ = server
    model = load_dir(model_dir)
    cache: dict[str, np.ndarray] = {}

    def ref(path: Path) -> np.ndarray:
        if str(path) not in cache:
            x = prepare(path, model.config.preprocessing)[None]
            with torch.inference_mode():
                cache[str(path)] = torch.softmax(model(x).double(), 1)[0].numpy()
        return cache[str(path)]

    return ref


def post(base: str, path: Path | bytes, route: str = "/predict", **fields: str) -> httpx.Response:
    data = path.read_bytes() if isinstance(path, Path) else path
    # curl's default part type; application/dicom is accepted the same way
    files = {"file": ("upload.dcm", data, "application/octet-stream")}
    return httpx.post(base + route, files=files, data=fields, timeout=60)


def probs_of(item: dict) -> np.ndarray:
    return np.array([item["probabilities"][k] for k in LABELS])


def metric(base: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus sample over series whose labels include `labels` (0 when absent)."""
    total = 0.0
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_start_up_prints_urls_and_health_endpoints_answer(server) -> None:
    base, _, log = server
    text = log.read_text()
    for part in (
        "/predict",
        "/ui/",
        "cthub: serving tiny-serve with onnx [CPUExecutionProvider]",
        "cthub: serving tiny-serve (onnx, CPUExecutionProvider)",
    ):  # the CLI's line, the worker's
        assert part in text
    for probe in ("/readyz", "/livez", "/healthz"):  # BentoML's probes: 200 and a blank text/plain body
        r = httpx.get(base + probe, timeout=10)
        assert r.status_code == 200 and r.text.strip() == "", (probe, r.text)
        assert r.headers["content-type"].startswith("text/plain"), probe
    spec = httpx.get(base + "/docs.json", timeout=10).json()
    assert {"/predict", "/predict_batched", "/model"} <= set(spec["paths"])
    assert spec["info"]["title"] == "cthub"


def test_metrics_count_requests_by_endpoint_and_status(server, ct_small_dcm: Path) -> None:
    base, _, _ = server
    ok = {"endpoint": "/predict", "http_response_code": "200"}
    bad = {"endpoint": "/predict", "http_response_code": "400"}
    before_ok = metric(base, "bentoml_service_request_total", **ok)
    before_bad = metric(base, "bentoml_service_request_total", **bad)
    assert post(base, ct_small_dcm).status_code == 200
    assert post(base, b"not a dicom").status_code == 400
    assert metric(base, "bentoml_service_request_total", **ok) == before_ok + 1
    assert metric(base, "bentoml_service_request_total", **bad) == before_bad + 1


def test_model_endpoint_describes_the_served_model(server) -> None:
    base, model_dir, _ = server
    r = httpx.post(base + "/model", timeout=10)
    assert r.status_code == 200
    body = r.json()
    cfg = ModelConfig.load(model_dir)
    sha = sha256_file(model_dir / "model.safetensors")
    assert body["name"] == "tiny-serve" and body["sha256"] == sha and body["version"] == sha[:12]
    assert body["backend"] == "onnx" and body["providers"] == ["CPUExecutionProvider"]
    assert body["labels"] == LABELS and body["task"] is None and body["threshold"] is None
    assert body["preprocessing"] == cfg.preprocessing.to_dict() and body["metrics"] == {}


@pytest.mark.parametrize("which", ["ct_small", "ct_512"])
def test_predict_real_dicom_matches_in_process_torch(
    server, reference, ct_small_dcm: Path, which: str
) -> None:
    base, model_dir, _ = server
    dcm = ct_small_dcm if which == "ct_small" else ct_512()
    r = post(base, dcm)
    assert r.status_code == 200, r.text
    body = r.json()
    probs = body["probabilities"]
    assert list(probs) == LABELS and abs(sum(probs.values()) - 1.0) < 1e-5
    ref = reference(dcm)
    assert np.allclose(probs_of(body), ref, atol=ATOL)
    assert body["label"] == LABELS[int(np.argmax(ref))]
    assert body["model"]["name"] == "tiny-serve" and body["model"]["backend"] == "onnx"
    assert body["model"]["sha256"] == sha256_file(model_dir / "model.safetensors")
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
    for r in (junk, truncated, empty, fake, text, big):
        assert set(r.json()) >= {"error", "type", "detail"}
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
    assert np.abs(probs_of(body) - probs_of(plain)).max() > 10 * ATOL  # a different input reached the model
    explicit = post(base, ct_small_dcm, window_center="-600", window_width="1500").json()
    assert np.allclose(probs_of(explicit), probs_of(body), atol=1e-6)
    bad = post(base, ct_small_dcm, window="nonsense")
    assert bad.status_code == 400 and bad.json()["error"] == "config_error"
    half = post(base, ct_small_dcm, window_center="40")
    assert half.status_code == 400
    other = post(base, ct_small_dcm, model="some-other-model")
    assert other.status_code == 404 and other.json()["error"] == "model_not_found"


def test_batched_answers_keep_the_order_of_files_in_one_request(server, reference, distinct_ct) -> None:
    base, _, _ = server
    a, b = distinct_ct[:2]
    parts = [
        ("files", ("a.dcm", a.read_bytes(), "application/dicom")),
        ("files", ("junk.dcm", b"not a dicom", "application/dicom")),
        ("files", ("b.dcm", b.read_bytes(), "application/dicom")),
    ]
    r = httpx.post(base + "/predict_batched", files=parts, timeout=120)
    assert r.status_code == 200, r.text
    first, junk, second = r.json()
    assert np.allclose(probs_of(first), reference(a), atol=ATOL)
    assert junk["status"] == 400 and junk["error"] == "invalid_input"
    assert np.allclose(probs_of(second), reference(b), atol=ATOL)


def test_batched_endpoint_under_concurrency(server, reference, distinct_ct) -> None:
    """Different real files posted at once from several threads: every answer is the model's answer for
    its own file (not a neighbour's in the batch), and BentoML merged requests into a batch of more than one
    (seen in the service's own log line and in BentoML's adaptive_batch_size histogram)."""
    base, _, log = server
    refs = {p: reference(p) for p in distinct_ct}
    for p, q in combinations(distinct_ct, 2):  # a swapped answer could not pass the comparison below
        assert np.abs(refs[p] - refs[q]).max() > 20 * ATOL, (p.name, q.name)
    jobs: list[Path | bytes] = [*distinct_ct, b"not a dicom", *distinct_ct[:2]]
    batch = {"method_name": "predict_batched"}
    for _ in range(3):  # a round in which every request happened to run alone proves nothing: retry
        mark = len(log.read_bytes())
        items0 = metric(base, "bentoml_service_adaptive_batch_size_sum", **batch)
        batches0 = metric(base, "bentoml_service_adaptive_batch_size_count", **batch)
        start = threading.Barrier(len(jobs))

        def one(job: Path | bytes, start: threading.Barrier = start) -> httpx.Response:
            data = job.read_bytes() if isinstance(job, Path) else job
            start.wait(timeout=60)
            part = {"files": ("x.dcm", data, "application/dicom")}
            return httpx.post(base + "/predict_batched", files=part, timeout=180)

        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(one, jobs))
        for job, r in zip(jobs, results, strict=True):
            assert r.status_code == 200, r.text
            (item,) = r.json()
            if isinstance(job, bytes):
                assert item["status"] == 400 and item["error"] == "invalid_input"
                continue
            got = probs_of(item)
            assert np.allclose(got, refs[job], atol=ATOL), job.name
            assert min(refs, key=lambda p: np.abs(refs[p] - got).max()) == job
            assert item["label"] == LABELS[int(np.argmax(refs[job]))]
        sizes = [int(n) for n in BATCH_LOG.findall(log.read_bytes()[mark:].decode(errors="replace"))]
        assert sum(sizes) == len(jobs)  # every upload went through exactly one logged batch
        assert metric(base, "bentoml_service_adaptive_batch_size_sum", **batch) - items0 == len(jobs)
        assert metric(base, "bentoml_service_adaptive_batch_size_count", **batch) - batches0 == len(sizes)
        if max(sizes) > 1:
            break
    else:
        pytest.fail(f"no batch of more than one upload formed in 3 rounds (last: {sizes})")


def test_demo_at_ui_through_gradio_client(server, ct_small_dcm: Path) -> None:
    from gradio_client import Client, handle_file

    base, _, _ = server
    api = post(base, ct_small_dcm, window="bone").json()
    client = Client(f"{base}/ui/", verbose=False)
    image, decision, label, details = client.predict(
        handle_file(str(ct_small_dcm)), "bone", 400, 1800, True, api_name="/predict"
    )
    assert Path(image).is_file()
    assert decision == api["label"] == label["label"]  # no operating point here: the decision is the argmax
    conf = {c["label"]: c["confidence"] for c in label["confidences"]}
    assert np.allclose([conf[k] for k in LABELS], probs_of(api), atol=1e-5)
    details = details if isinstance(details, dict) else json.loads(Path(details).read_text())
    assert details["preprocessing"]["window_center"] == 400 and details["model"]["name"] == "tiny-serve"
    assert details["class_activation_map"] is True  # ONNX backend: torch loaded on demand for the CAM


def test_demo_page_renders_in_headless_chromium(server, ct_small_dcm: Path, tmp_path: Path) -> None:
    """Debian's chromium driven by Playwright: upload a real DICOM, press Predict, read the rendered label."""
    sync_api = pytest.importorskip("playwright.sync_api")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("needs Debian's chromium (apt-get install -y chromium)")
    base, _, _ = server
    api = post(base, ct_small_dcm).json()  # the same file through the REST API, model default window
    # rendered by Gradio's JavaScript, not present in the served HTML
    assert 'id="dicom-upload"' not in httpx.get(f"{base}/ui/", timeout=10).text
    shots = tmp_path / "screenshots"
    shots.mkdir()
    flags = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ]
    with sync_api.sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=browser, headless=True, args=flags
        )
        try:
            page = ctx.pages[0] if ctx.pages else ctx.new_page()
            page.set_default_timeout(120_000)
            page.goto(f"{base}/ui/", wait_until="domcontentloaded")
            page.wait_for_selector("#predict-button")
            page.screenshot(path=str(shots / "1-loaded.png"), full_page=True)
            for elem_id in ("dicom-upload", "window-preset", "window-center", "show-cam", "windowed-image"):
                assert page.locator(f"#{elem_id}").count() == 1, elem_id
            body = page.inner_text("body")
            assert "Window preset" in body and "not a medical device" in body
            page.set_input_files("#dicom-upload input[type=file]", str(ct_small_dcm))
            page.wait_for_function(
                "n => document.querySelector('#dicom-upload').innerText.includes(n)", arg=ct_small_dcm.name
            )
            page.screenshot(path=str(shots / "2-uploaded.png"), full_page=True)
            page.click("#predict-button")
            page.wait_for_function("() => document.querySelector('#prediction textarea')?.value.length > 0")
            page.wait_for_selector("#windowed-image img")
            page.screenshot(path=str(shots / "3-predicted.png"), full_page=True)
            assert page.input_value("#prediction textarea") == api["label"]
            for k in LABELS:  # every class with the percentage the API gave for it
                pct = page.inner_text(f"#probabilities [data-testid='{k}-confidence-set'] .confidence")
                assert pct.strip() == f"{round(100 * api['probabilities'][k])}%", (k, pct)
            assert "tiny-serve" in page.inner_text("#details")
        finally:
            ctx.close()
    assert all((shots / f).stat().st_size > 0 for f in ("1-loaded.png", "2-uploaded.png", "3-predicted.png"))


# Distinctive stand-ins for patient data, planted into real DICOM files; none may come back or be logged.
PHI = {
    "PatientName": "Zyxwvutsky^Quorabelle",
    "PatientID": "PHI-ID-83417729",
    "PatientBirthDate": "19070214",
    "StudyDate": "19990531",
    "InstitutionName": "Xanthoria Memorial Clinic",
}
PHI_NEEDLES = (
    "Zyxwvutsky",
    "Quorabelle",
    "PHI-ID-83417729",
    "83417729",
    "19070214",
    "1907-02-14",
    "19990531",
    "1999-05-31",
    "Xanthoria",
)


def plant_phi(src: Path, dst: Path, **changes: str) -> Path:
    import pydicom

    ds = pydicom.dcmread(src)
    for keyword, value in (PHI | changes).items():
        setattr(ds, keyword, value)
    ds.save_as(dst)
    return dst


def test_planted_patient_data_never_reaches_responses_or_the_log(server, distinct_ct, tmp_path: Path) -> None:
    from gradio_client import Client, handle_file

    base, _, log = server
    ct_small = pydicom_file("CT_small.dcm")
    j2k = pydicom_file("693_J2KI.dcm")
    assert ct_small is not None and j2k is not None
    sources = [ct_small, j2k, *distinct_ct]
    files = [plant_phi(src, tmp_path / f"slice_{i}.dcm") for i, src in enumerate(sources)]
    mr = plant_phi(ct_small, tmp_path / "slice_mr.dcm", Modality="MR")  # a warning path
    cut = tmp_path / "slice_cut.dcm"
    cut.write_bytes(files[0].read_bytes()[:4000])  # the header with the planted data, pixels cut: an error
    for f in (*files, mr, cut):  # the strings really are in what is sent
        assert b"Zyxwvutsky" in f.read_bytes() and b"Xanthoria" in f.read_bytes()

    mark = len(log.read_bytes())
    seen: list[str] = []
    for f in (*files, mr):
        r = post(base, f)
        assert r.status_code == 200, r.text
        seen.append(r.text)
    assert any("modality" in w.lower() for w in post(base, mr).json()["warnings"])
    r = post(base, cut)
    assert r.status_code == 400
    seen.append(r.text)
    parts = [
        ("files", (f"s{i}.dcm", f.read_bytes(), "application/dicom")) for i, f in enumerate([*files, cut])
    ]
    r = httpx.post(base + "/predict_batched", files=parts, timeout=180)
    assert r.status_code == 200 and len(r.json()) == len(files) + 1
    seen.append(r.text)
    client = Client(f"{base}/ui/", verbose=False)
    for f in (files[0], mr):
        _, decision, label, details = client.predict(
            handle_file(str(f)), MODEL_DEFAULT, 40, 400, False, api_name="/predict"
        )
        seen.append(json.dumps([decision, label, details]))
    with pytest.raises(Exception, match="truncated") as err:  # gradio_client's AppError: our message
        client.predict(handle_file(str(cut)), MODEL_DEFAULT, 40, 400, False, api_name="/predict")
    seen.append(str(err.value))
    time.sleep(1)  # let the access log lines of the last requests land
    logged = log.read_bytes()[mark:].decode(errors="replace")
    assert "/predict_batched" in logged and "/ui/gradio_api" in logged  # the log did record these requests
    for needle in PHI_NEEDLES:
        for i, text in enumerate(seen):
            assert needle.lower() not in text.lower(), (needle, i, text[:300])
        assert needle.lower() not in logged.lower(), needle


def test_serve_with_missing_model_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cthub_main(["serve", "--model", str(tmp_path / "absent"), "--port", str(free_port())]) == 2
    assert "not found" in capsys.readouterr().err
