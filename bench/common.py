"""What every benchmark records beside its figures: the machine it ran on and how busy it was."""

from __future__ import annotations

import os
from typing import Any

from cthub.runtime import hardware


def cpu_info() -> dict[str, Any]:
    """`cthub.runtime.hardware()` (model, cores, kernel-deciding SIMD flags, torch) with the CPU model under
    "model", and the 1-minute load average."""
    hw = hardware()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"model": hw.pop("cpu"), **hw, "load_avg_1min": load}
