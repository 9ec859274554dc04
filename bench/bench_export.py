"""ONNX Runtime fp32 vs torch eager (contiguous and channels_last): ResNet50 classifier inference at 224 px.

    .venv/bin/python -m bench.bench_export [--size 224] [--batches 1 16] [--seconds 6] [--threads 2]

Exports a fresh 11-class ResNet50 (random weights: speed does not depend on them) with `export_onnx`, checks
parity on real CT DICOMs, then times each engine on the same real preprocessed slices. Writes
bench/results/export.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from ctdata.preprocess import PreprocessConfig
from export import OnnxClassifier, export_onnx
from export.exporter import parity_batch, sample_sources
from hub import ModelConfig, ResNet50, save_pretrained
from hub.io import load_dir

RESULTS = Path(__file__).resolve().parent / "results" / "export.json"


def images_per_s(fn: Callable[[], object], batch: int, seconds: float, min_iters: int = 3) -> float:
    """Throughput after one warm-up call: at least `min_iters` calls and about `seconds` of timing."""
    fn()
    n, t0 = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n * batch / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--seconds", type=float, default=6.0, help="timing per engine and batch size")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args([] if argv is None else argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        cfg = ModelConfig(
            name="bench-resnet50",
            num_classes=11,
            labels=[f"organ_{i}" for i in range(11)],
            preprocessing=PreprocessConfig(input_size=args.size),
        )
        model_dir = save_pretrained(ResNet50(num_classes=11), Path(tmp) / "m", cfg)
        print(f"exporting ResNet50 at {args.size} px ...", file=sys.stderr, flush=True)
        report = export_onnx(model_dir)
        print(report.summary(), file=sys.stderr, flush=True)
        clf = OnnxClassifier(report.path, threads=args.threads)
        model = load_dir(model_dir).eval()
        model_cl = load_dir(model_dir).eval().to(memory_format=torch.channels_last)
        real, _ = parity_batch(cfg.preprocessing, sample_sources())
        rows = []
        for b in args.batches:
            x = real[torch.arange(b) % len(real)].contiguous()  # real slices, repeated to fill the batch
            x_cl = x.to(memory_format=torch.channels_last)
            engines = {
                "torch_eager": lambda x=x: _torch(model, x),
                "torch_channels_last": lambda x_cl=x_cl: _torch(model_cl, x_cl),
                "ort_fp32": lambda x=x: clf.logits(x),
            }
            row: dict[str, float | int] = {"batch": b}
            for name, fn in engines.items():
                print(f"  batch {b:>2}: timing {name} ...", file=sys.stderr, flush=True)
                row[name] = round(images_per_s(fn, b, args.seconds), 2)
            row["ort_vs_eager"] = round(row["ort_fp32"] / row["torch_eager"], 2)
            row["ort_vs_channels_last"] = round(row["ort_fp32"] / row["torch_channels_last"], 2)
            rows.append(row)
    result = {
        "size": args.size,
        "threads": args.threads,
        "providers": clf.providers,
        "parity_max_abs_diff": report.max_abs_diff,
        "onnx_mb": report.size_mb,
        "export_seconds": report.seconds,
        "images_per_s": rows,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print(f"\nResNet50 {args.size} px, {args.threads} threads, images/s ({', '.join(clf.providers)}):")
    print(f"{'batch':>5} {'eager':>8} {'ch_last':>8} {'ORT fp32':>9} {'ORT/eager':>10} {'ORT/ch_last':>12}")
    for r in rows:
        print(
            f"{r['batch']:>5} {r['torch_eager']:>8} {r['torch_channels_last']:>8} {r['ort_fp32']:>9} "
            f"{r['ort_vs_eager']:>9}x {r['ort_vs_channels_last']:>11}x"
        )
    print(
        f"parity max |Δ logits| {report.max_abs_diff:.2e}; export {report.seconds} s, {report.size_mb} MB; "
        f"1-min load average before/after {result['load_avg_1min']} on {os.cpu_count()} CPUs "
        "(figures are only comparable on an otherwise idle machine)"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _torch(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


if __name__ == "__main__":
    main(sys.argv[1:])
