"""`make gpu-check` (`python -m bench.gpu_check`): the GPU path of this project, proven in one run.

On a machine with CUDA (docs/gpu-check.md: one H100/H200, no network, about 8 minutes), through the
project's own code paths, each step timed, its peak GPU memory measured and its failure recorded without
stopping the others:

1. `finetune-organamnist`: `cthub finetune` from random init at 224 px on real OrganAMNIST (upscaled from
   28 px) with AMP and channels-last, a fixed number of steps; the train loss must be finite and fall, and
   the saved classifier must load back on the CPU and give the same predictions there;
2. `pretrain-spark`, `pretrain-mocov2`: `cthub pretrain` with the paper's recipe (lidc-paper: 224 px, AMP,
   channels-last) for a fixed number of steps; the encoder it saves must load back on the CPU;
3. `export`: `export.export_onnx` of that classifier (its own parity check, torch CPU vs ONNX Runtime),
   then parity of ONNX Runtime (CUDA provider when the image has one, else CPU) against torch on CUDA;
4. `inference`: images/s of the classifier on CUDA (fp32, bf16 autocast) and of ONNX Runtime;
5. `finetune-headct`: the head CT folder, 2-fold, when it is there;
6. `compile-spark`, `compile-mocov2`: a few training steps of each method eager and under torch.compile
   (the trainer has no compile option: this measures whether one would pay).

Then one table: images/s on the GPU beside this repository's CPU figures (bench/results/*.json), peak GPU
memory, warnings; and gpu-check.json + gpu-check.log in $OUT when set (else bench/results/).

Without a GPU it says "no GPU found: dry run on CPU" and runs the same steps at a tiny size (64 px, a few
steps), writing gpu-check-dryrun.json: what tests/test_gpu_check.py runs. What the image lacks is installed
from the carried `.gpu-check/wheels` (`make gpu-wheels`) into a temporary folder, never over its torch.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CARRY = ROOT / ".gpu-check"
SITE = Path(tempfile.gettempdir()) / "cthub-gpu-check-site"
PROJECT_PACKAGES = (
    "ctdata",
    "hub",
    "finetune",
    "export",
    "pretrain",
    "serving",
    "pacs",
    "quickstart",
    "cthub",
    "bench",
    "tests",
)
ORGAN_SOURCES = (
    CARRY / "data" / "organamnist.npz",
    ROOT.parent / "shared" / "data" / "organamnist.npz",
    ROOT / "data" / "organamnist.npz",
)
HEAD_CT_SOURCES = (CARRY / "data" / "head_ct", ROOT.parent / "shared" / "data" / "head_ct")
# The steps the check cannot do without: it fails unless each ran and passed (the others may be skipped when
# the budget runs short; a failure of any step fails the check).
CORE_STEPS = ("finetune-organamnist", "pretrain-spark", "pretrain-mocov2", "export")
GPU_BUDGET_S = 450.0  # 7.5 min for the steps: the check must end inside 8 min on the GPU machine
GRACE_S = 25.0  # past the budget, the watchdog writes what it has and ends the process
# ONNX Runtime vs torch on CUDA in fp32 (TF32 off): cuDNN sums in another order than the CPU kernels, so the
# check allows 10x the export's own fp32 tolerance (1e-4 + 1e-5 * max |logit|).
CUDA_PARITY_ATOL = 1e-3
CUDA_PARITY_RTOL = 1e-4
ORT_GPU_NOTE = (
    "onnxruntime-gpu is not on the image and its wheel (onnxruntime_gpu-1.31.1, cp312 manylinux_2_28 "
    "x86-64: 243.7 MiB on PyPI) is far over the 64 MiB a call carries: parity is ONNX Runtime on the CPU "
    "against torch on CUDA"
)


@dataclass(frozen=True)
class Plan:
    """Sizes of one mode: the GPU check, or the dry run on CPU."""

    image_size: int
    ft_train: int
    ft_val: int
    ft_test: int
    ft_batch: int
    ft_epochs: int
    ft_head_epochs: int
    ft_lr: float
    head_folds: int
    head_epochs: int
    head_batch: int
    head_max_train: int | None
    pt_steps: int
    pt_batch: dict[str, int]
    pt_log_every: int
    monitor_size: int
    compile_warmup: int
    compile_steps: int
    parity_images: int
    ood_images: int
    infer_batch: int
    infer_batches: int
    budget_s: float
    estimates_s: dict[str, float] = field(default_factory=dict)


GPU_PLAN = Plan(
    image_size=224,
    ft_train=2048,
    ft_val=256,
    ft_test=256,
    ft_batch=64,
    ft_epochs=5,  # 32 steps an epoch: 160 steps, the first epoch head-only (the paper's recipe, shortened)
    ft_head_epochs=1,
    ft_lr=3e-4,
    head_folds=2,
    head_epochs=4,
    head_batch=32,
    head_max_train=None,
    pt_steps=30,
    pt_batch={"spark": 128, "mocov2": 256},  # the lidc-paper recipe's batches
    pt_log_every=5,
    monitor_size=128,  # the kNN monitor at the start and the end: 128 bank + 128 query images
    compile_warmup=2,
    compile_steps=10,
    # whole splits: `export` takes a stratified subset when asked for fewer images than a split holds, and
    # that fails on classes with one image (see docs/gpu-check.md, "Found on the way")
    parity_images=256,
    ood_images=256,
    infer_batch=64,
    infer_batches=10,
    budget_s=GPU_BUDGET_S,
    # what a step may take on the GPU machine, with margin (compile: ~1 min of compilation per method);
    # a step starts only when this much of the budget is left
    estimates_s={
        "finetune-organamnist": 90,
        "pretrain-spark": 75,
        "pretrain-mocov2": 90,
        "export": 90,
        "inference": 40,
        "finetune-headct": 60,
        "compile-spark": 120,
        "compile-mocov2": 120,
    },
)
DRY_PLAN = Plan(
    image_size=64,
    ft_train=64,
    ft_val=22,
    ft_test=22,
    ft_batch=32,
    ft_epochs=3,  # 2 steps an epoch: 6 steps
    ft_head_epochs=1,
    ft_lr=3e-4,
    head_folds=2,
    head_epochs=2,
    head_batch=16,
    head_max_train=32,
    pt_steps=3,
    pt_batch={"spark": 16, "mocov2": 16},
    pt_log_every=1,
    monitor_size=16,
    compile_warmup=1,
    compile_steps=1,
    parity_images=22,
    ood_images=0,  # no OOD reference: its stratified subsets need more images than the dry run has
    infer_batch=16,
    infer_batches=2,
    budget_s=1200.0,
)


# --- log, warnings, deadline --------------------------------------------------------------------------------


class Tee(io.TextIOBase):
    """Writes to the console and to the log file."""

    def __init__(self, console: Any, log: Any) -> None:
        self.console, self.log = console, log

    def write(self, s: str) -> int:
        self.console.write(s)
        self.log.write(s)
        return len(s)

    def flush(self) -> None:
        self.console.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return False


class WarningLog(logging.Handler):
    """Collects Python warnings and WARNING log records, each text once, in order."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.items: list[str] = []

    def add(self, text: str) -> None:
        if text not in self.items:
            self.items.append(text)

    def emit(self, record: logging.LogRecord) -> None:
        self.add(f"{record.name}: {record.getMessage()}")


