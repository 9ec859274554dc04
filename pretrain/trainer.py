"""One training loop for all methods: schedule, AMP, channels_last, accumulation, DDP, exact resume, logs."""

from __future__ import annotations

import csv
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from ctdata.preprocess import PreprocessConfig
from cthub.runtime import autocast, needs_grad_scaler, resolve_amp, select_device
from hub.resnet import ResNet50
from pretrain import dist as pdist
from pretrain.base import SSLMethod
from pretrain.config import TrainConfig, build_method
from pretrain.data import BatchStream, dataset_stats, load_images, make_views
from pretrain.optim import apply_schedule, build_optimizer, cosine, lr_at

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


def plain_encoder(method: SSLMethod) -> ResNet50:
    """The method's encoder as a plain dense ResNet50 (strict key match, fp32, contiguous)."""
    enc = ResNet50(num_classes=0, in_chans=method.encoder.in_chans)
    state = {k: v.detach().float().cpu().contiguous() for k, v in method.encoder.state_dict().items()}
    enc.load_state_dict(state, strict=True)
    return enc.eval()


def _log(msg: str) -> None:
    if pdist.rank() == 0:
        print(msg, file=sys.stderr, flush=True)


def _save_ckpt(path: Path, method: SSLMethod, opt: torch.optim.Optimizer, scaler: Any, step: int,
               g: torch.Generator, elapsed: float, cfg: TrainConfig, pp: PreprocessConfig) -> None:
    state = {"method": method.state_dict(), "optimizer": opt.state_dict(), "step": step,
             "aug_rng": g.get_state(), "torch_rng": torch.get_rng_state(), "elapsed": elapsed,
             "scaler": scaler.state_dict() if scaler else None, "config": cfg.to_dict(),
             "preprocessing": pp.to_dict(), "world": pdist.world_size()}
    states = [None] * pdist.world_size()
    if pdist.is_dist():  # every rank's RNG streams, so a resumed multi-process run continues exactly
        torch.distributed.all_gather_object(states, (state["aug_rng"], state["torch_rng"]))
        state["rank_rng"] = states
    if pdist.rank() == 0:
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)


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
            csv.writer(fh).writerow([step, f"{epoch:.4f}", f"{loss:.6f}", f"{lr:.6g}", f"{wd:.6g}", f"{ips:.2f}",
                                     f"{t:.1f}"])
        if self.tb is not None:
            for k, v in (("loss", loss), ("lr", lr), ("images_per_s", ips)):
                self.tb.add_scalar(f"pretrain/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def train(cfg: TrainConfig, *, resume: bool = False, images: Any = None, stop_at: int | None = None
          ) -> RunResult:
    """Run (or resume) pretraining; writes checkpoint.pt, metrics.csv and tb/ under `cfg.out`.

    `images` (uint8 [N,H,W]) replaces loading `cfg.data`; `stop_at` ends the run early at that step with a
    checkpoint, as an interruption would (the schedule still spans the full budget).
    """
    cfg.validate()
    device = select_device(cfg.device)
    pdist.init_from_env(device)
    rank, world = pdist.rank(), pdist.world_size()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CKPT_NAME
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False) if resume and ckpt_path.is_file() else None

    imgs = images if images is not None else load_images(cfg.data, cfg.storage_size, cfg.max_images)
    if ckpt is not None:
        pp = PreprocessConfig.from_dict(ckpt["preprocessing"])
    else:
        mean, std = dataset_stats(imgs, seed=cfg.seed) if cfg.normalize == "dataset" else ((0.5,), (0.25,))
        pp = PreprocessConfig(input_size=cfg.image_size, in_chans=cfg.in_chans,
                              mean=(mean,) if isinstance(mean, float) else mean,
                              std=(std,) if isinstance(std, float) else std,
                              extra={"source": "uint8 grey 0..255 (already mapped)"})
    torch.manual_seed(cfg.seed * 1000 + rank)
    g = torch.Generator().manual_seed(cfg.seed * 1000 + 17 + rank)
    method = build_method(cfg).to(device)
    specs = method.view_specs(cfg.image_size, cfg.hflip)
    stream = BatchStream(imgs, cfg.batch_size, cfg.seed, rank, world)
    steps_per_epoch = max(1, stream.per_epoch // cfg.accum_steps)
    total = cfg.steps or math.ceil((cfg.epochs or 1e9) * steps_per_epoch)
    if cfg.steps is None and cfg.epochs is None:
        total = 10**9  # --max-minutes alone: the clock ends the run (schedule then has no end)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_epochs * steps_per_epoch)
    warmup = min(warmup, total // 2)
    global_batch = cfg.batch_size * cfg.accum_steps * world
    lr_base, lr_final = cfg.base_lr * global_batch / 256, cfg.final_lr * global_batch / 256
    opt = build_optimizer(cfg.optimizer, method.param_groups(cfg.weight_decay), lr_base, cfg.weight_decay,
                          cfg.betas, cfg.momentum)
    amp = resolve_amp(cfg.amp, device)
    scaler = torch.amp.GradScaler("cuda") if needs_grad_scaler(device, amp) else None
    step, elapsed = 0, 0.0
    if ckpt is not None:
        method.load_state_dict(ckpt["method"])
        opt.load_state_dict(ckpt["optimizer"])
        if scaler and ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        step, elapsed = int(ckpt["step"]), float(ckpt["elapsed"])
        aug_state, torch_state = ckpt.get("rank_rng", [None])[rank] or (ckpt["aug_rng"], ckpt["torch_rng"])
        g.set_state(aug_state)
        torch.set_rng_state(torch_state)
        _log(f"[{cfg.method}] resumed at step {step}/{total}")
    if world > 1:
        method.prepare_distributed(sync=True)
    if cfg.channels_last:
        method = method.to(memory_format=torch.channels_last)
    model: torch.nn.Module = DDP(method) if world > 1 else method
    method.train()

    log = MetricsLog(out, fresh=ckpt is None, tensorboard=cfg.tensorboard, step=step) if rank == 0 else None
    wd_end = cfg.weight_decay_end if cfg.weight_decay_end is not None else cfg.weight_decay
    losses: list[float] = []
    start = time.perf_counter()
    run_start_step, window_t, window_imgs = step, time.perf_counter(), 0
    deadline = start + cfg.max_minutes * 60 if cfg.max_minutes else None
    while step < total:
        lr = lr_at(step, total, warmup, lr_base, lr_final)
        wd = cosine(step, total, cfg.weight_decay, wd_end)
        apply_schedule(opt, lr, wd / cfg.weight_decay if cfg.weight_decay else 0.0)
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for micro in range(cfg.accum_steps):
            views = make_views(stream.unit(step * cfg.accum_steps + micro), specs, pp, g, device,
                               cfg.channels_last)
            sync_ctx = model.no_sync() if (world > 1 and micro < cfg.accum_steps - 1) else nullcontext()
            with sync_ctx:
                with autocast(device, amp):
                    loss = model(views)
                scaled = loss / cfg.accum_steps
                (scaler.scale(scaled) if scaler else scaled).backward()
            loss_sum += float(loss.detach()) / cfg.accum_steps
        if not math.isfinite(loss_sum):
            from cthub.errors import ConfigError

            raise ConfigError(f"[{cfg.method}] loss became {loss_sum} at step {step}; lower the learning rate")
        method.before_optimizer_step(step)
        if scaler:
            scaler.unscale_(opt)
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(method.parameters(), cfg.clip_grad)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        method.after_optimizer_step(step, total)
        step += 1
        losses.append(loss_sum)
        window_imgs += global_batch
        now = time.perf_counter()
        done = step >= total or step == stop_at or (deadline is not None and now >= deadline)
        if deadline is not None and world > 1:  # every rank stops at the same step
            done = bool(pdist.all_reduce_sum(torch.tensor(float(done))) > 0)
        if log is not None and (step % cfg.log_every == 0 or done):
            ips = window_imgs / max(now - window_t, 1e-9)
            ep = step / steps_per_epoch
            log.write(step, ep, loss_sum, lr, wd, ips, elapsed + now - start)
            _log(f"[{cfg.method}] step {step}/{total if total < 10**9 else '?'} epoch {ep:.2f} "
                 f"loss {loss_sum:.4f} lr {lr:.3g} {ips:.1f} img/s")
            window_t, window_imgs = now, 0
        if step % cfg.ckpt_every == 0 or done:
            _save_ckpt(ckpt_path, method, opt, scaler, step, g, elapsed + now - start, cfg, pp)
        if done:
            break
    wall = elapsed + time.perf_counter() - start
    if log is not None:
        log.close()
    ran = step - run_start_step
    tail = losses[-20:]
    return RunResult(plain_encoder(method), pp, step, total, step / steps_per_epoch,
                     sum(tail) / len(tail) if tail else float("nan"), wall,
                     ran * global_batch / max(time.perf_counter() - start, 1e-9), losses, out, len(imgs), method)

