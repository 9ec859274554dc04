"""The paper's encoders behind their names, without the internet: `from_pretrained("spark-lidc")` and
`cthub hub pull NAME` go to the registry's Hugging Face repo first (a FakeHub from test_hub_remote.py, where
the repo does not exist yet), then download the authors' checkpoint from a local stand-in for Google Drive,
convert it and load it.

`DriveStandIn` behaves as the authors' links do (checked against gdown's parser and reports of the current
pages, see hub/download.py): `GET drive.google.com/uc?export=download&id=ID` answers 303 to
`drive.usercontent.google.com/download?id=ID&export=download` (here a second server on 127.0.0.2); a file
larger than `large` bytes gets the "Virus scan warning" page whose form (`confirm=t`, a fresh `uuid`) leads to
the file; the file is sent with `Content-Disposition: attachment` and honours `Range`; `cut` files are cut off
after half their bytes the first time; a missing file is a 404 HTML page; a file over its download quota is
a 200 HTML page with Drive's `uc-error-subcaption`. Every request is logged.

Checkpoints, in the authors' layouts, full-size ResNet50 trunks (the converter maps onto ResNet50 strictly):
- SparK: the file of their Pre-Training/Masked_Autoencoder/utils/misc.py, save_checkpoint_for_finetune:
  {'arch': 'resnet50', 'module': sparse_encoder.sp_cnn.state_dict(), 'is_pretrain': False}, the sp_cnn being
  timm's resnet50 built with num_classes=0, global_pool='' (models/__init__.py): bare keys, no fc.
- BYOL / SwAV / MoCoV2: pytorch-lightning 1.6 `.ckpt` of their pl_bolts modules, as a dict whose state_dict
  keys are read from their code (moco2_module.py: encoder_q/encoder_k with MLP fc, queue, queue_ptr,
  val_queue, val_queue_ptr; byol_module.py + models.py: online_network/target_network SiameseArm with
  encoder, projector.model, predictor.model; swav_module_lidc.py: model with projection_head, prototypes) and
  the top-level keys of Lightning's dump_checkpoint (tests/test_hub_convert.py, `_lightning_checkpoint`), with
  hyper_parameters a real pytorch_lightning AttributeDict. Not written by Trainer.save_checkpoint: its
  optimizer state would make each file 3-4 ResNet50s; files written by it are imported by the same converter
  in tests/test_hub_convert.py. The second network (encoder_k, target_network) shares the first one's
  tensors, so torch.save stores them once: same keys, half the bytes.
"""

from __future__ import annotations

import hashlib
import html
import json
import shutil
import socket
import threading
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_hub_convert import _lightning_checkpoint, _mlp
from test_hub_remote import TOKEN, FakeHub, fake_hub  # noqa: F401 - a fixture, found by name (see `hf`)

from ctdata.preprocess import PreprocessConfig
from cthub.cli import main
from cthub.errors import ConfigError
from hub import ResNet50, from_pretrained, hub_dir, manifest
from hub.convert import CONVERTED_BY, OriginChangedError
from hub.download import DownloadError, NotAFileError, download, gdrive_url
from hub.registry import load_registry

PAPER = ("spark-lidc", "byol-lidc", "swav-lidc", "mocov2-lidc")


# ------------------------------------------------------------------------------------------ the stand-in


@dataclass
class Served:
    path: Path
    filename: str


