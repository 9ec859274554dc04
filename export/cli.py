"""`cthub export MODEL_DIR [--out PATH] [--opset N] [--sample FILE ...]`."""

from __future__ import annotations

import argparse
import json

from export.exporter import DEFAULT_OPSET, PARITY_TOLERANCE, export_onnx
from export.session import quiet_onnxruntime_process


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a classifier to ONNX and check it against torch",
        description="Writes MODEL_DIR/model.onnx (dynamic batch, config.json and the "
        "weights' sha256 in its metadata) and checks ONNX Runtime against "
        "torch on real preprocessed CT slices.",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="folder with model.safetensors + config.json")
    p.add_argument("--out", default=None, help="output path (default MODEL_DIR/model.onnx)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument(
        "--sample",
        action="append",
        default=[],
        metavar="FILE",
        help="extra real image/DICOM for the parity check (repeatable)",
    )
    p.add_argument("--tolerance", type=float, default=PARITY_TOLERANCE, help="max allowed |Δ logits|")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    quiet_onnxruntime_process()  # this command is an entry point: process-wide ORT settings belong here
    report = export_onnx(
        args.model_dir, args.out, opset=args.opset, samples=args.sample, tolerance=args.tolerance
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    return 0
