"""Maps that point at something: a head CT hemorrhage classifier fine-tuned at 128 px on the real head CT set
(../shared/data/head_ct), its served maps (Grad-CAM at stride 16, the exported graph's `cam`) on held-out real
slices peak inside the head, not in the air around it, and are no smooth ramp, which the last stage's 4x4
map blown up to the slice is."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import shared_file

from ctdata.heatmap import heat
from ctdata.labeled import data_preprocessing, load_splits
from export.classifier import CamHead
from finetune.cam import class_activation_map
from finetune.config import FinetuneConfig
from finetune.train import fit, model_inputs

SIZE = 128


def bilinear_r2(m: np.ndarray) -> float:
    """How much of a map a bilinear surface a + b i + c j + d ij explains (1: a smooth ramp, as a 2x2 map
    blown up to the slice is; an all-zero map counts as one: it points at nothing)."""
    h, w = m.shape
    i, j = np.mgrid[:h, :w].astype(np.float64)
    a = np.c_[np.ones(h * w), i.ravel(), j.ravel(), (i * j).ravel()]
    coef, *_ = np.linalg.lstsq(a, m.ravel(), rcond=None)
    total = float(((m - m.mean()) ** 2).sum())
    return 1.0 - float(((m.ravel() - a @ coef) ** 2).sum()) / total if total > 0 else 1.0


@pytest.fixture(scope="module")
def head_ct() -> tuple[torch.nn.Module, np.ndarray, torch.Tensor]:
    """(classifier, held-out slices as grey [N,S,S] in [0,1], their model inputs): random init, 4 epochs at
    128 px on 144 slices (16 for validation, 40 held out), one thread."""
    root = shared_file("head_ct")
    pp = data_preprocessing(root, input_size=SIZE)
    data = load_splits(root, pp, storage_size=SIZE)["all"]
    order = np.random.default_rng(0).permutation(len(data))
    test, val, train = np.sort(order[:40]), np.sort(order[40:56]), np.sort(order[56:])
    cfg = FinetuneConfig(image_size=SIZE, epochs=4, head_epochs=1, patience=0, threads=1, seed=0)
    result = fit("scratch", data.subset(train), data.subset(val), None, cfg, preprocessing=pp)
    held = data.images[test[:12]]
    return result.model.eval(), held.astype(np.float32) / 255.0, model_inputs(held, pp)


@pytest.mark.shared
@pytest.mark.slow
def test_served_maps_point_inside_the_head_and_are_no_ramp(head_ct) -> None:
    model, grey, x = head_ct
    with torch.no_grad():
        logits, _, cam, *_ = CamHead(model)(x)  # + embedding, stage_pool
    assert cam.shape[-2:] == (SIZE // 16, SIZE // 16)
    decided = logits.argmax(1)
    last, _ = class_activation_map(model, x, target=decided)  # the last stage's 4x4 map, upsampled
    inside, ramps, last_ramps = [], [], []
    for k in range(len(x)):
        served = F.interpolate(
            torch.from_numpy(heat(cam[k, decided[k]].numpy()))[None, None], size=(SIZE, SIZE), mode="bilinear"
        )[0, 0].numpy()
        head = grey[k] > 0.1  # brain-windowed PNGs: air is black
        inside.append(bool(served.max() > 0 and head[np.unravel_index(served.argmax(), served.shape)]))
        ramps.append(bilinear_r2(served))
        last_ramps.append(bilinear_r2(last[k].numpy()))
    # these PNGs are tight crops (the head fills ~80% of them at 128 px), so a peak inside the head is the
    # floor a map must clear, not evidence of skill: the ramp checks tell the served maps from blown-up ones
    assert np.mean(inside) >= 0.75, inside
    assert float(np.median(ramps)) < 0.5, ramps
    assert float(np.median(last_ramps)) > float(np.median(ramps)) + 0.1, (last_ramps, ramps)


def test_bilinear_r2_tells_a_ramp_from_a_peak() -> None:
    ramp = F.interpolate(torch.tensor([[[[0.0, 1.0], [0.5, 0.2]]]]), size=(64, 64), mode="bilinear")[0, 0]
    peak = np.zeros((64, 64))
    peak[20:26, 30:36] = 1.0
    assert (
        bilinear_r2(ramp.numpy()) > 0.9 and bilinear_r2(peak) < 0.1 and bilinear_r2(np.zeros((8, 8))) == 1.0
    )
