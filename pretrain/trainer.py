"""One training loop for all methods: schedule, AMP, channels_last, accumulation, DDP, exact resume, logs."""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from ctdata.datasets import source_preprocessing
from ctdata.preprocess import PreprocessConfig
from cthub.errors import ConfigError
from cthub.runtime import (
    autocast,
    needs_grad_scaler,
    precision_label,
    resolve_amp,
    select_device,
    torch_save_atomic,
)
from hub.config import WEIGHTS_NAME
from hub.io import from_pretrained
from hub.manifest import weights_digest
from hub.resnet import ResNet50
from pretrain import dist as pdist
from pretrain.base import SSLMethod, to_channels_last
from pretrain.config import TrainConfig, build_method
from pretrain.data import BatchStream, dataset_stats, load_images, make_views
from pretrain.monitor import KnnMonitor, MonitorLog, load_or_save_initial, read_monitor, relative_change
from pretrain.optim import apply_schedule, build_optimizer, cosine, lr_at

log = logging.getLogger(__name__)
CKPT_NAME = "checkpoint.pt"


@dataclass
class RunResult:
    """What a run produced: the plain encoder, its preprocessing and the facts a model card states."""

    encoder: ResNet50
    preprocessing: PreprocessConfig
    steps: int
    planned_steps: int
    epochs: float
    final_loss: float
    wall_time_s: float
    images_per_s: float
    losses: list[float] = field(default_factory=list)
    out: Path | None = None
    n_images: int = 0
    method: Any = None  # the trained SSLMethod (heads, targets, queues), e.g. for checks
    weight_change: dict[str, float] = field(default_factory=dict)  # ||W - W0|| / ||W0|| of the conv weights
    monitor: dict[str, Any] = field(default_factory=dict)  # the last kNN-monitor row
    parent: dict[str, Any] | None = None  # the encoder this run continued from (--init)
    precision: str = ""  # what the arithmetic was on this run's last machine ("cpu fp32", "cpu autocast ...")


def plain_encoder(method: SSLMethod) -> ResNet50:
    """The method's encoder as a plain dense ResNet50 (strict key match, fp32, contiguous)."""
    enc = ResNet50(num_classes=0, in_chans=method.encoder.in_chans)
    state = {k: v.detach().float().cpu().contiguous() for k, v in method.encoder.state_dict().items()}
    enc.load_state_dict(state, strict=True)
    return enc.eval()


def _log(msg: str) -> None:
    if pdist.rank() == 0:
        log.info(msg)


def _save_ckpt(
    path: Path,
    method: SSLMethod,
    opt: torch.optim.Optimizer,
    scaler: Any,
    step: int,
    aug_state: torch.Tensor,
    elapsed: float,
    cfg: TrainConfig,
    pp: PreprocessConfig,
    parent: dict[str, Any] | None = None,
) -> None:
    state = {
        "method": method.state_dict(),
        "optimizer": opt.state_dict(),
        "step": step,
        "aug_rng": aug_state,
        "torch_rng": torch.get_rng_state(),
        "elapsed": elapsed,
        "scaler": scaler.state_dict() if scaler else None,
        "config": cfg.to_dict(),
        "preprocessing": pp.to_dict(),
        "world": pdist.world_size(),
        "parent": parent,
    }
    states = [None] * pdist.world_size()
    if pdist.is_dist():  # every rank's RNG streams, so a resumed multi-process run continues exactly
        torch.distributed.all_gather_object(states, (state["aug_rng"], state["torch_rng"]))
        state["rank_rng"] = states
    if pdist.rank() == 0:
        torch_save_atomic(state, path)
    if pdist.is_dist():  # no rank leaves (and perhaps resumes) before the checkpoint is on disk
        torch.distributed.barrier()


