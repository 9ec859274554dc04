"""Load benchmark of the serving stack: a real `cthub serve` on 127.0.0.1 under a bounded load generator,
in each server layout (`--inference`: the model in the API worker with its own batcher, one pass at a time
on every core, then two passes at once on one core each, then BentoML's separate inference service),
beside raw ONNX Runtime batch throughput measured in the same run.

    .venv/bin/python -m bench.bench_serving [--sizes 64,224] [--requests 1000] [--concurrency 1,8,32]
                                            [--bad 0.1] [--classes 11]
                                            [--inference in-process,in-process:2,service]

For each layout and concurrency: `--requests` POST /predict uploads of real DICOM slices (pydicom /
pydicom-data: 128x128 and 512x512 uncompressed CT), a fraction `--bad` of them malformed (random bytes,
truncated files, text) sent by `concurrency` clients (one asyncio loop) with keep-alive connections.
Reported: throughput (all, valid), latency p50/p99 of valid requests, status counts (the goal: no 5xx), the
batch sizes formed, RSS of the server's processes before and after (bounded growth), and the ratio of
end-to-end valid throughput to raw ONNX Runtime batch throughput (goal >= 0.8 where the load keeps the
model busy: c=8 and c=32; c=1 is one request at a time, bound by its latency) with where the rest of the
time goes per valid request: decode, preprocessing, the model's share of its batch, and the remainder (HTTP,
multipart parsing, the hop to the inference service, JSON). The CPU and the load average are recorded:
figures taken while other jobs share the cores say so. Every size of --sizes (default BENCH_SIZES, else 64
and 224) runs in turn in the one run, each with its own servers; a size above 64 px gets --requests and
--ort-batches scaled by (64/size)^2 (at least 60 and 3), as its forward pass costs that much more. Writes
bench/results/serving.json (64 px) and serving-<size>px.json (with another --classes than 11: -<k>cls added);
`levels` is the first layout's, `layouts` holds each.

Raw ONNX Runtime is timed before the server starts and again after it stops (the better figure is the
reference: a measurement that fell in another job's burst would flatter the ratio), two ways on the same
batches, with the server's own session class: without the maps (`OnnxClassifier.outputs(maps=False)`:
logits and embedding from the graph pruned of the Grad-CAM nodes, what /predict runs for these requests,
which ask for no map: the ratio's reference) and with every output (what a cam=true request runs: the maps
cost several forward passes at 224 px and many classes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import numpy as np
import torch

from bench.common import bench_sizes, cpu_info
from ctdata.preprocess import PreprocessConfig, prepare
from export import export_onnx
from export.session import OnnxClassifier
from hub import ModelConfig, ResNet50, save_pretrained
from serving.launch import Server, start_server
from serving.settings import usable_cpus

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "serving.json"
SAMPLES = ("CT_small.dcm", "693_UNCI.dcm", "693_UNCR.dcm")
MAX_BATCH = 16


def samples() -> list[bytes]:
    """Real uncompressed CT slices: pydicom's wheel (128x128) and pydicom-data (512x512) when installed."""
    from pydicom.data import get_testdata_file

    out = []
    for name in SAMPLES:
        p = get_testdata_file(name, download=False)
        if p:
            out.append(Path(p).read_bytes())
    return out


