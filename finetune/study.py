"""`cthub study`: encoders x training fractions x seeds, resumable, aggregated as the paper reports it.

Every cell writes runs/<key>.json: its measurements when it finished (the resume marker), or its error when it
failed. A failed cell never stops the others and is tried again when the study is resumed.

The epoch budget may be raised (or lowered) on resume: nothing in a run depends on the budget until the run
reaches it (the backbone's lr ramp counts epochs from the start, early stopping counts epochs without
improvement), so a finished cell that stopped early within the new budget is the run the new budget would
make and is kept; a cell that ran its whole budget (still improving) is run again with the new one.

A record names the encoder weights it measured by their digest (`hub.manifest.weights_digest`: the tensors,
not the file, whose bytes safetensors does not fix): when the local encoder of that name has other weights
now (re-made differently by `cthub pretrain --publish`), the record is stale, left out of the reports and run
again; re-made to the same tensors (the recipes are deterministic), it stands. Records from before the digest
hold the file's sha256 only; they stand when it is the local file's under some order of its metadata keys, and
are then given the digest. Where the encoder is not stored locally (a fresh clone reporting committed cells),
records are kept.

A folder's reports cover its whole grid: the encoders, fractions and seeds of every invocation so far
(study.json keeps their union), so a run over a subset (one new encoder, one more fraction) adds its rows to
the tables instead of replacing them; to drop an encoder from the reports, delete its runs/ records and its
name from study.json.

Several studies may run into one folder at once (one per core, each on its own encoders, or the same command
twice): a running cell is held by its process (`cell_lock`), so another study leaves it to that process
(`CellTakenError`, reported as `taken`) and goes on with the cells nobody holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from ctdata.labeled import TrainValTest, data_preprocessing, load_splits, select_splits
from cthub.errors import ConfigError, CTHubError
from cthub.runtime import hardware, precision_label, select_device
from finetune.config import FinetuneConfig
from finetune.report import aggregate, pct, write_csv, write_reports
from finetune.resume import FitCheckpoint
from finetune.train import SCRATCH_NAMES, fit, has_converged
from hub.config import WEIGHTS_NAME, ModelConfig
from hub.io import from_pretrained, hub_dir, local_model_dir, record_metrics
from hub.manifest import sha256_any_metadata_order, sha256_file, weights_digest

__all__ = [
    "Cell",
    "CellTakenError",
    "StudySpec",
    "aggregate",
    "available_encoders",
    "is_done",
    "load_runs",
    "record_in_cards",
    "run_cell",
    "run_path",
    "run_study",
    "write_csv",
]
log = logging.getLogger(__name__)
METRICS = ("accuracy", "auc", "f1")
# how one invocation runs, not what the study compares: left out of study.json (cells run side by side at
# other thread counts would each rewrite it) and recorded in each cell's record beside its wall time
EXECUTION_SETTINGS = ("threads", "device")
# what a card needs to say about how its study rows were trained
STUDY_RECIPE_KEYS = ("image_size", "epochs", "head_epochs", "patience", "select_metric", "lr", "batch_size")


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
    """The grid and how every cell is trained; `recipe.seed` fixes the partition (folds, validation share,
    val/test subsets), the same for every cell, while each cell's seed draws its training subset and init."""

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
    window: str | None = None  # HU window preset for DICOM sources; None: the data's known or default mapping

    @property
    def split_seed(self) -> int:
        return self.recipe.seed

    def cells(self) -> list[Cell]:
        """Smallest fraction first, then seed and fold, every encoder within: a study stopped part-way has
        comparable rows (all encoders on the same labels) rather than one encoder done everywhere."""
        folds: list[int | None] = list(range(self.folds)) if self.protocol == "kfold" else [None]
        return [
            Cell(e, f, s, k)
            for f in sorted(self.fractions)
            for s in self.seeds
            for k in folds
            for e in self.encoders
        ]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["data"] = Path(self.data).name  # where it sits on this machine is not part of the study
        d["recipe"] = {k: v for k, v in self.recipe.to_dict().items() if k not in EXECUTION_SETTINGS}
        d["split_seed"] = self.split_seed
        return d


