"""Parameter counts and byte sizes. Sizes of files are always read from disk, never estimated."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

FP32_BYTES = 4


def parameter_count(model: nn.Module) -> int:
    """Number of learnable scalars (weights and biases; BatchNorm affine included)."""
    return sum(p.numel() for p in model.parameters())


def nonzero_count(model: nn.Module) -> int:
    """Number of learnable scalars that are not exactly zero (as the model computes with them)."""
    return sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())


def dense_fp32_bytes(model: nn.Module) -> int:
    """Bytes of the parameters stored densely as fp32: the baseline of every compression ratio."""
    return parameter_count(model) * FP32_BYTES


def file_bytes(path: str | Path) -> int:
    """The real size on disk of ``path``."""
    return Path(path).stat().st_size
