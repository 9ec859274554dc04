"""The Hugging Face Hub side: download into (and read from) huggingface_hub's own cache, and upload.

Offline rules: `HF_HUB_OFFLINE=1` (or `local_files_only=True`) reads the cache only. When online but the
endpoint does not answer a TCP connect within `CONNECT_TIMEOUT_S`, the cache is read and nothing else is tried:
huggingface_hub itself would retry for ~23 s. huggingface_hub is imported lazily (it costs ~0.3 s).
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from cthub.errors import ModelNotFoundError

CONNECT_TIMEOUT_S = 3.0
REQUIRED_FILES = ("config.json", "model.safetensors")
OPTIONAL_FILES = ("README.md",)
TRUTHY = {"1", "true", "yes", "on"}


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

    DNS resolution has no timeout of its own, so the probe runs in a daemon thread that is abandoned on time-out.
    """
    from huggingface_hub import constants

    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urllib.parse.urlsplit(proxy or constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
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


def fetch(repo_id: str, revision: str | None, *, cache_dir: str | Path | None = None, token: str | bool | None = None,
          local_files_only: bool = False) -> Fetched:
    """Get config.json + model.safetensors (+ README.md) of `repo_id@revision` into the HF cache.

    Raises RemoteUnavailable with the reason (offline and not cached, unreachable, repo/revision/file missing).
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache_only = local_files_only or is_offline()
    why = "HF_HUB_OFFLINE is set" if is_offline() else "local_files_only=True"
    if not cache_only and not endpoint_reachable():
        cache_only, why = True, f"the Hugging Face Hub did not answer within {CONNECT_TIMEOUT_S:.0f} s"
    where = f"{repo_id}@{revision or 'main'} in the Hugging Face cache {cache_dir or default_cache_dir()}"
    paths: dict[str, Path] = {}
    for name in REQUIRED_FILES + OPTIONAL_FILES:
        try:
            p = hf_hub_download(repo_id, name, revision=revision, cache_dir=cache_dir, token=token,
                                local_files_only=cache_only, library_name="ct-ssl-hub", etag_timeout=5)
            paths[name] = Path(p)
        except (LocalEntryNotFoundError, EntryNotFoundError) as e:
            if name in OPTIONAL_FILES:
                continue
            if isinstance(e, LocalEntryNotFoundError) or cache_only:
                raise RemoteUnavailable(f"{name} of {where} is not cached and {why}") from None
            raise RemoteUnavailable(f"{repo_id}@{revision or 'main'} has no {name} on the Hub") from None
        except RepositoryNotFoundError:
            raise RemoteUnavailable(f"repository {repo_id} does not exist on the Hub or is private "
                                    "(log in with `hf auth login` or set HF_TOKEN)") from None
        except RevisionNotFoundError:
            raise RemoteUnavailable(f"revision {revision!r} does not exist in {repo_id}") from None
        except HfHubHTTPError as e:
            raise RemoteUnavailable(f"the Hub refused {repo_id}/{name}: {e}") from None
    folder = paths["model.safetensors"].parent
    if paths["config.json"].parent != folder:
        raise RemoteUnavailable(f"{repo_id}: config.json and model.safetensors resolved to different revisions")
    return Fetched(folder=folder, commit=folder.name, repo_id=repo_id)


def upload(folder: Path, repo_id: str, *, token: str | bool | None = None, private: bool = False,
           revision: str | None = None, message: str | None = None) -> str:
    """Create `repo_id` if needed and upload `folder` with `HfApi.upload_folder`; returns the commit URL."""
    if is_offline():
        raise RemoteUnavailable(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set")
    if not endpoint_reachable():
        raise RemoteUnavailable(f"cannot push to {repo_id}: the Hugging Face Hub is not reachable")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                             commit_message=message or f"Upload {folder.name} with ct-ssl-hub")
    return str(getattr(info, "commit_url", info))