def checkpoint_path(out: str | Path, cell: Cell) -> Path:
    """Where a running cell keeps its state between epochs: under the local hub's runs (never in the study
    folder, which may live in a repository), one folder per study folder."""
    where = Path(out).resolve()
    tag = hashlib.sha256(str(where).encode()).hexdigest()[:10]
    return hub_dir() / "runs" / "study-cells" / f"{where.name}-{tag}" / f"{cell.key}.pt"


def run_path(out: str | Path, cell: Cell) -> Path:
    return Path(out) / "runs" / f"{cell.key}.json"


def _read(out: str | Path, cell: Cell) -> dict[str, Any] | None:
    try:
        rec = json.loads(run_path(out, cell).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def same_run_within(rec: dict[str, Any], epochs: int) -> bool:
    """Whether a finished record is the run an epoch budget of `epochs` makes: it ran under that budget, or
    it stopped early (before its own budget) at or before `epochs`."""
    budget, ran = int(rec.get("epoch_budget", epochs)), int(rec["epochs_run"])
    return budget == epochs or (ran < budget and ran <= epochs)


@dataclass
class LocalWeights:
    """The weights file of a local encoder, as study records identify it (each hash computed once)."""

    path: Path

    @functools.cached_property
    def digest(self) -> str:
        return weights_digest(self.path)

    @functools.cached_property
    def sha256(self) -> str:
        return sha256_file(self.path)

    @functools.cached_property
    def legacy_sha256s(self) -> frozenset[str]:
        return sha256_any_metadata_order(self.path)


def measured_weights(rec: dict[str, Any], weights: LocalWeights | None) -> bool:
    """Whether a record measured these weights: by digest, or for a record from before digests by the file's
    sha256 under any metadata order. True when either side does not say (scratch, an encoder not stored here,
    a record from before records kept either)."""
    if weights is None:
        return True
    if rec.get("encoder_digest"):
        return bool(rec["encoder_digest"] == weights.digest)
    said = rec.get("encoder_sha256")
    return said is None or said in weights.legacy_sha256s


def is_done(
    out: str | Path, cell: Cell, epochs: int | None = None, weights: LocalWeights | None = None
) -> bool:
    """Whether the cell finished (a failure record does not count), under an epoch budget of `epochs` when
    given (`same_run_within`), on the encoder weights `weights` when given (`measured_weights`)."""
    rec = _read(out, cell)
    if rec is None or "test" not in rec or not measured_weights(rec, weights):
        return False
    return epochs is None or same_run_within(rec, epochs)


def _stamp_epoch_budgets(out: Path, budget: int) -> None:
    """Records written before cells kept their budget ran under the study's (`budget`): write it in them
    before the study's settings change."""
    for p in sorted((out / "runs").glob("*.json")):
        rec = json.loads(p.read_text())
        if "test" in rec and "epoch_budget" not in rec:
            rec["epoch_budget"] = budget
            tmp = p.with_suffix(".tmp")
            tmp.write_text(json.dumps(rec, indent=1) + "\n")
            os.replace(tmp, p)


def _write_record(out: str | Path, cell: Cell, rec: dict[str, Any]) -> None:
    """runs/<key>.json, atomically (a crash never leaves a half-written resume marker)."""
    p = run_path(out, cell)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1) + "\n")
    os.replace(tmp, p)


def encoder_weights(name: str) -> LocalWeights | None:
    """A local encoder's weights (None for scratch or an encoder not stored locally): each record says which
    weights it measured, so cells resumed after an encoder was re-made can be told apart."""
    if name.lower() in SCRATCH_NAMES:
        return None
    d = local_model_dir(name)
    return None if d is None else LocalWeights(d / WEIGHTS_NAME)


