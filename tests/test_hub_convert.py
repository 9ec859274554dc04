"""`cthub hub import`: the original checkpoints' layouts, each pinned to the upstream code that writes it.

The layouts are built here with real ResNet50 weights, key for key as the upstream code names them (sources
cited at each builder), and a Lightning checkpoint is also written by pytorch_lightning's own
`Trainer.save_checkpoint` from LightningModules with the Bolts modules' attribute names.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from ctdata.preprocess import prepare_batch
from cthub.cli import main
from cthub.errors import InputError, IntegrityError
from hub import ResNet50, from_pretrained, hub_dir, manifest
from hub.convert import import_checkpoint


@pytest.fixture(scope="module")
def src() -> ResNet50:
    torch.manual_seed(3)
    m = ResNet50().eval()
    with torch.no_grad():  # non-trivial BN statistics, so a mix-up of buffers would show
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m


def _prefixed(m: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v.clone() for k, v in m.state_dict().items()}


def _lightning_attribute_dict(monkeypatch: pytest.MonkeyPatch) -> type:
    """A class pickled under PL 1.x's `pytorch_lightning.utilities.parsing.AttributeDict`, the type of
    `hyper_parameters` in the Bolts-era checkpoints (PL 2.x writes a plain dict)."""
    names = ["pytorch_lightning", "pytorch_lightning.utilities", "pytorch_lightning.utilities.parsing"]
    mods = [types.ModuleType(n) for n in names]
    for n, mod in zip(names, mods, strict=True):
        monkeypatch.setitem(sys.modules, n, mod)
    cls = type("AttributeDict", (dict,), {"__module__": names[-1]})
    mods[-1].AttributeDict = cls  # type: ignore[attr-defined]
    return cls


def _mlp(prefix: str, dims: tuple[int, ...], bn: bool) -> dict[str, torch.Tensor]:
    """State of nn.Sequential(Linear, [BatchNorm1d], ReLU, Linear) as Bolts' heads name it."""
    i, h, o = dims
    out = {f"{prefix}0.weight": torch.randn(h, i), f"{prefix}0.bias": torch.zeros(h)}
    if bn:
        out |= {
            f"{prefix}1.weight": torch.ones(h),
            f"{prefix}1.bias": torch.zeros(h),
            f"{prefix}1.running_mean": torch.zeros(h),
            f"{prefix}1.running_var": torch.ones(h),
            f"{prefix}1.num_batches_tracked": torch.tensor(7),
        }
    return out | {
        f"{prefix}3.weight" if bn else f"{prefix}2.weight": torch.randn(o, h),
        f"{prefix}3.bias" if bn else f"{prefix}2.bias": torch.zeros(o),
    }


def _bolts_state_dict(method: str, m: ResNet50) -> dict[str, torch.Tensor]:
    """The LightningModule's state_dict, by the attribute names of Lightning Bolts 0.5
    (github.com/Lightning-Universe/lightning-bolts, formerly PyTorchLightning/lightning-bolts):

    - mocov2: pl_bolts/models/self_supervised/moco/moco2_module.py, class Moco_v2: `encoder_q` and
      `encoder_k` are torchvision resnets built with num_classes=emb_dim (128) whose `fc` becomes
      Sequential(Linear(2048, 2048), ReLU(), fc) with use_mlp; buffers `queue` [emb_dim, num_negatives]
      and `queue_ptr`.
    - byol: pl_bolts/models/self_supervised/byol/byol_module.py, class BYOL: `online_network` and
      `target_network` (a deepcopy) are SiameseArm (byol/models.py) with `encoder` (torchvision_ssl_encoder,
      pl_bolts/utils/self_supervised.py: fc replaced by Identity), `projector` and `predictor`, each an MLP
      whose `model` is Sequential(Linear, BatchNorm1d, ReLU, Linear) (hidden 4096, out 256).
    - swav: pl_bolts/models/self_supervised/swav/swav_module.py, class SwAV: `model` is swav_resnet.resnet50
      (swav/swav_resnet.py): the torchvision trunk without fc, plus `projection_head` (Sequential(Linear,
      BatchNorm1d, ReLU, Linear), 2048 -> 2048 -> 128) and `prototypes` (Linear(128, 3000, bias=False)).
    `m` has no head (num_classes=0), like the trunks above. Queue length and head widths are smaller than
    upstream's defaults (65536, 4096, 3000): sizes are not part of the layout and the import drops them.
    """
    if method == "mocov2":
        enc = _prefixed(m, "encoder_q.") | _mlp("encoder_q.fc.", (2048, 2048, 128), bn=False)
        return (
            enc
            | {k.replace("encoder_q.", "encoder_k.", 1): v.clone() for k, v in enc.items()}
            | {"queue": torch.randn(128, 1024), "queue_ptr": torch.zeros(1, dtype=torch.long)}
        )
    if method == "byol":
        arm = (
            _prefixed(m, "encoder.")
            | _mlp("projector.model.", (2048, 512, 256), bn=True)
            | _mlp("predictor.model.", (256, 512, 256), bn=True)
        )
        return {f"online_network.{k}": v for k, v in arm.items()} | {
            f"target_network.{k}": v.clone() for k, v in arm.items()
        }
    return (
        _prefixed(m, "model.")
        | _mlp("model.projection_head.", (2048, 2048, 128), bn=True)
        | {"model.prototypes.weight": torch.randn(300, 128)}
    )


