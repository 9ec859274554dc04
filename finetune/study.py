"""`cthub study`: encoders x training fractions x seeds, resumable, aggregated as the paper reports it."""

from __future__ import annotations

import csv
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from cthub.errors import ConfigError, CTHubError
from finetune.config import FinetuneConfig
from finetune.metrics import format_pm, mean_std

log = logging.getLogger("finetune")
METRICS = ("accuracy", "auc", "f1")


@dataclass(frozen=True)
class Cell:
    """One run of the grid; `fold` is None for a given train/val/test split."""

    encoder: str
    fraction: float
    seed: int
    fold: int | None = None

    @property
    def key(self) -> str:
        safe = self.encoder.replace("/", "_").replace(os.sep, "_")
        return f"{safe}__f{self.fraction:g}__s{self.seed}" + ("" if self.fold is None else f"__k{self.fold}")


@dataclass
class StudySpec:
    data: str
    encoders: list[str]
    fractions: list[float]
    seeds: list[int]
    out: str
    recipe: FinetuneConfig = field(default_factory=FinetuneConfig)
    protocol: str = "split"  # split | kfold
    folds: int = 5
    val_fraction: float = 0.1
    max_val: int | None = None
    max_test: int | None = None

    def cells(self) -> list[Cell]:
        folds: list[int | None] = list(range(self.folds)) if self.protocol == "kfold" else [None]
        return [Cell(e, f, s, k) for e in self.encoders for f in self.fractions for s in self.seeds for k in folds]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["recipe"] = self.recipe.to_dict()
        return d


def run_path(out: str | Path, cell: Cell) -> Path:
    return Path(out) / "runs" / f"{cell.key}.json"


def is_done(out: str | Path, cell: Cell) -> bool:
    p = run_path(out, cell)
    try:
        return "test" in json.loads(p.read_text())
    except (OSError, ValueError):
        return False


def run_cell(spec: StudySpec, cell: Cell) -> dict[str, Any]:
    """Train and measure one cell; writes runs/<key>.json atomically (the resume marker)."""
    from finetune.data import limit, load_splits
    from finetune.splits import kfold_splits
    from finetune.train import fit

    cfg = spec.recipe.replace(seed=cell.seed)
    splits = load_splits(spec.data)
    if cell.fold is None:
        train, val, test = splits["train"], limit(splits["val"], spec.max_val, 0), splits["test"]
        test = limit(test, spec.max_test, 0)
    else:
        data = splits.get("all") or splits["train"]
        f = kfold_splits(data.labels, spec.folds, spec.val_fraction, spec.recipe.seed, data.groups)[cell.fold]
        train, val, test = data.subset(f.train), data.subset(f.val), data.subset(f.test)
    train = limit(train, cell.fraction, cell.seed)  # a different stratified subset per seed
    res = fit(cell.encoder, train, val, test, cfg)
    rec = {**asdict(cell), "n_train": len(train), "n_val": len(val), "best_epoch": res.best_epoch,
           "epochs_run": len(res.history), "wall_time_s": round(res.wall_time_s, 1),
           "val": {m: res.val_metrics[m] for m in METRICS}, "threshold": res.threshold,
           "test": {m: res.test_metrics[m] for m in (*METRICS, "n", "confusion_matrix")}}
    p = run_path(spec.out, cell)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1) + "\n")
    os.replace(tmp, p)
    return rec


def _worker(spec: StudySpec, cell: Cell, threads: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    return run_cell(spec, cell)


def available_encoders(names: list[str]) -> tuple[list[str], dict[str, str]]:
    """(usable encoders, {skipped name: reason}); 'scratch' is always usable."""
    from finetune.train import SCRATCH_NAMES

    ok, skipped = [], {}
    for n in names:
        if n.lower() in SCRATCH_NAMES:
            ok.append(n)
            continue
        try:
            from hub import from_pretrained

            from_pretrained(n, num_classes=0)
            ok.append(n)
        except CTHubError as e:
            skipped[n] = str(e)
    return ok, skipped


def run_study(spec: StudySpec, workers: int = 1, threads_per_worker: int = 1) -> dict[str, Any]:
    """Run every unfinished cell (finished ones are read back, not redone), then aggregate."""
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    _check_same_recipe(spec, out / "study.json")
    (out / "study.json").write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
    todo = [c for c in spec.cells() if not is_done(out, c)]
    done_before = len(spec.cells()) - len(todo)
    log.info("study: %d runs, %d already finished, %d to do (%d worker(s))", len(spec.cells()), done_before,
             len(todo), workers)
    failed: dict[str, str] = {}
    if workers <= 1:
        for i, c in enumerate(todo):
            log.info("[%d/%d] %s", i + 1, len(todo), c.key)
            _run_logged(spec, c, failed)
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as ex:
            futs = {ex.submit(_worker, spec, c, threads_per_worker): c for c in todo}
            for i, fut in enumerate(as_completed(futs)):
                c = futs[fut]
                try:
                    r = fut.result()
                    log.info("[%d/%d] %s: test auc %.3f f1 %.3f", i + 1, len(todo), c.key, r["test"]["auc"],
                             r["test"]["f1"])
                except CTHubError as e:
                    failed[c.key] = str(e)
                    log.warning("[%d/%d] %s failed: %s", i + 1, len(todo), c.key, e)
    from finetune.report import write_reports

    summary = write_reports(spec, out)
    summary.update(ran=len(todo) - len(failed), skipped_finished=done_before, failed=failed)
    return summary


def _check_same_recipe(spec: StudySpec, path: Path) -> None:
    """Resuming with another recipe or data would mix incomparable runs: refuse."""
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    new = spec.to_dict()
    ignore = {"threads", "device"}
    diff = sorted(k for k in new["recipe"] if k not in ignore and old.get("recipe", {}).get(k) != new["recipe"][k])
    diff += [k for k in ("data", "protocol", "folds", "val_fraction", "max_val", "max_test") if old.get(k) != new[k]]
    if diff:
        raise ConfigError(f"{path.parent} holds a study with different settings ({', '.join(diff)}); "
                          "use another --out or the same settings to resume")


def _run_logged(spec: StudySpec, c: Cell, failed: dict[str, str]) -> None:
    try:
        r = run_cell(spec, c)
        log.info("%s: test auc %.3f f1 %.3f", c.key, r["test"]["auc"], r["test"]["f1"])
    except CTHubError as e:
        failed[c.key] = str(e)
        log.warning("%s failed: %s", c.key, e)


def load_runs(spec: StudySpec, out: str | Path) -> list[dict[str, Any]]:
    return [json.loads(run_path(out, c).read_text()) for c in spec.cells() if is_done(out, c)]


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std of test metrics per (encoder, fraction), in first-seen order."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["encoder"], r["fraction"]), []).append(r)
    rows = []
    for (enc, frac), rs in groups.items():
        row: dict[str, Any] = {"encoder": enc, "fraction": frac, "runs": len(rs),
                               "n_train": round(sum(r["n_train"] for r in rs) / len(rs))}
        for m in METRICS:
            row[f"{m}_mean"], row[f"{m}_std"] = mean_std(r["test"][m] for r in rs)
            # one run has no spread to report: the value alone, not "± .000"
            row[m] = format_pm(row[f"{m}_mean"], row[f"{m}_std"]) if len(rs) > 1 else f"{row[f'{m}_mean']:.3f}"
        rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        path.write_text("")
        return
    keys = list(rows[0])
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
