"""Local hub: publish, resolve by name/alias/path, verify checksums, strict loading, heads, stage features,
and failing fast when the Hub cannot be reached."""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ctdata.preprocess import PreprocessConfig, prepare_batch
from cthub.errors import ConfigError, IntegrityError, ModelNotFoundError
from hub import (
    FeaturesOnly,
    ModelConfig,
    ResNet50,
    from_pretrained,
    hub_dir,
    load_dir,
    manifest,
    publish_local,
    save_pretrained,
)


@pytest.fixture(scope="module")
def encoder() -> ResNet50:
    torch.manual_seed(0)
    return ResNet50().eval()


def _cfg(**kw: object) -> ModelConfig:
    pp = PreprocessConfig(input_size=32, mean=(0.3,), std=(0.2,))
    return ModelConfig(**{"name": "tmp", "method": "spark", "preprocessing": pp, **kw})  # type: ignore[arg-type]


def test_publish_then_load_by_name_and_alias(encoder: ResNet50) -> None:
    folder = publish_local(encoder, "spark-organamnist-cpu", _cfg(), source="pretrain")
    assert folder == hub_dir() / "spark-organamnist-cpu"
    rec = manifest.read_manifest(hub_dir())["spark-organamnist-cpu"]
    assert (
        rec["sha256"]
        == manifest.sha256_file(folder / "model.safetensors")
        == manifest.read_sidecar(folder / "model.safetensors")
    )
    model = from_pretrained("spark-organamnist-cpu")
    for (k, a), b in zip(encoder.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert model.config.preprocessing.mean == (0.3,)  # the preprocessing travels with the weights
    assert model.config.name == "spark-organamnist-cpu" and model.config.provenance["license"] == "apache-2.0"
    assert model.config.provenance["loaded"]["sha256"] == rec["sha256"]
    assert not any(p.is_meta for p in model.parameters()) and all(p.requires_grad for p in model.parameters())

    publish_local(encoder, "spark-lidc", _cfg(), source="import")  # an alias resolves to the registry name
    assert from_pretrained("SPARK").config.name == "spark-lidc"


def test_tampered_or_truncated_weights_are_refused(encoder: ResNet50) -> None:
    folder = publish_local(encoder, "byol-organamnist-cpu", _cfg(method="byol"))
    w = folder / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-100] ^= 0xFF  # one flipped bit pattern inside a tensor
    w.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="hub manifest"):
        from_pretrained("byol-organamnist-cpu")
    w.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(IntegrityError):
        from_pretrained("byol-organamnist-cpu")
    # replacing both the weights and the sidecar is still caught by the manifest outside the folder
    manifest.write_sidecar(w, manifest.sha256_file(w))
    with pytest.raises(IntegrityError, match="hub manifest"):
        from_pretrained("byol-organamnist-cpu")


def test_explicit_path_verifies_sidecar_and_is_strict(encoder: ResNet50, tmp_path: Path) -> None:
    d = save_pretrained(encoder, tmp_path / "m", _cfg())
    assert load_dir(d).config.provenance["loaded"]["sha256"] == manifest.read_sidecar(d / "model.safetensors")
    assert isinstance(from_pretrained(str(d)), ResNet50)
    manifest.write_sidecar(d / "model.safetensors", "0" * 64)
    with pytest.raises(IntegrityError, match="sidecar"):
        from_pretrained(d)
    # an unexpected key is an error, not silently ignored
    state = load_file(str(d / "model.safetensors"))
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(d / "model.safetensors"))
    (d / "model.safetensors.sha256").unlink()
    with pytest.raises(IntegrityError, match="unexpected"):
        load_dir(d)
    with pytest.raises(ModelNotFoundError, match="not a model folder"):
        from_pretrained(tmp_path / "nope")


