"""The steps of the main job, each a `cthub` command run in a subprocess (so every artifact records the exact
command that made it, as when a user types it) and skipped when its output is current.

    split     (sources without a train/test split: a labeled folder, CSV manifest or DICOM+CSV) fold 0 of
              the paper's stratified (patient-grouped where the source names patients) 5 folds, 10% of
              training for validation, written as a CSV manifest beside the models (paths, labels, split)
    encoder   the best `*-cpu` encoder of `make pretrain` / `make pretrain-realct` in the local hub for
              the task (`quickstart.tasks`), else `spark-<task>-quick` (SparK, CPU recipe, a bounded
              number of steps on the task's own images; its card says so)
    classify  two fine-tunes on the same labeled subset, in parallel at one thread each: from the encoder
              (the served model) and from random init (the baseline); the comparison goes into the served
              model's card (`metrics.vs_random_init`)
    export    ONNX fp32 checked against torch, then int8 (kept only within the export's ΔAUC tolerance)
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cthub.errors import ConfigError, IntegrityError
from cthub.provenance import command_line
from hub.config import WEIGHTS_NAME, ModelConfig
from hub.io import hub_dir, local_model_dir, record_metrics
from hub.manifest import sha256_file
from quickstart.budgets import BUDGETS, Budget
from quickstart.splitfile import SPLIT_SEED, needs_split, write_split_manifest
from quickstart.tasks import TASKS, Task, task_for

log = logging.getLogger(__name__)

QUICK_METHOD = "spark"
PRETRAINED_SUFFIX = "-cpu"  # what `make pretrain` and `make pretrain-realct` publish
STATE_NAME = "quickstart.json"


@dataclass(frozen=True)
class Plan:
    """What the job will use and write."""

    source: Path  # the labeled data the user named
    budget: Budget  # as the task runs it (`Task.budget`)
    models: Path
    encoder: str  # hub name
    encoder_is_quick: bool  # made by this job (short budget) rather than by `make pretrain`
    task: Task = TASKS["organamnist"]

    @property
    def data(self) -> Path:
        """What the fine-tunes read: the source, or the split manifest written for a source without one."""
        return self.split_manifest if needs_split(self.source) else self.source

    @property
    def split_manifest(self) -> Path:
        return self.models / f"{self.task.name}-split.csv"

    @property
    def classifier(self) -> Path:
        """The served model; a stable path (bentofile.yaml, `make pacs`), its card names the encoder."""
        return self.task.classifier_dir(self.models)

    @property
    def baseline(self) -> Path:
        return self.task.baseline_dir(self.models)

    @property
    def state_file(self) -> Path:
        """What `build` last made for this task (the default task keeps the historical name)."""
        return self.models / (
            STATE_NAME if self.task.name == "organamnist" else f"quickstart-{self.task.name}.json"
        )

    @property
    def run_dir(self) -> Path:
        task = "" if self.task.name == "organamnist" else f"-{self.task.name}"
        return hub_dir() / "runs" / f"quickstart-{QUICK_METHOD}{task}-{self.budget.name}"


def quick_encoder_name(budget: Budget, task: Task = TASKS["organamnist"]) -> str:
    return f"{QUICK_METHOD}-{task.name}-{budget.name}"


def _number_at(tree: object, *keys: str) -> float | None:
    """The number at `keys` in a card's nested metrics, None when a level is missing or not a mapping (a
    card may say "not measured (...)" where a table would be)."""
    for key in keys:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key)
    return float(tree) if isinstance(tree, (int, float)) and not isinstance(tree, bool) else None


def _study_delta(cfg: ModelConfig, task: Task) -> float | None:
    """The AUC gain over random init that a fine-tune study on this task's data measured, if any."""
    studies = cfg.metrics.get("finetune_study")
    for key, rows in (studies if isinstance(studies, dict) else {}).items():
        if not key.lower().startswith(task.study_prefixes) or not task.study_prefixes:
            continue
        delta = _number_at(rows, "test", task.study_fraction, "delta_auc_vs_scratch")
        if delta is not None:
            return delta
    return None


def _monitor_auc(cfg: ModelConfig, task: Task) -> float | None:
    """The pretraining kNN monitor's last AUC when it embedded this task's labeled data."""
    monitor = ((cfg.provenance.get("recipe") or {}).get("monitor_data")) or ""
    names = {Path(str(monitor).rstrip("/")).name.lower(), Path(str(monitor)).stem.lower()}
    auc = _number_at(cfg.metrics, "knn_monitor_last", "knn_auc")
    return auc if monitor and names & set(task.monitor_names) else None


