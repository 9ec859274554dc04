"""A model's own labeled data, split as its config records: the train / val / test a fine-tuned classifier
was fitted, selected and tested on, rebuilt from `config.provenance` and `config.metrics`.

It lives in the hub because it reads a model's config (`ModelConfig`); the splitting itself is
`ctdata.labeled.select_splits`, the one rule fine-tuning uses. Export checks (`export.data`) and robustness
tables (`finetune.robustness`) both measure on it, so neither imports the other."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ctdata.datasets import ArraySplit
from ctdata.labeled import load_splits, select_splits
from cthub.errors import ConfigError, CTHubError
from hub.config import ModelConfig


def recorded_splits(config: ModelConfig, source: str | Path) -> tuple[ArraySplit, ArraySplit, ArraySplit]:
    """Train / val / test of `source` split exactly as `cthub finetune` split it for this classifier (the
    seed, `max_val`, `max_test` and, for k-fold, the saved fold its config records): what export checks and
    robustness tables measure on. ConfigError when the data cannot be the classifier's."""
    source = Path(source)
    pp = config.preprocessing
    splits = load_splits(source, pp, storage_size=pp.input_size)
    prov = config.provenance
    ft = prov.get("finetune")
    rule: dict[str, Any] = {
        "split_seed": int(ft.get("seed", 42)) if isinstance(ft, dict) else 42,
        "max_val": prov.get("max_val"),
        "max_test": prov.get("max_test"),
    }
    folds, saved = config.metrics.get("cv_folds"), config.metrics.get("saved_fold")
    if isinstance(folds, list) and isinstance(saved, int):
        rule |= {"fold": saved - 1, "folds": len(folds)}
    elif "all" in splits:
        rule |= {"fold": 0, "folds": 5}
    try:
        train, val, test = select_splits(splits, **rule)
    except CTHubError as e:
        raise ConfigError(f"cannot split {source.name} as the classifier was trained: {e}") from None
    if train.labels is None or test.labels is None:
        raise ConfigError(f"{source.name} has no labels: measuring the classifier needs labeled images")
    n_classes = int(max(train.labels.max(), test.labels.max())) + 1
    if config.num_classes and n_classes > config.num_classes:
        raise ConfigError(
            f"{source.name} has {n_classes} classes but {config.name} predicts {config.num_classes}: "
            "not the classifier's data"
        )
    return train, val, test
