"""Executors of the binary layer kinds (BinaryLinear, BinaryConv2d): +-1 weights packed in bits.

The file stores a binary layer's weight as +-1 values (1 bit each through the codec's 2-entry
codebook), its per-channel scale and bias as float32. At load the reader checks every value is
exactly +-1 and packs the signs 64 to a ``uint64`` word per row (bit set = -1), padding bits
clear: 1 bit per weight in memory, as in the file.

==========  ===============================================================  ================
impl        how it runs                                                      weights held
==========  ===============================================================  ================
``xnor``    C (``csrc/binary.c``): the input's signs packed per row, then    packed bits
            ``cols - 2 popcount(x ^ w)`` per output (binary-input layers;
            conv: ``F.unfold`` then the same product, zero padding only)
``select``  C: real inputs; per 8 input columns a table of the 256 signed   packed bits
            sums, indexed by the weight bytes (binary weights, real inputs)
``torch``   the +-1 weight decoded once as fp32; ``F.linear`` /             dense fp32
            ``F.conv2d`` (no compiler needed)
==========  ===============================================================  ================

All compute ``scale * dot + bias`` (scale and bias optional) and agree with the layer's own
forward: ``xnor`` exactly up to the last rounding of scale and bias, ``select`` within float
summation order. The C calls split the output rows over ``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deepsqueeze.errors import DsqFormatError, RuntimeInputError
from deepsqueeze.models.binary import BinaryConv2d, BinaryLinear, sign
from deepsqueeze.runtime.forms import LayerForm, register_layer_form, stored_floats
from deepsqueeze.runtime.kernel import check_rc, get_kernel
from deepsqueeze.runtime.layers import ConvGeometry, Impl, RuntimeLayer, _ConvBase, register_impl

if TYPE_CHECKING:
    from deepsqueeze.dsq import StoredModel

__all__ = [
    "BinaryForm",
    "BinaryKernelConv2d",
    "BinaryKernelLinear",
    "BinaryTorchConv2d",
    "BinaryTorchLinear",
    "binary_product",
    "binary_xnor_conv2d",
    "pack_signs",
    "read_binary",
    "unpack_signs",
]

_F32 = torch.float32
MAX_THREADS = 64


def words_per_row(cols: int) -> int:
    """64-bit words per packed row of ``cols`` signs."""
    return (cols + 63) // 64


def pack_signs(w: torch.Tensor) -> torch.Tensor:
    """Signs of a ``[rows, ...]`` tensor packed per row: int64 ``[rows * ceil(cols / 64)]``
    words holding the uint64 bits (bit ``j`` of word ``k`` = column ``64 k + j``, set where
    ``!(w >= 0)``), padding bits clear."""
    rows = w.shape[0]
    neg = ~(w.detach().cpu().reshape(rows, -1).numpy() >= 0)
    cols = neg.shape[1]
    nw = words_per_row(cols)
    padded = np.zeros((rows, nw * 64), dtype=bool)
    padded[:, :cols] = neg
    packed = np.packbits(padded, axis=1, bitorder="little")  # rows x 8 nw bytes
    words = np.ascontiguousarray(packed).view("<u8").view(np.int64).reshape(-1)
    return torch.from_numpy(words.copy())


def unpack_signs(bits: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The ``[rows, cols]`` float32 +-1 matrix of :func:`pack_signs` words."""
    nw = words_per_row(cols)
    raw = bits.detach().cpu().numpy().astype("<i8").view(np.uint8).reshape(rows, nw * 8)
    neg = np.unpackbits(raw, axis=1, bitorder="little")[:, :cols].astype(bool)
    return torch.from_numpy(np.where(neg, np.float32(-1), np.float32(1)))


@dataclass(frozen=True)
class BinaryForm:
    """A binary layer from the file: ``rows`` x ``cols`` packed signs, scales (or None)."""

    rows: int
    cols: int
    bits: torch.Tensor  # int64 [rows * words_per_row(cols)]
    scale: torch.Tensor | None  # float32 [rows]
    binary_input: bool

    def weight(self) -> torch.Tensor:
        """The ``[rows, cols]`` fp32 +-1 matrix."""
        return unpack_signs(self.bits, self.rows, self.cols)


