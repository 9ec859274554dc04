"""ResNet50 written against torchvision's state-dict key names, with no torchvision dependency.

Keys match `torchvision.models.resnet50()` exactly (conv1, bn1, layer1..layer4, fc), so torchvision, timm and
the seed paper's checkpoints load with strict key matching. The feature API follows timm's contract:
`forward_features` returns the last stage map (stride 32, the input of `forward_head`);
`forward_head(x, pre_logits=False)` pools it (and applies the head unless `pre_logits`);
`forward_intermediates(x, indices, intermediates_only=...)` returns `(last map, [stage maps])` or the maps
only, and `feature_info` describes the feature levels (`channels()`, `reduction()`, `module_name()`).
One difference from timm's ResNet: the feature levels are the four stages (strides 4, 8, 16, 32, the ones
SparK's decoder and `features_only` use); timm also counts the stem (stride 2) as level 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, overload

import torch
from torch import nn

from hub.feature_info import FeatureInfo, take_indices

if TYPE_CHECKING:
    from hub.config import ModelConfig

STAGE_CHANNELS: tuple[int, int, int, int] = (256, 512, 1024, 2048)
STAGE_REDUCTIONS: tuple[int, int, int, int] = (4, 8, 16, 32)
FEATURE_DIM = 2048
DOWNSAMPLE = 32


def stage_feature_info() -> FeatureInfo:
    """The four stages of ResNet50: layer1..layer4, channels 256..2048, strides 4..32."""
    levels = enumerate(zip(STAGE_CHANNELS, STAGE_REDUCTIONS, strict=True))
    return FeatureInfo([{"num_chs": c, "reduction": r, "module": f"layer{i + 1}"} for i, (c, r) in levels])


class Bottleneck(nn.Module):
    """torchvision's v1.5 bottleneck: the stride sits on the 3x3 convolution."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _stage(in_ch: int, width: int, blocks: int, stride: int) -> nn.Sequential:
    """One stage: a (possibly strided) bottleneck with projection, then `blocks - 1` identity bottlenecks."""
    out_ch = width * Bottleneck.expansion
    rest = (Bottleneck(out_ch, width) for _ in range(blocks - 1))
    return nn.Sequential(Bottleneck(in_ch, width, stride), *rest)


class ResNet50(nn.Module):
    """ResNet50 encoder; with `num_classes > 0` a linear head `fc` on global-average-pooled features.

    `num_classes=0` gives a pure encoder whose `forward` returns the pooled 2048-d feature vector.
    `config` (a ModelConfig) is attached by the hub when a model is loaded.
    """

    config: ModelConfig

    def __init__(self, num_classes: int = 0, in_chans: int = 3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = FEATURE_DIM  # timm's name for the width of the pooled feature
        self.conv1 = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = _stage(64, 64, 3, 1)
        self.layer2 = _stage(256, 128, 4, 2)
        self.layer3 = _stage(512, 256, 6, 2)
        self.layer4 = _stage(1024, 512, 3, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc: nn.Module = nn.Linear(FEATURE_DIM, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = stage_feature_info()
        if not self.conv1.weight.is_meta:  # built on the meta device to be loaded with assign=True: no init
            self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    @overload
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        stop_early: bool = False,
        intermediates_only: Literal[False] = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]: ...
    @overload
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        stop_early: bool = False,
        intermediates_only: Literal[True],
    ) -> list[torch.Tensor]: ...
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        stop_early: bool = False,
        intermediates_only: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]] | list[torch.Tensor]:
        """Stage outputs (levels 0..3: strides 4/8/16/32, channels 256/512/1024/2048) chosen by `indices`
        (None: all; n: the last n; a list: those levels), ascending. Returns `(last map, intermediates)` as
        timm does, or the intermediates only; `stop_early` (or `intermediates_only`) skips the stages after
        the deepest level taken, so the "last map" is then that level's output."""
        take = take_indices(len(self.feature_info), indices)
        stages = self.stages()
        if stop_early or intermediates_only:
            stages = stages[: take[-1] + 1]
        x = self.stem(x)
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage map [B, 2048, H/32, W/32] (timm's contract: `forward_head` takes it)."""
        x = self.stem(x)
        for stage in self.stages():
            x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool of the last stage map, then the linear head (identity for an encoder);
        `pre_logits=True` returns the pooled [B, 2048] features without the head."""
        pooled = torch.flatten(self.avgpool(x), 1)
        return pooled if pre_logits else self.fc(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head: a fresh `Linear(2048, num_classes)`, or identity for 0."""
        self.num_classes = num_classes
        self.fc = nn.Linear(FEATURE_DIM, num_classes) if num_classes > 0 else nn.Identity()
