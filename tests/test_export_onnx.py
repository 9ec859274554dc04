"""ONNX export: dynamic batch, metadata, parity with torch on real CT DICOMs, freshness, typed errors, CLI."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ctdata.preprocess import PreprocessConfig, prepare
from cthub.cli import main as cthub_main
from cthub.errors import ConfigError, IntegrityError, ModelNotFoundError, ShapeError
from export import (
    ONNX_NAME,
    Classifier,
    OnnxClassifier,
    TorchClassifier,
    check_parity,
    export_onnx,
    onnx_is_fresh,
    read_metadata,
)
from hub import ModelConfig, ResNet50, save_pretrained
from hub.io import load_dir, sha256_file

LABELS = ["liver", "kidney", "lung"]


def make_model_dir(root: Path, size: int = 32, seed: int = 0) -> Path:
    """A real (untrained) 3-class ResNet50 saved the way fine-tuning saves models."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        name="tiny-export",
        num_classes=3,
        labels=LABELS,
        revision="test-1",
        preprocessing=PreprocessConfig(mapping="window", window="abdomen", input_size=size),
    )
    return save_pretrained(ResNet50(num_classes=3), root, cfg)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    model_dir = make_model_dir(tmp_path_factory.mktemp("export") / "m")
    return model_dir, export_onnx(model_dir)


@pytest.fixture(scope="module")
def exported_by_cli(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int, str]:
    """`cthub export DIR --out PATH --opset 17 --json`: (model dir, onnx path, exit code, stdout)."""
    root = tmp_path_factory.mktemp("cli")
    model_dir = make_model_dir(root / "m", seed=1)
    out = root / "elsewhere" / "clf.onnx"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cthub_main(["export", str(model_dir), "--out", str(out), "--opset", "17", "--json"])
    return model_dir, out, rc, buf.getvalue()


def test_export_writes_onnx_with_metadata_and_passes_parity(exported) -> None:
    model_dir, report = exported
    path = model_dir / ONNX_NAME
    assert path.is_file() and report.path == str(path)
    assert report.passed and report.max_abs_diff < 1e-3
    assert "CT_small.dcm" in report.parity_inputs and report.batch_sizes[0] == len(report.parity_inputs) > 1
    meta = read_metadata(path)
    assert meta["source_sha256"] == sha256_file(model_dir / "model.safetensors") == report.source_sha256
    assert meta["labels"] == LABELS
    assert meta["preprocessing"] == ModelConfig.load(model_dir).preprocessing.to_dict()
    assert meta["config"]["name"] == "tiny-export"
    assert onnx_is_fresh(model_dir)


def test_onnx_matches_torch_on_real_dicom_at_several_batch_sizes(exported, ct_small_dcm: Path) -> None:
    model_dir, _ = exported
    clf = OnnxClassifier(model_dir / ONNX_NAME)
    assert clf.providers[-1] == "CPUExecutionProvider"  # what the session really uses (CUDA first if present)
    assert clf.labels == LABELS and clf.input_shape == (3, 32, 32)
    cfg = clf.config.preprocessing
    one = prepare(ct_small_dcm, cfg)
    # the same slice under three windows: three genuinely different real inputs
    batch = torch.stack([one] + [prepare(ct_small_dcm, cfg.replace(window=w)) for w in ("lung", "bone")])
    model = load_dir(model_dir)
    with torch.inference_mode():
        ref = model(batch).numpy()
    for n in (1, 3):
        got = clf.logits(batch[:n])
        assert got.shape == (n, 3)
        assert np.max(np.abs(got - ref[:n])) < 1e-3
    p = clf.predict_proba(batch)
    assert p.dtype == np.float64  # softmax in float64 once, no float32 round trip
    assert np.allclose(p.sum(axis=1), 1.0, atol=1e-12)
    assert np.allclose(p, torch.softmax(torch.from_numpy(ref), 1).numpy(), atol=1e-4)


