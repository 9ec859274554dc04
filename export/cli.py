"""`cthub export MODEL [--out FILE] [--int8] ...`: ONNX (fp32, optionally int8), checked on its data."""

from __future__ import annotations

import argparse
import json
import logging
from typing import TYPE_CHECKING

from export.defaults import (
    CALIBRATION_METHODS,
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_EVAL_IMAGES,
    DEFAULT_MAX_AUC_DROP,
    DEFAULT_OOD_IMAGES,
    DEFAULT_OPSET,
    DEFAULT_PARITY_IMAGES,
    DEFAULT_QUANTILE,
    EXPORTERS,
    PARITY_TOLERANCE,
)

if TYPE_CHECKING:
    from cthub.cli import SubParsers


def register(subparsers: SubParsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a classifier to ONNX (fp32, optionally int8) and check it against torch",
        description="Writes MODEL/model.onnx (dynamic batch; outputs logits, probabilities, cam, embedding; "
        "config, weights sha256 and an out-of-distribution reference in its metadata; a sha256 sidecar), "
        "checks ONNX Runtime against torch on real images of the model's own data and records the figures "
        "in its card. --int8 also writes model.int8.onnx, refused when it falls behind fp32.",
    )
    p.add_argument("model_dir", metavar="MODEL", help="folder with model.safetensors + config.json")
    p.add_argument("--out", default=None, help="output path (default MODEL/model.onnx)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--exporter", choices=EXPORTERS, default="dynamo", help="torch exporter (default dynamo)")
    p.add_argument(
        "--data", default=None, help="the classifier's labeled data (default: the one its config names)"
    )
    p.add_argument(
        "--sample", action="append", default=[], metavar="FILE", help="extra real image/DICOM for parity"
    )
    p.add_argument("--tolerance", type=float, default=PARITY_TOLERANCE, help="max allowed |Δ logits|")
    p.add_argument("--parity-images", type=int, default=DEFAULT_PARITY_IMAGES, help="test images for parity")
    p.add_argument(
        "--ood-images", type=int, default=DEFAULT_OOD_IMAGES, help="train/val images for the OOD reference"
    )
    p.add_argument(
        "--ood-quantile",
        type=float,
        default=DEFAULT_QUANTILE,
        help="OOD threshold: this quantile of held-out scores (val + cross-fitted train)",
    )
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    q = p.add_argument_group("int8")
    q.add_argument("--int8", action="store_true", help="also write the static int8 (QDQ) model")
    q.add_argument("--calibration-images", type=int, default=DEFAULT_CALIBRATION_IMAGES)
    q.add_argument("--calibrate-method", choices=CALIBRATION_METHODS, default="minmax")
    q.add_argument("--reduce-range", action="store_true", help="7-bit weights (older CPUs without VNNI)")
    q.add_argument("--eval-images", type=int, default=DEFAULT_EVAL_IMAGES, help="test images for ΔAUC/ΔF1")
    q.add_argument("--max-auc-drop", type=float, default=DEFAULT_MAX_AUC_DROP)
    q.add_argument("--max-f1-drop", type=float, default=None)
    q.add_argument("--min-agreement", type=float, default=None, help="min top-1 agreement with fp32")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)
    register_evaluate_ood(subparsers)


def run(args: argparse.Namespace) -> int:
    from export.exporter import export_onnx
    from export.quantize import Int8Tolerance, QuantSettings, quantize_int8
    from export.session import quiet_onnxruntime_process

    quiet_onnxruntime_process()  # this command is an entry point: process-wide ORT settings belong here
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" notes
    for name in ("onnxscript", "onnx_ir"):  # the exporter's optimizer passes log every step at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    report = export_onnx(
        args.model_dir,
        args.out,
        opset=args.opset,
        samples=args.sample,
        tolerance=args.tolerance,
        exporter=args.exporter,
        data=args.data,
        parity_images=args.parity_images,
        ood_images=args.ood_images,
        ood_quantile=args.ood_quantile,
        threads=args.threads,
    )
    out = {"fp32": report.to_dict()}
    if not args.json:
        print(report.summary())
    if args.int8:
        int8 = quantize_int8(
            args.model_dir,
            report.path,
            data=args.data,
            settings=QuantSettings(
                calibration_images=args.calibration_images,
                reduce_range=args.reduce_range,
                calibrate_method=args.calibrate_method,
            ),
            eval_images=args.eval_images,
            tolerance=Int8Tolerance(args.max_auc_drop, args.max_f1_drop, args.min_agreement),
            ood_images=args.ood_images,
            ood_quantile=args.ood_quantile,
            threads=args.threads,
        )
        out["int8"] = int8.to_dict()
        if not args.json:
            print(int8.summary())
    if args.json:
        print(json.dumps(out if args.int8 else out["fp32"], indent=2))
    return 0