class MetricsLog:
    """metrics.csv (appended across resumes) and TensorBoard scalars under tb/ (when installed)."""

    COLUMNS = ("step", "epoch", "loss", "lr", "weight_decay", "images_per_s", "elapsed_s")

    def __init__(self, out: Path, fresh: bool, tensorboard: bool, step: int) -> None:
        self.path = out / "metrics.csv"
        if fresh or not self.path.is_file():
            with open(self.path, "w", newline="") as fh:
                csv.writer(fh).writerow(self.COLUMNS)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"), purge_step=step)
            except ImportError:  # tensorboard is an optional extra
                self.tb = None

    def write(self, step: int, epoch: float, loss: float, lr: float, wd: float, ips: float, t: float) -> None:
        with open(self.path, "a", newline="") as fh:
            csv.writer(fh).writerow(
                [step, f"{epoch:.4f}", f"{loss:.6f}", f"{lr:.6g}", f"{wd:.6g}", f"{ips:.2f}", f"{t:.1f}"]
            )
        if self.tb is not None:
            for k, v in (("loss", loss), ("lr", lr), ("images_per_s", ips)):
                self.tb.add_scalar(f"pretrain/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


@dataclass
class _Run:
    """The live state of one run, built by `_setup` and advanced by `_train_step`."""

    cfg: TrainConfig
    device: torch.device
    method: SSLMethod
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: Any
    stream: BatchStream
    specs: list
    pp: PreprocessConfig
    g: torch.Generator
    amp: bool
    step: int
    elapsed: float
    total: int
    warmup: int
    steps_per_epoch: int
    global_batch: int
    lr_base: float
    lr_final: float
    fresh: bool
    n_images: int
    parent: dict[str, Any] | None = None


def _initial_encoder(cfg: TrainConfig) -> tuple[ResNet50 | None, dict[str, Any] | None]:
    """The parent encoder of a continued (hierarchical) run, and its identity for the card."""
    if not cfg.init:
        return None, None

    enc = from_pretrained(cfg.init, num_classes=0)
    if enc.in_chans != cfg.in_chans:
        raise ConfigError(f"--init {cfg.init}: {enc.in_chans} input channels, the recipe has {cfg.in_chans}")
    mc = getattr(enc, "config", None)
    loaded = (getattr(mc, "provenance", None) or {}).get("loaded") or {}  # what from_pretrained verified
    folder = Path(str(loaded.get("path") or loaded.get("from") or ""))
    weights = folder / WEIGHTS_NAME
    parent = {
        "name": cfg.init,
        "method": getattr(mc, "method", None),
        "sha256": loaded.get("sha256"),  # of the file
        "digest": weights_digest(weights) if weights.is_file() else None,  # of the tensors (as study records)
    }
    return enc, parent


def _preprocessing(cfg: TrainConfig, ckpt: dict[str, Any] | None, imgs: Any) -> PreprocessConfig:
    """The run's input normalisation: the checkpoint's when resuming, else measured on the images; the HU
    mapping is the one that made the data's grey levels where it is known (`source_preprocessing`)."""
    if ckpt is not None:
        return PreprocessConfig.from_dict(ckpt["preprocessing"])
    mean, std = dataset_stats(imgs, seed=cfg.seed) if cfg.normalize == "dataset" else (0.5, 0.25)
    base = source_preprocessing(cfg.data) if cfg.data else None
    return (base or PreprocessConfig()).replace(
        input_size=cfg.image_size,
        in_chans=cfg.in_chans,
        mean=(mean,),
        std=(std,),
        extra={"source": "uint8 grey 0..255 (already mapped)"},
    )


@dataclass(frozen=True)
class _Schedule:
    """Steps and learning rates of a run (rates scaled linearly by the global batch / 256)."""

    total: int
    warmup: int
    steps_per_epoch: int
    global_batch: int
    lr_base: float
    lr_final: float


def _schedule(cfg: TrainConfig, per_epoch: int, world: int) -> _Schedule:
    steps_per_epoch = max(1, per_epoch // cfg.accum_steps)
    if cfg.steps is None and cfg.epochs is None:
        total = 10**9  # --max-minutes alone: the clock ends the run (schedule then has no end)
    else:
        total = cfg.steps or math.ceil((cfg.epochs or 1e9) * steps_per_epoch)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_epochs * steps_per_epoch)
    global_batch = cfg.batch_size * cfg.accum_steps * world
    return _Schedule(
        total=total,
        warmup=min(warmup, total // 2),
        steps_per_epoch=steps_per_epoch,
        global_batch=global_batch,
        lr_base=cfg.base_lr * global_batch / 256,
        lr_final=cfg.final_lr * global_batch / 256,
    )


def _restore(
    ckpt: dict[str, Any],
    method: SSLMethod,
    opt: torch.optim.Optimizer,
    scaler: Any,
    g: torch.Generator,
    rank: int,
) -> tuple[int, float]:
    """Load a checkpoint into the live objects (weights, optimizer, scaler, both RNGs); (step, elapsed)."""
    method.load_state_dict(ckpt["method"])
    opt.load_state_dict(ckpt["optimizer"])
    if scaler and ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    aug_state, torch_state = ckpt.get("rank_rng", [None])[rank] or (ckpt["aug_rng"], ckpt["torch_rng"])
    g.set_state(aug_state)
    torch.set_rng_state(torch_state)
    return int(ckpt["step"]), float(ckpt["elapsed"])


def _setup(cfg: TrainConfig, resume: bool, images: Any) -> _Run:
    device = select_device(cfg.device)
    pdist.init_from_env(device)
    rank, world = pdist.rank(), pdist.world_size()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CKPT_NAME
    ckpt = (
        torch.load(ckpt_path, map_location="cpu", weights_only=True)  # plain dicts, tensors and numbers
        if resume and ckpt_path.is_file()
        else None
    )
    imgs = images if images is not None else load_images(cfg.data, cfg.storage_size, cfg.max_images)
    pp = _preprocessing(cfg, ckpt, imgs)
    torch.manual_seed(cfg.seed * 1000 + rank)
    g = torch.Generator().manual_seed(cfg.seed * 1000 + 17 + rank)
    parent_enc, parent = _initial_encoder(cfg) if ckpt is None else (None, (ckpt.get("parent") or None))
    method = build_method(cfg, parent_enc).to(device)
    stream = BatchStream(imgs, cfg.batch_size, cfg.seed, rank, world)
    sched = _schedule(cfg, stream.per_epoch, world)
    opt = build_optimizer(
        cfg.optimizer,
        method.param_groups(cfg.weight_decay),
        sched.lr_base,
        cfg.weight_decay,
        cfg.betas,
        cfg.momentum,
    )
    amp = resolve_amp(cfg.amp, device)
    scaler = torch.amp.GradScaler("cuda") if needs_grad_scaler(device, amp) else None
    step, elapsed = 0, 0.0
    if ckpt is not None:
        step, elapsed = _restore(ckpt, method, opt, scaler, g, rank)
        _log(f"[{cfg.method}] resumed at step {step}/{sched.total}")
    if world > 1:
        method.prepare_distributed(sync=True)
    if cfg.channels_last:
        method = to_channels_last(method)
    method.train()
    return _Run(
        cfg=cfg,
        device=device,
        method=method,
        model=DDP(method) if world > 1 else method,
        opt=opt,
        scaler=scaler,
        stream=stream,
        specs=method.view_specs(cfg.image_size, cfg.hflip),
        pp=pp,
        g=g,
        amp=amp,
        step=step,
        elapsed=elapsed,
        total=sched.total,
        warmup=sched.warmup,
        steps_per_epoch=sched.steps_per_epoch,
        global_batch=sched.global_batch,
        lr_base=sched.lr_base,
        lr_final=sched.lr_final,
        fresh=ckpt is None,
        n_images=len(imgs),
        parent=parent,
    )


def _views(run: _Run, micro_index: int) -> list[torch.Tensor]:
    return make_views(
        run.stream.unit(micro_index), run.specs, run.pp, run.g, run.device, run.cfg.channels_last
    )


def _train_step(run: _Run, next_views: Any) -> float:
    """One optimizer step (all micro-batches); returns the mean loss. `next_views(i)` yields micro-batch i."""
    cfg = run.cfg
    lr = lr_at(run.step, run.total, run.warmup, run.lr_base, run.lr_final)
    wd_end = cfg.weight_decay_end if cfg.weight_decay_end is not None else cfg.weight_decay
    wd = cosine(run.step, run.total, cfg.weight_decay, wd_end)
    apply_schedule(run.opt, lr, wd / cfg.weight_decay if cfg.weight_decay else 0.0)
    run.opt.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for micro in range(cfg.accum_steps):
        views = next_views(run.step * cfg.accum_steps + micro)
        last = micro == cfg.accum_steps - 1
        sync_ctx = run.model.no_sync() if isinstance(run.model, DDP) and not last else nullcontext()
        with sync_ctx:
            with autocast(run.device, run.amp):
                loss = run.model(views)
            scaled = loss / cfg.accum_steps
            (run.scaler.scale(scaled) if run.scaler else scaled).backward()
        loss_sum += float(loss.detach()) / cfg.accum_steps
    if not math.isfinite(loss_sum):
        raise ConfigError(
            f"[{cfg.method}] loss became {loss_sum} at step {run.step}; lower the learning rate"
        )
    run.method.before_optimizer_step(run.step)
    if run.scaler:
        run.scaler.unscale_(run.opt)
    if cfg.clip_grad:
        torch.nn.utils.clip_grad_norm_(run.method.parameters(), cfg.clip_grad)
    if run.scaler:
        run.scaler.step(run.opt)
        run.scaler.update()
    else:
        run.opt.step()
    run.method.after_optimizer_step(run.step, run.total)
    run.step += 1
    return loss_sum


class _Prefetcher:
    """Builds the views of micro-batch i+1 on one helper thread while micro-batch i trains.

    Augmentation is a pure function of (batch index, generator state), and batches are requested strictly in
    order, so the stream of views is the same as without prefetching (a resumed run continues exactly)."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="views")
        self.pending: tuple[int, Future] | None = None
        self.next_state: torch.Tensor | None = None  # generator state before the pending batch's draws

    def __call__(self, i: int) -> list[torch.Tensor]:
        if self.pending is not None and self.pending[0] == i:
            views = self.pending[1].result()
        else:
            views = _views(self.run, i)
        self.next_state = self.run.g.get_state()  # the helper is idle here: no draw in flight
        self.pending = (i + 1, self.pool.submit(_views, self.run, i + 1))
        return views

    def generator_state(self) -> torch.Tensor:
        """The augmentation generator's state as if batch `pending` had not been drawn yet (for
        checkpoints)."""
        return self.next_state if self.next_state is not None else self.run.g.get_state()

    def close(self) -> None:
        if self.pending is not None:
            self.pending[1].cancel()
        self.pool.shutdown(wait=True)


def train(
    cfg: TrainConfig, *, resume: bool = False, images: Any = None, stop_at: int | None = None
) -> RunResult:
    """Run (or resume) pretraining; writes checkpoint.pt, metrics.csv, monitor.csv and tb/ under `cfg.out`.

    `images` (uint8 [N,H,W]) replaces loading `cfg.data`; `stop_at` ends the run early at that step with a
    checkpoint, as an interruption would (the schedule still spans the full budget).
    """
    cfg.validate()
    run = _setup(cfg, resume, images)
    logs = _open_logs(cfg, run)
    # The prefetch thread draws from the augmentation generator in step order; with one process only
    # (under DDP every rank already runs its own process per core).
    fetch = _Prefetcher(run) if cfg.prefetch and pdist.world_size() == 1 else None
    next_views = fetch if fetch is not None else (lambda i: _views(run, i))
    clock = _Clock(time.perf_counter(), run.step, cfg.max_minutes)
    losses: list[float] = []
    try:
        if logs.monitor is not None and run.fresh and run.step == 0:
            logs.last_monitor = _check(logs, run, 0.0)
        while run.step < run.total:
            loss = _train_step(run, next_views)
            losses.append(loss)
            clock.window_imgs += run.global_batch
            done = run.step >= run.total or run.step == stop_at or clock.past_deadline()
            if clock.deadline is not None and pdist.world_size() > 1:  # every rank stops at the same step
                done = bool(pdist.all_reduce_sum(torch.tensor(float(done))) > 0)
            if logs.metrics is not None and (run.step % cfg.log_every == 0 or done):
                _log_progress(run, logs.metrics, loss, clock)
            if logs.monitor is not None and (
                done or (cfg.monitor_every and run.step % cfg.monitor_every == 0)
            ):
                t_mon = time.perf_counter()
                logs.last_monitor = _check(logs, run, run.elapsed + t_mon - clock.start)
                clock.window_t += time.perf_counter() - t_mon  # monitor time does not count against images/s
            if run.step % cfg.ckpt_every == 0 or done:
                aug_state = fetch.generator_state() if fetch is not None else run.g.get_state()
                _save_ckpt(
                    Path(cfg.out) / CKPT_NAME,
                    run.method,
                    run.opt,
                    run.scaler,
                    run.step,
                    aug_state,
                    run.elapsed + time.perf_counter() - clock.start,
                    cfg,
                    run.pp,
                    run.parent,
                )
            if done:
                break
    finally:
        if fetch is not None:
            fetch.close()
        if logs.metrics is not None:
            logs.metrics.close()
    return _result(run, logs, losses, clock)


@dataclass
class _Logs:
    """Rank 0's outputs: initial weights (for the weight change), kNN monitor, its CSV, metrics.csv/tb."""

    initial: dict[str, torch.Tensor] | None
    monitor: KnnMonitor | None
    monitor_log: MonitorLog | None
    metrics: MetricsLog | None
    last_monitor: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Clock:
    """Wall time of this process's part of the run, and the images/s window between log lines."""

    start: float
    first_step: int
    max_minutes: float | None
    window_imgs: int = 0
    window_t: float = 0.0
    deadline: float | None = None

    def __post_init__(self) -> None:
        self.window_t = self.start
        self.deadline = self.start + self.max_minutes * 60 if self.max_minutes else None

    def past_deadline(self) -> bool:
        return self.deadline is not None and time.perf_counter() >= self.deadline


def _open_logs(cfg: TrainConfig, run: _Run) -> _Logs:
    out = Path(cfg.out)
    if pdist.rank() != 0:
        return _Logs(None, None, None, None)
    initial = load_or_save_initial(out, run.method.encoder, run.fresh)
    if run.fresh:  # the run's settings in plain JSON, readable without torch
        (out / "run_config.json").write_text(json.dumps({**cfg.to_dict(), "parent": run.parent}, indent=2))
    monitor = KnnMonitor.from_source(cfg.monitor_data, run.pp, cfg.monitor_size) if cfg.monitor_data else None
    return _Logs(
        initial,
        monitor,
        MonitorLog(out, run.fresh) if monitor is not None else None,
        MetricsLog(out, fresh=run.fresh, tensorboard=cfg.tensorboard, step=run.step),
    )


def _log_progress(run: _Run, metrics: MetricsLog, loss: float, clock: _Clock) -> None:
    now = time.perf_counter()
    ips = clock.window_imgs / max(now - clock.window_t, 1e-9)
    ep = run.step / run.steps_per_epoch
    group = run.opt.param_groups[0]
    metrics.write(
        run.step, ep, loss, group["lr"], group["weight_decay"], ips, run.elapsed + now - clock.start
    )
    total = run.total if run.total < 10**9 else "?"
    _log(
        f"[{run.cfg.method}] step {run.step}/{total} epoch {ep:.2f} loss {loss:.4f} lr {group['lr']:.3g} "
        f"{ips:.1f} img/s{_eta(run, now - clock.start, clock.first_step)}"
    )
    clock.window_t, clock.window_imgs = now, 0


def _result(run: _Run, logs: _Logs, losses: list[float], clock: _Clock) -> RunResult:
    out = Path(run.cfg.out)
    tail = losses[-20:] or _logged_losses(out / "metrics.csv")[-2:]  # a finished run resumed: its log
    change = relative_change(logs.initial, run.method.encoder) if logs.initial is not None else {}
    last = logs.last_monitor
    if logs.monitor is not None and not last and (out / "monitor.csv").is_file():
        rows = read_monitor(out / "monitor.csv")
        last = rows[-1] if rows else {}
    seconds = time.perf_counter() - clock.start
    return RunResult(
        plain_encoder(run.method),
        run.pp,
        run.step,
        run.total,
        run.step / run.steps_per_epoch,
        sum(tail) / len(tail) if tail else float("nan"),
        run.elapsed + seconds,
        (run.step - clock.first_step) * run.global_batch / max(seconds, 1e-9),
        losses,
        out,
        run.n_images,
        run.method,
        weight_change=change,
        monitor=last,
        parent=run.parent,
        precision=precision_label(run.device, run.amp),
    )


def _logged_losses(path: Path) -> list[float]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [float(r["loss"]) for r in csv.DictReader(fh)]


def _eta(run: _Run, seconds: float, first_step: int) -> str:
    done = run.step - first_step
    if done <= 0 or run.total >= 10**9:
        return ""
    left = seconds / done * (run.total - run.step)
    return f" eta {int(left // 60)}m{int(left % 60):02d}s"


def _check(logs: _Logs, run: _Run, elapsed: float) -> dict[str, Any]:
    """One kNN-monitor row (with the weight change so far), written to monitor.csv and the log."""
    assert logs.monitor is not None
    m = logs.monitor.measure(run.method.encoder)
    row: dict[str, Any] = {
        "step": run.step,
        "epoch": round(run.step / run.steps_per_epoch, 4),
        "elapsed_s": round(elapsed, 1),
        **m,
    }
    if logs.initial is not None:
        row.update({f"change_{k}": v for k, v in relative_change(logs.initial, run.method.encoder).items()})
    if logs.monitor_log is not None:
        logs.monitor_log.write(row)
    _log(
        f"[{run.cfg.method}] monitor step {run.step}: kNN acc {m['knn_accuracy']:.3f} (majority "
        f"{m['majority_accuracy']:.3f}) auc {m['knn_auc']:.3f} collapse {m['collapse_std']:.2f} "
        f"weight change {row.get('change_total', float('nan')):.3f}"
    )
    return row
