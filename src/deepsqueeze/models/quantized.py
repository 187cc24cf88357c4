"""Quantized layer kinds: ``QuantLinear`` and ``QuantConv2d`` (int8 / int4 weights, uint8 inputs).

A quantized layer stores what an integer kernel consumes:

- ``weight``: the **integer** weight values ``q`` (held as floats; ``|q| <= 2**(bits-1) - 1``,
  symmetric, zero stays zero so pruned weights stay pruned). The codec sees at most 255 distinct
  values and stores them as 8-bit codebook symbols (4-bit for ``bits=4``), or, when the layer is
  pruned, as sparse positions + symbols, Huffman-coded where smaller;
- ``weight_scale`` (``[out]``): the per-output-channel step, ``w ~= q * weight_scale``;
- ``input_scale``, ``input_zero_point`` (``[1]`` each): the per-tensor affine quantization of the
  layer's input to uint8, ``x ~= (clamp(round(x / s) + zp, 0, 255) - zp) * s`` (only used when
  ``activations`` is on);
- ``bias``: fp32, optional.

The forward pass is the exact fake-quantized computation the int8 runtime executes in integers:
``y = linear(fq(x), q * weight_scale) + bias`` (``fq`` rounds half to even, like onnxruntime's
``QuantizeLinear``). Training (QAT) keeps latent fp32 weights behind a parametrization of
``weight`` (:mod:`deepsqueeze.methods.quantize`) whose output is already ``q``; ``save`` bakes it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from deepsqueeze.models.graph import (
    bool_option,
    conv_options,
    int_option,
    register_kind,
)

__all__ = [
    "ACT_QMAX", "REDUCED_QMAX", "QuantConv2d", "QuantLinear", "QuantizedLayer", "affine_qparams",
    "fake_quantize_input", "qmax_of", "round_ste",
]

ACT_QMAX = 255
"""Inputs are quantized to uint8: 0..255."""
REDUCED_QMAX = 127
"""Inputs of a ``reduce_range`` layer: 0..127 (7 bits). On x86 CPUs without VNNI the u8 x s8
integer kernels (oneDNN, fbgemm) add pairs of products in int16 and saturate; with inputs below
128 a pair cannot (2 * 127 * 127 < 32767), so the fast int8 executor is exact. PyTorch's x86
quantization makes the same choice."""
MIN_BITS, MAX_BITS = 2, 8
_MAX_DIM = 1 << 24


def qmax_of(bits: int) -> int:
    """Largest integer weight magnitude at ``bits`` (symmetric: -qmax..qmax, 127 for int8)."""
    return (1 << (bits - 1)) - 1


class QuantizedLayer(nn.Module):
    """What QuantLinear and QuantConv2d share: the scales, input fake quantization, observers."""

    weight: torch.Tensor
    weight_scale: torch.Tensor
    input_scale: torch.Tensor
    input_zero_point: torch.Tensor
    bias: torch.Tensor | None

    def _init_quant(self, out_features: int, bits: int, activations: bool, bias: bool,
                    reduce_range: bool = False) -> None:
        if not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
        self.bits = int(bits)
        self.activations = bool(activations)
        self.reduce_range = bool(reduce_range)
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("input_scale", torch.ones(1))
        self.register_buffer("input_zero_point", torch.zeros(1))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        # observed input range while calibrating / training with observed ranges (not stored)
        self.observing = False
        self.ema: float | None = None  # None: running min/max; else the EMA momentum
        self.observed: tuple[float, float] | None = None
        self.export_int8 = False  # set by the ONNX exporter: weights as int8 + DequantizeLinear

    @property
    def qmax(self) -> int:
        return qmax_of(self.bits)

    @property
    def input_qmax(self) -> int:
        """Largest uint8 input value: 255, or 127 with ``reduce_range``."""
        return REDUCED_QMAX if self.reduce_range else ACT_QMAX

    def scale_view(self) -> torch.Tensor:
        """``weight_scale`` shaped to broadcast over ``weight``."""
        return self.weight_scale.view(-1, *([1] * (self.weight.dim() - 1)))

    def dequantized_weight(self) -> torch.Tensor:
        """``q * weight_scale``: the fp32 weight the layer computes with."""
        return self.weight * self.scale_view()

    def input_qparams(self) -> tuple[float, int]:
        """``(scale, zero_point)`` of the input quantization as Python numbers."""
        return float(self.input_scale), int(self.input_zero_point)

    def set_input_range(self, lo: float, hi: float) -> None:
        """Set the input quantization from a real range (widened to hold 0 exactly)."""
        scale, zp = affine_qparams(lo, hi, self.input_qmax)
        self.input_scale.fill_(scale)
        self.input_zero_point.fill_(zp)

    def _observe(self, x: torch.Tensor) -> None:
        if not x.numel():
            return
        lo, hi = float(x.detach().min()), float(x.detach().max())
        if self.observed is None or self.ema is None:
            if self.observed is not None:
                lo, hi = min(lo, self.observed[0]), max(hi, self.observed[1])
        else:
            m = self.ema
            lo = (1 - m) * self.observed[0] + m * lo
            hi = (1 - m) * self.observed[1] + m * hi
        self.observed = (lo, hi)
        with torch.no_grad():
            self.set_input_range(lo, hi)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` to uint8 (straight-through gradient inside the range)."""
        if self.observing:
            self._observe(x)
        if not self.activations:
            return x
        if torch.onnx.is_in_onnx_export():  # exported as QuantizeLinear + DequantizeLinear
            scale, zp = self.input_qparams()
            return torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, self.input_qmax)
        return fake_quantize_input(x, self.input_scale, self.input_zero_point, self.input_qmax)

    def _weight(self) -> torch.Tensor:
        if self.export_int8 and torch.onnx.is_in_onnx_export():  # int8 weights, per channel
            zero = torch.zeros(self.weight.shape[0], dtype=torch.int32)
            return torch.fake_quantize_per_channel_affine(
                self.dequantized_weight(), self.weight_scale, zero, 0, -128, 127)
        return self.dequantized_weight()

    def integer_weight(self) -> torch.Tensor:
        """The stored integer weights (detached; the parametrized value in training form)."""
        return self.weight.detach()

    def extra_repr(self) -> str:
        reduced = ", reduce_range=True" if self.reduce_range else ""
        return f"bits={self.bits}, activations={self.activations}{reduced}"