@dataclass
class DriveStandIn:
    files: dict[str, Served] = field(default_factory=dict)  # file id -> file
    quota: set[str] = field(default_factory=set)  # ids answered with the quota page
    cut: set[str] = field(default_factory=set)  # ids cut off after half the bytes, once
    large: int = 1 << 20  # bigger files need the confirmation step
    log: list[tuple[str, str, str | None]] = field(default_factory=list)  # (server, path, Range)
    sent: dict[str, int] = field(default_factory=dict)  # body bytes sent per id
    uuids: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.drive = _Server(("127.0.0.1", 0), self, "drive")
        self.usercontent = _Server(("127.0.0.2", 0), self, "usercontent")
        self.endpoint = f"http://127.0.0.1:{self.drive.server_address[1]}"
        self.usercontent_url = f"http://127.0.0.2:{self.usercontent.server_address[1]}"
        for s in (self.drive, self.usercontent):
            threading.Thread(target=s.serve_forever, daemon=True).start()

    def close(self) -> None:
        for s in (self.drive, self.usercontent):
            s.shutdown()
            s.server_close()

    def paths(self, server: str | None = None) -> list[str]:
        return [p for s, p, _ in self.log if server is None or s == server]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], drive: DriveStandIn, role: str) -> None:
        super().__init__(address, _Handler)
        self.drive, self.role = drive, role


def _page(title: str, body: str) -> bytes:
    return f"<!DOCTYPE html><html><head><title>{title}</title></head><body>{body}</body></html>".encode()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        q = dict(urllib.parse.parse_qsl(url.query))
        d = self.server.drive
        with d._lock:
            d.log.append((self.server.role, self.path, self.headers.get("Range")))
        fid = q.get("id", "")
        if self.server.role == "drive" and url.path == "/uc":
            return self._send(
                303, b"", {"Location": f"{d.usercontent_url}/download?id={fid}&export=download"}
            )
        if self.server.role != "usercontent" or url.path != "/download" or fid not in d.files:
            return self._send(404, _page("Error 404 (Not Found)!!1", "<p>That's an error.</p>"), _HTML)
        if fid in d.quota:
            caption = (
                "Too many users have viewed or downloaded this file recently. Please try accessing the file "
                "again later."
            )
            body = f'<p class="uc-error-caption">Sorry</p><p class="uc-error-subcaption">{caption}</p>'
            return self._send(200, _page("Google Drive - Quota exceeded", body), _HTML)
        f = d.files[fid]
        size = f.path.stat().st_size
        if size > d.large and not (q.get("confirm") == "t" and q.get("uuid") in d.uuids):
            token = str(uuid.uuid4())
            d.uuids.add(token)
            hidden = {"id": fid, "export": "download", "confirm": "t", "uuid": token}
            form = (
                f'<form id="download-form" action="{html.escape(d.usercontent_url)}/download" method="get">'
                '<input type="submit" id="uc-download-link" value="Download anyway"/>'
                + "".join(
                    f'<input type="hidden" name="{k}" value="{html.escape(v)}">' for k, v in hidden.items()
                )
                + "</form>"
            )
            warning = (
                '<p class="uc-warning-caption">Google Drive can\'t scan this file for viruses.</p>'
                f'<p class="uc-warning-subcaption">{html.escape(f.filename)} ({size >> 20}M) is too large '
                "for Google to scan for viruses. Would you still like to download this file?</p>"
            )
            return self._send(200, _page("Google Drive - Virus scan warning", warning + form), _HTML)
        self._send_file(fid, f, size)

    def _send_file(self, fid: str, f: Served, size: int) -> None:
        d = self.server.drive
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.removeprefix("bytes=").split("-")[0])
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Disposition", f'attachment; filename="{f.filename}"')
        self.send_header("Accept-Ranges", "bytes")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.send_header("Content-Length", str(size - start))
        self.end_headers()
        cut = fid in d.cut and not start
        stop = size // 2 if cut else size
        with open(f.path, "rb") as src:
            src.seek(start)
            left = stop - start
            while left > 0:
                block = src.read(min(1 << 20, left))
                # counted before the write: the client may finish (and the test assert) as soon as the
                # last block arrives, before this thread would get back to count it
                with d._lock:
                    d.sent[fid] = d.sent.get(fid, 0) + len(block)
                self.wfile.write(block)
                left -= len(block)
        if cut:  # the connection drops in the middle of the body
            d.cut.discard(fid)
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True


