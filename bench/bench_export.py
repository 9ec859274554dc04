"""ResNet50 classifier inference at 224 px, side by side in one run: torch eager, torch channels_last, ONNX
Runtime fp32 and ONNX Runtime int8 (static QDQ, per-channel weights), at batch 1 and 16.

    .venv/bin/python -m bench.bench_export [--sizes 64,224] [--batches 1 16] [--seconds 6] [--threads 2]
                                           [--calibration-images 64] [--sweep] [--model DIR]

Every size of --sizes (default BENCH_SIZES, else 64 and 224) is measured in turn in the one run: 224 px
into bench/results/export.json (the file's earlier size), any other into export-<size>px.json.

Exports an 11-class ResNet50 with `export_onnx` (random weights unless --model: speed does not depend on
them; parity is checked on real CT slices) at each size, quantizes it with `export.quantize.quantize_file`
calibrated on real OrganAMNIST training images (pydicom's CT slices without them), and times every engine
through the same `OnnxClassifier` serving uses, on the same real preprocessed slices. Reports images/s,
achieved GFLOP/s (ResNet50 ≈ 8.2 GFLOP per 224 px image, scaled by (size/224)²), the ratios the goals are
stated in (ORT fp32 ≥ 2.5x torch eager, int8 ≥ 2x ORT fp32) and the CPU's SIMD flags. `--sweep` also
times what was tried: ORT graph optimization levels, QOperator instead of QDQ, per-tensor weights,
reduce_range, int8 activations.
With `--model DIR` (a fine-tuned classifier with its data) the int8 file is made by `quantize_int8`, whose
ΔAUC / ΔF1 / agreement are reported. Writes bench/results/export.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import bench_sizes, cpu_info, result_path
from ctdata.datasets import load_medmnist
from ctdata.preprocess import PreprocessConfig, prepare_batch
from export import Int8Tolerance, OnnxClassifier, QuantSettings, export_onnx, quantize_int8
from export.data import prepare_files, pydicom_sources
from export.integrity import INT8_NAME, ONNX_NAME
from export.quantize import quantize_file
from export.session import quiet_onnxruntime_process
from hub import ModelConfig, ResNet50, save_pretrained
from hub.io import load_dir

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "export.json"
DEFAULT_SIZE = 224  # export.json's size
GFLOP_224 = 8.2  # ResNet50 forward, multiply-adds counted as 2 FLOPs
GOALS = {"ort_fp32_vs_eager": 2.5, "ort_int8_vs_fp32": 2.0}
ENGINES = ("torch_eager", "torch_channels_last", "ort_fp32", "ort_int8")
SWEEP_INT8: dict[str, dict[str, Any]] = {
    "qoperator": {"quant_format": "qoperator"},
    "per_tensor": {"per_channel": False},
    "reduce_range": {"reduce_range": True},
    "s8_activations": {"activation_type": "int8"},
    "stem_int8": {"keep_stem_fp32": False},
}


def images_per_s(fn: Callable[[], object], batch: int, seconds: float, min_iters: int = 3) -> float:
    """Throughput after one warm-up call: at least `min_iters` calls and about `seconds` of timing."""
    fn()
    n, t0 = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n * batch / (time.perf_counter() - t0)


def organamnist() -> Path | None:
    """OrganAMNIST beside the checkout (../shared/data) or in the project's fetch cache."""
    for p in (
        ROOT.parent / "shared" / "data" / "organamnist.npz",
        Path.home() / ".cache/ct-ssl-hub/data/organamnist.npz",
    ):
        if p.is_file():
            return p
    return None


def real_images(pp: PreprocessConfig, n: int) -> tuple[np.ndarray, str]:
    """`n` real preprocessed slices: OrganAMNIST training images, else pydicom's CT slices repeated."""
    npz = organamnist()
    if npz is not None:
        train = load_medmnist(npz, "train")
        pick = np.random.default_rng(0).choice(len(train), n, replace=False)
        return prepare_batch(train.images[pick], pp).numpy(), f"{npz.name} train"
    files, names = prepare_files(pp, pydicom_sources())
    assert files is not None
    return files.numpy()[np.arange(n) % len(files)], ", ".join(names)


def random_model_dir(root: Path, size: int) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(
        name="bench-resnet50",
        num_classes=11,
        labels=[f"organ_{i}" for i in range(11)],
        preprocessing=PreprocessConfig(input_size=size),
    )
    return save_pretrained(ResNet50(num_classes=11), root / "m", cfg)


