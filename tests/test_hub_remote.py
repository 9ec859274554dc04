"""Hugging Face Hub side, without network: the real huggingface_hub cache code on a cache laid out on disk.

The Hub itself cannot exist here (no network), so downloads are represented by files placed in huggingface_hub's
cache layout (models--ORG--NAME/refs + snapshots/<commit>), which huggingface_hub resolves itself under
HF_HUB_OFFLINE=1. Only the upload test replaces HfApi (a mock of the unreachable Hub, said where it is done).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cthub.cli import main
from cthub.errors import IntegrityError
from hub import ModelConfig, ResNet50, from_pretrained, hub_dir, manifest, publish_local, save_pretrained

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)
    cfg = ModelConfig(name="spark-lidc", method="spark", metrics={"test_auc": 0.9},
                      provenance={"license": "other", "datasets": ["LIDC-IDRI"], "data": "organamnist test"})
    return save_pretrained(ResNet50(), tmp_path_factory.mktemp("src") / "spark-lidc", cfg)


def _cache(root: Path, repo: str, src: Path, commit: str, ref: str | None = "main") -> Path:
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in ("config.json", "model.safetensors", "README.md"):
        shutil.copy2(src / f, snap / f)
    if ref:
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    return snap


def test_cached_download_loads_records_and_detects_tampering(folder: Path, tmp_path: Path) -> None:
    snap = _cache(tmp_path, "ct-ssl-hub/spark-lidc", folder, COMMIT_A)
    model = from_pretrained("spark", cache_dir=tmp_path)
    assert model.config.revision == COMMIT_A  # the commit is recorded in the loaded model's config
    sha = manifest.sha256_file(snap / "model.safetensors")
    assert manifest.read_manifest(hub_dir())[f"hf:ct-ssl-hub/spark-lidc@{COMMIT_A}"]["sha256"] == sha
    assert torch.equal(model.conv1.weight, load_file(str(folder / "model.safetensors"))["conv1.weight"])
    w = snap / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-10] + b"\0" * 10)  # corrupted after the first verified load
    with pytest.raises(IntegrityError, match="hub manifest"):
        from_pretrained("spark-lidc", cache_dir=tmp_path)


def test_revision_pinning(folder: Path, tmp_path: Path, encoder_b: Path) -> None:
    _cache(tmp_path, "ct-ssl-hub/spark-lidc", folder, COMMIT_A)
    _cache(tmp_path, "ct-ssl-hub/spark-lidc", encoder_b, COMMIT_B, ref=None)
    a = from_pretrained("spark-lidc", cache_dir=tmp_path)
    b = from_pretrained("spark-lidc", cache_dir=tmp_path, revision=COMMIT_B)
    assert (a.config.revision, b.config.revision) == (COMMIT_A, COMMIT_B)
    assert not torch.equal(a.conv1.weight, b.conv1.weight)


@pytest.fixture
def encoder_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(2)
    return save_pretrained(ResNet50(), tmp_path_factory.mktemp("b") / "m", ModelConfig(name="b", method="spark"))


def test_registry_checksum_is_enforced(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = json.loads((Path(__file__).parents[1] / "hub" / "registry.json").read_text())
    reg["models"]["spark-lidc"]["sha256"] = "f" * 64
    (tmp_path / "reg.json").write_text(json.dumps(reg))
    monkeypatch.setenv("CTHUB_REGISTRY", str(tmp_path / "reg.json"))
    _cache(tmp_path / "c", "ct-ssl-hub/spark-lidc", folder, COMMIT_A)
    with pytest.raises(IntegrityError, match="registry"):
        from_pretrained("spark-lidc", cache_dir=tmp_path / "c")
    reg["models"]["spark-lidc"]["sha256"] = manifest.sha256_file(folder / "model.safetensors")
    (tmp_path / "reg.json").write_text(json.dumps(reg))
    assert from_pretrained("spark-lidc", cache_dir=tmp_path / "c").config.revision == COMMIT_A
    assert f"hf:ct-ssl-hub/spark-lidc@{COMMIT_A}" not in manifest.read_manifest(hub_dir())  # registry suffices


def test_artifacts_load_with_huggingface_hub_alone(folder: Path, tmp_path: Path) -> None:
    from huggingface_hub import ModelCard, hf_hub_download

    _cache(tmp_path, "ct-ssl-hub/spark-lidc", folder, COMMIT_A)
    kw = {"repo_id": "ct-ssl-hub/spark-lidc", "cache_dir": tmp_path, "local_files_only": True}
    state = load_file(hf_hub_download(filename="model.safetensors", **kw))
    config = json.loads(Path(hf_hub_download(filename="config.json", **kw)).read_text())
    card = ModelCard.load(hf_hub_download(filename="README.md", **kw))
    assert config["architecture"] == "resnet50" and config["preprocessing"]["input_size"] == 224
    assert len(state) == len(ResNet50().state_dict())
    assert card.data.library_name == "ct-ssl-hub" and card.data.license == "other"
    assert "spark" in card.data.tags and card.data.datasets == ["LIDC-IDRI"]
    assert card.data.eval_results[0].metric_type == "test_auc" and card.data.eval_results[0].metric_value == 0.9


def test_cli_pull_from_cache_and_list(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _cache(tmp_path, "ct-ssl-hub/byol-lidc", folder, COMMIT_A)
    assert main(["hub", "pull", "byol", "--cache-dir", str(tmp_path)]) == 0
    assert f"hf://ct-ssl-hub/byol-lidc@{COMMIT_A}" in capsys.readouterr().out
    assert main(["hub", "pull", "swav", "--cache-dir", str(tmp_path)]) == 2  # not cached, offline: clear error
    assert "cthub hub import CHECKPOINT --method swav" in capsys.readouterr().err
    assert main(["hub", "list", "--json", "--cache-dir", str(tmp_path)]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["byol-lidc"]["status"] == "cached" and rows["swav-lidc"]["status"] == "unpublished"
    assert rows["spark-organamnist-cpu"]["status"] == "not built" and "spark" in rows["spark-lidc"]["aliases"]


def test_push_stages_exact_folder_and_uploads_it(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    enc = from_pretrained(folder)
    publish_local(enc, "spark-organamnist-cpu", enc.config)
    stage = tmp_path / "stage"
    assert main(["hub", "push", "spark-organamnist-cpu", "--repo", "me/x", "--stage-dir", str(stage)]) == 0
    assert sorted(p.name for p in stage.iterdir()) == [
        "README.md", "config.json", "model.safetensors", "model.safetensors.sha256"]
    assert from_pretrained(stage).config.name == "spark-organamnist-cpu"
    assert main(["hub", "push", "spark-organamnist-cpu", "--repo", "me/x"]) == 2  # offline: refused clearly
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err

    # The Hub cannot be reached here: HfApi is replaced by a recorder (mock of the network component only).
    calls: list[dict] = []

    class FakeApi:
        def __init__(self, token: object = None) -> None: ...
        def create_repo(self, repo_id: str, **kw: object) -> None:
            calls.append({"create": repo_id, **kw})
        def upload_folder(self, **kw: object) -> str:
            calls.append({**kw, "files": sorted(p.name for p in Path(str(kw["folder_path"])).iterdir())})
            return "https://huggingface.co/me/x/commit/1"

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("hub.remote.endpoint_reachable", lambda timeout=3.0: True)
    assert main(["hub", "push", "spark-organamnist-cpu", "--repo", "me/x"]) == 0
    assert calls[0]["create"] == "me/x" and calls[1]["repo_id"] == "me/x"
    assert calls[1]["files"] == sorted(p.name for p in stage.iterdir())
    assert manifest.read_manifest(hub_dir())["spark-organamnist-cpu"]["sha256"] in capsys.readouterr().out
