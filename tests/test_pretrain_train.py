"""The training loop on real OrganAMNIST slices: loss goes down, exact resume, CLI + publish, recipes."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ctdata.datasets import load_medmnist
from cthub.cli import main as cthub_main
from cthub.errors import ConfigError
from pretrain.config import METHODS, config_for


@pytest.fixture(scope="module")
def organ_images(organamnist_npz: Path) -> np.ndarray:
    return load_medmnist(organamnist_npz, "train").images[:256]


def _cpuinfo_flags() -> set[str]:
    """The CPU flags as the kernel lists them (Linux, as on every machine this suite runs on)."""
    line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
    return set(line.partition(":")[2].split())


def test_hardware_names_the_kernel_settings_that_change_results(monkeypatch) -> None:
    """A result is reproducible where the same kernels run: `hardware()` records the flags that pick them and
    the environment overrides (oneDNN's ISA cap, MKL's code path) only when they are set."""
    from cthub.runtime import KERNEL_FLAGS, hardware

    for k in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY"):
        monkeypatch.delenv(k, raising=False)
    hw = hardware()
    assert "kernel_env" not in hw
    assert hw["flags"] == [f for f in KERNEL_FLAGS if f in _cpuinfo_flags()]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert hardware()["kernel_env"] == {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}


def _cfg(method: str, out: Path, **kw):
    base = {
        "out": str(out),
        "image_size": 32,
        "batch_size": 8,
        "steps": 3,
        "log_every": 1,
        "ckpt_every": 100,
        "amp": False,
        "tensorboard": False,
        "threads": 1,
    }  # 1 thread: the 2 cores are shared
    base.update(kw)
    return config_for(method, None, **base)


# MoCo is not here: its loss first rises while the queue of random vectors fills with real keys.
@pytest.mark.parametrize(
    "method,kw",
    [
        (
            "spark",
            {
                "image_size": 64,
                "steps": 16,
                "base_lr": 0.05,
                "warmup_steps": 1,
                "method_kwargs": {"decoder_width": 32},
            },
        ),
        ("byol", {"steps": 16, "base_lr": 8.0, "warmup_steps": 1, "method_kwargs": {"hidden": 256}}),
    ],
)
def test_loss_goes_down_on_real_ct_slices(
    method: str, kw: dict, organ_images: np.ndarray, tmp_path: Path
) -> None:
    from pretrain.trainer import train

    fixed = organ_images[:8]  # one fixed batch of real slices, labels unused
    res = train(_cfg(method, tmp_path / "learns", **kw), images=fixed)
    # the control: the same run (same seed: same views and masks) with learning broken (lr 0) must fail the
    # check, so that it tells learning from the noise of random views
    broken = train(_cfg(method, tmp_path / "broken", **{**kw, "base_lr": 0.0}), images=fixed)

    def went_down(losses: list[float]) -> bool:
        return bool(np.mean(losses[-4:]) < np.mean(losses[:4]) * 0.96)

    assert np.isfinite(res.losses).all() and np.isfinite(broken.losses).all()
    assert went_down(res.losses), f"{method}: loss {res.losses[:4]} -> {res.losses[-4:]}"
    assert not went_down(broken.losses), f"{method} without learning: {broken.losses}"
    assert np.mean(res.losses[-4:]) < np.mean(broken.losses[-4:]) * 0.96  # step for step, on the same views


def test_swav_step_freezes_and_normalizes_prototypes(organ_images: np.ndarray, tmp_path: Path) -> None:
    from pretrain.trainer import train

    cfg = _cfg(
        "swav",
        tmp_path,
        steps=2,
        batch_size=4,
        accum_steps=2,  # 2 micro-batches per optimizer step
        method_kwargs={
            "n_prototypes": 20,
            "freeze_prototypes_steps": 1,
            "queue_length": 16,
            "queue_start_step": 0,
        },
    )
    res = train(cfg, images=organ_images[:32])
    m = res.method
    assert np.isfinite(res.losses).all() and len(res.losses) == 2 and res.steps == 2
    assert m.queue[0].abs().sum(1).gt(0).all()  # 4 micro-batches x 4 embeddings filled the 16 slots
    with torch.no_grad():
        m.prototypes.weight.mul_(3.0)
        m([torch.randn(4, 3, 32, 32)] * 2 + [torch.randn(4, 3, 16, 16)] * 4)
    assert torch.allclose(m.prototypes.weight.norm(dim=1), torch.ones(20), atol=1e-5)  # normalized before use


def test_prototypes_frozen_in_first_steps() -> None:
    from hub.resnet import ResNet50
    from pretrain.swav import SwAV

    m = SwAV(ResNet50(), n_prototypes=10, freeze_prototypes_steps=2)
    m.prototypes.weight.grad = torch.ones_like(m.prototypes.weight)
    m.before_optimizer_step(1)
    assert m.prototypes.weight.grad is None
    m.prototypes.weight.grad = torch.ones_like(m.prototypes.weight)
    m.before_optimizer_step(2)
    assert m.prototypes.weight.grad is not None


RESUME_KW = {
    "mocov2": {"queue_size": 48},
    "swav": {
        "n_prototypes": 16,
        "n_small": 2,
        "queue_length": 16,
        "queue_start_step": 1,
        "freeze_prototypes_steps": 1,
    },
    "byol": {"hidden": 64},
    "spark": {"decoder_width": 32},
}


@pytest.mark.parametrize("method", list(RESUME_KW))
def test_exact_resume(method: str, organ_images: np.ndarray, tmp_path: Path) -> None:
    """Interrupted at step 2 and resumed: the same losses and the same state (weights, EMA targets, queues,
    BN statistics, optimizer moments) as an uninterrupted run, with views prefetched on a helper thread."""
    from pretrain.trainer import train

    imgs = organ_images[:64]
    size = 64 if method == "spark" else 32

    def cfg(sub: str):
        return _cfg(
            method,
            tmp_path / sub,
            steps=4,
            image_size=size,
            warmup_steps=0,
            method_kwargs=RESUME_KW[method],
            prefetch=True,
        )

    full = train(cfg("a"), images=imgs)
    train(cfg("b"), images=imgs, stop_at=2)
    resumed = train(cfg("b"), images=imgs, resume=True)
    assert resumed.steps == 4 and full.losses[2:] == pytest.approx(resumed.losses, rel=1e-5)
    a, b = full.method.state_dict(), resumed.method.state_dict()
    for k in a:
        torch.testing.assert_close(
            a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{method}: {k} differs after resume"
        )
    with open(tmp_path / "b" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]


def test_recipes_parse_for_every_method() -> None:
    for recipe in ("cpu-organamnist", "cpu-organamnist-from-spark", "lidc-paper"):
        for m in METHODS:
            cfg = config_for(m, recipe)
            assert cfg.method == m and cfg.optimizer in ("sgd", "lars", "lamb", "adamw")
    paper = config_for("mocov2", "lidc-paper")
    assert paper.image_size == 224 and paper.epochs == 900 and paper.method_kwargs["queue_size"] == 65536
    assert config_for("spark", "lidc-paper").optimizer == "lamb"
    assert config_for("spark", "cpu-organamnist", steps=5).epochs is None


def test_a_recipe_extends_another_key_by_key(tmp_path: Path) -> None:
    base, child = config_for("swav", "cpu-organamnist"), config_for("swav", "cpu-organamnist-from-spark")
    # the settings the measured SwAV-from-SparK run had: only the start and the rate differ from the base
    assert (child.init, child.base_lr, base.init, base.base_lr) == ("spark-organamnist-cpu", 1.0, None, 4.0)
    for key in ("final_lr", "steps", "method_kwargs", "optimizer"):
        assert getattr(child, key) == getattr(base, key), key
    assert child.image_size == base.image_size == 64 and child.threads == 1  # `common` kept from the base
    moco = config_for("mocov2", "cpu-organamnist-from-spark")
    assert (moco.steps, moco.optimizer, moco.init) == (600, "sgd", "spark-organamnist-cpu")
    assert config_for("spark", "cpu-organamnist-from-spark") == config_for("spark", "cpu-organamnist")
    loop = tmp_path / "loop.yaml"
    loop.write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        config_for("byol", str(loop))


def test_cli_trains_saves_and_publishes(organamnist_npz: Path, tmp_path: Path, capsys) -> None:
    from hub import from_pretrained

    out = tmp_path / "run"
    argv = ["pretrain", "--method", "byol", "--data", str(organamnist_npz), "--steps", "2"]
    argv += ["--image-size", "32", "--batch-size", "4", "--max-images", "64", "--out", str(out)]
    argv += ["--amp", "off"]
    argv += ["--publish", "byol-organamnist-test", "--probe-max-train", "33", "--threads", "1"]
    argv += ["--monitor-size", "200"]
    rc = cthub_main(argv)
    assert rc == 0
    assert (out / "checkpoint.pt").is_file() and (out / "metrics.csv").is_file()
    enc = from_pretrained("byol-organamnist-test")
    cfg = enc.config
    assert cfg.method == "byol" and cfg.num_classes == 0 and cfg.preprocessing.input_size == 32
    assert "OrganAMNIST" in cfg.pretraining_data and cfg.provenance["steps"] == 2
    assert "final_loss" in cfg.provenance and "wall_time_s" in cfg.provenance
    assert cfg.provenance["precision"] == "cpu fp32"  # --amp off: the card says what the arithmetic was
    ff = cfg.metrics["frozen_features"]  # finetune.evaluate_encoder on the labeled OrganAMNIST splits
    for who in ("encoder", "random_init"):
        for bn in ("stored", "recalibrated"):
            r = ff[who][bn]
            assert r["linear_probe"]["n_train"] == ff[who]["n_train"] == 33
            assert {"accuracy", "auc", "f1"} <= set(r["knn"]) and r["collapse_std"] >= 0
    # the reference row is real: random features (identity BN) beat always answering the majority class
    rnd = ff["random_init"]["stored"]
    assert rnd["knn"]["accuracy"] > ff["random_init"]["majority_accuracy"] + 0.1
    assert cfg.metrics["weight_change_from_init"]["total"] > 0  # the two steps moved the encoder
    assert cfg.metrics["knn_monitor_last"]["step"] == 2  # the monitor ran on the npz's val split at the end
    card = (Path(str(__import__("hub").hub_dir())) / "byol-organamnist-test" / "README.md").read_text()
    assert "final_loss" in card and "OrganAMNIST" in card
    # where the weights were computed (the same command gives the same weights only on the same kernels):
    # this machine's CPU, its kernel-deciding flags as /proc/cpuinfo lists them, and torch
    hw, cpu_flags = cfg.provenance["hardware"], _cpuinfo_flags()
    assert hw["cores"] == os.cpu_count() and hw["torch"] == torch.__version__ and hw["flags"]
    assert set(hw["flags"]) <= cpu_flags and ("avx512_bf16" in hw["flags"]) == ("avx512_bf16" in cpu_flags)
    flags = " ".join(hw["flags"])
    assert f"- hardware: `{hw['cpu']}` ({hw['arch']}, {hw['cores']} cores; flags {flags}" in card
    assert "- precision: `cpu fp32`" in card
    # the frozen-feature figures as a table a reader can scan, the same numbers as the config's
    probe = ff["random_init"]["recalibrated"]["linear_probe"]["test"]
    row = next(line for line in card.splitlines() if line.startswith("| random init | recalibrated |"))
    assert f"| {probe['accuracy']:.3f} | {probe['auc']:.3f} |" in row
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert enc(x).shape == (2, 2048)

    # published again from the finished run (same weights): the hub copy and what its card gained since stay
    from hub.io import hub_dir, record_metrics

    folder = hub_dir() / "byol-organamnist-test"
    record_metrics(folder, {"finetune_study": {"organamnist.npz:split": {"test": {}}}})
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert cthub_main([*argv, "--resume"]) == 0
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert "finetune_study" in from_pretrained("byol-organamnist-test").config.metrics
    # one step more is another encoder: published anew, with a card of its own measurements only
    steps = argv.index("--steps") + 1
    assert cthub_main([*argv[:steps], "3", *argv[steps + 1 :], "--resume"]) == 0
    again = from_pretrained("byol-organamnist-test").config
    assert again.provenance["steps"] == 3 and "finetune_study" not in again.metrics

    rc = cthub_main(
        [
            "pretrain",
            "--method",
            "byol",
            "--data",
            str(organamnist_npz),
            "--steps",
            "1",
            "--publish",
            "byol-lidc",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert rc == 2 and "LIDC" in capsys.readouterr().err
    # the report in the repo outlives run folders: rows of runs not on this machine are kept and marked
    docs = tmp_path / "docs"
    docs.mkdir()
    gone = {"run": "mocov2-cpu", "method": "mocov2", "image_size": 64, "optimizer": "sgd", "base_lr": 0.12}
    gone |= {"steps": 400, "planned_steps": 1400, "minutes": 30.0}
    (docs / "pretrain-runs.json").write_text(json.dumps([gone, {"run": "run", "method": "stale"}]))
    rc = cthub_main(["pretrain-report", str(out), str(tmp_path / "missing"), "--out", str(docs)])
    rows = json.loads((docs / "pretrain-runs.json").read_text())
    assert rc == 0 and [r["run"] for r in rows] == ["mocov2-cpu", "run"]
    assert rows[0]["from_earlier_report"] and rows[1]["method"] == "byol" and rows[1]["steps"] == 3
    table = (docs / "pretrain-runs.md").read_text()
    assert "| mocov2-cpu † | mocov2 |" in table and "| run | byol |" in table
