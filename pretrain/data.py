"""Unlabeled uint8 slices -> deterministic, shardable batches of augmented, normalized views."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ctdata.datasets import load_unlabeled
from ctdata.preprocess import PreprocessConfig, grey_to_unit
from cthub.errors import DataError
from pretrain.augment import ViewSpec, make_view


def load_images(
    source: str | Path, storage_size: int | None = None, max_images: int | None = None
) -> np.ndarray:
    """Unlabeled slices [N,H,W] uint8 through the data package (npz train split, shards, image folders)."""
    images = np.asarray(load_unlabeled(source, storage_size))
    if images.ndim != 3 or images.dtype != np.uint8 or len(images) < 2:
        raise DataError(f"expected at least 2 uint8 slices [N,H,W], got {images.dtype} {images.shape}")
    return images[:max_images] if max_images else images


def dataset_stats(images: np.ndarray, n: int = 4096, seed: int = 0) -> tuple[float, float]:
    """Mean and std of the unit-interval grey values over (a sample of) the slices: the paper's
    normalization."""
    idx = np.random.default_rng(seed).permutation(len(images))[:n]
    unit = grey_to_unit(images[np.sort(idx)])
    return float(unit.mean()), float(max(unit.std(), 1e-3))


class BatchStream:
    """Batch `i` of the run is a pure function of (seed, i, rank): epoch permutations shared by all ranks,
    each rank taking its own slice, the last incomplete batch dropped. Resuming at `i` needs no replay."""

    def __init__(self, images: np.ndarray, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.images, self.batch_size, self.seed = images, batch_size, seed
        self.rank, self.world = rank, world
        self.per_epoch = len(images) // (batch_size * world)
        if self.per_epoch < 1:
            raise DataError(f"{len(images)} images cannot fill one batch of {batch_size} x {world} processes")
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def indices(self, i: int) -> np.ndarray:
        epoch, pos = divmod(i, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perm, self._epoch = torch.randperm(len(self.images), generator=g).numpy(), epoch
        start = (pos * self.world + self.rank) * self.batch_size
        return np.sort(self._perm[start : start + self.batch_size])

    def unit(self, i: int) -> torch.Tensor:
        """Batch `i` as unit-interval grey [B,1,H,W] (the shared uint8 -> [0,1] conversion)."""
        return torch.from_numpy(grey_to_unit(self.images[self.indices(i)]))[:, None]


def make_views(
    unit: torch.Tensor,
    specs: list[ViewSpec],
    pp: PreprocessConfig,
    g: torch.Generator,
    device: torch.device,
    channels_last: bool,
) -> list[torch.Tensor]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [
        make_view(unit, s, pp, g).to(device, non_blocking=True).contiguous(memory_format=fmt) for s in specs
    ]
