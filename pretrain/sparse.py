"""Sparse (masked) ResNet layers for SparK: convolutions, BatchNorm and max-pool see only visible patches.

The visibility mask lives in a `MaskContext` object owned by one SparK model and shared by its layers:
no module-level mutable state. The sparse layers subclass the dense ones and keep their state-dict keys,
so the trained weights load strictly into a plain `hub.resnet.ResNet50` (dense convs on unmasked images).
"""

from __future__ import annotations

import torch
from torch import nn

from pretrain.dist import GlobalBatchNorm2d
from pretrain.norms import BatchNormBase, replace_batchnorm


class MaskContext:
    """The current visibility mask [B,1,h,w] (True = visible) at the encoder's coarsest grid.

    `at(hw)` upsamples it to a feature-map size; the result is cached per size while the mask is current
    (a ResNet50 forward asks ~60 times for 5 sizes), and setting a new mask clears the cache."""

    def __init__(self) -> None:
        self._active: torch.Tensor | None = None
        self._cache: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def active(self) -> torch.Tensor | None:
        return self._active

    @active.setter
    def active(self, mask: torch.Tensor | None) -> None:
        self._active = mask
        self._cache = {}

    def at(self, hw: tuple[int, int] | torch.Size) -> torch.Tensor:
        """The mask upsampled (nearest, exact multiples) to a feature map of size `hw`."""
        assert self._active is not None
        key = (int(hw[0]), int(hw[1]))
        m = self._cache.get(key)
        if m is None:
            fh, fw = self._active.shape[-2:]
            m = self._active.repeat_interleave(key[0] // fh, dim=2).repeat_interleave(key[1] // fw, dim=3)
            self._cache[key] = m
        return m


class SparseConv2d(nn.Conv2d):
    """Conv2d whose output is zero at masked positions (submanifold-style: masked stays empty)."""

    ctx: MaskContext | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.ctx is not None and self.ctx.active is not None:
            y = y * self.ctx.at(y.shape[-2:]).to(y.dtype)
        return y


class SparseMaxPool2d(nn.MaxPool2d):
    ctx: MaskContext | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.ctx is not None and self.ctx.active is not None:
            y = y * self.ctx.at(y.shape[-2:]).to(y.dtype)
        return y


class SparseBatchNorm2d(GlobalBatchNorm2d):
    """BatchNorm over visible positions only (rank-synchronised when `sync`); masked positions stay 0."""

    ctx: MaskContext | None = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None and self.ctx is not None and self.ctx.active is not None:
            mask = self.ctx.at(x.shape[-2:])
        return super().forward(x, mask)


def sparsify(module: nn.Module, ctx: MaskContext) -> nn.Module:
    """Swap Conv2d / BatchNorm2d / MaxPool2d for their sparse twins, in place, sharing parameters."""

    def make_bn(bn: BatchNormBase) -> BatchNormBase | None:
        if not isinstance(bn, nn.BatchNorm2d) or isinstance(bn, SparseBatchNorm2d):
            return None
        new = SparseBatchNorm2d(bn.num_features, bn.eps, bn.momentum)
        new.ctx = ctx
        return new

    replace_batchnorm(module, make_bn)
    _sparsify_conv_pool(module, ctx)
    return module


def _pair(v: tuple[int, ...]) -> tuple[int, int]:
    """A Conv2d's (already normalized) 2-tuple attribute, typed as its constructor takes it."""
    a, b = v
    return a, b


def _sparsify_conv_pool(module: nn.Module, ctx: MaskContext) -> None:
    for name, child in list(module.named_children()):
        new: SparseConv2d | SparseMaxPool2d | None = None
        if type(child) is nn.Conv2d:
            pad = child.padding if isinstance(child.padding, str) else _pair(child.padding)
            new = SparseConv2d(
                child.in_channels,
                child.out_channels,
                _pair(child.kernel_size),
                _pair(child.stride),
                pad,
                _pair(child.dilation),
                child.groups,
                child.bias is not None,
            )
            new.weight, new.bias = child.weight, child.bias
        elif type(child) is nn.MaxPool2d:
            new = SparseMaxPool2d(child.kernel_size, child.stride, child.padding)
        if new is not None:
            new.ctx = ctx
            setattr(module, name, new)
        else:
            _sparsify_conv_pool(child, ctx)
