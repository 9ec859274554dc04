"""The region box as a person uses it: `cthub serve` of a model trained on organ-centred crops (a real
exported ResNet50 whose card says so), its demo at /ui in Debian's headless chromium (Playwright, nothing but
127.0.0.1 reachable). A whole slice shows the input-expectation warning in the model card; typing a box and
pressing "Classify region" shows that box, drops the warning and answers as `POST /predict region=` does."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import calibrated_resnet, need
from test_demo_browser import CHROMIUM, CHROMIUM_FLAGS, TIMEOUT_MS, Page, chromium, only_loopback

from ctdata.preprocess import PreprocessConfig
from export import export_onnx
from hub import ModelConfig, save_pretrained
from hub.io import record_metrics
from serving.launch import Server, running_server

__all__ = ["chromium"]  # the fixture, imported from test_demo_browser
ORGANS = ["liver", "kidney", "lung"]
BOX = (16, 24, 112, 120)  # x0, y0, x1, y1 of CT_small.dcm (128 x 128)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("region-browser")
    cfg = ModelConfig(
        name="tiny-crop", num_classes=3, labels=ORGANS, preprocessing=PreprocessConfig(input_size=64)
    )
    crop = save_pretrained(
        calibrated_resnet(cfg, [need("CT_small.dcm"), need("693_UNCI.dcm")]), root / "crop", cfg
    )
    record_metrics(crop, {"input_expectation": "organ-centred crop"})
    export_onnx(crop, tolerance=1e-3, exporter="torchscript", parity_images=4, threads=1)
    env = {"BENTOML_HOME": str(root / "bentoml"), "GRADIO_TEMP_DIR": str(root / "gradio")}
    with running_server(crop, root / "server.log", env=env) as server:
        yield server


def test_region_box_in_headless_chromium(chromium: Path, served: Server, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    ct = need("CT_small.dcm")
    region = ",".join(map(str, BOX))
    api = httpx.post(
        f"{served.base}/predict",
        files={"file": ("x.dcm", ct.read_bytes())},
        data={"region": region},
        timeout=120,
    ).json()
    shots = tmp_path / "screenshots"
    shots.mkdir()
    blocked: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        try:
            ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
            ctx.route("**/*", only_loopback(blocked))
            page = ctx.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            p = Page(page, served.base, shots)
            page.goto(f"{served.base}/ui/", wait_until="domcontentloaded")
            page.wait_for_selector("#dicom-upload input[type=file]", state="attached")
            page.wait_for_function(
                "() => document.querySelector('#model-picker input')?.value.includes('tiny-crop')"
            )
            page.set_input_files("#dicom-upload input[type=file]", str(ct))
            page.wait_for_function("() => document.querySelector('#prediction textarea')?.value.length > 0")
            p.wait_new_image("")
            assert "whole slices are not what it was trained on" in page.inner_text("#model-card")
            assert p.image().shape[:2] == (128, 128)
            p.shot("1-whole-slice")

            src = p.image_src()
            page.fill("#region textarea", region)
            page.click("#classify-region")
            p.wait_new_image(src)
            page.wait_for_function(
                "() => document.querySelector('#model-card')?.innerText.includes('classifying the region')"
            )
            p.shot("2-region")
            assert p.image().shape[:2] == (BOX[3] - BOX[1], BOX[2] - BOX[0])  # the box is what is shown
            assert "whole slices are not" not in page.inner_text("#model-card")
            assert p.value("#prediction textarea") == api["label"]  # as POST /predict region= answers
        finally:
            browser.close()
    assert blocked == []  # nothing but the server was asked for anything