def _lightning_checkpoint(method: str, m: ResNet50, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A PL 1.x `.ckpt` as Bolts' checkpoints were written: the top-level keys of
    pytorch_lightning/trainer/connectors/checkpoint_connector.py, CheckpointConnector.dump_checkpoint
    (github.com/Lightning-AI/lightning, 1.6): epoch, global_step, pytorch-lightning_version, state_dict,
    loops, callbacks, optimizer_states, lr_schedulers, and the module's hparams_name / hyper_parameters."""
    hp = _lightning_attribute_dict(monkeypatch)(base_encoder="resnet50", learning_rate=0.03, batch_size=256)
    checkpoint_cb = (
        "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 0, "
        "'every_n_epochs': 1, 'train_time_interval': None, 'save_on_train_epoch_end': True}"
    )
    return {
        "epoch": 799,
        "global_step": 124_800,
        "pytorch-lightning_version": "1.6.0",
        "state_dict": _bolts_state_dict(method, m),
        "loops": {
            "fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 800, "completed": 799}}}
        },
        "callbacks": {
            checkpoint_cb: {
                "monitor": "val_loss",
                "best_model_score": torch.tensor(4.2),
                "best_model_path": "/ckpt/epoch=799.ckpt",
                "best_k_models": {},
                "kth_value": torch.tensor(float("inf")),
                "last_model_path": "",
            }
        },
        "optimizer_states": [
            {
                "state": {0: {"momentum_buffer": torch.zeros(3)}},
                "param_groups": [{"lr": 0.03, "momentum": 0.9, "params": [0]}],
            }
        ],
        "lr_schedulers": [{"T_max": 800, "last_epoch": 799, "base_lrs": [0.03]}],
        "hparams_name": "kwargs",
        "hyper_parameters": hp,
    }


def _spark_checkpoint(kind: str, m: ResNet50) -> dict[str, Any]:
    """SparK's two files (github.com/keyu-tian/SparK, pretrain/utils/misc.py, written from pretrain/main.py):

    - `*_1kpretrained_timm_style.pth`: save_checkpoint_model_weights_only saves
      `sparse_encoder.sp_cnn.state_dict()`: bare timm ResNet keys, with timm's 1000-class `fc`.
    - the paper authors' copy of that code saves `Epoch_N_Loss_L_resnet50_1kpretrained.pth`:
      {'arch': 'resnet50', 'module': sp_cnn.state_dict(), 'is_pretrain': False}, their sp_cnn without fc.
    - `*_still_pretraining.pth` / `*_withdecoder_1kpretrained_spark_style.pth`:
      save_checkpoint_with_meta_info_and_opt_state saves {'args': str(args), 'input_size', 'arch', 'epoch',
      'performance_desc', 'module': SparK.state_dict(with_config=True), 'optimizer', 'is_pretrain': True};
      pretrain/spark.py's state_dict adds a 'config' dict beside the tensors of `sparse_encoder.sp_cnn`,
      `dense_decoder` (decoder.py: `dec.{i}.up_sample`, `dec.{i}.conv`, `proj`), `densify_norms`,
      `densify_projs`, `mask_tokens` and the buffers `imn_m`, `imn_s`, `norm_black`.
    """
    timm = _prefixed(m, "") | {"fc.weight": torch.randn(1000, 2048), "fc.bias": torch.zeros(1000)}
    if kind == "timm":
        return timm
    if kind == "authors":  # Wolf et al.'s SparK, Pre-Training/Masked_Autoencoder/utils/misc.py,
        # save_checkpoint_for_finetune: sp_cnn is timm's resnet50 with num_classes=0 (no fc)
        return {"arch": "resnet50", "module": _prefixed(m, ""), "is_pretrain": False}
    module = {f"sparse_encoder.sp_cnn.{k}": v for k, v in timm.items()} | {
        "dense_decoder.dec.0.up_sample.weight": torch.randn(16, 16, 4, 4),
        "dense_decoder.dec.0.up_sample.bias": torch.zeros(16),
        "dense_decoder.dec.0.conv.0.weight": torch.randn(16, 16, 3, 3),
        "dense_decoder.proj.weight": torch.randn(3, 16, 1, 1),
        "dense_decoder.proj.bias": torch.zeros(3),
        "densify_norms.0.weight": torch.ones(2048),
        "densify_projs.0.weight": torch.randn(16, 2048, 1, 1),
        "mask_tokens.0": torch.zeros(1, 2048, 1, 1),
        "imn_m": torch.zeros(1, 3, 1, 1),
        "imn_s": torch.ones(1, 3, 1, 1),
        "norm_black": torch.zeros(1, 3, 224, 224),
        "config": {
            "mask_ratio": 0.6,
            "densify_norm_str": "bn",
            "sbn": False,
            "hierarchy": 4,
            "sparse_encoder.input_size": 224,
            "sparse_decoder.width": 768,
            "sparse_decoder.sbn": False,
        },
    }
    return {
        "args": "Args(model='resnet50', input_size=224, mask=0.6, ep=1600)",
        "input_size": 224,
        "arch": "resnet50",
        "epoch": 1600,
        "performance_desc": "[rec]: 0.512",
        "module": module,
        "optimizer": {"state": {}, "param_groups": [{"lr": 2e-4, "params": []}]},
        "is_pretrain": True,
    }


def _torchvision_checkpoint(kind: str, m: ResNet50) -> dict[str, Any]:
    """torchvision's weight files are a bare `resnet50().state_dict()`; its reference training script
    (github.com/pytorch/vision, references/classification/train.py, main) saves {'model', 'optimizer',
    'lr_scheduler', 'epoch', 'args'} with `args` an argparse.Namespace."""
    if kind == "weights":
        return _prefixed(m, "")
    return {
        "model": _prefixed(m, ""),
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.5, "params": []}]},
        "lr_scheduler": {"last_epoch": 89, "base_lrs": [0.5]},
        "epoch": 89,
        "args": argparse.Namespace(model="resnet50", lr=0.5, epochs=90),
    }