_HTML = {"Content-Type": "text/html; charset=utf-8"}


# ---------------------------------------------------------------------------------- the authors' layouts


@pytest.fixture(scope="module")
def src() -> ResNet50:
    torch.manual_seed(11)
    m = ResNet50(num_classes=0).eval()
    with torch.no_grad():  # non-trivial BN statistics, so a mix-up of buffers would show
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m


def _authors_state(method: str, m: ResNet50) -> dict[str, torch.Tensor]:
    """The state_dict keys of the authors' modules (module docstring); the second network shares tensors."""
    trunk = m.state_dict()
    if method == "mocov2":
        q = {f"encoder_q.{k}": v for k, v in trunk.items()} | _mlp(
            "encoder_q.fc.", (2048, 2048, 128), bn=False
        )
        k_net = {k.replace("encoder_q.", "encoder_k.", 1): v for k, v in q.items()}
        queues = {"queue": torch.randn(128, 512), "val_queue": torch.randn(128, 512)}
        ptrs = {
            "queue_ptr": torch.zeros(1, dtype=torch.long),
            "val_queue_ptr": torch.zeros(1, dtype=torch.long),
        }
        return q | k_net | queues | ptrs
    if method == "byol":
        arm = (
            {f"encoder.{k}": v for k, v in trunk.items()}
            | _mlp("projector.model.", (2048, 256, 64), bn=True)
            | _mlp("predictor.model.", (64, 256, 64), bn=True)
        )
        return {f"online_network.{k}": v for k, v in arm.items()} | {
            f"target_network.{k}": v for k, v in arm.items()
        }
    return (
        {f"model.{k}": v for k, v in trunk.items()}
        | _mlp("model.projection_head.", (2048, 512, 128), bn=True)
        | {"model.prototypes.weight": torch.randn(500, 128)}  # the authors' run: 500 prototypes
    )


def _authors_checkpoint(name: str, m: ResNet50) -> dict[str, Any]:
    method = name.removesuffix("-lidc")
    if method == "spark":
        return {"arch": "resnet50", "module": dict(m.state_dict()), "is_pretrain": False}
    with pytest.MonkeyPatch.context() as mp:
        ckpt = _lightning_checkpoint(method, ResNet50(num_classes=0), mp)
    from pytorch_lightning.utilities.parsing import AttributeDict

    ckpt["hyper_parameters"] = AttributeDict(ckpt["hyper_parameters"])
    ckpt["state_dict"] = _authors_state(method, m)
    return ckpt