class _RoundSTE(torch.autograd.Function):
    """``round`` (half to even) with a straight-through gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity gradient."""
    return _RoundSTE.apply(x)


def fake_quantize_input(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                        qmax: int = ACT_QMAX) -> torch.Tensor:
    """``(clamp(round(x / scale) + zp, 0, qmax) - zp) * scale`` (``qmax`` 255, or 127 with
    ``reduce_range``), as onnxruntime's QuantizeLinear + DequantizeLinear compute it; the
    gradient passes inside the range."""
    q = torch.clamp(round_ste(x / scale) + zero_point, 0, qmax)
    return (q - zero_point) * scale


def affine_qparams(lo: float, hi: float, qmax: int = ACT_QMAX) -> tuple[float, int]:
    """uint8 ``(scale, zero_point)`` for the real range ``[lo, hi]`` widened to hold 0, over
    ``0..qmax``."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo <= 0 or not (abs(lo) < float("inf") and abs(hi) < float("inf")):
        return 1.0, 0
    scale = (hi - lo) / qmax
    zp = round(-lo / scale)
    return scale, min(max(zp, 0), qmax)


class QuantLinear(QuantizedLayer):
    """``nn.Linear`` with integer weights, per-output-channel scales and uint8 inputs."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 8,
                 activations: bool = True, reduce_range: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))
        self._init_quant(out_features, bits, activations, bias, reduce_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self._weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {super().extra_repr()}")


class QuantConv2d(QuantizedLayer):
    """``nn.Conv2d`` (zero padding) with integer weights, per-channel scales, uint8 inputs."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", bits: int = 8, activations: bool = True,
                 reduce_range: bool = False) -> None:
        super().__init__()
        if padding_mode != "zeros":
            raise ValueError(f"QuantConv2d supports padding_mode='zeros' only, not "
                             f"{padding_mode!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels {in_channels} -> {out_channels} are not divisible by "
                             f"groups={groups}")
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size: tuple[int, int] = pair(kernel_size)
        self.stride: tuple[int, int] = pair(stride)
        self.padding: tuple[int, int] = pair(padding)
        self.dilation: tuple[int, int] = pair(dilation)
        self.padding_mode = padding_mode
        self.weight = nn.Parameter(
            torch.zeros(out_channels, in_channels // groups, *self.kernel_size))
        self._init_quant(out_channels, bits, activations, bias, reduce_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.quantize_input(x), self._weight(), self.bias, self.stride,
                        self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, {super().extra_repr()}")


def is_training_form(module: nn.Module) -> bool:
    """Whether ``module``'s weight is parametrized (QAT latent weights behind it)."""
    return parametrize.is_parametrized(module, "weight")


_QUANT = {"bits": int_option(MIN_BITS, MAX_BITS), "activations": bool_option,
          "reduce_range": bool_option}
_ADDED = {"reduce_range": False}  # files written before the option hold 8-bit inputs
register_kind("QuantLinear", QuantLinear, {
    "in_features": int_option(1, _MAX_DIM), "out_features": int_option(1, _MAX_DIM),
    "bias": bool_option, **_QUANT,
}, added=_ADDED)
register_kind("QuantConv2d", QuantConv2d, {**conv_options(2), **_QUANT}, added=_ADDED)