def _checkpoint(layout: str, m: ResNet50, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    method, _, kind = layout.partition("-")
    if method in ("mocov2", "byol", "swav"):
        return _lightning_checkpoint(method, m, monkeypatch)
    if method == "spark":
        return _spark_checkpoint(kind, m)
    return _torchvision_checkpoint(kind, m)


CASES = [
    ("mocov2", "mocov2"),
    ("byol", "byol"),
    ("swav", "swav"),
    ("spark-timm", "spark"),
    ("spark-decoder", "spark"),
    ("spark-authors", "spark"),
    ("torchvision-weights", "torchvision"),
    ("torchvision-reference", "torchvision"),
]


def _assert_imported(name: str, path: Path, expected: dict[str, torch.Tensor], method: str) -> None:
    model = from_pretrained(name)
    for k, v in expected.items():
        assert torch.equal(model.state_dict()[k], v), k
    cfg = model.config
    assert cfg.provenance["source_sha256"] == manifest.sha256_file(path)
    assert manifest.read_manifest(hub_dir())[name]["source"] == "import"
    assert cfg.method == ("supervised" if method == "torchvision" else method)
    assert isinstance(model.fc, torch.nn.Identity)


@pytest.mark.parametrize(("layout", "method"), CASES)
def test_import_each_layout(
    layout: str, method: str, src: ResNet50, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / f"{layout}.ckpt"
    torch.save(_checkpoint(layout, src, monkeypatch), path)
    for mod in [k for k in sys.modules if k.startswith("pytorch_lightning")]:
        monkeypatch.delitem(sys.modules, mod)  # loading must not need Lightning installed
    folder = import_checkpoint(path, method, f"{layout}-test")
    assert folder == hub_dir() / f"{layout}-test"
    _assert_imported(f"{layout}-test", path, src.state_dict(), method)


class _BoltsLike:
    """LightningModules with the attribute structure of the Bolts modules described in `_bolts_state_dict`."""

    @staticmethod
    def build(method: str, hidden: int = 512) -> Any:
        import pytorch_lightning as pl

        def mlp(i: int, h: int, o: int) -> nn.Module:
            head = nn.Module()
            head.model = nn.Sequential(
                nn.Linear(i, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True), nn.Linear(h, o)
            )
            return head

        class Module(pl.LightningModule):
            def __init__(
                self, base_encoder: str = "resnet50", emb_dim: int = 128, learning_rate: float = 0.03
            ) -> None:
                super().__init__()
                self.save_hyperparameters()
                if method == "mocov2":
                    self.encoder_q = ResNet50(num_classes=emb_dim)
                    self.encoder_q.fc = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), self.encoder_q.fc)
                    self.encoder_k = copy.deepcopy(self.encoder_q)
                    self.register_buffer("queue", nn.functional.normalize(torch.randn(emb_dim, 1024), dim=0))
                    self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
                elif method == "byol":
                    arm = nn.Module()
                    arm.encoder = ResNet50(num_classes=0)
                    arm.projector, arm.predictor = mlp(2048, hidden, 256), mlp(256, hidden, 256)
                    self.online_network, self.target_network = arm, copy.deepcopy(arm)
                else:
                    self.model = ResNet50(num_classes=0)
                    self.model.projection_head = mlp(2048, hidden, emb_dim).model
                    self.model.prototypes = nn.Linear(emb_dim, 300, bias=False)

            def encoder(self) -> ResNet50:
                enc = {
                    "mocov2": lambda: self.encoder_q,
                    "byol": lambda: self.online_network.encoder,
                    "swav": lambda: self.model,
                }[method]()
                assert isinstance(enc, ResNet50)
                return enc

            def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
                return self.encoder().forward_features(batch[0]).pow(2).mean()

            def configure_optimizers(self) -> torch.optim.Optimizer:
                return torch.optim.SGD(self.parameters(), lr=self.hparams.learning_rate, momentum=0.9)

        return Module()