def local_weights(encoders: list[str]) -> dict[str, LocalWeights | None]:
    """name -> its local weights (`encoder_weights`)."""
    return {e: encoder_weights(e) for e in dict.fromkeys(encoders)}


def _weights_fields(weights: LocalWeights | None) -> dict[str, str | None]:
    """What a record keeps of the weights it measured."""
    if weights is None:
        return {"encoder_sha256": None, "encoder_digest": None}
    return {"encoder_sha256": weights.sha256, "encoder_digest": weights.digest}


def _check_weights(out: Path, cells: list[Cell], weights: dict[str, LocalWeights | None]) -> None:
    """Give records from before digests that measured the local weights the digest, and say which finished
    cells measured other weights than the local encoder's (they are run again)."""
    for c in cells:
        rec, local = _read(out, c), weights[c.encoder]
        if rec is None or "test" not in rec or local is None:
            continue
        if not measured_weights(rec, local):
            kind, said, mine = (
                ("digest", rec["encoder_digest"], local.digest)
                if rec.get("encoder_digest")
                else ("file sha256", rec["encoder_sha256"], local.sha256)
            )
            log.warning(
                "%s measured %s weights (%s %.12s), the local ones are %.12s: run again",
                c.key,
                c.encoder,
                kind,
                said,
                mine,
            )
        elif not rec.get("encoder_digest") and rec.get("encoder_sha256"):
            _write_record(out, c, {**rec, "encoder_digest": local.digest})


class CellTakenError(CTHubError):
    """Another process holds the cell (a second study running into the same folder), or finished it after this
    study listed it: the cell is left to that process, neither run twice nor recorded as failed."""


