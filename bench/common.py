"""What every benchmark records beside its figures: the CPU it ran on and how busy the machine was."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

FLAGS_OF_INTEREST = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_bf16",
    "avx512_vnni",
    "avx_vnni",
    "amx_bf16",
    "amx_tile",
    "f16c",
)


def cpu_info() -> dict[str, Any]:
    """Model name, core count, the SIMD flags that decide kernel speed, and the 1-minute load average."""
    model, flags = platform.processor() or "unknown", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("unknown", "", platform.processor()):
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "model": model,
        "cores": os.cpu_count(),
        "flags": sorted(f for f in FLAGS_OF_INTEREST if f in flags),
        "load_avg_1min": load,
    }
