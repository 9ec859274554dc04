"""Calibration on real data: temperature scaling fitted on validation when a classifier is fine-tuned (ECE
before/after on test, card, reliability plot, ONNX metadata), served probabilities equal to softmax(logits /
T), and `cthub calibrate` on a shifted set (real CT slices of other patients, in another window) lowering the
expected calibration error on held-out slices of that set, as a new model version beside the old one.

The model: OrganAMNIST liver vs spleen (real abdominal CT crops), random init, 3 epochs at 32 px on 400
training images, 100 for validation, 200 test images. The "site": 600 test images of other patients shown in
a narrower window (twice the contrast around mid-grey), handed over as class folders; half to recalibrate on,
half held out. Measured: the old calibration (T 0.89) has ECE 0.355 on the held-out half; on this shift the
model is confidently wrong so often that the site's T reaches its bound (1000, near-flat probabilities),
and ECE drops (0.380 -> 0.156 in a trial of the same recipe and shift on 300 held-out images). With the
temperature ignored (`Classifier.temperature` returning 1, tried in a copy of the tree) both ECEs are
0.354655 and the test fails, as does the softmax(logits / T) one."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ctdata.datasets import ArraySplit, load_medmnist
from ctdata.labeled import limit, load_splits
from cthub.cli import main as cthub_main
from cthub.errors import ConfigError, DataError
from export import OnnxClassifier, TorchClassifier, export_onnx, read_metadata, softmax
from finetune import FinetuneConfig, fit, save_classifier
from finetune.calibration import (
    binary_threshold_after,
    expected_calibration_error,
    reliability,
    scaled_probs,
)
from finetune.recalibrate import ClassMismatchError, recalibrate
from finetune.train import model_inputs, predict_logits
from hub.config import ModelConfig

SIZE = 32
CLASSES = ["liver", "spleen"]
RECIPE = {
    "image_size": SIZE,
    "epochs": 3,
    "head_epochs": 1,
    "backbone_lr_ratio": 1.0,
    "lr": 1e-3,
    "batch_size": 32,
    "threads": 1,
    "seed": 1,
}


def liver_vs_spleen(split: ArraySplit) -> ArraySplit:
    """OrganAMNIST's liver (6) and spleen (10) slices as a binary task."""
    assert split.labels is not None
    sub = split.subset(np.flatnonzero(np.isin(split.labels, (6, 10))))
    assert sub.labels is not None
    sub.labels = (sub.labels == 10).astype(np.int64)
    sub.class_names = list(CLASSES)
    return sub


def narrower_window(images: np.ndarray) -> np.ndarray:
    """The site's shift: the same slices in a narrower window (twice the contrast around mid-grey)."""
    return np.clip(128.0 + (images.astype(np.float64) - 128.0) * 2.0, 0, 255).astype(np.uint8)


def write_class_folders(folder: Path, images: np.ndarray, labels: np.ndarray, names: list[str]) -> Path:
    """PNGs in one folder per class, the form a site would hand over."""
    for name in names:
        (folder / name).mkdir(parents=True)
    for i, (img, y) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(img).save(folder / names[int(y)] / f"{i:04d}.png")
    return folder


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, organamnist_npz: Path) -> dict[str, Any]:
    """The fine-tuned, exported model and the site's shifted slices (two class-folder sets)."""
    train = limit(liver_vs_spleen(load_medmnist(organamnist_npz, "train")), 400, 0)
    val = limit(liver_vs_spleen(load_medmnist(organamnist_npz, "val")), 100, 0)
    pool = limit(liver_vs_spleen(load_medmnist(organamnist_npz, "test")), 800, 0)
    test, site = pool.subset(np.arange(200)), pool.subset(np.arange(200, 800))
    res = fit("scratch", train, val, test, FinetuneConfig(**RECIPE))
    tmp = tmp_path_factory.mktemp("calibration")
    model_dir = save_classifier(res, tmp / "organ2", command="pytest", data="liver vs spleen", note="test")
    export_onnx(model_dir, exporter="torchscript", parity_images=8, ood_images=0, threads=1)
    assert site.labels is not None
    shifted = narrower_window(site.images)
    a, b = np.arange(0, 600, 2), np.arange(1, 600, 2)
    return {
        "result": res,
        "dir": model_dir,
        "tmp": tmp,
        "test": test,
        "fit_dir": write_class_folders(tmp / "site-fit", shifted[a], site.labels[a], CLASSES),
        "held_dir": write_class_folders(tmp / "site-held", shifted[b], site.labels[b], CLASSES),
    }


