"""The Gradio demo (`serving.demo`, `serving.viewer`) on real DICOM files (pydicom, pydicom-data): the
viewer's rendering and reading checked against ctdata and the exported ONNX model called directly, then every
event of the page called through gradio_client on a launched demo, the demo alone through `cthub demo`, and
the guarantees about patient data (allow-listed metadata, uploads deleted from a private directory)."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from helpers import PHI, PHI_NEEDLES, calibrated, colour_ct, edited, need, png_pixels, to_bytes, zip_of

from ctdata import heatmap, read_dicom
from ctdata.datasets import ORGANAMNIST_LABELS
from ctdata.preprocess import WINDOW_PRESETS, PreprocessConfig, prepare, prepare_batch
from cthub.errors import InputError
from export import export_onnx
from export.session import OnnxClassifier
from hub import ModelConfig, ResNet50, save_pretrained
from serving import viewer
from serving.demo import DemoModel, Handlers, build_demo, launch_options, local_classifiers
from serving.inference import InferenceEngine, open_classifier, resolve_model_dir
from serving.launch import QUIET, ROOT, free_port
from serving.settings import ServeSettings
from serving.viewer import CUSTOM, MODEL_DEFAULT, private_upload_dir

LABELS = ["normal", "hemorrhage"]
ORGANS = ORGANAMNIST_LABELS
# the outputs of the events that (re)analyse a study, in the order `Panels.analysis_outputs` lists them
ANALYSIS = (
    "slice",
    "cam_class",
    "prediction",
    "rule",
    "series",
    "card",
    "notes",
    "image",
    "probabilities",
    "info",
    "banner",
    "metadata",
    "details",
    "readout",
)
SLICE_OUTPUTS = ANALYSIS[7:]
SETTINGS = ServeSettings(max_pixels=1_000_000, max_series_bytes=8 * 2**20, max_slices=6, max_batch=4)


# ---- real DICOM files and small real models (also used by test_demo_browser.py) ---------------------------


def hu_dicom(hu: np.ndarray) -> bytes:
    """A real CT header (CT_small.dcm) carrying `hu` (int16, slope 1, intercept 0) as its pixels."""
    rows, cols = hu.shape
    return edited(
        need("CT_small.dcm"),
        Rows=rows,
        Columns=cols,
        BitsAllocated=16,
        BitsStored=16,
        HighBit=15,
        PixelRepresentation=1,
        RescaleSlope=1,
        RescaleIntercept=0,
        PixelData=np.ascontiguousarray(hu, dtype="<i2").tobytes(),
    )


def make_series(src: Path, n: int, seed: int = 0) -> list[tuple[float, bytes]]:
    """`n` slices of one new series made from a real CT slice: 5 mm apart along z, content rolled per slice
    (so the model's answers differ), new UIDs; (z, bytes) in a shuffled upload order."""
    import pydicom
    from pydicom.uid import generate_uid

    series_uid, out = generate_uid(), []
    for i in range(n):
        ds = pydicom.dcmread(src)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        z = -40.0 + 5.0 * i
        ds.ImagePositionPatient = [0.0, 0.0, z]
        ds.InstanceNumber = n - i  # opposite to the position: the order must come from the position
        ds.PixelData = np.roll(ds.pixel_array, 9 * i, axis=1).tobytes()
        out.append((z, to_bytes(ds)))
    random.Random(seed).shuffle(out)  # noqa: S311 -- a test's upload order
    return out


def binary_classifier(folder: Path) -> Path:
    """An exported 2-class ResNet50 (brain window, 64 px) whose operating point makes its decision on
    CT_small.dcm differ from the most probable class, so that a view showing the argmax is caught."""
    pp = PreprocessConfig.for_window("brain", input_size=64)
    torch.manual_seed(3)
    ct = [need(n) for n in ("CT_small.dcm", "J2K_pixelrep_mismatch.dcm")]
    x = torch.stack(
        [prepare(p, pp.replace(window=w)) for p in ct for w in ("brain", "abdomen", "bone", "lung")]
    )
    model = calibrated(ResNet50(num_classes=2), x)
    with torch.no_grad():
        p1 = float(torch.softmax(model(prepare(ct[0], pp)[None]), 1)[0, 1])
    assert 0.05 < p1 < 0.95, p1  # not saturated
    threshold = round((p1 + 1) / 2 if p1 >= 0.5 else p1 / 2, 4)
    cfg = ModelConfig(
        name="tiny-brain",
        method="random",
        num_classes=2,
        labels=LABELS,
        threshold=threshold,
        preprocessing=pp,
        metrics={"test_auc": 0.5123, "test_accuracy": 0.61, "note": "not a number: not listed"},
    )
    save_pretrained(model, folder, cfg)
    export_onnx(folder, tolerance=1e-3, exporter="torchscript", parity_images=4, threads=1)
    return folder


def organ_classifier(folder: Path, npz: Path) -> Path:
    """An exported 11-class ResNet50 calibrated on OrganAMNIST, with the out-of-distribution reference of its
    data. Its window maps HU 0..255 to 0..1, so OrganAMNIST's grey images stored as HU reach the model
    exactly as in training (in distribution), while real CT slices do not resemble them."""
    pp = PreprocessConfig(mapping="window", window_center=127.5, window_width=255.0, input_size=64)
    torch.manual_seed(0)
    model = calibrated(ResNet50(num_classes=11), prepare_batch(np.load(npz)["train_images"][:256], pp))
    cfg = ModelConfig(name="tiny-organ", method="random", num_classes=11, labels=ORGANS, preprocessing=pp)
    save_pretrained(model, folder, cfg)
    export_onnx(
        folder, tolerance=1e-3, exporter="torchscript", data=npz, parity_images=16, ood_images=200, threads=1
    )
    return folder


@pytest.fixture(scope="module")
def brain_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return binary_classifier(tmp_path_factory.mktemp("brain") / "tiny-brain")


@pytest.fixture(scope="module")
def organ_dir(tmp_path_factory: pytest.TempPathFactory, organamnist_npz: Path) -> Path:
    return organ_classifier(tmp_path_factory.mktemp("organ") / "tiny-organ", organamnist_npz)


@pytest.fixture(scope="module")
def brain(brain_dir: Path) -> OnnxClassifier:
    clf = open_classifier(resolve_model_dir(brain_dir), threads=1)
    assert isinstance(clf, OnnxClassifier) and clf.backend == "onnx"
    return clf


def in_process(clf: OnnxClassifier) -> DemoModel:
    """The demo's model run in this process by the classifier (the mounted demo's goes through the
    server's batched session instead: tests/test_demo_browser.py)."""
    return DemoModel(clf.path.parent, InferenceEngine(clf).served())


class Demo:
    """A launched demo and a gradio_client session on it; `call` returns named outputs."""

    def __init__(self, url: str, upload_dir: Path, downloads: Path) -> None:
        from gradio_client import Client

        self.url, self.upload_dir = url, upload_dir
        self.client = Client(url, verbose=False, download_files=str(downloads))

    def call(self, api: str, *args: Any, names: tuple[str, ...] = ANALYSIS) -> dict[str, Any]:
        out = self.client.predict(*args, api_name=api)
        out = out if isinstance(out, tuple) else (out,)
        assert len(out) == len(names), (api, len(out))
        return dict(zip(names, out, strict=True))

    def load(self, files: list[Path], model: str | None = None, **view: Any) -> dict[str, Any]:
        from gradio_client import handle_file

        return self.call("/load", [handle_file(str(f)) for f in files], model, *view_args(**view))


def view_args(
    slice: int = 1,
    preset: str = MODEL_DEFAULT,
    center: float = 40,
    width: float = 400,
    cam: bool = False,
    cam_class: str | None = None,
    opacity: float = 0.4,
) -> tuple[Any, ...]:
    """The viewer's controls in the order the events take them (slice, window, map)."""
    return (slice, preset, center, width, cam, cam_class, opacity)


@pytest.fixture(scope="module")
def demo_server(
    brain: OnnxClassifier, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """The demo launched in this process, its upload directory set for the module."""
    upload_dir = tmp_path_factory.mktemp("gradio-uploads")
    mp = pytest.MonkeyPatch()
    mp.setenv("GRADIO_TEMP_DIR", str(upload_dir))
    port = free_port()
    demo = build_demo(lambda: in_process(brain), SETTINGS)
    demo.launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_options()
    )
    try:
        yield f"http://127.0.0.1:{port}/", upload_dir.resolve()
    finally:
        demo.close()
        mp.undo()


@pytest.fixture
def demo(demo_server: tuple[str, Path], gradio_client_temp_dir: Path) -> Demo:
    """A new client session (its own study state) on the module's demo."""
    return Demo(*demo_server, gradio_client_temp_dir / "downloads")


def confidences(label: dict[str, Any]) -> dict[str, float]:
    return {c["label"]: c["confidence"] for c in label["confidences"]}


def windowed(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """The expected grey levels of a window, computed here from HU."""
    return np.rint(np.clip((hu - (center - width / 2)) / width, 0, 1) * 255)


# ---- the viewer, without Gradio ---------------------------------------------------------------------------


def test_study_keeps_hu_at_full_resolution_and_renders_windows(
    brain: OnnxClassifier, ct_small_dcm: Path
) -> None:
    study = viewer.read_study([ct_small_dcm], SETTINGS)
    hu = read_dicom(ct_small_dcm).pixels[0]
    (sl,) = study.slices
    assert sl.pixels.dtype == np.int16 and np.array_equal(sl.values(), hu)  # lossless: integral HU
    base = brain.config.preprocessing
    for preset in ("bone", "lung", "subdural"):
        c, w = WINDOW_PRESETS[preset]
        assert viewer.preset_window(preset, base) == (c, w)
        rgb = viewer.render(sl, viewer.display_config(base, preset, c, w))
        assert rgb.shape == (*hu.shape, 3) and rgb.dtype == np.uint8  # 128 x 128: the slice's own size
        assert np.abs(rgb[..., 0] - windowed(hu, c, w)).max() <= 1 and (rgb[..., 0] == rgb[..., 2]).all()
    own = viewer.render(sl, viewer.display_config(base, MODEL_DEFAULT, 0, 1))  # sliders ignored
    assert np.abs(own[..., 0] - windowed(hu, 35, 80)).max() <= 1  # the model's brain window
    assert viewer.preset_window(MODEL_DEFAULT, base) == (35, 80)
    assert viewer.preset_window(MODEL_DEFAULT, PreprocessConfig()) == (1023.5, 4095)  # interval -1024..3071
    assert viewer.preset_window(CUSTOM, base) is None
    assert viewer.pixel_value(sl, 10, 100) == hu[100, 10]
    with pytest.raises(InputError, match="outside"):
        viewer.pixel_value(sl, 128, 0)


def test_analysis_equals_the_onnx_model_on_the_api_preprocessing(
    brain: OnnxClassifier, brain_dir: Path, ct_small_dcm: Path
) -> None:
    other = need("693_UNCI.dcm")  # another series: reported, never mixed in
    study = viewer.read_study([ct_small_dcm, other], SETTINGS)
    assert len(study.slices) == 1 and study.slices[0].pixels.shape == (128, 128)
    assert study.left_out["other_series"][0]["files"] == [1]
    assert "file" in viewer.left_out_text(study.left_out)[0]
    a = viewer.analyse(study, InferenceEngine(brain).served(), str(brain_dir), batch=1)
    clf = OnnxClassifier(brain_dir / "model.onnx", threads=1)
    ref = clf.outputs(prepare(ct_small_dcm, clf.config.preprocessing)[None])
    r = a.slices[0]
    assert np.allclose([r.probabilities[k] for k in LABELS], ref.probabilities[0], atol=1e-6)
    assert np.allclose(r.cam, ref.cam[0], atol=1e-5) and r.cam.shape == (2, 4, 4)
    argmax = LABELS[int(np.argmax(ref.probabilities[0]))]
    assert r.label != argmax and r.decision["rule"] == "threshold"  # the operating point, not the argmax
    assert a.series is None and r.ood["available"] is False
    # a multi-frame enhanced CT: every frame is a slice, in anatomical order
    ect = viewer.read_study([need("eCT_Supplemental.dcm")], SETTINGS)
    assert len(ect.slices) == 2 and [s.frame for s in ect.slices] in ([0, 1], [1, 0])
    assert ect.metadata[0]["pixel_spacing_mm"] and ect.metadata[0]["modality"] == "CT"  # functional groups


def test_metadata_is_an_allow_list(tmp_path: Path, ct_small_dcm: Path) -> None:
    planted = tmp_path / "phi.dcm"
    planted.write_bytes(edited(ct_small_dcm, **PHI))
    study = viewer.read_study([planted], SETTINGS)
    meta = study.metadata[0]
    allowed = {
        "modality",
        "manufacturer",
        "model_name",
        "slice_thickness_mm",
        "pixel_spacing_mm",
        "kvp",
        "convolution_kernel",
        "rows",
        "columns",
        "transfer_syntax",
    }
    assert set(meta) <= allowed
    assert meta["modality"] == "CT" and meta["kvp"] == 120.0 and meta["convolution_kernel"] == "STANDARD"
    assert (
        meta["pixel_spacing_mm"] == pytest.approx([0.661468, 0.661468]) and meta["slice_thickness_mm"] == 5.0
    )
    assert (
        meta["transfer_syntax"] == "Explicit VR Little Endian"
        and meta["manufacturer"] == "GE MEDICAL SYSTEMS"
    )
    text = json.dumps(meta) + json.dumps(study.notes)
    assert not [n for n in PHI_NEEDLES if n in text]


def test_private_upload_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    made = private_upload_dir()
    try:
        assert os.environ["GRADIO_TEMP_DIR"] == str(made) and made.is_dir()
        assert made.stat().st_mode & 0o777 == 0o700 and not made.is_relative_to(Path("/tmp/gradio"))
    finally:
        made.rmdir()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "operator"))  # the operator's choice is kept
    assert private_upload_dir() == (tmp_path / "operator").resolve() and (tmp_path / "operator").is_dir()


