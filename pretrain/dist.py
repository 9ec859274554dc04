"""Distributed helpers that degrade to single-process no-ops, and a batch norm synchronised over ranks.

torch's `SyncBatchNorm` refuses CPU tensors, so `GlobalBatchNorm2d` computes the batch statistics itself
(one all-reduce of sum / sum of squares / count, differentiable through `torch.distributed.nn`). With a
`mask` it normalizes over the visible positions only (SparK's sparse BatchNorm) and leaves the others zero.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pretrain.norms import BatchNormBase, replace_batchnorm


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); False when single-process."""
    if is_dist():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return True


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks along dim 0 (rank order); `x` itself when single-process."""
    if not is_dist():
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


class _AllReduceSum(torch.autograd.Function):
    """y = sum over ranks of x; dL/dx = sum over ranks of dL/dy (every rank's loss depends on every x)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        g = g.clone()
        dist.all_reduce(g)
        return g


def all_reduce_sum(x: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """Sum over ranks; with `grad` the gradient flows back to every rank."""
    if not is_dist():
        return x
    if grad:
        return _AllReduceSum.apply(x)
    x = x.clone()
    dist.all_reduce(x)
    return x


class _GlobalBN(BatchNormBase):
    """Batch statistics over every rank's batch and, given `mask`, over visible positions only.

    The common base of `GlobalBatchNorm1d/2d`, which also derive from `nn.BatchNorm1d/2d` (next in their
    MRO); it adds no parameters or buffers, so the state-dict keys stay those of BN."""

    sync: bool = False

    def _global_forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        dims = [0, *range(2, x.ndim)]
        shape = [1, -1] + [1] * (x.ndim - 2)
        if not self.training:
            y = F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
            return y if mask is None else y * mask.to(y.dtype)
        xf = x.float()
        m = torch.ones_like(xf[:, :1]) if mask is None else mask.to(xf.dtype).expand_as(xf[:, :1])
        stats = torch.cat([(xf * m).sum(dims), (xf * xf * m).sum(dims), m.sum().view(1)])
        stats = all_reduce_sum(stats, grad=True) if self.sync else stats
        c = x.shape[1]
        n = stats[-1].clamp_min(1.0)
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0.0)
        with torch.no_grad():
            # made from tracking BNs (`convert_batchnorm`): the running statistics exist
            assert self.running_mean is not None and self.running_var is not None
            assert self.num_batches_tracked is not None
            mom = self.momentum if self.momentum is not None else 0.1
            unbiased = var * n / (n - 1).clamp_min(1.0)
            self.running_mean.mul_(1 - mom).add_(mean.detach(), alpha=mom)
            self.running_var.mul_(1 - mom).add_(unbiased.detach(), alpha=mom)
            self.num_batches_tracked.add_(1)
        scale = self.weight / torch.sqrt(var + self.eps)
        y = (xf - mean.view(shape)) * scale.view(shape) + self.bias.view(shape)
        return (y * m).to(x.dtype)


class GlobalBatchNorm2d(_GlobalBN, nn.BatchNorm2d):
    """`nn.BatchNorm2d` (same keys) synchronised over ranks when `sync`; optional visibility mask."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None and not (self.sync and self.training and is_dist()):
            return nn.BatchNorm2d.forward(self, x)
        return self._global_forward(x, mask)


class GlobalBatchNorm1d(_GlobalBN, nn.BatchNorm1d):
    """`nn.BatchNorm1d` (same keys) synchronised over ranks when `sync` (projection heads)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.sync and self.training and is_dist()):
            return nn.BatchNorm1d.forward(self, x)
        return self._global_forward(x, None)


def convert_batchnorm(module: nn.Module, sync: bool) -> nn.Module:
    """Swap every plain `nn.BatchNorm1d/2d` for its `GlobalBatchNorm` twin sharing its tensors (in place)."""

    def make(bn: BatchNormBase) -> BatchNormBase | None:
        cls = {nn.BatchNorm2d: GlobalBatchNorm2d, nn.BatchNorm1d: GlobalBatchNorm1d}.get(type(bn))
        if cls is None:
            return None
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        new.sync = sync
        return new

    return replace_batchnorm(module, make)


def set_bn_sync(module: nn.Module, sync: bool) -> None:
    for m in module.modules():
        if isinstance(m, _GlobalBN):
            m.sync = sync