@dataclass
class Check:
    """The run's record: steps, checks, environment, figures; written as JSON at the end (or by the
    watchdog when the deadline passes)."""

    mode: str
    plan: Plan
    out: Path
    json_name: str
    started: float = field(default_factory=time.perf_counter)
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    table: list[dict[str, Any]] = field(default_factory=list)
    warnings: WarningLog = field(default_factory=WarningLog)
    lock: threading.Lock = field(default_factory=threading.Lock)
    written: bool = False

    def left(self) -> float:
        return self.plan.budget_s - (time.perf_counter() - self.started)

    def step(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        """Run one step unless the budget cannot hold it; record its figures, time, peak GPU memory and
        error. Returns its figures, or None when it failed or was skipped."""
        need = self.plan.estimates_s.get(name, 0.0)
        if self.left() < need:
            msg = f"skipped: {self.left():.0f} s of the budget left, the step may take {need:.0f} s"
            self.steps[name] = {"ok": False, "skipped": msg}
            print(f"\n=== {name}: {msg}", flush=True)
            self.warnings.add(f"{name} {msg}")
            return None
        print(f"\n=== {name} ({self.left():.0f} s of the budget left)", flush=True)
        _reset_peak_memory()
        t0 = time.perf_counter()
        rec: dict[str, Any] = {"ok": False}
        self.steps[name] = rec
        try:
            rec.update(fn())
            rec["ok"] = all(v for k, v in rec.items() if k.startswith("check_")) and not rec.get("error")
        except Exception as e:  # noqa: BLE001 -- one failing step must not hide the others' figures
            rec["error"] = f"{type(e).__name__}: {e}"
            rec["traceback"] = traceback.format_exc(limit=8)
            print(rec["traceback"], file=sys.stderr, flush=True)
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        peak = _peak_memory_mib()
        if peak is not None:
            rec["peak_gpu_mib"] = peak
        failed = [k for k, v in rec.items() if k.startswith("check_") and not v]
        print(
            f"=== {name}: {'ok' if rec['ok'] else 'FAILED ' + str(failed or rec.get('error'))} "
            f"in {rec['seconds']} s" + (f", peak GPU memory {peak:.0f} MiB" if peak is not None else ""),
            flush=True,
        )
        return rec if rec["ok"] else None

    def failed(self) -> list[str]:
        return [n for n, s in self.steps.items() if not s.get("ok") and "skipped" not in s]

    def skipped(self) -> list[str]:
        return [n for n, s in self.steps.items() if "skipped" in s]

    def result(self, deadline_hit: bool = False) -> dict[str, Any]:
        core = all((self.steps.get(n) or {}).get("ok") for n in CORE_STEPS)
        return {
            "mode": self.mode,
            "message": "GPU check" if self.mode == "gpu" else "no GPU found: dry run on CPU",
            "ok": core and not self.failed() and not deadline_hit,
            "failed": self.failed(),
            "skipped": self.skipped(),
            "core_steps": list(CORE_STEPS),
            "deadline_hit": deadline_hit,
            "wall_s": round(time.perf_counter() - self.started, 1),
            "budget_s": self.plan.budget_s,
            "plan": asdict(self.plan),
            "environment": self.env,
            "steps": self.steps,
            "table": self.table,
            "warnings": self.warnings.items,
            "imported_distributions": imported_distributions(),
        }

    def write(self, deadline_hit: bool = False) -> Path:
        with self.lock:
            path = self.out / self.json_name
            if not self.written:
                path.write_text(json.dumps(self.result(deadline_hit), indent=2, default=str) + "\n")
                self.written = deadline_hit  # the watchdog's write is final
            return path


def watchdog(check: Check) -> threading.Timer:
    """Past the budget plus a grace period, write what the run has and end the process (a hung compile or
    kernel must not cost the whole call's results)."""

    def fire() -> None:
        print(
            f"\ngpu-check: DEADLINE: {check.plan.budget_s + GRACE_S:.0f} s passed; writing the partial "
            "results and stopping",
            flush=True,
        )
        try:
            print(f"wrote {check.write(deadline_hit=True)}", flush=True)
        except Exception as e:  # noqa: BLE001 -- the main thread may be changing the record: the log stays
            print(f"gpu-check: could not write the JSON ({type(e).__name__}: {e})", flush=True)
        sys.stdout.flush()
        os._exit(3)

    t = threading.Timer(max(1.0, check.left() + GRACE_S), fire)
    t.daemon = True
    t.start()
    return t


# --- environment --------------------------------------------------------------------------------------------


def install_missing(wheels: Path = CARRY / "wheels", site: Path = SITE) -> dict[str, Any]:
    """Install the carried wheels into `site` (on sys.path) when a module they provide is missing; never
    touches the interpreter's own packages (torch stays the image's CUDA build)."""
    missing = [m for m in ("pydicom", "pylibjpeg", "openjpeg") if importlib.util.find_spec(m) is None]
    files = sorted(wheels.glob("*.whl"))
    if not missing:
        return {"installed": [], "missing_before": []}
    if not files:
        raise RuntimeError(
            f"{missing} missing and no wheels in {wheels}: run `make gpu-wheels` and carry "
            f"{wheels.parent.name}"
        )
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--no-deps",
        "--no-compile",
        "--no-cache-dir",
        "--upgrade",
        "--target",
        str(site),
        *map(str, files),
    ]
    print("+", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    print(done.stdout + done.stderr, end="", flush=True)
    done.check_returncode()
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])
    importlib.invalidate_caches()
    still = [m for m in missing if importlib.util.find_spec(m) is None]
    if still:
        raise RuntimeError(f"still missing after installing the wheels: {still}")
    return {"installed": [f.name for f in files], "missing_before": missing, "site": str(site)}