def register_evaluate_ood(subparsers: SubParsers) -> None:
    p = subparsers.add_parser(
        "evaluate-ood",
        help="measure the OOD score of a served model against real shifts (AUROC per shift)",
        description="Scores the model's own test images and real shifts (whole CT slices of other sources, "
        "head CT for a body model / body CT for a head model, MR, ultrasound and X-ray objects of pydicom's "
        "test files, photographs, screen captures, windowing mistakes) with the exported ONNX model's "
        "out-of-distribution score, as serving scores them; one row per shift: AUROC, FPR at 95%% TPR, the "
        "share above the served threshold, far or near.",
    )
    p.add_argument(
        "--model", required=True, help="model folder with model.onnx (as `cthub export` writes it)"
    )
    p.add_argument("--variant", choices=("fp32", "int8"), default="fp32", help="ONNX file (default fp32)")
    p.add_argument(
        "--data", default=None, help="the model's labeled data (default: the one its config names)"
    )
    p.add_argument(
        "--real-data",
        required=True,
        help="folder holding the shift sources: real_ct/, head_ct/ and organamnist.npz",
    )
    p.add_argument("--in-images", type=int, default=1000, help="own test images (default 1000)")
    p.add_argument("--max-images", type=int, default=300, help="most images per shift (default 300)")
    p.add_argument("--out", default=None, help="write <model name>.json and .md into this folder")
    p.add_argument(
        "--record", action="store_true", help="record the table in the model's card (config metrics)"
    )
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument(
        "--compare",
        action="store_true",
        help="also score the same images with the field's other scores (per-stage and multi-layer "
        "Mahalanobis, energy, kNN; torch features) and write <model name>-compare.md/.json",
    )
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.set_defaults(func=run_evaluate_ood)


def run_evaluate_ood(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cthub.errors import ConfigError
    from cthub.provenance import command_line
    from cthub.runtime import hardware
    from export.ood_shifts import compare_scores, comparison_markdown, evaluate_shifts
    from export.session import OnnxClassifier, quiet_onnxruntime_process
    from hub.config import data_source
    from hub.io import record_metrics

    quiet_onnxruntime_process()  # an entry point
    logging.getLogger("pydicom").setLevel(logging.ERROR)  # test files with header quirks, read on purpose
    clf = OnnxClassifier.from_model_dir(args.model, args.variant, threads=args.threads)
    if clf.ood is None:
        raise ConfigError(
            f"{args.model} has no out-of-distribution reference: re-export it (`cthub export {args.model}`)"
        )
    source = data_source(clf.config, args.data)
    if source is None:
        raise ConfigError("the model's own data is not on this machine: pass --data FILE")
    evaluation = evaluate_shifts(
        clf, Path(args.real_data), source, in_images=args.in_images, max_images=args.max_images
    )
    table = evaluation.table(clf.ood.summary()["method"], clf.ood_score, clf.ood_threshold)
    record = table.to_dict() | {
        "variant": args.variant,
        "command": command_line("evaluate-ood", args),
        "hardware": hardware(),
    }
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{clf.config.name}.json").write_text(json.dumps(record, indent=2) + "\n")
        (out / f"{clf.config.name}.md").write_text(table.markdown() + "\n")
    if args.compare:
        tables = compare_scores(Path(args.model), evaluation, source)
        compared = {"tables": [t.to_dict() for t in tables], "command": record["command"]}
        if not args.json:
            print(comparison_markdown(tables))
        if args.out:
            (out / f"{clf.config.name}-compare.json").write_text(json.dumps(compared, indent=2) + "\n")
            (out / f"{clf.config.name}-compare.md").write_text(comparison_markdown(tables) + "\n")
    if args.record:
        record_metrics(args.model, {"ood_shifts": record})
    print(json.dumps(record, indent=2) if args.json else table.markdown())
    return 0
