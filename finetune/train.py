"""`fit`: the paper's fine-tuning recipe on uint8 image arrays, with model selection on validation."""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ctdata.datasets import ArraySplit
from ctdata.preprocess import PreprocessConfig, finalize
from cthub.errors import DataError
from cthub.runtime import autocast, num_threads, resolve_amp, seed_everything, select_device
from finetune.augment import AugmentConfig, augment_batch
from finetune.config import FinetuneConfig
from finetune.metrics import choose_threshold, classification_metrics
from hub.resnet import ResNet50

log = logging.getLogger("finetune")
SCRATCH_NAMES = ("scratch", "random", "none")


@dataclass
class FitResult:
    """The best model (eval mode, CPU, fp32) and everything measured while finding it."""

    model: ResNet50
    preprocessing: PreprocessConfig
    class_names: list[str]
    threshold: float | None
    best_epoch: int
    val_metrics: dict[str, Any]
    test_metrics: dict[str, Any] | None
    history: list[dict[str, Any]]
    wall_time_s: float
    train_images_per_s: float
    config: FinetuneConfig
    encoder: str = "scratch"
    encoder_config: dict[str, Any] = field(default_factory=dict)
    n_train: int = 0
    n_val: int = 0


def num_classes_of(split: ArraySplit) -> int:
    if split.labels is None:
        raise DataError("fine-tuning needs labels")
    return max(len(split.class_names), int(split.labels.max()) + 1)


def resolve_encoder(encoder: str | Path | nn.Module | None, num_classes: int, image_size: int,
                    scratch_preprocessing: PreprocessConfig | None = None
                    ) -> tuple[ResNet50, PreprocessConfig, str, dict[str, Any]]:
    """(model with a fresh K-class head, preprocessing at `image_size`, name, encoder config dict).
    A pretrained encoder keeps its own preprocessing (except the size); scratch uses the one given."""
    if encoder is None or (isinstance(encoder, str) and encoder.lower() in SCRATCH_NAMES):
        pp = (scratch_preprocessing or PreprocessConfig()).replace(input_size=image_size)
        return ResNet50(num_classes=num_classes), pp, "scratch", {}
    if isinstance(encoder, nn.Module):
        model = copy.deepcopy(encoder)  # never train the caller's module in place (k-fold reuses it)
        if getattr(model, "num_classes", None) != num_classes:
            model.reset_classifier(num_classes)  # type: ignore[operator]
        cfg = getattr(model, "config", None)
        pp = cfg.preprocessing if cfg is not None else PreprocessConfig()
        name = cfg.name if cfg is not None else "module"
        return model, pp.replace(input_size=image_size), name, (cfg.to_dict() if cfg is not None else {})
    from hub import from_pretrained

    model = from_pretrained(str(encoder), num_classes=num_classes)  # raises ModelNotFoundError
    cfg = model.config  # type: ignore[attr-defined]
    return model, cfg.preprocessing.replace(input_size=image_size), str(encoder), cfg.to_dict()


def _inputs(images: np.ndarray, pp: PreprocessConfig, aug: AugmentConfig | None,
            g: torch.Generator | None) -> torch.Tensor:
    unit = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)[:, None]
    if aug is not None:
        unit = augment_batch(unit, aug, g)
    return finalize(unit, pp)


@torch.no_grad()
def predict_proba(model: nn.Module, images: np.ndarray, pp: PreprocessConfig, *, batch_size: int = 256,
                  device: torch.device | None = None, amp: bool | None = None, channels_last: bool = True
                  ) -> np.ndarray:
    """Softmax probabilities [N, K] (float32) for uint8 images [N,H,W] through the shared preprocessing."""
    device = device or next(model.parameters()).device
    model.eval()
    amp = resolve_amp(amp, device)
    mf = torch.channels_last if channels_last else torch.contiguous_format
    out = []
    for s in range(0, len(images), batch_size):
        x = _inputs(images[s:s + batch_size], pp, None, None).to(device, memory_format=mf)
        with autocast(device, amp):
            logits = model(x)
        out.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
    if not out:
        raise DataError("no images to predict")
    return np.concatenate(out)


def _loss_fn(labels: np.ndarray, k: int, balance: str, device: torch.device) -> nn.Module:
    if balance != "weights":
        return nn.CrossEntropyLoss()
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    w = np.where(counts > 0, len(labels) / (k * np.maximum(counts, 1)), 0.0)
    return nn.CrossEntropyLoss(weight=torch.tensor(w, dtype=torch.float32, device=device))


def _epoch_order(labels: np.ndarray, balance: str, g: torch.Generator) -> np.ndarray:
    n = len(labels)
    if balance == "sampler":
        counts = np.bincount(labels)
        w = torch.tensor(1.0 / counts[labels], dtype=torch.float64)
        return torch.multinomial(w, n, replacement=True, generator=g).numpy()
    return torch.randperm(n, generator=g).numpy()


def _set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    for name, p in model.named_parameters():
        if not name.startswith("fc."):
            p.requires_grad_(trainable)


