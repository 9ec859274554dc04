"""Self-supervised pretraining of the hub's ResNet50 CT encoders: MoCoV2, SwAV, BYOL and SparK.

Public API:
    config_for(method, recipe=None, **overrides) -> TrainConfig
    train(cfg, resume=False) -> RunResult            one loop for all methods (DDP via torchrun)
    publish(result, cfg, name, ...) -> Path           encoder + model card into the local hub
    build_method(cfg) -> SSLMethod, METHODS

Names are imported on first use (PEP 562) so that `cthub --help` does not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cthub.lazy import lazy_package

if TYPE_CHECKING:
    from pretrain.config import METHODS, TrainConfig, build_method, config_for, load_recipe
    from pretrain.publishing import publish
    from pretrain.trainer import RunResult, plain_encoder, train

__getattr__, __all__ = lazy_package(__name__, __file__)