def test_fresh_head_and_features_only_on_real_images(encoder: ResNet50, organamnist_npz: Path) -> None:
    clf = ResNet50(num_classes=11)
    clf.load_state_dict(encoder.state_dict(), strict=False)
    publish_local(clf, "organ-clf", _cfg(num_classes=11, labels=[str(i) for i in range(11)]))
    ft = from_pretrained("organ-clf", num_classes=4)  # the deliberately dropped head: replaced, not loaded
    assert ft.fc.out_features == 4 and ft.config.num_classes == 4 and ft.config.labels == []
    enc = from_pretrained("organ-clf", num_classes=0)
    assert isinstance(enc.fc, torch.nn.Identity)
    with np.load(organamnist_npz) as z:
        images = z["test_images"][:2]
    x = prepare_batch(images, enc.config.preprocessing)
    feats = from_pretrained("organ-clf", features_only=True)
    assert isinstance(feats, FeaturesOnly)
    with torch.no_grad():
        maps = feats(x)
        pooled = enc(x)
    assert [m.shape[1] for m in maps] == feats.feature_info.channels() == [256, 512, 1024, 2048]
    assert [32 // m.shape[-1] for m in maps] == feats.feature_info.reduction() == [4, 8, 16, 32]
    assert torch.allclose(maps[-1].mean((2, 3)), pooled, atol=1e-5)
    deep = FeaturesOnly(enc, out_indices=(1, -1))  # timm's out_indices: levels 1 and 3
    assert deep.feature_info.channels() == [512, 2048] and deep.feature_info.module_name() == [
        "layer2",
        "layer4",
    ]
    with torch.no_grad():
        two = deep(x)
    assert len(two) == 2 and torch.equal(two[0], maps[1]) and torch.equal(two[1], maps[3])


def test_resnet_follows_timms_intermediates_head_and_feature_info_contract(organamnist_npz: Path) -> None:
    """`forward_intermediates` -> (last map, maps) or maps only, chosen by `indices`; `forward_head` with
    `pre_logits`; `feature_info` with channels()/reduction() describing what the maps really are."""
    torch.manual_seed(0)
    model = ResNet50(num_classes=3).eval()
    with np.load(organamnist_npz) as z:
        x = prepare_batch(z["test_images"][:2], PreprocessConfig(input_size=64))
    info = model.feature_info
    with torch.no_grad():
        last, maps = model.forward_intermediates(x)
        assert torch.equal(last, model.forward_features(x)) and len(maps) == len(info) == 4
        assert [m.shape[1] for m in maps] == info.channels() == [256, 512, 1024, 2048]
        assert [64 // m.shape[-1] for m in maps] == info.reduction() == [4, 8, 16, 32]
        assert (
            info.channels(3) == 2048 and info.reduction([0, 2]) == [4, 16] and info[1]["module"] == "layer2"
        )
        _, last_two = model.forward_intermediates(x, 2)  # an int: the last n levels
        assert [m.shape[1] for m in last_two] == [1024, 2048] and torch.equal(last_two[0], maps[2])
        early, (second,) = model.forward_intermediates(x, [1], stop_early=True)
        assert torch.equal(early, maps[1]) and torch.equal(second, maps[1])  # stopped after level 1
        only = model.forward_intermediates(x, [0, -1], intermediates_only=True)
        assert isinstance(only, list) and torch.equal(only[0], maps[0]) and torch.equal(only[1], maps[3])
        pooled = model.forward_head(last, pre_logits=True)
        assert pooled.shape == (2, 2048) and torch.allclose(pooled, last.mean((2, 3)), atol=1e-6)
        assert torch.allclose(model.forward_head(last), model.fc(pooled)) and torch.equal(
            model(x), model.forward_head(last)
        )
    for bad in (0, 5, [4], [-5], []):
        with pytest.raises(ConfigError, match="indices"):
            model.forward_intermediates(x, bad)


def test_unknown_config_keys_at_any_level_are_ignored_with_a_warning(
    encoder: ResNet50, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One forward-compatibility rule for the whole config.json: keys a newer version wrote, at the top or
    in `preprocessing`, are ignored with a warning (and named in provenance), never an error."""
    folder = save_pretrained(encoder, tmp_path / "enc", _cfg())
    path = folder / "config.json"
    written = json.loads(path.read_text())
    written["future_top_key"] = {"a": 1}
    written["preprocessing"]["future_pp_key"] = "bilateral"
    path.write_text(json.dumps(written))
    with caplog.at_level("WARNING", logger="cthub.compat"):
        model = load_dir(folder)
    assert model.config.preprocessing == _cfg().preprocessing  # the known keys, unchanged
    assert model.config.provenance["unknown_config_keys"] == ["future_top_key", "preprocessing.future_pp_key"]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "future_top_key" in warned and "future_pp_key" in warned
    caplog.clear()
    with caplog.at_level("WARNING", logger="cthub.compat"):  # the same rule when read on its own
        pp = PreprocessConfig.from_dict({**_cfg().preprocessing.to_dict(), "future_pp_key": 1})
    assert pp == _cfg().preprocessing and "future_pp_key" in caplog.text


def test_offline_unpublished_name_gives_one_clear_error() -> None:
    with pytest.raises(ModelNotFoundError) as e:
        from_pretrained("swav")
    msg = str(e.value)
    assert "swav-lidc" in msg and str(hub_dir() / "swav-lidc") in msg and "HF_HUB_OFFLINE" in msg
    assert "cthub hub pull swav-lidc" in msg and "cthub hub import" in msg and "--method swav" in msg
    assert "cthub pretrain" in msg and "not yet published" in msg


def test_local_only_entry_and_unknown_name() -> None:
    with pytest.raises(ModelNotFoundError, match="no remote copy") as e:
        from_pretrained("mocov2-organamnist-cpu")
    assert "cthub pretrain --method mocov2 --publish mocov2-organamnist-cpu" in str(e.value)
    with pytest.raises(ModelNotFoundError, match=r"known: .*spark-lidc"):
        from_pretrained("no-such-model")


_WATCHED_PORTS: dict[int, list[float]] = {}


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "socket.connect" and _WATCHED_PORTS:
        address = args[1]
        if isinstance(address, tuple) and len(address) >= 2 and address[1] in _WATCHED_PORTS:
            _WATCHED_PORTS[address[1]].append(time.monotonic())


@contextlib.contextmanager
def _connect_attempts(port: int) -> Iterator[list[float]]:
    """Every `socket.connect` to `port` made in this process, seen through CPython's audit events (a refused
    connection leaves no trace on a server). The hook is installed once: audit hooks cannot be removed."""
    if not getattr(_audit, "installed", False):
        sys.addaudithook(_audit)
        _audit.installed = True  # type: ignore[attr-defined]
    _WATCHED_PORTS[port] = attempts = []
    try:
        yield attempts
    finally:
        del _WATCHED_PORTS[port]


def _online_endpoint(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    template = url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


def test_unreachable_hub_fails_fast_without_retries(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Online mode, but the endpoint is a closed local port: every connection is refused (no outside network).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _online_endpoint(monkeypatch, f"http://127.0.0.1:{port}")
    with _connect_attempts(port) as attempts:
        t0 = time.monotonic()
        with pytest.raises(ModelNotFoundError, match="did not answer"):
            from_pretrained("byol-lidc", cache_dir=tmp_path)
        elapsed = time.monotonic() - t0
    # One refused reachability probe, then the cache alone. huggingface_hub on its own makes 8 attempts over
    # ~24 s here (its HEAD, then backed-off retries; measured with this hook), so both bounds are behaviour.
    assert len(attempts) == 1
    assert elapsed < 5.0


def test_hub_that_drops_connections_fails_fast_with_a_typed_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The endpoint accepts TCP connections and closes them without answering (a broken proxy or server).
    accepted: list[float] = []
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with contextlib.suppress(OSError):  # the listening socket is closed at the end of the test
            while True:
                conn, _ = server.accept()
                accepted.append(time.monotonic())
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    _online_endpoint(monkeypatch, f"http://127.0.0.1:{server.getsockname()[1]}")
    t0 = time.monotonic()
    try:
        with pytest.raises(ModelNotFoundError, match=r"did not answer the request for ct-ssl-hub/byol-lidc/"):
            from_pretrained("byol-lidc", cache_dir=tmp_path)
    finally:
        server.close()
    # the probe, then the one HEAD for config.json (its HTTP client re-sends once on a dropped connection);
    # no further file is tried and nothing is retried with backoff
    assert 2 <= len(accepted) <= 3
    assert time.monotonic() - t0 < 5.0


def test_save_into_hub_dir_records_manifest_and_first_load_records(encoder: ResNet50) -> None:
    save_pretrained(encoder, hub_dir() / "swav-organamnist-cpu", _cfg(method="swav"))
    assert manifest.read_manifest(hub_dir())["swav-organamnist-cpu"]["source"] == "save_pretrained"
    # a folder copied in by hand (no manifest record): trust on first load, then verified
    d = hub_dir() / "hand-copied"
    save_pretrained(encoder, d.parent / "elsewhere", _cfg())
    (d.parent / "elsewhere").rename(d)
    from_pretrained("hand-copied")
    assert manifest.read_manifest(hub_dir())["hand-copied"]["source"] == "first-load"
    assert json.loads((d / "config.json").read_text())["method"] == "spark"


def test_weights_digest_names_the_tensors_not_the_file(
    encoder: ResNet50, tmp_path: Path, with_metadata_reversed: Callable[[Path, Path], None]
) -> None:
    """The same weights saved by two processes can differ in the file's bytes (metadata order) but not in
    `weights_digest`; a changed weight changes the digest; the other process's file checksum is recognised."""
    a = save_pretrained(encoder, tmp_path / "a", _cfg()) / "model.safetensors"
    b = tmp_path / "b.safetensors"
    with_metadata_reversed(a, b)
    assert manifest.sha256_file(a) != manifest.sha256_file(b)
    state_a, state_b = load_file(str(a)), load_file(str(b))
    assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert manifest.weights_digest(a) == manifest.weights_digest(b)
    assert manifest.sha256_file(b) in manifest.sha256_any_metadata_order(a)
    assert manifest.sha256_file(a) in manifest.sha256_any_metadata_order(b)

    key = "conv1.weight"
    changed = dict(state_a)
    changed[key] = state_a[key].clone()
    changed[key].view(-1)[0] += 1e-3
    c = tmp_path / "c.safetensors"
    save_file(changed, str(c), metadata={"format": "pt"})
    assert manifest.weights_digest(c) != manifest.weights_digest(a)
    assert manifest.sha256_file(c) not in manifest.sha256_any_metadata_order(a)
