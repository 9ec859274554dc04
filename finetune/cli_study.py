"""`cthub study` and `cthub cam` (registered by finetune.cli)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cthub.errors import ConfigError, MissingSplitError
from cthub.provenance import command_line
from finetune.cli_recipe import add_recipe_args, recipe_from_args

if TYPE_CHECKING:
    from cthub.cli import SubParsers

DEFAULT_ENCODERS = "scratch,spark,mocov2,byol,swav"


def _floats(s: str) -> list[float]:
    try:
        vals = [float(v) / (100.0 if float(v) > 1 else 1.0) for v in s.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--fractions must be comma-separated numbers (0-1 or %), got {s!r}") from None
    if not vals or any(not 0 < v <= 1 for v in vals):
        raise ConfigError(f"fractions must be in (0, 1] (or 1-100 %), got {s!r}")
    return vals


def register_study(sub: SubParsers) -> None:
    """`cthub study` and `cthub cam`."""
    p = sub.add_parser("study", help="label-reduction study across encoders (the paper's Table 2 / Fig. 5)")
    p.add_argument("--data", required=True)
    p.add_argument(
        "--encoders",
        default=DEFAULT_ENCODERS,
        help=f"comma-separated: scratch, hub names or folders (default {DEFAULT_ENCODERS}; "
        "missing ones are skipped with a message)",
    )
    p.add_argument("--fractions", default="1,0.75,0.5,0.25,0.1,0.05", help="training fractions (0-1 or %%)")
    p.add_argument("--seeds", type=int, default=5, help="runs per setting (seeds 0..N-1)")
    p.add_argument("--out", required=True, help="study folder (re-running resumes it)")
    p.add_argument("--protocol", choices=("split", "kfold"), default="split")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="share of training for validation (k-fold, or a split without validation)",
    )
    p.add_argument("--max-val", type=int, default=None)
    p.add_argument("--max-test", type=int, default=None)
    p.add_argument("--window", default=None, help="HU window preset for DICOM sources (e.g. mediastinum)")
    p.add_argument("--workers", type=int, default=1, help="parallel runs (each at --threads, default 1)")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: rewrite the tables, figure and cards from the cells finished so far",
    )
    add_recipe_args(p)
    p.set_defaults(func=_study)

    c = sub.add_parser("cam", help="class activation maps of classifiers, overlays and cross-model agreement")
    c.add_argument(
        "--model", required=True, action="append", help="classifier folder/name (repeat to compare)"
    )
    c.add_argument("--data", required=True, help="MedMNIST .npz or another labeled source")
    c.add_argument("--split", default="test")
    c.add_argument("--n", type=int, default=8, help="number of images")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument(
        "--stride",
        type=int,
        choices=(16, 32),
        default=16,
        help="16: Grad-CAM at layer3, the maps the API serves (default); 32: the last stage's CAM",
    )
    c.add_argument("--out", required=True, help="output folder: cams.png, cams.npz, agreement.json")
    c.set_defaults(func=_cam)


def _study(a: argparse.Namespace) -> int:
    from finetune.study import StudySpec, run_study

    names = list(dict.fromkeys(e.strip() for e in a.encoders.split(",") if e.strip()))
    if not names:
        raise ConfigError("--encoders names no encoder")
    threads = a.threads or (1 if a.workers > 1 else None)
    spec = StudySpec(
        data=a.data,
        encoders=names,
        fractions=_floats(a.fractions),
        seeds=list(range(a.seeds)),
        out=a.out,
        recipe=recipe_from_args(a, threads=threads),
        protocol=a.protocol,
        folds=a.folds,
        val_fraction=a.val_fraction,
        max_val=a.max_val,
        max_test=a.max_test,
        window=a.window,
    )
    command = command_line("study", a)
    summary = run_study(
        spec, workers=a.workers, threads_per_worker=threads or 1, command=command, report_only=a.report_only
    )
    for n, why in summary["skipped_encoders"].items():
        print(f"cthub study: not running the cells of {n!r}: not available here ({why})")
    for why in summary["taken"].values():
        print(f"cthub study: left to another process: {why}")
    print(json.dumps(summary, indent=2))
    table = Path(a.out) / "table2.md"
    if table.is_file():
        print(table.read_text())
    return 0 if not summary["failed"] else 1


def _cam(a: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from ctdata.labeled import labels_of, load_splits
    from ctdata.preprocess import prepare_batch
    from finetune.cam import class_activation_map, cross_method_correlation, save_overlays, stride16_cam
    from finetune.train import hub_config
    from hub import from_pretrained

    splits = load_splits(a.data)
    data = splits[a.split] if a.split in splits else splits.get("all")
    if data is None:
        raise MissingSplitError(f"{a.data} has no split {a.split!r} (has {sorted(splits)})")
    rng = np.random.default_rng(a.seed)
    idx = np.sort(rng.choice(len(data), size=min(a.n, len(data)), replace=False))
    images = data.images[idx]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    maps: dict[str, Any] = {}  # name -> maps [N,H,W]; Any: passed to np.savez_compressed as keywords
    preds = {}
    for m in a.model:
        model = from_pretrained(m)
        cfg = hub_config(model)
        assert cfg is not None, "from_pretrained always attaches a config"
        x = prepare_batch(images, cfg.preprocessing)
        hm, t = (stride16_cam if a.stride == 16 else class_activation_map)(model, x)
        hm = torch.nn.functional.interpolate(hm[:, None], size=images.shape[-2:], mode="bilinear")[:, 0]
        name = Path(str(m)).name
        maps[name] = hm.numpy()
        preds[name] = [cfg.labels[i] if i < len(cfg.labels) else str(i) for i in t.tolist()]
    truth = [data.class_names[y] if data.class_names else str(y) for y in labels_of(data)[idx]]
    save_overlays(images / 255.0, maps, out / "cams.png", titles=[f"true: {t}" for t in truth])
    np.savez_compressed(out / "cams.npz", images=images, index=idx, **maps)
    agreement = cross_method_correlation(maps) if len(maps) > 1 else {}
    result = {
        "images": len(idx),
        "stride": a.stride,
        "models": list(maps),
        "predictions": preds,
        "truth": truth,
        "agreement": agreement,
        "files": [str(out / "cams.png"), str(out / "cams.npz")],
    }
    (out / "agreement.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("images", "models", "agreement", "files")}, indent=2))
    return 0
