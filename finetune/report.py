"""Study outputs: runs CSV, summary JSON, the paper's Table 2 layout (Markdown) and Figure 5 (PNG).

Works on run records (dicts, as `finetune.study` writes them); knows nothing about how they were produced.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from hub.metrics import format_pm, mean_std

METRICS = ("accuracy", "auc", "f1")


def pct(fraction: float) -> str:
    """0.05 -> '5%', 0.005 -> '0.5%' (never rounds a small fraction to '0%')."""
    return f"{fraction * 100:.4g}%"


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std of test metrics per (encoder, fraction), in first-seen order; `unconverged` counts the runs
    still improving when their budget ended (`finetune.train.has_converged`; records without the flag count
    as converged)."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["encoder"], r["fraction"]), []).append(r)
    rows = []
    for (enc, frac), rs in groups.items():
        row: dict[str, Any] = {
            "encoder": enc,
            "fraction": frac,
            "runs": len(rs),
            "n_train": round(sum(r["n_train"] for r in rs) / len(rs)),
            "unconverged": sum(not r.get("converged", True) for r in rs),
        }
        for m in METRICS:
            row[f"{m}_mean"], row[f"{m}_std"] = mean_std(r["test"][m] for r in rs)
            # one run has no spread to report: the value alone, not "± .000"
            mean, std = row[f"{m}_mean"], row[f"{m}_std"]
            row[m] = format_pm(mean, std) if len(rs) > 1 else f"{mean:.3f}"
        rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rows as CSV, the header every key of any row in the order first seen (records written before a field
    existed leave its cell empty); an empty file for no rows."""
    if not rows:
        path.write_text("")
        return
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)