def environment(mode: str) -> dict[str, Any]:
    import torch

    from cthub.runtime import hardware

    env: dict[str, Any] = {
        "mode": mode,
        "python": sys.version.split()[0],
        "hardware": hardware(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            device=torch.cuda.get_device_name(0),
            capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            bf16_supported=torch.cuda.is_bf16_supported(),
            autocast_dtype="bfloat16" if torch.cuda.is_bf16_supported() else "float16 (GradScaler)",
            tf32_conv_default=torch.backends.cudnn.allow_tf32,
            tf32_matmul_default=torch.backends.cuda.matmul.allow_tf32,
        )
    for name in ("onnx", "onnxruntime", "onnxscript", "pydicom", "numpy", "scikit-learn", "safetensors"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            env.setdefault("versions", {})[name] = importlib.metadata.version(name)
    import onnxruntime

    env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    return env


def imported_distributions() -> list[str]:
    """The third-party distributions whose modules this process imported (normalized names): what the GPU
    image must have or the carried wheels must bring."""
    from bench.gpu_wheels import normalize

    owners = importlib.metadata.packages_distributions()
    own = set(PROJECT_PACKAGES)
    tops = {m.split(".")[0] for m in list(sys.modules)}
    names = set()
    for top in tops - own - set(sys.stdlib_module_names):
        for dist in owners.get(top, []):
            if normalize(dist) != "ct-ssl-hub":
                names.add(normalize(dist))
    return sorted(names)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _reset_peak_memory() -> None:
    if _cuda():
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_memory_mib() -> float | None:
    if not _cuda():
        return None
    import torch

    torch.cuda.synchronize()
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def _sync() -> None:
    if _cuda():
        import torch

        torch.cuda.synchronize()


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    """TF32 for CUDA convolutions and matmuls on or off (torch's default: on for cuDNN convolutions)."""
    import torch

    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def cthub(argv: list[str]) -> tuple[int, str]:
    """`cthub ARGV` in this process (so CUDA memory and warnings are measured); (exit code, its stdout)."""
    from cthub.cli import main

    print("+ cthub " + " ".join(argv), flush=True)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    print(buf.getvalue(), end="", flush=True)
    return code, buf.getvalue()


def flags(*words: str, **options: Any) -> list[str]:
    """A command line: `words`, then options from keywords (`max_train=64` -> `--max-train 64`; None
    leaves one out)."""
    out = list(words)
    for k, v in options.items():
        if v is not None:
            out += ["--" + k.replace("_", "-"), str(v)]
    return out


def first_existing(paths: tuple[Path, ...]) -> Path | None:
    return next((p for p in paths if p.exists()), None)


# --- 1. fine-tuning -----------------------------------------------------------------------------------------


def _history(model_dir: Path) -> list[dict[str, Any]]:
    cfg = json.loads((model_dir / "config.json").read_text())
    return list(cfg["provenance"]["history"])


def _train_rate(history: list[dict[str, Any]]) -> float:
    """Images/s of the fine-tune: the full-model epochs after the first epoch (cuDNN autotuning and the first
    allocations fall in the first)."""
    full = [h for h in history[1:] if h["phase"] == "full"] or history[-1:]
    return round(sum(h["images_per_s"] for h in full) / len(full), 1)


def finetune_organamnist(plan: Plan, npz: Path, out: Path) -> dict[str, Any]:
    import numpy as np
    import torch

    from export.data import load_model_data
    from finetune import predict_proba
    from hub.io import load_dir

    model_dir = out / "organamnist"
    argv = flags(
        "finetune",
        data=npz,
        encoder="scratch",
        out=model_dir,
        image_size=plan.image_size,
        epochs=plan.ft_epochs,
        head_epochs=plan.ft_head_epochs,
        lr=plan.ft_lr,
        batch_size=plan.ft_batch,
        max_train=plan.ft_train,
        max_val=plan.ft_val,
        max_test=plan.ft_test,
        patience=0,
        name="gpu-check-organamnist",
        note="gpu-check: a throughput and correctness check, not a model",
    )
    code, _ = cthub(argv)
    if code != 0:
        return {"error": f"cthub finetune exited {code}"}
    history = _history(model_dir)
    losses = [float(h["train_loss"]) for h in history]
    steps_per_epoch = math.ceil(plan.ft_train / plan.ft_batch)
    config = json.loads((model_dir / "config.json").read_text())
    recorded_acc = float(config["metrics"]["test"]["accuracy"])
    # the saved classifier on the CPU, fp32: the test split fine-tuning measured, predicted again
    model = load_dir(model_dir)
    data = load_model_data(model.config, npz)
    probs = predict_proba(
        model,
        data.test.images,
        data.preprocessing,
        device=torch.device("cpu"),
        amp=False,
        channels_last=False,
    )
    assert data.test.labels is not None
    cpu_acc = float((probs.argmax(1) == data.test.labels).mean())
    rec: dict[str, Any] = {
        "data": f"{npz} (train {plan.ft_train}, val {plan.ft_val}, test {plan.ft_test}, 28 px -> "
        f"{plan.image_size} px)",
        "model_dir": str(model_dir),
        "steps": steps_per_epoch * len(history),
        "epochs": len(history),
        "train_loss": losses,
        "val_auc": [h["val_auc"] for h in history],
        "train_images_per_s": _train_rate(history),
        "precision": _precision(),
        "test_accuracy_on_device": recorded_acc,
        "test_accuracy_reloaded_cpu_fp32": round(cpu_acc, 4),
        "check_steps_ran": len(history) == plan.ft_epochs,
        "check_loss_finite": all(math.isfinite(v) for v in losses),
        "check_loss_falls": len(losses) >= 2 and losses[-1] < losses[0],
        "check_loads_on_cpu": bool(np.isfinite(probs).all())
        and probs.shape == (len(data.test), model.config.num_classes),
        # AMP on the device vs fp32 on the CPU may flip images near a boundary, a few; a classifier that
        # did not load back (head, BN statistics) falls to chance
        "check_reloaded_accuracy_close": abs(cpu_acc - recorded_acc) <= 0.05 + 2 / len(data.test),
    }
    if _cuda():  # the same weights on CUDA in fp32 vs the CPU
        with _tf32(False):
            gpu = predict_proba(model.cuda(), data.test.images, data.preprocessing, amp=False)
        rec["max_abs_diff_probs_cuda_fp32_vs_cpu"] = float(np.abs(gpu - probs).max())
    return rec


def _precision() -> str:
    import torch

    from cthub.runtime import cpu_has_native_bf16

    if torch.cuda.is_available():
        return "cuda autocast " + ("bf16" if torch.cuda.is_bf16_supported() else "fp16") + ", channels-last"
    return "cpu autocast bf16, channels-last" if cpu_has_native_bf16() else "cpu fp32, channels-last"


def finetune_headct(plan: Plan, folder: Path, out: Path) -> dict[str, Any]:
    model_dir = out / "headct"
    argv = flags(
        "finetune",
        data=folder,
        encoder="scratch",
        out=model_dir,
        protocol="kfold",
        folds=plan.head_folds,
        image_size=plan.image_size,
        epochs=plan.head_epochs,
        head_epochs=1,
        batch_size=plan.head_batch,
        max_train=plan.head_max_train,
        patience=0,
        name="gpu-check-headct",
        note="gpu-check: not a model",
    )
    code, stdout = cthub(argv)
    if code != 0:
        return {"error": f"cthub finetune exited {code}"}
    summary = json.loads(stdout[stdout.index("{") :])
    history = _history(model_dir)
    losses = [float(h["train_loss"]) for h in history]
    return {
        "data": f"{folder} ({plan.head_folds}-fold, {plan.image_size} px)",
        "cv_table": summary.get("table"),
        "train_loss_saved_fold": losses,
        "train_images_per_s": _train_rate(history),
        "check_folds_ran": len(summary.get("folds", [])) == plan.head_folds,
        "check_loss_finite": all(math.isfinite(v) for v in losses),
    }


# --- 2. pretraining -----------------------------------------------------------------------------------------


def _pretrain_amp() -> str:
    """`--amp` for `cthub pretrain`: the recipe's AMP on CUDA; on a CPU bf16 only where it is native (as the
    fine-tune's auto), else the dry run on an AVX2-only CPU would emulate bf16 at ~10x the time."""
    from cthub.runtime import cpu_has_native_bf16

    return "auto" if _cuda() else ("on" if cpu_has_native_bf16() else "off")


def _metrics_rows(path: Path) -> list[dict[str, float]]:
    import csv

    with open(path, newline="") as fh:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(fh)]


def pretrain(plan: Plan, method: str, npz: Path, out: Path, left_s: float) -> dict[str, Any]:
    import torch

    from hub.io import load_dir

    run = out / f"pretrain-{method}"
    batch = plan.pt_batch[method]
    argv = flags(
        "pretrain",
        method=method,
        data=npz,
        recipe="lidc-paper",
        image_size=plan.image_size,
        batch_size=batch,
        steps=plan.pt_steps,
        out=run,
        monitor_data=npz,  # the kNN monitor at the start and the end, on the sample's validation images
        monitor_size=plan.monitor_size,
        log_every=plan.pt_log_every,
        ckpt_every=plan.pt_steps,
        amp=_pretrain_amp(),
        seed=0,
        max_minutes=f"{max(left_s - 30, 30) / 60:.2f}",  # a cap inside the budget, not the budget
    )
    code, _ = cthub(argv)
    if code != 0:
        return {"error": f"cthub pretrain exited {code}"}
    rows = _metrics_rows(run / "metrics.csv")
    losses = [r["loss"] for r in rows]
    # images/s after the first logged window (cuDNN autotuning, allocations, the first views)
    first, last = rows[0], rows[-1]
    steady = (last["step"] - first["step"]) * batch / max(last["elapsed_s"] - first["elapsed_s"], 1e-9)
    enc = load_dir(run / "encoder")
    with torch.inference_mode():
        feats = enc(torch.zeros(2, 3, plan.image_size, plan.image_size))
    return {
        "recipe": "lidc-paper",
        "batch": batch,
        "steps": int(last["step"]),
        "loss_logged": losses,
        "images_per_s": round(steady, 1) if len(rows) > 1 else round(last["images_per_s"], 1),
        "images_per_s_note": "the trainer's own clock (views built on the CPU included), after the first "
        "logged window",
        "precision": _precision(),
        "check_steps_ran": int(last["step"]) == plan.pt_steps,
        "check_loss_finite": all(math.isfinite(v) for v in losses),
        "check_encoder_loads_on_cpu": tuple(feats.shape) == (2, 2048) and bool(torch.isfinite(feats).all()),
    }


def compile_vs_eager(plan: Plan, method: str, npz: Path, dry: bool) -> dict[str, Any]:
    """Steps of one method on ready views (compute only): eager channels-last, then torch.compile of the same
    module (compilation timed apart). On the dry run only eager runs: compile timings on a CPU say nothing
    about the GPU."""
    import torch

    from ctdata.datasets import load_unlabeled
    from ctdata.preprocess import PreprocessConfig
    from cthub.runtime import autocast, resolve_amp, select_device
    from pretrain import build_method, config_for
    from pretrain.base import to_channels_last
    from pretrain.data import BatchStream, make_views
    from pretrain.optim import build_optimizer

    batch = plan.pt_batch[method]
    cfg = config_for(method, "lidc-paper", image_size=plan.image_size, batch_size=batch, steps=100)
    device = select_device()
    amp = resolve_amp(True if _cuda() else _pretrain_amp() == "on", device)
    images = load_unlabeled(npz)
    stream = BatchStream(images, batch, seed=0)
    g = torch.Generator().manual_seed(0)
    pp = PreprocessConfig(input_size=plan.image_size, in_chans=3)
    torch.manual_seed(0)
    method_m = to_channels_last(build_method(cfg).to(device)).train()
    opt = build_optimizer(
        cfg.optimizer,
        method_m.param_groups(cfg.weight_decay),
        1e-4,
        cfg.weight_decay,
        cfg.betas,
        cfg.momentum,
    )
    specs = method_m.view_specs(plan.image_size, False)
    views = [make_views(stream.unit(i), specs, pp, g, device, True) for i in range(3)]
    step_no = [0]

    def step(fwd: Callable[[list[torch.Tensor]], torch.Tensor]) -> float:
        i = step_no[0]
        with autocast(device, amp):
            loss = fwd(views[i % len(views)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        method_m.before_optimizer_step(i)
        opt.step()
        method_m.after_optimizer_step(i, 100)
        step_no[0] += 1
        return float(loss.detach())

    def timed(fwd: Callable[[list[torch.Tensor]], torch.Tensor], n: int) -> tuple[float, list[float]]:
        _sync()
        t0 = time.perf_counter()
        losses = [step(fwd) for _ in range(n)]
        _sync()
        return (time.perf_counter() - t0) / n, losses

    n = plan.compile_steps
    timed(method_m, plan.compile_warmup)  # warm-up: allocations, cuDNN's algorithm choice
    eager_s, eager_losses = timed(method_m, n)
    rec: dict[str, Any] = {
        "batch": batch,
        "steps_timed": n,
        "eager_s_per_step": round(eager_s, 4),
        "eager_images_per_s": round(batch / eager_s, 1),
        "check_loss_finite": all(math.isfinite(v) for v in eager_losses),
    }
    if dry:
        rec["compiled"] = "skipped: dry run (compile timings on a CPU say nothing about the GPU)"
        return rec
    compiled = torch.compile(method_m)
    t0 = time.perf_counter()
    try:
        timed(compiled, plan.compile_warmup)  # the first call compiles; later ones may recompile
    except Exception as e:  # noqa: BLE001 -- a method that does not compile is a finding, not a failed check
        rec["compiled"] = f"failed: {type(e).__name__}: {str(e)[:400]}"
        return rec
    rec["compile_s"] = round(time.perf_counter() - t0, 1)
    comp_s, comp_losses = timed(compiled, n)
    rec.update(
        compiled_s_per_step=round(comp_s, 4),
        compiled_images_per_s=round(batch / comp_s, 1),
        speedup=round(eager_s / comp_s, 3),
        keep="torch.compile" if comp_s < eager_s else "eager",
        steps_to_repay_compile=(
            math.ceil(rec["compile_s"] / (eager_s - comp_s)) if comp_s < eager_s else None
        ),
        check_loss_finite=rec["check_loss_finite"] and all(math.isfinite(v) for v in comp_losses),
    )
    return rec


# --- 3. export and parity -----------------------------------------------------------------------------------


def export_and_parity(plan: Plan, model_dir: Path, npz: Path) -> dict[str, Any]:
    import numpy as np
    import onnxruntime
    import torch

    from ctdata.preprocess import prepare_batch
    from export import OnnxClassifier, TorchClassifier, export_onnx
    from export.data import load_model_data

    report = export_onnx(model_dir, data=npz, parity_images=plan.parity_images, ood_images=plan.ood_images)
    print(report.summary(), flush=True)
    torch_cpu = TorchClassifier.from_dir(model_dir, device=torch.device("cpu"), ood=False)
    data = load_model_data(torch_cpu.config, npz)
    x = prepare_batch(data.test.images[: plan.parity_images], torch_cpu.config.preprocessing).numpy()
    cuda_ep = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    ort = OnnxClassifier(model_dir / "model.onnx")
    ref_cpu = torch_cpu.logits(x)
    got_ort = ort.logits(x)
    rec: dict[str, Any] = {
        "export_report": {k: v for k, v in report.to_dict().items() if k not in ("ood", "notes")},
        "ort_providers": ort.providers,
        "cuda_execution_provider": cuda_ep,
        "images": len(x),
        "max_abs_logit": float(np.abs(ref_cpu).max()),
        "max_abs_diff_ort_vs_torch_cpu": float(np.abs(got_ort - ref_cpu).max()),
        "check_export_parity": bool(report.passed),
    }
    if not cuda_ep:
        rec["note"] = (
            ORT_GPU_NOTE if _cuda() else "no CUDA here: torch on the CPU stands in for torch on CUDA"
        )
    device = torch.device("cuda") if _cuda() else torch.device("cpu")
    torch_dev = TorchClassifier.from_dir(model_dir, device=device, ood=False)
    with _tf32(False):
        strict = torch_dev.logits(x)
    with _tf32(True):
        tf32 = torch_dev.logits(x)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
        amp = torch_dev.module(torch.from_numpy(x).to(device)).float().cpu().numpy()
    tol = CUDA_PARITY_ATOL + CUDA_PARITY_RTOL * rec["max_abs_logit"]
    d_strict = float(np.abs(strict - got_ort).max())
    rec.update(
        torch_device=str(device),
        max_abs_diff_ort_vs_torch_device_fp32=d_strict,
        max_abs_diff_torch_device_fp32_vs_cpu=float(np.abs(strict - ref_cpu).max()),
        max_abs_diff_ort_vs_torch_device_tf32=float(np.abs(tf32 - got_ort).max()),
        max_abs_diff_ort_vs_torch_device_bf16=float(np.abs(amp - got_ort).max()),
        top1_agreement_tf32=float((tf32.argmax(1) == got_ort.argmax(1)).mean()),
        top1_agreement_bf16=float((amp.argmax(1) == got_ort.argmax(1)).mean()),
        tolerance=tol,
        check_parity_ort_vs_torch_device=d_strict <= tol,
        # the same top-1 wherever the top-2 margin exceeds twice the measured difference (the export's rule)
        check_top1_fp32=_unexplained_flips(strict, got_ort) == 0,
    )
    return rec


def _unexplained_flips(got: Any, ref: Any) -> int:
    """Images whose top-1 differs although the reference's top-2 margin exceeds twice the max difference."""
    import numpy as np

    d = float(np.abs(got - ref).max())
    top2 = np.sort(ref, axis=1)[:, -2:]
    return int(np.sum((got.argmax(1) != ref.argmax(1)) & (top2[:, 1] - top2[:, 0] > 2 * d)))


def inference(plan: Plan, model_dir: Path) -> dict[str, Any]:
    """Images/s of the classifier: torch on the device (fp32 with torch's default TF32, and bf16 autocast,
    channels-last), and ONNX Runtime with the providers it has."""
    import numpy as np
    import torch

    from export import OnnxClassifier, TorchClassifier

    device = torch.device("cuda") if _cuda() else torch.device("cpu")
    clf = TorchClassifier.from_dir(model_dir, device=device, ood=False)
    model = clf.module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    s, b = plan.image_size, plan.infer_batch
    x = torch.randn(b, 3, s, s, device=device).contiguous(memory_format=torch.channels_last)

    def rate(amp: bool) -> float:
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            model(x)  # warm-up
            _sync()
            t0 = time.perf_counter()
            for _ in range(plan.infer_batches):
                model(x)
            _sync()
        return round(b * plan.infer_batches / (time.perf_counter() - t0), 1)

    rec: dict[str, Any] = {
        "batch": b,
        "size": s,
        "torch_device": str(device),
        "torch_fp32_images_per_s": rate(False),
        "torch_bf16_images_per_s": rate(True),
    }
    ort = OnnxClassifier(model_dir / "model.onnx")
    xb = np.random.default_rng(0).standard_normal((16, 3, s, s)).astype(np.float32)
    ort.logits(xb)
    t0 = time.perf_counter()
    n = 3
    for _ in range(n):
        ort.logits(xb)
    rec.update(
        ort_providers=ort.providers,
        ort_batch=16,
        ort_images_per_s=round(16 * n / (time.perf_counter() - t0), 1),
        ort_threads=os.cpu_count(),
    )
    rec["check_ran"] = True
    return rec


# --- 4. the table -------------------------------------------------------------------------------------------


def cpu_figures(results: Path = RESULTS) -> dict[str, Any]:
    """This repository's committed CPU measurements that the table sets beside the GPU's (missing: None)."""

    def load(name: str) -> dict[str, Any]:
        p = results / f"{name}.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    ft, pt, ex = load("finetune"), load("pretrain"), load("export")
    methods = pt.get("methods", {})
    batch16: dict[str, Any] = next((r for r in ex.get("images_per_s", []) if r.get("batch") == 16), {})
    machine = (pt.get("cpu") or {}).get("model", "?")
    return {
        "finetune": (
            ft.get("train_images_per_s_64px", {}).get("bf16_channels_last"),
            64,
            f"bench/results/finetune.json, {ft.get('threads', '?')} threads, bf16 channels-last",
        ),
        "spark": (
            (methods.get("spark") or {}).get("images_per_s_prefetch"),
            pt.get("image_size"),
            f"bench/results/pretrain.json, {pt.get('threads', '?')} thread, {pt.get('precision', '?')}",
        ),
        "mocov2": (
            (methods.get("mocov2") or {}).get("images_per_s_prefetch"),
            pt.get("image_size"),
            f"bench/results/pretrain.json, {pt.get('threads', '?')} thread, {pt.get('precision', '?')}",
        ),
        "torch_infer": (
            batch16.get("torch_channels_last"),
            ex.get("size"),
            f"bench/results/export.json, torch fp32 channels-last, batch 16, {ex.get('threads')} threads",
        ),
        "ort_infer": (
            batch16.get("ort_fp32"),
            ex.get("size"),
            f"bench/results/export.json, ONNX Runtime fp32, batch 16, {ex.get('threads')} threads",
        ),
        "machine": machine,
    }


def build_table(check: Check) -> list[dict[str, Any]]:
    """One row per measured throughput: the GPU figure (or the dry run's), the committed CPU figure and its
    size; the ratio is FLOP-adjusted ((S_gpu / S_cpu)^2 more work per image) where the sizes differ."""
    cpu = cpu_figures()
    s = check.steps
    size = check.plan.image_size
    rows: list[tuple[str, str, Any, str]] = [
        (
            "fine-tune, train",
            "finetune-organamnist",
            (s.get("finetune-organamnist") or {}).get("train_images_per_s"),
            "finetune",
        ),
        ("SparK pretrain", "pretrain-spark", (s.get("pretrain-spark") or {}).get("images_per_s"), "spark"),
        (
            "MoCo v2 pretrain",
            "pretrain-mocov2",
            (s.get("pretrain-mocov2") or {}).get("images_per_s"),
            "mocov2",
        ),
        (
            "classifier inference, torch fp32",
            "inference",
            (s.get("inference") or {}).get("torch_fp32_images_per_s"),
            "torch_infer",
        ),
        (
            "classifier inference, torch bf16",
            "inference",
            (s.get("inference") or {}).get("torch_bf16_images_per_s"),
            "torch_infer",
        ),
        (
            "classifier inference, ONNX Runtime",
            "inference",
            (s.get("inference") or {}).get("ort_images_per_s"),
            "ort_infer",
        ),
    ]
    table = []
    for label, step, ips, key in rows:
        cpu_ips, cpu_size, source = cpu.get(key, (None, None, ""))
        ratio = None
        if ips and cpu_ips and cpu_size:
            ratio = round(ips / cpu_ips * (size / cpu_size) ** 2, 1)
        table.append(
            {
                "what": label,
                "size": size,
                "images_per_s": ips,
                "peak_gpu_mib": (s.get(step) or {}).get("peak_gpu_mib"),
                "cpu_images_per_s": cpu_ips,
                "cpu_size": cpu_size,
                "cpu_source": source,
                "ratio_flop_adjusted": ratio,
            }
        )
    return table


def print_table(check: Check) -> None:
    head = (
        f"{'what':<36} {'px':>4} {'img/s':>9} {'peak MiB':>9} | {'CPU img/s':>9} {'CPU px':>6} {'ratio*':>8}"
    )
    where = check.env.get("device") or "CPU (dry run)"
    print(f"\n{where}: images/s beside this repository's CPU figures ({cpu_figures()['machine']})")
    print(head)
    print("-" * len(head))

    def f(v: Any, fmt: str = "{:.1f}") -> str:
        return "-" if v is None else fmt.format(v)

    for r in check.table:
        print(
            f"{r['what']:<36} {r['size']:>4} {f(r['images_per_s']):>9} {f(r['peak_gpu_mib'], '{:.0f}'):>9} | "
            f"{f(r['cpu_images_per_s']):>9} {f(r['cpu_size'], '{}'):>6} "
            f"{f(r['ratio_flop_adjusted'], '{:.1f}x'):>8}"
        )
    print("* ratio = GPU img/s / CPU img/s x (px / CPU px)^2: the same work per image at both sizes")
    for name in ("compile-spark", "compile-mocov2"):
        c = check.steps.get(name) or {}
        if "eager_s_per_step" in c:
            print(
                f"{name}: eager {c['eager_images_per_s']} img/s; compiled "
                + (
                    f"{c['compiled_images_per_s']} img/s after {c['compile_s']} s of compilation "
                    f"(x{c['speedup']}): keep {c['keep']}"
                    if "speedup" in c
                    else str(c.get("compiled"))
                )
            )
    peaks = [float(v["peak_gpu_mib"]) for v in check.steps.values() if v.get("peak_gpu_mib") is not None]
    if peaks:
        print(f"peak GPU memory over all steps: {max(peaks):.0f} MiB")
    print(f"warnings: {len(check.warnings.items)}")
    for w in check.warnings.items:
        print(f"  - {w[:300]}")


# --- main ---------------------------------------------------------------------------------------------------


def _pretrain_step(check: Check, plan: Plan, method: str, npz: Path, workdir: Path) -> dict[str, Any]:
    return pretrain(plan, method, npz, workdir, check.left())


def run(check: Check, workdir: Path) -> None:
    plan, dry = check.plan, check.mode != "gpu"
    npz = first_existing(ORGAN_SOURCES)
    head = first_existing(HEAD_CT_SOURCES)
    check.env["organamnist"] = str(npz) if npz else None
    check.env["head_ct"] = str(head) if head else None
    if npz is None:
        check.steps["data"] = {
            "ok": False,
            "error": "no OrganAMNIST: run `make gpu-wheels` and carry .gpu-check",
        }
        return
    organ = check.step("finetune-organamnist", lambda: finetune_organamnist(plan, npz, workdir))
    for method in ("spark", "mocov2"):
        check.step(f"pretrain-{method}", functools.partial(_pretrain_step, check, plan, method, npz, workdir))
    if organ is not None:
        model_dir = Path(organ["model_dir"])
        check.step("export", lambda: export_and_parity(plan, model_dir, npz))
        if (model_dir / "model.onnx").is_file():
            check.step("inference", lambda: inference(plan, model_dir))
    else:
        for name in ("export", "inference"):
            check.steps[name] = {"ok": False, "skipped": "no classifier: finetune-organamnist did not pass"}
    if head is not None:
        check.step("finetune-headct", lambda: finetune_headct(plan, head, workdir))
    else:
        check.warnings.add("no head CT folder: finetune-headct not run")
    for method in ("spark", "mocov2"):
        check.step(f"compile-{method}", functools.partial(compile_vs_eager, plan, method, npz, dry))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="The GPU path in one run (docs/gpu-check.md).")
    ap.add_argument("--dry-run", action="store_true", help="the CPU dry run even where CUDA exists")
    ap.add_argument(
        "--out", default=None, help="folder for the JSON and the log (default: $OUT, else bench/results)"
    )
    ap.add_argument("--budget-s", type=float, default=None, help="seconds for the steps (GPU default 450)")
    a = ap.parse_args(argv)
    out = Path(a.out or os.environ.get("OUT") or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    for k, v in (
        ("ORT_DISABLE_TELEMETRY", "1"),
        ("HF_HUB_OFFLINE", "1"),
        ("HF_HUB_DISABLE_TELEMETRY", "1"),
        ("MPLBACKEND", "Agg"),
        ("PYTHONUNBUFFERED", "1"),
    ):
        os.environ.setdefault(k, v)
    t_start = time.perf_counter()
    import torch  # the image's own (CUDA) torch; nothing here installs another

    gpu = torch.cuda.is_available() and not a.dry_run
    mode = "gpu" if gpu else "dry-run"
    stem = "gpu-check" if gpu else "gpu-check-dryrun"
    plan = GPU_PLAN if gpu else DRY_PLAN
    if a.budget_s:
        plan = Plan(**{**asdict(plan), "budget_s": a.budget_s})
    log_file = open(out / f"{stem}.log", "w", buffering=1)  # noqa: SIM115 -- open for the whole run
    sys.stdout, sys.stderr = Tee(sys.__stdout__, log_file), Tee(sys.__stderr__, log_file)
    check = Check(mode, plan, out, f"{stem}.json", started=t_start)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
    logging.getLogger().addHandler(check.warnings)
    logging.captureWarnings(False)
    warnings.simplefilter("default")
    shown = warnings.showwarning

    def record_warning(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        check.warnings.add(f"{category.__name__}: {message} ({Path(filename).name}:{lineno})")
        shown(message, category, filename, lineno, file, line)

    warnings.showwarning = record_warning
    print(
        "GPU check on " + torch.cuda.get_device_name(0) if gpu else "no GPU found: dry run on CPU", flush=True
    )
    timer = watchdog(check)
    try:
        check.env["install"] = install_missing()
        check.env.update(environment(mode))
        with tempfile.TemporaryDirectory(prefix="cthub-gpu-check-") as tmp:
            os.environ["CTHUB_HOME"] = str(Path(tmp) / "hub")
            run(check, Path(tmp))
            check.table = build_table(check)
    except Exception as e:  # noqa: BLE001 -- the JSON and log still come back
        check.steps["setup"] = {
            "ok": False,
            "error": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc(limit=8),
        }
        print(check.steps["setup"]["traceback"], file=sys.stderr)
    timer.cancel()
    print_table(check)
    path = check.write()
    result = json.loads(path.read_text())
    verdict = (
        "ALL CORE STEPS PASSED"
        if result["ok"]
        else "FAILED: "
        + ", ".join(
            check.failed()
            or [f"{n} did not run" for n in CORE_STEPS if n not in check.steps or n in check.skipped()]
        )
    )
    if check.skipped():
        verdict += f" (skipped: {', '.join(check.skipped())})"
    print(
        f"\n{result['message']}: {verdict} "
        f"in {result['wall_s']} s (budget {plan.budget_s:.0f} s); wrote {path} and {out / (stem + '.log')}",
        flush=True,
    )
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    log_file.close()
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
