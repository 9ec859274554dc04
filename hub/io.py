"""save_pretrained / from_pretrained: safetensors + config.json + model card, verified on every load.

Resolution of `from_pretrained(name_or_path)`: an explicit folder path, then the local hub directory
(`hub_dir()/<name>`, aliases resolved by the registry), then the Hugging Face Hub through huggingface_hub's
cache (`revision=` pinning, HF_HUB_OFFLINE, token from the usual places). Weights are safetensors only (never
unpickled), built on the meta device and assigned (no wasted random init), and checked against their sha256.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, overload

import torch
from safetensors.torch import load_file, save_file

from cthub.errors import IntegrityError, ModelNotFoundError
from hub import manifest
from hub.card import write_card
from hub.config import WEIGHTS_NAME, ModelConfig
from hub.features import FeaturesOnly
from hub.manifest import sha256_file
from hub.registry import RegistryEntry, check_name, load_registry
from hub.resnet import ResNet50

HUB_DIR_ENV = "CTHUB_HOME"
DEFAULT_HUB_DIR = Path.home() / ".cache" / "ct-ssl-hub"
log = logging.getLogger(__name__)

__all__ = [
    "from_pretrained",
    "hub_dir",
    "load_dir",
    "local_model_dir",
    "publish_local",
    "record_metrics",
    "save_pretrained",
    "sha256_file",
]


def hub_dir(override: str | Path | None = None) -> Path:
    """The local hub directory: argument, else $CTHUB_HOME, else ~/.cache/ct-ssl-hub."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get(HUB_DIR_ENV)
    return Path(env).expanduser() if env else DEFAULT_HUB_DIR


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu") -> ResNet50:
    """The architecture of `cfg` on `device` ("meta": no memory, no init; to be loaded with assign=True)."""
    if cfg.architecture != "resnet50":
        raise ModelNotFoundError(f"unknown architecture {cfg.architecture!r} (only resnet50 is supported)")
    with torch.device(device):
        return ResNet50(num_classes=cfg.num_classes, in_chans=cfg.preprocessing.in_chans)


