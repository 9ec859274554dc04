"""The main job (`make run` / `cthub quickstart`): the product's own path on real data, each step reused when
its output is current: a SparK encoder (the best `make pretrain` encoder when one exists locally, else a
short, honestly named CPU run) -> a classifier fine-tuned from it on few labels, beside a random-init
classifier trained the same way on the same labels -> ONNX fp32 (+ int8 within tolerance) -> serving.

Names are imported on first use (PEP 562) so that `cthub --help` does not load torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cthub.lazy import lazy_package

if TYPE_CHECKING:
    from quickstart.budgets import BUDGETS, Budget
    from quickstart.pipeline import Plan, best_local_encoder, build, plan

__getattr__, __all__ = lazy_package(__name__, __file__)
