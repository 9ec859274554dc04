"""Turn a finished run into a hub model: encoder weights, config with provenance, card with a probe score."""

from __future__ import annotations

import copy
import datetime as _dt
import logging
import tempfile
from pathlib import Path
from typing import Any

from ctdata.labeled import limit, load_splits
from cthub.runtime import hardware, isolated_seed
from finetune.evaluate import evaluate_encoder
from hub.config import WEIGHTS_NAME, ModelConfig
from hub.io import hub_dir, publish_local, save_pretrained
from hub.manifest import weights_digest
from hub.resnet import ResNet50
from pretrain.config import TrainConfig
from pretrain.trainer import RunResult

log = logging.getLogger(__name__)


def model_config(
    result: RunResult,
    cfg: TrainConfig,
    *,
    name: str,
    data_desc: str,
    command: str,
    probe: dict[str, Any] | None = None,
) -> ModelConfig:
    """The encoder's config.json: method, data, the training preprocessing, and what was measured."""
    prov: dict[str, Any] = {
        "command": command,
        "data": data_desc,
        "wall_time_s": round(result.wall_time_s, 1),
        "epochs": round(result.epochs, 3),
        "steps": result.steps,
        "planned_steps": result.planned_steps,
        "final_loss": round(result.final_loss, 5),
        "images_per_s": round(result.images_per_s, 2),
        "precision": result.precision,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hardware": hardware(),
        "recipe": {k: v for k, v in cfg.to_dict().items() if k not in ("data", "out")},
    }
    if result.parent:
        prov["parent"] = result.parent
    if result.steps < result.planned_steps:
        prov["note"] = (
            f"stopped by the time budget after {result.steps} of {result.planned_steps} planned "
            "steps; the schedule had not finished"
        )
    metrics: dict[str, Any] = {"pretrain_final_loss": round(result.final_loss, 5)}
    if result.weight_change:
        metrics["weight_change_from_init"] = {k: float(f"{v:.4g}") for k, v in result.weight_change.items()}
    if result.monitor:
        metrics["knn_monitor_last"] = {
            k: (round(v, 4) if isinstance(v, float) else v)
            for k, v in result.monitor.items()
            if not k.startswith("change_")
        }
    if probe is not None:
        metrics["frozen_features"] = probe
    return ModelConfig(
        name=name,
        method=cfg.method,
        pretraining_data=data_desc,
        num_classes=0,
        preprocessing=result.preprocessing,
        metrics=metrics,
        provenance=prov,
    )


def frozen_feature_scores(
    encoder: ResNet50,
    config: ModelConfig,
    source: str | Path,
    max_train: int | None = 2000,
    seed: int = 42,
    threads: int | None = None,
) -> dict[str, Any] | None:
    """kNN, linear probe and collapse statistic of the encoder and of a random-init ResNet50 beside it, each
    with BN as stored and recalibrated on clean training images (`finetune.evaluate_encoder`); None when
    `source` has no train/val/test splits."""

    splits = load_splits(source, config.preprocessing)
    if not {"train", "val", "test"} <= set(splits):
        log.warning("frozen features not measured: %s has no train/val/test splits", Path(source).name)
        return None
    encoder = copy.deepcopy(encoder)  # the evaluation attaches a head; the published encoder stays headless
    encoder.config = config  # carries the preprocessing to finetune
    train = limit(splits["train"], max_train, seed)
    val = limit(splits["val"], max_train, seed)
    test = limit(splits["test"], max_train * 2 if max_train else None, seed)
    size = config.preprocessing.input_size
    out: dict[str, Any] = {"data": Path(source).name, "seed": seed}
    for name, enc in (("encoder", encoder), ("random_init", _random_like(encoder, config))):
        out[name] = evaluate_encoder(enc, train, val, test, image_size=size, seed=seed, threads=threads)
    return out


def _random_like(encoder: ResNet50, config: ModelConfig) -> ResNet50:
    with isolated_seed(0):  # the same baseline for every publish, the caller's RNG untouched
        rnd = ResNet50(num_classes=0, in_chans=encoder.in_chans)
    rnd.config = config  # same preprocessing as the encoder it is compared with
    return rnd


def publish(
    result: RunResult,
    cfg: TrainConfig,
    name: str,
    *,
    data_desc: str,
    command: str,
    probe_source: str | Path | None = None,
    probe_max_train: int | None = 2000,
    hub_dir_override: str | Path | None = None,
) -> Path:
    """Write the encoder into the local hub as `name` (sha256 recorded) with a model card. When the hub
    already holds `name` with these very weights (a finished run published again, e.g. by `make pretrain`
    rerun after an interruption elsewhere), it is left as it is: its card keeps what was measured on it since
    (study rows, frozen features), and nothing is recomputed."""
    existing = same_weights_published(result.encoder, name, hub_dir_override)
    if existing is not None:
        log.info("%s already holds these weights (same digest): kept with its card", name)
        return existing
    probe = None
    if probe_source is not None:
        base = model_config(result, cfg, name=name, data_desc=data_desc, command=command)
        probe = frozen_feature_scores(
            result.encoder, base, probe_source, probe_max_train, threads=cfg.threads
        )
    mc = model_config(result, cfg, name=name, data_desc=data_desc, command=command, probe=probe)
    if probe is None:
        mc.metrics["frozen_features"] = "not measured (no labeled train/val/test splits given)"

    return publish_local(result.encoder, name, mc, source="pretrain", hub_dir_override=hub_dir_override)


def same_weights_published(
    encoder: ResNet50, name: str, hub_dir_override: str | Path | None = None
) -> Path | None:
    """The hub folder of `name` when it holds exactly `encoder`'s tensors (`hub.manifest.weights_digest`),
    else None."""

    folder = hub_dir(hub_dir_override) / name
    if not (folder / WEIGHTS_NAME).is_file():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        mine = save_pretrained(encoder, Path(tmp) / "w", ModelConfig(name="candidate", method="random"))
        same = weights_digest(mine / WEIGHTS_NAME) == weights_digest(folder / WEIGHTS_NAME)
    return folder if same else None