@pytest.mark.shared
@pytest.mark.slow
def test_fine_tune_fits_a_temperature_on_validation_and_records_it(trained: dict[str, Any]) -> None:
    res, model_dir, test = trained["result"], trained["dir"], trained["test"]
    cal = ModelConfig.load(model_dir).metrics["calibration"]
    assert cal["method"] == "temperature scaling" and cal["status"] == "calibrated"
    assert cal["fitted_on"]["split"] == "val" and cal["fitted_on"]["n"] == 100
    assert cal["evaluated_on"] == {"split": "test", "n": 200, "data": "liver vs spleen"}
    assert cal["bins"] == 15 and len(cal["reliability"]["after"]) == 15
    # the recorded ECEs are what the selected model's test logits give, without and with T
    logits = predict_logits(res.model, test.images, res.preprocessing, amp=False, channels_last=False)
    t = cal["temperature"]
    assert t != pytest.approx(1.0, abs=1e-3)
    assert cal["ece_before"] == pytest.approx(
        expected_calibration_error(scaled_probs(logits, 1.0), test.labels), abs=1e-5
    )
    assert cal["ece_after"] == pytest.approx(
        expected_calibration_error(scaled_probs(logits, t), test.labels), abs=1e-5
    )
    # the binary threshold applies to the calibrated probabilities and decides as the raw one did
    raw = cal["operating_point"]["threshold_uncalibrated"]
    assert res.threshold == pytest.approx(binary_threshold_after(raw, t))
    raw_pos = scaled_probs(logits, 1.0)[:, 1] >= raw
    assert np.array_equal(raw_pos, scaled_probs(logits, t)[:, 1] >= res.threshold)
    card = (model_dir / "README.md").read_text()
    assert "## Calibration" in card and "15 equal-width bins" in card and f"{cal['ece_after']:.4f}" in card
    assert (model_dir / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the temperature travels in the ONNX file (covered by its sha256 sidecar)
    meta = read_metadata(model_dir / "model.onnx")
    assert meta["calibration"]["temperature"] == pytest.approx(t) and meta["calibration"]["id"] == cal["id"]


@pytest.mark.shared
@pytest.mark.slow
def test_served_probabilities_are_softmax_of_logits_over_t(trained: dict[str, Any]) -> None:
    model_dir, test = trained["dir"], trained["test"]
    clf = OnnxClassifier.from_model_dir(model_dir, threads=1)
    t = ModelConfig.load(model_dir).metrics["calibration"]["temperature"]
    assert clf.temperature == pytest.approx(t) and clf.calibration["status"] == "calibrated"
    x = model_inputs(test.images[:12], clf.config.preprocessing).numpy()
    out = clf.outputs(x)
    expected = softmax(out.logits.astype(np.float64) / t)
    assert np.allclose(out.probabilities, expected, atol=1e-12)
    assert np.allclose(clf.predict_proba(x), expected, atol=1e-12)
    assert np.abs(out.probabilities - softmax(out.logits.astype(np.float64))).max() > 1e-3  # T changes them
    torch_clf = TorchClassifier.from_dir(model_dir, ood=False)  # the torch path applies the same T
    assert np.allclose(torch_clf.predict_proba(x), expected, atol=1e-4)


@pytest.mark.shared
@pytest.mark.slow
def test_an_export_without_calibration_is_served_as_t1_and_says_uncalibrated(trained: dict[str, Any]) -> None:
    src, tmp = trained["dir"], trained["tmp"]
    plain = tmp / "uncalibrated"
    plain.mkdir()
    for name in ("model.safetensors", "model.safetensors.sha256"):
        (plain / name).write_bytes((src / name).read_bytes())
    cfg = ModelConfig.load(src)
    cfg.metrics = {k: v for k, v in cfg.metrics.items() if k not in ("calibration", "onnx")}
    cfg.save(plain)
    export_onnx(plain, exporter="torchscript", parity_images=4, ood_images=0, threads=1)
    clf = OnnxClassifier.from_model_dir(plain, threads=1)
    assert clf.calibration["status"] == "uncalibrated" and clf.temperature == 1.0
    x = model_inputs(trained["test"].images[:4], clf.config.preprocessing).numpy()
    out = clf.outputs(x)
    assert np.allclose(out.probabilities, softmax(out.logits.astype(np.float64)), atol=1e-12)


def _held_out_ece(model_dir: Path, held_dir: Path) -> tuple[float, int]:
    """ECE of the served (ONNX, calibrated) probabilities of a model on a labeled folder."""
    clf = OnnxClassifier.from_model_dir(model_dir, threads=1)
    pp = clf.config.preprocessing
    held = load_splits(held_dir, pp, storage_size=pp.input_size)["all"]
    assert held.labels is not None
    probs = clf.predict_proba(model_inputs(held.images, pp).numpy())
    return expected_calibration_error(probs, held.labels), len(held)


@pytest.mark.shared
@pytest.mark.slow
def test_recalibration_on_a_shifted_set_lowers_held_out_ece(trained: dict[str, Any], capsys: Any) -> None:
    model_dir, tmp = trained["dir"], trained["tmp"]
    before_files = tree_digest(model_dir)
    out = tmp / "headct-cal2-site-a"
    argv = ["calibrate", "--model", str(model_dir), "--data", str(trained["fit_dir"]), "--site", "site-a"]
    argv += ["--out", str(out), "--youden", "--resamples", "200", "--threads", "1"]
    assert cthub_main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    # the old version is untouched; the new one is another folder with its own ONNX file and checksum
    assert tree_digest(model_dir) == before_files
    old_meta, new_meta = read_metadata(model_dir / "model.onnx"), read_metadata(out / "model.onnx")
    assert summary["onnx_sha256"] != before_files["model.onnx"]
    cfg = ModelConfig.load(out)
    cal = cfg.metrics["calibration"]
    assert cal["version"] == 2 and cal["site"] == "site-a" and cal["fitted_on"]["n"] == 300
    assert cal["previous"]["id"] == old_meta["calibration"]["id"]
    assert new_meta["calibration"]["temperature"] == pytest.approx(cal["temperature"])
    # the served block names the held-out estimate beside the in-sample ECE of the set T was fitted on
    assert new_meta["calibration"]["ece_cross_validated"] == pytest.approx(cal["ece_after_cross_validated"])
    assert "ece_cross_validated" not in old_meta["calibration"]  # fitted at training time: no such estimate
    assert cfg.revision and cfg.revision.endswith("+cal2")
    assert "## Recalibrated at site-a on 300 images" in (out / "README.md").read_text()
    # binary: Youden's operating point on the calibrated scores, its interval around it, the threshold served
    op = cal["operating_point"]
    assert op["rule"] == "youden" and cfg.threshold == op["threshold"]
    assert op["ci"]["threshold"][0] <= op["threshold"] <= op["ci"]["threshold"][1]
    # what the recalibration is for: on held-out slices of the shifted set, the served probabilities of the
    # new version are better calibrated than the old version's (equal if the temperature were ignored)
    old_ece, n = _held_out_ece(model_dir, trained["held_dir"])
    new_ece, _ = _held_out_ece(out, trained["held_dir"])
    assert n == 300
    assert new_ece < old_ece, (old_ece, new_ece, cal["temperature_before"], cal["temperature"])


@pytest.mark.shared
@pytest.mark.slow
def test_calibrate_refuses_a_set_of_other_classes_or_too_few_images(trained: dict[str, Any]) -> None:
    model_dir, tmp = trained["dir"], trained["tmp"]
    images = trained["test"].images[:24]
    other = write_class_folders(tmp / "other", images, np.arange(24) % 2, ["kidney", "spleen"])
    with pytest.raises(ClassMismatchError) as e:
        recalibrate(model_dir, other, tmp / "x1", site="s")
    assert "kidney, spleen" in str(e.value) and "liver, spleen" in str(e.value)
    few = write_class_folders(tmp / "few", images[:8], np.arange(8) % 2, CLASSES)
    with pytest.raises(DataError, match="at least 20"):
        recalibrate(model_dir, few, tmp / "x2", site="s")
    with pytest.raises(ConfigError, match="new folder"):
        recalibrate(model_dir, trained["fit_dir"], model_dir, site="s")
    assert not (tmp / "x1").exists() and not (tmp / "x2").exists()


@pytest.mark.shared
@pytest.mark.slow
def test_calibrate_sets_the_threshold_for_a_stated_sensitivity(trained: dict[str, Any]) -> None:
    out, record = recalibrate(
        trained["dir"], trained["fit_dir"], trained["tmp"] / "sens", site="s", sensitivity=0.9, resamples=200
    )
    op = record["operating_point"]
    assert op["rule"] == "sensitivity>=0.9" and ModelConfig.load(out).threshold == op["threshold"]
    # on the set's calibrated scores (the new version's torch path): the highest threshold reaching 90%
    clf = TorchClassifier.from_dir(out, ood=False)
    pp = clf.config.preprocessing
    s = load_splits(trained["fit_dir"], pp, storage_size=pp.input_size)["all"]
    assert s.labels is not None
    scores = clf.predict_proba(model_inputs(s.images, pp).numpy())[:, 1]
    pos = np.sort(scores[s.labels == 1])[::-1]
    k = int(np.ceil(0.9 * len(pos)))  # positives that must score at or above the threshold
    assert op["threshold"] == pytest.approx(pos[k - 1], abs=1e-6)
    assert np.mean(scores[s.labels == 1] >= op["threshold"] - 1e-5) == pytest.approx(op["sensitivity"])
    assert op["sensitivity"] >= 0.9 and op["ci"]["resamples"] == 200


def test_ece_is_the_binned_gap_between_accuracy_and_confidence() -> None:
    # 4 images: two in the (0.8, 0.867] bin, right once (accuracy 0.5, confidence 0.85); two in (0.933, 1],
    # both right (accuracy 1, confidence 0.95): ECE = 0.5 * 0.35 + 0.5 * 0.05 = 0.2
    probs = np.array([[0.85, 0.15], [0.15, 0.85], [0.95, 0.05], [0.05, 0.95]])
    labels = np.array([0, 0, 0, 1])
    rel = reliability(probs, labels)
    assert rel["ece"] == pytest.approx(0.2)
    filled = [b for b in rel["bins"] if b["n"]]
    assert [(b["n"], b["accuracy"]) for b in filled] == [(2, 0.5), (2, 1.0)]


@pytest.mark.parametrize(
    "temperature", [2.5, 0.75, 1.0, 0.0, -1.5, True, "2.0", None, float("nan")], ids=repr
)
def test_recalibration_reads_the_current_t_by_the_served_rule(temperature: Any) -> None:
    """`cthub calibrate`'s "before" is the T that was served (`served_calibration` in the ONNX metadata,
    `config_temperature` on the torch side): a T of 0, a negative one, a bool or a string is served as 1."""
    from export.metadata import served_calibration
    from finetune.calibration import config_temperature
    from finetune.recalibrate import _current

    record = {"method": "temperature scaling", "temperature": temperature, "version": 3, "id": "x"}
    cfg = ModelConfig(name="m", num_classes=2, labels=list(CLASSES), metrics={"calibration": record})
    rec, t, version = _current(cfg)
    served = served_calibration(record)["temperature"]
    assert t == served == config_temperature(cfg.metrics)
    assert rec is record and version == 3  # the record stays in the history, its version not reused
    assert _current(ModelConfig(name="m", num_classes=2)) == (None, 1.0, 0)


def _content_items(ds: Any) -> list[Any]:
    """Every content item of an SR, depth first."""
    out = []
    for item in ds.get("ContentSequence", []):
        out.append(item)
        out += _content_items(item)
    return out


@pytest.mark.shared
@pytest.mark.slow
def test_model_answers_series_and_sr_name_the_calibration(
    trained: dict[str, Any], ct_small_dcm: Path, tmp_path: Path
) -> None:
    import pydicom
    from test_serving_report import dciodvfy_errors

    from serving.analysis import Analyzer, Options
    from serving.inference import InferenceEngine
    from serving.settings import ServeSettings
    from serving.viewer import calibration_text

    model_dir = trained["dir"]
    cal = ModelConfig.load(model_dir).metrics["calibration"]
    served = InferenceEngine(OnnxClassifier.from_model_dir(model_dir, threads=1)).served()
    card = served.card()["calibration"]
    assert card["temperature"] == pytest.approx(cal["temperature"]) and card["version"] == 1
    assert card["fitted_on"]["n"] == 100 and len(card["reliability"]) == 15  # /model: with the bins
    # the demo's plain-language line: read off the reliability bin nearest 0.8 that holds >= 5 test slices
    line = calibration_text(card)
    near = min(
        (b for b in card["reliability"] if b["n"] >= 5),
        key=lambda b: 0.0 if b["lo"] < 0.8 <= b["hi"] else min(abs(b["lo"] - 0.8), abs(b["hi"] - 0.8)),
    )
    assert line.startswith("- Calibrated on the 100 val images")
    assert f"{100 * near['accuracy']:.0f}% were that class ({near['n']} slices)" in line
    analyzer = Analyzer(ServeSettings(max_batch=4), served)
    answer = analyzer.predict_dicom(ct_small_dcm.read_bytes(), Options(), {})
    block = answer["calibration"]
    assert block["id"] == cal["id"] and block["operating_point"]["threshold"] == pytest.approx(
        served.config.threshold
    )
    assert "reliability" not in block  # every answer: the calibration's identity, not its bins
    series, _ = analyzer.analyse_series([ct_small_dcm], {})
    assert series["calibration"] == block
    sr = analyzer.report([ct_small_dcm], {})
    assert dciodvfy_errors(sr, tmp_path) == []
    ds = pydicom.dcmread(io.BytesIO(sr))
    items = _content_items(ds)
    texts = [str(i.TextValue) for i in items if i.ValueType == "TEXT"]
    assert f"calibration=version 1 id {cal['id']}" in texts
    nums = {
        i.ConceptNameCodeSequence[0].CodeMeaning: float(i.MeasuredValueSequence[0].NumericValue)
        for i in items
        if i.ValueType == "NUM"
    }
    assert nums["Calibration temperature"] == pytest.approx(cal["temperature"], rel=1e-6)
    assert nums["Operating threshold"] == pytest.approx(served.config.threshold, rel=1e-6)
