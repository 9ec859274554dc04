"""`cthub serve --model DIR` (BentoML API + demo at /ui) and `cthub demo --model DIR` (Gradio alone)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cthub.errors import ConfigError
from serving.settings import (
    ALSO_ENV,
    BACKENDS,
    INFERENCE_ENV,
    INFERENCE_MODES,
    MODEL_ENV,
    VARIANT_ENV,
    VARIANTS,
    ServeSettings,
)

if TYPE_CHECKING:
    from cthub.cli import SubParsers

SERVICE = "serving.entry:CTHubService"
QUIET_ENV = {
    "BENTOML_DO_NOT_TRACK": "True",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "ORT_DISABLE_TELEMETRY": "1",
}


def register(subparsers: SubParsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a classifier: REST API (BentoML) + demo at /ui",
        description="Starts the BentoML service for MODEL (its exported ONNX model behind adaptive "
        "batching) with the Gradio demo mounted at /ui. Limits, auth, CORS and batching are set by "
        "CTHUB_* environment variables (see serving/settings.py and the README).",
    )
    _model_args(p)
    p.add_argument(
        "--variant",
        choices=VARIANTS,
        default=None,
        help=f"ONNX file: fp32 (model.onnx) or int8 (model.int8.onnx); default ${VARIANT_ENV} or fp32",
    )
    p.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="DIR",
        help="another exported classifier to serve beside MODEL (repeatable); requests select it with "
        "model=<its name>, the demo's picker offers it",
    )
    p.add_argument(
        "--inference",
        choices=INFERENCE_MODES,
        default=None,
        help="where the model runs: in-process (in the API worker, batched there; the faster on one "
        "machine) or service (BentoML's separate inference service, one copy shared by every API worker); "
        f"default ${INFERENCE_ENV} or in-process",
    )
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the server to be ready")
    p.set_defaults(func=serve)
    d = subparsers.add_parser("demo", help="run the Gradio demo alone (no REST API)")
    _model_args(d)
    d.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="auto: ONNX Runtime when model.onnx matches the weights, else torch",
    )
    d.add_argument("--port", type=int, default=7860)
    d.set_defaults(func=demo)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help="model folder (safetensors + config.json) or local hub name"
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")


def urls(host: str, port: int) -> dict[str, str]:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104 -- compared, not bound
    base = f"http://{shown}:{port}"
    return {
        "base": base,
        "docs": f"{base}/",
        "openapi": f"{base}/docs.json",
        "predict": f"{base}/predict",
        "predict_series": f"{base}/predict_series",
        "predict_image": f"{base}/predict_image",
        "report": f"{base}/report",
        "predict_batched": f"{base}/predict_batched",
        "ui": f"{base}/ui/",
        "ready": f"{base}/readyz",
        "model": f"{base}/model",
    }


def _post_json(url: str, token: str | None = None) -> Any:
    """POST to `url` (a BentoML API without inputs) and decode its JSON; None unless it answers 200."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = httpx.post(url, timeout=10, headers=headers)
    except httpx.HTTPError:
        return None
    return r.json() if r.status_code == 200 else None


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> bool:
    """Poll `url` until it answers 200, the process exits, or `timeout` seconds pass."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


def serve(args: argparse.Namespace) -> int:
    from hub.config import ModelConfig
    from serving.inference import resolve_model_dir, verify_export

    model_dir = resolve_model_dir(args.model)
    config = ModelConfig.load(model_dir)  # a broken config.json fails here, before any server starts
    if config.num_classes <= 0:
        raise ConfigError(f"{model_dir} is an encoder without a classification head; fine-tune it first")
    variant = args.variant or os.environ.get(VARIANT_ENV, "fp32")
    verify_export(model_dir, variant)  # missing, tampered or stale: the fix, before any server starts
    also = [resolve_model_dir(d) for d in args.also]
    for d in also:
        verify_export(d, "fp32")
    env = os.environ | QUIET_ENV | {MODEL_ENV: str(model_dir), VARIANT_ENV: variant}
    if args.inference:
        env[INFERENCE_ENV] = args.inference
    where = ServeSettings.from_env(env).inference  # a wrong CTHUB_INFERENCE fails here, named
    print(
        f"cthub: starting the server for {model_dir} (ONNX {variant}, inference {where})",
        file=sys.stderr,
        flush=True,
    )
    if also:
        env[ALSO_ENV] = ",".join(str(d) for d in also)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    cmd = [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        SERVICE,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--working-dir",
        root,
    ]
    u = urls(args.host, args.port)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no line per readiness poll in the server's output
    proc = subprocess.Popen(cmd, env=env)  # noqa: S603 -- this Python's bentoml, arguments built here
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the server like Ctrl+C does
    try:
        if wait_ready(u["ready"], proc, args.timeout):
            # what the worker really loaded (ONNX Runtime or torch, and its providers), not a guess made here
            info = _post_json(u["model"], ServeSettings.from_env(env).api_token) or {}
            print(
                f"cthub: serving {info.get('name', model_dir)} with {info.get('backend', '?')} "
                f"{info.get('variant', '')} [{', '.join(info.get('providers', []))}]",
                file=sys.stderr,
                flush=True,
            )
            print(
                f"\ncthub is ready:\n  API docs   {u['docs']}\n  predict    POST {u['predict']} "
                f"(multipart field 'file')\n  series     POST {u['predict_series']} (fields 'files')\n"
                f"  report     POST {u['report']} (DICOM SR)\n  demo       {u['ui']}\n"
                f"  health     {u['ready']}\nTry: curl -F file=@slice.dcm {u['predict']}\n",
                flush=True,
            )
        elif proc.poll() is None:
            print(f"cthub: server not ready after {args.timeout:.0f} s; still waiting", file=sys.stderr)
        else:
            print("cthub: the server stopped before it was ready (see its log above)", file=sys.stderr)
            return proc.returncode or 1
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        return 130


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def demo(args: argparse.Namespace) -> int:
    from export.session import quiet_onnxruntime_process
    from serving.inference import resolve_model_dir
    from serving.viewer import private_upload_dir

    os.environ.update({k: v for k, v in QUIET_ENV.items() if k not in os.environ})
    quiet_onnxruntime_process()  # this command is an entry point: process-wide ORT settings belong here
    uploads = private_upload_dir()  # before Gradio is imported: its upload directory is process-wide

    from serving.demo import DemoModel, build_demo, launch_options

    settings = ServeSettings.from_env()
    served = DemoModel.local(resolve_model_dir(args.model), args.backend)  # load now: errors before serving
    print(
        f"cthub: demo for {served.config.name} ({served.model.identity['backend']}); Gradio's upload "
        f"directory {uploads} (private, emptied as uploads are read, removed at exit)",
        file=sys.stderr,
        flush=True,
    )
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` closes the server like Ctrl+C (and runs atexit)
    build_demo(lambda: served, settings).launch(
        server_name=args.host,
        server_port=args.port,
        max_file_size=settings.max_series_bytes,
        **launch_options(),
    )
    return 0
