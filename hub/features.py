"""`features_only` access: a module whose forward returns the stage maps (like timm's features_only)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hub.feature_info import FeatureInfo, take_indices
from hub.resnet import ResNet50


class FeaturesOnly(nn.Module):
    """Wraps a ResNet50; `forward(x)` returns the maps of the stages in `out_indices` (default all four:
    layer1..layer4, strides 4/8/16/32), shallow to deep.

    `feature_info` describes those levels as timm's does (`feature_info.channels()`, `.reduction()`);
    `config` is the wrapped model's ModelConfig. The head is not used (the wrapped model keeps it, so
    `.model` still classifies).
    """

    def __init__(self, model: ResNet50, out_indices: Sequence[int] | None = None) -> None:
        super().__init__()
        self.model = model
        self.out_indices = take_indices(len(model.feature_info), out_indices)
        self.feature_info = FeatureInfo(model.feature_info.info, self.out_indices)
        self.config = getattr(model, "config", None)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, self.out_indices, intermediates_only=True)
