"""Convert the original published checkpoints into hub folders (`cthub hub import`).

Key layouts (the encoder is a torchvision-style ResNet50 in every case; upstream sources in
tests/test_hub_convert.py, which builds each layout):
- mocov2: PyTorch Lightning Bolts `.ckpt`, `state_dict` keys `encoder_q.*` (its MLP head is `encoder_q.fc.*`)
- byol:   Bolts `.ckpt`, `state_dict` keys `online_network.encoder.*`
- swav:   Bolts `.ckpt`, `state_dict` keys `model.*` (`model.projection_head.*`, `model.prototypes.*` dropped)
- spark:  SparK's `*_timm_style.pth` (bare timm ResNet keys) or the with-decoder file
          (`module` dict with `sparse_encoder.sp_cnn.*` beside the decoder, which is dropped), or the
          paper authors' `*_1kpretrained.pth` ({'arch', 'module': bare timm keys without fc, 'is_pretrain'})
- torchvision: a plain `torchvision.models.resnet50().state_dict()`, or a torchvision reference-script
          checkpoint (`model` dict beside `args`, an argparse.Namespace)
`pull_original` downloads the authors' own checkpoint named by a registry entry (hub/download.py), refuses a
file that differs from the one seen before (registry pin or manifest record) unless told otherwise, and
converts it the same way, recording the sha256 of the original file and of the converted weights.
Files are read with `torch.load(weights_only=True)`: nothing in them is executed. Lightning's hyperparameter
containers (AttributeDict) are read as plain dicts, and argparse.Namespace is allowed; any other object
makes the import fail with a clear error instead of running code.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ctdata.preprocess import PreprocessConfig
from cthub.errors import ConfigError, InputError, IntegrityError, ModelNotFoundError
from hub import manifest
from hub.config import WEIGHTS_NAME, ModelConfig
from hub.manifest import sha256_file
from hub.registry import RegistryEntry, check_name, load_registry
from hub.resnet import ResNet50

CONVERTED_BY = "ct-ssl-hub from the authors' checkpoint"
DOWNLOADS = ".downloads"  # inside the hub dir: partial downloads wait here to be resumed
log = logging.getLogger(__name__)


class OriginChangedError(IntegrityError):
    """The authors' file now differs from the one recorded (registry pin or an earlier pull)."""

    code = "origin_changed"


@dataclass(frozen=True)
class Layout:
    prefixes: tuple[str, ...]  # tried in order; "" = keys are already the encoder's
    drop: tuple[str, ...]  # sub-keys (after the prefix) deliberately not imported: heads, projectors
    method: str


LAYOUTS: dict[str, Layout] = {
    "mocov2": Layout(("encoder_q.",), ("fc.",), "mocov2"),
    "byol": Layout(("online_network.encoder.",), ("fc.",), "byol"),
    "swav": Layout(("model.",), ("fc.", "projection_head.", "prototypes."), "swav"),
    "spark": Layout(("sparse_encoder.sp_cnn.", ""), ("fc.",), "spark"),
    "torchvision": Layout(("",), ("fc.",), "supervised"),
}
CONTAINERS = ("state_dict", "module", "model")  # Lightning, SparK, generic
LIGHTNING_DICTS = (
    "pytorch_lightning.utilities.parsing.AttributeDict",
    "lightning_fabric.utilities.data.AttributeDict",
    "lightning.fabric.utilities.data.AttributeDict",
)


