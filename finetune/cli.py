"""`cthub finetune`, `cthub study`, `cthub cam`, `cthub calibrate`."""

from __future__ import annotations

import argparse
import json
import logging
from typing import TYPE_CHECKING

from cthub.provenance import command_line
from finetune.cli_calibrate import register_calibrate
from finetune.cli_recipe import add_recipe_args, recipe_from_args
from finetune.cli_robustness import register_robustness
from finetune.cli_study import register_study

if TYPE_CHECKING:
    from cthub.cli import SubParsers

__all__ = ["add_recipe_args", "recipe_from_args", "register"]
log = logging.getLogger(__name__)


def register(sub: SubParsers) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune an encoder + linear head on labeled CT slices",
        description="The seed paper's recipe: linear head, head-only warm-up, then the whole "
        "model; selection on validation, metrics on test; saves a hub classifier.",
    )
    p.add_argument("--data", required=True, help="MedMNIST .npz, image folder, CSV manifest or DICOM+CSV")
    p.add_argument("--encoder", default="scratch", help="'scratch', a hub name or a model folder")
    p.add_argument("--out", required=True, help="output model folder")
    add_recipe_args(p)
    p.add_argument("--max-train", type=int, default=None, help="stratified training subset size")
    p.add_argument("--fraction", type=float, default=None, help="stratified training fraction (0-1]")
    p.add_argument(
        "--max-val",
        type=int,
        default=2000,
        help="stratified validation subset for per-epoch model selection (default 2000; 0 = all)",
    )
    p.add_argument("--max-test", type=int, default=None, help="stratified test subset size (default: all)")
    p.add_argument(
        "--protocol",
        choices=("auto", "split", "kfold"),
        default="auto",
        help="the data's train/(val/)test split, or stratified k-fold (auto: split if it has one)",
    )
    p.add_argument("--folds", type=int, default=5)
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="share of training for validation (k-fold, or a split without validation)",
    )
    p.add_argument("--storage-size", type=int, default=None, help="resize stored images (folders/DICOM)")
    p.add_argument("--window", default=None, help="HU window preset for DICOM sources (e.g. brain)")
    p.add_argument("--name", default=None)
    p.add_argument("--note", default=None, help="what this model is (default: generated)")
    p.set_defaults(func=_finetune)
    register_study(sub)
    register_robustness(sub)
    register_calibrate(sub)


def _finetune(a: argparse.Namespace) -> int:
    from ctdata.labeled import data_preprocessing, describe, kfold_pool, load_splits, select_splits
    from finetune.protocols import run_kfold, run_split

    cfg = recipe_from_args(a)
    pp = data_preprocessing(a.data, a.window, a.image_size)
    splits = load_splits(a.data, pp, storage_size=a.storage_size)
    protocol = a.protocol if a.protocol != "auto" else ("split" if "train" in splits else "kfold")
    size: int | float | None = a.fraction if a.fraction is not None else a.max_train
    command = command_line("finetune", a)
    if protocol == "split":
        train, val, test = select_splits(
            splits,
            val_fraction=a.val_fraction,
            split_seed=cfg.seed,
            train_size=size,
            train_seed=cfg.seed,
            max_val=a.max_val,
            max_test=a.max_test,
        )
        log.info("train %s | val %d | test %d | encoder %s", describe(train), len(val), len(test), a.encoder)
        out = run_split(
            a.encoder,
            train,
            val,
            test,
            cfg,
            out=a.out,
            command=command,
            data=a.data,
            note=a.note,
            name=a.name,
            extra={
                "max_train": a.max_train,
                "fraction": a.fraction,
                "max_val": a.max_val,
                "max_test": a.max_test,
            },
            preprocessing=pp,
        )
    else:
        out = run_kfold(
            a.encoder,
            kfold_pool(splits),
            cfg,
            k=a.folds,
            val_fraction=a.val_fraction,
            size=size,
            out=a.out,
            command=command,
            data_desc=a.data,
            note=a.note,
            name=a.name,
            preprocessing=pp,
        )
    print(json.dumps(out, indent=2))
    return 0
