"""The one affine warp of unit-interval CT batches, shared by fine-tuning and pretraining augmentations."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def affine_resample(unit: torch.Tensor, theta: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Bilinear resampling of [B,C,H,W] through per-sample affine maps `theta` [B,2,3] (output -> input
    coordinates in [-1, 1]) to `size` x `size` (default: the input size). Border padding: CT background is
    (near) the minimum, and replicating the edge keeps it so. The one affine warp of fine-tuning and
    pretraining augmentations."""
    b, c, h, w = unit.shape
    shape = [b, c, size or h, size or w]
    grid = F.affine_grid(theta.to(unit.dtype), shape, align_corners=False)
    return F.grid_sample(
        unit, grid.to(unit.device), mode="bilinear", padding_mode="border", align_corners=False
    )
