"""`fit`: the paper's fine-tuning recipe on uint8 image arrays, with model selection on validation.

One fit = setup (model, optimizer, loss) -> epochs (train one epoch, validate, update the selection, maybe
stop early) -> the selected model measured once on test, its temperature fitted on validation
(`finetune.calibration`). Selection (`Selection`) is fair to encoders that
need the full model: head-only epochs are a fallback only, and early-stopping patience starts when the
backbone is unfrozen.
"""

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
from cthub.errors import ConfigError, DataError
from cthub.runtime import autocast, num_threads, resolve_amp, seed_everything, select_device
from finetune.augment import AugmentConfig, augment_batch
from finetune.calibration import training_calibration
from finetune.config import FinetuneConfig
from finetune.resume import EpochSaver, FitCheckpoint, run_fingerprint
from hub.config import ModelConfig
from hub.io import from_pretrained
from hub.metrics import choose_threshold, classification_metrics, log_loss, selection_score
from hub.resnet import ResNet50

log = logging.getLogger(__name__)
SCRATCH_NAMES = ("scratch", "random", "none")


@dataclass
class FitResult:
    """The best model (eval mode, CPU, fp32) and everything measured while finding it.

    `converged` is False when validation was still improving as the budget ran out: the selected epoch is
    fewer than `patience` epochs before the end (with early stopping off: the last one), so the epoch budget
    was probably too short for this encoder and data. `threshold` (binary) applies to the calibrated
    probabilities softmax(logits / T), T = `calibration["temperature"]` fitted on validation."""

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
    converged: bool = True
    calibration: dict[str, Any] | None = None  # finetune.calibration.training_calibration's record


def num_classes_of(split: ArraySplit) -> int:
    """K: the larger of the named classes and the largest label + 1."""
    if split.labels is None:
        raise DataError("fine-tuning needs labels")
    return max(len(split.class_names), int(split.labels.max()) + 1)


def hub_config(model: nn.Module) -> ModelConfig | None:
    """The `ModelConfig` the hub attaches to the models it loads, if any."""
    cfg = getattr(model, "config", None)
    return cfg if isinstance(cfg, ModelConfig) else None


def resolve_encoder(
    encoder: str | Path | nn.Module | None,
    num_classes: int,
    image_size: int,
    data_preprocessing: PreprocessConfig | None = None,
) -> tuple[ResNet50, PreprocessConfig, str, dict[str, Any]]:
    """(model with a fresh K-class head, preprocessing at `image_size`, name, encoder config dict).
    Scratch uses `data_preprocessing` (the labeled data's); a pretrained encoder keeps its own normalization
    and takes only the data's HU -> grey mapping (how the classifier's training images were made)."""
    model, pp, name, enc_cfg = _encoder_and_preprocessing(encoder, num_classes, data_preprocessing)
    if data_preprocessing is not None:
        pp = pp.with_intensity_of(data_preprocessing)
    return model, pp.replace(input_size=image_size), name, enc_cfg


def _encoder_and_preprocessing(
    encoder: str | Path | nn.Module | None, num_classes: int, data_pp: PreprocessConfig | None
) -> tuple[ResNet50, PreprocessConfig, str, dict[str, Any]]:
    if encoder is None or (isinstance(encoder, str) and encoder.lower() in SCRATCH_NAMES):
        return ResNet50(num_classes=num_classes), data_pp or PreprocessConfig(), "scratch", {}
    if isinstance(encoder, nn.Module):
        if not isinstance(encoder, ResNet50):
            raise ConfigError(f"fine-tuning needs a ResNet50 encoder, got {type(encoder).__name__}")
        model = copy.deepcopy(encoder)  # never train the caller's module in place (k-fold reuses it)
        if model.num_classes != num_classes:
            model.reset_classifier(num_classes)
        cfg = hub_config(model)
        if cfg is None:
            return model, PreprocessConfig(), "module", {}
        return model, cfg.preprocessing, cfg.name, cfg.to_dict()

    model = from_pretrained(str(encoder), num_classes=num_classes)  # raises ModelNotFoundError
    cfg = hub_config(model)
    assert cfg is not None, "from_pretrained always attaches a config"
    return model, cfg.preprocessing, str(encoder), cfg.to_dict()