@contextlib.contextmanager
def cell_lock(out: str | Path, cell: Cell) -> Iterator[None]:
    """Hold `cell` for this process while it runs: an exclusive lock on a file beside its checkpoint, which
    the system releases however the process ends (no stale locks after a kill). Two processes training one
    cell would overwrite each other's checkpoint; the second raises `CellTakenError` instead."""
    path = checkpoint_path(out, cell).with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:  # append mode: opening never truncates the holder's pid
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            raise CellTakenError(
                f"{cell.key} is running in another process{f' (pid {holder})' if holder else ''}"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def precision(recipe: FinetuneConfig) -> str:
    """What the cell's arithmetic was: cells accumulate across machines, and "auto" means bf16 autocast on
    CPUs with native bf16 (AVX512-BF16, AMX) and fp32 elsewhere."""
    device = select_device(recipe.device)
    return precision_label(device, recipe.resolved_amp(device))


def _threads(recipe: FinetuneConfig) -> int:
    """The intra-op threads a cell trains with (its wall time depends on them; a cell resumed at another
    count reports the count of the process that finished it)."""
    if recipe.threads:
        return recipe.threads

    return torch.get_num_threads()


def run_cell(
    spec: StudySpec,
    cell: Cell,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    *,
    unless_finished: bool = False,
) -> dict[str, Any]:
    """Train and measure one cell; writes runs/<key>.json (the resume marker). A cell interrupted part-way
    continues from its last checkpoint (`checkpoint_path`, written every few minutes). `on_epoch` gets each
    epoch's record (`finetune.train.fit`). The cell is held by this process while it runs (`cell_lock`);
    `unless_finished` raises `CellTakenError` when its record says it finished meanwhile (a study listed its
    cells to do before another process ran some of them)."""
    with cell_lock(spec.out, cell):
        if unless_finished and is_done(spec.out, cell, spec.recipe.epochs, encoder_weights(cell.encoder)):
            raise CellTakenError(f"{cell.key} was finished by another process meanwhile")
        return _train_cell(spec, cell, on_epoch)


def cell_splits(spec: StudySpec, cell: Cell) -> TrainValTest:
    """The train/val/test images of one cell: `ctdata.labeled.select_splits` on the study's data, so a
    k-fold study splits by the data's groups (a CSV's `patient` column) as `cthub finetune` does."""
    return select_splits(
        load_splits(spec.data, data_preprocessing(spec.data, spec.window)),
        fold=cell.fold,
        folds=spec.folds,
        val_fraction=spec.val_fraction,
        split_seed=spec.split_seed,
        train_size=cell.fraction,
        train_seed=cell.seed,  # a subset per seed
        max_val=spec.max_val,
        max_test=spec.max_test,
    )


def _train_cell(
    spec: StudySpec, cell: Cell, on_epoch: Callable[[dict[str, Any]], None] | None
) -> dict[str, Any]:
    train, val, test = cell_splits(spec, cell)
    pp = data_preprocessing(spec.data, spec.window, input_size=spec.recipe.image_size)
    res = fit(
        cell.encoder,
        train,
        val,
        test,
        spec.recipe.replace(seed=cell.seed),
        preprocessing=pp,
        on_epoch=on_epoch,
        checkpoint=FitCheckpoint(checkpoint_path(spec.out, cell)),
    )
    assert res.test_metrics is not None
    rec = {
        **asdict(cell),
        **_weights_fields(encoder_weights(cell.encoder)),
        "precision": precision(spec.recipe),
        "threads": _threads(spec.recipe),
        "hardware": hardware(),
        "n_train": len(train),
        "n_val": len(val),
        "best_epoch": res.best_epoch,
        "epochs_run": len(res.history),
        "epoch_budget": spec.recipe.epochs,
        "converged": res.converged,
        "wall_time_s": round(res.wall_time_s, 1),
        "val": {m: res.val_metrics[m] for m in (*METRICS, "loss")},
        "threshold": res.threshold,
        "test": {m: res.test_metrics[m] for m in (*METRICS, "n", "confusion_matrix")},
    }
    _write_record(spec.out, cell, rec)
    return rec


class EpochProgress:
    """A line per epoch of a cell running in a worker process (whose training log is quiet): the cell, the
    epoch of its budget, validation AUC, the best so far and the time per epoch, so a cell of half an hour
    shows how it goes and how long an epoch takes."""

    def __init__(self, cell: Cell, budget: int) -> None:
        self.cell, self.budget = cell, budget
        self.best: tuple[float, int] | None = None
        self.resumed: bool | None = None  # known from the first epoch reported

    def __call__(self, rec: dict[str, Any]) -> None:
        if self.resumed is None:
            self.resumed = rec["epoch"] > 1  # the cell continues an interrupted run from its checkpoint
            if self.resumed:
                log.info(
                    "%s: resumed from its checkpoint at epoch %d of %d",
                    self.cell.key,
                    rec["epoch"],
                    self.budget,
                )
        if rec["best"]:
            self.best = (rec["val_auc"], rec["epoch"])
        since = " since the resume" if self.resumed else ""
        best = f"best{since} {self.best[0]:.3f} at {self.best[1]}" if self.best else f"no new best{since}"
        log.info(
            "%s: epoch %d/%d [%s] val auc %.3f (%s), %.0f s/epoch",
            self.cell.key,
            rec["epoch"],
            self.budget,
            rec["phase"],
            rec["val_auc"],
            best,
            rec["epoch_s"],
        )


def _stop_with_parent(parent: int) -> None:
    """Worker initializer: when the study process is gone (`kill`, a closed session), its workers stop too,
    instead of training on unseen and writing the checkpoints a restarted study would resume from.

    A watcher thread signals the worker's main thread (SIGTERM), whose handler raises SystemExit: training
    unwinds as on Ctrl-C (its `finally` blocks release the cell's lock; the last checkpoint is already on
    disk) and the process exits through the interpreter's normal shutdown. The pool's loop catches what a
    task raises and would wait for more work, so the watcher signals again until the process has left."""

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(2)
        log.warning("the study process is gone: this worker stops")
        while True:  # the first signal ends the cell, a later one the pool's wait (the thread dies with us)
            signal.pthread_kill(main, signal.SIGTERM)
            time.sleep(2)

    main = threading.main_thread().ident or 0
    signal.signal(signal.SIGTERM, stop)
    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _worker(spec: StudySpec, cell: Cell, threads: int) -> dict[str, Any]:

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)  # this module's progress lines; training's own log stays quiet
    return run_cell(spec, cell, on_epoch=EpochProgress(cell, spec.recipe.epochs), unless_finished=True)


