"""The demo with two served models (what `cthub serve --also` mounts): a whole-slice head CT model and a model
trained on organ-centred crops, both real exported ResNet50s, the demo launched in this process and driven
through gradio_client. The picker offers both, the card says what input each expects, a whole slice shown to
the crop model is answered with the input-expectation warning, and "Classify region" sends exactly that box
of the slice to the model (checked against the ONNX file called here on the same box through ctdata)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import calibrated_resnet, need, png_pixels
from test_serving_demo import SETTINGS, Demo, binary_classifier, confidences, in_process, view_args

from ctdata import read_dicom
from ctdata.preprocess import PreprocessConfig, intensities_to_unit, unit_to_input
from export import export_onnx
from export.session import OnnxClassifier
from hub import ModelConfig, save_pretrained
from hub.io import record_metrics
from serving.demo import build_demo, launch_options
from serving.inference import open_classifier, resolve_model_dir
from serving.launch import free_port

ORGANS = ["liver", "kidney", "lung"]
BOX = (16, 24, 112, 120)  # x0, y0, x1, y1 of CT_small.dcm (128 x 128)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("two-demo")
    brain = binary_classifier(root / "tiny-brain")
    cfg = ModelConfig(
        name="tiny-crop", num_classes=3, labels=ORGANS, preprocessing=PreprocessConfig(input_size=64)
    )
    crop = save_pretrained(
        calibrated_resnet(cfg, [need("CT_small.dcm"), need("693_UNCI.dcm")]), root / "crop", cfg
    )
    record_metrics(crop, {"input_expectation": "organ-centred crop"})
    export_onnx(crop, tolerance=1e-3, exporter="torchscript", parity_images=4, threads=1)
    return brain.resolve(), crop.resolve()


@pytest.fixture(scope="module")
def demo_url(folders: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    models = [in_process(open_classifier(resolve_model_dir(f), threads=1)) for f in folders]
    mp = pytest.MonkeyPatch()
    mp.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("uploads")))
    port = free_port()
    demo = build_demo(lambda: models, SETTINGS)
    demo.launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_options()
    )
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()
        mp.undo()


@pytest.fixture
def demo(demo_url: str, gradio_client_temp_dir: Path) -> Demo:
    return Demo(demo_url, gradio_client_temp_dir, gradio_client_temp_dir / "downloads")


def test_picker_offers_both_served_models(demo: Demo, folders: tuple[Path, Path]) -> None:
    models, _, _ = demo.client.predict(api_name="/models")
    offered = [c[1] for c in models["choices"]]
    assert offered[:2] == [str(folders[0]), str(folders[1])]
    assert all("served" in c[0] for c in models["choices"][:2])


def test_crop_model_warns_on_whole_slices_and_classifies_the_region(
    demo: Demo, folders: tuple[Path, Path]
) -> None:
    _, crop = folders
    ct = need("CT_small.dcm")
    demo.client.predict(api_name="/models")  # the page load fills the picker (its choices are validated)
    whole = demo.load([ct], str(crop))
    assert "Input expected: organ-centred crop" in whole["card"] and "whole slices are not" in whole["card"]
    assert "input expectation" in whole["notes"]
    boxed = demo.call("/classify_region", str(crop), ",".join(map(str, BOX)), *view_args())
    assert (
        "classifying the region 16,24,112,120" in boxed["card"] and "input expectation" not in boxed["notes"]
    )
    shown = png_pixels(boxed["image"])
    assert shown.shape[:2] == (BOX[3] - BOX[1], BOX[2] - BOX[0])  # the region is what the viewer shows
    clf = OnnxClassifier(crop / "model.onnx", threads=1)
    cfg = clf.config.preprocessing
    hu = read_dicom(ct).pixels[0]
    x = unit_to_input(intensities_to_unit(hu[BOX[1] : BOX[3], BOX[0] : BOX[2]], True, cfg), cfg)
    p = clf.predict_proba(x[None].numpy())[0]
    assert confidences(boxed["probabilities"]) == pytest.approx(dict(zip(ORGANS, p, strict=True)), abs=1e-6)
    assert max(abs(confidences(whole["probabilities"])[k] - v) for k, v in zip(ORGANS, p, strict=True)) > 1e-4
    with pytest.raises(Exception, match="outside"):  # gradio_client raises the page's error message
        demo.call("/classify_region", str(crop), "0,0,500,500", *view_args())


def test_whole_slice_model_says_what_it_expects(demo: Demo, folders: tuple[Path, Path]) -> None:
    brain, _ = folders
    demo.client.predict(api_name="/models")
    out = demo.load([need("CT_small.dcm")], str(brain))
    assert (
        "Input expected: not recorded in its card" in out["card"] and "input expectation" not in out["notes"]
    )
    assert np.isclose(sum(confidences(out["probabilities"]).values()), 1.0, atol=1e-5)
