"""What every benchmark records beside its figures: the machine it ran on and how busy it was."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cthub.runtime import hardware


def cpu_info() -> dict[str, Any]:
    """`cthub.runtime.hardware()` (model, cores, kernel-deciding SIMD flags, torch) with the CPU model under
    "model", and the 1-minute load average."""
    hw = hardware()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"model": hw.pop("cpu"), **hw, "load_avg_1min": load}


def bench_sizes(default: str = "64,224") -> list[int]:
    """The input sizes `make bench` measures side by side (BENCH_SIZES, comma-separated px; default 64 and the
    paper's 224): `BENCH_SIZES=224 python -m bench finetune pretrain export serving` runs only the 224 px
    parts."""
    raw = os.environ.get("BENCH_SIZES", default)
    sizes = [int(s) for s in raw.replace(" ", "").split(",") if s]
    if not sizes or min(sizes) < 32:
        raise ValueError(f"BENCH_SIZES must list input sizes of at least 32 px, got {raw!r}")
    return sizes


def result_path(results: Path, topic: str, size: int, default_size: int) -> Path:
    """Where a benchmark's figures at `size` go: `<topic>.json` at its default size (the file earlier runs
    wrote), `<topic>-<size>px.json` at any other."""
    return results / (f"{topic}.json" if size == default_size else f"{topic}-{size}px.json")