def model_inputs(
    images: np.ndarray,
    pp: PreprocessConfig,
    aug: AugmentConfig | None = None,
    g: torch.Generator | None = None,
) -> torch.Tensor:
    """uint8 images [N,H,W] -> normalized model inputs [N,C,S,S] (optionally augmented) by the shared path."""
    unit = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)[:, None]
    if aug is not None:
        unit = augment_batch(unit, aug, g)
    return finalize(unit, pp)


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def place_model(model: ResNet50, device: torch.device | str, channels_last: bool) -> ResNet50:
    """`model.to(device, memory_format=...)`: torch's type stubs lack the keyword that `Module.to` accepts."""
    return model.to(device, memory_format=_memory_format(channels_last))  # type: ignore[call-overload]


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: np.ndarray,
    pp: PreprocessConfig,
    *,
    batch_size: int = 256,
    device: torch.device | None = None,
    amp: bool | None = None,
    channels_last: bool = True,
) -> np.ndarray:
    """Logits [N, K] (float32) for uint8 images [N,H,W] through the shared preprocessing."""
    device = device or next(model.parameters()).device
    model.eval()
    amp = resolve_amp(amp, device)
    mf = _memory_format(channels_last)
    out = []
    for s in range(0, len(images), batch_size):
        x = model_inputs(images[s : s + batch_size], pp).to(device, memory_format=mf)
        with autocast(device, amp):
            logits = model(x)
        out.append(logits.float().cpu().numpy())
    if not out:
        raise DataError("no images to predict")
    return np.concatenate(out)


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    """torch's float32 softmax of logits [N, K] (what `predict_proba` returns for them)."""
    return torch.softmax(torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)), dim=1).numpy()


def predict_proba(
    model: nn.Module,
    images: np.ndarray,
    pp: PreprocessConfig,
    *,
    batch_size: int = 256,
    device: torch.device | None = None,
    amp: bool | None = None,
    channels_last: bool = True,
) -> np.ndarray:
    """Softmax probabilities [N, K] (float32) of the raw logits (no temperature) for uint8 images [N,H,W]."""
    logits = predict_logits(
        model, images, pp, batch_size=batch_size, device=device, amp=amp, channels_last=channels_last
    )
    return softmax_rows(logits)


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


# --- setup --------------------------------------------------------------------------------------------------


@dataclass
class _Session:
    """What every epoch of one fit uses: the model on its device, optimizer, loss and input pipeline."""

    model: ResNet50
    pp: PreprocessConfig
    opt: torch.optim.Optimizer
    loss_fn: nn.Module
    aug: AugmentConfig | None
    device: torch.device
    amp: bool
    g: torch.Generator
    cfg: FinetuneConfig

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, memory_format=_memory_format(self.cfg.channels_last))

    def predict(self, images: np.ndarray) -> np.ndarray:
        return softmax_rows(self.logits(images))

    def logits(self, images: np.ndarray) -> np.ndarray:
        return predict_logits(
            self.model,
            images,
            self.pp,
            batch_size=self.cfg.eval_batch_size,
            device=self.device,
            amp=self.amp,
            channels_last=self.cfg.channels_last,
        )


def _check_inputs(train: ArraySplit, val: ArraySplit, test: ArraySplit | None) -> int:
    """K, after checking that the splits can be fitted on."""
    k = num_classes_of(train)
    if len(train) < 2 or len(val) < 1:
        raise DataError(f"need at least 2 training and 1 validation images, got {len(train)} / {len(val)}")
    if val.labels is None or (test is not None and test.labels is None):
        raise DataError("validation and test splits need labels")
    return k


