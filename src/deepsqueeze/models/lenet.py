"""LeNet models: LeNet-300-100, the Caffe LeNet-5 of Deep Compression, and LeCun's LeNet-5."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepsqueeze.errors import ModelError
from deepsqueeze.models.registry import register_model, require_positive

__all__ = ["LeNet5", "LeNet5Classic", "LeNet300"]


def _conv_pool_size(size: int, padding: int = 0) -> int:
    """Spatial size after two (5x5 conv, 2x2 max pool) stages."""
    for _ in range(2):
        size = (size + 2 * padding - 4) // 2
        padding = 0
    return size


def _check_size(model: str, input_size: int, padding: int = 0) -> int:
    size = _conv_pool_size(input_size, padding)
    if size < 1:
        raise ModelError(f"model {model!r} option 'input_size' is too small: {input_size}")
    return size


class LeNet300(nn.Module):
    """LeNet-300-100: a 3-layer MLP (fc1 → ReLU → fc2 → ReLU → fc3); input is flattened."""

    def __init__(self, num_classes: int = 10, in_features: int = 784) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class LeNet5(nn.Module):
    """Caffe's LeNet-5 (20-50-500), the variant pruned in Deep Compression.

    conv1 (5x5, 20) → maxpool 2 → conv2 (5x5, 50) → maxpool 2 → fc1 (500) → ReLU → fc2.
    Faithful to Caffe's ``lenet_train_test.prototxt``: there is no ReLU after the convolutions,
    only after fc1.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> None:
        super().__init__()
        size = _check_size("lenet5", input_size)
        self.conv1 = nn.Conv2d(in_channels, 20, kernel_size=5)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.fc1 = nn.Linear(50 * size * size, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.conv1(x), 2)
        x = F.max_pool2d(self.conv2(x), 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


class LeNet5Classic(nn.Module):
    """LeCun et al. 1998 LeNet-5 (6-16-120-84), with ReLU and max pooling.

    conv1 (5x5, 6) → ReLU → maxpool 2 → conv2 (5x5, 16) → ReLU → maxpool 2 →
    fc1 (120) → ReLU → fc2 (84) → ReLU → fc3. Inputs smaller than 32x32 are zero-padded by
    2 in conv1, so 28x28 MNIST gives the paper's 32x32 frame and 5x5 maps before fc1 (400 inputs).
    The full C3 table, subsampling weights and RBF output of the paper are not reproduced.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> None:
        super().__init__()
        padding = 2 if input_size < 32 else 0
        size = _check_size("lenet5-classic", input_size, padding)
        self.conv1 = nn.Conv2d(in_channels, 6, kernel_size=5, padding=padding)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.fc1 = nn.Linear(16 * size * size, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


@register_model(
    "lenet300",
    input_shape=(1, 28, 28),
    description="LeNet-300-100 MLP (Han et al. 2015 / LeCun et al. 1998)",
)
def lenet300(num_classes: int = 10, in_features: int = 784) -> LeNet300:
    """LeNet-300-100; ``in_features`` is C*H*W of the (flattened) input."""
    require_positive("lenet300", num_classes=num_classes, in_features=in_features)
    return LeNet300(num_classes=num_classes, in_features=in_features)


@register_model(
    "lenet5",
    input_shape=(1, 28, 28),
    description="Caffe LeNet-5 (20-50-500), as in Deep Compression (Han et al. 2016)",
)
def lenet5(num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> LeNet5:
    """Caffe LeNet-5; ``input_size`` is the square input side (28 for MNIST, 32 for CIFAR)."""
    require_positive(
        "lenet5", num_classes=num_classes, in_channels=in_channels, input_size=input_size
    )
    return LeNet5(num_classes=num_classes, in_channels=in_channels, input_size=input_size)


@register_model(
    "lenet5-classic",
    input_shape=(1, 28, 28),
    description="LeNet-5 6-16-120-84 with ReLU and max pooling (LeCun et al. 1998)",
)
def lenet5_classic(
    num_classes: int = 10, in_channels: int = 1, input_size: int = 28
) -> LeNet5Classic:
    """LeCun's LeNet-5; inputs under 32x32 are padded by 2 in conv1."""
    require_positive(
        "lenet5-classic", num_classes=num_classes, in_channels=in_channels, input_size=input_size
    )
    return LeNet5Classic(num_classes=num_classes, in_channels=in_channels, input_size=input_size)
