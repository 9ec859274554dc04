"""Recipe options shared by `cthub finetune` and `cthub study`."""

from __future__ import annotations

import argparse
from typing import Any

from finetune.config import BALANCE_MODES, SELECT_METRICS, FinetuneConfig


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    """The FinetuneConfig options, with its defaults."""
    d = FinetuneConfig()
    p.add_argument("--image-size", type=int, default=d.image_size, help="model input size (default 224)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--head-epochs", type=int, default=d.head_epochs, help="head-only epochs first")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument(
        "--backbone-lr-ratio",
        type=float,
        default=d.backbone_lr_ratio,
        help="backbone lr at unfreezing, as a fraction of --lr (grows x1.5 per epoch up to --lr)",
    )
    p.add_argument(
        "--patience",
        type=int,
        default=d.patience,
        help="early stopping: epochs without improvement, counted after unfreezing (0 = off)",
    )
    p.add_argument(
        "--select",
        choices=SELECT_METRICS,
        default=d.select_metric,
        help=f"validation signal for choosing the epoch (default {d.select_metric}; auc and loss "
        "use every probability, f1 and accuracy only thresholded labels)",
    )
    p.add_argument("--balance", choices=BALANCE_MODES, default=d.balance)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--hflip", action="store_true", help="random horizontal flips (NOT for laterality tasks)")
    p.add_argument(
        "--amp",
        choices=("auto", "on", "off"),
        default="auto",
        help="mixed precision: auto = AMP on CUDA, bf16 only on CPUs with native bf16",
    )
    p.add_argument("--fp32", action="store_true", help="fp32 eager: no autocast, no channels_last")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=None)


def recipe_from_args(a: argparse.Namespace, **over: Any) -> FinetuneConfig:
    """A FinetuneConfig from the options of `add_recipe_args` (keywords override)."""
    amp = False if a.fp32 else {"auto": None, "on": True, "off": False}[a.amp]
    kw: dict[str, Any] = {
        "epochs": a.epochs,
        "head_epochs": min(a.head_epochs, a.epochs),
        "lr": a.lr,
        "weight_decay": a.weight_decay,
        "batch_size": a.batch_size,
        "backbone_lr_ratio": a.backbone_lr_ratio,
        "image_size": a.image_size,
        "select_metric": a.select,
        "patience": a.patience,
        "balance": a.balance,
        "augment": not a.no_augment,
        "hflip": a.hflip,
        "amp": amp,
        "channels_last": not a.fp32,
        "seed": a.seed,
        "device": a.device,
        "threads": a.threads,
    }
    kw.update(over)
    return FinetuneConfig(**kw)
