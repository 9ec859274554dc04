"""`features_only` access: a module whose forward returns the four stage maps (like timm's features_only)."""

from __future__ import annotations

from typing import TypedDict

import torch
from torch import nn

from hub.resnet import STAGE_CHANNELS, ResNet50

REDUCTIONS: tuple[int, int, int, int] = (4, 8, 16, 32)


class StageInfo(TypedDict):
    """One entry of `feature_info`, with timm's keys."""

    module: str
    num_chs: int
    reduction: int


class FeaturesOnly(nn.Module):
    """Wraps a ResNet50; `forward(x)` returns [layer1, layer2, layer3, layer4] outputs (strides 4/8/16/32).

    `feature_info` lists channels and reductions per stage; `config` is the wrapped model's ModelConfig.
    The head is not used (the wrapped model keeps it, so `.model` still classifies).
    """

    def __init__(self, model: ResNet50) -> None:
        super().__init__()
        self.model = model
        self.feature_info: list[StageInfo] = [
            {"module": f"layer{i + 1}", "num_chs": c, "reduction": r}
            for i, (c, r) in enumerate(zip(STAGE_CHANNELS, REDUCTIONS, strict=True))
        ]
        self.config = getattr(model, "config", None)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x)

    def channels(self) -> list[int]:
        return [f["num_chs"] for f in self.feature_info]

    def reduction(self) -> list[int]:
        return [f["reduction"] for f in self.feature_info]
