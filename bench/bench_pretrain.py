"""Pretraining throughput on this CPU, measured side by side in one run:

- per method: images/s of a full training step (views from uint8 slices + forward + backward + optimizer +
  EMA/queue), split into view building and compute, with views built on the training thread and with the
  trainer's prefetch thread; overhead vs a plain supervised ResNet50 step on the same input;
- the top operators of one step per method (torch.profiler), so the cost is visible where it sits;
- one 2-thread process vs two 1-thread processes side by side (aggregate images/s of the supervised step),
  which decides how `make pretrain` and `make study` use the two cores.

    .venv/bin/python -m bench pretrain     (env: BENCH_SIZES=64,224 BENCH_BATCH=64 BENCH_STEPS=3)

At 64 px (bench/results/pretrain.json) all of the above. At every other size of BENCH_SIZES (default 224,
the paper's; bench/results/pretrain-<size>px.json) the serial step of the supervised baseline and of
BENCH_LARGE_METHODS (default spark) only, at batch BENCH_LARGE_BATCH (default 16) for BENCH_LARGE_STEPS
(default 2) steps after a warm-up: a 224 px step costs ~12x a 64 px one.

Images/s counts source slices, not views. Every step runs in fp32 (the methods' and the supervised one), so
the ratios measure the methods' extra work, not a precision; `bench finetune` compares bf16 with fp32.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import cpu_info
from ctdata.preprocess import PreprocessConfig, grey_to_unit
from hub.resnet import ResNet50
from pretrain.augment import ViewSpec
from pretrain.base import to_channels_last
from pretrain.config import METHODS, build_method, config_for
from pretrain.data import make_views
from pretrain.optim import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "pretrain.json"
CPU = torch.device("cpu")


def _images(n: int) -> np.ndarray:
    npz = ROOT.parent / "shared" / "data" / "organamnist.npz"
    if npz.is_file():
        with np.load(npz) as z:
            return np.asarray(z["train_images"][:n])
    return np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8)


class Stepper:
    """One method's (or the supervised baseline's) training step with separately timed parts."""

    def __init__(self, method: str, unit: torch.Tensor, size: int) -> None:
        self.unit, self.size, self.it = unit, size, 0
        self.g = torch.Generator().manual_seed(0)
        self.pp = PreprocessConfig(input_size=size)
        if method == "supervised":
            self.model: torch.nn.Module = to_channels_last(ResNet50(num_classes=11)).train()
            self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-4)
            self.specs = [ViewSpec(size)]
            self.labels = torch.arange(unit.shape[0]) % 11
            self.supervised = True
        else:
            cfg = config_for(method, "cpu-organamnist", image_size=size, batch_size=unit.shape[0], amp=False)
            self.model = to_channels_last(build_method(cfg)).train()
            self.opt = build_optimizer(
                cfg.optimizer, self.model.param_groups(cfg.weight_decay), 1e-3, cfg.weight_decay
            )
            self.specs = self.model.view_specs(size, False)
            self.supervised = False

    def views(self) -> list[torch.Tensor]:
        return make_views(self.unit, self.specs, self.pp, self.g, CPU, True)

    def compute(self, views: list[torch.Tensor]) -> None:
        loss = F.cross_entropy(self.model(views[0]), self.labels) if self.supervised else self.model(views)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if not self.supervised:
            self.model.before_optimizer_step(self.it)
        self.opt.step()
        if not self.supervised:
            self.model.after_optimizer_step(self.it, 1000)
        self.it += 1


def _timed(fn: Callable[[], Any], steps: int) -> float:
    fn()  # warm-up: allocations, kernel selection
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def measure_serial(method: str, unit: torch.Tensor, size: int, steps: int) -> dict[str, Any]:
    """Images/s of the serial step only (views built on the training thread), for the large sizes."""
    s = Stepper(method, unit, size)
    t_serial = _timed(lambda: s.compute(s.views()), steps)
    return {"images_per_s_serial": unit.shape[0] / t_serial}


def measure_method(method: str, unit: torch.Tensor, size: int, steps: int) -> dict[str, Any]:
    s = Stepper(method, unit, size)
    t_views = _timed(s.views, steps)
    v = s.views()
    t_compute = _timed(lambda: s.compute(v), steps)
    t_serial = _timed(lambda: s.compute(s.views()), steps)
    pool = ThreadPoolExecutor(max_workers=1)
    pending = [pool.submit(s.views)]

    def prefetched() -> None:
        views = pending[0].result()
        pending[0] = pool.submit(s.views)
        s.compute(views)

    t_prefetch = _timed(prefetched, steps)
    pending[0].result()
    pool.shutdown()
    b = unit.shape[0]
    return {
        "views_s": t_views,
        "compute_s": t_compute,
        "images_per_s_serial": b / t_serial,
        "images_per_s_prefetch": b / t_prefetch,
        "views_share": t_views / t_serial,
        "top_ops": profile_step(s),
    }


def profile_step(s: Stepper, top: int = 8) -> list[dict[str, Any]]:
    """The operators of one serial step with the largest self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        s.compute(s.views())
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    total = sum(e.self_cpu_time_total for e in prof.key_averages()) or 1
    return [
        {
            "op": e.key,
            "self_ms": round(e.self_cpu_time_total / 1000, 1),
            "share": round(e.self_cpu_time_total / total, 3),
        }
        for e in rows
    ]


