"""`cthub hub list | show NAME | pull NAME | push NAME --repo ORG/NAME | import CKPT --method M --name N`.

Handlers print their results on stdout (this is the command line's output); everything else logs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cthub.errors import ConfigError, ModelNotFoundError
from hub import manifest
from hub.registry import RegistryEntry, load_registry

if TYPE_CHECKING:
    from cthub.cli import SubParsers


def _hub(args: argparse.Namespace) -> Path:
    from hub.io import hub_dir

    return hub_dir(getattr(args, "hub_dir", None))


def _cached(entry: RegistryEntry, cache_dir: str | None) -> bool:
    if not entry.is_remote:
        return False
    from huggingface_hub import try_to_load_from_cache

    from hub.config import WEIGHTS_NAME

    hit = try_to_load_from_cache(
        entry.repo_id or "", WEIGHTS_NAME, cache_dir=cache_dir, revision=entry.revision
    )
    return isinstance(hit, str)


def status(entry: RegistryEntry, hub: Path, cache_dir: str | None = None) -> str:
    """local (in the hub dir) | cached (HF cache) | remote | original (not on the Hub: the authors' checkpoint
    is downloaded and converted) | unpublished | not built (local-only, absent)."""
    from hub.config import WEIGHTS_NAME

    if (hub / entry.name / WEIGHTS_NAME).is_file():
        return "local"
    if _cached(entry, cache_dir):
        return "cached"
    if entry.is_remote:
        return "remote" if entry.is_published else ("original" if entry.original else "unpublished")
    return "not built"


def cmd_list(args: argparse.Namespace) -> int:
    from hub.config import WEIGHTS_NAME, ModelConfig

    reg, hub = load_registry(), _hub(args)
    rows: list[dict[str, Any]] = [
        {
            "name": e.name,
            "aliases": list(e.aliases),
            "method": e.method,
            "status": status(e, hub, args.cache_dir),
            "repo_id": e.repo_id,
            "pretraining_data": e.pretraining_data,
        }
        for e in reg.entries.values()
    ]
    extra = (
        sorted(p.name for p in hub.iterdir() if (p / WEIGHTS_NAME).is_file() and p.name not in reg.entries)
        if hub.is_dir()
        else []
    )
    for n in extra:
        cfg = ModelConfig.load(hub / n)
        rows.append(
            {
                "name": n,
                "aliases": [],
                "method": cfg.method,
                "status": "local (unregistered)",
                "repo_id": None,
                "pretraining_data": cfg.pretraining_data,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'NAME':28} {'METHOD':8} {'STATUS':20} {'ALIASES':12} REPO")
    for r in rows:
        aliases = ",".join(r["aliases"]) or "-"
        print(f"{r['name']:28} {r['method']:8} {r['status']:20} {aliases:12} {r['repo_id'] or '-'}")
    print(f"(hub dir: {hub}; registry: {reg.path})", file=sys.stderr)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from hub.config import WEIGHTS_NAME, ModelConfig

    reg, hub = load_registry(), _hub(args)
    name = reg.canonical(args.name)
    entry = reg.get(name)
    folder = hub / name
    if entry is None and not folder.is_dir():
        raise ModelNotFoundError(f"{args.name!r} is neither in the registry ({reg.path}) nor in {hub}")
    info: dict[str, Any] = {
        "registry": entry.to_dict() if entry else None,
        "status": status(entry, hub, args.cache_dir) if entry else "local (unregistered)",
    }
    if folder.is_dir():
        info["local"] = {
            "path": str(folder),
            "manifest": manifest.read_manifest(hub).get(name),
            "sidecar_sha256": manifest.read_sidecar(folder / WEIGHTS_NAME),
            "config": ModelConfig.load(folder).to_dict(),
        }
    print(json.dumps(info, indent=2, default=str))
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from hub.io import load_remote

    reg = load_registry()
    entry = reg.get(args.name)
    if entry is not None and not entry.is_remote:
        raise ModelNotFoundError(
            f"{entry.name} is local only (no remote copy); produce it with "
            f"`{entry.extra.get('produced_by', 'cthub pretrain')}`"
        )
    repo_id = entry.repo_id if entry is not None else args.name
    if repo_id is None or repo_id.count("/") != 1:
        raise ModelNotFoundError(
            f"{args.name!r} is not in the registry ({reg.path}) and is not an ORG/NAME repo id"
        )
    hub = _hub(args)
    model = load_remote(
        repo_id,
        name=entry.name if entry else args.name,
        revision=args.revision or (entry.revision if entry else None),
        expected_sha256=entry.sha256 if entry else None,
        hub=hub,
        cache_dir=args.cache_dir,
        allow_changed_origin=args.allow_changed_origin,
    )
    loaded = model.config.provenance["loaded"]
    print(f"{args.name}: {loaded['from']} -> {loaded['path']}\n  verified sha256 {loaded['sha256']}")
    origin = model.config.provenance.get("origin")
    if origin and entry is not None:
        print(
            f"  converted from the authors' checkpoint (sha256 {origin['sha256']}, recorded in "
            f"{manifest.manifest_path(hub)}); publish it with `cthub hub push {entry.name} --repo ORG/NAME`"
        )
    return 0


def stage_for_push(folder: Path, out: Path) -> Path:
    """Build the exact folder `push` uploads: verified weights, sidecar, config.json and a fresh card."""
    from hub.card import write_card
    from hub.config import CONFIG_NAME, WEIGHTS_NAME, ModelConfig
    from hub.io import load_dir

    load_dir(folder)  # strict load + sidecar check: never upload what would not load
    out.mkdir(parents=True, exist_ok=True)
    for f in (WEIGHTS_NAME, WEIGHTS_NAME + manifest.SIDECAR_SUFFIX, CONFIG_NAME):
        if (folder / f).is_file():
            shutil.copy2(folder / f, out / f)
    if not (out / (WEIGHTS_NAME + manifest.SIDECAR_SUFFIX)).is_file():
        manifest.write_sidecar(out / WEIGHTS_NAME, manifest.sha256_file(out / WEIGHTS_NAME))
    write_card(ModelConfig.load(out), out)
    return out


def cmd_push(args: argparse.Namespace) -> int:
    from hub.config import WEIGHTS_NAME
    from hub.remote import upload

    reg, hub = load_registry(), _hub(args)
    name = reg.canonical(args.name)
    folder = Path(args.name) if Path(args.name).is_dir() else hub / name
    if not (folder / WEIGHTS_NAME).is_file():
        raise ModelNotFoundError(f"nothing to push: {folder} has no {WEIGHTS_NAME}")
    entry = reg.get(name)
    repo = args.repo or (entry.repo_id if entry else None)
    if not repo or repo.count("/") != 1:
        raise ConfigError("push needs --repo ORG/NAME")
    if args.stage_dir:
        out = stage_for_push(folder, Path(args.stage_dir))
        print(f"staged {out} for {repo} (not uploaded)")
        return 0
    with tempfile.TemporaryDirectory(prefix="cthub-push-") as tmp:
        out = stage_for_push(folder, Path(tmp) / name)
        url = upload(out, repo, private=args.private, revision=args.revision)
    sha = manifest.sha256_file(folder / WEIGHTS_NAME)
    print(f'pushed {folder} to {repo}: {url}\nregistry entry: "repo_id": "{repo}", "sha256": "{sha}"')
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from hub.config import WEIGHTS_NAME, ModelConfig
    from hub.convert import import_checkpoint

    hub = _hub(args)
    if (hub / args.name).exists() and not args.force:
        raise ConfigError(f"{hub / args.name} exists; pass --force to replace it")
    cmd = f"cthub hub import {Path(args.checkpoint).name} --method {args.method} --name {args.name}"
    folder = import_checkpoint(
        args.checkpoint,
        args.method,
        args.name,
        pretraining_data=args.data,
        license=args.license,
        hub_dir_override=getattr(args, "hub_dir", None),
        command=cmd,
    )
    cfg = ModelConfig.load(folder)
    print(
        f"imported {args.checkpoint} as {args.name} -> {folder}\n"
        f"  conversion: {cfg.provenance['conversion']}\n"
        f"  sha256: {manifest.read_sidecar(folder / WEIGHTS_NAME)}"
    )
    return 0


def register(subparsers: SubParsers) -> None:
    hub = subparsers.add_parser("hub", help="list, show, pull, push and import named encoders")
    hub.add_argument(
        "--hub-dir", dest="hub_dir", default=None, help="local hub directory (default $CTHUB_HOME)"
    )
    sub = hub.add_subparsers(dest="hub_command", metavar="ACTION", required=True)
    p = sub.add_parser("list", help="registry names, aliases and where each one is")
    p.add_argument("--json", action="store_true")
    p.add_argument("--cache-dir", default=None, help="Hugging Face cache (default: huggingface_hub's)")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("show", help="registry entry, local checksum and config of one model")
    p.add_argument("name")
    p.add_argument("--cache-dir", default=None)
    p.set_defaults(func=cmd_show)
    p = sub.add_parser(
        "pull",
        help="download a model (its Hugging Face repo, else the authors' checkpoint, converted), verify it",
    )
    p.add_argument("name")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: the registry's pin)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument(
        "--allow-changed-origin",
        action="store_true",
        help="accept an authors' checkpoint whose sha256 differs from the one recorded before",
    )
    p.set_defaults(func=cmd_pull)
    p = sub.add_parser("push", help="upload a local model folder with HfApi.upload_folder")
    p.add_argument("name", help="hub name or model folder")
    p.add_argument("--repo", default=None, help="ORG/NAME (default: the registry's repo_id)")
    p.add_argument("--revision", default=None)
    p.add_argument("--private", action="store_true")
    p.add_argument("--stage-dir", default=None, help="only build the folder that would be uploaded, here")
    p.set_defaults(func=cmd_push)
    p = sub.add_parser("import", help="convert an original checkpoint (MoCoV2/BYOL/SwAV/SparK/torchvision)")
    p.add_argument("checkpoint")
    p.add_argument("--method", required=True, choices=["mocov2", "byol", "swav", "spark", "torchvision"])
    p.add_argument("--name", required=True, help="hub name, e.g. spark-lidc")
    p.add_argument("--data", default=None, help="pretraining data description (default: the registry's)")
    p.add_argument("--license", default=None)
    p.add_argument("--force", action="store_true", help="replace an existing folder of that name")
    p.set_defaults(func=cmd_import)
