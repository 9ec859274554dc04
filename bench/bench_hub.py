"""Cold `from_pretrained` of a ResNet50 from the local hub vs `torch.load` of the same weights as a `.pth`.

Each measurement runs in a fresh Python process (torch and the package already imported, then one timed
call), so "cold" means: first model build and first load in the process; the file itself is in the OS page
cache (the file was just written; dropping caches would disturb the other jobs on this machine).
Figures: median of `--repeats` processes. Goal from the issue: from_pretrained <= 0.3 s and faster than
torch.load.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "hub.json"

SNIPPETS = {
    # the hub path: resolve name, sha256-verify, meta-device build, safetensors load, assign
    "from_pretrained": "import hub, time; t=time.perf_counter(); m=hub.from_pretrained('bench-resnet50'); "
    "print(time.perf_counter()-t)",
    # weights only, as a .pth (weights_only=True, the safe default)
    "torch_load_pth": "import torch, time; t=time.perf_counter(); sd=torch.load(P, weights_only=True); "
    "print(time.perf_counter()-t)",
    # what a .pth user needs to get a model: torch.load + random-initialised ResNet50 + load_state_dict
    "torch_load_pth_into_model": "import torch, time; from hub.resnet import ResNet50; "
    "t=time.perf_counter(); sd=torch.load(P, weights_only=True); m=ResNet50(); "
    "m.load_state_dict(sd); print(time.perf_counter()-t)",
    # the load before this change: random init on CPU, then copy (no checksum)
    "old_hub_path_no_verify": "import time, torch; from safetensors.torch import load_file; "
    "from hub.resnet import ResNet50; t=time.perf_counter(); "
    "sd=load_file(W); m=ResNet50(); m.load_state_dict(sd); "
    "print(time.perf_counter()-t)",
    # the sha256 check alone (part of from_pretrained)
    "sha256_only": "import time; from hub.manifest import sha256_file; t=time.perf_counter(); "
    "sha256_file(W); print(time.perf_counter()-t)",
}


def _run(code: str, env: dict[str, str], pth: Path, weights: Path) -> float:
    prelude = f"P={str(pth)!r}; W={str(weights)!r}; import torch; torch.set_num_threads(2); "
    out = subprocess.run(
        [sys.executable, "-c", prelude + code], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def main(repeats: int = 5) -> dict:
    import torch

    from hub import ModelConfig, ResNet50, publish_local

    with tempfile.TemporaryDirectory(prefix="bench-hub-") as tmp:
        env = {**os.environ, "CTHUB_HOME": tmp, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        os.environ["CTHUB_HOME"] = tmp
        torch.manual_seed(0)
        model = ResNet50()
        folder = publish_local(model, "bench-resnet50", ModelConfig(name="bench-resnet50", method="random"))
        pth = Path(tmp) / "resnet50.pth"
        torch.save(model.state_dict(), pth)
        weights = folder / "model.safetensors"
        times: dict[str, list[float]] = {k: [] for k in SNIPPETS}
        for i in range(repeats):
            for name, code in SNIPPETS.items():
                times[name].append(_run(code, env, pth, weights))
            print(f"  run {i + 1}/{repeats} done", file=sys.stderr, flush=True)
    med = {k: round(statistics.median(v), 4) for k, v in times.items()}
    result = {
        "median_s": med,
        "all_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "ratio_from_pretrained_over_torch_load": round(med["from_pretrained"] / med["torch_load_pth"], 3),
        "ratio_from_pretrained_over_torch_load_into_model": round(
            med["from_pretrained"] / med["torch_load_pth_into_model"], 3
        ),
        "goal_le_0.3s": med["from_pretrained"] <= 0.3,
        "weights_mb": round(weights.stat().st_size / 2**20, 1) if weights.exists() else 94.0,
        "repeats": repeats,
        "threads": 2,
        "torch": torch.__version__,
        "note": "fresh process per call, file in page cache; from_pretrained includes sha256 verification",
    }
    print(f"{'path':28} {'median s':>9}")
    for k, v in med.items():
        print(f"{k:28} {v:9.3f}")
    print(
        f"from_pretrained / torch.load(.pth)              = {result['ratio_from_pretrained_over_torch_load']}"
    )
    print(
        f"from_pretrained / torch.load + build + load_sd  = "
        f"{result['ratio_from_pretrained_over_torch_load_into_model']}"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