def _supervised_ips(threads: int, size: int, batch: int, steps: int) -> float:
    torch.set_num_threads(threads)
    unit = torch.from_numpy(grey_to_unit(_images(batch)))[:, None]
    s = Stepper("supervised", unit, size)
    return batch / _timed(lambda: s.compute(s.views()), steps)


def threads_layout(size: int, batch: int, steps: int) -> dict[str, float]:
    """Aggregate supervised images/s: one 2-thread process vs two 1-thread processes at the same time."""
    code = (
        f"from bench.bench_pretrain import _supervised_ips; "
        f"print(_supervised_ips({{t}}, {size}, {batch}, {steps}))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(threads: int, n: int) -> float:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code.format(t=threads)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(n)
        ]
        return sum(float(p.communicate()[0].strip().splitlines()[-1]) for p in procs)

    one = run(2, 1)
    two = run(1, 2)
    return {"one_process_2_threads": one, "two_processes_1_thread": two, "ratio_two_by_one": two / one}


DEFAULT_SIZE = 64


def main() -> dict:
    from bench.common import bench_sizes, result_path

    sizes = bench_sizes()
    if os.environ.get("BENCH_SIZE"):  # the older single-size setting
        sizes = [int(os.environ["BENCH_SIZE"])]
    torch.set_num_threads(1)
    by_size = {}
    for size in sizes:
        res = measure_size(size) if size == DEFAULT_SIZE else measure_large(size)
        path = result_path(RESULTS.parent, "pretrain", size, DEFAULT_SIZE)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=2) + "\n")
        by_size[size] = res
    result = by_size.get(DEFAULT_SIZE, {"image_size": None})
    result["other_sizes"] = {str(k): v for k, v in by_size.items() if k != DEFAULT_SIZE}
    return result


def _header(size: int, batch: int, steps: int) -> dict[str, Any]:
    return {
        "image_size": size,
        "batch": batch,
        "steps": steps,
        "threads": 1,
        "precision": "fp32",
        "cpu": cpu_info(),
        "torch": torch.__version__,
        "methods": {},
    }


def measure_large(size: int) -> dict[str, Any]:
    """Serial images/s of the supervised step and of BENCH_LARGE_METHODS at `size` px, side by side."""
    batch = int(os.environ.get("BENCH_LARGE_BATCH", "16"))
    steps = int(os.environ.get("BENCH_LARGE_STEPS", "2"))
    methods = [m for m in os.environ.get("BENCH_LARGE_METHODS", "spark").split(",") if m]
    torch.manual_seed(0)
    unit = torch.from_numpy(grey_to_unit(_images(batch)))[:, None]
    res = _header(size, batch, steps)
    res["supervised"] = sup = measure_serial("supervised", unit, size, steps)
    print(
        f"{'supervised':>10} {sup['images_per_s_serial']:8.2f} img/s serial "
        f"(1 thread, {size} px, batch {batch})"
    )
    for method in methods:
        r = measure_serial(method, unit, size, steps)
        r["overhead_vs_supervised"] = sup["images_per_s_serial"] / r["images_per_s_serial"]
        res["methods"][method] = r
        print(
            f"{method:>10} {r['images_per_s_serial']:8.2f} img/s serial, "
            f"{r['overhead_vs_supervised']:.2f}x supervised"
        )
    res["cpu"]["load_avg_1min_after"] = os.getloadavg()[0]
    return res


def measure_size(size: int) -> dict[str, Any]:
    batch = int(os.environ.get("BENCH_BATCH", "64"))
    steps = int(os.environ.get("BENCH_STEPS", "3"))
    torch.manual_seed(0)
    unit = torch.from_numpy(grey_to_unit(_images(batch)))[:, None]
    res = _header(size, batch, steps)
    sup = measure_method("supervised", unit, size, steps)
    res["supervised"] = sup
    print(
        f"{'':>10} {'serial':>8} {'prefetch':>9} {'views':>6} {'vs supervised':>14}   "
        f"(img/s, 1 thread, {size} px)"
    )
    print(
        f"{'supervised':>10} {sup['images_per_s_serial']:8.1f} {sup['images_per_s_prefetch']:9.1f} "
        f"{sup['views_share']:6.0%}"
    )
    for method in METHODS:
        r = measure_method(method, unit, size, steps)
        r["overhead_vs_supervised"] = sup["images_per_s_serial"] / r["images_per_s_serial"]
        res["methods"][method] = r
        print(
            f"{method:>10} {r['images_per_s_serial']:8.1f} {r['images_per_s_prefetch']:9.1f} "
            f"{r['views_share']:6.0%} {r['overhead_vs_supervised']:13.2f}x   top op: {r['top_ops'][0]['op']}"
        )
    res["threads_layout"] = threads_layout(size, batch, steps)
    t = res["threads_layout"]
    print(
        f"supervised, aggregate img/s: 1 process x 2 threads {t['one_process_2_threads']:.1f} | "
        f"2 processes x 1 thread {t['two_processes_1_thread']:.1f} (x{t['ratio_two_by_one']:.2f})"
    )
    return res


if __name__ == "__main__":
    main()
