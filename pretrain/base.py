"""What every pretraining method provides to the shared training loop."""

from __future__ import annotations

import copy
import itertools
from typing import TypeVar

import torch
from torch import nn

from hub.resnet import ResNet50
from pretrain.augment import ViewSpec
from pretrain.dist import convert_batchnorm

ModuleT = TypeVar("ModuleT", bound=nn.Module)


class SSLMethod(nn.Module):
    """A method owns an encoder (a plain `hub.resnet.ResNet50`), its heads and its loss.

    The loop calls `view_specs()` once, then per step `forward(views) -> loss`, `before_optimizer_step`,
    and `after_optimizer_step` (EMA updates). `encoder` is what gets published.
    """

    name = "base"

    def __init__(self, encoder: ResNet50) -> None:
        super().__init__()
        self.encoder = encoder

    def view_specs(self, size: int, hflip: bool) -> list[ViewSpec]:
        raise NotImplementedError

    def before_optimizer_step(self, step: int) -> None:
        """Hook between backward and the optimizer step (e.g. SwAV freezes its prototypes)."""

    @torch.no_grad()
    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Hook after each optimizer step (e.g. EMA target updates)."""

    def prepare_distributed(self, sync: bool) -> None:
        """Batch norms become rank-synchronised (CPU-capable `GlobalBatchNorm`)."""
        convert_batchnorm(self, sync)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Weights with decay and LARS adaptation; biases and norm parameters without either."""
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for n, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or n.endswith(".bias") else decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay, "lars": True},
            {"params": no_decay, "weight_decay": 0.0, "lars": False},
        ]


def to_channels_last(module: ModuleT) -> ModuleT:
    """`module.to(memory_format=torch.channels_last)`: 4-D parameters and buffers, in place; returns it.

    The one place for that call: `Module.to` takes `memory_format` at runtime, torch's stubs lack it."""
    return module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]


def mlp(dims: list[int], bn: bool = True, last_bn: bool = False) -> nn.Sequential:
    """Linear (-> BN) -> ReLU ... -> Linear, the projection/prediction heads of the contrastive methods."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        last = i == len(dims) - 2
        layers.append(nn.Linear(a, b, bias=not (bn and not last) and not (last and last_bn)))
        if not last:
            if bn:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.ReLU(inplace=True))
        elif last_bn:
            layers.append(nn.BatchNorm1d(b, affine=False))
    return nn.Sequential(*layers)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with gradients off: the EMA / momentum target network."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, m: float) -> None:
    """target = m * target + (1 - m) * online, parameter by parameter (the target keeps its own BN stats)."""
    for pt, po in zip(target.parameters(), online.parameters(), strict=True):
        pt.mul_(m).add_(po.detach(), alpha=1.0 - m)
