"""Each deviation from the reference implementations that was fixed, pinned; the method table; weight
movement.

References: SparK's official code keeps `mask_token` out of weight decay; MoCo's shuffle BN needs several
processes, and split BN with a shuffled key batch is its single-process substitute (the MoCo authors' CIFAR
demo); SwAV's small crops must keep a spatial map at the last stage, and full-size views set the BN
statistics.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cthub.cli import main as cthub_main
from cthub.errors import ConfigError, ModelNotFoundError
from hub.resnet import ResNet50
from pretrain.config import METHODS, TrainConfig, build_method, config_for
from pretrain.monitor import conv_weights, relative_change
from pretrain.norms import SplitBatchNorm2d, frozen_running_stats, split_batchnorm


def test_method_table_and_unknown_names() -> None:
    assert list(METHODS) == ["mocov2", "swav", "byol", "spark"]
    for name, cls in METHODS.items():
        assert cls.name == name
    with pytest.raises(ConfigError, match="unknown method"):
        config_for("simclr")
    cfg = TrainConfig(method="spark", steps=1)
    cfg.method = "simclr"  # bypassing validation must not fall through to some default method
    with pytest.raises(ConfigError, match="unknown method"):
        build_method(cfg)


def test_spark_refuses_a_mask_that_hides_nothing(organamnist_npz: Path, tmp_path: Path, capsys) -> None:
    """At 32 px SparK's patch grid is 1x1: the one patch stays visible, the loss is 0 at every step and the
    run learns nothing. That is a configuration error, said before any work; 64 px (2x2) trains."""
    argv = ["pretrain", "--method", "spark", "--data", str(organamnist_npz), "--steps", "1"]
    argv += ["--batch-size", "2", "--max-images", "8", "--monitor-data", "none"]
    argv += ["--out", str(tmp_path / "run")]
    assert cthub_main([*argv, "--image-size", "32"]) == 2  # one clear line, no traceback, no run
    assert re.search(r"1x1 patch grid.*64 px or more", capsys.readouterr().err)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    kw = {"decoder_width": 32, "mask_ratio": 0.1}
    with pytest.raises(ConfigError, match="2x2 patch grid"):  # 10% of 4 patches rounds to none hidden
        build_method(config_for("spark", None, steps=1, method_kwargs=kw)).view_specs(64, hflip=False)
    assert len(build_method(config_for("spark", None, steps=1)).view_specs(64, hflip=False)) == 1


def test_spark_mask_tokens_get_no_weight_decay_and_no_trust_ratio() -> None:
    m = build_method(config_for("spark", None, steps=1, method_kwargs={"decoder_width": 32}))
    decay, no_decay = m.param_groups(0.04)
    tokens = {id(t) for t in m.mask_tokens}
    assert not tokens & {id(p) for p in decay["params"]}
    assert tokens <= {id(p) for p in no_decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and no_decay["lars"] is False
    all_params = {id(p) for p in m.parameters() if p.requires_grad}
    assert all_params == {id(p) for g in (decay, no_decay) for p in g["params"]}  # nothing lost or doubled
    assert len(decay["params"]) + len(no_decay["params"]) == len(all_params)


def test_split_batchnorm_normalizes_each_split_with_its_own_statistics() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    split = split_batchnorm(nn.Sequential(bn), 4)[0]
    assert isinstance(split, SplitBatchNorm2d) and split.weight is bn.weight
    x = torch.randn(16, 3, 5, 5) * 3 + 1
    y = split.train()(x)
    for i in range(4):
        chunk = x[i * 4 : (i + 1) * 4]
        ref = F.batch_norm(chunk, None, None, training=True, eps=split.eps)
        torch.testing.assert_close(y[i * 4 : (i + 1) * 4], ref, rtol=1e-4, atol=1e-5)
    # the stored statistics are the average over splits, so eval mode is an ordinary BN
    means = torch.stack([x[i * 4 : (i + 1) * 4].mean((0, 2, 3)) for i in range(4)]).mean(0)
    torch.testing.assert_close(split.running_mean, 0.1 * means, rtol=1e-4, atol=1e-5)
    assert isinstance(split.eval()(x), torch.Tensor)


def test_moco_single_process_uses_split_bn_and_shuffles_keys() -> None:
    from pretrain.mocov2 import _shuffle, _unshuffle

    m = build_method(config_for("mocov2", None, steps=1, method_kwargs={"queue_size": 64}))
    splits = [mod.splits for mod in m.encoder.modules() if isinstance(mod, SplitBatchNorm2d)]
    assert splits and set(splits) == {4}
    assert all(
        isinstance(mod, SplitBatchNorm2d) for mod in m.encoder_k.modules() if isinstance(mod, nn.BatchNorm2d)
    )
    x = torch.arange(16.0).view(16, 1)
    torch.manual_seed(1)
    shuffled, undo = _shuffle(x)
    assert not torch.equal(shuffled, x) and torch.equal(_unshuffle(shuffled, undo), x)
    m.prepare_distributed(sync=True)  # several processes: shuffle BN takes over, splits off
    assert {mod.splits for mod in m.modules() if isinstance(mod, SplitBatchNorm2d)} == {1}
    # the published encoder is a plain ResNet50 (same keys)
    ResNet50(num_classes=0).load_state_dict(m.encoder.state_dict(), strict=True)


def test_swav_small_crops_keep_a_spatial_map_and_leave_bn_statistics_to_large_views() -> None:
    from pretrain.swav import small_crop_size

    assert small_crop_size(224) == 96
    small = small_crop_size(64)
    enc = ResNet50().eval()
    assert enc.forward_features(torch.zeros(1, 3, small, small)).shape[-1] >= 2  # was 27 px -> 1x1
    m = build_method(
        config_for("swav", None, steps=1, method_kwargs={"n_prototypes": 8, "n_large": 2, "n_small": 2})
    )
    specs = m.view_specs(64, False)
    assert [s.size for s in specs] == [64, 64, small, small]
    torch.manual_seed(0)
    large = [torch.randn(4, 3, 64, 64) for _ in range(2)]
    smalls = [torch.randn(4, 3, small, small) * 5 + 3 for _ in range(2)]  # very different statistics
    ref = build_method(
        config_for("swav", None, steps=1, method_kwargs={"n_prototypes": 8, "n_large": 2, "n_small": 0})
    )
    ref.load_state_dict(m.state_dict())
    m.train()(large + smalls)
    ref.train()(large)
    torch.testing.assert_close(m.encoder.bn1.running_mean, ref.encoder.bn1.running_mean)
    torch.testing.assert_close(m.encoder.layer4[-1].bn3.running_var, ref.encoder.layer4[-1].bn3.running_var)


def test_frozen_running_stats_restores_momentum() -> None:
    bn = nn.BatchNorm2d(2, momentum=0.3)
    before = bn.running_mean.clone()
    with frozen_running_stats(nn.Sequential(bn)):
        bn.train()(torch.randn(4, 2, 3, 3) + 5)
    assert torch.equal(bn.running_mean, before) and bn.momentum == 0.3


def test_relative_change_measures_weight_movement() -> None:
    enc = ResNet50()
    w0 = conv_weights(enc)
    assert relative_change(w0, enc)["total"] == 0.0
    with torch.no_grad():
        enc.layer4[0].conv1.weight.mul_(1.5)
    ch = relative_change(w0, enc)
    assert ch["layer1"] == 0.0 and ch["layer4"] > 0.0 and 0.0 < ch["total"] < ch["layer4"]
    with torch.no_grad():
        for v in enc.state_dict().values():
            if v.ndim == 4:
                v.mul_(1.1)
    assert relative_change(w0, enc)["conv1"] == pytest.approx(0.1, rel=1e-4)


def test_lars_and_lamb_bound_the_relative_step_by_the_learning_rate() -> None:
    """Why the CPU recipe raises the lr: with trust ratios one step moves a layer by about lr x its norm,
    however large the gradient (measured, not assumed)."""
    from pretrain.optim import build_optimizer

    for name in ("lamb", "lars"):
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(64, 64, 3, 3) * 0.05)
        w0 = w.detach().clone()
        opt = build_optimizer(
            name, [{"params": [w], "weight_decay": 0.0, "lars": True}], lr=1e-3, weight_decay=0.0
        )
        w.grad = torch.randn_like(w) * 100.0
        opt.step()
        rel = float((w.detach() - w0).norm() / w0.norm())
        bound = 1e-3 if name == "lamb" else 1e-3 * 1e-3  # LARS: lr x eta (0.001) x ||w||
        assert rel == pytest.approx(bound, rel=0.05), f"{name}: {rel}"


def test_cpu_recipe_moves_the_weights_measurably(organamnist_npz, tmp_path) -> None:
    """Three steps of the CPU recipe's SparK settings move the encoder's convolutions by more than the
    paper's per-step rate would in those steps (the published CPU runs report their total change)."""
    from ctdata.datasets import load_medmnist
    from pretrain.trainer import train

    imgs = load_medmnist(organamnist_npz, "train").images[:64]
    cfg = config_for(
        "spark",
        "cpu-organamnist",
        steps=3,
        batch_size=16,
        warmup_steps=0,
        threads=1,
        out=str(tmp_path),
        tensorboard=False,
        monitor_data=None,
        monitor_every=0,
        method_kwargs={"decoder_width": 32},
    )
    res = train(cfg, images=imgs)
    per_step_paper = 2e-4 * 16 / 256  # LAMB at the paper's lr: relative change per step
    assert res.weight_change["total"] > 3 * per_step_paper * 3
    assert np.isfinite(res.losses).all()