def test_only_gradio_uploads_are_deleted(brain: OnnxClassifier, tmp_path: Path, ct_small_dcm: Path) -> None:
    uploads = tmp_path / "uploads"
    (uploads / "abc123").mkdir(parents=True)
    uploaded = uploads / "abc123" / "slice.dcm"
    uploaded.write_bytes(ct_small_dcm.read_bytes())
    mine = tmp_path / "mine.dcm"
    mine.write_bytes(ct_small_dcm.read_bytes())
    handlers = Handlers(lambda: in_process(brain), SETTINGS, uploads.resolve())
    out = handlers.on_upload([str(uploaded), str(mine)], None, *view_args())
    assert isinstance(out[0], viewer.Study) and len(out[0].slices) == 2
    assert not (uploads / "abc123").exists() and mine.read_bytes() == ct_small_dcm.read_bytes()


# ---- every event through gradio_client --------------------------------------------------------------------


def test_upload_one_dicom_shows_the_decision_the_probabilities_and_the_card(
    demo: Demo, brain: OnnxClassifier, brain_dir: Path, ct_small_dcm: Path
) -> None:
    models, center, width = demo.client.predict(api_name="/models")
    assert [c[1] for c in models["choices"]] == [str(brain_dir.resolve())] and (center, width) == (35, 80)
    out = demo.load([ct_small_dcm], str(brain_dir))
    clf = OnnxClassifier(brain_dir / "model.onnx", threads=1)
    p = clf.predict_proba(prepare(ct_small_dcm, clf.config.preprocessing)[None])[0]
    assert confidences(out["probabilities"]) == pytest.approx(dict(zip(LABELS, p, strict=True)), abs=1e-6)
    expected = LABELS[1] if p[1] >= brain.config.threshold else LABELS[0]
    assert out["prediction"] == expected != LABELS[int(np.argmax(p))]  # the operating point decides
    assert f"≥ {brain.config.threshold:.2f}" in out["rule"]
    hu = read_dicom(ct_small_dcm).pixels[0]
    image = png_pixels(out["image"])
    assert image.shape == (128, 128, 3) and np.abs(image[..., 0] - windowed(hu, 35, 80)).max() <= 1
    card = out["card"]
    for needle in (
        "tiny-brain",
        brain.identity["version"],
        "random",
        "test_auc 0.512",
        "window brain",
    ):
        assert needle in card, needle
    assert "not a number" not in card and "none in this export" in card
    assert (
        out["slice"]["value"] == 1
        and out["slice"]["interactive"] is False
        and out["slice"]["visible"] is False
    )
    assert out["series"]["visible"] is False and out["banner"]["visible"] is False
    assert out["metadata"]["kvp"] == 120.0 and out["metadata"]["preprocessing_applied"]["channels"] == 3
    assert out["details"]["slice"]["decision"]["threshold"] == brain.config.threshold
    assert "no out-of-distribution reference" in out["notes"]
    cleared = demo.call("/clear")
    assert cleared["prediction"] == "" and cleared["image"] is None and not cleared["probabilities"]