def _torch(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


def time_engines(
    engines: dict[str, Callable[[np.ndarray], object]], inputs: np.ndarray, batches: list[int], seconds: float
) -> list[dict[str, Any]]:
    """images/s of every engine at every batch size, on real slices repeated to fill the batch."""
    rows = []
    for b in batches:
        x = np.ascontiguousarray(inputs[np.arange(b) % len(inputs)])
        row: dict[str, Any] = {"batch": b}
        for name, run in engines.items():
            print(f"  batch {b:>2}: timing {name} ...", file=sys.stderr, flush=True)
            row[name] = round(images_per_s(lambda run=run, x=x: run(x), b, seconds), 2)
        rows.append(row)
    return rows


def add_ratios(rows: list[dict[str, Any]], gflop: float) -> None:
    for r in rows:
        r["ort_fp32_vs_eager"] = round(r["ort_fp32"] / r["torch_eager"], 2)
        r["ort_fp32_vs_channels_last"] = round(r["ort_fp32"] / r["torch_channels_last"], 2)
        r["ort_int8_vs_fp32"] = round(r["ort_int8"] / r["ort_fp32"], 2)
        r["gflop_per_s"] = {k: round(r[k] * gflop, 1) for k in ENGINES if k in r}
        r["goals_met"] = {k: r[k] >= v for k, v in GOALS.items()}


def sweep(
    fp32_path: Path,
    calib: np.ndarray,
    pp: PreprocessConfig,
    x: np.ndarray,
    threads: int,
    seconds: float,
    work: Path,
) -> dict[str, Any]:
    """What else was tried, at the largest batch: ORT optimization levels (fp32) and int8 variants."""
    out: dict[str, Any] = {"batch": len(x), "fp32_optimization": {}, "int8": {}}
    for level in ("basic", "extended", "all"):
        clf = OnnxClassifier(fp32_path, threads=threads, optimization=level)
        out["fp32_optimization"][level] = round(images_per_s(lambda c=clf: c.logits(x), len(x), seconds), 2)
    for name, change in SWEEP_INT8.items():
        print(f"  sweep: int8 {name} ...", file=sys.stderr, flush=True)
        path = work / f"{name}.onnx"
        settings = QuantSettings(calibration_images=len(calib), **change)
        quantize_file(fp32_path, path, calib, pp, settings, work)
        clf = OnnxClassifier(path, threads=threads, verify=False)
        out["int8"][name] = round(images_per_s(lambda c=clf: c.logits(x), len(x), seconds), 2)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--sizes", default=None, help="input sizes, comma-separated (default BENCH_SIZES or 64,224)"
    )
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--seconds", type=float, default=6.0, help="timing per engine and batch size")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--calibration-images", type=int, default=64)
    ap.add_argument("--sweep", action="store_true", help="also time optimization levels and int8 variants")
    ap.add_argument("--model", default=None, help="a fine-tuned classifier folder (with its data) instead")
    args = ap.parse_args([] if argv is None else argv)
    quiet_onnxruntime_process()
    torch.set_num_threads(args.threads)
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else bench_sizes()
    if args.model:  # a fine-tuned classifier has its own size
        sizes = [ModelConfig.load(args.model).preprocessing.input_size]
    by_size = {}
    for size in sizes:
        res = measure_size(args, size)
        print_table(res)
        path = result_path(RESULTS.parent, "export", size, DEFAULT_SIZE)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=2) + "\n")
        by_size[size] = res
    result = by_size.get(DEFAULT_SIZE) or by_size[sizes[0]]
    result["other_sizes"] = {str(k): v for k, v in by_size.items() if v is not result}
    return result


