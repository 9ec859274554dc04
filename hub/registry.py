"""The registry of named encoders, read from one data file (`hub/registry.json`).

`$CTHUB_REGISTRY` may point to another registry file (a private mirror, or tests); it replaces the packaged
one.

Each entry names where its weights come from, tried in this order (`RegistryEntry.sources`): its Hugging Face
repo (`repo_id`, converted hub format), then `original`, the authors' own published checkpoint (a Google Drive
link for the paper's encoders), which is downloaded and converted on this machine (hub/convert.py).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cthub.errors import ConfigError, ModelNotFoundError

REGISTRY_ENV = "CTHUB_REGISTRY"
PACKAGED_REGISTRY = Path(__file__).with_name("registry.json")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,95}$")
REQUIRED = (
    "method",
    "architecture",
    "pretraining_data",
    "repo_id",
    "revision",
    "sha256",
    "license",
    "citation",
)
ORIGINAL_REQUIRED = ("host", "file_id", "url", "layout", "sha256", "published_in")
ORIGINAL_HOSTS = ("google-drive",)
ORIGINAL_LAYOUTS = ("mocov2", "byol", "swav", "spark", "torchvision")  # hub.convert.LAYOUTS
SHA256_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class OriginalSource:
    """The authors' own checkpoint: where it is published, its key layout and (once known) its sha256."""

    host: str  # "google-drive"
    file_id: str
    url: str  # the link as the authors publish it (for people; downloads use `file_id` and an endpoint)
    layout: str  # a hub.convert layout: mocov2 | byol | swav | spark | torchvision
    sha256: str | None  # of the original file; None = not pinned (recorded on first pull)
    published_in: str  # the page that links it
    link_text: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (*ORIGINAL_REQUIRED, "link_text")}


@dataclass(frozen=True)
class RegistryEntry:
    """One named model: what it is, where its weights live and how they are verified."""

    name: str
    method: str
    architecture: str
    pretraining_data: str
    repo_id: str | None
    revision: str | None
    sha256: str | None
    license: str
    citation: str
    datasets: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    preprocessing: dict[str, Any] = field(default_factory=dict)
    original: OriginalSource | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # notes, original_checkpoint, produced_by...

    @property
    def is_remote(self) -> bool:
        return self.repo_id is not None

    @property
    def is_published(self) -> bool:
        """A remote entry whose weights' checksum is known (published); False: not yet published."""
        return self.repo_id is not None and self.sha256 is not None

    @property
    def sources(self) -> tuple[str, ...]:
        """Where the weights can come from, in the order they are tried: "huggingface", "original"."""
        return tuple(
            s
            for s, present in (
                ("huggingface", self.repo_id is not None),
                ("original", self.original is not None),
            )
            if present
        )

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("name", *REQUIRED)}
        d.update(datasets=list(self.datasets), aliases=list(self.aliases), preprocessing=self.preprocessing)
        if self.original is not None:
            d.update(original=self.original.to_dict(), sources=list(self.sources))
        d.update(self.extra)
        return d


@dataclass(frozen=True)
class Registry:
    entries: dict[str, RegistryEntry]
    aliases: dict[str, str]
    path: Path

    def canonical(self, name: str) -> str:
        """The registry name for `name` (aliases resolved, case-insensitive); unknown names unchanged."""
        key = name.strip().lower()
        key = self.aliases.get(key, key)
        return key if key in self.entries else name.strip()

    def get(self, name: str) -> RegistryEntry | None:
        return self.entries.get(self.canonical(name))

    def __getitem__(self, name: str) -> RegistryEntry:
        entry = self.get(name)
        if entry is None:
            raise ModelNotFoundError(
                f"{name!r} is not in the registry ({self.path}); known: {', '.join(sorted(self.entries))}"
            )
        return entry

    def names(self) -> list[str]:
        return sorted(self.entries)


def registry_path() -> Path:
    env = os.environ.get(REGISTRY_ENV)
    return Path(env).expanduser() if env else PACKAGED_REGISTRY


