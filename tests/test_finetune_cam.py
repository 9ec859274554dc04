"""CAM equals Grad-CAM (normalized) on a real ResNet50 and real CT slices; overlays; cross-method
agreement."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ctdata.datasets import load_medmnist
from ctdata.preprocess import PreprocessConfig, prepare_batch
from finetune.cam import class_activation_map, cross_method_correlation, grad_cam, overlay, save_overlays
from hub.resnet import ResNet50


@pytest.fixture(scope="module")
def batch(organamnist_npz: Path) -> tuple[np.ndarray, torch.Tensor]:
    test = load_medmnist(organamnist_npz, "test")
    images = test.images[[0, 500, 1000, 5000]]
    return images, prepare_batch(images, PreprocessConfig(input_size=96))


def _model(seed: int) -> ResNet50:
    torch.manual_seed(seed)
    return ResNet50(num_classes=11).eval()


def test_cam_equals_grad_cam(batch) -> None:
    _, x = batch
    model = _model(0)
    cam, t1 = class_activation_map(model, x)
    gc, t2 = grad_cam(model, x)
    assert torch.equal(t1, t2)
    assert cam.shape == (4, 96, 96) and float(cam.amax()) == pytest.approx(1.0)
    assert float(cam.std()) > 0.01  # not a trivial map
    torch.testing.assert_close(cam, gc, atol=1e-4, rtol=1e-4)
    # unnormalized, at feature resolution: Grad-CAM = CAM / (H*W) for GAP + linear
    raw_cam, _ = class_activation_map(model, x, target=3, normalize=False, upsample=False)
    raw_gc, _ = grad_cam(model, x, target=3, normalize=False, upsample=False)
    hw = raw_cam.shape[-1] * raw_cam.shape[-2]
    torch.testing.assert_close(raw_gc * hw, raw_cam, atol=1e-4, rtol=1e-3)


def test_overlays_and_cross_method_correlation(batch, tmp_path: Path) -> None:
    images, x = batch
    a = class_activation_map(_model(0), x, target=0)[0].numpy()
    b = class_activation_map(_model(1), x, target=0)[0].numpy()
    gc = grad_cam(_model(0), x, target=0)[0].numpy()  # another method, same model and class
    agree = cross_method_correlation({"a": a, "a-again": a.copy(), "b": b, "inverted": 1.0 - a, "gc": gc})
    pairs = agree["pairs"]
    # the mean over images of each image's Pearson correlation, computed here independently
    expected = np.mean([np.corrcoef(a[i].ravel(), b[i].ravel())[0, 1] for i in range(len(a))])
    assert pairs["a vs b"] == pytest.approx(expected, abs=1e-9) and abs(expected) < 0.99
    assert pairs["a vs a-again"] == pytest.approx(1.0) and pairs["a vs inverted"] == pytest.approx(-1.0)
    assert pairs["a vs gc"] > 0.9999  # CAM and Grad-CAM agree for GAP + linear (the paper's check)
    mat = np.array(agree["matrix"])
    assert agree["methods"] == ["a", "a-again", "b", "inverted", "gc"] and np.allclose(mat, mat.T)
    assert np.allclose(np.diag(mat), 1.0) and mat[0, 2] == pairs["a vs b"]
    assert agree["mean"] == pytest.approx(np.mean(list(pairs.values())))
    rgb = overlay(images[0] / 255.0, a[0])
    assert rgb.shape == (28, 28, 3) and rgb.dtype == np.uint8
    png = save_overlays(images / 255.0, {"a": a, "b": b}, tmp_path / "cams.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