def measure_size(args: argparse.Namespace, size: int) -> dict[str, Any]:
    """Export, quantize and time every engine at `size` px (or the --model classifier at its own size)."""
    cpu_before = cpu_info()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.model:
            model_dir = Path(shutil.copytree(args.model, work / "m"))
            for name in (ONNX_NAME, INT8_NAME):
                for p in (model_dir / name, model_dir / f"{name}.sha256"):
                    p.unlink(missing_ok=True)
        else:
            model_dir = random_model_dir(work, size)
        pp = ModelConfig.load(model_dir).preprocessing
        print(f"exporting ResNet50 at {pp.input_size} px ...", file=sys.stderr, flush=True)
        report = export_onnx(model_dir, parity_images=32, ood_images=0, threads=args.threads)
        print(report.summary(), file=sys.stderr, flush=True)
        fp32_path = model_dir / ONNX_NAME
        calib, calib_source = real_images(pp, args.calibration_images)
        t0 = time.perf_counter()
        int8_report = None
        if args.model:
            int8_report = quantize_int8(
                model_dir,
                settings=QuantSettings(calibration_images=args.calibration_images),
                eval_images=1000,
                ood_images=0,
                tolerance=Int8Tolerance(max_auc_drop=1.0),  # measure; the export command enforces
                threads=args.threads,
            )
            int8_clf = OnnxClassifier.from_model_dir(model_dir, "int8", threads=args.threads)
        else:
            quantize_file(fp32_path, model_dir / INT8_NAME, calib, pp, QuantSettings(), work)
            int8_clf = OnnxClassifier(model_dir / INT8_NAME, threads=args.threads, verify=False)
        quant_seconds = time.perf_counter() - t0
        fp32_clf = OnnxClassifier.from_model_dir(model_dir, threads=args.threads)
        model = load_dir(model_dir).eval()
        model_cl = load_dir(model_dir).eval().to(memory_format=torch.channels_last)
        inputs, _ = real_images(pp, 16)
        engines: dict[str, Callable[[np.ndarray], object]] = {
            "torch_eager": lambda x: _torch(model, torch.from_numpy(x)),
            "torch_channels_last": lambda x: _torch(
                model_cl, torch.from_numpy(x).to(memory_format=torch.channels_last)
            ),
            "ort_fp32": fp32_clf.logits,
            "ort_int8": int8_clf.logits,
        }
        gflop = GFLOP_224 * (pp.input_size / 224) ** 2
        rows = time_engines(engines, inputs, args.batches, args.seconds)
        add_ratios(rows, gflop)
        agreement = float(np.mean(fp32_clf.logits(inputs).argmax(1) == int8_clf.logits(inputs).argmax(1)))
        swept = None
        if args.sweep:
            x = np.ascontiguousarray(inputs[np.arange(max(args.batches)) % len(inputs)])
            swept = sweep(fp32_path, calib, pp, x, args.threads, args.seconds, work)
        sizes = {
            k: round(p.stat().st_size / 2**20, 1)
            for k, p in (("fp32", fp32_path), ("int8", model_dir / INT8_NAME))
        }
    result: dict[str, Any] = {
        "size": pp.input_size,
        "threads": args.threads,
        "model": args.model or "random weights (speed does not depend on them)",
        "providers": fp32_clf.providers,
        "gflop_per_image": round(gflop, 2),
        "images_per_s": rows,
        "goals": GOALS,
        "parity": {k: v for k, v in report.to_dict().items() if k.startswith(("max_abs", "top1", "parity"))},
        "export_seconds": report.export_seconds,
        "exporter": report.exporter,
        "quantize_seconds": round(quant_seconds, 1),
        "calibration": {"images": len(calib), "source": calib_source},
        "int8_settings": asdict(QuantSettings()) | {"format": "QDQ"},
        "int8_top1_agreement_on_timing_inputs": agreement,
        "int8_accuracy": int8_report.to_dict() if int8_report else None,
        "sweep": swept,
        "onnx_mb": sizes,
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "cpu": cpu_before | {"load_avg_1min_after": os.getloadavg()[0]},
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    return result


def print_table(result: dict[str, Any]) -> None:
    cpu = result["cpu"]
    print(
        f"\nResNet50 {result['size']} px, {result['threads']} threads, images/s "
        f"({', '.join(result['providers'])}; {cpu['model']}, flags {' '.join(cpu['flags'])}):"
    )
    cols = ("batch", 5), ("eager", 7), ("ch_last", 8), ("ORT fp32", 9), ("ORT int8", 9), ("fp32/eager", 11)
    print(" ".join(f"{name:>{w}}" for name, w in (*cols, ("int8/fp32", 10))))
    for r in result["images_per_s"]:
        print(
            f"{r['batch']:>5} {r['torch_eager']:>7} {r['torch_channels_last']:>8} {r['ort_fp32']:>9} "
            f"{r['ort_int8']:>9} {r['ort_fp32_vs_eager']:>10}x {r['ort_int8_vs_fp32']:>9}x"
        )
        print(f"      GFLOP/s: {r['gflop_per_s']}; goals met: {r['goals_met']}")
    if result["sweep"]:
        print(f"sweep at batch {result['sweep']['batch']}: {result['sweep']}")
    print(
        f"parity {result['parity']}; int8 top-1 agreement on the timing slices "
        f"{result['int8_top1_agreement_on_timing_inputs']:.3f}; load average before/after "
        f"{cpu['load_avg_1min']:.2f}/{cpu['load_avg_1min_after']:.2f} on {cpu['cores']} CPUs "
        "(figures are only comparable on an otherwise idle machine)"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