def available_encoders(names: list[str]) -> tuple[list[str], dict[str, str]]:
    """(usable encoders, {skipped name: reason}); 'scratch' is always usable."""

    ok, skipped = [], {}
    for n in names:
        if n.lower() in SCRATCH_NAMES:
            ok.append(n)
            continue
        try:
            from_pretrained(n, num_classes=0)
            ok.append(n)
        except CTHubError as e:
            skipped[n] = str(e)
    return ok, skipped


def _attempt(key: str, call: Callable[[], dict[str, Any]]) -> dict[str, Any] | Exception:
    """The cell's record, or the exception that ended it: one failing cell never ends the study."""
    try:
        return call()
    except CTHubError as e:  # a user error: its message says it all
        return e
    except Exception as e:  # anything else: keep going, with the traceback in the log
        log.exception("%s failed", key)
        return e


def _outcomes(
    spec: StudySpec, todo: list[Cell], workers: int, threads: int
) -> Iterator[tuple[Cell, dict[str, Any] | Exception]]:
    """(cell, record or exception) for every cell to do, in order of completion."""
    if workers <= 1:
        for i, c in enumerate(todo):
            log.info("[%d/%d] %s", i + 1, len(todo), c.key)
            yield c, _attempt(c.key, functools.partial(run_cell, spec, c, unless_finished=True))
        return
    with ProcessPoolExecutor(
        workers, mp_context=get_context("spawn"), initializer=_stop_with_parent, initargs=(os.getpid(),)
    ) as ex:
        futs = {ex.submit(_worker, spec, c, threads): c for c in todo}
        for fut in as_completed(futs):
            yield futs[fut], _attempt(futs[fut].key, fut.result)


def card_rows(rows: list[dict[str, Any]], encoder: str) -> dict[str, dict[str, Any]]:
    """An encoder's aggregated test results per training fraction, beside scratch's on the same cells."""
    scratch = {r["fraction"]: r for r in rows if r["encoder"].lower() in SCRATCH_NAMES}
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["encoder"] != encoder:
            continue
        entry: dict[str, Any] = {"runs": r["runs"], "n_train": r["n_train"], "unconverged": r["unconverged"]}
        for m in METRICS:
            entry[m] = {"mean": round(r[f"{m}_mean"], 4), "std": round(r[f"{m}_std"], 4)}
        base = scratch.get(r["fraction"])
        if base is not None:
            entry["scratch_auc"] = {"mean": round(base["auc_mean"], 4), "std": round(base["auc_std"], 4)}
            entry["delta_auc_vs_scratch"] = round(r["auc_mean"] - base["auc_mean"], 4)
        out[pct(r["fraction"])] = entry
    return out


def record_in_cards(spec: StudySpec, rows: list[dict[str, Any]], command: str = "") -> list[str]:
    """Write each local hub encoder's own study rows into its config metrics and card
    (`metrics.finetune_study["<data>:<protocol>"]`); returns the encoders updated. Scratch and encoders
    that only exist remotely are left alone."""

    key = f"{Path(spec.data).name}:{spec.protocol}"
    recipe = spec.recipe.to_dict()
    updated = []
    for enc in spec.encoders:
        d = None if enc.lower() in SCRATCH_NAMES else local_model_dir(enc)
        mine = card_rows(rows, enc)
        if d is None or not mine:
            continue
        study = dict(ModelConfig.load(d).metrics.get("finetune_study") or {})
        study[key] = {
            "test": mine,
            "seeds": spec.seeds,
            "metric_split": "test (mean and std over seeds)",
            "recipe": {k: recipe.get(k) for k in STUDY_RECIPE_KEYS},
            "command": command or "cthub study (see the study folder's study.json)",
        }
        record_metrics(d, {"finetune_study": study})
        updated.append(enc)
    return updated


