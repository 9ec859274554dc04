"""`cthub finetune`, `cthub study`, `cthub cam`."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from typing import Any

from finetune.config import BALANCE_MODES, SELECT_METRICS, FinetuneConfig

log = logging.getLogger("finetune")


def _command_line(args: argparse.Namespace, sub: str) -> str:
    """The exact command as typed when run from the console, else rebuilt from the parsed options."""
    if sub in sys.argv[1:]:
        return "cthub " + shlex.join(sys.argv[1:])
    skip = {"func", "command", "verbose"}
    parts = ["cthub", sub]
    for k, v in sorted(vars(args).items()):
        if k in skip or v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        parts += [flag] if v is True else [flag, str(v)]
    return shlex.join(parts)


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    d = FinetuneConfig()
    p.add_argument("--image-size", type=int, default=d.image_size, help="model input size (default 224)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--head-epochs", type=int, default=d.head_epochs, help="head-only epochs first")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--backbone-lr-ratio", type=float, default=d.backbone_lr_ratio,
                   help="backbone lr at unfreezing, as a fraction of --lr (grows x1.5 per epoch up to --lr)")
    p.add_argument("--patience", type=int, default=d.patience, help="early stopping patience (0 = off)")
    p.add_argument("--select", choices=SELECT_METRICS, default=d.select_metric, help="validation metric")
    p.add_argument("--balance", choices=BALANCE_MODES, default=d.balance)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--hflip", action="store_true", help="random horizontal flips (NOT for laterality tasks)")
    p.add_argument("--amp", choices=("auto", "on", "off"), default="auto",
                   help="mixed precision: auto = AMP on CUDA, bf16 only on CPUs with native bf16")
    p.add_argument("--fp32", action="store_true", help="fp32 eager: no autocast, no channels_last")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=None)


def recipe_from_args(a: argparse.Namespace, **over: Any) -> FinetuneConfig:
    kw = {"epochs": a.epochs, "head_epochs": min(a.head_epochs, a.epochs), "lr": a.lr, "weight_decay": a.weight_decay,
              "batch_size": a.batch_size, "backbone_lr_ratio": a.backbone_lr_ratio, "image_size": a.image_size,
              "select_metric": a.select, "patience": a.patience, "balance": a.balance, "augment": not a.no_augment,
              "hflip": a.hflip, "amp": False if a.fp32 else {"auto": None, "on": True, "off": False}[a.amp], "channels_last": not a.fp32, "seed": a.seed, "device": a.device,
              "threads": a.threads}
    kw.update(over)
    return FinetuneConfig(**kw)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune an encoder + linear head on labeled CT slices",
                       description="The seed paper's recipe: linear head, head-only warm-up, then the whole "
                       "model; selection on validation, metrics on test; saves a hub classifier.")
    p.add_argument("--data", required=True, help="MedMNIST .npz, image folder, CSV manifest or DICOM+CSV")
    p.add_argument("--encoder", default="scratch", help="'scratch', a hub name or a model folder")
    p.add_argument("--out", required=True, help="output model folder")
    add_recipe_args(p)
    p.add_argument("--max-train", type=int, default=None, help="stratified training subset size")
    p.add_argument("--fraction", type=float, default=None, help="stratified training fraction (0-1]")
    p.add_argument("--max-val", type=int, default=2000,
                   help="stratified validation subset used for per-epoch model selection (default 2000; 0 = all)")
    p.add_argument("--max-test", type=int, default=None, help="stratified test subset size (default: all)")
    p.add_argument("--protocol", choices=("auto", "split", "kfold"), default="auto",
                   help="given train/val/test split, or stratified k-fold (auto: split when the data has one)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--val-fraction", type=float, default=0.1, help="k-fold: share of training for validation")
    p.add_argument("--storage-size", type=int, default=None, help="resize stored images (folders/DICOM)")
    p.add_argument("--window", default=None, help="HU window preset for DICOM sources (e.g. brain)")
    p.add_argument("--name", default=None)
    p.add_argument("--note", default=None, help="what this model is (default: generated)")
    p.set_defaults(func=_finetune)
    from finetune.cli_study import register_study  # study + cam live beside, to keep files short

    register_study(sub)


def default_note(encoder: str, epochs: int, n_train: int, image_size: int) -> str:
    init = "random-init" if encoder == "scratch" else f"{encoder}-pretrained"
    kind = "a demo" if epochs < 20 or n_train < 1000 else "a research model"
    return f"{init} encoder, {epochs} epochs on {n_train:,} images at {image_size} px: {kind}, not a clinical model"


def _finetune(a: argparse.Namespace) -> int:
    from finetune.data import describe, limit, load_splits
    from finetune.protocols import run_kfold, run_split

    cfg = recipe_from_args(a)
    from ctdata.preprocess import PreprocessConfig

    pp = PreprocessConfig.for_window(a.window, input_size=a.image_size) if a.window else None
    splits = load_splits(a.data, pp or PreprocessConfig(input_size=a.image_size), storage_size=a.storage_size)
    protocol = a.protocol if a.protocol != "auto" else ("split" if "train" in splits else "kfold")
    size: int | float | None = a.fraction if a.fraction is not None else a.max_train
    command = _command_line(a, "finetune")
    if protocol == "split":
        if "train" not in splits:
            from cthub.errors import ConfigError

            raise ConfigError(f"{a.data} has no train/val/test split; use --protocol kfold")
        train = limit(splits["train"], size, cfg.seed)
        if "val" not in splits:  # train/test given: validation = a stratified (group-aware) share of train
            from finetune.splits import train_val_split

            tr, va = train_val_split(train.labels, a.val_fraction, cfg.seed, train.groups)
            splits["val"], train = train.subset(va), train.subset(tr)
        val = limit(splits["val"], a.max_val or None, cfg.seed)
        test = limit(splits["test"], a.max_test, cfg.seed)
        log.info("train %s | val %d | test %d | encoder %s", describe(train), len(val), len(test), a.encoder)
        out = run_split(a.encoder, train, val, test, cfg, out=a.out, command=command, data=a.data,
                        note=a.note, name=a.name, extra={"max_train": a.max_train, "fraction": a.fraction,
                                                         "max_val": a.max_val, "max_test": a.max_test},
                        preprocessing=pp)
    else:
        data = splits.get("all") or splits["train"]
        out = run_kfold(a.encoder, data, cfg, k=a.folds, val_fraction=a.val_fraction, size=size,
                        out=a.out, command=command, data_desc=a.data, note=a.note, name=a.name,
                        preprocessing=pp)
    print(json.dumps(out, indent=2))
    return 0
