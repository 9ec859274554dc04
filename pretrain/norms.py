"""BatchNorm variants of the pretraining methods and the one helper that swaps them in.

- `replace_batchnorm`: swap BN layers for another class sharing their tensors (keys unchanged, so trained
  weights load strictly into a plain `hub.resnet.ResNet50`). Used by SparK (sparse BN), DDP (synced BN)
  and MoCo (split BN).
- `SplitBatchNorm2d`: training statistics from equal sub-batches. MoCo's shuffle BN needs several processes;
  on one process, split BN with a shuffled key batch is the usual substitute (the positive key is normalized
  with statistics of other images, so BN cannot leak which key is the positive).
- `frozen_running_stats`: a pass whose batch statistics normalize but do not enter the running averages
  (SwAV's small crops, which would otherwise dominate the statistics the published encoder keeps).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm as BatchNormBase

# torch exports no public common base of its BatchNorm layers (BatchNorm1d/2d/3d, SyncBatchNorm and the lazy
# ones all derive from the private `_BatchNorm`); the pretraining BN variants subclass and swap exactly those,
# so this alias is the project's one reference to it (pretrain.dist and pretrain.sparse use the alias).

BN_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d)


def replace_batchnorm(module: nn.Module, make: Callable[[BatchNormBase], BatchNormBase | None]) -> nn.Module:
    """In place: every BN child for which `make(child)` returns a module is replaced by it, sharing the
    child's weight, bias and running statistics. Returns `module`."""
    for name, child in list(module.named_children()):
        if isinstance(child, BatchNormBase):
            new = make(child)
            if new is not None:
                new.weight, new.bias = child.weight, child.bias
                new.running_mean, new.running_var = child.running_mean, child.running_var
                new.num_batches_tracked = child.num_batches_tracked
                setattr(module, name, new)
                continue
        replace_batchnorm(child, make)
    return module


class SplitBatchNorm2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d` (same keys) whose training statistics come from `splits` equal sub-batches."""

    splits: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        s = self.splits
        if not self.training or s <= 1 or b % s or b // s < 2:
            return super().forward(x)
        _, c, h, w = x.shape
        grouped = x.reshape(s, b // s, c, h, w).transpose(0, 1).reshape(b // s, s * c, h, w)
        # made from tracking BNs (`split_batchnorm`): the running statistics exist
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        mean, var = self.running_mean.repeat(s), self.running_var.repeat(s)
        momentum = 0.1 if self.momentum is None else self.momentum
        y = F.batch_norm(
            grouped, mean, var, self.weight.repeat(s), self.bias.repeat(s), True, momentum, self.eps
        )
        with torch.no_grad():
            self.running_mean.copy_(mean.view(s, c).mean(0))
            self.running_var.copy_(var.view(s, c).mean(0))
            self.num_batches_tracked.add_(1)
        return y.reshape(b // s, s, c, h, w).transpose(0, 1).reshape(b, c, h, w)


def split_batchnorm(module: nn.Module, splits: int) -> nn.Module:
    """Every plain `nn.BatchNorm2d` of `module` becomes a `SplitBatchNorm2d` with `splits` groups."""

    def make(bn: BatchNormBase) -> BatchNormBase | None:
        if type(bn) is not nn.BatchNorm2d:
            return None
        new = SplitBatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        new.splits = splits
        return new

    return replace_batchnorm(module, make)


@contextmanager
def frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """Inside: BN layers normalize with batch statistics but leave their running averages unchanged."""
    saved = [(m, m.momentum) for m in module.modules() if isinstance(m, BatchNormBase)]
    try:
        for m, _ in saved:
            m.momentum = 0.0
        yield
    finally:
        for m, mom in saved:
            m.momentum = mom
