"""The Hugging Face Hub side: download into (and read from) huggingface_hub's own cache, and upload.

Offline rules: `HF_HUB_OFFLINE=1` (or `local_files_only=True`) reads the cache only. A revision pinned to a
commit hash whose files are cached is read from the cache without any network access (a commit never
changes). When online but the endpoint does not answer a TCP connect within `CONNECT_TIMEOUT_S`, the cache
is read and nothing else is tried: huggingface_hub itself would retry for ~23 s. huggingface_hub is imported
lazily (it costs ~0.3 s).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import socket
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cthub.errors import ModelNotFoundError

CONNECT_TIMEOUT_S = 3.0
REQUIRED_FILES = ("config.json", "model.safetensors")
OPTIONAL_FILES = ("README.md",)
TRUTHY = {"1", "true", "yes", "on"}
COMMIT_RE = re.compile(r"[0-9a-f]{40}")
# The public base class of transport errors of each HTTP client huggingface_hub has used (httpx2 in 2.x,
# httpx in 1.x, requests in 0.x): it passes them through untranslated, e.g. when a server closes the
# connection without answering, and has no public error class of its own for them.
_TRANSPORT_ERRORS = (
    ("httpx2", "TransportError"),
    ("httpx", "TransportError"),
    ("requests", "RequestException"),
)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fetched:
    """A model folder inside the HF cache (`snapshots/<commit>`)."""

    folder: Path
    commit: str
    repo_id: str


class RemoteUnavailable(ModelNotFoundError):
    """The files are neither in the cache nor reachable (offline, unreachable, not found)."""


def is_offline() -> bool:
    """True when HF_HUB_OFFLINE is set, read now (huggingface_hub reads it only at import)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUTHY:
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def default_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)