def _setup(
    encoder: str | Path | nn.Module | None,
    k: int,
    y_train: np.ndarray,
    cfg: FinetuneConfig,
    preprocessing: PreprocessConfig | None,
) -> tuple[_Session, str, dict[str, Any]]:
    """(session, encoder name, encoder config): seeded model with a K-class head, Adam with the backbone
    group at lr 0 (set per epoch), the (class-weighted) loss."""
    g = seed_everything(cfg.seed)
    device = select_device(cfg.device)
    model, pp, enc_name, enc_cfg = resolve_encoder(encoder, k, cfg.image_size, preprocessing)
    model = place_model(model, device, cfg.channels_last)
    head = [p for n, p in model.named_parameters() if n.startswith("fc.")]
    backbone = [p for n, p in model.named_parameters() if not n.startswith("fc.")]
    opt = torch.optim.Adam(
        [{"params": head, "lr": cfg.lr}, {"params": backbone, "lr": 0.0}],
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
    )
    session = _Session(
        model=model,
        pp=pp,
        opt=opt,
        loss_fn=_loss_fn(y_train, k, cfg.balance, device),
        aug=AugmentConfig(hflip=cfg.hflip) if cfg.augment else None,
        device=device,
        amp=cfg.resolved_amp(device),
        g=g,
        cfg=cfg,
    )
    return session, enc_name, enc_cfg


# --- one epoch ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _EpochStats:
    loss: float
    accuracy: float
    images: int
    seconds: float


def _train_epoch(s: _Session, images: np.ndarray, y_train: np.ndarray, epoch: int) -> _EpochStats:
    """One pass over the training set; the backbone is frozen during the head-only epochs."""
    cfg = s.cfg
    _set_backbone_trainable(s.model, epoch >= cfg.head_epochs)
    s.opt.param_groups[1]["lr"] = cfg.backbone_lr(epoch)
    s.model.train()
    t0 = time.perf_counter()
    order = _epoch_order(y_train, cfg.balance, s.g)
    losses, correct, count = [], 0, 0
    bar = tqdm(
        range(0, len(order), cfg.batch_size),
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        unit="batch",
        leave=False,
        disable=None,
        file=sys.stderr,
    )  # disable=None: shown on a terminal only
    for start in bar:
        idx = np.sort(order[start : start + cfg.batch_size])
        if len(idx) < 2:
            continue  # BatchNorm cannot train on one image
        x = s.to_device(model_inputs(images[idx], s.pp, s.aug, s.g))
        y = torch.from_numpy(y_train[idx]).to(s.device)
        with autocast(s.device, s.amp):
            logits = s.model(x)
        loss = s.loss_fn(logits.float(), y)
        s.opt.zero_grad(set_to_none=True)
        loss.backward()
        s.opt.step()
        losses.append(float(loss.detach()))
        correct += int((logits.argmax(1) == y).sum())
        count += len(idx)
    return _EpochStats(
        float(np.mean(losses)) if losses else math.nan,
        correct / max(count, 1),
        count,
        time.perf_counter() - t0,
    )


# --- validation, selection, early stopping ------------------------------------------------------------------


def validation_metrics(
    y_true: np.ndarray, probs: np.ndarray, threshold: float | None = None
) -> dict[str, Any]:
    """`classification_metrics` plus the mean log loss: every signal `select_metric` can name."""
    return {**classification_metrics(y_true, probs, threshold), "loss": log_loss(y_true, probs)}


@dataclass
class _Candidate:
    epoch: int  # 0-based
    score: float
    state: dict[str, torch.Tensor]
    val_probs: np.ndarray