def read_binary(name: str, module: nn.Module, stored: StoredModel) -> LayerForm:
    """The :class:`BinaryForm` of a BinaryLinear / BinaryConv2d: its weight checked to hold only
    +-1 and packed, its scale and bias checked against the layer's (already checked) options."""
    assert isinstance(module, (BinaryLinear, BinaryConv2d))
    what = f"binary layer {name!r}"
    shape = list(module.weight.shape)
    rows, cols = shape[0], math.prod(shape[1:])
    w = stored_floats(stored, f"{name}.weight", rows * cols, what)
    bad = int(((w != 1) & (w != -1)).sum())
    if bad:
        raise DsqFormatError(f"{stored.source}: {what}: the weight holds {bad} values other "
                             "than -1 and +1")
    scale = None
    tensors = [f"{name}.weight"]
    if module.scaled:
        scale = stored_floats(stored, f"{name}.weight_scale", rows, what)
        tensors.append(f"{name}.weight_scale")
    elif f"{name}.weight_scale" in stored.entries:
        raise DsqFormatError(f"{stored.source}: {what} is not scaled but the file stores scales")
    bias = None
    if getattr(module, "bias", None) is not None:
        bias = stored_floats(stored, f"{name}.bias", rows, what)
        tensors.append(f"{name}.bias")
    elif f"{name}.bias" in stored.entries:
        raise DsqFormatError(f"{stored.source}: {what} has no bias but the file stores one")
    form = BinaryForm(rows, cols, pack_signs(w.view(rows, cols)), scale, module.binary_input)
    return LayerForm(form, bias, tensors, shape, "binary", rows * cols, 1.0)


register_layer_form(BinaryLinear, read_binary)
register_layer_form(BinaryConv2d, read_binary)


# ------------------------------------------------------------------------------ C entry points

_i64, _vp = ctypes.c_int64, ctypes.c_void_p
_PRODUCT_ARGS = [_vp, _i64, _i64, _i64, _vp, _i64, _vp, _i64, _vp, _i64, _vp, _i64, _i64, _i64]
_ENTRY = {"xnor": "dsq_binary_xnor_linear", "select": "dsq_binary_select_linear",
          "xnor-conv": "dsq_binary_xnor_conv2d"}


def _c_function(mode: str) -> Any:
    k = get_kernel()
    return None if k is None else k.function(_ENTRY[mode], _PRODUCT_ARGS)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def binary_product(mode: str, bits: torch.Tensor, rows: int, cols: int,
                   scale: torch.Tensor | None, bias: torch.Tensor | None, x: torch.Tensor,
                   threads: int | None = None, who: str = "binary layer") -> torch.Tensor:
    """``[n, rows]`` = the C product of ``[n, cols]`` contiguous float32 ``x`` with packed
    +-1 weights ``bits``: ``mode`` ``"xnor"`` (x binarized) or ``"select"`` (x real); then
    ``scale * dot + bias``. :class:`RuntimeInputError` without the kernel or on bad arguments
    (the kernel checks every count and length again)."""
    fn = _c_function(mode) if mode in _ENTRY else None
    if fn is None:
        raise RuntimeInputError(f"{who}: the C kernel is not available (no C compiler, or "
                                f"DEEPSQUEEZE_KERNEL=0), or unknown mode {mode!r}")
    for t in (bits, scale, bias, x):
        if t is not None and (not t.is_cpu or not t.is_contiguous()):
            raise RuntimeInputError(f"{who}: every tensor must be contiguous on the CPU")
    if bits.dtype != torch.int64 or x.dtype != _F32 or x.dim() != 2 or any(
            t is not None and t.dtype != _F32 for t in (scale, bias)):
        raise RuntimeInputError(f"{who}: expected int64 words, float32 scale/bias and a 2-D "
                                "float32 input")
    n = x.shape[0]
    t = torch.get_num_threads() if threads is None else int(threads)
    y = torch.empty(n, rows, dtype=_F32)
    rc = fn(bits.data_ptr(), bits.numel(), rows, cols, _ptr(scale),
            0 if scale is None else scale.numel(), _ptr(bias), 0 if bias is None else bias.numel(),
            x.data_ptr(), x.numel(), y.data_ptr(), y.numel(), n, max(1, min(MAX_THREADS, t)))
    if rc:
        check_rc(rc, who)
    return y