def test_series_in_anatomical_order_slice_by_slice(demo: Demo, brain: OnnxClassifier, tmp_path: Path) -> None:
    series = make_series(need("CT_small.dcm"), 5)
    zipped = tmp_path / "series.zip"
    zipped.write_bytes(zip_of([b for _, b in series[:3]]))
    loose = []
    for i, (_, b) in enumerate(series[3:]):
        loose.append(tmp_path / f"loose{i}")
        loose[-1].write_bytes(b)
    out = demo.load([zipped, *loose])  # a zip and loose files of one series, together
    assert out["slice"]["maximum"] == 5 and out["slice"]["interactive"] is True
    peak = out["details"]["series"]["peak_slice"]
    assert (
        out["slice"]["value"] == peak + 1 and out["details"]["slice"]["index"] == peak
    )  # starts at the peak
    assert out["series"]["visible"] is True and "series scores" in out["rule"]
    clf = brain
    positions, probs = [], []
    for k in range(1, 6):
        s = demo.call("/show_slice", *view_args(slice=k), names=SLICE_OUTPUTS)
        positions.append(s["details"]["slice"]["position_mm"])
        probs.append(confidences(s["probabilities"]))
        assert f"Slice **{k}** of 5" in s["info"]
    assert positions == sorted(z for z, _ in series)  # anatomical order, not upload or InstanceNumber order
    by_z = dict(series)
    for z, got in zip(positions, probs, strict=True):
        ref = clf.predict_proba(prepare(by_z[z], clf.config.preprocessing)[None])[0]
        assert [got[k] for k in LABELS] == pytest.approx(ref, abs=1e-6)
    top = np.sort(np.array([[p[k] for k in LABELS] for p in probs]), axis=0)[-3:].mean(axis=0)
    assert confidences(out["series"]["value"]) == pytest.approx(dict(zip(LABELS, top, strict=True)), abs=1e-9)


