"""Fine-tuning benchmarks: training throughput by precision/layout, and the brain-task 5-fold protocol.

1. Training images/s of the real fine-tune step (preprocessing + augmentation + ResNet50 + Adam) on
   OrganAMNIST at each of BENCH_SIZES (default 64 and 224 px, side by side in one run): fp32 eager
   (contiguous) vs fp32 channels_last vs bf16 autocast + channels_last. 64 px: bench/results/finetune.json
   (with 2.); other sizes: finetune-<size>px.json, fewer steps (BENCH_FT_STEPS // 3, at least 2).
2. Wall time of the paper's brain protocol (5-fold stratified CV, 10% of training for validation) on
   ../shared/data/head_ct at 224 px, with a short recipe (BENCH_FT_EPOCHS, default 2: 1 head-only + 1 full);
   the per-epoch cost is extrapolated to the paper's 70 epochs and labeled as such.

Environment: BENCH_SIZES, BENCH_FT_THREADS (default 2), BENCH_FT_STEPS (default 6), BENCH_FT_EPOCHS,
BENCH_FT_SKIP_BRAIN=1.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_SIZE = 64  # finetune.json's size; the brain protocol below runs at 224 px whatever the sizes


def train_throughput(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    size: int,
    batch: int,
    steps: int,
    amp: bool,
    channels_last: bool,
) -> float:
    """Training images/s of the fine-tune step (after one warm-up step)."""
    from ctdata.preprocess import PreprocessConfig
    from cthub.runtime import autocast
    from finetune.augment import AugmentConfig
    from finetune.train import model_inputs
    from hub.resnet import ResNet50

    torch.manual_seed(0)
    mf = torch.channels_last if channels_last else torch.contiguous_format
    model = ResNet50(num_classes=11).to(memory_format=mf).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=5e-4)
    pp, aug, g = PreprocessConfig(input_size=size), AugmentConfig(), torch.Generator().manual_seed(0)
    dev = torch.device("cpu")
    t0, n = 0.0, 0
    for i in range(steps + 1):
        if i == 1:
            t0, n = time.perf_counter(), 0
        idx = np.arange(i * batch, (i + 1) * batch) % len(images)
        x = model_inputs(images[idx], pp, aug, g).to(memory_format=mf)
        y = torch.from_numpy(labels[idx])
        with autocast(dev, amp):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += batch
    return n / (time.perf_counter() - t0)


def brain_protocol(epochs: int, threads: int) -> dict:
    from ctdata.datasets import load_labeled
    from ctdata.preprocess import PreprocessConfig
    from finetune.config import FinetuneConfig
    from finetune.protocols import run_kfold

    folder = SHARED / "head_ct"
    t0 = time.perf_counter()
    data = load_labeled(folder, preprocessing=PreprocessConfig(input_size=224), split="all", progress=False)
    load_s = time.perf_counter() - t0
    cfg = FinetuneConfig(
        image_size=224,
        epochs=epochs,
        head_epochs=min(1, epochs - 1),
        threads=threads,
        batch_size=32,
        eval_batch_size=32,
    )
    t0 = time.perf_counter()
    res = run_kfold("scratch", data, cfg, k=5, val_fraction=0.1)
    wall = time.perf_counter() - t0
    per_epoch = wall / (5 * epochs)
    return {
        "images": len(data),
        "class_counts": np.bincount(data.labels).tolist(),
        "load_s": round(load_s, 1),
        "epochs_per_fold": epochs,
        "wall_s": round(wall, 1),
        "s_per_fold_epoch": round(per_epoch, 1),
        "extrapolated_70_epochs_min": round(per_epoch * 5 * 70 / 60, 1),
        "cv_test": res["table"],
        "note": "scratch encoder, short recipe: a timing, not a result",
    }


def throughputs(images: np.ndarray, labels: np.ndarray, size: int, steps: int) -> dict:
    """Training images/s at `size` px, batch 32, by precision/layout, and their ratios to fp32 eager."""
    tp = {}
    for name, amp, cl, n in (
        ("fp32_eager", False, False, steps),
        ("fp32_channels_last", False, True, steps),
        ("bf16_channels_last", True, True, max(2, steps // 3)),
    ):
        tp[name] = round(
            train_throughput(images, labels, size=size, batch=32, steps=n, amp=amp, channels_last=cl), 2
        )
        print(f"train {size}px batch 32 {name:20s} {tp[name]:7.2f} img/s", flush=True)
    ratios = {k: round(v / tp["fp32_eager"], 2) for k, v in tp.items()}
    print(f"ratios vs fp32 eager at {size} px:", ratios, flush=True)
    return {"image_size": size, f"train_images_per_s_{size}px": tp, "ratio_vs_fp32_eager": ratios}


def main() -> dict:
    from bench.common import bench_sizes, cpu_info, result_path
    from ctdata.datasets import load_medmnist
    from cthub.runtime import cpu_has_native_bf16

    threads = int(os.environ.get("BENCH_FT_THREADS", "2"))
    steps = int(os.environ.get("BENCH_FT_STEPS", "6"))
    torch.set_num_threads(threads)
    head: dict = {"threads": threads, "cpu_native_bf16": cpu_has_native_bf16(), "torch": torch.__version__}
    npz = SHARED / "organamnist.npz"
    by_size: dict[int, dict] = {}
    for size in bench_sizes():
        res = {**head, "image_size": size, "cpu": cpu_info()}
        if npz.is_file():
            tr = load_medmnist(npz, "train")
            n = steps if size <= DEFAULT_SIZE else max(2, steps // 3)
            res.update(throughputs(tr.images[:4096], tr.labels[:4096], size, n))
        else:
            res[f"train_images_per_s_{size}px"] = "skipped: needs ../shared/data/organamnist.npz"
        by_size[size] = res
        _write(res, result_path(RESULTS, "finetune", size, DEFAULT_SIZE))  # kept if the rest is interrupted
    result = by_size.get(DEFAULT_SIZE, {**head, "image_size": None})
    if (
        DEFAULT_SIZE in by_size
        and (SHARED / "head_ct").is_dir()
        and not os.environ.get("BENCH_FT_SKIP_BRAIN")
    ):
        epochs = int(os.environ.get("BENCH_FT_EPOCHS", "2"))
        result["brain_5fold_224px"] = b = brain_protocol(epochs, threads)
        print(
            f"brain 5-fold @224px, {epochs} epochs/fold: {b['wall_s']} s "
            f"({b['s_per_fold_epoch']} s per fold-epoch; 70 epochs ≈ {b['extrapolated_70_epochs_min']} min); "
            f"test AUC {b['cv_test']['auc']}",
            flush=True,
        )
        _write(result, result_path(RESULTS, "finetune", DEFAULT_SIZE, DEFAULT_SIZE))
    result["other_sizes"] = {str(k): v for k, v in by_size.items() if k != DEFAULT_SIZE}
    return result


def _write(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