def remaining_estimate(elapsed_s: float, done: int, total: int) -> str:
    """'; ~N min left' at the pace so far (runs finished per wall second, every worker together): a rough
    guide, since runs differ (larger fractions take longer, some encoders stop early)."""
    if done <= 0 or done >= total:
        return ""
    return f"; ~{elapsed_s / done * (total - done) / 60:.0f} min left for {total - done} run(s)"


def run_study(
    spec: StudySpec,
    workers: int = 1,
    threads_per_worker: int = 1,
    command: str = "",
    *,
    report_only: bool = False,
) -> dict[str, Any]:
    """Run every unfinished cell (finished ones are read back, not redone), aggregate, and write each local
    encoder's rows into its model card. `report_only` runs nothing: the reports are rewritten from the cells
    finished so far (a study stopped part-way, or cells run by several processes into one folder). The
    unfinished cells of an encoder that cannot be loaded here are not run (`skipped_encoders`), but its
    finished cells are reported, as they are on a fresh clone that has none of the encoders."""
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    old_epochs = _check_same_recipe(spec, out / "study.json")
    if old_epochs is not None:
        _stamp_epoch_budgets(out, old_epochs)
    _write_design(_design_so_far(spec, out / "study.json"))
    cells = spec.cells()
    weights = local_weights(spec.encoders)
    _check_weights(out, cells, weights)
    unfinished = [c for c in cells if not is_done(out, c, spec.recipe.epochs, weights[c.encoder])]
    skipped: dict[str, str] = {}
    if not report_only and unfinished:
        _, skipped = available_encoders(list(dict.fromkeys(c.encoder for c in unfinished)))
    for name, why in skipped.items():
        log.warning("not running the cells of %s: not available here (%s)", name, why)
    todo = [] if report_only else [c for c in unfinished if c.encoder not in skipped]
    log.info(
        "study: %d runs, %d already finished, %d to do, %d not run%s (%d worker(s))",
        len(cells),
        len(cells) - len(unfinished),
        len(todo),
        len(unfinished) - len(todo),
        " (report only)" if report_only else " (encoder not available)" if skipped else "",
        workers,
    )
    failed: dict[str, str] = {}
    taken: dict[str, str] = {}
    t0 = time.monotonic()
    for i, (c, outcome) in enumerate(_outcomes(spec, todo, workers, threads_per_worker)):
        left = remaining_estimate(time.monotonic() - t0, i + 1, len(todo))
        if isinstance(outcome, CellTakenError):  # another process's cell: that process writes its record
            taken[c.key] = str(outcome)
            log.info("[%d/%d] left to the other process: %s", i + 1, len(todo), outcome)
        elif isinstance(outcome, Exception):
            failed[c.key] = str(outcome) if isinstance(outcome, CTHubError) else repr(outcome)
            _write_record(out, c, {**asdict(c), "error": failed[c.key]})
            log.warning("[%d/%d] %s failed: %s", i + 1, len(todo), c.key, failed[c.key])
        else:
            log.info(
                "[%d/%d] %s: test auc %.3f f1 %.3f%s%s",
                i + 1,
                len(todo),
                c.key,
                outcome["test"]["auc"],
                outcome["test"]["f1"],
                "" if outcome["converged"] else " (still improving when the budget ended)",
                left,
            )
    # the folder's whole grid, as other invocations (a subset of encoders or fractions, perhaps running
    # beside this one) have left it by now: a partial run never drops their rows from the tables
    design = _design_so_far(spec, out / "study.json", report_only=report_only)
    _write_design(design)
    title = f"{Path(spec.data).name}: {spec.protocol}"
    runs = load_runs(design, out, {**local_weights(design.encoders), **weights})
    summary = write_reports(out, runs, spec=design.to_dict(), title=title, failed=failed)
    summary.update(
        ran=len(todo) - len(failed) - len(taken),
        skipped_finished=len(cells) - len(unfinished),
        not_run=len(unfinished) - len(todo),
        failed=failed,
        taken=taken,
        skipped_encoders=skipped,
    )
    summary["cards_updated"] = record_in_cards(design, aggregate(runs), command)
    return summary


