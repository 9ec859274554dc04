"""`cthub quickstart`: the main job (`make run`): encoder -> few-label classifier (and its random-init
baseline) -> ONNX -> serving, each step reused when current."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

from quickstart.budgets import BUDGETS
from quickstart.tasks import TASKS

if TYPE_CHECKING:
    from cthub.cli import SubParsers


def register(subparsers: SubParsers) -> None:
    p = subparsers.add_parser(
        "quickstart",
        help="the main job: SSL encoder -> few-label classifier -> ONNX -> API + demo",
        description="Builds (or reuses) a SparK encoder (the best `make pretrain` encoder when one is in the "
        "local hub, else a short CPU run), fine-tunes it and a random-init baseline on the same few labels, "
        "records the comparison in the model card, exports ONNX fp32 + int8, then (--serve) serves the API "
        "and the demo.",
    )
    p.add_argument(
        "--data",
        required=True,
        help="labeled data: OrganAMNIST .npz, a folder (labels.csv or class folders), a CSV manifest or "
        "DICOM+CSV",
    )
    p.add_argument(
        "--task",
        choices=sorted(TASKS),
        default=None,
        help="input size, HU window and served folder: "
        + "; ".join(f"{t.name}: {t.description}" for t in TASKS.values())
        + " (default: from the data: .npz organamnist, a source named head_ct head-ct, else slices)",
    )
    p.add_argument("--budget", choices=sorted(BUDGETS), default="quick", help="quick (~20 min) or tiny (CI)")
    p.add_argument("--models", default="models", help="where the classifiers are written (default models/)")
    p.add_argument("--serve", action="store_true", help="then serve it (cthub serve) on --host:--port")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    p.set_defaults(func=quickstart)


def quickstart(a: argparse.Namespace) -> int:
    from quickstart.pipeline import build, other_served, plan

    p = plan(a.data, a.budget, a.models, a.task)
    state = build(p)
    print("\n" + json.dumps(state, indent=2), flush=True)
    if not a.serve:
        return 0
    argv = [sys.executable, "-m", "cthub", "serve", "--model", state["classifier"], "--host", a.host]
    argv += ["--port", str(a.port), "--variant", state["variant"]]
    for other in other_served(p):  # the other tasks' classifiers made here before: the demo offers them too
        argv += ["--also", str(other)]
    sys.stdout.flush()
    os.execv(sys.executable, argv)  # noqa: S606 -- this interpreter; the server replaces this process
    return 0  # not reached
