"""`cthub calibrate`: recalibrate a classifier on a local labeled set, as a new exported model version."""

from __future__ import annotations

import argparse
import json
import logging
from typing import TYPE_CHECKING, Any

from cthub.provenance import command_line

if TYPE_CHECKING:
    from cthub.cli import SubParsers

log = logging.getLogger(__name__)


def register_calibrate(sub: SubParsers) -> None:
    p = sub.add_parser(
        "calibrate",
        help="recalibrate a classifier on a local labeled set (new model version, re-exported)",
        description="Refit the temperature (and, for binary models, the operating point with a 95%% "
        "bootstrap interval) on a small labeled set from your site; writes a new model folder (the old one "
        "is kept untouched) and exports its ONNX file with the new calibration.",
    )
    p.add_argument("--model", required=True, help="the classifier's model folder")
    p.add_argument(
        "--data", required=True, help="labeled set: folder with labels.csv, class folders, CSV manifest"
    )
    p.add_argument("--site", default="site", help="where the set comes from (named in the card and answers)")
    p.add_argument("--out", default=None, help="new model folder (default: <model>-cal<version>-<site>)")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--sensitivity", type=float, default=None, help="binary: threshold reaching it (0-1]")
    rule.add_argument("--youden", action="store_true", help="binary: threshold maximising Youden's J")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the interval")
    p.add_argument("--no-export", action="store_true", help="do not export the new version's ONNX file")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=_calibrate)


def _calibrate(a: argparse.Namespace) -> int:
    from finetune.recalibrate import recalibrate

    out, record = recalibrate(
        a.model,
        a.data,
        a.out,
        site=a.site,
        sensitivity=a.sensitivity,
        youden=a.youden,
        command=command_line("calibrate", a),
        resamples=a.resamples,
        threads=a.threads,
    )
    summary: dict[str, Any] = {
        "saved": str(out),
        "site": a.site,
        "n": record["fitted_on"]["n"],
        "temperature": {"before": record["temperature_before"], "after": record["temperature"]},
        "ece": {
            "before": record["ece_before"],
            "after": record["ece_after"],
            "after_cross_validated": record["ece_after_cross_validated"],
        },
        "operating_point": record["operating_point"],
        "calibration_version": record["version"],
        "calibration_id": record["id"],
    }
    if not a.no_export:
        from export import export_onnx

        report = export_onnx(out, threads=a.threads)
        log.info("%s", report.summary())
        summary["onnx_sha256"] = report.onnx_sha256
    print(json.dumps(summary, indent=2))
    return 0