def _entry(name: str, d: dict[str, Any], aliases: tuple[str, ...], path: Path) -> RegistryEntry:
    missing = [k for k in REQUIRED if k not in d]
    if missing:
        raise ConfigError(f"{path}: entry {name!r} lacks {missing}")
    sha = d["sha256"]
    if sha is not None and not SHA256_RE.fullmatch(str(sha)):
        raise ConfigError(f"{path}: entry {name!r} has an invalid sha256 {sha!r} (64 lowercase hex or null)")
    if d["repo_id"] is not None and d["revision"] is None:
        raise ConfigError(f"{path}: remote entry {name!r} needs a revision (branch, tag or commit)")
    known = {*REQUIRED, "datasets", "preprocessing", "original"}
    return RegistryEntry(
        name=name,
        **{k: d[k] for k in REQUIRED},
        datasets=tuple(d.get("datasets", ())),
        aliases=aliases,
        preprocessing=dict(d.get("preprocessing") or {}),
        original=_original(name, d["original"], path) if d.get("original") is not None else None,
        extra={k: v for k, v in d.items() if k not in known},
    )


def _original(name: str, d: Any, path: Path) -> OriginalSource:
    where = f"{path}: entry {name!r}: original"
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be an object with {', '.join(ORIGINAL_REQUIRED)}")
    missing = [k for k in ORIGINAL_REQUIRED if k not in d]
    if missing:
        raise ConfigError(f"{where} lacks {missing}")
    if d["host"] not in ORIGINAL_HOSTS:
        raise ConfigError(f"{where}: unknown host {d['host']!r} (known: {', '.join(ORIGINAL_HOSTS)})")
    if d["layout"] not in ORIGINAL_LAYOUTS:
        raise ConfigError(f"{where}: unknown layout {d['layout']!r} (known: {', '.join(ORIGINAL_LAYOUTS)})")
    if not re.fullmatch(r"[A-Za-z0-9_-]{10,100}", str(d["file_id"])):
        raise ConfigError(f"{where}: invalid file_id {d['file_id']!r}")
    if d["sha256"] is not None and not SHA256_RE.fullmatch(str(d["sha256"])):
        raise ConfigError(f"{where}: invalid sha256 {d['sha256']!r} (64 lowercase hex or null)")
    unknown = sorted(set(d) - {*ORIGINAL_REQUIRED, "link_text"})
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}")
    return OriginalSource(**{k: d[k] for k in ORIGINAL_REQUIRED}, link_text=str(d.get("link_text", "")))


def load_registry(path: str | Path | None = None) -> Registry:
    """Read and validate the registry file (the packaged one unless `path` or $CTHUB_REGISTRY says so)."""
    p = Path(path) if path is not None else registry_path()
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"registry file {p} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"registry file {p} is not valid JSON: {e}") from None
    models = raw.get("models", {})
    aliases = {str(a).lower(): str(t) for a, t in raw.get("aliases", {}).items()}
    for a, target in aliases.items():
        if target not in models:
            raise ConfigError(f"{p}: alias {a!r} points to unknown model {target!r}")
        if a in models:
            raise ConfigError(f"{p}: alias {a!r} shadows a model name")
    for name in models:
        if not NAME_RE.match(name):
            raise ConfigError(f"{p}: invalid model name {name!r} (lowercase letters, digits, . _ -)")
    entries = {
        n: _entry(n, d, tuple(sorted(a for a, t in aliases.items() if t == n)), p) for n, d in models.items()
    }
    return Registry(entries=entries, aliases=aliases, path=p)


def check_name(name: str) -> str:
    """Validate a name for a model folder in the hub dir (no paths, no upper case)."""
    if not NAME_RE.match(name):
        raise ConfigError(
            f"invalid model name {name!r}: use lowercase letters, digits, '.', '_' or '-' "
            "(at most 96 characters)"
        )
    return name