def test_window_preset_sliders_and_class_activation_map(
    demo: Demo, brain: OnnxClassifier, ct_small_dcm: Path
) -> None:
    out = demo.load([ct_small_dcm])
    hu = read_dicom(ct_small_dcm).pixels[0]
    plain = png_pixels(out["image"])
    c, w, img = demo.client.predict(*view_args(preset="bone"), api_name="/set_preset")
    assert (c, w) == WINDOW_PRESETS["bone"]
    bone = png_pixels(img)
    assert np.abs(bone[..., 0] - windowed(hu, 400, 1800)).max() <= 1 and not np.array_equal(bone, plain)
    preset, img = demo.client.predict(*view_args(preset="bone", center=60, width=120), api_name="/set_window")
    assert preset == CUSTOM and np.abs(png_pixels(img)[..., 0] - windowed(hu, 60, 120)).max() <= 1
    # the map of each class from the ONNX model's cam output, blended over the windowed slice
    clf = brain
    cams = clf.outputs(prepare(ct_small_dcm, clf.config.preprocessing)[None]).cam[0]
    study = viewer.read_study([ct_small_dcm], SETTINGS)
    cfg = viewer.display_config(clf.config.preprocessing, "bone", 400, 1800)
    maps = {}
    for k, label in enumerate(LABELS):
        got = png_pixels(
            demo.client.predict(
                *view_args(preset="bone", center=400, width=1800, cam=True, cam_class=label), api_name="/cam"
            )
        )
        expected = viewer.render(study.slices[0], cfg, heatmap.heat(cams[k]), 0.4)
        assert np.abs(got.astype(int) - expected).max() <= 1, label
        assert not np.array_equal(got, bone) and not np.array_equal(got[..., 0], got[..., 2])  # colour
        maps[label] = got
    assert not np.array_equal(maps["normal"], maps["hemorrhage"])
    off = png_pixels(
        demo.client.predict(
            *view_args(preset="bone", center=400, width=1800, cam=False, cam_class="normal"), api_name="/cam"
        )
    )
    clear = png_pixels(
        demo.client.predict(
            *view_args(preset="bone", center=400, width=1800, cam=True, cam_class="normal", opacity=0.0),
            api_name="/cam",
        )
    )
    assert np.array_equal(off, bone) and np.array_equal(clear, bone)