def encoder_score(cfg: ModelConfig, task: Task = TASKS["organamnist"]) -> tuple[int, float]:
    """How much an encoder is known to help on `task`, by what its card measured, as (tier, value): 3, a
    fine-tune study's AUC gain over random init on the task's data; 2, the pretraining kNN monitor's AUC on
    the task's labeled data; 1, its frozen-feature linear-probe AUC (BN recalibrated); (0, -inf) nothing."""
    delta = _study_delta(cfg, task)
    if delta is not None:
        return 3, delta
    knn = _monitor_auc(cfg, task)
    if knn is not None:
        return 2, knn
    auc = _number_at(cfg.metrics, "frozen_features", "encoder", "recalibrated", "linear_probe", "auc")
    return (1, auc) if auc is not None else (0, float("-inf"))


def best_local_encoder(root: Path | None = None, task: Task | str = "organamnist") -> str | None:
    """The `make pretrain` / `make pretrain-realct` encoder (`*-cpu`) in the local hub whose card shows it
    helps most on `task` (`encoder_score`); None when the hub holds none."""
    root = root or hub_dir()
    t = TASKS[task] if isinstance(task, str) else task
    scored = []
    for cfg_path in sorted(root.glob(f"*{PRETRAINED_SUFFIX}/config.json")):
        if not (cfg_path.parent / WEIGHTS_NAME).is_file():
            continue
        cfg = ModelConfig.load(cfg_path.parent)
        if cfg.num_classes == 0:
            scored.append((encoder_score(cfg, t), cfg_path.parent.name))
    return max(scored)[1] if scored else None


def plan(
    data: str | Path, budget: str = "quick", models: str | Path = "models", task: str | None = None
) -> Plan:
    """Which task and encoder the job uses (the best `make pretrain` one for the task, else its own short
    run), where it writes. `task` None: the one the data implies (`quickstart.tasks.task_for`)."""
    if budget not in BUDGETS:
        raise ConfigError(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)}")
    if task is not None and task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    data = Path(data)
    if not data.exists():
        raise ConfigError(
            f"no labeled data at {data}: `make data/organamnist.npz` fetches OrganAMNIST; other tasks take "
            "a labeled folder (labels.csv or class folders), a CSV manifest or DICOM+CSV"
        )
    t = task_for(data, task)
    b = t.budget(budget)
    best = best_local_encoder(task=t) if budget == "quick" else None
    if best is None and data.suffix != ".npz" and not data.is_dir():
        raise ConfigError(
            f"the local hub holds no pretrained encoder and a short one can only be made from an image "
            f"folder or OrganAMNIST, not from {data.name}: run `make pretrain` first"
        )
    return Plan(data, b, Path(models), best or quick_encoder_name(b, t), best is None, t)


def _cthub(*args: str) -> list[str]:
    return [sys.executable, "-m", "cthub", *args]


def pretrain_args(p: Plan) -> list[str]:
    b = p.budget
    args = ["pretrain", "--method", QUICK_METHOD, "--data", str(p.source), "--recipe", "cpu-organamnist"]
    args += ["--steps", str(b.pretrain_steps), "--max-minutes", str(b.pretrain_max_minutes)]
    args += ["--image-size", str(b.pretrain_image_size), "--threads", str(min(2, os.cpu_count() or 1))]
    args += ["--out", str(p.run_dir), "--resume", "--publish", p.encoder, *b.pretrain_extra]
    return args


def finetune_args(p: Plan, encoder: str, out: Path) -> list[str]:
    b = p.budget
    args = ["finetune", "--data", str(p.data), "--encoder", encoder, "--out", str(out)]
    args += [
        "--image-size",
        str(b.image_size),
        "--epochs",
        str(b.epochs),
        "--head-epochs",
        str(b.head_epochs),
    ]
    args += ["--patience", str(b.patience), "--select", "auc", "--max-val", str(b.max_val)]
    args += ["--max-test", str(b.max_test), "--seed", "0", "--threads", "1"]
    if b.fraction is not None:
        args += ["--fraction", str(b.fraction)]
    elif b.max_train is not None:
        args += ["--max-train", str(b.max_train)]
    if p.task.window:
        args += ["--window", p.task.window]
    if needs_split(p.source):
        args += ["--protocol", "split"]
    return args


