"""CIFAR-style ResNets (He et al. 2016, "Deep Residual Learning", section 4.2).

Depth 6n+2: a 3x3 conv stem with 16 channels, three stages of n BasicBlocks with 16, 32 and 64
channels (stages 2 and 3 start with stride 2), global average pooling and one linear layer.

Downsampling shortcuts use **option B** (1x1 conv + BatchNorm projection). The paper's CIFAR
models use option A (strided identity, zero-padded channels); option B is chosen here because
structured channel pruning must physically remove channels inside residual blocks, and a
projection lets each side of the addition be resized explicitly. Option B adds 2,752 parameters.

Structure, for tools that walk the model::

    conv1, bn1                      stem
    layer1, layer2, layer3          nn.Sequential of BasicBlock
    BasicBlock: conv1, bn1, conv2, bn2, shortcut (nn.Identity or nn.Sequential(conv, bn))
    avgpool, fc                     head

Global average pooling makes the network resolution-agnostic (32x32 CIFAR and 28x28 MNIST both
work). The ``input_size`` option does not change the weights; it records the input side the model
is built for, so ``input_shape_of`` and tools that need a concrete shape (export, benchmarks,
dataset checks) use the right one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepsqueeze.models.registry import register_model, require_positive

__all__ = ["BasicBlock", "ResNet"]


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers plus a shortcut.

    ``out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; the shortcut is a 1x1 conv + BN
    projection where the stride or channel count changes, else the identity.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet with ``blocks_per_stage`` BasicBlocks in each of 3 stages (depth 6n+2)."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, blocks_per_stage, stride=1)
        self.layer2 = self._stage(16, 32, blocks_per_stage, stride=2)
        self.layer3 = self._stage(32, 64, blocks_per_stage, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        self._init_weights()

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def _init_weights(self) -> None:
        """Kaiming (He) normal init for convs and the classifier; BN to identity."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="linear")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def _resnet(name: str, n: int, num_classes: int, in_channels: int, input_size: int) -> ResNet:
    require_positive(name, num_classes=num_classes, in_channels=in_channels, input_size=input_size)
    return ResNet(n, num_classes=num_classes, in_channels=in_channels)


_PAPER = "CIFAR ResNet-{depth}, option-B shortcuts (He et al. 2016)"


@register_model("resnet20", input_shape=(3, 32, 32), description=_PAPER.format(depth=20))
def resnet20(num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> ResNet:
    """ResNet-20 (n=3); ``input_size`` only records the intended input side (see module doc)."""
    return _resnet("resnet20", 3, num_classes, in_channels, input_size)


@register_model("resnet32", input_shape=(3, 32, 32), description=_PAPER.format(depth=32))
def resnet32(num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> ResNet:
    """ResNet-32 (n=5); ``input_size`` only records the intended input side (see module doc)."""
    return _resnet("resnet32", 5, num_classes, in_channels, input_size)


@register_model("resnet44", input_shape=(3, 32, 32), description=_PAPER.format(depth=44))
def resnet44(num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> ResNet:
    """ResNet-44 (n=7); ``input_size`` only records the intended input side (see module doc)."""
    return _resnet("resnet44", 7, num_classes, in_channels, input_size)


@register_model("resnet56", input_shape=(3, 32, 32), description=_PAPER.format(depth=56))
def resnet56(num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> ResNet:
    """ResNet-56 (n=9); ``input_size`` only records the intended input side (see module doc)."""
    return _resnet("resnet56", 9, num_classes, in_channels, input_size)
