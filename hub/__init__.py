"""The hub: named CT encoders and classifiers as safetensors + config.json + model card.

from hub import from_pretrained
enc = from_pretrained("spark-lidc")                    # registry name or alias, verified by sha256
clf = from_pretrained("spark", num_classes=11)          # encoder + fresh head for fine-tuning
feats = from_pretrained("spark", features_only=True)    # forward -> 4 stage maps (strides 4..32)

Names are imported on first use (PEP 562) so that `cthub --help` does not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cthub.lazy import lazy_package

if TYPE_CHECKING:
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

__getattr__, __all__ = lazy_package(__name__, __file__)