def fit(encoder: str | Path | nn.Module | None, train: ArraySplit, val: ArraySplit,
        test: ArraySplit | None = None, cfg: FinetuneConfig | None = None,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
        preprocessing: PreprocessConfig | None = None) -> FitResult:
    """Fine-tune `encoder` (hub name/path, a model, or "scratch") with a linear head on `train`; select the
    epoch by validation `cfg.select_metric`; measure `test` once with the selected model. `preprocessing`
    (intensity mapping, e.g. a window) applies to a scratch encoder; pretrained ones keep their own."""
    cfg = cfg or FinetuneConfig()
    k = num_classes_of(train)
    if len(train) < 2 or len(val) < 1:
        raise DataError(f"need at least 2 training and 1 validation images, got {len(train)} / {len(val)}")
    if val.labels is None or (test is not None and test.labels is None):
        raise DataError("validation and test splits need labels")
    g = seed_everything(cfg.seed)
    device = select_device(cfg.device)
    amp = cfg.resolved_amp(device)
    t_start = time.perf_counter()
    with num_threads(cfg.threads):
        model, pp, enc_name, enc_cfg = resolve_encoder(encoder, k, cfg.image_size, preprocessing)
        mf = torch.channels_last if cfg.channels_last else torch.contiguous_format
        model = model.to(device, memory_format=mf)
        head = [p for n, p in model.named_parameters() if n.startswith("fc.")]
        backbone = [p for n, p in model.named_parameters() if not n.startswith("fc.")]
        opt = torch.optim.Adam([{"params": head, "lr": cfg.lr}, {"params": backbone, "lr": 0.0}],
                               lr=cfg.lr, weight_decay=cfg.weight_decay)
        y_train = train.labels.astype(np.int64)
        loss_fn = _loss_fn(y_train, k, cfg.balance, device)
        aug = AugmentConfig(hflip=cfg.hflip) if cfg.augment else None
        history: list[dict[str, Any]] = []
        best: tuple[float, int, dict[str, torch.Tensor], np.ndarray] | None = None
        since_best, n_seen, t_train = 0, 0, 0.0
        for epoch in range(cfg.epochs):
            frozen = epoch < cfg.head_epochs
            _set_backbone_trainable(model, not frozen)
            opt.param_groups[1]["lr"] = cfg.backbone_lr(epoch)
            model.train()
            t0 = time.perf_counter()
            order = _epoch_order(y_train, cfg.balance, g)
            losses, correct, count = [], 0, 0
            starts = range(0, len(order), cfg.batch_size)
            bar = tqdm(starts, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False,
                       disable=None, file=sys.stderr)  # disable=None: shown on a terminal only
            for s in bar:
                idx = np.sort(order[s:s + cfg.batch_size])
                if len(idx) < 2:
                    continue  # BatchNorm cannot train on one image
                x = _inputs(train.images[idx], pp, aug, g).to(device, memory_format=mf)
                y = torch.from_numpy(y_train[idx]).to(device)
                with autocast(device, amp):
                    logits = model(x)
                loss = loss_fn(logits.float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                correct += int((logits.argmax(1) == y).sum())
                count += len(idx)
            dt = time.perf_counter() - t0
            t_train += dt
            n_seen += count
            probs = predict_proba(model, val.images, pp, batch_size=cfg.eval_batch_size, device=device,
                                  amp=amp, channels_last=cfg.channels_last)
            vm = classification_metrics(val.labels, probs)
            score = vm[cfg.select_metric]
            improved = best is None or (not math.isnan(score) and score > best[0])
            if improved:
                state = {n: t.detach().to("cpu", copy=True) for n, t in model.state_dict().items()}
                best, since_best = (score, epoch, state, probs), 0
            elif not frozen:
                since_best += 1
            rec = {"epoch": epoch + 1, "phase": "head" if frozen else "full",
                   "backbone_lr": cfg.backbone_lr(epoch), "train_loss": float(np.mean(losses)),
                   "train_acc": correct / max(count, 1), "val_accuracy": vm["accuracy"], "val_auc": vm["auc"],
                   "val_f1": vm["f1"], "images_per_s": count / dt, "epoch_s": dt, "best": improved}
            history.append(rec)
            log.info("epoch %d/%d [%s] loss %.4f acc %.3f | val acc %.3f auc %.3f f1 %.3f | %.0f img/s %.0fs%s",
                     epoch + 1, cfg.epochs, rec["phase"], rec["train_loss"], rec["train_acc"], vm["accuracy"],
                     vm["auc"], vm["f1"], rec["images_per_s"], dt, " *" if improved else "")
            if on_epoch is not None:
                on_epoch(rec)
            if cfg.patience and not frozen and since_best >= cfg.patience:
                log.info("early stop: no validation %s improvement for %d epochs", cfg.select_metric,
                         cfg.patience)
                break
        assert best is not None
        _, best_epoch, state, val_probs = best
        model = model.to("cpu", memory_format=torch.contiguous_format)
        model.load_state_dict(state)
        model.eval()
        threshold = choose_threshold(val.labels, val_probs[:, 1]) if k == 2 else None
        val_metrics = classification_metrics(val.labels, val_probs, threshold)
        test_metrics = None
        if test is not None:
            tp = predict_proba(model.to(device, memory_format=mf), test.images, pp,
                               batch_size=cfg.eval_batch_size, device=device, amp=amp,
                               channels_last=cfg.channels_last)
            test_metrics = classification_metrics(test.labels, tp, threshold)
            model = model.to("cpu", memory_format=torch.contiguous_format)
    wall = time.perf_counter() - t_start
    if test_metrics is not None:
        log.info("best epoch %d | test acc %.4f auc %.4f f1 %.4f (n=%d) | %.0f s", best_epoch + 1,
                 test_metrics["accuracy"], test_metrics["auc"], test_metrics["f1"], test_metrics["n"], wall)
    names = list(train.class_names) or [str(i) for i in range(k)]
    return FitResult(model=model, preprocessing=pp, class_names=names, threshold=threshold,
                     best_epoch=best_epoch + 1, val_metrics=val_metrics, test_metrics=test_metrics,
                     history=history, wall_time_s=wall, train_images_per_s=n_seen / max(t_train, 1e-9),
                     config=cfg, encoder=enc_name, encoder_config=enc_cfg, n_train=len(train), n_val=len(val))