def read_checkpoint(path: str | Path) -> Any:
    """`torch.load(..., weights_only=True)`; Lightning's AttributeDict is read as a plain dict."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"checkpoint {p} does not exist")
    allowed: list[Any] = [argparse.Namespace, *[(dict, name) for name in LIGHTNING_DICTS]]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(p, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(p))
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        first = next((ln for ln in lines if "GLOBAL" in ln or "Can only" in ln), None)
        if first is None:  # not a pickle torch understands at all
            raise InputError(f"{p.name} is not a readable PyTorch checkpoint ({type(e).__name__})") from None
        raise InputError(
            f"{p.name} holds objects that would need code execution to load ({first}); refused. "
            "Re-save only its state_dict (torch.save(ckpt['state_dict'], 'weights.pth')) where you trust "
            "the file."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise InputError(f"{p.name} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None


def _tensors(d: Any) -> dict[str, torch.Tensor]:
    """The tensor entries of a dict (SparK's `module` also holds a `config` dict); {} for anything else."""
    if not isinstance(d, dict):
        return {}
    return {k: v for k, v in d.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def find_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint: unwraps state_dict/module/model containers and DDP's `module.`."""
    for _ in range(3):
        inner = next(
            (obj[k] for k in CONTAINERS if isinstance(obj, dict) and isinstance(obj.get(k), dict)), None
        )
        if inner is None:
            break
        obj = inner
    state = _tensors(obj)
    if not state:
        raise InputError(
            "no tensors found in the checkpoint (expected a state dict, or one under "
            f"{', '.join(repr(c) for c in CONTAINERS)})"
        )
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def convert_state_dict(
    state: dict[str, torch.Tensor], method: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Select and rename the encoder's keys for `method`; strict: anything unexplained is an error."""
    if method not in LAYOUTS:
        raise ConfigError(f"unknown checkpoint method {method!r}; choose one of {', '.join(LAYOUTS)}")
    layout = LAYOUTS[method]
    prefix = next((p for p in layout.prefixes if p == "" or any(k.startswith(p) for k in state)), None)
    if prefix is None:
        raise IntegrityError(
            f"no key starts with {' or '.join(layout.prefixes)}: this is not a {method} "
            f"checkpoint (first keys: {sorted(state)[:4]})"
        )
    picked = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    in_chans = int(picked["conv1.weight"].shape[1]) if "conv1.weight" in picked else 3
    with torch.device("meta"):
        expected = {k: v.shape for k, v in ResNet50(num_classes=0, in_chans=in_chans).state_dict().items()}
    dropped = sorted(k for k in picked if k not in expected and k.startswith(layout.drop))
    unexpected = sorted(k for k in picked if k not in expected and k not in dropped)
    filled = sorted(k for k in expected if k not in picked and k.endswith("num_batches_tracked"))
    missing = sorted(k for k in expected if k not in picked and k not in filled)
    if missing or unexpected:
        raise IntegrityError(
            f"{method} checkpoint (prefix {prefix!r}) does not map onto ResNet50: "
            f"missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)})"
        )
    out: dict[str, torch.Tensor] = {}
    for k, shape in expected.items():
        v = picked[k] if k in picked else torch.tensor(0, dtype=torch.long)
        if v.shape != shape:
            raise IntegrityError(
                f"{k}: shape {tuple(v.shape)} in the checkpoint, ResNet50 needs {tuple(shape)}"
            )
        out[k] = v.float().contiguous() if v.is_floating_point() else v.contiguous()
    report = {
        "prefix": prefix,
        "kept": len(out),
        "dropped": len(dropped),
        "dropped_prefixes": sorted({k.split(".")[0] for k in dropped}),
        "filled_num_batches_tracked": len(filled),
        "ignored_outside_prefix": sum(1 for k in state if not k.startswith(prefix)),
    }
    return out, report


def import_checkpoint(
    path: str | Path,
    method: str,
    name: str,
    *,
    pretraining_data: str | None = None,
    license: str | None = None,
    hub_dir_override: str | Path | None = None,
    command: str | None = None,
    source: str = "import",
    origin: dict[str, Any] | None = None,
) -> Path:
    """Convert an original checkpoint into `hub_dir()/<name>` (recorded in the manifest); returns it.

    `origin` (where the authors publish the file, its sha256) goes into the provenance and the card.
    """
    from hub.io import publish_local  # late: hub.io imports the registry and card machinery

    check_name(name)
    p = Path(path)
    state, report = convert_state_dict(find_state_dict(read_checkpoint(p)), method)
    in_chans = int(state["conv1.weight"].shape[1])
    with torch.device("meta"):
        model = ResNet50(num_classes=0, in_chans=in_chans)
    model.load_state_dict(state, strict=True, assign=True)
    entry = load_registry().get(name)
    pp = dict(entry.preprocessing) if entry else {}
    pp["in_chans"] = in_chans
    if in_chans == 1:
        pp = {k: v for k, v in pp.items() if k not in ("mean", "std")} | {"mean": [0.5], "std": [0.25]}
    prov: dict[str, Any] = {
        "command": command or f"cthub hub import {p.name} --method {method} --name {name}",
        "source_file": p.name,
        "source_sha256": sha256_file(p),
        "conversion": report,
        "license": license or (entry.license if entry else "other"),
    }
    if entry:
        prov.update(datasets=list(entry.datasets), citation=entry.citation)
        if entry.extra.get("preprocessing_note"):
            prov["note"] = entry.extra["preprocessing_note"]
        if entry.extra.get("license_note"):
            prov["license_note"] = entry.extra["license_note"]
    if origin is not None:
        prov.update(origin=origin, converted_by=CONVERTED_BY)
    cfg = ModelConfig(
        name=name,
        method=entry.method if entry else LAYOUTS[method].method,
        pretraining_data=pretraining_data
        or (entry.pretraining_data if entry else "unknown (imported checkpoint)"),
        revision=f"{source}:{prov['source_sha256'][:12]}",
        preprocessing=PreprocessConfig.from_dict(pp),
        provenance=prov,
    )
    return publish_local(model, name, cfg, source=source, hub_dir_override=hub_dir_override)


def _check_origin(entry: RegistryEntry, hub: Path, sha: str, allow_changed: bool) -> str | None:
    """The sha256 this file was expected to have (None: first pull); OriginChangedError when it differs."""
    assert entry.original is not None
    recorded = manifest.read_manifest(hub).get(entry.name, {}).get("origin", {}).get("sha256")
    for where, expected in (("the registry", entry.original.sha256), (manifest.manifest_path(hub), recorded)):
        if expected and expected != sha:
            if allow_changed:
                log.warning(
                    "%s: accepting a changed original (%s... instead of %s...)", entry.name, sha, expected
                )
                continue
            raise OriginChangedError(
                f"the authors' checkpoint of {entry.name} ({entry.original.url}) is not the file recorded in "
                f"{where}: sha256 {sha[:12]}... instead of {expected[:12]}.... Nothing was converted. If the "
                f"authors replaced it on purpose, accept it with `cthub hub pull {entry.name} "
                "--allow-changed-origin`."
            )
    return recorded


def pull_original(
    entry: RegistryEntry,
    *,
    hub_dir_override: str | Path | None = None,
    endpoint: str | None = None,
    allow_changed_origin: bool = False,
    local_files_only: bool = False,
    progress: bool = True,
) -> Path:
    """Download the authors' checkpoint of `entry` and convert it into `hub_dir()/<name>`; returns the folder.

    The download (resumable, hub/download.py) waits in `<hub>/.downloads` and is deleted once converted. The
    manifest records `origin` (URL, sha256 and size of the original file) beside the converted weights' sha256
    and weights digest; a later pull of a different file raises OriginChangedError unless
    `allow_changed_origin`. The same file again over an intact folder converts nothing.
    """
    from hub.download import DownloadError, download, gdrive_url
    from hub.io import hub_dir  # late: hub.io imports this module's callers

    src = entry.original
    if src is None:
        raise ModelNotFoundError(f"{entry.name} names no original checkpoint in the registry")
    if local_files_only:
        raise DownloadError(f"the authors' checkpoint {src.url} is not downloaded: local_files_only=True")
    hub = hub_dir(hub_dir_override)
    url = gdrive_url(src.file_id, endpoint)
    got = download(url, hub / DOWNLOADS / f"{entry.name}-{src.file_id}", progress=progress)
    try:
        recorded = _check_origin(entry, hub, got.sha256, allow_changed_origin)
        folder = hub / entry.name
        weights_sha = manifest.read_manifest(hub).get(entry.name, {}).get("sha256")
        same = recorded == got.sha256 and (folder / WEIGHTS_NAME).is_file()
        if same and sha256_file(folder / WEIGHTS_NAME) == weights_sha:
            log.info("%s: the same original as before; %s is intact", entry.name, folder)
            return folder
        origin = {
            "url": src.url,
            "published_in": src.published_in,
            "sha256": got.sha256,
            "size": got.size,
            "layout": src.layout,
        }
        folder = import_checkpoint(
            got.path,
            src.layout,
            entry.name,
            hub_dir_override=hub,
            command=f"cthub hub pull {entry.name}",
            source="original",
            origin=origin,
        )
        weights = folder / WEIGHTS_NAME
        manifest.update(hub, entry.name, origin=origin, weights_digest=manifest.weights_digest(weights))
        return folder
    finally:
        got.path.unlink(missing_ok=True)
