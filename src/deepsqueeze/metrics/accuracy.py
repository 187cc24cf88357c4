"""Top-1 accuracy and mean cross-entropy of a classifier on a dataset."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class AccuracyResult:
    """Top-1 accuracy (fraction), mean cross-entropy loss and the number of samples."""

    accuracy: float
    loss: float
    samples: int


@torch.inference_mode()
def accuracy_and_loss(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 1000,
    autocast_dtype: torch.dtype | None = None,
) -> AccuracyResult:
    """Evaluate ``model`` on normalized ``inputs`` (N×C×H×W) in eval mode, batch by batch."""
    was_training = model.training
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    correct, loss_sum = 0, 0.0
    try:
        for start in range(0, len(labels), batch_size):
            x = inputs[start : start + batch_size].to(device, non_blocking=True)
            y = labels[start : start + batch_size].to(device, non_blocking=True)
            with torch.autocast(
                device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
            ):
                logits = model(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
    finally:
        model.train(was_training)
    n = len(labels)
    return AccuracyResult(accuracy=correct / max(n, 1), loss=loss_sum / max(n, 1), samples=n)
