"""Study outputs: runs CSV, summary JSON, the paper's Table 2 layout (Markdown) and Figure 5 (PNG)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def pct(fraction: float) -> str:
    """0.05 -> '5%', 0.005 -> '0.5%' (never rounds a small fraction to '0%')."""
    return f"{fraction * 100:.4g}%"


def table2_markdown(rows: list[dict[str, Any]], title: str = "") -> str:
    """Rows = pretraining (encoder); per training fraction an AUC and an F1 column, mean ± std of runs."""
    fracs = sorted({r["fraction"] for r in rows}, reverse=True)
    encoders = list(dict.fromkeys(r["encoder"] for r in rows))
    by = {(r["encoder"], r["fraction"]): r for r in rows}
    head = ["pretraining"] + [f"{pct(f)} {m}" for f in fracs for m in ("AUC", "F1")]
    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in encoders:
        cells = [e]
        for f in fracs:
            r = by.get((e, f))
            cells += [r["auc"], r["f1"]] if r else ["–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    runs = sorted({r["runs"] for r in rows})
    ntrain = {f: max(r["n_train"] for r in rows if r["fraction"] == f) for f in fracs}
    spread = "mean ± std over " + "/".join(map(str, runs)) + " runs" if max(runs) > 1 else "one run each (no spread)"
    lines += ["", "Test AUC / F1, " + spread + "; training images per "
              "fraction: " + ", ".join(f"{pct(f)} = {ntrain[f]:,}" for f in fracs) + "."]
    return "\n".join(lines) + "\n"


def figure5(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """AUC and F1 vs training fraction, one line (mean, ± std band) per encoder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, m, name in ((axes[0], "auc", "AUC"), (axes[1], "f1", "F1")):
        for enc in dict.fromkeys(r["encoder"] for r in rows):
            rs = sorted((r for r in rows if r["encoder"] == enc), key=lambda r: r["fraction"])
            x = [100 * r["fraction"] for r in rs]
            mu = [r[f"{m}_mean"] for r in rs]
            sd = [r[f"{m}_std"] for r in rs]
            ax.plot(x, mu, marker="o", label=enc)
            ax.fill_between(x, [a - b for a, b in zip(mu, sd)], [a + b for a, b in zip(mu, sd)], alpha=0.15)
        ax.set_xlabel("training data (%)")
        ax.set_ylabel(f"test {name}")
        ax.grid(alpha=0.3)
        ax.invert_xaxis()
    axes[1].legend(title="pretraining")
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_reports(spec: Any, out: str | Path) -> dict[str, Any]:
    """results.csv (every run), summary.json/.csv (mean ± std), table2.md, figure5.png."""
    from finetune.study import aggregate, load_runs, write_csv

    out = Path(out)
    runs = load_runs(spec, out)
    flat = [{k: v for k, v in r.items() if k not in ("test", "val")}
            | {f"test_{m}": r["test"][m] for m in ("accuracy", "auc", "f1")}
            | {f"val_{m}": r["val"][m] for m in ("accuracy", "auc", "f1")} for r in runs]
    write_csv(out / "results.csv", flat)
    rows = aggregate(runs)
    write_csv(out / "summary.csv", rows)
    (out / "results.json").write_text(json.dumps({"spec": spec.to_dict(), "runs": runs, "summary": rows},
                                                 indent=1) + "\n")
    files = {"results_csv": str(out / "results.csv"), "results_json": str(out / "results.json")}
    if rows:
        title = f"{Path(spec.data).name}: {spec.protocol}"
        (out / "table2.md").write_text(table2_markdown(rows, title))
        figure5(rows, out / "figure5.png", title)
        files.update(table=str(out / "table2.md"), figure=str(out / "figure5.png"))
    return {"runs": len(runs), "summary": [{k: r[k] for k in ("encoder", "fraction", "runs", "accuracy", "auc",
                                                               "f1")} for r in rows], "files": files}
