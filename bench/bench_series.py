"""Throughput of a whole real series: the 275-slice JPEG 2000 chest CT of ../shared/data/real_ct/fnndsc_chest
through `POST /predict_series` of a real `cthub serve`, and through the PACS loop's steps (WADO-RS fetch from
a local Orthanc, the analysis and SR of `pacs.analysis.SeriesReporter`, STOW-RS of what it writes), beside
raw ONNX Runtime batch throughput measured in the same run.

    .venv/bin/python -m bench.bench_series [--size 64] [--repeats 2] [--ort-batches 20]

Reported, per path: slices/s and its ratio to raw ONNX Runtime at the service's batch size, and where the
rest of the time goes per slice: decoding + preprocessing (the server's own timing), inference as the
series path runs it (batches through the inference service) against the model alone, and the remainder
(upload, multipart parsing, temporary files, JSON for the API; SR, overlays and parametric map writing for
the loop, and its PACS transfers). The PACS part needs Debian's Orthanc (skipped, and said, without it).
Random-init ResNet50 (speed does not depend on the weights). Writes bench/results/series.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from bench.common import cpu_info
from ctdata.dicom import read_dicom
from ctdata.preprocess import PreprocessConfig, prepare
from export import export_onnx
from export.session import OnnxClassifier
from hub import ModelConfig, ResNet50, save_pretrained
from serving.launch import free_port, start_server
from serving.settings import usable_cpus

ROOT = Path(__file__).resolve().parents[1]
SERIES = ROOT.parent / "shared" / "data" / "real_ct" / "fnndsc_chest"
RESULTS = ROOT / "bench" / "results" / "series.json"
MAX_BATCH = 16


def model_dir(tmp: Path, size: int) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(
        name="bench-series",
        num_classes=3,
        labels=["a", "b", "c"],
        preprocessing=PreprocessConfig(input_size=size),
    )
    d = save_pretrained(ResNet50(num_classes=3), tmp / "model", cfg)
    print(f"exporting ResNet50 at {size} px ...", file=sys.stderr, flush=True)
    export_onnx(d)
    return d


def raw_ort(model: Path, files: list[Path], batches: int, threads: int) -> dict[str, float]:
    """ONNX Runtime alone on batches of MAX_BATCH slices of the series, and in-process decode and
    preprocessing per slice (JPEG 2000 decoding through ctdata)."""
    clf = OnnxClassifier(model / "model.onnx", threads=threads)
    pp = clf.config.preprocessing
    sample = files[:: max(1, len(files) // 32)]
    t0 = time.perf_counter()
    images = [read_dicom(f) for f in sample]
    decode_ms = 1000 * (time.perf_counter() - t0) / len(sample)
    t0 = time.perf_counter()
    xs = [prepare(f, pp) for f in sample]
    prepare_ms = 1000 * (time.perf_counter() - t0) / len(sample) - decode_ms
    assert images and xs
    batch = torch.stack([xs[i % len(xs)] for i in range(MAX_BATCH)]).numpy()
    clf.outputs(batch)  # warm-up
    t0 = time.perf_counter()
    for _ in range(batches):
        clf.outputs(batch)
    img_s = batches * MAX_BATCH / (time.perf_counter() - t0)
    return {
        "batch_img_s": round(img_s, 2),
        "model_ms_per_slice": round(1000 / img_s, 2),
        "decode_ms_per_slice": round(decode_ms, 2),
        "preprocess_ms_per_slice": round(max(prepare_ms, 0.0), 2),
    }


def api(model: Path, files: list[Path], tmp: Path, repeats: int, threads: int) -> dict[str, Any]:
    """POST /predict_series with the whole series as multipart files; the fastest of `repeats` runs."""
    env = {
        "BENTOML_HOME": str(tmp / "bentoml"),
        "CTHUB_BATCH_MAX_SIZE": str(MAX_BATCH),
        "CTHUB_DEMO": "0",
        "CTHUB_ORT_THREADS": str(threads),
    }
    print("starting cthub serve ...", file=sys.stderr, flush=True)
    server = start_server(model, tmp / "server.log", env=env)
    blobs = [f.read_bytes() for f in files]
    runs = []
    try:
        with httpx.Client(timeout=1200) as c:
            warm = c.post(server.base + "/predict", files={"file": ("x.dcm", blobs[0])})  # lazy parts load
            warm.raise_for_status()
            for r in range(repeats):
                print(f"/predict_series, run {r + 1} of {repeats} ...", file=sys.stderr, flush=True)
                parts = [("files", (f"f{i}.dcm", b, "application/dicom")) for i, b in enumerate(blobs)]
                t0 = time.perf_counter()
                resp = c.post(server.base + "/predict_series", files=parts)
                wall = time.perf_counter() - t0
                resp.raise_for_status()
                answer = resp.json()
                assert len(answer["slices"]) == len(files), "the series was not analysed whole"
                runs.append({"wall_s": wall, "timing_ms": answer["timing_ms"]})
    finally:
        server.stop()
    best = min(runs, key=lambda x: x["wall_s"])
    n, t = len(files), best["timing_ms"]
    return {
        "wall_s": round(best["wall_s"], 2),
        "slices_s": round(n / best["wall_s"], 2),
        "per_slice_ms": {
            "wall": round(1000 * best["wall_s"] / n, 2),
            "decode_and_preprocess": round(t["decode_and_preprocess"] / n, 2),
            "inference": round(t["inference"] / n, 2),
            "rest_upload_multipart_json": round((1000 * best["wall_s"] - t["total"]) / n, 2),
        },
        "runs_wall_s": [round(r["wall_s"], 2) for r in runs],
    }


def pacs_loop(model: Path, files: list[Path], tmp: Path) -> dict[str, Any]:
    """The loop's steps on the series, each timed: WADO-RS fetch from a local Orthanc, the analysis and SR
    (`SeriesReporter.report`), the same with `--cam` (overlays and parametric map), STOW-RS of the outputs."""
    from pacs.analysis import SeriesReporter
    from pacs.client import PacsClient
    from pacs.orthanc import OrthancConfig, missing_parts, start_orthanc

    reporter = SeriesReporter(model, cam=True)
    reporter.report(files[:4])  # warm-up: the session's first runs and lazy imports are not the series'
    reporter.cam = False
    steps: dict[str, float] = {}
    t0 = time.perf_counter()
    reporter.report(files)
    steps["analyse_and_sr_from_disk_s"] = time.perf_counter() - t0
    reporter.cam = True
    t0 = time.perf_counter()
    report = reporter.report(files)
    steps["analyse_sr_overlays_maps_from_disk_s"] = time.perf_counter() - t0
    out: dict[str, Any] = {"orthanc": None}
    if (why := missing_parts()) is not None:
        out["orthanc"] = f"not measured: {why}"
    else:
        work = tmp / "orthanc"
        work.mkdir()
        orthanc = start_orthanc(OrthancConfig(work, http_port=free_port(), dicom_port=free_port()))
        try:
            with PacsClient(orthanc.url) as client, httpx.Client(base_url=orthanc.url, timeout=120) as http:
                for f in files:
                    http.post("/instances", content=f.read_bytes()).raise_for_status()
                hits = http.post("/tools/lookup", content=_series_uid(files[0])).json()
                (series_id,) = [h["ID"] for h in hits if h["Type"] == "Series"]
                info = client.series(series_id)
                assert info is not None
                into = tmp / "fetched"
                into.mkdir()
                t0 = time.perf_counter()
                fetched = client.fetch_series(info, into)
                steps["fetch_wado_rs_s"] = time.perf_counter() - t0
                assert len(fetched.files) == len(files)
                t0 = time.perf_counter()
                report = reporter.report(fetched.files)
                steps["analyse_sr_overlays_maps_fetched_s"] = time.perf_counter() - t0
                outputs = [report.sr, *report.overlays, *report.maps]
                t0 = time.perf_counter()
                client.store(info.study_uid, outputs)
                steps["store_stow_rs_s"] = time.perf_counter() - t0
                out["orthanc"] = "measured"
        finally:
            orthanc.stop()
    n = len(files)
    loop_s = (
        steps.get("fetch_wado_rs_s", 0.0)
        + steps.get("analyse_sr_overlays_maps_fetched_s", steps["analyse_sr_overlays_maps_from_disk_s"])
        + steps.get("store_stow_rs_s", 0.0)
    )
    out.update(
        {
            "steps_s": {k: round(v, 2) for k, v in steps.items()},
            "loop_s": round(loop_s, 2),
            "slices_s": round(n / loop_s, 2),
            "per_slice_ms": {k.removesuffix("_s"): round(1000 * v / n, 2) for k, v in steps.items()},
        }
    )
    return out


def _series_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64, help="model input size (64: the demo model; 224: paper)")
    ap.add_argument("--repeats", type=int, default=2, help="/predict_series runs (the fastest is reported)")
    ap.add_argument("--ort-batches", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: the CPUs this may use)")
    args = ap.parse_args([] if argv is None else argv)
    files = sorted(SERIES.glob("*.dcm"))
    if len(files) != 275:
        raise FileNotFoundError(f"needs the 275 files of {SERIES} (../shared/data/real_ct/fnndsc_chest)")
    threads = args.threads or usable_cpus()
    cpu_before = cpu_info()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = model_dir(tmp, args.size)
        print("raw ONNX Runtime ...", file=sys.stderr, flush=True)
        raw = raw_ort(model, files, args.ort_batches, threads)
        served = api(model, files, tmp, args.repeats, threads)
        print("PACS loop steps ...", file=sys.stderr, flush=True)
        loop = pacs_loop(model, files, tmp)
    for path in (served, loop):
        path["ratio_to_raw_ort_batch"] = round(path["slices_s"] / raw["batch_img_s"], 3)
    result = {
        "series": "fnndsc_chest (275 slices, 512x512, JPEG 2000 lossless)",
        "size": args.size,
        "max_batch": MAX_BATCH,
        "threads": threads,
        "raw_onnxruntime": raw,
        "predict_series": served,
        "pacs_loop": loop,
        "cpu": cpu_before,
        "load_avg_1min_after": round(os.getloadavg()[0], 2),
    }
    report(result)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


def report(r: dict[str, Any]) -> None:
    raw, api_r, loop = r["raw_onnxruntime"], r["predict_series"], r["pacs_loop"]
    print(
        f"\nseries of 275 real slices, ResNet50 {r['size']} px, ONNX fp32, {r['threads']} threads "
        f"({r['cpu']['model']}, load {r['cpu']['load_avg_1min']} before / {r['load_avg_1min_after']} after)\n"
        f"raw ONNX Runtime: {raw['batch_img_s']} slices/s at batch {r['max_batch']} "
        f"({raw['model_ms_per_slice']} ms/slice); in-process decode {raw['decode_ms_per_slice']} + "
        f"preprocess {raw['preprocess_ms_per_slice']} ms/slice\n"
        f"/predict_series: {api_r['slices_s']} slices/s = {api_r['ratio_to_raw_ort_batch']} x raw; per slice "
        f"{api_r['per_slice_ms']}\n"
        f"PACS loop: {loop['slices_s']} slices/s = {loop['ratio_to_raw_ort_batch']} x raw (Orthanc: "
        f"{loop['orthanc']}); per slice {loop['per_slice_ms']}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
