"""`cthub hub import`: the original checkpoints' key layouts, built here with real ResNet50 weights."""

from __future__ import annotations

import argparse
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

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


def _prefixed(m: ResNet50, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v.clone() for k, v in m.state_dict().items()}


def _lightning_attribute_dict(monkeypatch: pytest.MonkeyPatch) -> type:
    """A class pickled under Lightning's AttributeDict name, as in real Bolts checkpoints' hyper_parameters."""
    names = ["pytorch_lightning", "pytorch_lightning.utilities", "pytorch_lightning.utilities.parsing"]
    mods = [types.ModuleType(n) for n in names]
    for n, mod in zip(names, mods):
        monkeypatch.setitem(sys.modules, n, mod)
    cls = type("AttributeDict", (dict,), {"__module__": names[-1]})
    mods[-1].AttributeDict = cls  # type: ignore[attr-defined]
    return cls


def _head(out: int, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}fc.0.weight": torch.randn(2048, 2048), f"{prefix}fc.0.bias": torch.zeros(2048),
            f"{prefix}fc.2.weight": torch.randn(out, 2048), f"{prefix}fc.2.bias": torch.zeros(out)}


def _checkpoint(method: str, m: ResNet50, monkeypatch: pytest.MonkeyPatch) -> dict:
    if method in ("mocov2", "byol", "swav"):  # PyTorch Lightning Bolts .ckpt
        hp = _lightning_attribute_dict(monkeypatch)(learning_rate=0.03, batch_size=256)
        if method == "mocov2":
            sd = {**_prefixed(m, "encoder_q."), **_head(128, "encoder_q."), **_prefixed(m, "encoder_k."),
                  "queue": torch.randn(128, 64), "queue_ptr": torch.zeros(1, dtype=torch.long)}
        elif method == "byol":
            sd = {**_prefixed(m, "online_network.encoder."), **_prefixed(m, "target_network.encoder."),
                  "online_network.projector.model.0.weight": torch.randn(64, 2048),
                  "online_network.predictor.model.0.weight": torch.randn(64, 256)}
        else:
            sd = {**_prefixed(m, "model."), "model.projection_head.0.weight": torch.randn(2048, 2048),
                  "model.prototypes.weight": torch.randn(30, 128)}
        return {"epoch": 899, "global_step": 1, "pytorch-lightning_version": "1.6.0", "state_dict": sd,
                "hyper_parameters": hp, "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1}]}]}
    if method == "spark-timm":  # SparK's *_timm_style.pth: bare timm keys incl. an unused 1000-class fc
        return {**_prefixed(m, ""), "fc.weight": torch.randn(1000, 2048), "fc.bias": torch.zeros(1000)}
    if method == "spark-decoder":  # SparK's with-decoder checkpoint
        sd = {**_prefixed(m, "sparse_encoder.sp_cnn."), "dense_decoder.dec.0.up_sample.weight": torch.randn(4, 4),
              "densify_norms.0.weight": torch.ones(4), "mask_tokens.0": torch.zeros(1, 2048, 1, 1),
              "imn_m": torch.zeros(1, 3, 1, 1), "imn_s": torch.ones(1, 3, 1, 1)}
        return {"arch": "resnet50", "epoch": 1600, "module": sd, "args": argparse.Namespace(mask=0.6),
                "is_pretrain": True}
    return _prefixed(m, "")  # torchvision.models.resnet50().state_dict()


CASES = [("mocov2", "mocov2"), ("byol", "byol"), ("swav", "swav"), ("spark-timm", "spark"),
         ("spark-decoder", "spark"), ("torchvision", "torchvision")]


@pytest.mark.parametrize(("layout", "method"), CASES)
def test_import_each_layout(layout: str, method: str, src: ResNet50, tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / f"{layout}.ckpt"
    torch.save(_checkpoint(layout, src, monkeypatch), path)
    for mod in [k for k in sys.modules if k.startswith("pytorch_lightning")]:
        monkeypatch.delitem(sys.modules, mod)  # loading must not need Lightning installed
    name = f"{layout}-test"
    folder = import_checkpoint(path, method, name)
    model = from_pretrained(name)
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    cfg = model.config
    assert cfg.provenance["source_sha256"] == manifest.sha256_file(path)
    assert manifest.read_manifest(hub_dir())[name]["source"] == "import"
    assert cfg.method == ("supervised" if method == "torchvision" else method)
    assert folder == hub_dir() / name and isinstance(model.fc, torch.nn.Identity)


def test_imported_registry_name_gets_its_preprocessing_and_same_outputs(
        src: ResNet50, tmp_path: Path, organamnist_npz: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "spark.pth"
    torch.save(_checkpoint("spark-timm", src, monkeypatch), path)
    assert main(["hub", "import", str(path), "--method", "spark", "--name", "spark-lidc"]) == 0
    enc = from_pretrained("spark")
    pp = enc.config.preprocessing
    assert (pp.mapping, pp.mean, enc.config.provenance["license"]) == ("minmax", (0.485, 0.456, 0.406), "other")
    assert "LIDC-IDRI" in enc.config.pretraining_data and "Wolf" in enc.config.provenance["citation"]
    with np.load(organamnist_npz) as z:
        x = prepare_batch(z["val_images"][:2], pp.replace(input_size=64))
    with torch.no_grad():
        assert torch.allclose(enc(x), src(x), atol=1e-5)
    assert main(["hub", "import", str(path), "--method", "spark", "--name", "spark-lidc"]) == 2  # exists


def test_wrong_layout_and_code_executing_pickles_are_refused(src: ResNet50, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
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

    torch.save({"state_dict": _prefixed(src, "encoder_q."), "hyper_parameters": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(InputError, match="code execution"):
        import_checkpoint(tmp_path / "evil.ckpt", "mocov2", "x")
    assert not marker.exists() and not (hub_dir() / "x").exists()
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a readable"):
        import_checkpoint(tmp_path / "junk.pth", "spark", "x")
