"""End-to-end serving: a real `cthub serve` (BentoML + ONNX Runtime) answering real DICOM uploads.

    .venv/bin/python -m bench.bench_serving [--size 224] [--requests 24] [--concurrency 8]

Measures, side by side: in-process Predictor.predict (no HTTP), sequential POST /predict (latency p50/p95),
concurrent POST /predict, and concurrent POST /predict_batched (adaptive batching; mean batch size read from
/metrics). Random ResNet50 weights: speed does not depend on them. Writes bench/results/serving.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch

from ctdata.preprocess import PreprocessConfig
from export import export_onnx
from hub import ModelConfig, ResNet50, save_pretrained
from serving.predictor import Predictor

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "serving.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _samples() -> list[bytes]:
    from pydicom.data import get_testdata_file

    names = ("CT_small.dcm", "693_UNCI.dcm")
    return [Path(p).read_bytes() for n in names if (p := get_testdata_file(n, download=False))]


def _start(model_dir: Path, port: int, log: Path) -> subprocess.Popen:
    env = os.environ | {
        "PYTHONPATH": str(ROOT),
        "BENTOML_DO_NOT_TRACK": "True",
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cthub", "serve", "--model", str(model_dir), "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 300
    while "cthub is ready" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start:\n{log.read_text()[-2000:]}")
        time.sleep(1)
    return proc


def _timed(fn, items: list, concurrency: int) -> tuple[float, list[float]]:
    lat: list[float] = []

    def one(item):
        t = time.perf_counter()
        r = fn(item)
        r.raise_for_status()
        lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, items))
    return len(items) / (time.perf_counter() - t0), lat


def _mean_batch(metrics: str) -> float | None:
    vals = {}
    for kind in ("sum", "count"):
        pattern = rf'adaptive_batch_size_{kind}\{{[^}}]*method_name="predict_batched"[^}}]*\}} ([0-9.e+]+)'
        m = re.search(pattern, metrics)
        vals[kind] = float(m.group(1)) if m else None
    return round(vals["sum"] / vals["count"], 2) if vals["sum"] and vals["count"] else None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args([] if argv is None else argv)
    data = _samples()
    items = [data[i % len(data)] for i in range(args.requests)]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        cfg = ModelConfig(
            name="bench-serving",
            num_classes=11,
            labels=[f"organ_{i}" for i in range(11)],
            preprocessing=PreprocessConfig(input_size=args.size),
        )
        model_dir = save_pretrained(ResNet50(num_classes=11), Path(tmp) / "m", cfg)
        print(f"exporting ResNet50 at {args.size} px ...", file=sys.stderr, flush=True)
        export_onnx(model_dir)
        pred = Predictor(model_dir)
        pred.predict(data[0])
        t0 = time.perf_counter()
        for d in items:
            pred.predict(d)
        inproc = args.requests / (time.perf_counter() - t0)
        del pred
        port, base = _free_port(), ""
        print("starting cthub serve ...", file=sys.stderr, flush=True)
        proc = _start(model_dir, port, Path(tmp) / "server.log")
        base = f"http://127.0.0.1:{port}"
        try:
            with httpx.Client(timeout=300) as c:

                def single(d: bytes) -> httpx.Response:
                    return c.post(base + "/predict", files={"file": ("x.dcm", d)})

                def batched(d: bytes) -> httpx.Response:
                    return c.post(base + "/predict_batched", files={"files": ("x.dcm", d)})

                single(data[0]), batched(data[0])  # warm-up
                print("timing sequential /predict ...", file=sys.stderr, flush=True)
                seq, lat = _timed(single, items, 1)
                print("timing concurrent /predict and /predict_batched ...", file=sys.stderr, flush=True)
                conc, _ = _timed(single, items, args.concurrency)
                conc_b, _ = _timed(batched, items, args.concurrency)
                mean_batch = _mean_batch(c.get(base + "/metrics").text)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
    result = {
        "size": args.size,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "in_process_img_s": round(inproc, 2),
        "http_sequential_img_s": round(seq, 2),
        "http_latency_ms_p50": round(1000 * float(np.percentile(lat, 50)), 1),
        "http_latency_ms_p95": round(1000 * float(np.percentile(lat, 95)), 1),
        "http_concurrent_img_s": round(conc, 2),
        "http_batched_concurrent_img_s": round(conc_b, 2),
        "batched_mean_batch_size": mean_batch,
        "http_overhead_ratio": round(inproc / seq, 2),
        "batched_vs_concurrent": round(conc_b / conc, 2),
        "cpu_count": os.cpu_count(),
        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print(f"\nserving ResNet50 {args.size} px, ONNX Runtime, {args.requests} real DICOM uploads (img/s):")
    print(
        f"  in-process {result['in_process_img_s']}  |  HTTP sequential {result['http_sequential_img_s']} "
        f"(p50 {result['http_latency_ms_p50']} ms, p95 {result['http_latency_ms_p95']} ms; in-process/HTTP "
        f"{result['http_overhead_ratio']}x)"
    )
    print(
        f"  HTTP x{args.concurrency} concurrent: /predict {result['http_concurrent_img_s']}  |  "
        f"/predict_batched {result['http_batched_concurrent_img_s']} (mean batch {mean_batch}; ratio "
        f"{result['batched_vs_concurrent']}x)"
    )
    print(f"  1-min load average before/after {result['load_avg_1min']} on {os.cpu_count()} CPUs")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
