"""The served out-of-distribution reference (`export.ood.LayeredOodReference`) on real pooled features: the
four ResNet50 stages of a random-init model over real OrganAMNIST images (train / val / test splits). The
reference's arithmetic is what these tests hold; how well a trained model's score separates real shifts
(a random-init model's does not) is measured in tests/test_ood_shifts.py and docs/results/ood-shifts.md."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ctdata.datasets import load_medmnist
from ctdata.preprocess import PreprocessConfig, prepare_batch
from cthub.errors import ConfigError, ShapeError
from export.ood import (
    LAYERED_METHOD,
    METHOD,
    POOLED_STAGES,
    STAGES,
    LayeredOodReference,
    OodReference,
    Ppca,
    reference_from_metadata,
    stage_features,
)
from export.ood_shifts import torch_features
from hub.resnet import ResNet50

SIZE = 32

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def features(organamnist_npz: Path) -> dict[str, dict[str, np.ndarray]]:
    """Pooled stage features of 160 train, 16 val and 120 test OrganAMNIST images."""
    torch.manual_seed(0)
    model = ResNet50(num_classes=11).eval()
    pp = PreprocessConfig(input_size=SIZE)
    out = {}
    for split, n in (("train", 160), ("val", 16), ("test", 120)):
        images = load_medmnist(organamnist_npz, split).images[:n]
        out[split] = torch_features(model, prepare_batch(images, pp).numpy())
    return out


def test_the_score_is_the_largest_z_scored_stage_distance(features: dict) -> None:
    train, val, test = features["train"], features["val"], features["test"]
    ref = LayeredOodReference.build(train, val, folds=0)  # the measured recipe: z-scores on validation
    assert tuple(ref.stages) == STAGES and ref.info["n_held_out"] == 16 and ref.info["folds"] == 0
    by_hand = []
    for s in STAGES:
        ppca = Ppca.fit(train[s])
        v = ppca.score(val[s])
        assert ref.z_mean[s] == pytest.approx(v.mean()) and ref.z_std[s] == pytest.approx(v.std())
        by_hand.append((ppca.score(test[s]) - v.mean()) / v.std())
    assert np.allclose(ref.score_stages(test), np.max(by_hand, axis=0))
    val_z = np.max([(Ppca.fit(train[s]).score(val[s]) - ref.z_mean[s]) / ref.z_std[s] for s in STAGES], 0)
    assert ref.threshold == pytest.approx(np.quantile(val_z, 0.99))


def test_cross_fitting_pools_every_training_image_into_the_held_out_scores(features: dict) -> None:
    """Small validation split (16): the threshold is a quantile of 16 + 160 held-out scores, each training
    image scored by references fitted without it; the z-scores are centred on those held-out scores."""
    train, val = features["train"], features["val"]
    ref = LayeredOodReference.build(train, val, folds=5)
    assert (ref.info["n_validation"], ref.info["n_cross_fitted"], ref.info["folds"]) == (16, 160, 5)
    assert ref.info["n_held_out"] == 176
    # a training image scores lower under the full reference (fitted on it) than its held-out score:
    # cross-fitting is what keeps the pooled scores honest
    full = np.max([(ref.stages[s].score(train[s]) - ref.z_mean[s]) / ref.z_std[s] for s in STAGES], 0)
    assert np.quantile(full, 0.99) < ref.threshold
    # no cross-fitting with too few training images (each fold's complement needs 8)
    few = {s: train[s][:15] for s in STAGES}
    assert LayeredOodReference.build(few, val, folds=5).info["n_cross_fitted"] == 0
    with pytest.raises(ConfigError, match="held-out"):
        LayeredOodReference.build(few, {s: val[s][:1] for s in STAGES}, folds=5)


def test_the_reference_travels_as_json_metadata_and_the_old_method_is_still_read(features: dict) -> None:
    train, val, test = features["train"], features["val"], features["test"]
    ref = LayeredOodReference.build(train, val)
    meta = json.loads(json.dumps(ref.to_metadata()))
    back = reference_from_metadata(meta)
    assert isinstance(back, LayeredOodReference) and back.method == meta["method"] == LAYERED_METHOD
    assert back.threshold == ref.threshold and back.z_mean == ref.z_mean and back.info == ref.info
    assert np.allclose(back.score_stages(test), ref.score_stages(test), rtol=0, atol=1e-9)
    assert back.summary()["method"] == LAYERED_METHOD and back.summary()["n_held_out"] == 176
    # graph version 2's reference (layer4 alone) reads back as it was written, and scores from the stages
    old = OodReference.build(train["layer4"], val["layer4"])
    old_back = reference_from_metadata(json.loads(json.dumps(old.to_metadata())))
    assert isinstance(old_back, OodReference) and old_back.method == METHOD
    assert np.allclose(old_back.score_stages(test), old.score(test["layer4"]))
    for broken in ({"method": "energy"}, {**meta, "stages": {"layer9": {}}}, {**meta, "threshold": None}):
        with pytest.raises(ConfigError):
            reference_from_metadata(broken)


def test_stage_features_splits_the_graphs_stage_pool_output(features: dict) -> None:
    test = features["test"]
    pool = np.concatenate([test[s] for s in POOLED_STAGES], axis=1)
    split = stage_features(pool, test["layer4"])
    assert all(np.array_equal(split[s], test[s]) for s in STAGES)
    assert list(stage_features(None, test["layer4"])) == ["layer4"]  # a graph version 2 file
    with pytest.raises(ShapeError):
        stage_features(pool[:, :-1], test["layer4"])
    with pytest.raises(ConfigError, match="layer1"):
        LayeredOodReference.build(features["train"], features["val"]).score_stages({"layer4": test["layer4"]})


def test_a_graph_version_2_export_is_stale_and_names_the_re_export_command(tmp_path: Path) -> None:
    """A file exported before the stage_pool output (graph version 2, the layer4 score) is refused at load
    with the command that makes a fresh one; `make run` / quickstart's freshness rule re-exports it."""
    from cthub.errors import StaleModelError
    from export.exporter import matches_source
    from export.integrity import check_fresh
    from hub.config import ModelConfig

    cfg, sha = ModelConfig(name="m", num_classes=2), "a" * 64
    meta = {"source_sha256": sha, "graph_version": 2, "preprocessing": cfg.preprocessing.to_dict()}
    path = tmp_path / "clf" / "model.onnx"
    with pytest.raises(StaleModelError, match=r"version 2 .*stage_pool.*run `cthub export .*clf`"):
        check_fresh(meta, path, config=cfg, source_sha256=sha)
    assert not matches_source(meta, cfg, sha) and matches_source(meta | {"graph_version": 3}, cfg, sha)
