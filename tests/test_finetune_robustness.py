"""Robustness table: the perturbations are real, they hurt a trained classifier, the CLI writes its table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ctdata.datasets import load_medmnist
from ctdata.preprocess import PreprocessConfig
from finetune.robustness import SHIFTS, Shift, perturb, robustness_table, shift_by_name

ABDOMEN = PreprocessConfig.for_window("abdomen", input_size=32)  # OrganAMNIST's mapping: 40 / 400 HU


@pytest.fixture(scope="module")
def images(organamnist_npz: Path) -> np.ndarray:
    return load_medmnist(organamnist_npz, "test").images[:300]


@pytest.fixture(scope="module")
def classifier(organamnist_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small scratch classifier that has learned something: 400 images, 5 epochs, no augmentation (about a
    minute on one core; measured test AUC 0.896 on its 500 test images, accuracy 0.486)."""
    from cthub.cli import main

    out = tmp_path_factory.mktemp("robust") / "tiny"
    args = ["finetune", "--data", str(organamnist_npz), "--encoder", "scratch", "--out", str(out)]
    args += ["--image-size", "32", "--epochs", "5", "--head-epochs", "1", "--lr", "1e-3"]
    args += ["--backbone-lr-ratio", "1", "--batch-size", "32", "--max-train", "400", "--max-val", "200"]
    args += ["--max-test", "500", "--seed", "3", "--threads", "1", "--no-augment"]
    assert main(args) == 0
    return out


@pytest.mark.parametrize(
    "neutral",
    [
        Shift("r0", "rotation", 0.0),
        Shift("z1", "zoom", 1.0),
        Shift("o0", "hu_offset", 0.0),
        Shift("s1", "hu_scale", 1.0),
        Shift("d1", "resolution", 1.0),
    ],
)
def test_neutral_severities_are_identities(images: np.ndarray, neutral: Shift) -> None:
    out = perturb(images, neutral, ABDOMEN)
    assert out.dtype == np.uint8 and out.shape == images.shape
    assert np.array_equal(out, images)


def test_hu_offset_moves_grey_by_the_window(images: np.ndarray) -> None:
    up = perturb(images, shift_by_name("hu+50"), ABDOMEN).astype(int)
    down = perturb(images, shift_by_name("hu-50"), ABDOMEN).astype(int)
    g = images.astype(int)
    step = 50 / 400 * 255  # 31.875 grey levels in the 400 HU wide abdominal window
    inside = (g > 0) & (g < 255)
    room_up, room_down = inside & (g + step <= 255), inside & (g - step >= 0)
    assert np.array_equal(up[room_up], g[room_up] + 32) and np.array_equal(down[room_down], g[room_down] - 32)
    assert np.all(up[inside & ~room_up] == 255) and np.all(down[inside & ~room_down] == 0)
    saturated = ~inside  # beyond the window (air, bone): still beyond it after a 50 HU shift
    assert np.array_equal(up[saturated], g[saturated]) and np.array_equal(down[saturated], g[saturated])
    assert 0.6 * step < up.mean() - g.mean() < step  # ~15 % of the pixels are saturated
    # the same 50 HU is a much smaller grey step under the wide interval mapping (-1024..3071 HU)
    wide = perturb(images, shift_by_name("hu+50"), PreprocessConfig(input_size=32)).astype(int)
    assert np.array_equal(wide[room_up], g[room_up] + 3)  # 50 / 4095 * 255 = 3.1


def test_hu_scale_is_about_the_window_centre(images: np.ndarray) -> None:
    g = images.astype(float)
    up = perturb(images, shift_by_name("hu*1.1"), ABDOMEN).astype(float)
    inside = (images > 0) & (images < 255) & (np.abs(1.1 * (g - 127.5)) < 127)
    np.testing.assert_allclose(up[inside], 127.5 + 1.1 * (g[inside] - 127.5), atol=0.5)


def test_geometric_shifts_change_the_image_but_not_its_grey_level(images: np.ndarray) -> None:
    g = images.astype(float)
    for name in ("rot+10", "rot-20", "zoom0.8", "zoom1.2", "res/2", "res/3"):
        out = perturb(images, shift_by_name(name)).astype(float)
        assert np.abs(out - g).mean() > 10, name  # measured 22-40 grey levels on 500 test images
        assert abs(out.mean() - g.mean()) < 5, name  # measured within 4 levels


