"""Self-supervised pretraining of the hub's ResNet50 CT encoders: MoCoV2, SwAV, BYOL and SparK.

Public API:
    config_for(method, recipe=None, **overrides) -> TrainConfig
    train(cfg, resume=False) -> RunResult            one loop for all methods (DDP via torchrun)
    publish(result, cfg, name, ...) -> Path           encoder + model card into the local hub
    build_method(cfg) -> SSLMethod, METHODS
"""

from pretrain.config import METHODS, TrainConfig, build_method, config_for, load_recipe
from pretrain.publish import publish
from pretrain.trainer import RunResult, plain_encoder, train

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
