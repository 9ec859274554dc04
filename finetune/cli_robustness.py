"""`cthub robustness` (registered by finetune.cli)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from cthub.provenance import command_line

if TYPE_CHECKING:
    from cthub.cli import SubParsers

DEFAULT_OUT = "docs/results/robustness"


def register_robustness(sub: SubParsers) -> None:
    """`cthub robustness MODEL [MODEL ...]`."""
    p = sub.add_parser(
        "robustness",
        help="test AUC of classifiers under intensity (HU), rotation, zoom and resolution shifts",
        description="Each classifier on its own test images, clean and under every shift of "
        "finetune.robustness.SHIFTS (HU offset/scale through its recorded HU -> grey mapping, rotation, "
        "zoom, downsampling); writes robustness.md and robustness.json.",
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="classifier folders or hub names")
    p.add_argument("--data", default=None, help="labeled data (default: each model's recorded source)")
    p.add_argument("--n-test", type=int, default=None, help="stratified test subset (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --n-test subset")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.set_defaults(func=_robustness)


def _robustness(a: argparse.Namespace) -> int:
    from cthub.runtime import num_threads
    from finetune.robustness import SHIFTS, report, robustness_table

    with num_threads(a.threads):
        rows = robustness_table(a.models, a.data, a.n_test, a.seed)
    command = command_line("robustness", a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    md = report(rows, SHIFTS, command)
    (out / "robustness.md").write_text(md)
    result = {
        "command": command,
        "seed": a.seed,
        "shifts": [{"name": s.name, "kind": s.kind, "severity": s.severity} for s in SHIFTS],
        "rows": [r.to_dict() for r in rows],
    }
    (out / "robustness.json").write_text(json.dumps(result, indent=2) + "\n")
    print(md)
    return 0
