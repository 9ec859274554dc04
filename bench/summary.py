"""The one table `make bench` ends with: each benchmark's headline ratios, read from what it returned (or,
for a benchmark not run this time, from its last `bench/results/<topic>.json`, marked as such)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

Row = tuple[str, str, float | None]  # (ratio, what is compared, value)


def _get(d: Any, *keys: Any) -> Any:
    for k in keys:
        if isinstance(d, dict):
            d = d.get(k)
        elif isinstance(d, list) and isinstance(k, int) and -len(d) <= k < len(d):
            d = d[k]
        else:
            return None
    return d


def _hub(r: dict[str, Any]) -> Iterator[Row]:
    yield (
        "hub load / torch.load",
        "from_pretrained (verified) vs torch.load of a .pth",
        _get(r, "ratio_from_pretrained_over_torch_load"),
    )


def _preprocess(r: dict[str, Any]) -> Iterator[Row]:
    for name, s in (r.get("slices") or {}).items():
        yield (
            f"preprocess / model ({name})",
            f"decode+preprocess vs ORT batch-1 ({s.get('what')})",
            s.get("ratio_min"),
        )


def _pretrain(r: dict[str, Any]) -> Iterator[Row]:
    size = r.get("image_size")
    for m, res in (r.get("methods") or {}).items():
        yield (
            f"{m} step / supervised step",
            f"time per image, same encoder, {size} px, 1 thread",
            _get(res, "overhead_vs_supervised"),
        )
    if "threads_layout" in r:  # measured at the default size only
        yield (
            "2 procs x 1 thread / 1 x 2 threads",
            f"aggregate supervised training images/s, {size} px",
            _get(r, "threads_layout", "ratio_two_by_one"),
        )


def _export(r: dict[str, Any]) -> Iterator[Row]:
    for level in r.get("images_per_s") or []:
        b = level.get("batch")
        yield (
            f"ORT fp32 / torch eager (batch {b})",
            f"{r.get('size')} px images/s",
            level.get("ort_fp32_vs_eager"),
        )
        yield (
            f"ORT int8 / ORT fp32 (batch {b})",
            f"{r.get('size')} px images/s",
            level.get("ort_int8_vs_fp32"),
        )


def _serving(r: dict[str, Any]) -> Iterator[Row]:
    for level in r.get("levels") or []:
        c = level.get("concurrency")
        yield (
            f"HTTP / raw ORT (concurrency {c})",
            f"valid requests/s vs ORT batch images/s, {r.get('size')} px",
            level.get("ratio_to_raw_ort_batch"),
        )
        if "ratio_to_raw_ort_without_maps" in level:
            yield (
                f"HTTP / raw ORT without maps (concurrency {c})",
                f"valid requests/s vs ORT batch images/s of the graph without Grad-CAM, {r.get('size')} px",
                level.get("ratio_to_raw_ort_without_maps"),
            )


def _finetune(r: dict[str, Any]) -> Iterator[Row]:
    for k, v in (r.get("ratio_vs_fp32_eager") or {}).items():
        if k != "fp32_eager":
            yield (f"fine-tune {k} / fp32 eager", f"training images/s, {r.get('image_size', 64)} px", v)


def _series(r: dict[str, Any]) -> Iterator[Row]:
    for key, what in (("predict_series", "POST /predict_series"), ("pacs_loop", "PACS loop")):
        yield (
            f"{what} / raw ORT",
            f"slices/s vs ORT batch images/s: {r.get('series')}, {r.get('size')} px",
            _get(r, key, "ratio_to_raw_ort_batch"),
        )


EXTRACTORS: dict[str, Callable[[dict[str, Any]], Iterator[Row]]] = {
    "hub": _hub,
    "preprocess": _preprocess,
    "pretrain": _pretrain,
    "finetune": _finetune,
    "export": _export,
    "serving": _serving,
    "series": _series,
}


def _sizes_of(r: dict[str, Any]) -> dict[str, Any]:
    """The results a benchmark returned for its other input sizes (`other_sizes`: {"224": {...}})."""
    other = r.get("other_sizes")
    return {k: v for k, v in other.items() if isinstance(v, dict)} if isinstance(other, dict) else {}


def _size_files(results_dir: Path, topic: str) -> dict[str, Any]:
    """`<topic>-<size>px.json` files of earlier runs, by size."""
    out = {}
    for path in sorted(results_dir.glob(f"{topic}-*px.json")):
        size = path.stem.removeprefix(f"{topic}-").removesuffix("px")
        if size.isdigit():
            out[size] = json.loads(path.read_text())
    return out


def rows(results: dict[str, Any], results_dir: Path) -> list[tuple[str, str, str, float | None]]:
    """(topic, ratio, compared, value) for every known topic and size; `results` are this run's returns
    (other sizes under `other_sizes`), missing topics are read from `results_dir/<topic>.json` and
    `<topic>-<size>px.json` and marked "(earlier run)"; a size other than the topic's default is named
    in the topic column ("serving 224 px")."""
    out = []
    for topic, extract in EXTRACTORS.items():
        r, suffix = results.get(topic), ""
        if isinstance(r, dict):
            sizes = _sizes_of(r)
        else:
            path, suffix = results_dir / f"{topic}.json", " (earlier run)"
            r = json.loads(path.read_text()) if path.is_file() else None
            sizes = _size_files(results_dir, topic)
        if isinstance(r, dict) and r.get("image_size", 0) is not None:
            out += [(topic + suffix, *row) for row in extract(r)]
        for size, res in sizes.items():
            out += [(f"{topic} {size} px{suffix}", *row) for row in extract(res)]
    return out


def table(rs: list[tuple[str, str, str, float | None]]) -> str:
    """A fixed-width text table of the rows."""
    head = ("benchmark", "ratio", "value", "compared")
    body = [(t, n, "n/a" if v is None else f"{v:.2f}", c) for t, n, c, v in rs]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(3)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    return "\n".join(fmt.format(*x) for x in [head, *body])
