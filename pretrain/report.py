"""What pretraining runs did, from their own logs: a table (budget, throughput, loss, weight movement, kNN)
and the kNN-monitor curves, for `docs/results/`.

Reads each run directory's `checkpoint.pt` (config, step, elapsed), `metrics.csv` and `monitor.csv`; writes
`pretrain-runs.md`, `pretrain-runs.json` and `knn-monitor.png`. Nothing is measured here: it reports.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import logging
from pathlib import Path
from typing import Any

import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pretrain.monitor import read_monitor

log = logging.getLogger(__name__)


def summarize_run(run_dir: str | Path) -> dict[str, Any]:
    """One run's facts: method, recipe settings, steps done/planned, minutes, epochs, images/s, losses,
    first/best/last kNN monitor rows and the final weight change."""

    d = Path(run_dir)
    metrics = _read_csv(d / "metrics.csv")
    if (d / "checkpoint.pt").is_file():
        ckpt = torch.load(d / "checkpoint.pt", map_location="cpu", weights_only=True)
        cfg, step, elapsed = ckpt["config"], int(ckpt["step"]), float(ckpt["elapsed"])
    else:  # interrupted before its first checkpoint: what the logs say
        cfg = json.loads((d / "run_config.json").read_text())
        step = int(metrics[-1]["step"]) if metrics else 0
        elapsed = float(metrics[-1]["elapsed_s"]) if metrics else 0.0
    mon = read_monitor(d / "monitor.csv") if (d / "monitor.csv").is_file() else []
    out: dict[str, Any] = {
        "run": d.name,
        "method": cfg["method"],
        "image_size": cfg["image_size"],
        "batch_size": cfg["batch_size"],
        "optimizer": cfg["optimizer"],
        "base_lr": cfg["base_lr"],
        "steps": step,
        "planned_steps": cfg.get("steps"),
        "minutes": round(elapsed / 60, 1),
        "max_minutes": cfg.get("max_minutes"),
        "threads": cfg.get("threads"),
        "init": cfg.get("init"),
    }
    if metrics:
        out["epochs"] = float(metrics[-1]["epoch"])
        out["first_loss"] = float(metrics[0]["loss"])
        out["last_loss"] = float(metrics[-1]["loss"])
        ips = [float(r["images_per_s"]) for r in metrics[1:]] or [float(metrics[0]["images_per_s"])]
        out["images_per_s_median"] = sorted(ips)[len(ips) // 2]
    if mon:
        out["knn_first"] = mon[0].get("knn_accuracy")
        out["knn_last"] = mon[-1].get("knn_accuracy")
        out["knn_best"] = max(r.get("knn_accuracy", 0.0) for r in mon)
        out["knn_auc_last"] = mon[-1].get("knn_auc")
        out["majority_accuracy"] = mon[-1].get("majority_accuracy")
        out["collapse_std_last"] = mon[-1].get("collapse_std")
        out["weight_change_total"] = mon[-1].get("change_total")
        out["monitor"] = mon
    return out


def merge_runs(earlier: list[dict[str, Any]], fresh: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of `earlier` (a previous report) whose run is not among `fresh` stay, marked as such: run
    folders live on one machine, the report in the repository outlives it. Fresh rows replace same-named
    ones; order: earlier rows' order, new runs after."""
    by_name = {r["run"]: r for r in fresh}
    merged = [
        by_name.pop(r["run"]) if r["run"] in by_name else {**r, "from_earlier_report": True} for r in earlier
    ]
    return merged + [r for r in fresh if r["run"] in by_name]