def test_init_continues_from_a_hub_encoder_and_records_the_parent(organamnist_npz, tmp_path) -> None:
    """Hierarchical pretraining: `init` starts from a published encoder (weights equal at step 0, change
    measured from the parent), the parent's identity travels into the checkpoint and the card."""
    from ctdata.datasets import load_medmnist
    from hub import from_pretrained, hub_dir, publish_local
    from hub.config import ModelConfig
    from hub.manifest import weights_digest
    from pretrain.publishing import publish
    from pretrain.trainer import train

    torch.manual_seed(3)
    parent = ResNet50(num_classes=0)
    with torch.no_grad():
        parent.conv1.weight.mul_(2.0)  # distinguishable from any fresh init
    publish_local(
        parent, "parent-enc", ModelConfig(name="parent-enc", method="byol", num_classes=0), source="test"
    )
    imgs = load_medmnist(organamnist_npz, "train").images[:32]
    cfg = config_for(
        "byol",
        None,
        out=str(tmp_path / "run"),
        image_size=32,
        batch_size=8,
        steps=2,
        amp=False,
        tensorboard=False,
        threads=1,
        init="parent-enc",
        warmup_steps=0,
        base_lr=1.0,
        method_kwargs={"hidden": 64},
    )
    cut = train(cfg, images=imgs, stop_at=1)
    assert cut.parent is not None and cut.parent["name"] == "parent-enc" and cut.parent["method"] == "byol"
    assert cut.parent["digest"] == weights_digest(hub_dir() / "parent-enc" / "model.safetensors")
    assert 0 < cut.weight_change["total"] < 0.5  # measured from the parent, not from a random init
    res = train(cfg, images=imgs, resume=True)  # the parent survives a resume
    assert res.parent == cut.parent and res.steps == 2
    folder = publish(res, cfg, "child-enc", data_desc="OrganAMNIST test slices", command="test")
    child = from_pretrained(folder)
    assert child.config.provenance["parent"]["name"] == "parent-enc"
    card = (folder / "README.md").read_text()
    assert f"continued from: `parent-enc`, BYOL (weights digest `{cut.parent['digest']}`" in card
    with pytest.raises(ModelNotFoundError, match="not-a-model"):
        train(
            config_for(
                "byol",
                None,
                out=str(tmp_path / "bad"),
                image_size=32,
                batch_size=8,
                steps=1,
                init="not-a-model",
                method_kwargs={"hidden": 64},
            ),
            images=imgs,
        )
