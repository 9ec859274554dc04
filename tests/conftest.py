"""Shared fixtures. Tests that need ../shared/data say so with the `shared` marker and skip without it.

OrganAMNIST comes from ../shared/data when present (CI), else from the project's own MD5-checked fetch
cache; tests that need it skip only when neither is available.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach out to the Hub
# ... nor to Google Drive (the paper encoders' second source): a test that lets a pull go past the Hub meets a
# closed local port (refused at once) unless it starts its own stand-in (tests/test_hub_download.py)
os.environ.setdefault("CTHUB_GDRIVE_ENDPOINT", "http://127.0.0.1:9")
# under pytest-xdist (`make test`: one worker per core) each worker gets its share of the cores
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _WORKERS))


@pytest.fixture(autouse=True)
def _isolated_hub(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """Every test gets its own empty local hub directory, never the user's ~/.cache; removed afterwards
    (encoders published there are ~100 MB each, and a run holds hundreds of tests)."""
    home = tmp_path_factory.mktemp("cthub_home")
    monkeypatch.setenv("CTHUB_HOME", str(home))
    yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def gradio_client_temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """gradio_client stages each file it downloads in a new directory of the system temp dir and leaves it
    there (empty): tests that call a demo through it give it their own directory instead."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def shared_file(*parts: str) -> Path:
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"needs ../shared/data/{'/'.join(parts)} (present in CI)")
    return p


@pytest.fixture(scope="session")
def organamnist_npz() -> Path:
    """Real OrganAMNIST: ../shared copy, else the project's fetch cache (~/.cache/ct-ssl-hub/data)."""
    shared = SHARED_DATA / "organamnist.npz"
    if shared.is_file():
        return shared
    cached = Path.home() / ".cache" / "ct-ssl-hub" / "data" / "organamnist.npz"
    if cached.is_file():
        return cached
    pytest.skip("needs OrganAMNIST: ../shared/data/organamnist.npz or `cthub data fetch organamnist`")


def run_cli(argv: list[str]) -> tuple[int, str]:
    """`cthub ARGV` in this process: its exit code and what it printed."""
    from cthub.cli import main as cthub_main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cthub_main(argv)
    return rc, buf.getvalue()


# The suite's short real OrganAMNIST fine-tune: the recipe test_export_onnx and test_ood_shifts both need.
SHORT_ORGAN_FINETUNE = (
    "--encoder", "scratch", "--image-size", "64", "--epochs", "3", "--head-epochs", "1", "--max-train", "400",
    "--max-val", "200", "--max-test", "300", "--lr", "3e-4", "--batch-size", "32", "--backbone-lr-ratio", "1",
    "--seed", "3",
)  # fmt: skip


@pytest.fixture(scope="session")
def short_organ_classifier(
    tmp_path_factory: pytest.TempPathFactory, organamnist_npz: Path, worker_id: str
) -> Path:
    """A short real fine-tune of OrganAMNIST at 64 px by the CLI (its config records the data and split),
    made once per test run: the first pytest-xdist worker that asks trains it under a file lock, the others
    wait and reuse it (one ~80 s fine-tune less on CI's two cores). Never write into it: `copy_of` it."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = base if worker_id == "master" else base.parent  # the run's own folder, shared by its workers
    done = root / "short-organ"
    with FileLock(str(root / "short-organ.lock")):
        if not done.is_dir():
            part = root / "short-organ.partial"  # renamed when complete: a failed build is never reused
            shutil.rmtree(part, ignore_errors=True)
            argv = ["finetune", "--data", str(organamnist_npz), "--out", str(part / "clf")]
            assert run_cli([*argv, *SHORT_ORGAN_FINETUNE])[0] == 0
            part.rename(done)
    return done / "clf"  # the model is named after its folder, as the CLI names it


def copy_of(model_dir: Path, dst: Path) -> Path:
    """A writable copy of a shared fixture's model folder."""
    shutil.copytree(model_dir, dst)
    return dst


@pytest.fixture(scope="session")
def head_ct_dir() -> Path:
    return shared_file("head_ct")


@pytest.fixture(scope="session")
def ct_small_dcm() -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm", download=False))


def _with_metadata_reversed(src: Path, dst: Path) -> None:
    """`src` as another process could have written it: the same tensors, the header's `__metadata__` keys in
    the opposite order (safetensors does not fix that order, safetensors issue #584)."""
    raw = src.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8 : 8 + n])["__metadata__"]
    assert len(meta) >= 2
    as_written = json.dumps(meta, separators=(",", ":")).encode()
    reversed_ = json.dumps(dict(reversed(list(meta.items()))), separators=(",", ":")).encode()
    dst.write_bytes(raw[:8] + raw[8 : 8 + n].replace(as_written, reversed_) + raw[8 + n :])


@pytest.fixture
def with_metadata_reversed() -> Callable[[Path, Path], None]:
    """Rewrite a safetensors file (src, dst) with its metadata keys in the opposite order."""
    return _with_metadata_reversed