def _design_so_far(spec: StudySpec, path: Path, *, report_only: bool = False) -> StudySpec:
    """`spec` with the encoders, fractions and seeds the folder's study.json already lists added (the
    settings are the same: `_check_same_recipe`): what the folder's reports cover. Encoders keep the
    folder's order, new ones after; a report asked for (`report_only`) lists the encoders it names first."""
    if not path.is_file():
        return spec
    old = json.loads(path.read_text())
    given, known = list(spec.encoders), list(old.get("encoders", []))
    return replace(
        spec,
        encoders=list(dict.fromkeys([*given, *known] if report_only else [*known, *given])),
        fractions=sorted({*map(float, old.get("fractions", [])), *spec.fractions}),
        seeds=sorted({*map(int, old.get("seeds", [])), *spec.seeds}),
    )


def _write_design(spec: StudySpec) -> None:
    """study.json, atomically (studies running side by side into one folder read it)."""
    path = Path(spec.out) / "study.json"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
    os.replace(tmp, path)


def _check_same_recipe(spec: StudySpec, path: Path) -> int | None:
    """Resuming with another recipe or data would mix incomparable runs: refuse. Only the epoch budget may
    change (see the module docstring); returns the budget the study had (None for a new study)."""
    if not path.is_file():
        return None
    old = json.loads(path.read_text())
    new = spec.to_dict()
    old_recipe = old.get("recipe", {})
    # new["recipe"] holds no EXECUTION_SETTINGS, so older files that list them still match
    diff = sorted(k for k in new["recipe"] if k != "epochs" and old_recipe.get(k) != new["recipe"][k])
    keys = ("protocol", "folds", "val_fraction", "max_val", "max_test", "window")
    diff += [k for k in keys if old.get(k) != new[k]]
    # the same file may sit in another folder on another machine: compare by file name
    if Path(str(old.get("data"))).name != Path(str(new["data"])).name:
        diff.append("data")
    # studies written before `split_seed` was recorded drew split-protocol val/test subsets with seed 0
    legacy = 0 if old.get("protocol") == "split" else old_recipe.get("seed")
    if old.get("split_seed", legacy) != new["split_seed"]:
        diff.append("split_seed")
    if diff:
        raise ConfigError(
            f"{path.parent} holds a study with different settings ({', '.join(diff)}); "
            "use another --out or the same settings to resume"
        )
    return int(old_recipe["epochs"])


def load_runs(
    spec: StudySpec, out: str | Path, weights: dict[str, LocalWeights | None] | None = None
) -> list[dict[str, Any]]:
    """The records of the finished cells under the study's epoch budget and on the local encoders' weights
    (`weights`: from `local_weights` when not given), in grid order; `converged` is derived
    again from each record's best epoch (1-based) and length with the study's patience, so records written
    under an older definition read the same as new ones."""
    weights = local_weights(spec.encoders) if weights is None else weights
    runs = [
        r
        for c in spec.cells()
        if (r := _read(out, c)) is not None
        and "test" in r
        and same_run_within(r, spec.recipe.epochs)
        and measured_weights(r, weights.get(c.encoder))
    ]
    for r in runs:
        r["converged"] = has_converged(int(r["best_epoch"]) - 1, int(r["epochs_run"]), spec.recipe.patience)
    return runs