def malformed(good: bytes, i: int) -> bytes:
    """Three kinds of bad upload in turn: random bytes, a truncated DICOM, text."""
    kind = i % 3
    if kind == 0:
        return os.urandom(4096)
    if kind == 1:
        return good[: len(good) // 3]
    return b"patient notes, not an image\n" * 50


def model_dir(tmp: Path, size: int, classes: int = 11) -> Path:
    """A random-init ResNet50 of `classes` classes at `size` px, exported to ONNX (speed does not depend on
    the weights; the in-graph Grad-CAM's cost grows with the classes)."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        name="bench-serving",
        num_classes=classes,
        labels=[f"class_{i}" for i in range(classes)],
        preprocessing=PreprocessConfig(input_size=size),
    )
    d = save_pretrained(ResNet50(num_classes=classes), tmp / f"model-{size}", cfg)
    print(f"exporting ResNet50 at {size} px ...", file=sys.stderr, flush=True)
    export_onnx(d)
    return d


def raw_ort(model: Path, data: list[bytes], batches: int, threads: int | None) -> dict[str, float]:
    """ONNX Runtime alone on batches of MAX_BATCH real preprocessed slices (the service's own session
    settings), and the in-process cost of decode + preprocessing per slice."""
    clf = OnnxClassifier(model / "model.onnx", threads=threads)
    pp = clf.config.preprocessing
    t0 = time.perf_counter()
    xs = [prepare(d, pp) for d in data]
    prep_ms = 1000 * (time.perf_counter() - t0) / len(xs)
    batch = torch.stack([xs[i % len(xs)] for i in range(MAX_BATCH)]).numpy()
    served = functools.partial(clf.outputs, maps=False)  # what /predict runs when no map is asked for
    return {
        "batch_img_s": _img_s(served, batch, batches),
        "batch1_img_s": _img_s(served, batch[:1], batches),
        "with_maps_batch_img_s": _img_s(clf.outputs, batch, batches),
        "decode_preprocess_ms": round(prep_ms, 2),
    }


def _img_s(run: Any, batch: np.ndarray, repeats: int) -> float:
    """Images/s of `run` on `batch` over `repeats` calls after one warm-up call."""
    run(batch)
    t0 = time.perf_counter()
    for _ in range(repeats):
        run(batch)
    return round(repeats * len(batch) / (time.perf_counter() - t0), 2)


def processes(server: Server) -> dict[str, list[Any]]:
    """The server's processes by role: the API worker, the inference worker, the rest (CLI, arbiter)."""
    import psutil

    root = psutil.Process(server.proc.pid)
    roles: dict[str, list[Any]] = {"api": [], "inference": [], "other": []}
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a process that just exited
            cmd = " ".join(p.cmdline())
            role = (
                "inference"
                if "cthub-inference" in cmd
                else "api"
                if "--service-name cthub " in cmd
                else "other"
            )
            roles[role].append(p)
    return roles


def rss_mb(server: Server) -> float:
    """Resident memory of the server's whole process tree (CLI, BentoML arbiter, both services)."""
    import psutil

    total = 0
    for procs in processes(server).values():
        for p in procs:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
    return round(total / 2**20, 1)


def cpu_seconds(server: Server) -> dict[str, float]:
    """CPU time (user + system) used so far by each role of the server, and by this load generator."""
    import psutil

    out: dict[str, float] = {"client": time.process_time()}
    for role, procs in processes(server).items():
        total = 0.0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        out[role] = total
    return out


def multipart(body: bytes) -> tuple[bytes, str]:
    """`body` as the multipart form a client uploads (field `file`), and its content type: built once per
    distinct upload, so that the load generator spends its CPU on sending, not on encoding."""
    boundary = "cthub-bench-" + os.urandom(8).hex()
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.dcm"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head + body + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def run_load(base: str, data: list[bytes], n: int, concurrency: int, bad: float) -> dict[str, Any]:
    """`n` POST /predict from `concurrency` clients, each with its keep-alive connection, in one asyncio
    loop (a bounded generator: the next request leaves when an answer came back). One thread, not one per
    client: the generator shares the server's cores, and 32 Python threads cost it several times the CPU
    (measured: 11 ms a request at c=32 with httpx in threads)."""
    every = round(1 / bad) if bad > 0 else 0
    uploads: dict[tuple[int, int], tuple[bytes, str]] = {}
    jobs = []
    for i in range(n):
        is_bad = every > 0 and i % every == every - 1
        key = (i % len(data), i % 3 if is_bad else -1)
        if key not in uploads:
            good = data[key[0]]
            uploads[key] = multipart(malformed(good, i) if is_bad else good)
        jobs.append((is_bad, key))
    records: list[dict[str, Any]] = []

    async def client(session: aiohttp.ClientSession, queue: list[tuple[bool, tuple[int, int]]]) -> None:
        while queue:
            is_bad, key = queue.pop()
            body, ctype = uploads[key]
            t = time.perf_counter()
            async with session.post(base + "/predict", data=body, headers={"Content-Type": ctype}) as r:
                answer = await r.read()
            rec: dict[str, Any] = {"bad": is_bad, "status": r.status, "ms": 1000 * (time.perf_counter() - t)}
            if r.status == 200:
                rec["timing"] = json.loads(answer)["timing_ms"]
            records.append(rec)

    async def load() -> None:
        queue = jobs[::-1]
        timeout = aiohttp.ClientTimeout(total=300)
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            await asyncio.gather(*(client(session, queue) for _ in range(concurrency)))

    t0 = time.perf_counter()
    asyncio.run(load())
    wall = time.perf_counter() - t0
    return summarize(records, wall, concurrency)


def summarize(records: list[dict[str, Any]], wall: float, concurrency: int) -> dict[str, Any]:
    valid = [r for r in records if not r["bad"]]
    ok = [r for r in valid if r["status"] == 200]
    lat = np.array([r["ms"] for r in ok]) if ok else np.zeros(1)
    statuses: dict[str, int] = {}
    for r in records:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    t = [r["timing"] for r in ok]
    mean = {
        k: round(float(np.mean([x[k] for x in t])), 2) if t else None
        for k in ("decode", "preprocess", "inference", "model", "model_cpu", "batch_size")
    }
    model_share = float(np.mean([x["model_cpu"] / x["batch_size"] for x in t])) if t else 0.0
    return {
        "concurrency": concurrency,
        "requests": len(records),
        "malformed": len(records) - len(valid),
        "wall_s": round(wall, 2),
        "throughput_req_s": round(len(records) / wall, 2),
        "valid_throughput_img_s": round(len(ok) / wall, 2),
        "latency_ms_p50": round(float(np.percentile(lat, 50)), 1),
        "latency_ms_p99": round(float(np.percentile(lat, 99)), 1),
        "status_counts": statuses,
        "server_errors_5xx": sum(v for k, v in statuses.items() if k.startswith("5")),
        "bad_answered_4xx": sum(1 for r in records if r["bad"] and 400 <= r["status"] < 500),
        "mean_ms": mean,
        "model_share_ms_per_image": round(model_share, 3),
    }


def breakdown(row: dict[str, Any], cpu: dict[str, float], in_service: bool) -> dict[str, float | None]:
    """Where the time per valid request goes, from CPU time measured per process over the level (`cpu`:
    seconds used during it), so that waiting threads are not counted: the whole server (every process), the
    API worker (HTTP, multipart, decode, preprocessing, JSON; the malformed uploads' share included), the
    load generator itself, and what else ran. With the model in its own service (`in_service`) the
    inference worker's CPU splits into the model's forward passes (the CPU of that process during each pass,
    its share per image) and the rest (the hop from the API, pickling, BentoML's dispatcher). In-process the
    passes share the API worker with the request threads, so a pass's process CPU would count their work
    (and another pass's): there `model_ms` is None and `api_worker_cpu_ms` includes the model."""
    n = max(1, round(row["valid_throughput_img_s"] * row["wall_s"]))
    per = {k: 1000.0 * v / n for k, v in cpu.items()}
    model = row["model_share_ms_per_image"] if in_service else None
    wall = 1000.0 / row["valid_throughput_img_s"] if row["valid_throughput_img_s"] else float("nan")
    other = per["inference"] - model if model is not None else None
    return {
        "wall_ms_per_valid_request": round(wall, 2),
        "server_cpu_ms": round(per["api"] + per["inference"] + per["other"], 2),
        "api_worker_cpu_ms": round(per["api"], 2),
        "model_ms": None if model is None else round(model, 2),
        "inference_worker_other_cpu_ms": None if other is None else round(other, 2),
        "load_generator_cpu_ms": round(per["client"], 2),
        "arbiter_cli_cpu_ms": round(per["other"], 2),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--sizes", default=None, help="model input sizes (default BENCH_SIZES or 64,224: demo and paper)"
    )
    ap.add_argument("--requests", type=int, default=1000, help="requests per level at 64 px")
    ap.add_argument("--classes", type=int, default=11, help="the model's classes (the maps cost per class)")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument(
        "--inference",
        default="in-process,in-process:2,service",
        help="server layouts measured in turn, CTHUB_INFERENCE[:CTHUB_FORWARD_THREADS] (in-process:2: two "
        "passes at once, each on half the ORT threads); the first is the JSON's `levels`",
    )
    ap.add_argument("--bad", type=float, default=0.1, help="fraction of malformed uploads")
    ap.add_argument("--ort-batches", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: the CPUs this may use)")
    args = ap.parse_args([] if argv is None else argv)
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else bench_sizes()
    by_size = {}
    for size in sizes:
        n = args.requests if size <= 64 else max(60, round(args.requests * (64 / size) ** 2))
        res = measure_size(args, size, n)
        report(res)
        name = (
            "serving"
            + ("" if size == 64 else f"-{size}px")
            + ("" if args.classes == 11 else f"-{args.classes}cls")
        )
        out = RESULTS.with_name(f"{name}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
        by_size[size] = res
    result = by_size.get(64) or by_size[sizes[0]]
    result["other_sizes"] = {str(k): v for k, v in by_size.items() if v is not result}
    return result


def load_levels(
    model: Path, log: Path, env: dict[str, str], data: list[bytes], requests: int, args: argparse.Namespace
) -> dict[str, Any]:
    """A real server of `model` with `env`, warmed up, then `requests` at each concurrency of the run: the
    rows and the server's RSS before and after."""
    levels = [int(c) for c in args.concurrency.split(",")]
    layout = f"{env['CTHUB_INFERENCE']}, {env['CTHUB_FORWARD_THREADS']} x {env['CTHUB_ORT_THREADS']} threads"
    print(f"starting cthub serve ({layout}) ...", file=sys.stderr, flush=True)
    server = start_server(model, log, env=env)
    try:
        with httpx.Client(timeout=300) as c:  # warm-up: the first answers load lazy parts
            for d in data:
                c.post(server.base + "/predict", files={"file": ("x.dcm", d)}).raise_for_status()
        in_service = bool(processes(server)["inference"])
        rss_before = rss_mb(server)
        rows = []
        for level in levels:
            print(f"load: {requests} requests at concurrency {level} ...", file=sys.stderr, flush=True)
            cpu0 = cpu_seconds(server)
            row = run_load(server.base, data, requests, level, args.bad)
            cpu1 = cpu_seconds(server)
            row["breakdown"] = breakdown(row, {k: cpu1[k] - cpu0[k] for k in cpu0}, in_service)
            row["rss_mb_after"] = rss_mb(server)
            rows.append(row)
        rss_after = rss_mb(server)
    finally:
        server.stop()
    growth = round(rss_after - rss_before, 1)
    return {"levels": rows, "rss_mb": {"before": rss_before, "after": rss_after, "growth": growth}}


def measure_size(args: argparse.Namespace, size: int, requests: int) -> dict[str, Any]:
    """Raw ONNX Runtime, then a real server under load at each concurrency, for a `size` px model."""
    modes = [m.strip() for m in args.inference.split(",")]
    data = samples()
    cpu_before = cpu_info()
    threads = args.threads or usable_cpus()  # what the server's inference session uses by default
    with tempfile.TemporaryDirectory() as tmp:
        model = model_dir(Path(tmp), size, args.classes)
        print("raw ONNX Runtime ...", file=sys.stderr, flush=True)
        scale = min(1.0, (64 / size) ** 2)  # as for the requests: a large forward pass costs more
        raw = raw_ort(model, data, max(3, round(args.ort_batches * scale)), threads)
        layouts = {}
        for layout in modes:
            mode, _, forward = layout.partition(":")  # "in-process:2": two passes at once, each 1 thread
            passes = int(forward or 1)
            env = {
                "BENTOML_HOME": str(Path(tmp) / "bentoml"),
                "CTHUB_BATCH_MAX_SIZE": str(MAX_BATCH),
                "CTHUB_DEMO": "0",
                "CTHUB_ORT_THREADS": str(max(1, threads // passes)),
                "CTHUB_FORWARD_THREADS": str(passes),
                "CTHUB_INFERENCE": mode,
            }
            log = Path(tmp) / f"server-{mode}-{passes}.log"
            layouts[layout] = load_levels(model, log, env, data, requests, args)
        # raw ONNX Runtime again, the server gone: on a shared machine one measurement can fall in another
        # job's burst; the better of the two is the reference, so a ratio errs low, never high
        print("raw ONNX Runtime again ...", file=sys.stderr, flush=True)
        again = raw_ort(model, data, max(3, round(args.ort_batches * scale)), threads)
        raw = raw | {
            "batch_img_s_before_load": raw["batch_img_s"],
            "batch_img_s_after_load": again["batch_img_s"],
            "batch_img_s": max(raw["batch_img_s"], again["batch_img_s"]),
            "batch1_img_s": max(raw["batch1_img_s"], again["batch1_img_s"]),
            "with_maps_batch_img_s": max(raw["with_maps_batch_img_s"], again["with_maps_batch_img_s"]),
        }
        for layout in layouts.values():
            for row in layout["levels"]:
                row["ratio_to_raw_ort_batch"] = round(row["valid_throughput_img_s"] / raw["batch_img_s"], 3)
    first = layouts[modes[0]]
    return {
        "size": size,
        "classes": args.classes,
        "requests_per_level": requests,
        "malformed_fraction": args.bad,
        "samples": len(data),
        "max_batch": MAX_BATCH,
        "raw_onnxruntime": raw,
        "inference": modes[0],  # the layout of `levels` and `rss_mb`; every layout measured: `layouts`
        "levels": first["levels"],
        "rss_mb": first["rss_mb"],
        "layouts": layouts,
        "cpu": cpu_before,
        "load_avg_1min_after": round(os.getloadavg()[0], 2),
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }


def report(r: dict[str, Any]) -> None:
    raw = r["raw_onnxruntime"]
    print(
        f"\nserving ResNet50 {r['size']} px, ONNX fp32, CPUs {r['affinity']} ({r['cpu']['model']}, load "
        f"{r['cpu']['load_avg_1min']} before / {r['load_avg_1min_after']} after)\n"
        f"raw ONNX Runtime: {raw['batch_img_s']} img/s at batch {r['max_batch']}, {raw['batch1_img_s']} at "
        f"batch 1; decode + preprocess in-process {raw['decode_preprocess_ms']} ms/slice\n"
        f"  (without the maps, what these requests run); with every map {raw.get('with_maps_batch_img_s')} "
        f"img/s at batch {r['max_batch']} ({r.get('classes')} classes)"
    )
    for mode, layout in r["layouts"].items():
        print(f"  layout {mode}; RSS of the server processes: {layout['rss_mb']}")
        report_levels(layout["levels"])


def report_levels(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        b = row["breakdown"]
        split = (
            f"API worker {b['api_worker_cpu_ms']} (model included)"
            if b["model_ms"] is None
            else f"API worker {b['api_worker_cpu_ms']}, model {b['model_ms']}, inference worker other "
            f"{b['inference_worker_other_cpu_ms']}"
        )
        print(
            f"  c={row['concurrency']:>2}: {row['throughput_req_s']} req/s, valid "
            f"{row['valid_throughput_img_s']} img/s = {row['ratio_to_raw_ort_batch']} x raw; p50 "
            f"{row['latency_ms_p50']} ms, p99 {row['latency_ms_p99']} ms; statuses {row['status_counts']}; "
            f"mean batch {row['mean_ms']['batch_size']}\n        per valid request: wall "
            f"{b['wall_ms_per_valid_request']} ms; CPU: server {b['server_cpu_ms']} = {split} (decode "
            f"{row['mean_ms']['decode']} + preprocess {row['mean_ms']['preprocess']} wall inside it); load "
            f"generator {b['load_generator_cpu_ms']}, arbiter/CLI {b['arbiter_cli_cpu_ms']}; RSS after "
            f"{row['rss_mb_after']} MB"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
