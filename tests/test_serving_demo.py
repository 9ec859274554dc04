"""The predictor (torch backend, no ONNX) and the Gradio demo in-process and launched alone."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from ctdata import read_dicom
from ctdata.preprocess import WINDOW_PRESETS, PreprocessConfig, prepare
from cthub.errors import ConfigError, InputError, ModelNotFoundError
from hub import ModelConfig, ResNet50, save_pretrained
from hub.io import load_dir
from serving.demo import MODEL_DEFAULT, analyze, build_demo
from serving.predictor import PayloadTooLargeError, Predictor, effective_preprocessing

LABELS = ["normal", "hemorrhage"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A binary classifier with an operating point, brain window, 32 px; no model.onnx -> torch backend."""
    torch.manual_seed(3)
    cfg = ModelConfig(name="tiny-demo", num_classes=2, labels=LABELS, threshold=0.3,
                      preprocessing=PreprocessConfig.for_window("brain", input_size=32))
    return save_pretrained(ResNet50(num_classes=2), tmp_path_factory.mktemp("demo") / "m", cfg)


@pytest.fixture(scope="module")
def predictor(model_dir: Path) -> Predictor:
    return Predictor(model_dir)


def test_torch_backend_matches_direct_model_call(predictor: Predictor, model_dir: Path, ct_small_dcm: Path) -> None:
    assert predictor.backend == "torch" and predictor.providers == ["torch:cpu"]
    pred = predictor.predict(ct_small_dcm.read_bytes())
    model = load_dir(model_dir)
    with torch.inference_mode():
        ref = torch.softmax(model(prepare(ct_small_dcm, model.config.preprocessing)[None]).double(), 1)[0]
    got = np.array([pred.probabilities[k] for k in LABELS])
    assert np.allclose(got, ref.numpy(), atol=1e-5)
    # binary model with a validation operating point: the label follows the threshold, not argmax
    assert pred.label == ("hemorrhage" if got[1] >= 0.3 else "normal")
    assert pred.preprocessing["window"] == "brain" and pred.warnings == []


def test_predict_many_keeps_order_and_per_item_errors(predictor: Predictor, ct_small_dcm: Path) -> None:
    good = ct_small_dcm.read_bytes()
    out = predictor.predict_many([good, b"junk", good[:2000], good])
    assert isinstance(out[1], InputError) and isinstance(out[2], InputError)
    assert out[0].probabilities == pytest.approx(out[3].probabilities, abs=1e-6)
    assert out[0].probabilities == pytest.approx(predictor.predict(good).probabilities, abs=1e-5)


def test_override_rules_and_limits(predictor: Predictor, ct_small_dcm: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    base = PreprocessConfig()
    assert effective_preprocessing(base) is base
    assert effective_preprocessing(base, "bone").window_bounds() == (-500.0, 1300.0)
    assert effective_preprocessing(base, "bone", 40, 80).window_bounds() == (0.0, 80.0)  # explicit wins
    with pytest.raises(ConfigError):
        effective_preprocessing(base, center=40)
    with pytest.raises(ConfigError):
        predictor.predict(ct_small_dcm.read_bytes(), window="no-such-window")
    monkeypatch.setenv("CTHUB_MAX_UPLOAD_MB", "0.01")
    with pytest.raises(PayloadTooLargeError) as e:
        predictor.predict(ct_small_dcm.read_bytes())
    assert e.value.http_status == 413
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


def test_demo_runs_alone_through_gradio_client(predictor: Predictor, ct_small_dcm: Path, tmp_path: Path) -> None:
    from gradio_client import Client, handle_file

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = build_demo(lambda: predictor)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        _, label, _ = client.predict(handle_file(str(ct_small_dcm)), MODEL_DEFAULT, 0, 1, True,
                                     api_name="/predict")
        assert label["label"] == predictor.predict(ct_small_dcm.read_bytes()).label
        junk = tmp_path / "junk.dcm"
        junk.write_bytes(b"definitely not DICOM" * 20)
        with pytest.raises(Exception, match="DICOM"):  # gr.Error surfaces as an AppError with our message
            client.predict(handle_file(str(junk)), MODEL_DEFAULT, 0, 1, False, api_name="/predict")
    finally:
        demo.close()