def binary_xnor_conv2d(bits: torch.Tensor, geometry: ConvGeometry, scale: torch.Tensor | None,
                      bias: torch.Tensor | None, x: torch.Tensor, threads: int | None = None,
                      who: str = "binary conv") -> torch.Tensor:
    """The C XNOR convolution of a ``[N, C, H, W]`` contiguous float32 ``x`` (binarized) with
    packed +-1 weights (zero padding 0, groups 1): ``[N, O, OH, OW]``, ``scale * dot + bias``
    per channel. :class:`RuntimeInputError` without the kernel or on bad arguments."""
    fn = _c_function("xnor-conv")
    if fn is None:
        raise RuntimeInputError(f"{who}: the C kernel is not available")
    g = geometry
    if g.groups != 1 or tuple(g.padding) != (0, 0):
        raise RuntimeInputError(f"{who}: the XNOR convolution needs groups 1 and padding 0")
    for t in (bits, scale, bias, x):
        if t is not None and (not t.is_cpu or not t.is_contiguous()):
            raise RuntimeInputError(f"{who}: every tensor must be contiguous on the CPU")
    if bits.dtype != torch.int64 or x.dtype != _F32 or x.dim() != 4 or any(
            t is not None and t.dtype != _F32 for t in (scale, bias)):
        raise RuntimeInputError(f"{who}: expected int64 words, float32 scale/bias and a 4-D "
                                "float32 input")
    n, c, h, w = x.shape
    oh, ow = g.out_size(h, w)
    if oh < 1 or ow < 1:
        raise RuntimeInputError(f"{who}: input plane {h}x{w} is smaller than the kernel")
    vec = torch.tensor([c, h, w, g.out_channels, *g.kernel_size, *g.stride, *g.dilation, oh,
                        ow], dtype=torch.int64)
    y = torch.empty(n, g.out_channels, oh, ow, dtype=_F32)
    t = torch.get_num_threads() if threads is None else int(threads)
    rc = fn(bits.data_ptr(), bits.numel(), vec.data_ptr(), vec.numel(), _ptr(scale),
            0 if scale is None else scale.numel(), _ptr(bias), 0 if bias is None else bias.numel(),
            x.data_ptr(), x.numel(), y.data_ptr(), y.numel(), n, max(1, min(MAX_THREADS, t)))
    if rc:
        check_rc(rc, who)
    return y


class _Held:
    """Buffers of packed bits, scale and bias, checked before each C call."""

    bits: torch.Tensor
    weight_scale: torch.Tensor | None
    bias: torch.Tensor | None

    def _hold(self, form: BinaryForm, bias: torch.Tensor | None) -> None:
        module: Any = self
        module.register_buffer("bits", form.bits.detach().to(torch.int64).contiguous(),
                               persistent=False)
        module.register_buffer("weight_scale", None if form.scale is None else
                               form.scale.detach().to(_F32).contiguous(), persistent=False)
        module.register_buffer("bias", None if bias is None else
                               bias.detach().to(_F32).contiguous(), persistent=False)
        self.rows, self.cols = form.rows, form.cols

    def _product(self, mode: str, x: torch.Tensor) -> torch.Tensor:
        return binary_product(mode, self.bits, self.rows, self.cols, self.weight_scale,
                              self.bias, x, who=self.who())  # type: ignore[attr-defined]


def _finish(y: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None,
            view: tuple[int, ...]) -> torch.Tensor:
    if scale is not None:
        y = y * scale.view(view)
    if bias is not None:
        y = y + bias.view(view)
    return y


# ------------------------------------------------------------------------------ Linear


class BinaryKernelLinear(_Held, RuntimeLayer):
    """A BinaryLinear by the C kernel on packed bits (``xnor`` or ``select``)."""

    def __init__(self, form: BinaryForm, bias: torch.Tensor | None, mode: str) -> None:
        super().__init__()
        self._hold(form, bias)
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_input(x, self.cols)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.cols)
        if x2.shape[0] == 0:
            return torch.empty(*lead, self.rows)
        return self._product(self.mode, x2).reshape(*lead, self.rows)