@pytest.mark.parametrize("method", ["mocov2", "byol", "swav"])
def test_import_checkpoint_written_by_pytorch_lightning(method: str, tmp_path: Path) -> None:
    """One optimizer step with a real Trainer, then Trainer.save_checkpoint: the file Bolts users have."""
    pl = pytest.importorskip("pytorch_lightning")
    torch.manual_seed(4)
    module = _BoltsLike.build(method)
    images = torch.utils.data.TensorDataset(torch.randn(2, 3, 32, 32))
    trainer = pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, torch.utils.data.DataLoader(images, batch_size=2))
    path = tmp_path / f"{method}.ckpt"
    trainer.save_checkpoint(path)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert {
        "epoch",
        "global_step",
        "pytorch-lightning_version",
        "state_dict",
        "loops",
        "callbacks",
        "optimizer_states",
        "lr_schedulers",
        "hparams_name",
        "hyper_parameters",
    } <= set(raw)
    assert raw["optimizer_states"][0]["state"]  # a real optimizer state, not an empty placeholder
    with torch.device("meta"):
        trunk = set(ResNet50().state_dict())  # heads and projectors are dropped by the import
    expected = {k: v for k, v in module.encoder().state_dict().items() if k in trunk}
    assert len(expected) == len(trunk)
    import_checkpoint(path, method, f"{method}-lightning")
    _assert_imported(f"{method}-lightning", path, expected, method)


def test_imported_registry_name_gets_its_preprocessing_and_same_outputs(
    src: ResNet50, tmp_path: Path, organamnist_npz: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "spark.pth"
    torch.save(_checkpoint("spark-timm", src, monkeypatch), path)
    assert main(["hub", "import", str(path), "--method", "spark", "--name", "spark-lidc"]) == 0
    enc = from_pretrained("spark")
    pp = enc.config.preprocessing
    assert (pp.mapping, pp.mean) == ("minmax", (0.485, 0.456, 0.406))
    assert enc.config.provenance["license"] == "other"
    assert "LIDC-IDRI" in enc.config.pretraining_data and "Wolf" in enc.config.provenance["citation"]
    with np.load(organamnist_npz) as z:
        x = prepare_batch(z["val_images"][:2], pp.replace(input_size=64))
    with torch.no_grad():
        assert torch.allclose(enc(x), src(x), atol=1e-5)
    assert main(["hub", "import", str(path), "--method", "spark", "--name", "spark-lidc"]) == 2  # exists


def test_wrong_layout_and_code_executing_pickles_are_refused(
    src: ResNet50, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "byol.ckpt"
    torch.save(_checkpoint("byol", src, monkeypatch), path)
    with pytest.raises(IntegrityError, match="not a mocov2 checkpoint"):
        import_checkpoint(path, "mocov2", "x")
    sd = _prefixed(src, "")
    del sd["layer3.0.conv1.weight"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(IntegrityError, match="missing"):
        import_checkpoint(tmp_path / "partial.pth", "torchvision", "x")

    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    evil = {"state_dict": _prefixed(src, "encoder_q."), "hyper_parameters": Payload()}
    torch.save(evil, tmp_path / "evil.ckpt")
    with pytest.raises(InputError, match="code execution"):
        import_checkpoint(tmp_path / "evil.ckpt", "mocov2", "x")
    assert not marker.exists() and not (hub_dir() / "x").exists()
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a readable"):
        import_checkpoint(tmp_path / "junk.pth", "spark", "x")