@dataclass
class Selection:
    """Model selection on validation and early stopping, fair to encoders that need the full model.

    Head-only epochs are kept as a fallback and chosen only when no full epoch ran; the first full epoch
    always replaces them. `patience` counts full epochs without improvement since the best full one."""

    metric: str
    patience: int
    best: _Candidate | None = None
    head_fallback: _Candidate | None = None
    since_best: int = 0

    def update(
        self, epoch: int, full: bool, metrics: dict[str, Any], probs: np.ndarray, model: nn.Module
    ) -> bool:
        """Record one validated epoch; True when it becomes the selection candidate (weights copied)."""
        score = selection_score(metrics, self.metric)
        current = self.best if full else self.head_fallback
        improved = current is None or (not math.isnan(score) and score > current.score)
        if improved:
            state = {n: t.detach().to("cpu", copy=True) for n, t in model.state_dict().items()}
            cand = _Candidate(epoch, score, state, probs)
            if full:
                self.best, self.since_best = cand, 0
            else:
                self.head_fallback = cand
        elif full:
            self.since_best += 1
        return improved

    def state(self) -> dict[str, Any]:
        """Tensors and plain values (for a checkpoint)."""

        def cand(c: _Candidate | None) -> dict[str, Any] | None:
            if c is None:
                return None
            return {
                "epoch": c.epoch,
                "score": c.score,
                "state": c.state,
                "val_probs": torch.from_numpy(c.val_probs),
            }

        return {
            "best": cand(self.best),
            # the head-only fallback is never chosen once a full epoch ran
            "head_fallback": cand(self.head_fallback) if self.best is None else None,
            "since_best": self.since_best,
        }

    def restore(self, saved: dict[str, Any]) -> None:
        """Back to what `state()` returned."""

        def cand(d: dict[str, Any] | None) -> _Candidate | None:
            if d is None:
                return None
            return _Candidate(int(d["epoch"]), float(d["score"]), d["state"], d["val_probs"].numpy())

        self.best, self.head_fallback = cand(saved["best"]), cand(saved["head_fallback"])
        self.since_best = int(saved["since_best"])

    def should_stop(self) -> bool:
        return bool(self.patience) and self.best is not None and self.since_best >= self.patience

    def selected(self) -> _Candidate:
        cand = self.best or self.head_fallback
        assert cand is not None, "select after at least one epoch"
        return cand


def _epoch_record(
    cfg: FinetuneConfig, epoch: int, st: _EpochStats, vm: dict[str, Any], improved: bool
) -> dict[str, Any]:
    return {
        "epoch": epoch + 1,
        "phase": "head" if epoch < cfg.head_epochs else "full",
        "backbone_lr": cfg.backbone_lr(epoch),
        "train_loss": st.loss,
        "train_acc": st.accuracy,
        "val_accuracy": vm["accuracy"],
        "val_auc": vm["auc"],
        "val_f1": vm["f1"],
        "val_loss": vm["loss"],
        "images_per_s": st.images / max(st.seconds, 1e-9),
        "epoch_s": st.seconds,
        "best": improved,
    }


def _log_epoch(
    cfg: FinetuneConfig, rec: dict[str, Any], st: _EpochStats, vm: dict[str, Any], improved: bool
) -> None:
    """One progress line per epoch (`*`: a new best on validation)."""
    log.info(
        "epoch %d/%d [%s] loss %.4f acc %.3f | val acc %.3f auc %.3f f1 %.3f loss %.3f | %.0f img/s %.0fs%s",
        rec["epoch"],
        cfg.epochs,
        rec["phase"],
        st.loss,
        st.accuracy,
        vm["accuracy"],
        vm["auc"],
        vm["f1"],
        vm["loss"],
        rec["images_per_s"],
        st.seconds,
        " *" if improved else "",
    )