def test_pixel_readout_in_hu(demo: Demo, tmp_path: Path, ct_small_dcm: Path) -> None:
    from gradio_client.exceptions import AppError

    demo.load([ct_small_dcm])
    hu = read_dicom(ct_small_dcm).pixels[0]
    for x, y in ((0, 0), (64, 40), (127, 127), (5, 90)):
        got = demo.client.predict(1, x, y, api_name="/hu_at")
        assert got == f"x {x}, y {y}: {hu[y, x]:g} HU"
    with pytest.raises(AppError, match="outside the 128 x 128 slice"):
        demo.client.predict(1, 128, 3, api_name="/hu_at")


def test_model_picker_offers_exported_classifiers_of_the_local_hub(
    demo: Demo, brain_dir: Path, organ_dir: Path, _isolated_hub: Path, tmp_path: Path, ct_small_dcm: Path
) -> None:
    from gradio_client.exceptions import AppError

    (_isolated_hub / "organ").symlink_to(organ_dir, target_is_directory=True)
    unexported = _isolated_hub / "unexported"  # weights and config but no model.onnx: not offered
    unexported.mkdir()
    for name in ("model.safetensors", "config.json"):
        (unexported / name).symlink_to(organ_dir / name)
    assert local_classifiers() == [organ_dir.resolve()]
    models, _, _ = demo.client.predict(api_name="/models")
    assert [c[1] for c in models["choices"]] == [str(brain_dir.resolve()), str(organ_dir.resolve())]
    assert "tiny-organ (random, 11 classes)" in [c[0] for c in models["choices"]]
    demo.load([ct_small_dcm], str(brain_dir))
    out = demo.call("/pick_model", str(organ_dir.resolve()), *view_args(cam=True, cam_class="hemorrhage"))
    assert set(confidences(out["probabilities"])) == set(ORGANS) and "tiny-organ" in out["card"]
    assert out["cam_class"]["value"] == out["prediction"] in ORGANS  # the old class is gone: the decided one
    with pytest.raises(AppError, match=r"not in the list of choices|not offered here"):
        demo.call("/pick_model", str(unexported), *view_args())
    back = demo.call("/pick_model", str(brain_dir.resolve()), *view_args())
    assert set(confidences(back["probabilities"])) == set(LABELS)


