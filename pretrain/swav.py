"""SwAV (Caron et al. 2020): prototypes, Sinkhorn-Knopp codes, swapped prediction, multi-crop."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cthub.errors import ConfigError
from hub.resnet import DOWNSAMPLE, FEATURE_DIM, ResNet50
from pretrain import dist as pdist
from pretrain.augment import ViewSpec
from pretrain.base import SSLMethod, mlp
from pretrain.norms import frozen_running_stats


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Codes Q [B,K] from prototype scores [B,K] over the GLOBAL batch (sums all-reduced across ranks).

    Equipartition: each prototype gets B_global/K of the mass, each sample's code sums to 1.
    """
    q = torch.exp(scores.float() / epsilon).t()  # K x B
    b = q.shape[1] * pdist.world_size()
    k = q.shape[0]
    q /= pdist.all_reduce_sum(q.sum())
    for _ in range(iterations):
        q /= pdist.all_reduce_sum(q.sum(dim=1, keepdim=True))
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()


def swapped_prediction_loss(
    scores: list[torch.Tensor], codes: dict[int, torch.Tensor], temperature: float
) -> torch.Tensor:
    """Mean over code crops i of: mean over other crops v of cross-entropy(codes_i, softmax(scores_v / T))."""
    total = scores[0].new_zeros((), dtype=torch.float32)
    for i, q in codes.items():
        sub = total.new_zeros(())
        for v, s in enumerate(scores):
            if v != i:
                sub = sub - (q * F.log_softmax(s.float() / temperature, dim=1)).sum(1).mean()
        total = total + sub / (len(scores) - 1)
    return total / len(codes)


def small_crop_size(size: int) -> int:
    """SwAV's small crops are 96/224 of the large ones, but never below 1.5x the encoder's stride of 32,
    so the last stage keeps a 2x2 map (at 64 px inputs, 96/224 gives 27 px: a 1x1 map of mostly padding)."""
    return max(round(size * 96 / 224), round(1.5 * DOWNSAMPLE))


class SwAV(SSLMethod):
    """Encoder + MLP projection (2048-2048-128), L2-normalized embeddings scored against prototypes."""

    name = "swav"
    queue: torch.Tensor  # buffers (register_buffer in __init__)
    step: torch.Tensor

    def __init__(
        self,
        encoder: ResNet50,
        n_prototypes: int = 3000,
        dim: int = 128,
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        n_large: int = 2,
        n_small: int = 4,
        freeze_prototypes_steps: int = 0,
        queue_length: int = 0,
        queue_start_step: int = 0,
        small_size: int | None = None,
    ) -> None:
        super().__init__(encoder)
        self.head = mlp([FEATURE_DIM, FEATURE_DIM, dim], bn=True)
        self.prototypes = nn.Linear(dim, n_prototypes, bias=False)
        self.temperature, self.epsilon, self.iterations = temperature, epsilon, sinkhorn_iterations
        self.n_large, self.n_small = n_large, n_small
        self.small_size = small_size
        self.freeze_prototypes_steps = freeze_prototypes_steps
        self.queue_start_step = queue_start_step
        self.register_buffer("queue", torch.zeros(2, queue_length, dim))  # per rank; length 0 = no queue
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def view_specs(self, size: int, hflip: bool) -> list[ViewSpec]:
        f = 0.5 if hflip else 0.0
        small = self.small_size or small_crop_size(size)
        large = ViewSpec(size, scale=(0.14, 1.0), p_intensity=0.8, p_blur=0.5, p_hflip=f)
        return [large] * self.n_large + [
            ViewSpec(small, scale=(0.05, 0.14), p_intensity=0.8, p_blur=0.5, p_hflip=f)
        ] * self.n_small

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():  # prototypes live on the unit sphere
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        bs = views[0].shape[0]
        if 0 < self.queue.shape[1] < bs:
            raise ConfigError(f"SwAV queue_length {self.queue.shape[1]} is shorter than the batch ({bs})")
        emb = [self.head(self.encoder(torch.cat(views[: self.n_large])))]  # one encoder pass per resolution
        if len(views) > self.n_large:
            with frozen_running_stats(self):  # the encoder keeps the statistics of full-size views
                emb.append(self.head(self.encoder(torch.cat(views[self.n_large :]))))
        z = F.normalize(torch.cat(emb).float(), dim=1)
        out = self.prototypes(z.to(self.prototypes.weight.dtype)).float()
        scores = list(out.split(bs))
        codes = {}
        use_queue = self.queue.shape[1] > 0 and int(self.step) >= self.queue_start_step
        with torch.no_grad():
            for i in range(2):
                s = scores[i].detach()
                if use_queue:
                    if bool(self.queue[i, -1].abs().sum() > 0):  # queue full: add its scores
                        s = torch.cat([self.queue[i] @ self.prototypes.weight.t().float(), s])
                    self.queue[i, bs:] = self.queue[i, :-bs].clone()
                    self.queue[i, :bs] = z[i * bs : (i + 1) * bs].detach()
                codes[i] = sinkhorn(s, self.epsilon, self.iterations)[-bs:]
        return swapped_prediction_loss(scores, codes, self.temperature)

    def before_optimizer_step(self, step: int) -> None:
        if step < self.freeze_prototypes_steps:
            self.prototypes.weight.grad = None

    @torch.no_grad()
    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        self.step += 1
