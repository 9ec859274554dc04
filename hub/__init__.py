"""The hub: named CT encoders and classifiers as safetensors + config.json + model card.

from hub import from_pretrained
enc = from_pretrained("spark-lidc")                    # registry name or alias, verified by sha256
clf = from_pretrained("spark", num_classes=11)          # encoder + fresh head for fine-tuning
feats = from_pretrained("spark", features_only=True)    # forward -> 4 stage maps (strides 4..32)
"""

from hub.config import ModelConfig
from hub.features import FeaturesOnly
from hub.io import (
    from_pretrained,
    hub_dir,
    load_dir,
    local_model_dir,
    publish_local,
    record_metrics,
    save_pretrained,
)
from hub.registry import load_registry
from hub.resnet import ResNet50

__all__ = [
    "FeaturesOnly",
    "ModelConfig",
    "ResNet50",
    "from_pretrained",
    "hub_dir",
    "load_dir",
    "load_registry",
    "local_model_dir",
    "publish_local",
    "record_metrics",
    "save_pretrained",
]