class BinaryTorchLinear(RuntimeLayer):
    """A BinaryLinear with its +-1 weight decoded once to fp32 (runs without a compiler)."""

    def __init__(self, form: BinaryForm, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.rows, self.cols, self.binary_input = form.rows, form.cols, form.binary_input
        self.register_buffer("weight", form.weight(), persistent=False)
        self.register_buffer("weight_scale", form.scale, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_input(x, self.cols)
        if self.binary_input:
            x = sign(x)
        return _finish(F.linear(x, self.weight), self.weight_scale, self.bias, (-1,))


# ------------------------------------------------------------------------------ Conv2d


def _geometry(module: nn.Module) -> ConvGeometry:
    assert isinstance(module, BinaryConv2d)
    return ConvGeometry(module.in_channels, module.out_channels, module.kernel_size,
                        module.stride, module.padding, module.dilation, module.groups)


class BinaryKernelConv2d(_Held, _ConvBase):
    """A BinaryConv2d (groups = 1) by the C kernel on packed bits: ``xnor`` (binary inputs,
    zero padding 0: a padded zero has no sign) gathers each patch's bits straight from the
    packed input rows; ``select`` runs ``F.unfold`` and the sign-select product."""

    def __init__(self, form: BinaryForm, bias: torch.Tensor | None, geometry: ConvGeometry,
                 mode: str) -> None:
        _ConvBase.__init__(self, geometry, None)
        self._hold(form, bias)
        self.mode, self.binary_input = mode, form.binary_input

    def run(self, x: torch.Tensor, oh: int, ow: int) -> torch.Tensor:
        if self.mode == "xnor":  # patches gathered as bits in C, no im2col
            return binary_xnor_conv2d(self.bits, self.geometry, self.weight_scale, self.bias, x,
                                      who=self.who())
        if self.binary_input:
            x = sign(x)  # binarized before the zero padding, as the layer does
        cols = self._unfold(x)  # [N, C*kh*kw, L]
        n, ckk, positions = cols.shape
        flat = cols.transpose(1, 2).reshape(n * positions, ckk)
        y = self._product(self.mode, flat.contiguous())
        return y.view(n, positions, self.rows).transpose(1, 2).reshape(n, self.rows, oh, ow)


class BinaryTorchConv2d(_ConvBase):
    """A BinaryConv2d with its +-1 weight decoded once to fp32 (runs without a compiler)."""

    def __init__(self, form: BinaryForm, bias: torch.Tensor | None,
                 geometry: ConvGeometry) -> None:
        super().__init__(geometry, bias)
        self.binary_input = form.binary_input
        self.register_buffer("weight", form.weight().view(geometry.weight_shape).contiguous(),
                             persistent=False)
        self.register_buffer("weight_scale", form.scale, persistent=False)

    def run(self, x: torch.Tensor, oh: int, ow: int) -> torch.Tensor:
        if self.binary_input:
            x = sign(x)
        g = self.geometry
        y = F.conv2d(x, self.weight, None, g.stride, g.padding, g.dilation, g.groups)
        return _finish(y, self.weight_scale, self.bias, (-1, 1, 1))


# ------------------------------------------------------------------------------ registry


def _is_form(form: Any) -> bool:
    return isinstance(form, BinaryForm)


def _kernel(form: Any) -> bool:
    return _is_form(form) and get_kernel() is not None


def _conv_c(form: Any, module: nn.Module) -> bool:
    return _kernel(form) and isinstance(module, BinaryConv2d) and module.groups == 1


for _mode, _ok in (("xnor", lambda f: f.binary_input), ("select", lambda f: not f.binary_input)):
    register_impl(BinaryLinear, Impl(
        _mode, lambda f, b, m, mode=_mode: BinaryKernelLinear(f, b, mode),
        lambda f, m, ok=_ok: _kernel(f) and ok(f), True))
register_impl(BinaryLinear, Impl("torch", lambda f, b, m: BinaryTorchLinear(f, b),
                                 lambda f, m: _is_form(f), False))
register_impl(BinaryConv2d, Impl(
    "xnor", lambda f, b, m: BinaryKernelConv2d(f, b, _geometry(m), "xnor"),
    lambda f, m: _conv_c(f, m) and f.binary_input and tuple(m.padding) == (0, 0), True))
register_impl(BinaryConv2d, Impl(
    "select", lambda f, b, m: BinaryKernelConv2d(f, b, _geometry(m), "select"),
    lambda f, m: _conv_c(f, m), True))
register_impl(BinaryConv2d, Impl(
    "torch", lambda f, b, m: BinaryTorchConv2d(f, b, _geometry(m)),
    lambda f, m: _is_form(f), False))
