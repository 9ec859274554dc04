"""The pretraining method names, in the order the paper lists them. Imports nothing, so `cthub pretrain
--help` offers them without loading torch; `pretrain.config.METHODS` maps each to its class."""

from __future__ import annotations

METHOD_NAMES: tuple[str, ...] = ("mocov2", "swav", "byol", "spark")