def test_out_of_distribution_warning_fires_only_outside_the_training_data(
    demo: Demo,
    organ_dir: Path,
    organamnist_npz: Path,
    _isolated_hub: Path,
    tmp_path: Path,
    ct_small_dcm: Path,
) -> None:
    (_isolated_hub / "organ").symlink_to(organ_dir, target_is_directory=True)
    clf = OnnxClassifier(organ_dir / "model.onnx", threads=1)
    inside = tmp_path / "organ.dcm"  # an OrganAMNIST test image (not trained on) as HU 0..255
    inside.write_bytes(hu_dicom(np.load(organamnist_npz)["test_images"][0].astype(np.int16)))
    demo.client.predict(api_name="/models")  # the page load: the picker's choices of this session
    model = str(organ_dir.resolve())
    for path, fires in ((inside, False), (ct_small_dcm, True)):
        out = demo.load([path], model)
        score = float(clf.ood_score(clf.outputs(prepare(path, clf.config.preprocessing)[None]))[0])
        assert (score > clf.ood_threshold) is fires  # the premise: real CT is far from OrganAMNIST
        ood = out["details"]["slice"]["ood"]
        assert ood["score"] == pytest.approx(score, rel=1e-5) and ood["warning"] is fires
        assert out["banner"]["visible"] is fires
        if fires:
            assert (
                "Out of distribution" in out["banner"]["value"] and 'role="alert"' in out["banner"]["value"]
            )
            assert f"{clf.ood_threshold:.3g}" in out["banner"]["value"]
        assert f"threshold {clf.ood_threshold:.3g}" in out["card"]


