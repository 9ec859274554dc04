"""Requests that do not ask for a class activation map are answered from a graph without the map nodes.

At 224 px and 11 classes the in-graph Grad-CAM of every class costs several forward passes
(docs/results/bench-224px.md), so `OnnxClassifier` keeps a second session on the verified file's graph pruned
to the outputs that do not depend on the maps, and the analyses choose by what the request asks. Real
exported ResNet50s (random init, BatchNorm calibrated on real CT slices) and real DICOM (the int8 file:
tests/test_export_onnx.py). Checks: the pruned pass gives the full one's logits, probabilities and
embedding (so the OOD score); its session has no map output and fewer nodes; the torch backend does the
same; a file changed after it was verified is refused before a pruned session is built from it; and which
pass each request takes (cam=false, cam=true, a series, a batch), observed on the real engine's two
entry points."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from helpers import calibrated_resnet, need

from ctdata.preprocess import PreprocessConfig, prepare
from cthub.errors import IntegrityError
from export import export_onnx
from export.classifier import TorchClassifier
from export.integrity import onnx_file
from export.session import MAP_OUTPUTS, OnnxClassifier
from hub import ModelConfig, save_pretrained
from serving.analysis import Analyzer, Options
from serving.inference import InferenceEngine
from serving.settings import ServeSettings

SIZE = 64
ORGANS = ["liver", "kidney", "lung", "heart", "spleen"]
SLICES = ("CT_small.dcm", "693_UNCI.dcm")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = ModelConfig(
        name="maps-test",
        num_classes=len(ORGANS),
        labels=ORGANS,
        preprocessing=PreprocessConfig(input_size=SIZE),
    )
    sources = [need(n) for n in SLICES]
    out = save_pretrained(calibrated_resnet(cfg, sources), tmp_path_factory.mktemp("maps") / "m", cfg)
    export_onnx(out, tolerance=1e-3, threads=1)  # random weights: logits differ by ~1e-4 between runtimes
    return out


@pytest.fixture(scope="module")
def batch(model_dir: Path) -> np.ndarray:
    pp = ModelConfig.load(model_dir).preprocessing
    x = torch.stack([prepare(need(n), pp) for n in SLICES])
    return torch.cat([x, x.flip(-1), x.flip(-2)]).numpy()  # 6 distinct real inputs


def test_the_pass_without_maps_equals_the_full_one_and_runs_fewer_nodes(
    model_dir: Path, batch: np.ndarray
) -> None:
    clf = OnnxClassifier.from_model_dir(model_dir, threads=1)
    full, plain = clf.outputs(batch), clf.outputs(batch, maps=False)
    assert full.cam is not None and full.cam.shape == (len(batch), len(ORGANS), SIZE // 16, SIZE // 16)
    assert plain.cam is None
    np.testing.assert_allclose(plain.logits, full.logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(plain.probabilities, full.probabilities, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(plain.embedding, full.embedding, rtol=1e-5, atol=1e-5)
    # the pruned session: every output but the maps, and fewer nodes than the file's graph
    session = clf.prepare_without_maps()
    assert session is clf.prepare_without_maps()  # built once
    kept = [o.name for o in session.get_outputs()]
    assert "cam" not in kept and {"logits", "embedding"} <= set(kept)
    assert set(clf.output_names) - set(kept) == set(MAP_OUTPUTS)
    graph = onnx.load(str(onnx_file(model_dir))).graph
    pruned = onnx.utils.Extractor(onnx.load(str(onnx_file(model_dir)))).extract_model(["input"], kept).graph
    assert len(pruned.node) < 0.8 * len(graph.node)  # the Grad-CAM backward pass of every class is gone


def test_torch_answers_the_same_without_maps(model_dir: Path, batch: np.ndarray) -> None:
    clf = TorchClassifier.from_dir(model_dir, ood=False)
    full, plain = clf.outputs(batch), clf.outputs(batch, maps=False)
    assert plain.cam is None and full.cam is not None
    np.testing.assert_allclose(plain.logits, full.logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(plain.embedding, full.embedding, rtol=1e-5, atol=1e-5)


def test_a_file_changed_after_loading_is_not_pruned(model_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(model_dir, copy)
    clf = OnnxClassifier.from_model_dir(copy, threads=1)  # verified and loaded; no pruned session yet
    path = onnx_file(copy)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="changed on disk"):
        clf.prepare_without_maps()


def _counting(fn: Callable[[np.ndarray], list[dict[str, Any]]], calls: list[int]) -> Callable[..., Any]:
    def run(b: np.ndarray) -> list[dict[str, Any]]:
        calls.append(len(b))
        return fn(b)

    return run


def test_each_request_takes_the_pass_it_needs(model_dir: Path, tmp_path: Path) -> None:
    engine = InferenceEngine(OnnxClassifier.from_model_dir(model_dir, threads=1))
    with_maps: list[int] = []
    without: list[int] = []
    served = dataclasses.replace(
        engine.served(),
        run=_counting(engine.run, with_maps),
        run_without_maps=_counting(engine.run_without_maps, without),
    )
    analyzer = Analyzer(ServeSettings(max_batch=4), served)
    dcm = need("CT_small.dcm").read_bytes()

    plain = analyzer.predict_dicom(dcm, Options(), {})
    assert (with_maps, without) == ([], [1]) and "cam" not in plain
    mapped = analyzer.predict_dicom(dcm, Options(cam=True), {})
    assert (with_maps, without) == ([1], [1])
    assert mapped["cam"]["available"] and mapped["cam"]["map_size"] == [SIZE // 16, SIZE // 16]
    assert mapped["probabilities"] == pytest.approx(plain["probabilities"], abs=1e-6)

    many = analyzer.predict_many([dcm, need("693_UNCI.dcm").read_bytes()], {})
    assert len(many) == 2 and with_maps == [1] and without == [1, 2]
    series = [need("CT_small.dcm")]
    analyzer.analyse_series(series, {})
    assert with_maps == [1] and without == [1, 2, 1]