def endpoint_reachable(timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the Hub endpoint (or the HTTPS proxy) opens within `timeout` seconds.

    DNS resolution has no timeout of its own, so the probe runs in a daemon thread abandoned on time-out.
    """
    from huggingface_hub import constants

    return host_reachable(constants.ENDPOINT, timeout)


def host_reachable(url: str, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the host of `url` (or to the proxy urllib would use for it) opens within
    `timeout` seconds; DNS resolution runs in a daemon thread abandoned on time-out."""
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urllib.parse.urlsplit(proxy)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    if not host:
        return False
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(result and result[0])


def _transport_errors() -> tuple[type[Exception], ...]:
    """Adapter: the transport error classes (public names) of the installed HTTP clients above. The one place
    that names a client of huggingface_hub's own choosing, because huggingface_hub exposes no public class for
    a connection that broke; a client that is not installed is skipped."""
    found = []
    for mod, name in _TRANSPORT_ERRORS:
        try:
            cls = getattr(importlib.import_module(mod), name, None)
        except ImportError:
            continue
        if isinstance(cls, type) and issubclass(cls, Exception):
            found.append(cls)
    return tuple(found)


def fetch(
    repo_id: str,
    revision: str | None,
    *,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Fetched:
    """Get config.json + model.safetensors (+ README.md) of `repo_id@revision` into the HF cache.

    Raises RemoteUnavailable with the reason (offline and not cached, unreachable, repo/revision/file
    missing, or the server closed the connection without an answer).
    """
    offline = is_offline()
    if local_files_only or offline:
        return _from_cache(
            repo_id, revision, cache_dir, "HF_HUB_OFFLINE is set" if offline else "local_files_only=True"
        )
    if revision is not None and COMMIT_RE.fullmatch(revision):
        with contextlib.suppress(RemoteUnavailable):  # a commit never changes: a cached one needs no request
            return _from_cache(repo_id, revision, cache_dir, "")
    if not endpoint_reachable():
        return _from_cache(
            repo_id,
            revision,
            cache_dir,
            f"the Hugging Face Hub did not answer within {CONNECT_TIMEOUT_S:.0f} s",
        )
    return _download(repo_id, revision, cache_dir, token)


def _fetched(repo_id: str, paths: dict[str, Path]) -> Fetched:
    folder = paths["model.safetensors"].parent
    if paths["config.json"].parent != folder:
        raise RemoteUnavailable(
            f"{repo_id}: config.json and model.safetensors resolved to different revisions"
        )
    return Fetched(folder=folder, commit=folder.name, repo_id=repo_id)


def _from_cache(repo_id: str, revision: str | None, cache_dir: str | Path | None, why: str) -> Fetched:
    """The files of `repo_id@revision` from the HF cache alone.

    `try_to_load_from_cache` reads the cache without building request headers: `hf_hub_download` with
    `local_files_only=True` would still fetch huggingface_hub's agent registry from the endpoint once per
    process when telemetry is on (a 3 s wait on an unreachable endpoint).
    """
    from huggingface_hub import try_to_load_from_cache

    paths: dict[str, Path] = {}
    for name in REQUIRED_FILES + OPTIONAL_FILES:
        hit = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir, revision=revision)
        if isinstance(hit, str):
            paths[name] = Path(hit)
        elif name in REQUIRED_FILES:
            where = f"{repo_id}@{revision or 'main'} in the Hugging Face cache"
            raise RemoteUnavailable(
                f"{name} of {where} {cache_dir or default_cache_dir()} is not cached and {why}"
            )
    return _fetched(repo_id, paths)


def _download(
    repo_id: str, revision: str | None, cache_dir: str | Path | None, token: str | bool | None
) -> Fetched:
    """`hf_hub_download` of each file (a HEAD each, a GET when not cached); failures: RemoteUnavailable."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"{repo_id}@{revision or 'main'}"
    paths: dict[str, Path] = {}
    for name in REQUIRED_FILES + OPTIONAL_FILES:
        try:
            p = hf_hub_download(
                repo_id,
                name,
                revision=revision,
                cache_dir=cache_dir,
                token=token,
                library_name="ct-ssl-hub",
                etag_timeout=5,
            )
            paths[name] = Path(p)
        except (LocalEntryNotFoundError, EntryNotFoundError) as e:
            if name in OPTIONAL_FILES:
                continue
            if isinstance(e, LocalEntryNotFoundError):  # the Hub answered unusably and nothing is cached
                raise RemoteUnavailable(
                    f"{name} of {at} is not cached and could not be fetched ({e})"
                ) from None
            raise RemoteUnavailable(f"{at} has no {name} on the Hub") from None
        except RepositoryNotFoundError:
            raise RemoteUnavailable(
                f"repository {repo_id} does not exist on the Hub or is private "
                "(log in with `hf auth login` or set HF_TOKEN)"
            ) from None
        except RevisionNotFoundError:
            raise RemoteUnavailable(f"revision {revision!r} does not exist in {repo_id}") from None
        except HfHubHTTPError as e:
            raise RemoteUnavailable(f"the Hub refused {repo_id}/{name}: {e}") from None
        except _transport_errors() as e:
            raise RemoteUnavailable(
                f"the Hub did not answer the request for {repo_id}/{name} ({type(e).__name__}: {e})"
            ) from None
    log.debug("%s resolved to %s", at, paths["model.safetensors"].parent)
    return _fetched(repo_id, paths)


def upload(
    folder: Path,
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool = False,
    revision: str | None = None,
    message: str | None = None,
) -> str:
    """Create `repo_id` if needed and upload `folder` with `HfApi.upload_folder`; returns the commit URL."""
    if is_offline():
        raise RemoteUnavailable(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set")
    if not endpoint_reachable():
        raise RemoteUnavailable(f"cannot push to {repo_id}: the Hugging Face Hub is not reachable")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            revision=revision,
            commit_message=message or f"Upload {folder.name} with ct-ssl-hub",
        )
    except HfHubHTTPError as e:
        raise RemoteUnavailable(
            f"the Hub refused the upload to {repo_id} (log in with `hf auth login` or "
            f"set HF_TOKEN to a token with write access): {e}"
        ) from None
    except _transport_errors() as e:
        raise RemoteUnavailable(
            f"the upload to {repo_id} was interrupted ({type(e).__name__}: {e})"
        ) from None
    return str(getattr(info, "commit_url", info))