def test_series_out_of_distribution_warning_follows_the_api_series_rule(
    demo: Demo, organ_dir: Path, _isolated_hub: Path, tmp_path: Path
) -> None:
    """A real CT series shown to the organ-crop model: the banner states the series verdict of the API's rule
    (the share of flagged slices, with the count), in the red alert box, not a median."""
    (_isolated_hub / "organ").symlink_to(organ_dir, target_is_directory=True)
    clf = OnnxClassifier(organ_dir / "model.onnx", threads=1)
    series = make_series(need("CT_small.dcm"), 4)
    paths = []
    for i, (_, b) in enumerate(series):
        paths.append(tmp_path / f"s{i}.dcm")
        paths[-1].write_bytes(b)
    demo.client.predict(api_name="/models")
    out = demo.load(paths, str(organ_dir.resolve()))
    scores = [float(clf.ood_score(clf.outputs(prepare(p, clf.config.preprocessing)[None]))[0]) for p in paths]
    flagged = sum(s > clf.ood_threshold for s in scores)
    assert flagged >= 1  # the premise: whole real CT slices are far from organ-centred crops
    verdict = out["details"]["series"]["ood"]
    assert verdict["flagged"] == flagged and verdict["scored"] == 4 and verdict["warning"] is True
    banner = out["banner"]["value"]
    assert out["banner"]["visible"] is True and 'role="alert"' in banner
    assert f"{flagged} of 4" in banner and "median" not in banner


def bad_uploads(tmp_path: Path) -> dict[str, tuple[list[bytes], str]]:
    """Every class of unusable upload, built from real files, with the message the page must show."""
    ct = need("CT_small.dcm")
    data = ct.read_bytes()
    import pydicom

    ts = pydicom.dcmread(ct).file_meta.TransferSyntaxUID.encode()
    return {
        "not_dicom": ([os.urandom(4096)], "file 0 was skipped: not a DICOM Part 10 file"),
        "empty": ([b""], "empty upload"),
        "header_cut": ([data[:3000]], "truncated"),
        "pixels_cut": ([data[:-5000]], "the pixel data is truncated"),
        "no_pixel_data": ([edited(ct, drop=("PixelData",))], "ends before its pixel data"),
        "too_many_pixels": ([edited(ct, Rows=2048, Columns=2048)], "above the limit of 1,000,000"),
        "unknown_transfer_syntax": ([data.replace(ts, b"1.2.840.99999.1.2.1", 1)], "no decoder can read it"),
        "report": ([need("test-SR.dcm").read_bytes()], "Comprehensive SR Storage object, not an image"),
        "mr": ([need("MR_small.dcm").read_bytes()], "modality MR is not among the accepted (CT)"),
        "secondary_capture": (
            [need("SC_rgb.dcm").read_bytes()],
            "modality OT is not among the accepted",
        ),
        "colour_ct": (
            [colour_ct(ct)],
            "colour image is not a grey-level CT slice",
        ),
        "broken_zip": ([b"PK\x03\x04" + os.urandom(500)], "the zip file cannot be read"),
        "zip_without_dicom": ([zip_of([b"notes", b"more notes"])], "zip member 1) was skipped"),
        "too_many_slices": ([data] * 7, "more than 6 objects"),
    }


