"""Pretraining math against hand computations on fixed tensors: InfoNCE, Sinkhorn, swapped prediction,
BYOL loss and EMA, SparK's masked loss and sparse layers, the optimizers and augmentations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ctdata.preprocess import PreprocessConfig
from hub.resnet import ResNet50
from pretrain.augment import ViewSpec, augment, make_view
from pretrain.base import ema_update
from pretrain.byol import cosine_tau, regression_loss
from pretrain.mocov2 import MoCoV2, info_nce
from pretrain.optim import LARS, lr_at
from pretrain.spark import SparK, masked_patch_loss, patchify, random_mask
from pretrain.swav import sinkhorn, swapped_prediction_loss


def test_info_nce_matches_hand_computation() -> None:
    q = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=1)
    k = F.normalize(torch.tensor([[0.8, 0.6], [0.0, 1.0]]), dim=1)
    queue = F.normalize(torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, 1.0]]), dim=0)  # [dim, K]
    t = 0.2
    expected = 0.0
    for i in range(2):
        pos = float(q[i] @ k[i]) / t
        negs = [float(q[i] @ queue[:, j]) / t for j in range(3)]
        expected += -(pos - math.log(sum(math.exp(v) for v in [pos, *negs])))
    assert info_nce(q, k, queue, t).item() == pytest.approx(expected / 2, rel=1e-5)


def test_moco_queue_takes_keys_and_wraps() -> None:
    m = MoCoV2(ResNet50(), queue_size=5, dim=4)
    keys = F.normalize(torch.randn(3, 4), dim=1)
    m._enqueue(keys)
    assert int(m.queue_ptr) == 3 and torch.equal(m.queue[:, :3], keys.T)
    m._enqueue(keys)  # 3 more into a queue of 5: positions 3, 4, 0
    assert int(m.queue_ptr) == 1
    assert torch.equal(m.queue[:, 3:5], keys[:2].T) and torch.equal(m.queue[:, 0], keys[2])


def _sinkhorn_numpy(scores: np.ndarray, eps: float, iters: int) -> np.ndarray:
    q = np.exp(scores / eps).T
    k, b = q.shape
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(axis=1, keepdims=True) * k
        q /= q.sum(axis=0, keepdims=True) * b
    return (q * b).T


def test_sinkhorn_marginals_and_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    scores = F.normalize(torch.randn(12, 8, generator=g), dim=1) * 0.5
    q = sinkhorn(scores, epsilon=0.05, iterations=3)
    np.testing.assert_allclose(
        q.numpy(), _sinkhorn_numpy(scores.double().numpy(), 0.05, 3), rtol=1e-4, atol=1e-6
    )
    assert torch.allclose(q.sum(1), torch.ones(12), atol=1e-5)  # every code is a distribution
    many = sinkhorn(scores, epsilon=0.05, iterations=200)  # converged: equipartition over prototypes
    assert torch.allclose(many.sum(0), torch.full((8,), 12 / 8), rtol=1e-3)
    assert float((q.sum(0) - 1.5).abs().max()) < float((F.softmax(scores / 0.05, 1).sum(0) - 1.5).abs().max())


def test_swapped_prediction_matches_hand_computation() -> None:
    g = torch.Generator().manual_seed(1)
    scores = [torch.randn(4, 5, generator=g) for _ in range(3)]
    codes = {0: F.softmax(torch.randn(4, 5, generator=g), 1), 1: F.softmax(torch.randn(4, 5, generator=g), 1)}
    t = 0.1
    total = 0.0
    for i, q in codes.items():
        sub = 0.0
        for v in range(3):
            if v != i:
                logp = scores[v] / t - torch.logsumexp(scores[v] / t, 1, keepdim=True)
                sub += float(-(q * logp).sum(1).mean())
        total += sub / 2
    assert swapped_prediction_loss(scores, codes, t).item() == pytest.approx(total / 2, rel=1e-5)


def test_byol_loss_range_and_tau_schedule() -> None:
    z = torch.randn(6, 16)
    assert regression_loss(z, z).item() == pytest.approx(0.0, abs=1e-6)
    assert regression_loss(z, -z).item() == pytest.approx(4.0, abs=1e-5)
    r = regression_loss(torch.randn(64, 16), torch.randn(64, 16)).item()
    assert 0.0 < r < 4.0
    assert cosine_tau(0, 100) == pytest.approx(0.996)
    assert cosine_tau(50, 100) == pytest.approx(0.998)
    assert cosine_tau(100, 100) == pytest.approx(1.0)


def test_ema_update_is_exact() -> None:
    online, target = nn.Linear(3, 2), nn.Linear(3, 2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    ema_update(target, online, 0.9)
    for k, v in target.state_dict().items():  # float32 rounding only
        expected = before[k].double() * 0.9 + online.state_dict()[k].double() * 0.1
        torch.testing.assert_close(v.double(), expected, rtol=0, atol=1e-7)
    now = {k: v.clone() for k, v in target.state_dict().items()}
    ema_update(target, online, 1.0)  # tau = 1 (end of BYOL's schedule): the target stops moving
    assert all(torch.equal(v, now[k]) for k, v in target.state_dict().items())
    ema_update(target, online, 0.0)  # tau = 0: a copy of the online network
    assert all(torch.equal(v, online.state_dict()[k]) for k, v in target.state_dict().items())


def test_spark_loss_ignores_visible_patches() -> None:
    g = torch.Generator().manual_seed(2)
    target = torch.randn(2, 1, 64, 64, generator=g)
    rec = torch.randn(2, 1, 64, 64, generator=g)
    active = torch.tensor([[[[True, False], [False, True]]], [[[False, False], [True, True]]]])
    loss = masked_patch_loss(rec, target, active, 32)
    tp, rp = patchify(target, 32), patchify(rec, 32)
    tn = (tp - tp.mean(-1, keepdim=True)) / (tp.var(-1, keepdim=True) + 1e-6) ** 0.5
    masked = [(0, 1), (0, 2), (1, 0), (1, 1)]
    hand = sum(float(((rp[b, i] - tn[b, i]) ** 2).mean()) for b, i in masked) / len(masked)
    assert loss.item() == pytest.approx(hand, rel=1e-5)
    rec2 = rec.clone()
    rec2[0, :, :32, :32] += 5.0  # a visible patch: no effect
    assert masked_patch_loss(rec2, target, active, 32).item() == pytest.approx(loss.item(), rel=1e-6)
    rec2[0, :, :32, 32:] += 5.0  # a masked patch: changes the loss
    assert masked_patch_loss(rec2, target, active, 32).item() != pytest.approx(loss.item(), rel=1e-3)


def test_random_mask_keeps_exact_count() -> None:
    m = random_mask(5, 4, 4, 0.6, torch.device("cpu"))
    assert m.shape == (5, 1, 4, 4) and m.dtype == torch.bool
    assert (m.view(5, -1).sum(1) == round(16 * 0.4)).all()


def test_sparse_encoder_zeroes_masked_positions_and_normalizes_visible_only() -> None:
    torch.manual_seed(0)
    model = SparK(ResNet50(in_chans=1), decoder_width=64).train()
    x = torch.randn(3, 1, 64, 64)
    active = random_mask(3, 2, 2, 0.6, x.device)
    model.ctx.active = active
    feats = model.encoder.forward_intermediates(x * model.ctx.at((64, 64)), intermediates_only=True)
    for f in feats:
        hidden = ~model.ctx.at(f.shape[-2:]).expand_as(f)
        assert f[hidden].abs().max().item() == 0.0
        assert f[~hidden].abs().sum().item() > 0
    bn = model.densify_norms[0]  # BN statistics come from visible positions only
    y = bn(feats[-1])
    vis = feats[-1].permute(0, 2, 3, 1)[active[:, 0]]  # [N_visible, C]
    ref = F.batch_norm(vis, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    np.testing.assert_allclose(
        y.permute(0, 2, 3, 1)[active[:, 0]].detach().numpy(), ref.detach().numpy(), rtol=1e-3, atol=1e-4
    )
    model.ctx.active = None
    loss = model([x])
    assert math.isfinite(loss.item()) and model.ctx.active is None


def test_spark_encoder_is_a_plain_resnet50() -> None:
    from pretrain.trainer import plain_encoder

    torch.manual_seed(0)
    model = SparK(ResNet50(), decoder_width=64).eval()
    plain = plain_encoder(model)
    assert type(plain) is ResNet50 and all(
        type(m) in (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d) or not isinstance(m, (nn.Conv2d, nn.BatchNorm2d))
        for m in plain.modules()
    )
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(plain(x), model.encoder(x), atol=1e-5)  # no mask: the sparse layers are dense


def test_lars_trust_ratio_and_schedule() -> None:
    p = nn.Parameter(torch.tensor([3.0, 4.0]))
    p.grad = torch.tensor([0.6, 0.8])
    opt = LARS([{"params": [p], "lars": True, "weight_decay": 0.0}], lr=1.0, momentum=0.0, eta=0.001)
    opt.step()
    trust = 0.001 * 5.0 / 1.0
    assert torch.allclose(p.detach(), torch.tensor([3.0 - trust * 0.6, 4.0 - trust * 0.8]))
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1) and lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0) and lr_at(100, 100, 10, 1.0, 0.01) == pytest.approx(
        0.01
    )


def test_augmentations_are_seeded_bounded_and_flip_only_when_asked() -> None:
    x = torch.rand(4, 1, 40, 40)
    spec = ViewSpec(32, p_blur=1.0)
    a = augment(x, spec, torch.Generator().manual_seed(3))
    b = augment(x, spec, torch.Generator().manual_seed(3))
    assert a.shape == (4, 1, 32, 32) and torch.equal(a, b) and a.min() >= 0.0 and a.max() <= 1.0
    ramp = torch.linspace(0, 1, 32).expand(2, 1, 32, 32).contiguous()  # dark left, bright right
    plain = ViewSpec(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), p_intensity=0.0, p_blur=0.0)
    out = augment(ramp, plain, torch.Generator().manual_seed(0))
    assert (out[..., -1] > out[..., 0]).all()  # no flip by default
    flip = ViewSpec(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), p_intensity=0.0, p_blur=0.0, p_hflip=1.0)
    assert (augment(ramp, flip, torch.Generator().manual_seed(0))[..., -1] < out[..., -1]).all()
    v = make_view(x, spec, PreprocessConfig(input_size=64, in_chans=3), torch.Generator().manual_seed(3))
    assert v.shape == (4, 3, 32, 32)
