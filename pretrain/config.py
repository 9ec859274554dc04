"""Training configuration, per-method defaults from the original recipes, YAML recipes, method factory."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cthub.errors import ConfigError
from hub.resnet import ResNet50
from pretrain.base import SSLMethod
from pretrain.byol import BYOL
from pretrain.mocov2 import MoCoV2
from pretrain.names import METHOD_NAMES
from pretrain.spark import SparK
from pretrain.swav import SwAV

# The method table (name -> class), in the order the paper lists them; the command line offers the same
# names from pretrain.names without importing the classes.
METHODS: dict[str, type[SSLMethod]] = {m.name: m for m in (MoCoV2, SwAV, BYOL, SparK)}
assert tuple(METHODS) == METHOD_NAMES, "pretrain.names.METHOD_NAMES must list this table's methods, in order"
RECIPE_DIR = Path(__file__).resolve().parent / "recipes"

# Optimizer and schedule of each method's original recipe; lr is per 256 images (scaled linearly).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "mocov2": {
        "optimizer": "sgd",
        "base_lr": 0.03,
        "final_lr": 0.0,
        "weight_decay": 1e-4,
        "warmup_epochs": 0.0,
    },
    "swav": {
        "optimizer": "lars",
        "base_lr": 0.6,
        "final_lr": 0.0006,
        "weight_decay": 1e-6,
        "warmup_epochs": 0.0,
    },
    "byol": {
        "optimizer": "lars",
        "base_lr": 0.2,
        "final_lr": 0.0,
        "weight_decay": 1.5e-6,
        "warmup_epochs": 10.0,
    },
    "spark": {
        "optimizer": "lamb",
        "base_lr": 2e-4,
        "final_lr": 0.0,
        "weight_decay": 0.04,
        "weight_decay_end": 0.2,
        "warmup_epochs": 40.0,
        "betas": (0.9, 0.95),
        "clip_grad": 5.0,
    },
}


@dataclass
class TrainConfig:
    """Everything one pretraining run needs; `method_kwargs` go to the method's constructor."""

    method: str = "spark"
    data: str = ""
    out: str = "runs/pretrain"
    image_size: int = 64
    in_chans: int = 3
    batch_size: int = 64  # per process, per micro-batch
    accum_steps: int = 1
    epochs: float | None = None
    steps: int | None = None
    max_minutes: float | None = None
    optimizer: str = "lars"
    base_lr: float = 0.1
    final_lr: float = 0.0
    weight_decay: float = 0.0
    weight_decay_end: float | None = None
    warmup_epochs: float = 0.0
    warmup_steps: int | None = None
    betas: tuple[float, float] = (0.9, 0.95)
    momentum: float = 0.9
    clip_grad: float | None = None
    hflip: bool = False
    normalize: str = "dataset"  # dataset mean/std (paper) or "default" (PreprocessConfig's)
    storage_size: int | None = None
    max_images: int | None = None
    amp: bool | None = None  # None: on for CUDA, on CPU only with native bf16 (see cpu_has_bf16)
    channels_last: bool = True
    threads: int | None = None
    seed: int = 0
    ckpt_every: int = 200
    log_every: int = 10
    tensorboard: bool = True
    device: str | None = None
    init: str | None = None  # hub name or folder of an encoder to continue from (hierarchical pretraining)
    monitor_data: str | None = None  # labeled npz whose val split feeds the online kNN monitor
    monitor_every: int = 0  # steps between kNN checks (0: off); also measured at the end
    monitor_size: int = 1000  # bank and query images each
    prefetch: bool = True  # build the next batch's views on a helper thread while this step trains
    method_kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown pretraining options: {sorted(unknown)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(float(b) for b in d["betas"])
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.batch_size < 2 or self.accum_steps < 1 or self.image_size < 16:
            raise ConfigError("batch_size must be >= 2, accum_steps >= 1, image_size >= 16")
        if self.steps is None and self.epochs is None and self.max_minutes is None:
            raise ConfigError("give --steps, --epochs or --max-minutes")


def config_for(method: str, recipe: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Method defaults, then the recipe's `common` and `methods.<method>` sections, then overrides."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    d: dict[str, Any] = {"method": method, **METHOD_DEFAULTS[method]}
    if recipe is not None:
        r = load_recipe(recipe)
        d.update(r.get("common", {}))
        d.update((r.get("methods") or {}).get(method, {}))
    d.update({k: v for k, v in overrides.items() if v is not None})
    # an explicit budget on the command line replaces the recipe's other budget
    if overrides.get("steps") is not None and overrides.get("epochs") is None:
        d["epochs"] = None
    if overrides.get("epochs") is not None and overrides.get("steps") is None:
        d["steps"] = None
    return TrainConfig.from_dict(d)


def load_recipe(recipe: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe by path or by name in pretrain/recipes (e.g. `cpu-organamnist`). `extends: <recipe>` (a name,
    or a path relative to the recipe's folder) starts from another recipe: its `common` and each of its
    `methods.<method>` sections are updated key by key."""
    p = _recipe_path(recipe, _seen[-1].parent if _seen else None)
    if p in _seen:
        raise ConfigError(f"{_seen[-1].name}: `extends` loops back to {p.name}")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p.name} is not valid YAML: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{p.name}: a recipe is a mapping with `common` and `methods` sections")
    base_name = d.pop("extends", None)
    if base_name is None:
        return d
    base = load_recipe(str(base_name), (*_seen, p))
    methods = dict(base.get("methods") or {})
    for m, section in (d.get("methods") or {}).items():
        methods[m] = {**(methods.get(m) or {}), **(section or {})}
    common = {**(base.get("common") or {}), **(d.get("common") or {})}
    return {**base, **d, "common": common, "methods": methods}


def _recipe_path(recipe: str | Path, near: Path | None) -> Path:
    """The file of a recipe given as a path (relative to `near` when there is one), or a built-in name."""
    p = Path(recipe)
    for candidate in ([near / p] if near is not None else []) + [p, RECIPE_DIR / f"{recipe}.yaml"]:
        if candidate.is_file():
            return candidate.resolve()
    names = sorted(f.stem for f in RECIPE_DIR.glob("*.yaml"))
    raise ConfigError(f"recipe {recipe!r} not found (built-in: {', '.join(names)})")


def build_method(cfg: TrainConfig, encoder: ResNet50 | None = None) -> SSLMethod:
    """The configured method around `encoder` (default: a fresh random-init ResNet50)."""
    cls = METHODS.get(cfg.method)
    if cls is None:
        raise ConfigError(f"unknown method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    encoder = encoder if encoder is not None else ResNet50(num_classes=0, in_chans=cfg.in_chans)
    try:
        return cls(encoder, **cfg.method_kwargs)
    except TypeError as e:
        raise ConfigError(f"invalid option for {cfg.method}: {e}") from None
