"""Multiply-accumulate counts per sample, measured by running one forward pass with hooks."""

from __future__ import annotations

from typing import Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from deepsqueeze.models.graph import KINDS

ExampleInputs = Union[torch.Tensor, tuple[torch.Tensor, ...]]  # noqa: UP007 (a runtime alias)


def _pair(k: int | tuple[int, ...]) -> tuple[int, ...]:
    return k if isinstance(k, tuple) else tuple(k) if isinstance(k, list) else (k,)


def _dense_kind(mod: nn.Module) -> bool:
    """A registered layer kind computing one dense-equivalent Linear or Conv (no such child)."""
    cls = type(mod).__bases__[0] if parametrize.is_parametrized(mod) else type(mod)
    if cls not in {k.cls for k in KINDS.values()}:
        return False
    if any(isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) for m in mod.modules()):
        return False
    return (hasattr(mod, "in_features") and hasattr(mod, "out_features")) or all(
        hasattr(mod, a) for a in ("in_channels", "kernel_size"))


def first_sample(example_inputs: ExampleInputs) -> tuple[torch.Tensor, ...]:
    """The first sample of each input (batch dimension kept: shape ``(1, ...)``)."""
    xs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    return tuple(x[:1] if x.dim() else x for x in xs)


@torch.inference_mode()
def macs_per_sample(
    model: nn.Module,
    input_shape: tuple[int, ...] | None = None,
    *,
    example_inputs: ExampleInputs | None = None,
) -> int:
    """MACs of one forward pass of a single sample through conv and linear layers.

    The sample is a zero tensor of ``input_shape`` (no batch dimension, e.g. (C, H, W) or
    (features,)), or the first sample of ``example_inputs`` (a tensor or a tuple of tensors, batch
    dimension first: any shape, any number of inputs, integer token ids included).

    Convolutions (1-D and 2-D) count ``out_elements × in_channels/groups × kernel elements``;
    linear layers count ``in_features × out_features`` per position. A compressed layer kind
    (binary, hashed, quantized, circulant...) without Linear/Conv children counts as the dense
    layer it stands for (a low-rank kind's factors are counted as the layers they are).
    Embedding lookups, elementwise ops, pooling and normalization are not counted (the usual
    convention of the papers this project compares to).
    """
    if (input_shape is None) == (example_inputs is None):
        raise ValueError("give exactly one of input_shape and example_inputs")
    total = 0

    def conv_hook(mod: nn.Module, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        kernel = 1
        for k in _pair(mod.kernel_size):
            kernel *= k
        total += out[0].numel() * (mod.in_channels // getattr(mod, "groups", 1)) * kernel

    def linear_hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        nonlocal total
        rows = inp[0][0].numel() // mod.in_features  # 1 unless applied per position
        total += rows * mod.in_features * mod.out_features

    handles = []
    for mod in model.modules():
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            handles.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, nn.Linear):
            handles.append(mod.register_forward_hook(linear_hook))
        elif _dense_kind(mod):
            linear = hasattr(mod, "in_features") and hasattr(mod, "out_features")
            handles.append(mod.register_forward_hook(linear_hook if linear else conv_hook))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters(), torch.empty(0)).device
        if example_inputs is not None:
            xs = tuple(x.to(device) for x in first_sample(example_inputs))
        else:
            assert input_shape is not None
            xs = (torch.zeros(1, *input_shape, device=device),)
        model(*xs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total
