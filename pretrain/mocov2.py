"""MoCo v2 (Chen et al. 2020): momentum key encoder, queue of negatives, MLP head, InfoNCE at T = 0.2."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hub.resnet import FEATURE_DIM, ResNet50
from pretrain import dist as pdist
from pretrain.augment import ViewSpec
from pretrain.base import SSLMethod, ema_update, frozen_copy, mlp
from pretrain.norms import SplitBatchNorm2d, split_batchnorm


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE: positive q.k against negatives q.queue (queue is [dim, K]); the positive is class 0."""
    q, k = q.float(), k.float()
    l_pos = (q * k).sum(1, keepdim=True)
    l_neg = q @ queue.float()
    logits = torch.cat([l_pos, l_neg], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


class MoCoV2(SSLMethod):
    """Query encoder + head trained by InfoNCE; key encoder + head follow by momentum 0.999."""

    name = "mocov2"
    queue: torch.Tensor  # buffers (register_buffer in __init__)
    queue_ptr: torch.Tensor

    def __init__(
        self,
        encoder: ResNet50,
        queue_size: int = 65536,
        dim: int = 128,
        momentum: float = 0.999,
        temperature: float = 0.2,
        bn_splits: int = 4,
    ) -> None:
        super().__init__(encoder)
        # One process has no cross-rank shuffle: split BN (+ a shuffled key batch) keeps BN from leaking the
        # positive. `prepare_distributed` turns the splits off, as shuffle BN then does the job.
        self.bn_splits = bn_splits
        split_batchnorm(self.encoder, bn_splits)
        self.head = mlp([FEATURE_DIM, FEATURE_DIM, dim], bn=False)
        self.encoder_k = frozen_copy(encoder)
        self.head_k = frozen_copy(self.head)
        self.momentum, self.temperature = momentum, temperature
        self.register_buffer("queue", F.normalize(torch.randn(dim, queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def view_specs(self, size: int, hflip: bool) -> list[ViewSpec]:
        spec = ViewSpec(size, scale=(0.2, 1.0), p_intensity=0.8, p_blur=0.5, p_hflip=0.5 if hflip else 0.0)
        return [spec, spec]

    def prepare_distributed(self, sync: bool) -> None:
        """MoCo keeps per-rank BN and shuffles the key batch across ranks instead (shuffle BN)."""
        for m in self.modules():
            if isinstance(m, SplitBatchNorm2d):
                m.splits = 1

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        im_q, im_k = views
        q = F.normalize(self.head(self.encoder(im_q)).float(), dim=1)
        with torch.no_grad():
            im_k, unshuffle = _shuffle(im_k)
            k = F.normalize(self.head_k(self.encoder_k(im_k)).float(), dim=1)
            k = _unshuffle(k, unshuffle)
        loss = info_nce(q, k, self.queue.clone().detach(), self.temperature)
        if self.training:
            self._enqueue(k)
        return loss

    @torch.no_grad()
    def _enqueue(self, k: torch.Tensor) -> None:
        """Keys from every rank enter the queue (FIFO, wrapping at the end)."""
        keys = pdist.gather_no_grad(k)
        size = self.queue.shape[1]
        idx = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[:, idx] = keys.T.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)

    @torch.no_grad()
    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        ema_update(self.encoder_k, self.encoder, self.momentum)
        ema_update(self.head_k, self.head, self.momentum)


def _shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shuffle the global key batch across ranks (or, on one process, across BN splits) so BN statistics
    cannot leak the positive pair."""
    if not pdist.is_dist():
        perm = torch.randperm(x.shape[0], device=x.device)
        return x[perm], torch.argsort(perm)
    xs = pdist.gather_no_grad(x)
    perm = torch.randperm(xs.shape[0], device=x.device)
    dist.broadcast(perm, src=0)
    mine = perm.view(pdist.world_size(), -1)[pdist.rank()]
    return xs[mine], torch.argsort(perm)


def _unshuffle(x: torch.Tensor, unshuffle: torch.Tensor | None) -> torch.Tensor:
    if unshuffle is None:
        return x
    if not pdist.is_dist():
        return x[unshuffle]
    xs = pdist.gather_no_grad(x)
    return xs[unshuffle.view(pdist.world_size(), -1)[pdist.rank()]]
