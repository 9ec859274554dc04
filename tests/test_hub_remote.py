"""The Hugging Face Hub side end to end: huggingface_hub's real download and upload code against a local Hub.

`FakeHub` serves the parts of the Hub protocol that huggingface_hub 2.4 uses for `hf_hub_download` and
`HfApi.upload_folder` (read from its source: file_download.py, _commit_api.py, lfs.py, hf_api.py):

- `HEAD|GET /{repo}/resolve/{revision}/{path}`: `X-Repo-Commit`, `ETag` (git blob sha1) and `Content-Length`
  for regular files; for LFS files a 302 to a CDN host with `X-Linked-Etag` (the sha256) and
  `X-Linked-Size`, as huggingface.co answers. The CDN is a second server on 127.0.0.2, so the client treats
  it as another host (no auth header is forwarded to it).
- errors as `X-Error-Code` headers: RepoNotFound, RevisionNotFound, EntryNotFound (this one with the commit);
  a request with an invalid token is refused with 401 wherever it goes, as on huggingface.co.
- `GET /api/models/{repo}[/revision/{rev}]` (model info), which `create_repo` calls when creation is refused.
  `hf_hub_download` itself makes no model-info call in 2.4: only the HEAD and GET above.
- upload: `POST /api/repos/create`, `/api/validate-yaml`, `/api/models/{repo}/preupload/{rev}`,
  `/{repo}.git/info/lfs/objects/batch` (basic transfer: a PUT to the CDN, then `.../verify`) and the ndjson
  `/api/models/{repo}/commit/{rev}`. hf_xet would upload LFS content through the Xet storage protocol
  (a chunk store that cannot be stood up here), so the push test sets HF_HUB_DISABLE_XET: huggingface_hub
  then takes its LFS path, the same one it uses when hf_xet is not installed.

Every request is logged (server, method, path, whether it carried the token) and every accepted connection
counted, so the tests can say how many requests a load makes. Anything else gets a 404 and is logged as
unexpected, which the fixture turns into a test failure.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from cthub.cli import main
from cthub.errors import IntegrityError, ModelNotFoundError
from hub import ModelConfig, ResNet50, from_pretrained, hub_dir, manifest, publish_local, save_pretrained

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_test_write_token"
LFS_SUFFIXES = (".safetensors",)
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.sha256", "README.md")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file, which the Hub sends as the ETag of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> {path: content}
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit

    def resolve(self, revision: str) -> str | None:
        return self.refs.get(revision) or (revision if revision in self.commits else None)


@dataclass(frozen=True)
class Call:
    server: str  # "hub" or "cdn"
    method: str
    path: str
    auth: bool  # the request carried the test token


class FakeHub:
    """An in-memory Hub of repos, commits and refs, served on 127.0.0.1 with its CDN on 127.0.0.2."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # LFS objects by sha256
        self.calls: list[Call] = []
        self.unexpected: list[str] = []
        self.connections = 0
        self.corrupt_cdn = False  # a damaged mirror: one byte of every LFS body served is flipped
        self._lock = threading.Lock()
        self._commits = 0
        self.hub = _Server(("127.0.0.1", 0), self, "hub")
        self.cdn = _Server(("127.0.0.2", 0), self, "cdn")
        self.endpoint = f"http://127.0.0.1:{self.hub.server_address[1]}"
        self.cdn_url = f"http://127.0.0.2:{self.cdn.server_address[1]}"
        self._threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (self.hub, self.cdn)]
        for t in self._threads:
            t.start()

    def close(self) -> None:
        for s in (self.hub, self.cdn):
            s.shutdown()
            s.server_close()

    def commit(
        self, repo_id: str, files: dict[str, bytes], *, branch: str = "main", tags: tuple[str, ...] = ()
    ) -> str:
        """Commit `files` on top of `branch` (a new repo starts with .gitattributes); returns its id."""
        with self._lock:
            repo = self.repos.setdefault(repo_id, Repo())
            parent = repo.refs.get(branch)
            tree = dict(repo.commits[parent]) if parent else {".gitattributes": GITATTRIBUTES}
            tree.update(files)
            for path, data in files.items():
                if path.endswith(LFS_SUFFIXES):
                    self.lfs[hashlib.sha256(data).hexdigest()] = data
            self._commits += 1
            oid = hashlib.sha1(f"{repo_id}@{self._commits}".encode(), usedforsecurity=False).hexdigest()
            repo.commits[oid] = tree
            for ref in (branch, *tags):
                repo.refs[ref] = oid
            return oid

    def tree(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(revision) or ""]

    def requests(self, server: str | None = None) -> list[tuple[str, str]]:
        return [(c.method, c.path) for c in self.calls if server is None or c.server == server]

    def reset(self) -> None:
        self.calls.clear()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # keep-alive connections of huggingface_hub's client must not block shutdown

    def __init__(self, address: tuple[str, int], hub: FakeHub, role: str) -> None:
        super().__init__(address, _Handler)
        self.fake, self.role = hub, role

    def verify_request(self, request: Any, client_address: Any) -> bool:
        with self.fake._lock:
            self.fake.connections += 1
        return True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet: calls are recorded in FakeHub.calls
        pass

    # -- plumbing

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while size := int(self.rfile.readline().split(b";")[0], 16):
                out += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return bytes(out)
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(
        self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None
    ) -> None:
        extra = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {}), **(headers or {})}
        self._json(status, {"error": message}, extra)

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {TOKEN}"

    def _route(self) -> None:
        fake, path = self.server.fake, urllib.parse.urlsplit(self.path).path
        with fake._lock:
            fake.calls.append(Call(self.server.role, self.command, path, self._authorized()))
        if self.server.role == "hub" and "Authorization" in self.headers and not self._authorized():
            self._body()
            return self._error(401, None, "Invalid credentials in Authorization header")
        handler = (self._cdn if self.server.role == "cdn" else self._hub)(path)
        if handler is None:
            with fake._lock:
                fake.unexpected.append(f"{self.server.role} {self.command} {path}")
            self._error(404, None, f"no route for {self.command} {path}")
        else:
            handler()

    do_HEAD = do_GET = do_POST = do_PUT = _route

    # -- routes

    def _hub(self, path: str) -> Any:
        parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/")]
        if self.command in ("HEAD", "GET") and len(parts) >= 5 and parts[2] == "resolve":
            return lambda: self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        if self.command == "GET" and parts[:2] == ["api", "models"] and len(parts) in (4, 6):
            return lambda: self._model_info(f"{parts[2]}/{parts[3]}", parts[5] if len(parts) == 6 else "main")
        if self.command != "POST":
            return None
        if parts == ["api", "repos", "create"]:
            return self._create_repo
        if parts == ["api", "validate-yaml"]:
            return lambda: (self._body(), self._json(200, {"errors": [], "warnings": []}))
        if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] in ("preupload", "commit"):
            action = self._preupload if parts[4] == "preupload" else self._commit
            return lambda: action(f"{parts[2]}/{parts[3]}", parts[5])
        if len(parts) == 6 and parts[1].endswith(".git") and parts[2:5] == ["info", "lfs", "objects"]:
            action = self._lfs_batch if parts[5] == "batch" else self._lfs_verify
            return lambda: action(f"{parts[0]}/{parts[1].removesuffix('.git')}")
        return None

    def _cdn(self, path: str) -> Any:
        kind, _, oid = path.strip("/").partition("/")
        if self.command == "GET" and kind == "lfs":
            return lambda: self._lfs_object(oid)
        if self.command == "PUT" and kind == "upload":
            return lambda: self._lfs_upload(oid)
        return None

    def _resolve(self, repo_id: str, revision: str, filename: str) -> None:
        fake = self.server.fake
        repo = fake.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", "Invalid rev id: " + revision)
        data = repo.commits[commit].get(filename)
        if data is None:
            return self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit})
        pointer_etag = f'"{git_blob_sha1(data)}"'
        if filename.endswith(LFS_SUFFIXES):  # LFS: the resolve answers a redirect to the CDN
            sha = hashlib.sha256(data).hexdigest()
            return self._send(
                302,
                b"",
                {
                    "Location": f"{fake.cdn_url}/lfs/{sha}",
                    "X-Repo-Commit": commit,
                    "X-Linked-Etag": f'"{sha}"',
                    "X-Linked-Size": str(len(data)),
                    "ETag": pointer_etag,
                },
            )
        return self._send(
            200,
            data,
            {"X-Repo-Commit": commit, "ETag": pointer_etag, "Content-Type": "application/octet-stream"},
        )

    def _model_info(self, repo_id: str, revision: str) -> None:
        repo = self.server.fake.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", "Invalid rev id: " + revision)
        return self._json(
            200,
            {
                "id": repo_id,
                "sha": commit,
                "private": False,
                "siblings": [{"rfilename": p} for p in sorted(repo.commits[commit])],
            },
        )

    def _lfs_object(self, oid: str) -> None:
        fake = self.server.fake
        data = fake.lfs.get(oid)
        if data is None:
            return self._error(404, None, "no such object")
        if fake.corrupt_cdn:
            data = data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1 :]
        return self._send(200, data, {"Content-Type": "application/octet-stream", "ETag": f'"{oid}"'})

    def _lfs_upload(self, oid: str) -> None:
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, None, "content does not match the object id")
        self.server.fake.lfs[oid] = data
        return self._send(200)

    def _create_repo(self) -> None:
        req = json.loads(self._body())
        if not self._authorized():
            return self._error(401, None, "Invalid credentials in Authorization header")
        repo_id = f"{req['organization']}/{req['name']}"
        if repo_id in self.server.fake.repos:
            return self._json(409, {"error": "You already created this model repo"})
        self.server.fake.commit(repo_id, {})
        return self._json(200, {"url": f"{self.server.fake.endpoint}/{repo_id}"})

    def _preupload(self, repo_id: str, revision: str) -> None:
        req = json.loads(self._body())
        if not self._authorized():
            return self._error(401, None, "Invalid credentials in Authorization header")
        fake = self.server.fake
        if repo_id not in fake.repos:
            return self._error(404, "RepoNotFound", "Repository not found")
        tree = fake.tree(repo_id, revision)
        files = []
        for f in req["files"]:
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] > 10_000_000
            old = tree.get(f["path"])
            oid = None if old is None else hashlib.sha256(old).hexdigest() if lfs else git_blob_sha1(old)
            files.append(
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": oid,
                }
            )
        return self._json(200, {"files": files, "commitOid": fake.repos[repo_id].resolve(revision)})

    def _lfs_batch(self, repo_id: str) -> None:
        req = json.loads(self._body())
        if not self._authorized():
            return self._error(401, None, "Invalid credentials in Authorization header")
        fake, objects = self.server.fake, []
        for o in req["objects"]:
            entry: dict[str, Any] = {"oid": o["oid"], "size": o["size"], "authenticated": True}
            if o["oid"] not in fake.lfs:
                entry["actions"] = {
                    "upload": {"href": f"{fake.cdn_url}/upload/{o['oid']}"},
                    "verify": {"href": f"{fake.endpoint}/{repo_id}.git/info/lfs/objects/verify"},
                }
            objects.append(entry)
        return self._json(200, {"transfer": "basic", "objects": objects})

    def _lfs_verify(self, repo_id: str) -> None:
        req = json.loads(self._body())
        data = self.server.fake.lfs.get(req["oid"])
        if data is None or len(data) != req["size"]:
            return self._error(404, None, "object not uploaded")
        return self._json(200, {"message": "ok"})

    def _commit(self, repo_id: str, revision: str) -> None:
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        if not self._authorized():
            return self._error(401, None, "Invalid credentials in Authorization header")
        fake, files = self.server.fake, {}
        for item in lines[1:]:
            v = item["value"]
            if item["key"] == "file":
                files[v["path"]] = base64.b64decode(v["content"])
            elif item["key"] == "lfsFile":
                if v["oid"] not in fake.lfs:
                    return self._error(422, None, f"LFS object {v['oid']} was not uploaded")
                files[v["path"]] = fake.lfs[v["oid"]]
            else:
                return self._error(400, None, f"unsupported commit operation {item['key']}")
        oid = fake.commit(repo_id, files, branch=revision)
        return self._json(
            200,
            {
                "commitUrl": f"{fake.endpoint}/{repo_id}/commit/{oid}",
                "commitOid": oid,
                "pullRequestUrl": None,
            },
        )


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A FakeHub as the endpoint, online, with an empty HF cache; set as huggingface_hub would from
    HF_ENDPOINT (its constants are read at import, so they are set here too)."""
    from huggingface_hub import constants

    hub = FakeHub()
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    template = hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {"127.0.0.1"})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    yield hub
    hub.close()
    assert not hub.unexpected, f"huggingface_hub called routes the fake Hub does not serve: {hub.unexpected}"


@dataclass(frozen=True)
class Model:
    files: dict[str, bytes]
    conv1: torch.Tensor

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.files["model.safetensors"]).hexdigest()


def _model(root: Path, seed: int) -> Model:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        name="spark-lidc",
        method="spark",
        metrics={"test_auc": 0.9},
        provenance={"license": "other", "datasets": ["LIDC-IDRI"], "data": "organamnist test"},
    )
    folder = save_pretrained(ResNet50(), root / f"m{seed}", cfg)
    files = {f: (folder / f).read_bytes() for f in MODEL_FILES}
    return Model(files, load_file(str(folder / "model.safetensors"))["conv1.weight"])


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Model, Model]:
    root = tmp_path_factory.mktemp("models")
    return _model(root, 1), _model(root, 2)


def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


# ------------------------------------------------------------------------------------------------- tests


def test_pull_downloads_through_huggingface_hub_then_loads_from_its_cache(
    fake_hub: FakeHub, models: tuple[Model, Model], capsys: pytest.CaptureFixture[str]
) -> None:
    a, _ = models
    commit = fake_hub.commit("ct-ssl-hub/byol-lidc", a.files)
    assert main(["hub", "pull", "byol"]) == 0
    assert f"hf://ct-ssl-hub/byol-lidc@{commit}" in capsys.readouterr().out
    # a HEAD per file on the registry's revision; regular files from the Hub, the weights from the CDN
    base = "/ct-ssl-hub/byol-lidc/resolve/main"
    assert fake_hub.requests("hub") == [
        ("HEAD", f"{base}/config.json"),
        ("GET", f"{base}/config.json"),
        ("HEAD", f"{base}/model.safetensors"),
        ("HEAD", f"{base}/README.md"),
        ("GET", f"{base}/README.md"),
    ]
    assert fake_hub.requests("cdn") == [("GET", f"/lfs/{a.sha256}")]
    assert [c.auth for c in fake_hub.calls if c.server == "cdn"] == [False]  # the token stays on the Hub
    record = manifest.read_manifest(hub_dir())[f"hf:ct-ssl-hub/byol-lidc@{commit}"]
    assert record["sha256"] == a.sha256 and record["source"] == "pull"  # trust on first use, then verified

    # Loading the branch again: huggingface_hub re-resolves `main` (a HEAD per file) and transfers nothing.
    fake_hub.reset()
    model = from_pretrained("byol")
    assert model.config.revision == commit and torch.equal(model.conv1.weight, a.conv1)
    assert {m for m, _ in fake_hub.requests()} == {"HEAD"} and len(fake_hub.requests()) == 3
    # Loading a cached commit: no request, and not even a connection (no reachability probe either).
    fake_hub.reset()
    connections = fake_hub.connections
    assert from_pretrained("byol", revision=commit).config.revision == commit
    assert fake_hub.requests() == [] and fake_hub.connections == connections


def test_revision_pinning_by_branch_tag_and_commit(
    fake_hub: FakeHub, models: tuple[Model, Model], capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = models
    first = fake_hub.commit("ct-ssl-hub/spark-lidc", a.files, tags=("v1",))
    second = fake_hub.commit("ct-ssl-hub/spark-lidc", b.files)  # main moves on; v1 stays
    loaded = {rev: from_pretrained("spark", revision=rev) for rev in (None, "v1", first, second)}
    assert {rev: m.config.revision for rev, m in loaded.items()} == {
        None: second,
        "v1": first,
        first: first,
        second: second,
    }
    for rev, model in loaded.items():
        assert torch.equal(model.conv1.weight, (a if model.config.revision == first else b).conv1), rev
    assert fake_hub.requests("cdn") == [("GET", f"/lfs/{b.sha256}"), ("GET", f"/lfs/{a.sha256}")]

    with pytest.raises(ModelNotFoundError, match="revision 'v9' does not exist in ct-ssl-hub/spark-lidc"):
        from_pretrained("spark", revision="v9")
    assert main(["hub", "pull", "nobody/nothing"]) == 2
    assert "repository nobody/nothing does not exist on the Hub" in capsys.readouterr().err
    fake_hub.commit("ct-ssl-hub/swav-lidc", {"config.json": a.files["config.json"]})  # weights missing
    with pytest.raises(ModelNotFoundError, match=r"has no model\.safetensors on the Hub"):
        from_pretrained("swav")


def test_tampered_weights_from_the_hub_are_refused(
    fake_hub: FakeHub,
    models: tuple[Model, Model],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    a, _ = models
    # 1. The registry publishes the sha256; the Hub serves other bytes under that name.
    reg = json.loads((ROOT / "hub" / "registry.json").read_text())
    reg["models"]["spark-lidc"]["sha256"] = a.sha256
    (tmp_path / "reg.json").write_text(json.dumps(reg))
    monkeypatch.setenv("CTHUB_REGISTRY", str(tmp_path / "reg.json"))
    weights = bytearray(a.files["model.safetensors"])
    weights[-100] ^= 0xFF
    fake_hub.commit("ct-ssl-hub/spark-lidc", {**a.files, "model.safetensors": bytes(weights)})
    with pytest.raises(IntegrityError, match="recorded in the registry"):
        from_pretrained("spark")

    # 2. No published checksum: the first pull is recorded; a damaged mirror serving the same commit into
    #    a fresh cache later is caught by that record.
    commit = fake_hub.commit("ct-ssl-hub/byol-lidc", a.files)
    assert main(["hub", "pull", "byol"]) == 0
    fake_hub.corrupt_cdn = True
    assert main(["hub", "pull", "byol", "--cache-dir", str(tmp_path / "fresh")]) == 2
    err = capsys.readouterr().err
    assert "does not match the sha256 recorded in the hub manifest" in err and "Nothing was loaded" in err
    assert manifest.read_manifest(hub_dir())[f"hf:ct-ssl-hub/byol-lidc@{commit}"]["sha256"] == a.sha256


def test_offline_reads_what_was_downloaded_without_any_connection(
    fake_hub: FakeHub,
    models: tuple[Model, Model],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    a, _ = models
    commit = fake_hub.commit("ct-ssl-hub/byol-lidc", a.files)
    assert main(["hub", "pull", "byol"]) == 0
    _offline(monkeypatch)
    connections, calls = fake_hub.connections, len(fake_hub.calls)
    assert from_pretrained("byol-lidc").config.revision == commit
    capsys.readouterr()
    assert main(["hub", "pull", "swav"]) == 2  # not cached, offline: one clear error
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE" in err and "cthub hub import CHECKPOINT --method swav" in err
    assert main(["hub", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["byol-lidc"]["status"] == "cached" and rows["swav-lidc"]["status"] == "original"
    assert rows["spark-organamnist-cpu"]["status"] == "not built" and "spark" in rows["spark-lidc"]["aliases"]
    assert (fake_hub.connections, len(fake_hub.calls)) == (connections, calls)


def test_artifacts_load_with_huggingface_hub_alone(fake_hub: FakeHub, models: tuple[Model, Model]) -> None:
    from huggingface_hub import ModelCard, hf_hub_download

    a, _ = models
    fake_hub.commit("ct-ssl-hub/spark-lidc", a.files)
    kw = {"repo_id": "ct-ssl-hub/spark-lidc"}
    state = load_file(hf_hub_download(filename="model.safetensors", **kw))
    config = json.loads(Path(hf_hub_download(filename="config.json", **kw)).read_text())
    card = ModelCard.load(hf_hub_download(filename="README.md", **kw))
    assert config["architecture"] == "resnet50" and config["preprocessing"]["input_size"] == 224
    assert len(state) == len(ResNet50().state_dict())
    assert card.data.library_name == "ct-ssl-hub" and card.data.license == "other"
    assert "spark" in card.data.tags and card.data.datasets == ["LIDC-IDRI"]
    result = card.data.eval_results[0]
    assert result.metric_type == "test_auc" and result.metric_value == 0.9


def test_cli_pull_in_a_fresh_process_follows_hf_endpoint(
    fake_hub: FakeHub, models: tuple[Model, Model], tmp_path: Path
) -> None:
    """`cthub hub pull` as a user runs it: only HF_ENDPOINT points huggingface_hub at the fake Hub."""
    a, b = models
    first = fake_hub.commit("ct-ssl-hub/spark-lidc", a.files, tags=("v1",))
    fake_hub.commit("ct-ssl-hub/spark-lidc", b.files)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "cthub", "hub", "pull", "spark", "--revision", "v1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"hf://ct-ssl-hub/spark-lidc@{first}" in proc.stdout and a.sha256 in proc.stdout
    assert ("GET", f"/lfs/{a.sha256}") in fake_hub.requests("cdn")


def test_push_uploads_through_huggingface_hub_and_pulls_back(
    fake_hub: FakeHub,
    models: tuple[Model, Model],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from huggingface_hub import constants

    a, _ = models
    src = tmp_path / "src"
    src.mkdir()
    for f, data in a.files.items():
        (src / f).write_bytes(data)
    enc = from_pretrained(src)
    publish_local(enc, "spark-organamnist-cpu", enc.config)
    local_sha = manifest.read_manifest(hub_dir())["spark-organamnist-cpu"]["sha256"]
    stage = tmp_path / "stage"
    assert main(["hub", "push", "spark-organamnist-cpu", "--repo", "me/x", "--stage-dir", str(stage)]) == 0
    staged = sorted(p.name for p in stage.iterdir())
    assert staged == ["README.md", "config.json", "model.safetensors", "model.safetensors.sha256"]
    assert from_pretrained(stage).config.name == "spark-organamnist-cpu"

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # LFS transfer (see the module docstring)
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    assert main(["hub", "push", "spark-organamnist-cpu", "--repo", "me/x"]) == 2
    assert "the Hub refused the upload to me/x" in capsys.readouterr().err
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    fake_hub.reset()
    assert main(["hub", "push", "spark-organamnist-cpu", "--repo", "me/x"]) == 0
    out = capsys.readouterr().out
    commit = fake_hub.repos["me/x"].refs["main"]
    assert f"{fake_hub.endpoint}/me/x/commit/{commit}" in out and local_sha in out
    tree = fake_hub.tree("me/x")
    assert sorted(tree) == [".gitattributes", *staged]
    assert all(tree[f] == (stage / f).read_bytes() for f in staged)
    # README.md's metadata is validated twice (upload_folder, then create_commit); the weights go to the CDN
    assert fake_hub.requests("hub") == [
        ("POST", "/api/repos/create"),
        ("POST", "/api/validate-yaml"),
        ("POST", "/api/validate-yaml"),
        ("POST", "/api/models/me/x/preupload/main"),
        ("POST", "/me/x.git/info/lfs/objects/batch"),
        ("POST", "/me/x.git/info/lfs/objects/verify"),
        ("POST", "/api/models/me/x/commit/main"),
    ]
    assert fake_hub.requests("cdn") == [("PUT", f"/upload/{local_sha}")]
    assert [c.auth for c in fake_hub.calls] == [c.server == "hub" for c in fake_hub.calls]

    assert main(["hub", "pull", "me/x"]) == 0  # the pushed repo comes back verified
    assert f"hf://me/x@{commit}" in capsys.readouterr().out
    assert manifest.read_manifest(hub_dir())[f"hf:me/x@{commit}"]["sha256"] == local_sha
