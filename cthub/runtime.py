"""Device selection, mixed precision and thread settings shared by training, export and serving."""

from __future__ import annotations

import contextlib
import os
import platform
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The CPU flags that decide which kernels oneDNN, MKL and ATen pick, hence both speed and the exact bits of a
# result: runs of one recipe give the same weights only on CPUs that agree on these (docs/results/README.md).
KERNEL_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512_bf16",
    "avx512_vnni",
    "avx512_fp16",
    "avx_vnni",
    "amx_bf16",
    "amx_int8",
    "amx_tile",
)
# Settings of the environment that change which kernels run (oneDNN's ISA cap, MKL's code path).
KERNEL_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")


def select_device(device: str | None = None) -> torch.device:
    """`device` if given ("cpu", "cuda", "cuda:1", "mps"), else CUDA when available, else CPU."""
    if device and device != "auto":
        return torch.device(device)
    env = os.environ.get("CTHUB_DEVICE")
    if env:
        return torch.device(env)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def cpu_has_native_bf16() -> bool:
    """True when oneDNN reports hardware bf16 (AVX512-BF16 or AMX). Without it (AVX2-only CPUs such as this
    project's 2-core machines) torch emulates bf16 and autocast makes ResNet50 training ~10x slower."""
    # torch has no public query for this (torch.cpu's own checks are private too, and CPU flags would be a
    # second copy of oneDNN's rule): this function is the project's one adapter around the private op.
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_amp(amp: bool | None, device: torch.device) -> bool:
    """An explicit choice wins; None (auto): AMP on CUDA, bf16 autocast only on CPUs with native bf16."""
    if amp is not None:
        return bool(amp)
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


def autocast(device: torch.device, enabled: bool | None = None) -> contextlib.AbstractContextManager:
    """bf16 autocast on CPU, fp16/bf16 AMP on CUDA; `None` decides by `resolve_amp`; no-op when off."""
    if not resolve_amp(enabled, device):
        return contextlib.nullcontext()
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    if device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def precision_label(device: torch.device, amp: bool) -> str:
    """What a run's arithmetic was, for cards and study records ("cpu fp32", "cpu autocast (bf16/fp16)")."""
    return f"{device.type} " + ("autocast (bf16/fp16)" if amp else "fp32")


def hardware() -> dict[str, Any]:
    """The machine a result was computed on, for cards, study records and benchmarks: CPU model,
    architecture, core count, the kernel-deciding SIMD flags it has, the environment settings that override
    them, torch's version and (when present) the CUDA device."""
    model, flags = platform.processor() or "unknown", set[str]()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("unknown", "", platform.processor()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    info: dict[str, Any] = {
        "cpu": model,
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "flags": [f for f in KERNEL_FLAGS if f in flags],
        "torch": torch.__version__,
    }
    env = {k: os.environ[k] for k in KERNEL_ENV if os.environ.get(k)}
    if env:
        info["kernel_env"] = env
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def needs_grad_scaler(device: torch.device, amp: bool) -> bool:
    """fp16 AMP on CUDA needs a GradScaler; bf16 does not."""
    return amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (None leaves it alone)."""
    if not n:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def isolated_seed(seed: int) -> Iterator[None]:
    """Run the block with torch's CPU generator seeded to `seed`, then give the caller's generator its state
    back: a library function (a random-init baseline, a probe) is reproducible without reseeding its caller.
    For what cannot take a local `torch.Generator`, such as the default initialisation of `nn` layers."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch Generator seeded the same for samplers."""

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def torch_save_atomic(obj: object, path: Path) -> None:
    """`torch.save` to a temporary file beside `path`, then rename: a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
