"""The hub: named CT encoders and classifiers as safetensors + config.json + model card."""

from hub.config import ModelConfig
from hub.io import from_pretrained, hub_dir, save_pretrained
from hub.resnet import ResNet50

__all__ = ["ModelConfig", "ResNet50", "from_pretrained", "hub_dir", "save_pretrained"]