def _train_and_select(
    s: _Session,
    train: ArraySplit,
    val: ArraySplit,
    y_train: np.ndarray,
    on_epoch: Callable[[dict[str, Any]], None] | None,
    saver: EpochSaver | None = None,
    wall_before: float = 0.0,
) -> tuple[Selection, list[dict[str, Any]], int, float, float]:
    """Run the epochs, from where `saver`'s checkpoint stopped if it has one: (selection, history, images
    seen, seconds spent training, wall seconds of earlier sessions of this run)."""
    cfg = s.cfg
    y_val = val.labels
    assert y_val is not None
    sel = Selection(cfg.select_metric, cfg.patience)
    history: list[dict[str, Any]]
    history, start, n_seen, t_train = [], 0, 0, 0.0
    saved = saver.load() if saver is not None else None
    if saved is not None and int(saved["next_epoch"]) > cfg.epochs:
        log.warning("the checkpoint is past this run's epoch budget (%d): starting over", cfg.epochs)
        saved = None
    if saved is not None:
        s.model.load_state_dict(saved["model"])
        s.opt.load_state_dict(saved["optimizer"])
        s.g.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        sel.restore(saved["selection"])
        history, start = list(saved["history"]), int(saved["next_epoch"])
        n_seen, t_train, wall_before = int(saved["n_seen"]), float(saved["t_train"]), float(saved["wall_s"])
        log.info("resuming at epoch %d of %d (checkpoint of an interrupted run)", start + 1, cfg.epochs)
        if sel.should_stop():
            start = cfg.epochs  # it had stopped early; only the final steps were missing
    t0 = time.perf_counter()
    for epoch in range(start, cfg.epochs):
        st = _train_epoch(s, train.images, y_train, epoch)
        n_seen, t_train = n_seen + st.images, t_train + st.seconds
        probs = s.predict(val.images)
        vm = validation_metrics(y_val, probs)
        improved = sel.update(epoch, epoch >= cfg.head_epochs, vm, probs, s.model)
        rec = _epoch_record(cfg, epoch, st, vm, improved)
        history.append(rec)
        _log_epoch(cfg, rec, st, vm, improved)
        if saver is not None and saver.due():
            saver.save(
                {
                    "next_epoch": epoch + 1,
                    "model": s.model.state_dict(),
                    "optimizer": s.opt.state_dict(),
                    "generator": s.g.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "selection": sel.state(),
                    "history": history,
                    "n_seen": n_seen,
                    "t_train": t_train,
                    "wall_s": wall_before + time.perf_counter() - t0,
                }
            )
        if on_epoch is not None:
            on_epoch(rec)
        if sel.should_stop():
            log.info(
                "early stop: no validation %s improvement for %d epochs after unfreezing",
                cfg.select_metric,
                cfg.patience,
            )
            break
    return sel, history, n_seen, t_train, wall_before


# --- the selected model -------------------------------------------------------------------------------------


def _restore_selected(
    s: _Session, cand: _Candidate, y_val: np.ndarray, k: int
) -> tuple[float | None, dict[str, Any]]:
    """Load the selected weights into the model (CPU, eval); (binary threshold, validation metrics)."""
    s.model = place_model(s.model, "cpu", channels_last=False)
    s.model.load_state_dict(cand.state)
    s.model.eval()
    threshold = choose_threshold(y_val, cand.val_probs[:, 1]) if k == 2 else None
    return threshold, validation_metrics(y_val, cand.val_probs, threshold)


def _selected_logits(s: _Session, images: np.ndarray) -> np.ndarray:
    """Float32 logits of the selected model (no autocast: as exported and served) on the session's device;
    the model is back on the CPU afterwards."""
    s.model = place_model(s.model, s.device, s.cfg.channels_last)
    logits = predict_logits(
        s.model,
        images,
        s.pp,
        batch_size=s.cfg.eval_batch_size,
        device=s.device,
        amp=False,
        channels_last=s.cfg.channels_last,
    )
    s.model = place_model(s.model, "cpu", channels_last=False)
    return logits


def _measure_and_calibrate(
    s: _Session, val: ArraySplit, test: ArraySplit | None, threshold: float | None
) -> tuple[dict[str, Any] | None, dict[str, Any], float | None]:
    """(test metrics, calibration record, threshold on the calibrated probabilities): the selected model
    measured once on `test` in float32 (raw probabilities, the validation threshold), then temperature
    scaling fitted on the validation logits and its ECE before/after on test
    (`finetune.calibration.training_calibration`).
    The binary threshold is carried over to the calibrated probabilities so that decisions stay the same."""
    assert val.labels is not None
    val_logits = _selected_logits(s, val.images)
    test_logits = _selected_logits(s, test.images) if test is not None else None
    metrics = None
    if test is not None:
        assert test.labels is not None and test_logits is not None
        metrics = classification_metrics(test.labels, softmax_rows(test_logits), threshold)
    record, calibrated = training_calibration(
        val_logits, val.labels, test_logits, None if test is None else test.labels, threshold=threshold
    )
    log.info(
        "calibration: T = %.3f fitted on %d validation images; ECE (%d bins, %s) %.4f -> %.4f",
        record["temperature"],
        record["fitted_on"]["n"],
        record["bins"],
        record["evaluated_on"]["split"],
        record["ece_before"],
        record["ece_after"],
    )
    return metrics, record, calibrated


