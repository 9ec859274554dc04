"""Two models behind one server (`cthub serve --model A --also B`): a model trained on organ-centred crops
(64 px, 3 organs) and a whole-slice model (96 px, 2 classes), both real exported ResNet50s calibrated on real
CT slices, started as a real server in the two-service layout (CTHUB_INFERENCE=service: the models in
BentoML's inference service behind the API; the other server tests use the default, the models in the API
worker). Checks that `model=` selects each (answers equal to its ONNX file called
here), that /model lists both with what input each expects, that an unknown model is a typed 404, that the
region box is what reaches the model (equal to the ONNX file on the cropped slice through ctdata's one
preprocessing path), and that a whole slice sent to the crop-trained model is answered with the
input-expectation warning while the whole-slice model gives none."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import calibrated_resnet, need, png_bytes, post

from ctdata import read_dicom
from ctdata.preprocess import PreprocessConfig, intensities_to_unit, prepare, unit_to_input
from export import export_onnx
from export.session import OnnxClassifier
from hub import ModelConfig, save_pretrained
from hub.io import record_metrics
from serving.launch import running_server

ATOL = 1e-5  # the server's ONNX Runtime session vs the same ONNX file called here, same input tensor
ORGANS = ["liver", "kidney", "lung"]
HEAD = ["no hemorrhage", "hemorrhage"]
CROP = "organ-centred crop"


@pytest.fixture(scope="module")
def slices() -> list[Path]:
    return [need("CT_small.dcm"), need("693_UNCI.dcm")]


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory, slices: list[Path]):
    """Export both models, serve them together once for the module."""
    root = tmp_path_factory.mktemp("two")
    crop_cfg = ModelConfig(
        name="organs-crop", num_classes=3, labels=ORGANS, preprocessing=PreprocessConfig(input_size=64)
    )
    crop_dir = save_pretrained(calibrated_resnet(crop_cfg, slices), root / "organs", crop_cfg)
    record_metrics(crop_dir, {"input_expectation": CROP})
    head_cfg = ModelConfig(
        name="head-whole",
        num_classes=2,
        labels=HEAD,
        preprocessing=PreprocessConfig.for_window("brain", input_size=96),
    )
    head_dir = save_pretrained(calibrated_resnet(head_cfg, slices), root / "head", head_cfg)
    record_metrics(head_dir, {"input_expectation": "whole slice"})
    for d in (crop_dir, head_dir):
        export_onnx(d, tolerance=1e-3)  # random weights: logits differ by ~1e-4 between runtimes
    env = {
        "BENTOML_HOME": str(root / "bentoml"),
        "GRADIO_TEMP_DIR": str(root / "gradio"),
        "CTHUB_INFERENCE": "service",
    }
    with running_server(crop_dir, root / "server.log", env=env, args=("--also", str(head_dir))) as srv:
        yield srv, crop_dir, head_dir


def probs(answer: dict, labels: list[str]) -> np.ndarray:
    return np.array([answer["probabilities"][k] for k in labels])


def direct(model_dir: Path, x) -> np.ndarray:
    clf = OnnxClassifier(model_dir / "model.onnx", threads=1)
    return clf.predict_proba(x[None])[0]


def test_model_field_selects_each_served_model(two_models, slices: list[Path]) -> None:
    srv, crop_dir, head_dir = two_models
    assert "inference service" in srv.text() and "cthub-inference" in srv.text()  # the layout under test
    ct = slices[0]
    default = post(srv.base, ct)
    assert default.status_code == 200, default.text
    assert (
        default.json()["model"]["name"] == "organs-crop" and list(default.json()["probabilities"]) == ORGANS
    )
    head = post(srv.base, ct, model="head-whole")
    assert head.status_code == 200, head.text
    body = head.json()
    assert body["model"]["name"] == "head-whole" and body["preprocessing"]["input_size"] == 96
    head_pp = ModelConfig.load(head_dir).preprocessing
    assert np.allclose(probs(body, HEAD), direct(head_dir, prepare(ct, head_pp)), atol=ATOL)
    assert np.allclose(
        probs(default.json(), ORGANS),
        direct(crop_dir, prepare(ct, ModelConfig.load(crop_dir).preprocessing)),
        atol=ATOL,
    )
    grey = (255 * intensities_to_unit(read_dicom(ct).pixels, True, head_pp)).round().astype(np.uint8)
    picture = post(
        srv.base, png_bytes(np.squeeze(grey)), route="/predict_image", name="s.png", model="head-whole"
    )
    assert picture.status_code == 200 and picture.json()["model"]["name"] == "head-whole"
    missing = post(srv.base, ct, model="no-such-model")
    assert missing.status_code == 404 and missing.json()["error"] == "model_not_found"
    assert "organs-crop" in missing.json()["detail"] and "head-whole" in missing.json()["detail"]


def test_model_route_lists_both_with_their_input_expectation(two_models) -> None:
    import httpx

    srv, _, _ = two_models
    info = httpx.post(srv.base + "/model", json={}, timeout=60).json()
    assert info["name"] == "organs-crop" and info["input_expectation"] == CROP
    listed = {m["name"]: m for m in info["served_models"]}
    assert set(listed) == {"organs-crop", "head-whole"}
    assert listed["head-whole"]["input_expectation"] == "whole slice"
    assert listed["head-whole"]["input_size"] == 96 and listed["organs-crop"]["input_size"] == 64
    other = httpx.post(srv.base + "/model", json={"model": "head-whole"}, timeout=60).json()
    assert other["name"] == "head-whole" and other["labels"] == HEAD


def test_region_is_what_reaches_the_model_and_whole_slices_warn_a_crop_model(two_models, slices) -> None:
    srv, crop_dir, _ = two_models
    ct = slices[0]
    image = read_dicom(ct)
    h, w = image.pixels.shape[-2:]
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    whole = post(srv.base, ct).json()
    assert any("organ-centred crops" in x for x in whole["warnings"])  # a whole slice to a crop model
    boxed = post(srv.base, ct, region=",".join(map(str, box)))
    assert boxed.status_code == 200, boxed.text
    body = boxed.json()
    assert not any("organ-centred crops" in x for x in body["warnings"])
    assert body["image"]["region"] == list(box) and body["image"]["rows"] == box[3] - box[1]
    # the reference: the same box through ctdata's one preprocessing path, the ONNX file called here
    cfg = ModelConfig.load(crop_dir).preprocessing
    frame = image.pixels[0] if image.pixels.ndim == 3 else image.pixels
    x = unit_to_input(intensities_to_unit(frame[box[1] : box[3], box[0] : box[2]], image.is_hu, cfg), cfg)
    assert np.allclose(probs(body, ORGANS), direct(crop_dir, x), atol=ATOL)
    assert np.abs(probs(body, ORGANS) - probs(whole, ORGANS)).max() > 100 * ATOL  # another input
    # the whole-slice model says nothing about crops
    head = post(srv.base, ct, model="head-whole").json()
    assert not any("organ-centred" in x for x in head["warnings"])
    # a box outside the image, or not four numbers: a 400 that says so
    outside = post(srv.base, ct, region=f"0,0,{w + 10},{h}")
    assert outside.status_code == 400 and "outside" in outside.json()["detail"]
    assert post(srv.base, ct, region="1,2,3").status_code == 400


def _post_many(base: str, route: str, paths: list[Path], **fields: str):
    import httpx

    parts = [("files", (f"f{i}.dcm", p.read_bytes(), "application/dicom")) for i, p in enumerate(paths)]
    return httpx.post(base + route, files=parts, data=fields, timeout=300)


def test_report_and_batched_route_select_the_model_and_batched_takes_a_region(two_models, slices) -> None:
    import io

    import pydicom

    srv, _, head_dir = two_models
    # /report with model=: the SR names the selected model in its Contributing Equipment
    for name in ("organs-crop", "head-whole"):
        r = _post_many(srv.base, "/report", slices[:1], model=name)
        assert r.status_code == 200, r.text
        sr = pydicom.dcmread(io.BytesIO(r.content))
        ours = [e for e in sr.ContributingEquipmentSequence if e.Manufacturer == "ct-ssl-hub"]
        assert [e.ManufacturerModelName for e in ours] == [name]
    assert _post_many(srv.base, "/report", slices[:1], model="nope").status_code == 404
    # /predict_batched with model= answers with that model, equal to its ONNX file
    batched = _post_many(srv.base, "/predict_batched", slices, model="head-whole")
    assert batched.status_code == 200, batched.text
    head_pp = ModelConfig.load(head_dir).preprocessing
    for item, path in zip(batched.json(), slices, strict=True):
        assert item["model"]["name"] == "head-whole"
        assert np.allclose(probs(item, HEAD), direct(head_dir, prepare(path, head_pp)), atol=ATOL)
    assert _post_many(srv.base, "/predict_batched", slices, model="nope").status_code == 404
    # region= on /predict_batched: the same box of every slice, as /predict answers it; a slice the box
    # does not fit gets its 400 in place
    ct = slices[0]
    h, w = read_dicom(ct).pixels.shape[-2:]
    box = f"{w // 4},{h // 4},{3 * w // 4},{3 * h // 4}"
    boxed = _post_many(srv.base, "/predict_batched", [ct, ct], region=box).json()
    single = post(srv.base, ct, region=box).json()
    for item in boxed:
        assert item["image"]["region"] == single["image"]["region"]
        assert np.allclose(probs(item, ORGANS), probs(single, ORGANS), atol=ATOL)
        assert not any("organ-centred crops" in x for x in item["warnings"])
    big = max(read_dicom(p).pixels.shape[-1] for p in slices)
    wide = f"0,0,{big},{big}"  # fits the larger slice only
    mixed = _post_many(srv.base, "/predict_batched", slices, region=wide).json()
    fits = [read_dicom(p).pixels.shape[-1] == big for p in slices]
    assert [("error" not in m) for m in mixed] == fits and any(not f for f in fits)
    assert all(m["status"] == 400 for m, f in zip(mixed, fits, strict=True) if not f)


def test_mounted_demo_offers_both_and_runs_each_through_the_inference_service(
    two_models, slices: list[Path], gradio_client_temp_dir: Path
) -> None:
    """The demo at /ui: its picker lists both served models, and the model picked answers as the REST API
    does with `model=` (the same ONNX session of the inference service)."""
    from gradio_client import Client, handle_file
    from test_serving_demo import ANALYSIS, view_args

    srv, crop_dir, head_dir = two_models
    client = Client(f"{srv.base}/ui/", verbose=False, download_files=str(gradio_client_temp_dir))
    models, _, _ = client.predict(api_name="/models")
    assert [c[1] for c in models["choices"]][:2] == [str(crop_dir.resolve()), str(head_dir.resolve())]
    ct = slices[0]
    for folder, name, labels in ((head_dir, "head-whole", HEAD), (crop_dir, "organs-crop", ORGANS)):
        out = dict(
            zip(
                ANALYSIS,
                client.predict([handle_file(str(ct))], str(folder.resolve()), *view_args(), api_name="/load"),
                strict=True,
            )
        )
        api = post(srv.base, ct, model=name).json()
        got = {c["label"]: c["confidence"] for c in out["probabilities"]["confidences"]}
        assert got == pytest.approx(api["probabilities"], abs=1e-5) and set(got) == set(labels)
        assert out["details"]["model"]["name"] == name
    assert "whole slices are not" in out["card"] and "input expectation" in out["notes"]  # the crop model