@pytest.fixture(scope="module")
def checkpoints(src: ResNet50, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One file per paper name, written once per module."""
    root = tmp_path_factory.mktemp("authors")
    out = {}
    for name in PAPER:
        out[name] = root / ("resnet50_1kpretrained.pth" if name == "spark-lidc" else f"{name}.ckpt")
        torch.save(_authors_checkpoint(name, src), out[name])
    return out


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture
def hf(request: pytest.FixtureRequest) -> FakeHub:
    """test_hub_remote's FakeHub as the Hugging Face endpoint, online (its `fake_hub` fixture)."""
    hub: FakeHub = request.getfixturevalue("fake_hub")
    return hub


@pytest.fixture
def drive(hf: FakeHub, monkeypatch: pytest.MonkeyPatch) -> Iterator[DriveStandIn]:
    """The Drive stand-in as $CTHUB_GDRIVE_ENDPOINT, online; the Hugging Face side is a FakeHub (no repos)."""
    d = DriveStandIn()
    monkeypatch.setenv("CTHUB_GDRIVE_ENDPOINT", d.endpoint)
    yield d
    d.close()


def _serve(drive: DriveStandIn, name: str, path: Path) -> str:
    original = load_registry()[name].original
    assert original is not None
    drive.files[original.file_id] = Served(path, path.name)
    return original.file_id


def _assert_converted(name: str, path: Path, src: ResNet50) -> None:
    """The loaded encoder holds the source's weights exactly; manifest, config and card name the origin."""
    model = from_pretrained(name)
    assert isinstance(model.fc, torch.nn.Identity)
    state = model.state_dict()
    for k, v in src.state_dict().items():
        assert torch.equal(state[k], v), k
    folder = hub_dir() / name
    record = manifest.read_manifest(hub_dir())[name]
    origin_sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["source"] == "original"
    assert record["origin"]["sha256"] == origin_sha and record["origin"]["size"] == path.stat().st_size
    assert record["sha256"] == manifest.sha256_file(folder / "model.safetensors")
    assert record["weights_digest"] == manifest.weights_digest(folder / "model.safetensors")
    entry = load_registry()[name]
    cfg = model.config
    assert cfg.provenance["origin"]["url"] == entry.original.url  # type: ignore[union-attr]
    assert cfg.provenance["citation"] == entry.citation and cfg.method == entry.method
    assert cfg.preprocessing == PreprocessConfig.from_dict(entry.preprocessing)
    card = (folder / "README.md").read_text()
    assert f"Converted by {CONVERTED_BY}" in card and entry.original.url in card  # type: ignore[union-attr]
    assert origin_sha in card and "Wolf D" in card and "Apache-2.0" in card
    assert not list((hub_dir() / ".downloads").iterdir())  # the original is deleted once converted


# -------------------------------------------------------------------------------------------------- tests


def test_from_pretrained_spark_lidc_downloads_confirms_resumes_converts_and_loads(
    drive: DriveStandIn, hf: FakeHub, checkpoints: dict[str, Path], src: ResNet50
) -> None:
    """The issue's promise, end to end: the HF repo is absent, so the authors' file is fetched through the
    redirect and the confirmation page, cut off in the middle and resumed, converted and loaded."""
    path = checkpoints["spark-lidc"]
    fid = _serve(drive, "spark-lidc", path)
    drive.cut.add(fid)
    from_pretrained("spark-lidc")
    assert ("HEAD", "/ct-ssl-hub/spark-lidc/resolve/main/config.json") in hf.requests("hub")  # HF first
    log = drive.log
    assert [s for s, _, _ in log] == ["drive", "usercontent", "usercontent", "usercontent"]
    assert log[1][1] == f"/download?id={fid}&export=download"  # the redirect; answered by the warning page
    confirmed = urllib.parse.parse_qs(urllib.parse.urlsplit(log[2][1]).query)
    assert confirmed["confirm"] == ["t"] and confirmed["uuid"][0] in drive.uuids
    size = path.stat().st_size
    assert log[2][2] is None and log[3][2] == f"bytes={size // 2}-"  # cut at half, resumed from there
    assert log[3][1] == log[2][1]  # the confirmed URL is reused, not the whole dance
    assert drive.sent[fid] == size  # every byte sent once
    _assert_converted("spark-lidc", path, src)


@pytest.mark.parametrize("name", ["byol-lidc", "swav-lidc", "mocov2-lidc"])
def test_cli_pull_converts_each_lightning_bolts_checkpoint(
    name: str,
    drive: DriveStandIn,
    checkpoints: dict[str, Path],
    src: ResNet50,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = checkpoints[name]
    _serve(drive, name, path)
    assert main(["hub", "pull", name]) == 0
    out = capsys.readouterr().out
    record = manifest.read_manifest(hub_dir())[name]
    assert record["origin"]["sha256"] in out and record["sha256"] in out and f"cthub hub push {name}" in out
    _assert_converted(name, path, src)


def test_same_origin_converts_nothing_changed_origin_is_refused_unless_allowed(
    drive: DriveStandIn,
    checkpoints: dict[str, Path],
    src: ResNet50,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    name, path = "swav-lidc", checkpoints["swav-lidc"]
    fid = _serve(drive, name, path)
    assert main(["hub", "pull", name]) == 0
    weights = hub_dir() / name / "model.safetensors"
    before = (weights.stat().st_mtime_ns, manifest.read_manifest(hub_dir())[name])
    assert main(["hub", "pull", name]) == 0  # downloaded and checked again; the same file: nothing rewritten
    assert (weights.stat().st_mtime_ns, manifest.read_manifest(hub_dir())[name]) == before

    changed = src.state_dict()
    changed["conv1.weight"] = changed["conv1.weight"] + 1e-3
    other = ResNet50(num_classes=0)
    other.load_state_dict(changed)
    replaced = tmp_path / "swav-replaced.ckpt"
    torch.save(_authors_checkpoint(name, other), replaced)
    drive.files[fid] = Served(replaced, replaced.name)
    capsys.readouterr()
    assert main(["hub", "pull", name]) == 2
    assert f"cthub hub pull {name} --allow-changed-origin" in capsys.readouterr().err
    assert (weights.stat().st_mtime_ns, manifest.read_manifest(hub_dir())[name]) == before
    shutil.rmtree(hub_dir() / name)  # the manifest still remembers the file: from_pretrained refuses too
    with pytest.raises(OriginChangedError, match="--allow-changed-origin"):
        from_pretrained(name)
    assert main(["hub", "pull", name, "--allow-changed-origin"]) == 0
    record = manifest.read_manifest(hub_dir())[name]
    assert record["origin"]["sha256"] == hashlib.sha256(replaced.read_bytes()).hexdigest()
    assert torch.equal(from_pretrained(name).conv1.weight, changed["conv1.weight"])


def test_transfer_cut_off_is_resumed_by_the_next_call(drive: DriveStandIn, tmp_path: Path) -> None:
    """Small payload: a call whose every attempt is cut keeps its bytes; the next call continues them."""
    payload = tmp_path / "payload.bin"
    payload.write_bytes(torch.randint(0, 256, (3 << 20,), dtype=torch.uint8).numpy().tobytes())
    drive.files["1smallfileid_abcdef"] = Served(payload, "payload.bin")
    drive.cut.add("1smallfileid_abcdef")
    dest = tmp_path / "out" / "payload.bin"
    url = gdrive_url("1smallfileid_abcdef")
    with pytest.raises(DownloadError, match="run the same command again to resume") as e:
        download(url, dest, attempts=1, progress=False)
    part = dest.with_name("payload.bin.part")
    assert str(part) in str(e.value) and part.stat().st_size == (3 << 20) // 2 and not dest.exists()
    got = download(url, dest, progress=False)
    assert got.resumed == 1 and got.sha256 == hashlib.sha256(payload.read_bytes()).hexdigest()
    assert dest.read_bytes() == payload.read_bytes() and not part.exists()
    # the second call starts from the link again (a confirmation's uuid is not kept) asking for the rest
    second = drive.log[3:]
    assert [s for s, _, _ in second] == ["drive", "usercontent", "usercontent"]
    assert {r for _, _, r in second} == {f"bytes={(3 << 20) // 2}-"}
    assert drive.sent["1smallfileid_abcdef"] == 3 << 20


def test_a_small_file_comes_without_confirmation(drive: DriveStandIn, tmp_path: Path) -> None:
    payload = tmp_path / "small.bin"
    payload.write_bytes(b"\x80\x02" + bytes(range(256)) * 64)
    drive.files["1tinyfileid_abcdefg"] = Served(payload, "small.bin")
    got = download(gdrive_url("1tinyfileid_abcdefg"), tmp_path / "small.out", progress=False)
    assert got.path.read_bytes() == payload.read_bytes() and got.resumed == 0
    assert [s for s, _, _ in drive.log] == ["drive", "usercontent"] and not drive.uuids


def test_a_web_page_where_a_file_was_expected_is_a_typed_error(
    drive: DriveStandIn, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    fid = _serve(drive, "byol-lidc", checkpoints["byol-lidc"])
    drive.quota.add(fid)
    with pytest.raises(NotAFileError, match="Too many users have viewed or downloaded") as e:
        from_pretrained("byol-lidc")
    msg = str(e.value)  # every place looked in, and the ways out
    assert "ct-ssl-hub/byol-lidc" in msg and "cthub hub import" in msg and "--method byol" in msg
    assert not (hub_dir() / "byol-lidc").exists()
    assert not any((hub_dir() / ".downloads").iterdir())  # nothing of the page is kept as the file
    with pytest.raises(DownloadError, match=r"HTTP 404 .*Error 404 \(Not Found\)"):
        download(gdrive_url("1nosuchfileid_abcdef"), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_offline_and_unreachable_fail_at_once_with_the_clear_error(
    drive: DriveStandIn, monkeypatch: pytest.MonkeyPatch, checkpoints: dict[str, Path]
) -> None:
    from huggingface_hub import constants

    _serve(drive, "spark-lidc", checkpoints["spark-lidc"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE is set") as e:
        from_pretrained("spark-lidc")
    assert "cthub hub pull spark-lidc" in str(e.value) and "drive.google.com/uc?export=download" in str(
        e.value
    )
    assert drive.log == []
    assert main(["hub", "pull", "spark"]) == 2

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as s:  # a closed local port: every connection is refused
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("CTHUB_GDRIVE_ENDPOINT", closed)
    with pytest.raises(DownloadError, match=r"did not answer .*\(offline, or the host is down\)"):
        from_pretrained("spark-lidc")
    assert drive.log == [] and not (hub_dir() / "spark-lidc").exists()


def test_push_publishes_the_converted_encoder_and_the_next_user_gets_it_from_the_hub(
    drive: DriveStandIn,
    hf: FakeHub,
    checkpoints: dict[str, Path],
    src: ResNet50,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from huggingface_hub import constants

    _serve(drive, "mocov2-lidc", checkpoints["mocov2-lidc"])
    assert main(["hub", "pull", "mocov2"]) == 0
    local_sha = manifest.read_manifest(hub_dir())["mocov2-lidc"]["sha256"]
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # LFS transfer (see test_hub_remote.py)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert main(["hub", "push", "mocov2-lidc", "--repo", "ct-ssl-hub/mocov2-lidc"]) == 0
    assert local_sha in capsys.readouterr().out
    tree = hf.tree("ct-ssl-hub/mocov2-lidc")
    assert hashlib.sha256(tree["model.safetensors"]).hexdigest() == local_sha
    card = tree["README.md"].decode()
    assert f"Converted by {CONVERTED_BY}" in card and "drive.google.com" in card and "Wolf D" in card

    drive.log.clear()
    monkeypatch.setenv("CTHUB_HOME", str(tmp_path / "next-user"))  # another machine: nothing converted
    model = from_pretrained("mocov2-lidc")
    assert model.config.provenance["loaded"]["from"].startswith("hf://ct-ssl-hub/mocov2-lidc@")
    assert drive.log == []  # the first source answered: the authors' host is not asked
    assert torch.equal(model.conv1.weight, src.conv1.weight)
    assert load_file(str(model.config.provenance["loaded"]["path"] + "/model.safetensors")).keys() == (
        src.state_dict().keys()
    )


def test_registry_names_the_authors_links_after_the_hub_repo(tmp_path: Path) -> None:
    reg = load_registry()
    for name in PAPER:
        e = reg[name]
        assert e.sources == ("huggingface", "original") and e.original is not None
        assert e.original.url == f"https://drive.google.com/uc?export=download&id={e.original.file_id}"
        assert e.original.layout == e.method and "Apache-2.0" in e.extra["license_note"]
    bad = json.loads(Path(reg.path).read_text())
    bad["models"]["spark-lidc"]["original"]["layout"] = "pickle"
    (tmp_path / "r.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="unknown layout 'pickle'"):
        load_registry(tmp_path / "r.json")
