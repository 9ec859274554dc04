"""The predictor (torch backend, no ONNX; backend selection), and the Gradio demo in-process and alone."""

from __future__ import annotations

import logging
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

import hub.manifest
import serving.predictor
from ctdata import read_dicom
from ctdata.preprocess import WINDOW_PRESETS, PreprocessConfig, prepare
from cthub.errors import ConfigError, InputError, ModelNotFoundError
from export import ONNX_NAME, export_onnx
from hub import ModelConfig, ResNet50, save_pretrained
from hub.io import load_dir
from serving.demo import MODEL_DEFAULT, analyze, build_demo
from serving.predictor import PayloadTooLargeError, Predictor, effective_preprocessing

LABELS = ["normal", "hemorrhage"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A binary classifier with an operating point, brain window, 32 px; no model.onnx -> torch backend."""
    cfg = ModelConfig(
        name="tiny-demo",
        num_classes=2,
        labels=LABELS,
        threshold=0.3,
        preprocessing=PreprocessConfig.for_window("brain", input_size=32),
    )
    return save_pretrained(calibrated_resnet(cfg), tmp_path_factory.mktemp("demo") / "m", cfg)


def calibrated_resnet(cfg: ModelConfig, seed: int = 3) -> ResNet50:
    """Random weights, BatchNorm statistics from real CT slices: without them a random ResNet50's softmax
    saturates at ~1.0 for one class on every input and comparisons of probabilities prove nothing."""
    from pydicom.data import get_testdata_file

    torch.manual_seed(seed)
    model = ResNet50(num_classes=cfg.num_classes)
    pp = cfg.preprocessing
    x = torch.stack(
        [
            prepare(get_testdata_file(n, download=False), pp.replace(window=w))
            for n in ("CT_small.dcm", "J2K_pixelrep_mismatch.dcm")
            for w in ("brain", "abdomen", "bone", "lung")
        ]
    )
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the calibration batch
    model.train()
    with torch.no_grad():
        model(torch.cat([x, x.flip(-1), x.flip(-2)]))
    return model.eval()


@pytest.fixture(scope="module")
def predictor(model_dir: Path) -> Predictor:
    return Predictor(model_dir)


def test_torch_backend_matches_direct_model_call(
    predictor: Predictor, model_dir: Path, ct_small_dcm: Path
) -> None:
    assert predictor.backend == "torch" and predictor.providers == ["torch:cpu"]
    pred = predictor.predict(ct_small_dcm.read_bytes())
    model = load_dir(model_dir)
    with torch.inference_mode():
        ref = torch.softmax(model(prepare(ct_small_dcm, model.config.preprocessing)[None]).double(), 1)[0]
    got = np.array([pred.probabilities[k] for k in LABELS])
    assert 0.01 < got[0] < 0.99  # not saturated: the comparison below can fail
    assert np.allclose(got, ref.numpy(), atol=1e-6)
    # binary model with a validation operating point: the label follows the threshold, not argmax
    assert pred.label == ("hemorrhage" if got[1] >= 0.3 else "normal")
    assert pred.preprocessing["window"] == "brain" and pred.warnings == []


def test_predict_many_keeps_order_and_per_item_errors(predictor: Predictor, ct_small_dcm: Path) -> None:
    good = ct_small_dcm.read_bytes()
    out = predictor.predict_many([good, b"junk", good[:2000], good])
    assert isinstance(out[1], InputError) and isinstance(out[2], InputError)
    assert out[0].probabilities == pytest.approx(out[3].probabilities, abs=1e-6)
    # a batch of two and a batch of one take different GEMM paths: equal to float32 rounding, not bit for bit
    assert out[0].probabilities == pytest.approx(predictor.predict(good).probabilities, abs=1e-4)


def test_override_rules_and_limits(
    predictor: Predictor, ct_small_dcm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = PreprocessConfig()
    assert effective_preprocessing(base) is base
    assert effective_preprocessing(base, "bone").window_bounds() == (-500.0, 1300.0)
    assert effective_preprocessing(base, "bone", 40, 80).window_bounds() == (0.0, 80.0)  # explicit wins
    with pytest.raises(ConfigError):
        effective_preprocessing(base, center=40)
    with pytest.raises(ConfigError):
        predictor.predict(ct_small_dcm.read_bytes(), window="no-such-window")
    monkeypatch.setenv("CTHUB_MAX_UPLOAD_MB", "0.01")  # read once, when a Predictor is made
    small = Predictor(predictor.model_dir)
    assert small.max_upload == int(0.01 * 2**20)
    for upload in (ct_small_dcm.read_bytes(), ct_small_dcm):  # bytes, and a file checked before reading
        with pytest.raises(PayloadTooLargeError) as e:
            small.predict(upload)
        assert e.value.http_status == 413
    with pytest.raises(InputError, match="empty"):
        predictor.predict(b"")
    with pytest.raises(ModelNotFoundError):
        Predictor(ct_small_dcm.parent / "no-model-here")
    with pytest.raises(ModelNotFoundError, match="cthub export"):
        Predictor(predictor.model_dir, backend="onnx")  # asked for ONNX that was never exported


def test_demo_shows_the_windowed_slice(predictor: Predictor, ct_small_dcm: Path) -> None:
    hu = read_dicom(ct_small_dcm).pixels[0]
    for preset in ("bone", "lung"):
        c, w = WINDOW_PRESETS[preset]
        image, probs, details = analyze(predictor, str(ct_small_dcm), preset, c, w)
        assert image.shape == (*hu.shape, 3) and image.dtype == np.uint8
        expected = np.clip((hu - (c - w / 2)) / w, 0, 1) * 255
        assert np.abs(image[..., 0].astype(float) - expected).max() <= 1.0
        assert set(probs) == set(LABELS) and details["preprocessing"]["window_center"] == c
    default, _, details = analyze(predictor, str(ct_small_dcm), MODEL_DEFAULT, 0, 1)
    c, w = WINDOW_PRESETS["brain"]  # the model's own window; sliders ignored
    assert np.abs(default[..., 0] - np.clip((hu - (c - w / 2)) / w, 0, 1) * 255).max() <= 1.0
    assert details["warnings"] == []
    with pytest.raises(InputError):
        analyze(predictor, None, MODEL_DEFAULT, 0, 1)


def test_demo_overlays_the_class_activation_map(predictor: Predictor, ct_small_dcm: Path) -> None:
    pytest.importorskip("finetune.cam")
    plain, _, _ = analyze(predictor, str(ct_small_dcm), "bone", 400, 1800)
    cam, probs, details = analyze(predictor, str(ct_small_dcm), "bone", 400, 1800, show_cam=True)
    assert details["class_activation_map"] is True and cam.shape == plain.shape
    assert not np.array_equal(cam[..., 0], cam[..., 2])  # colour appears where the map is hot
    assert probs == pytest.approx(analyze(predictor, str(ct_small_dcm), "bone", 400, 1800)[1])


def test_demo_runs_alone_through_gradio_client(
    predictor: Predictor, ct_small_dcm: Path, tmp_path: Path
) -> None:
    from gradio_client import Client, handle_file

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = build_demo(lambda: predictor)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        _, decision, label, _ = client.predict(
            handle_file(str(ct_small_dcm)), MODEL_DEFAULT, 0, 1, True, api_name="/predict"
        )
        pred = predictor.predict(ct_small_dcm.read_bytes())
        # this slice sits between the operating point (0.3) and 0.5: the decision is not the most probable
        # class, and the demo must show the decision, as the API does
        assert pred.label != max(pred.probabilities, key=pred.probabilities.__getitem__)
        assert decision == pred.label
        conf = {c["label"]: c["confidence"] for c in label["confidences"]}
        assert conf == pytest.approx(pred.probabilities, abs=1e-6)
        junk = tmp_path / "junk.dcm"
        junk.write_bytes(b"definitely not DICOM" * 20)
        with pytest.raises(Exception, match="DICOM"):  # gr.Error surfaces as an AppError with our message
            client.predict(handle_file(str(junk)), MODEL_DEFAULT, 0, 1, False, api_name="/predict")
    finally:
        demo.close()


def test_backend_selection_hashes_the_weights_once(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """auto picks a fresh model.onnx, else torch (with a warning for a stale one); either way the weights are
    hashed once at start-up. The count comes from a spy around the real sha256 function, which still runs."""
    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder)
    export_onnx(folder)
    hashed: list[str] = []
    real = hub.manifest.sha256_file

    def spy(path: str | Path, *args: int) -> str:
        hashed.append(Path(path).name)
        return real(path, *args)

    monkeypatch.setattr(hub.manifest, "sha256_file", spy)  # used by hub.io.load_dir
    monkeypatch.setattr(serving.predictor, "sha256_file", spy)
    onnx = Predictor(folder)
    assert onnx.backend == "onnx" and onnx.providers[-1] == "CPUExecutionProvider"
    assert hashed == ["model.safetensors"] and onnx.sha256 == real(folder / "model.safetensors")
    hashed.clear()
    native = Predictor(folder, backend="torch")
    assert native.backend == "torch" and hashed == ["model.safetensors"] and native.sha256 == onnx.sha256
    data = ct_small().read_bytes()
    assert np.allclose(
        list(onnx.predict(data).probabilities.values()),
        list(native.predict(data).probabilities.values()),
        atol=1e-4,
    )

    save_pretrained(calibrated_resnet(ModelConfig.load(folder), seed=4), folder, ModelConfig.load(folder))
    hashed.clear()
    with caplog.at_level(logging.WARNING, logger="serving.predictor"):
        stale = Predictor(folder)
    assert stale.backend == "torch" and "older than the weights" in caplog.text
    assert hashed == ["model.safetensors", "model.safetensors"]  # the freshness check, then the verified load
    with pytest.raises(ModelNotFoundError, match="cthub export"):
        Predictor(folder, backend="onnx")
    (folder / ONNX_NAME).write_bytes(b"not an onnx model")
    assert Predictor(folder).backend == "torch"


def ct_small() -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm", download=False))