def table2_markdown(
    rows: list[dict[str, Any]],
    title: str = "",
    *,
    encoders: list[str] | None = None,
    fractions: list[float] | None = None,
    failed: int = 0,
) -> str:
    """Rows = pretraining (encoder); per training fraction an AUC and an F1 column, mean ± std of runs.
    `encoders`/`fractions` (the whole grid) also list cells without a finished run, as '–'."""
    fracs = sorted({r["fraction"] for r in rows} | set(fractions or ()), reverse=True)
    encoders = list(dict.fromkeys([*(encoders or ()), *(r["encoder"] for r in rows)]))
    by = {(r["encoder"], r["fraction"]): r for r in rows}
    most = max(r["runs"] for r in rows)
    head = ["pretraining"] + [f"{pct(f)} {m}" for f in fracs for m in ("AUC", "F1")]
    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in encoders:
        cells = [e]
        for f in fracs:
            r = by.get((e, f))
            # a cell with fewer finished runs than the others (a study still under way) says how many
            n = f" (n={r['runs']})" if r and r["runs"] < most else ""
            cells += [r["auc"] + n, r["f1"] + n] if r else ["–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    runs = sorted({r["runs"] for r in rows})
    ntrain = {f: max((r["n_train"] for r in rows if r["fraction"] == f), default=0) for f in fracs}
    spread = (
        "mean ± std over " + "/".join(map(str, runs)) + " runs"
        if max(runs) > 1
        else "one run each (no spread)"
    )
    lines += [
        "",
        "Test AUC / F1, " + spread + "; training images per "
        "fraction: "
        + ", ".join(f"{pct(f)} = {ntrain[f]:,}" if ntrain[f] else f"{pct(f)}: none yet" for f in fracs)
        + ".",
    ]
    unconverged = sum(r.get("unconverged", 0) for r in rows)
    if unconverged:
        total = sum(r["runs"] for r in rows)
        lines.append(
            f"{unconverged} of {total} runs were still improving when their epoch budget ended (best epoch "
            "within the early-stopping patience of the end): the budget was probably too short for them (see "
            "`converged` and `best_epoch` in results.csv)."
        )
    if failed:
        lines.append(f"{failed} run(s) failed; their errors are in results.json.")
    return "\n".join(lines) + "\n"


def figure5(
    rows: list[dict[str, Any]], path: str | Path, title: str = "", *, fractions: list[float] | None = None
) -> Path:
    """AUC and F1 vs the labeled fraction, as the paper's Figure 5: a log axis from most labels (left) to
    fewest, ticks at every fraction of the design (`fractions`; those without a finished run yet stay
    empty), one line per encoder (mean, ± std band, or a ± std bar for an encoder at one fraction only;
    solid for the first ten named, then dashed), the legend outside the axes. A point averaging fewer runs
    than the study's fullest cell is drawn hollow."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullLocator

    encoders = list(dict.fromkeys(r["encoder"] for r in rows))
    ticks = sorted({r["fraction"] for r in rows} | set(fractions or ()))
    most = max(r["runs"] for r in rows)
    fig = Figure(figsize=(11, 5.6), layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself: no pyplot, no global backend switch
    axes = fig.subplots(1, 2)
    # ten distinct colours in the order the encoders are named; beyond ten, the same colours dashed
    cmap = colormaps["tab10"]
    for ax, m, name in ((axes[0], "auc", "AUC"), (axes[1], "f1", "macro F1")):
        for i, enc in enumerate(encoders):
            rs = sorted((r for r in rows if r["encoder"] == enc), key=lambda r: r["fraction"])
            x = [100 * r["fraction"] for r in rs]
            mu = [r[f"{m}_mean"] for r in rs]
            sd = [r[f"{m}_std"] for r in rs]
            color, style = cmap(i % 10), ("-", "--", ":")[i // 10 % 3]
            ax.plot(x, mu, marker="o", ls=style, color=color, label=enc)
            for xi, yi, r in zip(x, mu, rs, strict=True):
                if r["runs"] < most:
                    ax.plot(xi, yi, "o", color=color, markerfacecolor="white")
            ax.fill_between(
                x,
                [a - b for a, b in zip(mu, sd, strict=True)],
                [a + b for a, b in zip(mu, sd, strict=True)],
                color=color,
                alpha=0.12,
                linewidth=0,
            )
            if len(rs) == 1 and sd[0] > 0:  # a band needs two fractions: one point shows its spread as a bar
                ax.errorbar(x, mu, yerr=sd, fmt="none", ecolor=color, elinewidth=1.2, capsize=4)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator([100 * f for f in ticks]))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([pct(f) for f in ticks])
        ax.set_xlim(100 * ticks[-1] * 1.25, 100 * ticks[0] / 1.25)  # most labels left
        ax.set_xlabel("labeled training data")
        ax.set_ylabel(f"test {name}")
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), title="pretraining", loc="outside lower center", ncols=3)
    fewer = any(r["runs"] < most for r in rows)
    note = f"mean ± std over up to {most} runs" + ("; hollow: fewer runs" if fewer else "")
    fig.suptitle(f"{title} — {note}" if title else note)
    fig.savefig(path, dpi=120)
    return Path(path)


def _flat(run: dict[str, Any]) -> dict[str, Any]:
    """One results.csv row: the run's fields with test_/val_ metric columns instead of nested dicts."""
    row = {k: v for k, v in run.items() if k not in ("test", "val")}
    row.setdefault("converged", "")  # runs recorded before the flag existed: unknown
    if isinstance(hw := row.get("hardware"), dict):  # one readable cell: CPU (kernel flags), torch
        flags = " ".join(hw.get("flags") or [])
        row["hardware"] = f"{hw.get('cpu')} ({flags}), torch {hw.get('torch')}"
    return row | {f"test_{m}": run["test"][m] for m in METRICS} | {f"val_{m}": run["val"][m] for m in METRICS}


def write_reports(
    out: str | Path,
    runs: list[dict[str, Any]],
    *,
    spec: dict[str, Any],
    title: str,
    failed: dict[str, str] | None = None,
) -> dict[str, Any]:
    """results.csv (every finished run), summary.csv (mean ± std), results.json (spec, runs, summary, failed
    cells with their errors), table2.md and figure5.png when any run finished."""
    out = Path(out)
    write_csv(out / "results.csv", [_flat(r) for r in runs])
    rows = aggregate(runs)
    write_csv(out / "summary.csv", rows)
    (out / "results.json").write_text(
        json.dumps({"spec": spec, "runs": runs, "summary": rows, "failed": failed or {}}, indent=1) + "\n"
    )
    files = {"results_csv": str(out / "results.csv"), "results_json": str(out / "results.json")}
    if rows:
        table = table2_markdown(
            rows,
            title,
            encoders=spec.get("encoders"),
            fractions=spec.get("fractions"),
            failed=len(failed or {}),
        )
        (out / "table2.md").write_text(table)
        figure5(rows, out / "figure5.png", title, fractions=spec.get("fractions"))
        files.update(table=str(out / "table2.md"), figure=str(out / "figure5.png"))
    keys = ("encoder", "fraction", "runs", "unconverged", *METRICS)
    return {"runs": len(runs), "summary": [{k: r[k] for k in keys} for r in rows], "files": files}
