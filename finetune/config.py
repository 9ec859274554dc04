"""Fine-tuning configuration: the seed paper's recipe as defaults (Wolf et al. 2023, published notebooks)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cthub.errors import ConfigError

if TYPE_CHECKING:  # torch is imported on use: `cthub finetune --help` reads this module's defaults
    import torch

BALANCE_MODES = ("weights", "sampler", "none")
# validation signals for model selection: "auc" (default) and "loss" use every predicted probability, "f1" and
# "accuracy" only thresholded labels (F1 on a 44-image binary validation set was seen swinging 0.08-0.69)
SELECT_METRICS = ("auc", "loss", "f1", "accuracy")


@dataclass
class FinetuneConfig:
    """How a classifier is trained. Defaults follow the paper: linear head, head-only for 10 epochs, then the
    whole model with a smaller backbone lr that grows back (Lightning's BackboneFinetuning), Adam lr 1e-4,
    weight decay 5e-4, batch 64, 70 epochs. One deliberate difference: the paper selected the epoch on
    validation F1; the default here is validation AUC, which does not depend on a decision threshold.
    Only epochs after unfreezing are selected (head-only ones only when no full epoch ran), and `patience`
    counts from the first of them."""

    epochs: int = 70
    head_epochs: int = 10  # head-only epochs before the backbone is unfrozen
    lr: float = 1e-4
    weight_decay: float = 5e-4
    batch_size: int = 64
    backbone_lr_ratio: float = 0.1  # backbone lr at unfreezing = ratio * lr ...
    backbone_lr_growth: float = 1.5  # ... multiplied by this every epoch, capped at lr
    image_size: int = 224
    select_metric: str = "auc"  # validation signal for model selection: auc, loss, f1 or accuracy
    patience: int = 15  # early stopping: full epochs without improvement, counted after unfreezing (0 = off)
    balance: str = "weights"  # class weights in the loss, a balanced sampler, or none
    augment: bool = True
    hflip: bool = False  # OFF by default: laterality matters (OrganAMNIST has left/right classes)
    amp: bool | None = None  # None = auto: AMP on CUDA; bf16 autocast on CPUs with native bf16 (AMX etc.)
    channels_last: bool = True
    seed: int = 42
    device: str | None = None
    threads: int | None = None
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if not 0 <= self.head_epochs <= self.epochs:
            raise ConfigError(f"head_epochs must be in 0..epochs ({self.epochs}), got {self.head_epochs}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError("lr must be positive and weight_decay non-negative")
        if self.batch_size < 2:
            raise ConfigError(f"batch_size must be >= 2 (BatchNorm), got {self.batch_size}")
        if not 0 < self.backbone_lr_ratio <= 1:
            raise ConfigError(f"backbone_lr_ratio must be in (0, 1], got {self.backbone_lr_ratio}")
        if self.backbone_lr_growth < 1:
            raise ConfigError(f"backbone_lr_growth must be >= 1, got {self.backbone_lr_growth}")
        if self.image_size < 32:
            raise ConfigError(f"image_size must be >= 32 (ResNet50 downsamples 32x), got {self.image_size}")
        if self.select_metric not in SELECT_METRICS:
            raise ConfigError(f"select_metric must be one of {SELECT_METRICS}, got {self.select_metric!r}")
        if self.balance not in BALANCE_MODES:
            raise ConfigError(f"balance must be one of {BALANCE_MODES}, got {self.balance!r}")
        if self.patience < 0:
            raise ConfigError("patience must be >= 0")

    def backbone_lr(self, epoch: int) -> float:
        """Backbone lr in (0-based) `epoch`; 0 while frozen."""
        if epoch < self.head_epochs:
            return 0.0
        k = epoch - self.head_epochs
        return min(self.lr, self.lr * self.backbone_lr_ratio * self.backbone_lr_growth**k)

    def resolved_amp(self, device: torch.device) -> bool:
        """Whether to autocast on `device`. bf16 on a CPU without native bf16 (AVX2-only) is emulated and
        measured here 10-40x slower than fp32, so "auto" enables it only where the CPU has it."""
        from cthub.runtime import resolve_amp

        return resolve_amp(self.amp, device)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> FinetuneConfig:
        return dataclasses.replace(self, **changes)
