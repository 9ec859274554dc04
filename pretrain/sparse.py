"""Sparse (masked) ResNet layers for SparK: convolutions, BatchNorm and max-pool see only visible patches.

The visibility mask lives in a `MaskContext` object owned by one SparK model and shared by its layers:
no module-level mutable state. The sparse layers subclass the dense ones and keep their state-dict keys,
so the trained weights load strictly into a plain `hub.resnet.ResNet50` (dense convs on unmasked images).
"""

from __future__ import annotations

import torch
from torch import nn

from pretrain.dist import GlobalBatchNorm2d


class MaskContext:
    """The current visibility mask [B,1,h,w] (True = visible) at the encoder's coarsest grid."""

    def __init__(self) -> None:
        self.active: torch.Tensor | None = None

    def at(self, hw: tuple[int, int] | torch.Size) -> torch.Tensor:
        """The mask upsampled (nearest, exact multiples) to a feature map of size `hw`."""
        assert self.active is not None
        h, w = int(hw[0]), int(hw[1])
        fh, fw = self.active.shape[-2:]
        return self.active.repeat_interleave(h // fh, dim=2).repeat_interleave(w // fw, dim=3)


class SparseConv2d(nn.Conv2d):
    """Conv2d whose output is zero at masked positions (submanifold-style: masked stays empty)."""

    ctx: MaskContext | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = super().forward(x)
        if self.ctx is not None and self.ctx.active is not None:
            y = y * self.ctx.at(y.shape[-2:]).to(y.dtype)
        return y


class SparseMaxPool2d(nn.MaxPool2d):
    ctx: MaskContext | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = super().forward(x)
        if self.ctx is not None and self.ctx.active is not None:
            y = y * self.ctx.at(y.shape[-2:]).to(y.dtype)
        return y


class SparseBatchNorm2d(GlobalBatchNorm2d):
    """BatchNorm over visible positions only (rank-synchronised when `sync`); masked positions stay 0."""

    ctx: MaskContext | None = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if mask is None and self.ctx is not None and self.ctx.active is not None:
            mask = self.ctx.at(x.shape[-2:])
        return super().forward(x, mask)


def sparsify(module: nn.Module, ctx: MaskContext) -> nn.Module:
    """Swap Conv2d / BatchNorm2d / MaxPool2d for their sparse twins, in place, sharing parameters."""
    for name, child in list(module.named_children()):
        new: nn.Module | None = None
        if type(child) is nn.Conv2d:
            new = SparseConv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                               child.padding, child.dilation, child.groups, child.bias is not None)
            new.weight, new.bias = child.weight, child.bias
        elif isinstance(child, nn.BatchNorm2d) and not isinstance(child, SparseBatchNorm2d):
            new = SparseBatchNorm2d(child.num_features, child.eps, child.momentum)
            new.weight, new.bias = child.weight, child.bias
            new.running_mean, new.running_var = child.running_mean, child.running_var
            new.num_batches_tracked = child.num_batches_tracked
        elif type(child) is nn.MaxPool2d:
            new = SparseMaxPool2d(child.kernel_size, child.stride, child.padding)
        if new is not None:
            new.ctx = ctx
            setattr(module, name, new)
        else:
            sparsify(child, ctx)
    return module