def save_pretrained(model: torch.nn.Module, directory: str | Path, config: ModelConfig) -> Path:
    """Write model.safetensors (+ .sha256 sidecar), config.json and README.md into `directory`.

    A folder written directly inside the hub dir (`hub_dir()/<name>`) is also recorded in its manifest.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = out / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "architecture": config.architecture})
    os.replace(tmp, out / WEIGHTS_NAME)
    sha = sha256_file(out / WEIGHTS_NAME)
    manifest.write_sidecar(out / WEIGHTS_NAME, sha)
    config.save(out)
    write_card(config, out)
    hub = hub_dir()
    if out.resolve().parent == hub.resolve():
        manifest.record(hub, out.name, sha, source="save_pretrained", method=config.method)
    return out


def publish_local(
    model: torch.nn.Module,
    name: str,
    config: ModelConfig,
    *,
    source: str = "pretrain",
    hub_dir_override: str | Path | None = None,
) -> Path:
    """Write `model` into `hub_dir()/<name>` and record its sha256 in the hub manifest; returns the folder.

    Afterwards `from_pretrained(name)` finds it and verifies it on every load. `config` is not modified
    (a copy named `name` is written); registry licence/datasets fill in what its provenance lacks.
    """
    check_name(name)
    hub = hub_dir(hub_dir_override)
    cfg = dataclasses.replace(config, name=name, provenance=dict(config.provenance))
    entry = load_registry().get(name)
    if entry is not None:
        if cfg.pretraining_data == "none":
            cfg.pretraining_data = entry.pretraining_data
        cfg.provenance.setdefault("license", entry.license)
        cfg.provenance.setdefault("citation", entry.citation)
        cfg.provenance.setdefault("datasets", list(entry.datasets))
    folder = save_pretrained(model, hub / name, cfg)
    sha = sha256_file(folder / WEIGHTS_NAME)
    manifest.record(hub, name, sha, source=source, method=cfg.method)
    return folder


def local_model_dir(name_or_path: str | Path) -> Path | None:
    """The folder of a model that exists on this machine (an explicit folder, else `hub_dir()/<name>` with
    registry aliases resolved as `from_pretrained` resolves them: "spark" -> spark-lidc), or None when it
    is only reachable remotely or not at all. Nothing is downloaded."""
    name = load_registry().canonical(str(name_or_path))
    for d in (Path(name_or_path).expanduser(), hub_dir() / name):
        if (d / "config.json").is_file() and (d / WEIGHTS_NAME).is_file():
            return d
    return None


def record_metrics(directory: str | Path, updates: dict[str, object]) -> ModelConfig:
    """Merge `updates` into the config.json metrics of a model folder and rewrite its card.

    The weights (and so their sha256 in the sidecar and the manifest) are untouched: a card gains measured
    results without republishing the model.
    """
    d = Path(directory)
    cfg = ModelConfig.load(d)
    cfg.metrics = {**cfg.metrics, **updates}
    cfg.save(d)
    write_card(cfg, d)
    return cfg


def _load_verified(
    d: Path, expected: dict[str, str | None], num_classes: int | None, map_location: str | torch.device
) -> tuple[ResNet50, str]:
    weights = d / WEIGHTS_NAME
    if not weights.is_file():
        raise ModelNotFoundError(f"no {WEIGHTS_NAME} in {d}")
    expected = {**expected, f"the sidecar {weights.name}.sha256": manifest.read_sidecar(weights)}
    cfg = ModelConfig.load(d)
    # The sha256 runs in a thread (hashlib releases the GIL) while the model is built and the tensors read;
    # the model is returned only after the hash matched, so a mismatch still loads nothing.
    with ThreadPoolExecutor(max_workers=1) as pool:
        digest = pool.submit(manifest.sha256_file, weights)
        try:
            state = load_file(str(weights), device=str(map_location))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for corrupt files
            manifest.verify(weights, expected, digest.result())  # a checksum mismatch explains it best
            raise IntegrityError(f"{weights} is not a readable safetensors file ({e})") from None
        model = build_model(cfg, device="meta")
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        sha = manifest.verify(weights, expected, digest.result())
    if missing or unexpected:
        raise IntegrityError(f"{weights}: key mismatch, missing {missing[:5]}, unexpected {unexpected[:5]}")
    if num_classes is not None and num_classes != cfg.num_classes:  # the one deliberate exception: the head
        model.reset_classifier(num_classes)
        model.fc.to(map_location)
        cfg.num_classes, cfg.labels, cfg.threshold = num_classes, [], None
    model.config = cfg
    return model.eval(), sha


def load_dir(
    directory: str | Path,
    *,
    sha256: str | None = None,
    num_classes: int | None = None,
    map_location: str | torch.device = "cpu",
) -> ResNet50:
    """Load a model folder strictly, verified against `sha256` and its sidecar when present.

    `num_classes` replaces the head (0 drops it) for fine-tuning.
    """
    d = Path(directory)
    model, sha = _load_verified(d, {"the caller's sha256": sha256}, num_classes, map_location)
    model.config.provenance["loaded"] = {"from": str(d), "sha256": sha}
    return model


def _looks_like_path(s: str) -> bool:
    """Explicit paths: start with . / ~ or have more than one separator ("org/name" is a Hub repo id)."""
    return s.startswith((".", "/", "~", "\\")) or s.count("/") + s.count("\\") > 1


def _not_found(name: str, entry: RegistryEntry | None, looked: list[str]) -> ModelNotFoundError:
    method = entry.method if entry else "METHOD"
    lines = [f"model {name!r} is not available here. Looked in:"] + [f"  - {w}" for w in looked]
    if entry is not None and entry.is_remote and not entry.is_published:
        lines.append(f"  ({name} is in the registry but not yet published to {entry.repo_id}.)")
    lines.append("Get it one of three ways:")
    if entry is None or entry.is_remote:
        repo = entry.repo_id if entry else "ORG/NAME"
        also = f", else the authors' {entry.original.url}" if entry and entry.original else ""
        lines.append(
            "  1. download it when online: unset HF_HUB_OFFLINE and run "
            f"`cthub hub pull {name}` ({repo}{also})"
        )
    else:
        lines.append(f"  1. download: {name} has no remote copy (local only); use 2 or 3")
    src = entry.extra.get("original_checkpoint") if entry else None
    lines.append(
        f"  2. convert the original checkpoint{f' ({src})' if src else ''}:"
        f" `cthub hub import CHECKPOINT --method {method} --name {name}`"
    )
    cmd = entry.extra.get("produced_by") if entry else None
    if cmd:
        lines.append(f"  3. produce it with this project: `{cmd}`")
    else:
        lines.append(
            f"  3. or pretrain your own encoder: `cthub pretrain --method {method} "
            "--publish NEW-NAME` (name it after your data)"
        )
    return ModelNotFoundError("\n".join(lines))


def _resolve(
    name_or_path: str | Path,
    num_classes: int | None,
    revision: str | None,
    hub: Path,
    cache_dir: str | Path | None,
    token: str | bool | None,
    local_files_only: bool,
) -> ResNet50:
    s = str(name_or_path)
    p = Path(s).expanduser()
    if p.is_dir():
        return load_dir(p, num_classes=num_classes)
    if isinstance(name_or_path, Path) or _looks_like_path(s) or p.is_file():
        raise ModelNotFoundError(f"{p} is not a model folder (expected a directory with {WEIGHTS_NAME})")
    reg = load_registry()
    name = reg.canonical(s)
    entry = reg.get(name)
    records = manifest.read_manifest(hub)
    local = hub / name
    looked = [f"path {p} (not a folder)", f"local hub dir {local}"]
    if local.is_dir() and (revision is None or revision == (entry.revision if entry else None)):
        known = records.get(name, {}).get("sha256")
        model, sha = _load_verified(
            local, {f"the hub manifest {manifest.manifest_path(hub)}": known}, num_classes, "cpu"
        )
        if known is None:
            log.warning("%s had no recorded checksum; recording %s... in %s", local, sha[:12], hub)
            manifest.record(hub, name, sha, source="first-load")
        model.config.provenance["loaded"] = {"from": str(local), "sha256": sha, "name": name}
        return model
    repo_id = entry.repo_id if entry else (s if s.count("/") == 1 else None)
    if repo_id is None:
        if entry is None:
            looked.append(f"registry {reg.path} (no such name; known: {', '.join(reg.names())})")
        raise _not_found(name, entry, looked)
    return load_remote(
        repo_id,
        name=name,
        revision=revision or (entry.revision if entry else None),
        expected_sha256=entry.sha256 if entry else None,
        num_classes=num_classes,
        hub=hub,
        cache_dir=cache_dir,
        token=token,
        local_files_only=local_files_only,
        looked=looked,
    )


def load_remote(
    repo_id: str,
    *,
    name: str | None = None,
    revision: str | None = None,
    expected_sha256: str | None = None,
    num_classes: int | None = None,
    hub: Path | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    looked: list[str] | None = None,
    allow_changed_origin: bool = False,
) -> ResNet50:
    """Fetch `repo_id@revision` through the HF cache, verify and load it (used by from_pretrained and pull).

    Verified against `expected_sha256` (the registry's), else the manifest's record of that commit; a first
    download of an entry without a published checksum is recorded (trust on first use) for later loads.
    When the Hub has nothing, a registry entry's next source, the authors' own checkpoint, is downloaded and
    converted (hub.convert.pull_original).
    """
    from hub.remote import RemoteUnavailable, fetch

    hub = hub if hub is not None else hub_dir()
    name = name or repo_id
    reg = load_registry()
    try:
        got = fetch(repo_id, revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only)
    except RemoteUnavailable as e:
        entry, tried = reg.get(name), [*(looked or []), str(e)]
        if entry is None or entry.original is None or revision not in (None, entry.revision):
            raise _not_found(name, entry, tried) from None
        return _load_original(entry, hub, num_classes, local_files_only, allow_changed_origin, tried)
    key = manifest.remote_key(repo_id, got.commit)
    recorded = manifest.read_manifest(hub).get(key, {}).get("sha256")
    expected = {
        f"the registry {reg.path}": expected_sha256,
        f"the hub manifest {manifest.manifest_path(hub)}": recorded,
    }
    model, sha = _load_verified(got.folder, expected, num_classes, "cpu")
    if expected_sha256 is None and recorded is None:
        manifest.record(hub, key, sha, source="pull", name=name)
    model.config.revision = got.commit
    model.config.provenance["loaded"] = {
        "from": f"hf://{repo_id}@{got.commit}",
        "sha256": sha,
        "name": name,
        "path": str(got.folder),
    }
    return model


def _load_original(
    entry: RegistryEntry,
    hub: Path,
    num_classes: int | None,
    local_files_only: bool,
    allow_changed_origin: bool,
    looked: list[str],
) -> ResNet50:
    """The registry's next source after the Hub: the authors' checkpoint, converted into `hub/<name>`."""
    from hub.convert import pull_original
    from hub.download import DownloadError

    url = entry.original.url if entry.original else ""
    try:
        folder = pull_original(
            entry,
            hub_dir_override=hub,
            allow_changed_origin=allow_changed_origin,
            local_files_only=local_files_only,
        )
    except DownloadError as e:  # the same class, with every place looked in and the ways out
        raise type(e)(str(_not_found(entry.name, entry, [*looked, f"{url}: {e}"]))) from None
    record = manifest.read_manifest(hub).get(entry.name, {})
    model, sha = _load_verified(
        folder, {f"the hub manifest {manifest.manifest_path(hub)}": record.get("sha256")}, num_classes, "cpu"
    )
    model.config.provenance["loaded"] = {
        "from": url,
        "sha256": sha,
        "name": entry.name,
        "path": str(folder),
    }
    return model


@overload
def from_pretrained(
    name_or_path: str | Path,
    *,
    num_classes: int | None = ...,
    features_only: Literal[False] = ...,
    revision: str | None = ...,
    hub_dir_override: str | Path | None = ...,
    cache_dir: str | Path | None = ...,
    token: str | bool | None = ...,
    local_files_only: bool = ...,
) -> ResNet50: ...
@overload
def from_pretrained(
    name_or_path: str | Path,
    *,
    num_classes: int | None = ...,
    features_only: Literal[True],
    revision: str | None = ...,
    hub_dir_override: str | Path | None = ...,
    cache_dir: str | Path | None = ...,
    token: str | bool | None = ...,
    local_files_only: bool = ...,
) -> FeaturesOnly: ...


def from_pretrained(
    name_or_path: str | Path,
    *,
    num_classes: int | None = None,
    features_only: bool = False,
    revision: str | None = None,
    hub_dir_override: str | Path | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> ResNet50 | FeaturesOnly:
    """Load a model by folder path, registry name/alias, or Hugging Face repo id ("org/name").

    `num_classes=K` returns the encoder with a fresh K-class head (0: no head); `features_only=True` returns
    a FeaturesOnly module giving the four stage maps. The model's `.config` carries its preprocessing,
    `.config.revision` the Hub commit it came from.
    """
    model = _resolve(
        name_or_path, num_classes, revision, hub_dir(hub_dir_override), cache_dir, token, local_files_only
    )
    return FeaturesOnly(model) if features_only else model
