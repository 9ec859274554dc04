"""Pretraining throughput: each method's training step vs a plain supervised ResNet50 step on the same input
(overhead ratio), and bf16 autocast + channels_last vs fp32 eager for the supervised step.

    .venv/bin/python -m bench.bench_pretrain      (env: BENCH_SIZE=64 BENCH_BATCH=16 BENCH_STEPS=3 BENCH_THREADS=1)

A step = make the views from uint8 slices (augment + finalize) + forward + backward + optimizer step (+ EMA /
queue updates): what the training loop does per batch. Images/s counts source slices, not views.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ctdata.preprocess import PreprocessConfig, grey_to_unit
from cthub.runtime import autocast
from cthub.runtime import cpu_has_native_bf16 as cpu_has_bf16
from hub.resnet import ResNet50
from pretrain.config import build_method, config_for
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


def _timed(step, steps: int) -> float:
    step()  # warm-up (allocations, kernel selection)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def supervised_step_time(unit: torch.Tensor, size: int, steps: int, *, amp: bool, channels_last: bool) -> float:
    model = ResNet50(num_classes=11)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    pp = PreprocessConfig(input_size=size)
    g = torch.Generator().manual_seed(0)
    from pretrain.augment import ViewSpec

    spec = ViewSpec(size)
    labels = torch.arange(unit.shape[0]) % 11

    def step() -> None:
        x = make_views(unit, [spec], pp, g, CPU, channels_last)[0]
        with autocast(CPU, amp):
            loss = F.cross_entropy(model(x).float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _timed(step, steps)


def method_step_time(method: str, unit: torch.Tensor, size: int, steps: int) -> float:
    kw = {"mocov2": {"queue_size": 4096}, "swav": {"n_prototypes": 300}, "spark": {"decoder_width": 256}}
    cfg = config_for(method, "cpu-organamnist", image_size=size, batch_size=unit.shape[0], steps=10, amp=False)
    cfg.method_kwargs.update(kw.get(method, {}))
    m = build_method(cfg).to(memory_format=torch.channels_last).train()
    opt = build_optimizer(cfg.optimizer, m.param_groups(cfg.weight_decay), 0.01, cfg.weight_decay)
    specs = m.view_specs(size, False)
    pp = PreprocessConfig(input_size=size)
    g = torch.Generator().manual_seed(0)
    it = [0]

    def step() -> None:
        views = make_views(unit, specs, pp, g, CPU, True)
        loss = m(views)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        m.before_optimizer_step(it[0])
        opt.step()
        m.after_optimizer_step(it[0], 10)
        it[0] += 1

    return _timed(step, steps)


def main() -> dict:
    size = int(os.environ.get("BENCH_SIZE", "64"))
    batch = int(os.environ.get("BENCH_BATCH", "16"))
    steps = int(os.environ.get("BENCH_STEPS", "3"))
    threads = int(os.environ.get("BENCH_THREADS", "1"))  # 1: the cores are shared
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    unit = torch.from_numpy(grey_to_unit(_images(batch)))[:, None]
    res: dict = {"image_size": size, "batch": batch, "steps": steps, "threads": threads,
                 "cpu_native_bf16": cpu_has_bf16(), "torch": torch.__version__, "images_per_s": {}}
    ips = res["images_per_s"]
    t_sup = supervised_step_time(unit, size, steps, amp=False, channels_last=True)
    ips["supervised_fp32_channels_last"] = batch / t_sup
    print(f"supervised ResNet50 step (fp32, channels_last): {batch / t_sup:7.1f} img/s")
    res["overhead_vs_supervised"] = {}
    for method in ("mocov2", "swav", "byol", "spark"):
        t = method_step_time(method, unit, size, steps)
        ips[method] = batch / t
        res["overhead_vs_supervised"][method] = t / t_sup
        print(f"{method:>7}: {batch / t:7.1f} img/s   overhead x{t / t_sup:4.2f} vs supervised")
    t_fp32 = supervised_step_time(unit, size, steps, amp=False, channels_last=False)
    t_bf16 = supervised_step_time(unit, size, steps, amp=True, channels_last=True)
    ips["supervised_fp32_eager"], ips["supervised_bf16_channels_last"] = batch / t_fp32, batch / t_bf16
    res["speedup_channels_last_fp32_vs_fp32_eager"] = t_fp32 / t_sup
    res["speedup_bf16_channels_last_vs_fp32_eager"] = t_fp32 / t_bf16
    res["goal_bf16_speedup"] = 3.0
    print(f"supervised fp32 eager {batch / t_fp32:.1f} img/s | fp32 channels_last {batch / t_sup:.1f} "
          f"(x{t_fp32 / t_sup:.2f}) | bf16+channels_last {batch / t_bf16:.1f} (x{t_fp32 / t_bf16:.2f}, goal x3; "
          f"native bf16 on this CPU: {cpu_has_bf16()})")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
