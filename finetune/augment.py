"""Augmentations for CT slices as torch tensor ops on unit-interval batches [B,1,H,W] (before `finalize`).

Small random resized crop / affine (scale, rotation, shift) and a linear intensity jitter (a*x + b, after
Ghesu et al.). No horizontal flip unless asked: left/right organs are different classes in OrganAMNIST.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ctdata.warp import affine_resample


@dataclass(frozen=True)
class AugmentConfig:
    scale: tuple[float, float] = (0.85, 1.15)  # zoom factor (>1 = crop in)
    rotate_deg: float = 10.0
    shift: float = 0.06  # fraction of the image size
    contrast: tuple[float, float] = (0.9, 1.1)  # a
    brightness: float = 0.05  # b in ±brightness (unit interval)
    hflip: bool = False


def _uniform(n: int, lo: float, hi: float, g: torch.Generator | None) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def augment_batch(
    unit: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random affine + intensity jitter of a [B,1,H,W] float batch in [0,1]; returns the same shape."""
    b = unit.shape[0]
    zoom = _uniform(b, *cfg.scale, generator)
    ang = _uniform(b, -cfg.rotate_deg, cfg.rotate_deg, generator) * math.pi / 180.0
    tx = _uniform(b, -cfg.shift, cfg.shift, generator) * 2.0
    ty = _uniform(b, -cfg.shift, cfg.shift, generator) * 2.0
    cos, sin = torch.cos(ang) / zoom, torch.sin(ang) / zoom
    sx = torch.ones(b)
    if cfg.hflip:
        sx = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.stack([torch.stack([cos * sx, -sin, tx], 1), torch.stack([sin * sx, cos, ty], 1)], 1)
    out = affine_resample(unit, theta)
    a = _uniform(b, *cfg.contrast, generator).view(b, 1, 1, 1).to(unit)
    c = _uniform(b, -cfg.brightness, cfg.brightness, generator).view(b, 1, 1, 1).to(unit)
    return (out * a + c).clamp_(0.0, 1.0)
