"""Self-supervised pretraining of the hub's ResNet50 CT encoders: MoCoV2, SwAV, BYOL and SparK.

Public API:
    config_for(method, recipe=None, **overrides) -> TrainConfig
    train(cfg, resume=False) -> RunResult            one loop for all methods (DDP via torchrun)
    publish(result, cfg, name, ...) -> Path           encoder + model card into the local hub
    build_method(cfg) -> SSLMethod, METHODS

Names are imported on first use (PEP 562) so that `cthub --help` does not load torch.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

from cthub.lazy import lazy_exports

if TYPE_CHECKING:
    from pretrain.config import METHODS, TrainConfig, build_method, config_for, load_recipe
    from pretrain.publish import publish
    from pretrain.trainer import RunResult, plain_encoder, train

_EXPORTS: dict[str, str] = {
    "METHODS": "pretrain.config",
    "RunResult": "pretrain.trainer",
    "TrainConfig": "pretrain.config",
    "build_method": "pretrain.config",
    "config_for": "pretrain.config",
    "load_recipe": "pretrain.config",
    "plain_encoder": "pretrain.trainer",
    "publish": "pretrain.publish",
    "train": "pretrain.trainer",
}
__all__ = [
    "METHODS",
    "RunResult",
    "TrainConfig",
    "build_method",
    "config_for",
    "load_recipe",
    "plain_encoder",
    "publish",
    "train",
]


__getattr__ = lazy_exports(__name__, _EXPORTS)


class _Package(types.ModuleType):
    """`publish` names both a submodule and its function. Importing `pretrain.publish` sets the package's
    attribute to the submodule; this keeps the function there instead, as the eager import did."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
