"""The steps of the main job, each a `cthub` command run in a subprocess (so every artifact records the exact
command that made it, as when a user types it) and skipped when its output is current.

    encoder   the best `<method>-organamnist-cpu` encoder of `make pretrain` in the local hub, else
              `spark-organamnist-quick` (SparK, CPU recipe, a bounded number of steps; its card says so)
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

log = logging.getLogger(__name__)

QUICK_METHOD = "spark"
PRETRAINED_SUFFIX = "-organamnist-cpu"  # what `make pretrain` publishes
STATE_NAME = "quickstart.json"


@dataclass(frozen=True)
class Plan:
    """What the job will use and write."""

    data: Path
    budget: Budget
    models: Path
    encoder: str  # hub name
    encoder_is_quick: bool  # made by this job (short budget) rather than by `make pretrain`

    @property
    def classifier(self) -> Path:
        """The served model; a stable path (bentofile.yaml, `make pacs`), its card names the encoder."""
        return self.models / "organamnist-ssl"

    @property
    def baseline(self) -> Path:
        return self.models / "organamnist-scratch"

    @property
    def run_dir(self) -> Path:
        return hub_dir() / "runs" / f"quickstart-{QUICK_METHOD}-{self.budget.name}"


def quick_encoder_name(budget: Budget) -> str:
    return f"{QUICK_METHOD}-organamnist-{budget.name}"


def _encoder_score(cfg: ModelConfig) -> float:
    """How much an encoder helped, by what its card measured: the 1%-label study's AUC gain over random init
    when it has one, else its frozen-feature linear-probe AUC (BN recalibrated), else -inf."""
    for key, rows in (cfg.metrics.get("finetune_study") or {}).items():
        delta = ((rows.get("test") or {}).get("1%") or {}).get("delta_auc_vs_scratch")
        if key.startswith("organamnist") and isinstance(delta, (int, float)):
            return 10.0 + float(delta)  # a fine-tune comparison outranks any frozen-feature figure
    ff = cfg.metrics.get("frozen_features") or {}
    auc = (((ff.get("encoder") or {}).get("recalibrated") or {}).get("linear_probe") or {}).get("auc")
    return float(auc) if isinstance(auc, (int, float)) else float("-inf")


def best_local_encoder(root: Path | None = None) -> str | None:
    """The `make pretrain` encoder (`*-organamnist-cpu`) in the local hub whose card shows it helped most."""
    root = root or hub_dir()
    scored = []
    for cfg_path in sorted(root.glob(f"*{PRETRAINED_SUFFIX}/config.json")):
        if not (cfg_path.parent / WEIGHTS_NAME).is_file():
            continue
        cfg = ModelConfig.load(cfg_path.parent)
        if cfg.num_classes == 0:
            scored.append((_encoder_score(cfg), cfg_path.parent.name))
    return max(scored)[1] if scored else None


def plan(data: str | Path, budget: str = "quick", models: str | Path = "models") -> Plan:
    """Which encoder the job uses (the best `make pretrain` one, else its own short run), where it writes."""
    if budget not in BUDGETS:
        raise ConfigError(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)}")
    b = BUDGETS[budget]
    data = Path(data)
    if not data.is_file():
        raise ConfigError(f"no labeled data at {data}: `make data/organamnist.npz` fetches OrganAMNIST")
    best = best_local_encoder() if budget == "quick" else None
    return Plan(data, b, Path(models), best or quick_encoder_name(b), best is None)


def _cthub(*args: str) -> list[str]:
    return [sys.executable, "-m", "cthub", *args]


def pretrain_args(p: Plan) -> list[str]:
    b = p.budget
    args = ["pretrain", "--method", QUICK_METHOD, "--data", str(p.data), "--recipe", "cpu-organamnist"]
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
    args += ["--fraction", str(b.fraction)] if b.fraction is not None else ["--max-train", str(b.max_train)]
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
    record_metrics(p.classifier, {"vs_random_init": entry})
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


def build(p: Plan) -> dict[str, Any]:
    """Run (or reuse) every step; returns what the served model is and what it measured."""
    steps = ["encoder", "classify", "export"]
    progress = Progress(p.budget, steps)
    state: dict[str, Any] = {
        "budget": p.budget.name,
        "encoder": p.encoder,
        "encoder_is_quick": p.encoder_is_quick,
    }

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
    progress.start(1, f"fine-tune on few labels: {what or p.encoder + ' and random init'}", skipped=not todo)
    if todo:
        failed = [k for k, rc in run_commands(todo).items() if rc != 0]
        if failed:
            raise ConfigError(f"fine-tuning failed ({', '.join(failed)}; see the output above)")
    state["vs_random_init"] = record_comparison(p, base)

    fp32, int8 = _onnx_state(p)
    progress.start(
        2, "export to ONNX (fp32 checked against torch, int8 within tolerance)", skipped=fp32 and int8
    )
    if not (fp32 and int8):
        rc = run_commands({"export": export_args(p)})["export"]
        fp32, int8 = _onnx_state(p)
        if not fp32:
            raise ConfigError(f"export failed (exit code {rc}; see the output above)")
        if not int8:
            print("int8 was refused (outside the ΔAUC tolerance) or failed: serving fp32", flush=True)
    state["variant"] = "int8" if int8 else "fp32"
    state["classifier"] = str(p.classifier)
    (p.models / STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")
    return state
