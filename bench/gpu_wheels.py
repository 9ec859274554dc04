"""`make gpu-wheels`: what `make gpu-check` needs on a GPU machine that has no network, in one ignored folder.

The GPU machine (docs/gpu-check.md) is Python 3.12 with a CUDA torch and most of this project's needs
preinstalled; it cannot reach a package index and sees only the checkout plus the ignored paths a call
carries (64 MiB in all). This packs into `.gpu-check/` (ignored, carried, never committed):

- `wheels/`: the project's imports on the check's path that the image lacks (WHEELS), manylinux x86-64
  wheels for CPython 3.12, fetched with `pip download --no-deps --only-binary=:all:`;
- `data/organamnist.npz`: a stratified sample of OrganAMNIST (train/val/test, 28 px, the MedMNIST layout,
  so the same loader and HU mapping apply) from ../shared/data/organamnist.npz;
- `data/head_ct/`: the head CT slices (when ../shared/data/head_ct exists) as grey PNGs, longer side
  HEAD_CT_SIDE px, with their labels.csv;
- `MANIFEST.json`: every file with its size, and the travelling total.

It prints the sizes and fails when the checkout that would travel (tracked and untracked-not-ignored files,
plus this folder) is over the limit.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CARRY = ".gpu-check"  # the one ignored folder a `run` call names in `carry`
SHARED = ROOT.parent / "shared" / "data"
LIMIT_BYTES = 64 * 2**20  # the working tree that travels, carried paths included
PYTHON_VERSION = "3.12"
PLATFORMS = (  # as the device README gives them; pip matches each manylinux tag exactly
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
# Distributions the check imports that the GPU image lacks, pinned to the versions of this project's venv.
# pydicom: export's parity inputs (`export.data.pydicom_sources` imports pydicom.data unconditionally) and
# every DICOM read; pylibjpeg + its OpenJPEG plugin decode the two JPEG 2000 CT slices bundled with
# pydicom that the export check uses beside the classifier's own images (without them they are skipped).
WHEELS: tuple[tuple[str, str], ...] = (
    ("pydicom", "3.0.2"),
    ("pylibjpeg", "2.1.0"),
    ("pylibjpeg-openjpeg", "2.6.0"),
)
# The image's Python distributions (the device folder's KINDS.md, "Python packages already there", as read
# on 2026-11-17), normalized (lower case, '-'): what the check may import without a wheel.
IMAGE_PACKAGES = frozenset(
    """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
    certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings
    cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils
    execnet filelock
    flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
    huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
    jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
    linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
    mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
    numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
    nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
    nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
    onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
    orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
    propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
    pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
    pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
    scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
    sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
    tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
    torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
    wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp""".split()  # noqa: SIM905 -- as KINDS.md lists them
)
# Distributions the dry run imports here that neither the image lists nor WHEELS bring, and why the check
# runs without them there: each is tried by a library that does without it.
OPTIONAL_ELSEWHERE: dict[str, str] = {
    "python-gdcm": "pydicom's optional decoders: it uses those installed (JPEG 2000: pylibjpeg-openjpeg)",
    "pylibjpeg-rle": "pydicom's optional RLE decoder (RLE has a pure-Python decoder in pydicom)",
    "pyjpegls": "pydicom's optional JPEG-LS decoder (no JPEG-LS input on the check's path)",
    "imagecodecs": "pydicom's optional decoders (no input on the check's path needs it)",
    "brotli": "urllib3 decodes brotli when it is installed",
    "pytz": "pandas (on the image) imports it; pandas' own dependency below 3.0",
}
# Sample sizes: enough real images for a fine-tune of a few hundred steps at 224 px, ~2 MB at 28 px.
ORGAN_SAMPLE = {"train": 2048, "val": 256, "test": 256}
HEAD_CT_SIDE = 256


def normalize(name: str) -> str:
    """A distribution name as pip compares them (PEP 503, lower case, '-')."""
    return re.sub(r"[-_.]+", "-", name).lower()


def carry_dir(root: Path = ROOT) -> Path:
    return root / CARRY


def download_wheels(dest: Path, python: str = sys.executable) -> list[Path]:
    """`pip download` each of WHEELS for CPython 3.12 / manylinux x86-64 into `dest` (no dependencies: each
    one the image lacks is listed); stale versions of them are removed first (two versions stop the
    install)."""
    dest.mkdir(parents=True, exist_ok=True)
    wanted = {normalize(n): v for n, v in WHEELS}
    for old in dest.glob("*.whl"):
        dist, version = old.name.split("-")[:2]
        if wanted.get(normalize(dist)) != version:
            old.unlink()
    cmd = [python, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", PYTHON_VERSION, "--implementation", "cp", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    cmd += [f"{n}=={v}" for n, v in WHEELS]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    got = sorted(dest.glob("*.whl"))
    missing = [n for n in wanted if not any(normalize(w.name.split("-")[0]) == n for w in got)]
    if missing:
        raise SystemExit(f"gpu-wheels: no wheel for {missing}")
    return got


def _stratified(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of exactly `n` images (all when there are fewer), every class in its share and at least one
    of each (largest remainders), sorted."""
    labels = labels.reshape(-1)
    if n >= len(labels):
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    share = counts / counts.sum() * n
    per = np.minimum(np.maximum(1, np.floor(share).astype(int)), counts)
    for c in np.argsort(share - np.floor(share))[::-1]:
        if per.sum() >= n:
            break
        if per[c] < counts[c]:
            per[c] += 1
    idx = [
        rng.choice(np.flatnonzero(labels == c), k, replace=False) for c, k in zip(classes, per, strict=True)
    ]
    return np.sort(np.concatenate(idx))