def test_onnx_and_torch_implement_one_classifier_interface(exported, ct_small_dcm: Path) -> None:
    model_dir, _ = exported
    sha = sha256_file(model_dir / "model.safetensors")
    onnx = OnnxClassifier(model_dir / ONNX_NAME)
    native = TorchClassifier.from_dir(model_dir)
    cfg = onnx.config.preprocessing
    x = torch.stack([prepare(ct_small_dcm, cfg.replace(window=w)) for w in ("abdomen", "lung", "bone")])
    for clf, backend in ((onnx, "onnx"), (native, "torch")):
        assert isinstance(clf, Classifier) and clf.backend == backend
        assert clf.labels == LABELS and clf.input_shape == (3, 32, 32)
        assert clf.identity == {
            "name": "tiny-export",
            "version": "test-1",
            "sha256": sha,
            "backend": backend,
            "providers": clf.providers,
        }
        with pytest.raises(ShapeError, match=r"\[B, 3, 32, 32\]"):
            clf.predict_proba(torch.zeros(1, 3, 64, 64))
        assert clf.predict_proba(x[0]).shape == (1, 3)  # one [C, S, S] input is a batch of one
    assert native.providers == ["torch:cpu"] and native.torch_module() is native.module
    assert onnx.torch_module() is None
    assert np.abs(onnx.logits(x) - native.logits(x)).max() < 1e-3
    assert np.allclose(onnx.predict_proba(x), native.predict_proba(x), atol=1e-4)


def test_wrong_input_shape_is_a_shape_error(exported) -> None:
    model_dir, _ = exported
    clf = OnnxClassifier(model_dir / ONNX_NAME)
    with pytest.raises(ShapeError, match=r"\[B, 3, 32, 32\]"):
        clf.logits(np.zeros((2, 3, 64, 64), np.float32))
    with pytest.raises(ShapeError):
        clf.logits(np.zeros((32, 32), np.float32))


def test_parity_check_rejects_a_model_that_differs(exported, ct_small_dcm: Path) -> None:
    model_dir, _ = exported
    clf = OnnxClassifier(model_dir / ONNX_NAME)
    model = load_dir(model_dir)
    with torch.no_grad():
        model.fc.bias.add_(0.01)  # a small drift the check must see
    x = prepare(ct_small_dcm, clf.config.preprocessing)[None]
    with pytest.raises(IntegrityError, match="parity check failed"):
        check_parity(model, clf, x)


def test_cli_export_to_another_path_and_stale_after_retraining(exported_by_cli, tmp_path: Path) -> None:
    model_dir, out, rc, printed = exported_by_cli
    assert rc == 0
    report = json.loads(printed)
    assert report["path"] == str(out) and report["passed"] and report["max_abs_diff"] < 1e-3
    assert report["opset"] == 17 and read_metadata(out)["exporter"]["opset"] == 17
    assert onnx_is_fresh(model_dir, out) and not onnx_is_fresh(model_dir)  # default path not written
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    make_model_dir(copy, seed=2)  # "retrain": new weights in the same folder
    assert not onnx_is_fresh(copy, out)
    assert onnx_is_fresh(model_dir, out)
    cfg = ModelConfig.load(model_dir)  # same weights, but config.json now asks for another input size
    cfg.preprocessing = cfg.preprocessing.replace(input_size=48)
    cfg.save(model_dir)
    assert not onnx_is_fresh(model_dir, out)


def test_user_errors_are_typed(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        export_onnx(tmp_path / "nothing-here")
    enc = tmp_path / "encoder"
    save_pretrained(ResNet50(num_classes=0), enc, ModelConfig(name="enc", num_classes=0))
    with pytest.raises(ConfigError, match="encoder"):
        export_onnx(enc)
    assert cthub_main(["export", str(tmp_path / "nothing-here")]) == 2
    with pytest.raises(ModelNotFoundError):
        OnnxClassifier(tmp_path / "missing.onnx")