def has_converged(selected_epoch: int, epochs_run: int, patience: int) -> bool:
    """Whether validation had stopped improving when the run ended: the selected (0-based) epoch lies at
    least `patience` epochs before the end (early stopping fired, or would have), or, with early stopping
    off, before the last epoch. A run that picks an epoch just before its budget ran out was still
    improving, whatever its exact last epoch did."""
    return epochs_run - (selected_epoch + 1) >= max(1, patience)


def fit(
    encoder: str | Path | nn.Module | None,
    train: ArraySplit,
    val: ArraySplit,
    test: ArraySplit | None = None,
    cfg: FinetuneConfig | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    preprocessing: PreprocessConfig | None = None,
    checkpoint: FitCheckpoint | None = None,
) -> FitResult:
    """Fine-tune `encoder` (hub name/path, a model, or "scratch") with a linear head on `train`; select the
    epoch by validation `cfg.select_metric`; measure `test` once with the selected model; fit its temperature
    on validation (ECE before/after on test in `FitResult.calibration`). `preprocessing` is
    the labeled data's (`ctdata.labeled.data_preprocessing`): all of it for scratch, its HU -> grey mapping
    for a pretrained encoder, whose normalization stays. With `checkpoint`, the run saves its state between
    epochs and an interrupted run continues where it stopped (`finetune.resume`)."""
    cfg = cfg or FinetuneConfig()
    k = _check_inputs(train, val, test)
    assert train.labels is not None and val.labels is not None
    y_train = train.labels.astype(np.int64)
    t_start = time.perf_counter()
    with num_threads(cfg.threads):
        s, enc_name, enc_cfg = _setup(encoder, k, y_train, cfg, preprocessing)
        saver = None
        if checkpoint is not None:
            arrays = [train.images, y_train, val.images, val.labels]
            saver = EpochSaver(checkpoint, run_fingerprint(cfg.to_dict(), s.model, arrays, enc_name))
        sel, history, n_seen, t_train, wall_before = _train_and_select(
            s, train, val, y_train, on_epoch, saver
        )
        cand = sel.selected()
        threshold, val_metrics = _restore_selected(s, cand, val.labels, k)
        test_metrics, calibration, threshold = _measure_and_calibrate(s, val, test, threshold)
    wall = wall_before + time.perf_counter() - t_start
    if saver is not None:
        saver.done()
    converged = has_converged(cand.epoch, len(history), cfg.patience)
    if not converged:
        log.warning(
            "validation %s was still improving when the budget ended (selected epoch %d of %d): more "
            "epochs may improve it; the budget is probably too short",
            cfg.select_metric,
            cand.epoch + 1,
            len(history),
        )
    if test_metrics is not None:
        log.info(
            "best epoch %d | test acc %.4f auc %.4f f1 %.4f (n=%d) | %.0f s",
            cand.epoch + 1,
            test_metrics["accuracy"],
            test_metrics["auc"],
            test_metrics["f1"],
            test_metrics["n"],
            wall,
        )
    names = list(train.class_names) or [str(i) for i in range(k)]
    return FitResult(
        model=s.model,
        preprocessing=s.pp,
        class_names=names,
        threshold=threshold,
        best_epoch=cand.epoch + 1,
        val_metrics=val_metrics,
        test_metrics=test_metrics,
        history=history,
        wall_time_s=wall,
        train_images_per_s=n_seen / max(t_train, 1e-9),
        config=cfg,
        encoder=enc_name,
        encoder_config=enc_cfg,
        n_train=len(train),
        n_val=len(val),
        converged=converged,
        calibration=calibration,
    )
