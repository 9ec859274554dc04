"""`cthub data ...`: fetch MedMNIST, extract CT into pretraining shards, inspect a file without PHI."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    data = subparsers.add_parser("data", help="datasets: fetch, extract, inspect")
    sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    data.set_defaults(func=lambda a: (data.print_help(), 0)[1])

    f = sub.add_parser("fetch", help="download a MedMNIST 2-D set and check its official MD5")
    f.add_argument("name", help="e.g. organamnist, organsmnist, organcmnist, pathmnist...")
    f.add_argument("--root", default="data", help="folder that receives NAME.npz (default: data)")
    f.add_argument("--size", type=int, default=28, choices=(28, 64, 128, 224))
    f.add_argument("--path", help="register an existing file instead of downloading (MD5-checked copy)")
    f.add_argument("--symlink", action="store_true", help="with --path: symlink instead of copying")
    f.add_argument("--timeout", type=float, default=15.0, help="network timeout per attempt, seconds")
    f.add_argument("--no-mirror", action="store_true", help="do not try the PyPI mirror")
    f.set_defaults(func=_fetch)

    e = sub.add_parser(
        "extract", help="CT series and image folders -> memory-mapped uint8 slice shards for pretraining"
    )
    e.add_argument(
        "roots",
        nargs="+",
        metavar="ROOT",
        help="folders of DICOM series (any layout: grouped by SeriesInstanceUID) or of PNG/JPEG slices",
    )
    e.add_argument("--out", required=True, help="shard directory (re-run to resume)")
    e.add_argument(
        "--size", type=int, default=256, help="stored slice size in pixels (default 256: room for 224 crops)"
    )
    e.add_argument("--mapping", default="interval", choices=("interval", "minmax", "window"))
    e.add_argument("--window", help="window preset when --mapping window (e.g. lung)")
    e.add_argument("--limit", type=int, help="only the first N series (for a trial run)")
    e.set_defaults(func=_extract)

    i = sub.add_parser("inspect", help="non-PHI summary of a DICOM or image file (or a series folder/zip)")
    i.add_argument("file")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--reject-non-ct", action="store_true", help="apply the strict modality policy")
    i.set_defaults(func=_inspect)


def _fetch(args: argparse.Namespace) -> int:
    from ctdata.fetch import fetch_medmnist

    p = fetch_medmnist(
        args.name,
        args.root,
        size=args.size,
        path=args.path,
        symlink=args.symlink,
        timeout=args.timeout,
        mirror=not args.no_mirror,
    )
    print(p)
    return 0


def _extract(args: argparse.Namespace) -> int:
    from ctdata.extract import extract_series
    from ctdata.preprocess import PreprocessConfig

    cfg = PreprocessConfig(mapping=args.mapping, window=args.window)
    stats = extract_series(args.roots, args.out, size=args.size, preprocessing=cfg, limit=args.limit)
    print(json.dumps(stats))
    return 0


def inspect_summary(path: str | Path, *, reject_non_ct: bool = False) -> dict[str, Any]:
    """What `cthub data inspect` prints: encoding, geometry, value range, warnings. Never names or ids."""
    from ctdata.dicom import DicomPolicy, is_dicom, read_dicom
    from ctdata.io import load_image
    from ctdata.series import read_series

    policy = DicomPolicy(modality="reject" if reject_non_ct else "warn")
    p = Path(path)
    if p.is_dir() or (p.is_file() and p.suffix.lower() == ".zip"):
        s = read_series(p, policy=policy)
        return {
            "kind": "series",
            "slices": len(s.pixels),
            "size": list(s.pixels.shape[1:]),
            "is_hu": s.is_hu,
            "value_range": [float(s.pixels.min()), float(s.pixels.max())],
            "skipped_files": s.skipped,
            "sorted_by_position": all(z is not None for z in s.positions),
            "warnings": s.warnings,
        }
    head = p.read_bytes()[:132] if p.is_file() else b""
    img = read_dicom(p, policy=policy) if is_dicom(head) else load_image(p)
    keep = (
        "modality",
        "sop_class",
        "transfer_syntax",
        "photometric",
        "rows",
        "columns",
        "frames",
        "bits_stored",
        "pixel_representation",
        "padding_fraction",
        "value_range",
    )
    out = {"kind": img.source, "is_hu": img.is_hu, "shape": list(img.pixels.shape)}
    out.update({k: img.meta[k] for k in keep if k in img.meta})
    if "value_range" not in out:  # HU range computed here, not on the serving path
        out["value_range"] = [float(img.pixels.min()), float(img.pixels.max())]
    out["warnings"] = img.warnings
    return out


def _inspect(args: argparse.Namespace) -> int:
    info = inspect_summary(args.file, reject_non_ct=args.reject_non_ct)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for k, v in info.items():
        if k == "warnings":
            continue
        print(f"{k:22s} {v}")
    for w in info["warnings"]:
        print(f"warning: {w}", file=sys.stdout)
    return 0
