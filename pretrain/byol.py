"""BYOL (Grill et al. 2020): online encoder + projector + predictor regress an EMA target's projection."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hub.resnet import FEATURE_DIM, ResNet50
from pretrain.augment import ViewSpec
from pretrain.base import SSLMethod, ema_update, frozen_copy, mlp


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(p, z) per sample, averaged; in [0, 4]. `z` is the (detached) target projection."""
    return (2 - 2 * F.cosine_similarity(p.float(), z.float().detach(), dim=-1)).mean()


def cosine_tau(step: int, total_steps: int, base: float = 0.996) -> float:
    """EMA rate 1 - (1 - base) (cos(pi k / K) + 1) / 2: base at step 0, 1 at the end."""
    k = min(max(step, 0), total_steps)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * k / max(total_steps, 1)) + 1) / 2


class BYOL(SSLMethod):
    """Projector and predictor 2048-4096-256 (BN, ReLU); symmetric loss = mean of both directions."""

    name = "byol"

    def __init__(
        self, encoder: ResNet50, hidden: int = 4096, dim: int = 256, tau_base: float = 0.996
    ) -> None:
        super().__init__(encoder)
        self.projector = mlp([FEATURE_DIM, hidden, dim])
        self.predictor = mlp([dim, hidden, dim])
        self.target_encoder = frozen_copy(encoder)
        self.target_projector = frozen_copy(self.projector)
        self.tau_base = tau_base
        self.tau = tau_base

    def view_specs(self, size: int, hflip: bool) -> list[ViewSpec]:
        f = 0.5 if hflip else 0.0
        return [
            ViewSpec(size, scale=(0.08, 1.0), p_intensity=0.8, p_blur=1.0, p_solarize=0.0, p_hflip=f),
            ViewSpec(size, scale=(0.08, 1.0), p_intensity=0.8, p_blur=0.1, p_solarize=0.2, p_hflip=f),
        ]

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        v1, v2 = views
        p1 = self.predictor(self.projector(self.encoder(v1)))  # views pass separately: own BN statistics
        p2 = self.predictor(self.projector(self.encoder(v2)))
        with torch.no_grad():
            z1 = self.target_projector(self.target_encoder(v1))
            z2 = self.target_projector(self.target_encoder(v2))
        return (regression_loss(p1, z2) + regression_loss(p2, z1)) / 2

    @torch.no_grad()
    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """EMA update with the rate of this step, then the rate for the next one (cosine to 1)."""
        self.tau = cosine_tau(step, total_steps, self.tau_base)
        ema_update(self.target_encoder, self.encoder, self.tau)
        ema_update(self.target_projector, self.projector, self.tau)