def test_every_bad_upload_gets_a_clear_message(demo: Demo, tmp_path: Path) -> None:
    from gradio_client.exceptions import AppError

    for name, (blobs, message) in bad_uploads(tmp_path).items():
        files = []
        for i, b in enumerate(blobs):
            files.append(tmp_path / f"{name}-{i}.dcm")
            files[-1].write_bytes(b)
        with pytest.raises(AppError) as err:
            demo.load(files)
        text = str(err.value)
        assert message in text, (name, text)
        assert "Traceback" not in text and 'File "' not in text, name
    assert demo.load([need("CT_small.dcm")])["prediction"] in LABELS  # the demo is still fine


def test_patient_data_never_shown_and_uploads_not_kept(
    demo: Demo, tmp_path: Path, ct_small_dcm: Path
) -> None:
    planted = [tmp_path / f"slice{i}.dcm" for i in range(2)]
    for i, (_, b) in enumerate(make_series(ct_small_dcm, 2)):
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(b))
        for k, v in PHI.items():
            setattr(ds, k, v)
        planted[i].write_bytes(to_bytes(ds))
        assert b"Zyxwvutsky" in planted[i].read_bytes()
    out = demo.load(planted)
    shown = json.dumps({k: v for k, v in out.items() if k != "image"}, default=str)
    shown += json.dumps(demo.call("/show_slice", *view_args(slice=2), names=SLICE_OUTPUTS), default=str)
    assert not [n for n in PHI_NEEDLES if n.lower() in shown.lower()]
    left = [p for p in demo.upload_dir.rglob("*") if p.is_file()]
    for p in left:  # rendered slices may remain in the cache (swept later); uploaded files may not
        head = p.read_bytes()
        assert head[128:132] != b"DICM" and b"Zyxwvutsky" not in head, p
    assert all(p.suffix == ".png" or p.stat().st_size == 0 for p in left), left


# ---- the demo alone: `cthub demo` -------------------------------------------------------------------------


def test_cthub_demo_runs_alone(brain_dir: Path, gradio_client_temp_dir: Path, ct_small_dcm: Path) -> None:
    from gradio_client import Client, handle_file

    tmp_path = gradio_client_temp_dir

    port = free_port()
    env = dict(os.environ) | QUIET | {"PYTHONPATH": str(ROOT)}
    env.pop("GRADIO_TEMP_DIR", None)  # the command makes its own private upload directory...
    env["TMPDIR"] = str(tmp_path / "tmp")  # ...here, and leaves nothing behind
    (tmp_path / "tmp").mkdir()
    log = tmp_path / "demo.log"
    cmd = [sys.executable, "-m", "cthub", "demo", "--model", str(brain_dir), "--port", str(port)]
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp_path))
        out = client.predict([handle_file(str(ct_small_dcm))], None, *view_args(), api_name="/load")
        clf = OnnxClassifier(brain_dir / "model.onnx", threads=1)
        p = clf.predict_proba(prepare(ct_small_dcm, clf.config.preprocessing)[None])[0]
        expected = LABELS[1] if p[1] >= ModelConfig.load(brain_dir).threshold else LABELS[0]
        assert out[2] == expected, (out, p.tolist(), log.read_text())
        said = log.read_text()
        assert "tiny-brain" in said, said
        uploads = Path(said.split("upload directory ", 1)[1].split(" ", 1)[0])
        assert uploads.is_dir() and uploads.stat().st_mode & 0o777 == 0o700
        kept = [f for f in uploads.rglob("*") if f.is_file() and f.read_bytes()[128:132] == b"DICM"]
        assert not kept, kept
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=30)
    # closed like Ctrl+C: the private directory is removed
    assert rc == 0, (rc, log.read_text()[-3000:])
    assert not uploads.exists(), list(uploads.rglob("*"))
    left = list(uploads.parent.rglob("*"))
    assert uploads.parent == tmp_path / "tmp" and left == [], left  # nothing left under TMPDIR
