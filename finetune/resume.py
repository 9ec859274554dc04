"""Resuming an interrupted fine-tuning run where it stopped (`fit(..., checkpoint=FitCheckpoint(path))`).

Between epochs, at most every `every_s` seconds, `fit` writes everything its epoch loop carries (model,
optimizer, random generator, selection candidates, history) to one file, atomically. A later `fit` with the
same checkpoint path continues from there when the file belongs to the same run (`run_fingerprint`: recipe,
initial weights, data) and gives the result the uninterrupted run would have given; otherwise it starts over.
The file is removed when the run finishes. Files hold tensors and plain values only and are read with
`torch.load(weights_only=True)`: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cthub.runtime import torch_save_atomic

log = logging.getLogger(__name__)
FORMAT = 1
# Settings that do not change what a run computes up to any epoch: a run continued under a larger epoch
# budget or another thread count is the same run.
NOT_IN_FINGERPRINT = ("epochs", "threads")


@dataclass(frozen=True)
class FitCheckpoint:
    """Where `fit` keeps its state between epochs, and how often it writes it (seconds; 0 = every epoch)."""

    path: Path
    every_s: float = 300.0


def run_fingerprint(
    recipe: dict[str, Any], model: nn.Module, arrays: Sequence[np.ndarray | None], encoder: str
) -> str:
    """sha256 of what makes two runs the same run: the recipe (without `NOT_IN_FINGERPRINT`), the encoder's
    name and initial weights (the head's seeded init included), and the training/validation data."""
    h = hashlib.sha256()
    settings = {k: v for k, v in recipe.items() if k not in NOT_IN_FINGERPRINT}
    h.update(json.dumps({"format": FORMAT, "recipe": settings, "encoder": encoder}, sort_keys=True).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().numpy().tobytes())
    for a in arrays:
        h.update(b"-" if a is None else np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


class EpochSaver:
    """Writes the loop's state after an epoch when `every_s` has passed since the last write (always after
    the first epoch of a run, so a run interrupted early still has something to resume)."""

    def __init__(self, checkpoint: FitCheckpoint, fingerprint: str) -> None:
        self.checkpoint, self.fingerprint = checkpoint, fingerprint
        self.last = float("-inf")

    def due(self) -> bool:
        """Whether to write after this epoch."""
        return time.monotonic() - self.last >= self.checkpoint.every_s

    def save(self, state: dict[str, Any]) -> None:
        torch_save_atomic({"format": FORMAT, "fingerprint": self.fingerprint, **state}, self.checkpoint.path)
        self.last = time.monotonic()

    def load(self) -> dict[str, Any] | None:
        """The saved state of this run, or None (no file, another run's file, or unreadable: start over)."""
        path = self.checkpoint.path
        if not path.is_file():
            return None
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged file only costs the epochs it held
            log.warning("cannot read the checkpoint %s (%s): starting over", path, e)
            return None
        if not isinstance(saved, dict) or saved.get("fingerprint") != self.fingerprint:
            log.warning(
                "the checkpoint %s belongs to another run (recipe, weights or data): starting over", path
            )
            return None
        return saved

    def done(self) -> None:
        """The run finished: its checkpoint is no longer needed."""
        self.checkpoint.path.unlink(missing_ok=True)