def pack_organamnist(source: Path, dest: Path, sizes: dict[str, int] = ORGAN_SAMPLE, seed: int = 0) -> Path:
    """A stratified sample of each split of a MedMNIST npz, same keys and dtypes, compressed."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    with np.load(source) as z:
        for split, n in sizes.items():
            labels = z[f"{split}_labels"]
            idx = _stratified(labels, n, rng)
            out[f"{split}_images"] = z[f"{split}_images"][idx]
            out[f"{split}_labels"] = labels[idx]
    dest.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(dest, **out)  # type: ignore[arg-type]
    return dest


def pack_head_ct(source: Path, dest: Path, side: int = HEAD_CT_SIDE) -> Path:
    """The head CT slices as grey PNGs with the longer side `side` (aspect kept), and labels.csv as is."""
    from PIL import Image

    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for png in sorted(source.glob("*.png")):
        with Image.open(png) as im:
            grey = im.convert("L")
            scale = side / max(grey.size)
            if scale < 1:
                grey = grey.resize(
                    (round(grey.width * scale), round(grey.height * scale)), Image.Resampling.BILINEAR
                )
            grey.save(dest / png.name, optimize=True)
    shutil.copyfile(source / "labels.csv", dest / "labels.csv")
    return dest


def _git_files(root: Path, *args: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z", *args], cwd=root, capture_output=True, check=True).stdout
    return [root / p for p in out.decode().split("\0") if p]


def travelling_bytes(root: Path = ROOT) -> dict[str, int]:
    """Bytes of what a `run` call sends: tracked files, untracked files git does not ignore, the carried
    folder."""
    tracked = sum(p.stat().st_size for p in _git_files(root) if p.is_file())
    untracked = sum(
        p.stat().st_size for p in _git_files(root, "--others", "--exclude-standard") if p.is_file()
    )
    carried = sum(p.stat().st_size for p in carry_dir(root).rglob("*") if p.is_file())
    return {
        "tracked": tracked,
        "untracked": untracked,
        "carried": carried,
        "total": tracked + untracked + carried,
    }


def manifest(root: Path = ROOT) -> dict[str, Any]:
    folder = carry_dir(root)
    files = {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "MANIFEST.json"
    }
    return {
        "files": files,
        "travelling_bytes": travelling_bytes(root),
        "limit_bytes": LIMIT_BYTES,
        "wheels": [f"{n}=={v}" for n, v in WHEELS],
    }


def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(SHARED), help="the team data folder (organamnist.npz, head_ct/)")
    ap.add_argument("--no-download", action="store_true", help="pack the data sample only")
    a = ap.parse_args(argv)
    folder = carry_dir()
    shared = Path(a.shared)
    if not a.no_download:
        download_wheels(folder / "wheels")
    npz = shared / "organamnist.npz"
    if npz.is_file():
        pack_organamnist(npz, folder / "data" / "organamnist.npz")
    else:
        print(f"gpu-wheels: {npz} not found: no OrganAMNIST sample (the check then has no real data)")
    head = shared / "head_ct"
    if (head / "labels.csv").is_file():
        pack_head_ct(head, folder / "data" / "head_ct")
    else:
        print(f"gpu-wheels: {head} not found: the check skips the head CT fine-tune")
    m = manifest()
    (folder / "MANIFEST.json").write_text(json.dumps(m, indent=2) + "\n")
    for name, size in m["files"].items():
        if name.startswith("wheels/") or "/" not in name.removeprefix("data/"):
            print(f"  {mib(size):>12}  {CARRY}/{name}")
    head_files = [s for n, s in m["files"].items() if n.startswith("data/head_ct/")]
    if head_files:
        print(f"  {mib(sum(head_files)):>12}  {CARRY}/data/head_ct/ ({len(head_files)} files)")
    t = m["travelling_bytes"]
    print(
        f"travels: {mib(t['total'])} of {mib(LIMIT_BYTES)} (tracked {mib(t['tracked'])}, untracked "
        f"{mib(t['untracked'])}, {CARRY}/ {mib(t['carried'])})"
    )
    if t["total"] > LIMIT_BYTES:
        print("gpu-wheels: over the limit: carry less", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
