"""Multiply-accumulate counts per sample, measured by running one forward pass with hooks."""

from __future__ import annotations

import torch
from torch import nn


@torch.inference_mode()
def macs_per_sample(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """MACs of one forward pass of a single sample of shape (C,H,W) through conv and linear layers.

    Convolutions count ``out_elements × in_channels/groups × kh × kw``; linear layers count
    ``in_features × out_features``. Elementwise ops, pooling and normalization are not counted
    (the usual convention of the papers this project compares to).
    """
    total = 0

    def conv_hook(mod: nn.Conv2d, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = mod.kernel_size
        total += out[0].numel() * (mod.in_channels // mod.groups) * kh * kw

    def linear_hook(mod: nn.Linear, inp: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        nonlocal total
        rows = inp[0][0].numel() // mod.in_features  # 1 unless applied per position
        total += rows * mod.in_features * mod.out_features

    handles = []
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            handles.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, nn.Linear):
            handles.append(mod.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters(), torch.empty(0)).device
        model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total
