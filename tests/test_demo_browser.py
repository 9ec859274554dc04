"""The demo as a person uses it: Debian's chromium (headless, driven by Playwright; every request to anything
but 127.0.0.1 is aborted) opens /ui of a real `cthub serve` (the BentoML API, the model in its worker, the
demo mounted), uploads a real DICOM file, waits for the prediction, moves the window slider, turns the class
activation map on, clicks a pixel, then uploads an MR slice (refused, with a message) and the CT slice again.
Each step is saved as a screenshot under the test's tmp dir; what the page shows is compared with the REST
API's answer for the same file and with HU computed here."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
from helpers import need, png_pixels
from test_serving_api import metric
from test_serving_demo import ANALYSIS, LABELS, binary_classifier, view_args, windowed

from ctdata import read_dicom
from serving.launch import Server, running_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 180_000  # a bound for a stuck page, not a speed requirement


@pytest.fixture(scope="module")
def chromium() -> Path:
    pytest.importorskip("playwright.sync_api", reason="needs the playwright package (dev extra)")
    if not CHROMIUM.is_file():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)")
    return CHROMIUM


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path, Path]]:
    """`cthub serve` of a small exported classifier; its TMPDIR, where the demo's private upload directory is
    made (GRADIO_TEMP_DIR is not set: the product's own default is under test)."""
    root = tmp_path_factory.mktemp("browser")
    model_dir = binary_classifier(root / "tiny-brain")
    tmp = root / "tmp"
    tmp.mkdir()
    env = {"BENTOML_HOME": str(root / "bentoml"), "TMPDIR": str(tmp), "CTHUB_BATCH_MAX_SIZE": "4"}
    with running_server(model_dir, root / "server.log", env={**env, "GRADIO_TEMP_DIR": ""}) as server:
        yield server, model_dir, tmp


class Page:
    """The demo page in chromium, with the helpers the steps share."""

    def __init__(self, page: Any, base: str, shots: Path) -> None:
        self.page, self.base, self.shots = page, base, shots

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def image_src(self) -> str:
        return str(self.page.get_attribute("#windowed-image img", "src"))

    def image(self) -> np.ndarray:
        """The slice as served to the page (the PNG behind the <img>), at its own resolution."""
        return png_pixels(httpx.get(self.image_src(), timeout=30).content).astype(np.int16)

    def on_screen(self) -> np.ndarray:
        """The slice as the browser draws it."""
        return png_pixels(self.page.locator("#windowed-image img").screenshot()).astype(np.int16)

    def wait_new_image(self, old_src: str) -> None:
        self.page.wait_for_function(
            "old => { const i = document.querySelector('#windowed-image img'); return i && i.complete && "
            "i.naturalWidth > 0 && i.src !== old; }",
            arg=old_src,
        )

    def value(self, selector: str) -> str:
        return str(self.page.input_value(selector))


def only_loopback(blocked: list[str]) -> Any:
    """A Playwright route handler: 127.0.0.1 (and data:/blob: URLs) passes, everything else is aborted."""

    def handle(route: Any) -> None:
        url = route.request.url
        if url.startswith(("data:", "blob:")) or urlparse(url).hostname == "127.0.0.1":
            route.continue_()
        else:
            blocked.append(url)
            route.abort()

    return handle


def test_demo_mounted_at_ui_answers_gradio_client(
    served: tuple[Server, Path, Path], gradio_client_temp_dir: Path, ct_small_dcm: Path
) -> None:
    """The mounted demo's public API: the same answer as POST /predict for the same file, from the same
    inference session."""
    from gradio_client import Client, handle_file

    tmp_path = gradio_client_temp_dir

    server, _, _ = served
    api = httpx.post(
        f"{server.base}/predict", files={"file": ("x.dcm", ct_small_dcm.read_bytes())}, timeout=120
    )
    client = Client(f"{server.base}/ui/", verbose=False, download_files=str(tmp_path))
    client.predict(api_name="/models")
    passes = metric(server.base, "cthub_forward_batch_size_count", maps="true")
    out = client.predict([handle_file(str(ct_small_dcm))], None, *view_args(cam=True), api_name="/load")
    # the demo analysed through the server's batched session (one forward pass with maps for one slice,
    # counted on /metrics), not through a second ONNX session of its own
    assert metric(server.base, "cthub_forward_batch_size_count", maps="true") == passes + 1
    named = dict(zip(ANALYSIS, out, strict=True))
    answer = api.json()
    assert named["prediction"] == answer["label"]
    got = {c["label"]: c["confidence"] for c in named["probabilities"]["confidences"]}
    assert got == pytest.approx(answer["probabilities"], abs=1e-5)
    assert named["details"]["model"]["sha256"] == answer["model"]["sha256"]
    assert named["details"]["preprocessing"] == answer["preprocessing"]
    assert Path(named["image"]).is_file()


def test_demo_in_headless_chromium(
    chromium: Path, served: tuple[Server, Path, Path], tmp_path: Path, ct_small_dcm: Path
) -> None:
    from playwright.sync_api import sync_playwright

    server, _, server_tmp = served
    api = httpx.post(
        f"{server.base}/predict", files={"file": ("x.dcm", ct_small_dcm.read_bytes())}, timeout=120
    ).json()
    hu = read_dicom(ct_small_dcm).pixels[0]
    mr_small = need("MR_small.dcm")
    shots = tmp_path / "screenshots"
    shots.mkdir()
    blocked: list[str] = []
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        try:
            ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
            ctx.route("**/*", only_loopback(blocked))
            page = ctx.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.set_default_timeout(TIMEOUT_MS)
            p = Page(page, server.base, shots)

            # 1. the page: the notice, the controls, the served model in the picker
            page.goto(f"{server.base}/ui/", wait_until="domcontentloaded")
            page.wait_for_selector("#dicom-upload input[type=file]", state="attached")
            page.wait_for_function(
                "() => document.querySelector('#model-picker input')?.value.includes('tiny-brain')"
            )
            assert "Research use only, not for diagnosis" in page.inner_text("#research-notice")
            footer = page.inner_text("footer")
            assert "Runs" not in footer and "Use via API" in footer  # no run history (kept uploads)
            assert httpx.get(f"{server.base}/ui/gradio_api/runs", timeout=30).status_code == 404
            p.shot("1-page")

            # 2. upload a real DICOM file: the prediction appears, as the REST API gives it
            page.set_input_files("#dicom-upload input[type=file]", str(ct_small_dcm))
            page.wait_for_function("() => document.querySelector('#prediction textarea')?.value.length > 0")
            p.wait_new_image("")
            # the upload box is emptied once its files are read (file names may carry patient data)
            page.wait_for_function(
                "n => !document.querySelector('#dicom-upload').innerText.includes(n)", arg=ct_small_dcm.name
            )
            p.shot("2-predicted")
            assert p.value("#prediction textarea") == api["label"]  # the operating point's decision
            for k in LABELS:
                pct = page.inner_text(f"#probabilities [data-testid='{k}-confidence-set'] .confidence")
                assert pct.strip() == f"{round(100 * api['probabilities'][k])}%", (k, pct)
            assert "tiny-brain" in page.inner_text("#model-card")
            assert "this slice" in page.inner_text("#slice-info")
            own = p.image()
            assert own.shape == (128, 128, 3) and np.abs(own[..., 0] - windowed(hu, 35, 80)).max() <= 1
            before = p.on_screen()

            # 3. move the window-width slider: the slice is redrawn with the new window
            src = p.image_src()
            track = page.locator("#window-width input[type=range]")
            box = track.bounding_box()
            assert box is not None
            track.click(position={"x": box["width"] * 0.3, "y": box["height"] / 2})
            p.wait_new_image(src)
            p.shot("3-window")
            center = float(p.value("#window-center input[type=number]"))
            width = float(p.value("#window-width input[type=number]"))
            assert width > 500 and p.value("#window-preset input") == "custom"
            windowed_now = p.image()
            assert np.abs(windowed_now[..., 0] - windowed(hu, center, width)).max() <= 1
            after = p.on_screen()
            assert before.shape == after.shape and np.abs(before - after).mean() > 5  # visibly another image

            # 4. the class activation map on: coloured, unlike the plain slice
            src = p.image_src()
            page.check("#show-cam input[type=checkbox]")
            p.wait_new_image(src)
            p.shot("4-cam")
            cam = p.image()
            assert (cam[..., 0] != cam[..., 2]).mean() > 0.5 and (
                windowed_now[..., 0] == windowed_now[..., 2]
            ).all()
            assert np.abs(cam - windowed_now).mean() > 10
            assert np.abs(p.on_screen() - after).mean() > 5

            # 5. click a pixel: its HU value, read at the slice's own resolution
            img = page.locator("#windowed-image img")
            box = img.bounding_box()
            assert box is not None
            img.click(position={"x": box["width"] * 0.3, "y": box["height"] * 0.7})
            page.wait_for_function("() => document.querySelector('#hu-readout textarea')?.value.length > 0")
            p.shot("5-readout")
            readout = p.value("#hu-readout textarea")
            m = re.fullmatch(r"x (\d+), y (\d+): (-?[\d.]+) HU", readout)
            assert m is not None, readout
            x, y, value = int(m[1]), int(m[2]), float(m[3])
            assert abs(x - 0.3 * 128) <= 2 and abs(y - 0.7 * 128) <= 2, readout
            assert value == hu[y, x]

            # 6. an MR slice: a message in the page saying why, no stack trace; then a CT slice again
            page.set_input_files("#dicom-upload input[type=file]", str(mr_small))
            page.wait_for_selector("text=modality MR is not among the accepted (CT)")
            p.shot("6-refused")
            body = page.inner_text("body")
            assert "Traceback" not in body and 'File "' not in body
            page.set_input_files("#dicom-upload input[type=file]", str(ct_small_dcm))
            # read: the box (still listing the refused file until now) is emptied
            page.wait_for_function(
                "() => !document.querySelector('#dicom-upload').innerText.includes('.dcm')"
            )
            page.wait_for_selector("#windowed-image img")
            p.shot("7-again")
            assert p.value("#prediction textarea") == api["label"]
            assert np.array_equal(p.image(), cam)  # the view as it was: custom window, map on
        finally:
            browser.close()
    assert errors == [], errors
    assert all(urlparse(u).hostname != "127.0.0.1" for u in blocked)
    for name in ("1-page", "2-predicted", "3-window", "4-cam", "5-readout", "6-refused", "7-again"):
        assert (shots / f"{name}.png").stat().st_size > 10_000, name
    # the upload went to the demo's private directory under the server's TMPDIR and was deleted once read
    private = [d for d in server_tmp.glob("cthub-demo-*") if d.is_dir()]
    assert len(private) == 1 and private[0].stat().st_mode & 0o777 == 0o700
    assert not [f for f in private[0].rglob("*") if f.is_file() and f.read_bytes()[128:132] == b"DICM"]