def test_rotation_turns_counter_clockwise_and_zoom_magnifies() -> None:
    bar = np.zeros((1, 9, 9), np.uint8)
    bar[0, 4, 6:] = 200  # right of the centre
    turned = perturb(bar, Shift("r90", "rotation", 90.0))[0]
    assert turned[:3, 4].tolist() == [200, 200, 200] and turned.sum() == 600  # now above the centre
    dot = np.zeros((1, 32, 32), np.uint8)
    dot[0, 12:20, 12:20] = 255  # an 8-pixel square at the centre
    big = perturb(dot, Shift("z2", "zoom", 2.0))[0]
    assert (big > 127).sum() == 16 * 16


def test_resolution_loses_detail_keeps_the_mean(images: np.ndarray) -> None:
    def detail(x: np.ndarray) -> float:  # mean absolute difference of neighbouring pixels
        f = x.astype(float)
        return float(np.abs(np.diff(f, axis=-1)).mean() + np.abs(np.diff(f, axis=-2)).mean())

    half, third = (perturb(images, shift_by_name(n)) for n in ("res/2", "res/3"))
    assert detail(third) < detail(half) < 0.8 * detail(images)
    for out in (half, third):
        assert abs(out.astype(float).mean() - images.astype(float).mean()) < 1.0


def test_shift_table_is_the_planned_one() -> None:
    kinds = {s.kind for s in SHIFTS}
    assert kinds == {"hu_offset", "hu_scale", "rotation", "zoom", "resolution"}
    assert len({s.name for s in SHIFTS}) == len(SHIFTS) == 14


def test_severe_shifts_hurt_a_trained_classifier(classifier: Path) -> None:
    recorded = json.loads((classifier / "config.json").read_text())["metrics"]
    shifts = [Shift("same", "rotation", 0.0), Shift("hu+100", "hu_offset", 100.0), shift_by_name("res/3")]
    (row,) = robustness_table([classifier], shifts=shifts)
    # its own 500 test images through its own preprocessing: the clean AUC is the one fine-tuning measured
    assert row.n_test == 500 and row.clean["auc"] == pytest.approx(recorded["test_auc"], abs=1e-3)
    assert row.clean["auc"] > 0.8  # measured 0.896: the model has learned the organs
    # an identity perturbation changes nothing; real ones cost AUC (measured: hu+100 -0.21, res/3 -0.10)
    assert row.shifted["same"]["delta_auc"] == 0.0 and row.shifted["same"]["delta_accuracy"] == 0.0
    assert row.shifted["hu+100"]["delta_auc"] < -0.08
    assert row.shifted["res/3"]["delta_auc"] < -0.03


def test_cli_writes_one_row_per_model(
    classifier: Path, tmp_path: Path, organamnist_npz: Path, capsys
) -> None:
    from cthub.cli import main

    twin = tmp_path / "twin"
    shutil.copytree(classifier, twin)
    out = tmp_path / "table"
    args = ["robustness", str(classifier), str(twin), "--data", str(organamnist_npz), "--n-test", "110"]
    assert main([*args, "--out", str(out), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "robustness.json").read_text())
    assert [r["model"] for r in result["rows"]] == ["tiny", "twin"]
    assert [s["name"] for s in result["shifts"]] == [s.name for s in SHIFTS]
    a, b = result["rows"]
    assert a["n_test"] == 110 and a["clean"] == b["clean"] and a["shifted"] == b["shifted"]  # same weights
    assert set(a["shifted"]) == {s.name for s in SHIFTS}
    md = (out / "robustness.md").read_text()
    table = md.split("## Test AUC")[1].split("##")[0]
    rows = [line for line in table.splitlines() if line.startswith("| tiny") or line.startswith("| twin")]
    assert len(rows) == 2 and all(line.count("|") == len(SHIFTS) + 4 for line in rows)
    assert f"{a['clean']['auc']:.3f}" in rows[0] and "## Test AUC" in printed