def write_report(run_dirs: list[str | Path], out_dir: str | Path, command: str = "") -> dict[str, Path]:
    """The table, JSON and curves of `run_dirs` into `out_dir`, keeping the rows of runs reported there
    earlier whose folders are not on this machine; returns the written paths."""
    fresh = [
        summarize_run(d) | {"reported": _dt.date.today().isoformat()}
        for d in run_dirs
        if (Path(d) / "checkpoint.pt").is_file() or (Path(d) / "run_config.json").is_file()
    ]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "pretrain-runs.json",
        "md": out / "pretrain-runs.md",
        "png": out / "knn-monitor.png",
    }
    earlier = json.loads(paths["json"].read_text()) if paths["json"].is_file() else []
    runs = merge_runs(earlier, fresh)
    paths["json"].write_text(json.dumps(runs, indent=2))
    paths["md"].write_text(_markdown(runs, command))
    _plot(runs, paths["png"])
    return paths


def _markdown(runs: list[dict[str, Any]], command: str) -> str:
    head = (
        "| run | method | px | optimizer, lr/256 | steps (planned) | min | epochs | img/s "
        "| loss first → last | kNN acc start → best → last | weight change |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in runs:
        mark = " †" if r.get("from_earlier_report") else ""
        rows.append(
            f"| {r['run']}{mark} | {r['method']} | {r['image_size']} | {r['optimizer']} {r['base_lr']:g} "
            f"| {r['steps']} "
            f"({r['planned_steps']}) | {r['minutes']} | {r.get('epochs', float('nan')):.2f} "
            f"| {r.get('images_per_s_median', float('nan')):.1f} "
            f"| {r.get('first_loss', float('nan')):.3f} → {r.get('last_loss', float('nan')):.3f} "
            f"| {_f(r.get('knn_first'))} → {_f(r.get('knn_best'))} → {_f(r.get('knn_last'))} "
            f"| {_f(r.get('weight_change_total'))} |"
        )
    note = (
        "\nkNN: k=20 cosine, exp(sim/0.07) votes, 500 OrganAMNIST validation images as bank and 500 as "
        "queries, "
        "the encoder's own BN statistics; weight change: ||W - W0|| / ||W0|| over all convolutions.\n"
    )
    if any(r.get("from_earlier_report") for r in runs):
        note += (
            "\n† kept from an earlier report: the run's folder is not on the machine that wrote this one.\n"
        )
    return (f"Made by `{command}`\n\n" if command else "") + head + "\n".join(rows) + "\n" + note


def _f(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}"


def _plot(runs: list[dict[str, Any]], path: Path) -> None:
    """kNN monitor and weight change against epochs of pretraining (images seen / training images: the
    budget, unlike wall minutes, does not depend on what else ran); a run continued from another encoder
    (--init) is dashed and starts at 0, with its parent's own pretraining not drawn."""

    fig = Figure(figsize=(11, 5.2))
    FigureCanvasAgg(fig)
    ax_acc, ax_chg = fig.subplots(1, 2)
    tab20 = colormaps["tab20"]  # 20 colours in pairs, dark then light
    for i, r in enumerate(runs):
        mon = r.get("monitor") or []
        if not mon:
            continue
        style = {
            "color": tab20((2 * i + i // 10 % 2) % 20),  # the ten dark shades, then the ten light ones
            "ls": "--" if r.get("init") else "-",
            "marker": "o",
            "ms": 2.5,
            "lw": 1.3,
            "label": r["run"] + (f" (from {r['init']})" if r.get("init") else ""),
        }
        epochs = [float(m.get("epoch", 0.0)) for m in mon]
        ax_acc.plot(epochs, [m.get("knn_accuracy") for m in mon], **style)
        ax_chg.plot(epochs, [m.get("change_total") for m in mon], **style)
    if runs and runs[0].get("majority_accuracy") is not None:
        ax_acc.axhline(runs[0]["majority_accuracy"], color="grey", ls=":", label="majority class")
    ax_acc.set(xlabel="epochs of pretraining", ylabel="kNN accuracy (val)", title="online kNN monitor")
    ax_chg.set(xlabel="epochs of pretraining", ylabel="||W - W0|| / ||W0||", title="encoder weight change")
    handles, labels = ax_acc.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    rows = (len(labels) + 2) // 3
    fig.tight_layout(rect=(0, min(0.45, 0.034 * rows + 0.01), 1, 1))
    fig.savefig(path, dpi=120)


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))