def export_args(p: Plan) -> list[str]:
    b = p.budget
    args = ["export", str(p.classifier), "--int8", "--calibration-images", str(b.int8_calibration)]
    args += ["--eval-images", str(b.int8_eval), "--threads", str(min(2, os.cpu_count() or 1))]
    return [*args, *b.export_extra]


def _encoder_current(p: Plan) -> bool:
    d = local_model_dir(p.encoder)
    if d is None:
        return False
    if not p.encoder_is_quick:
        return True
    prov = ModelConfig.load(d).provenance
    return prov.get("command") == command_line("pretrain", argv=pretrain_args(p))


def _classifier_current(out: Path, args: list[str], encoder_sha: str | None) -> bool:
    """Made by the same command from the same encoder weights."""
    if not (out / "config.json").is_file() or not (out / WEIGHTS_NAME).is_file():
        return False
    prov = ModelConfig.load(out).provenance
    return (
        prov.get("command") == command_line("finetune", argv=args)
        and prov.get("encoder_sha256") == encoder_sha
    )


def _pump(label: str, proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        print(f"[{label}] {line}", end="", flush=True)


def run_commands(jobs: dict[str, list[str]]) -> dict[str, int]:
    """Run `cthub` commands side by side, their output prefixed by label; exit codes by label."""
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    procs = {
        label: subprocess.Popen(  # noqa: S603 -- this interpreter, arguments built here
            _cthub(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        for label, args in jobs.items()
    }
    pumps = [threading.Thread(target=_pump, args=(k, v), daemon=True) for k, v in procs.items()]
    for t in pumps:
        t.start()
    codes = {k: v.wait() for k, v in procs.items()}
    for t in pumps:
        t.join()
    return codes


class Progress:
    """Step headers with the elapsed time and an ETA from the budget's per-step estimates."""

    def __init__(self, budget: Budget, steps: Sequence[str]) -> None:
        self.budget, self.steps, self.t0 = budget, list(steps), time.monotonic()

    def start(self, i: int, what: str, skipped: bool = False) -> None:
        left = sum(self.budget.minutes.get(s, 0.0) for s in self.steps[i:]) if not skipped else 0.0
        elapsed = (time.monotonic() - self.t0) / 60
        eta = f"; about {left:.0f} min left" if left >= 1 else ""
        state = "current, reused" if skipped else "running"
        print(f"\n== [{i + 1}/{len(self.steps)}] {what} ({state}; {elapsed:.1f} min so far{eta})", flush=True)


def _metrics_of(d: Path) -> dict[str, Any]:
    m = ModelConfig.load(d).metrics.get("test") or {}
    return {k: m.get(k) for k in ("accuracy", "auc", "f1", "n")}


def record_comparison(p: Plan, baseline_args: list[str]) -> dict[str, Any]:
    """The served classifier vs the random-init one trained the same way on the same labels, into the
    served model's card."""
    ours, base = _metrics_of(p.classifier), _metrics_of(p.baseline)
    prov = ModelConfig.load(p.classifier).provenance
    entry = {
        "baseline": "random-init ResNet50, same recipe, labels and seed",
        "baseline_command": command_line("finetune", argv=baseline_args),
        "n_train": prov.get("n_train"),
        "test": ours,
        "baseline_test": base,
        "delta_auc": None if None in (ours["auc"], base["auc"]) else round(ours["auc"] - base["auc"], 4),
        "delta_f1": None if None in (ours["f1"], base["f1"]) else round(ours["f1"] - base["f1"], 4),
    }
    record_metrics(p.classifier, {"vs_random_init": entry, "input_expectation": p.task.input_expectation})
    record_metrics(p.baseline, {"input_expectation": p.task.input_expectation})
    return entry


def _onnx_state(p: Plan) -> tuple[bool, bool]:
    """(fp32 current, int8 current) of the served classifier."""
    from export import INT8_NAME, onnx_is_fresh
    from export.integrity import verify_onnx_file

    fp32 = onnx_is_fresh(p.classifier)
    int8 = fp32 and (p.classifier / INT8_NAME).is_file()
    if int8:
        try:
            verify_onnx_file(p.classifier / INT8_NAME)
        except (IntegrityError, OSError):  # any failed check means: make it again
            int8 = False
    return fp32, int8


def _fp32_sha256(p: Plan) -> str | None:
    from export import ONNX_NAME

    path = p.classifier / ONNX_NAME
    return sha256_file(path) if path.is_file() else None


def _int8_refused_before(p: Plan) -> bool:
    """True when an earlier run's int8 quantization of this very fp32 file was refused (outside the
    tolerance): a refusal is a result, so a later run serves fp32 again rather than quantizing again."""
    try:
        earlier = json.loads(p.state_file.read_text())
    except (OSError, ValueError):
        return False
    refused = earlier.get("int8_refused_for") if isinstance(earlier, dict) else None
    return isinstance(refused, str) and refused == _fp32_sha256(p)


def build(p: Plan) -> dict[str, Any]:
    """Run (or reuse) every step; returns what the served model is and what it measured."""
    steps = ["encoder", "classify", "export"]
    progress = Progress(p.budget, steps)
    state: dict[str, Any] = {
        "task": p.task.name,
        "budget": p.budget.name,
        "image_size": p.budget.image_size,
        "input_expectation": p.task.input_expectation,
        "encoder": p.encoder,
        "encoder_is_quick": p.encoder_is_quick,
    }
    p.models.mkdir(parents=True, exist_ok=True)
    if needs_split(p.source):
        write_split_manifest(p.source, p.split_manifest, seed=SPLIT_SEED)
        state["split"] = str(p.split_manifest)

    current = _encoder_current(p)
    what = f"encoder {p.encoder}" + (
        " (SparK, short CPU run)" if p.encoder_is_quick else " (from make pretrain)"
    )
    progress.start(0, what, skipped=current)
    if not current and run_commands({"pretrain": pretrain_args(p)})["pretrain"] != 0:
        raise ConfigError("pretraining failed (see its output above)")
    enc_dir = local_model_dir(p.encoder)
    assert enc_dir is not None
    enc_sha = sha256_file(enc_dir / WEIGHTS_NAME)

    ours, base = finetune_args(p, p.encoder, p.classifier), finetune_args(p, "scratch", p.baseline)
    todo = {
        label: args
        for label, args, out, sha in (
            ("ssl", ours, p.classifier, enc_sha),
            ("scratch", base, p.baseline, None),
        )
        if not _classifier_current(out, args, sha)
    }
    names = {"ssl": p.encoder, "scratch": "random init"}
    what = " and ".join(names[k] for k in todo) + (" side by side" if len(todo) > 1 else "")
    if todo and len(todo) < len(names):
        what += " (" + ", ".join(names[k] for k in names if k not in todo) + ": current, reused)"
    labels = "few labels" if p.budget.fraction is not None else f"the {p.task.name} training split"
    what = what or p.encoder + " and random init"
    progress.start(1, f"fine-tune on {labels}: {what}", skipped=not todo)
    if todo:
        failed = [k for k, rc in run_commands(todo).items() if rc != 0]
        if failed:
            raise ConfigError(f"fine-tuning failed ({', '.join(failed)}; see the output above)")
    state["vs_random_init"] = record_comparison(p, base)

    fp32, int8 = _onnx_state(p)
    refused = fp32 and not int8 and _int8_refused_before(p)
    progress.start(
        2,
        "export to ONNX (fp32 checked against torch, int8 within tolerance)",
        skipped=fp32 and (int8 or refused),
    )
    if refused:
        print("int8 of this fp32 file was refused by an earlier run (outside the tolerance): serving fp32")
        state["int8_refused_for"] = _fp32_sha256(p)
    elif not (fp32 and int8):
        rc = run_commands({"export": export_args(p)})["export"]
        fp32, int8 = _onnx_state(p)
        if not fp32:
            raise ConfigError(f"export failed (exit code {rc}; see the output above)")
        if not int8:
            print("int8 was refused (outside the ΔAUC tolerance) or failed: serving fp32", flush=True)
            if rc == 2:  # a typed refusal (cthub's exit code for CTHubError), not a crash: do not retry
                state["int8_refused_for"] = _fp32_sha256(p)
    state["variant"] = "int8" if int8 else "fp32"
    state["classifier"] = str(p.classifier)
    p.state_file.write_text(json.dumps(state, indent=2) + "\n")
    return state


def other_served(p: Plan) -> list[Path]:
    """The classifiers this job made earlier for the other tasks in the same models folder (still exported),
    which `--serve` offers beside this one."""
    out = []
    for t in TASKS.values():
        d = t.classifier_dir(p.models)
        if t.name != p.task.name and (d / WEIGHTS_NAME).is_file():
            from export import onnx_is_fresh

            if onnx_is_fresh(d):
                out.append(d)
            else:  # e.g. exported by an older graph version: not served rather than refused at start-up
                print(f"{d.name} is not served beside: its model.onnx is not current (`cthub export {d}`)")
    return out
