"""A small MobileNet v1-style network (Howard et al. 2017) for 32x32 and 28x28 inputs.

Stem 3x3 conv (32, stride 1) → five depthwise-separable blocks
32→64 → 128 (stride 2) → 128 → 256 (stride 2) → 256 → global average pooling → fc.
Every conv is followed by BatchNorm and ReLU. ``width_mult`` scales all channel counts
(rounded to a multiple of 8, at least 8). Global average pooling makes it resolution-agnostic;
``input_size`` does not change the weights, it records the input side the model is built for
(used by ``input_shape_of``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepsqueeze.models.registry import register_model, require_positive

__all__ = ["DepthwiseSeparable", "MobileNetTiny"]

# (output channels, stride) of each depthwise-separable block, before width_mult.
_BLOCKS: tuple[tuple[int, int], ...] = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1))
_STEM = 32


def _scaled(channels: int, width_mult: float) -> int:
    return max(8, round(channels * width_mult / 8) * 8)


class DepthwiseSeparable(nn.Module):
    """Depthwise 3x3 conv (conv_dw, bn_dw, ReLU) then pointwise 1x1 conv (conv_pw, bn_pw, ReLU)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(
            in_planes, in_planes, 3, stride=stride, padding=1, groups=in_planes, bias=False
        )
        self.bn_dw = nn.BatchNorm2d(in_planes)
        self.conv_pw = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn_pw = nn.BatchNorm2d(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn_dw(self.conv_dw(x)))
        return F.relu(self.bn_pw(self.conv_pw(x)))


class MobileNetTiny(nn.Module):
    """Stem (conv1, bn1) → ``blocks`` (nn.Sequential of DepthwiseSeparable) → avgpool → fc."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0):
        super().__init__()
        stem = _scaled(_STEM, width_mult)
        self.conv1 = nn.Conv2d(in_channels, stem, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        blocks, planes = [], stem
        for out, stride in _BLOCKS:
            blocks.append(DepthwiseSeparable(planes, _scaled(out, width_mult), stride))
            planes = _scaled(out, width_mult)
        self.blocks = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.blocks(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model(
    "mobilenet-tiny",
    input_shape=(3, 32, 32),
    description="Small MobileNet v1-style depthwise-separable CNN (Howard et al. 2017)",
)
def mobilenet_tiny(
    num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, input_size: int = 32
) -> MobileNetTiny:
    """MobileNet-tiny; ``width_mult`` scales every channel count."""
    require_positive(
        "mobilenet-tiny",
        num_classes=num_classes,
        in_channels=in_channels,
        width_mult=width_mult,
        input_size=input_size,
    )
    return MobileNetTiny(num_classes=num_classes, in_channels=in_channels, width_mult=width_mult)
