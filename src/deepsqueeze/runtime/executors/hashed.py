"""Executors of the hashed (HashedNets) and circulant layer kinds.

A hashed layer's file form is its buckets (and bias); the index is regenerated from the seed.

=========  ==================================================================  ===============
impl       how it runs                                                         weights held
=========  ==================================================================  ===============
kernel     C (``csrc/hashed.c``): hashes tiles of 8 rows × 256 columns on      buckets (~file)
           the fly into a stack buffer and applies them to the batch; no
           index array, no dense matrix (HashedLinear)
tiles      torch: the index of a block of rows regenerated per call (torch     buckets (~file)
           xxHash32), a block GEMM; offered only without a C compiler
densify    the dense virtual matrix written on each call (C, torch without     buckets (~file)
           it), then ``F.linear`` / ``F.conv2d``; freed after the call
dense      the dense virtual matrix decoded once                               dense fp32
fft        CirculantLinear: ``irfft(rfft(r) · rfft(D x))``; ToeplitzLinear:     r (t) + signs
           the same through the ``out + in`` circulant that embeds ``T``
dense      CirculantLinear / ToeplitzLinear: the explicit matrix               dense fp32
=========  ==================================================================  ===============

The readers check every stored tensor of the kind against the module's (already checked)
options -- the bucket count, the circulant blocks, the bias length -- and raise
:class:`~deepsqueeze.errors.DsqFormatError` otherwise; the executors check their inputs before
any C call (:class:`~deepsqueeze.errors.RuntimeInputError`).
"""

from __future__ import annotations

import ctypes
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from deepsqueeze.errors import DsqFormatError, RuntimeInputError
from deepsqueeze.models.hashed import (
    CirculantLinear,
    HashedConv2d,
    HashedLinear,
    ToeplitzLinear,
    circulant_matrix,
    hash_index,
    input_signs,
    toeplitz_fft_size,
    toeplitz_matrix,
)
from deepsqueeze.runtime.forms import LayerForm, register_layer_form, stored_floats
from deepsqueeze.runtime.kernel import check_rc, get_kernel
from deepsqueeze.runtime.layers import (
    ConvGeometry,
    Impl,
    RuntimeLayer,
    _ConvBase,
    register_impl,
)

if TYPE_CHECKING:
    from deepsqueeze.dsq import StoredModel

__all__ = ["CirculantForm", "HashedForm", "hashed_densify", "read_circulant", "read_hashed",
           "read_toeplitz"]

_F32 = torch.float32
TILE_WEIGHTS = 1 << 16
"""Virtual weights regenerated per block by the ``tiles`` executor (512 KiB of index)."""


@dataclass(frozen=True)
class HashedForm:
    """A hashed layer from the file: ``[rows, cols]`` virtual matrix, its buckets and seed."""

    rows: int
    cols: int
    buckets: torch.Tensor
    seed: int


@dataclass(frozen=True)
class CirculantForm:
    """A circulant layer from the file: ``weight`` ``[blocks, n]``, ``out`` rows, ``seed``;
    or (``structure="toeplitz"``) a Toeplitz layer: ``weight`` ``[out + n - 1]``."""

    in_features: int
    out_features: int
    weight: torch.Tensor
    seed: int
    structure: str = "circulant"


def _bias(stored: StoredModel, name: str, module: nn.Module, rows: int) -> torch.Tensor | None:
    if getattr(module, "bias", None) is None:
        if f"{name}.bias" in stored.entries:
            raise DsqFormatError(f"{stored.source}: layer {name!r} has no bias but the file "
                                 "stores one")
        return None
    return stored_floats(stored, f"{name}.bias", rows, f"layer {name!r}")


def read_hashed(name: str, module: nn.Module, stored: StoredModel) -> LayerForm:
    """The :class:`HashedForm` of a HashedLinear / HashedConv2d (``{name}.weight_buckets``)."""
    assert isinstance(module, (HashedLinear, HashedConv2d))
    key = f"{name}.weight_buckets"
    buckets = stored_floats(stored, key, module.buckets, f"hashed layer {name!r}")
    bias = _bias(stored, name, module, module.rows)
    shape = (list(module.weight_shape) if isinstance(module, HashedConv2d)
             else [module.rows, module.cols])
    form = HashedForm(module.rows, module.cols, buckets, module.seed)
    tensors = [key, *([f"{name}.bias"] if bias is not None else [])]
    return LayerForm(form, bias, tensors, shape, "hashed", module.buckets,
                     module.buckets / (module.rows * module.cols))


def read_circulant(name: str, module: nn.Module, stored: StoredModel) -> LayerForm:
    """The :class:`CirculantForm` of a CirculantLinear (``{name}.weight``, ``[blocks, n]``)."""
    assert isinstance(module, CirculantLinear)
    n, blocks = module.in_features, module.blocks
    weight = stored_floats(stored, f"{name}.weight", blocks * n, f"circulant layer {name!r}")
    bias = _bias(stored, name, module, module.out_features)
    form = CirculantForm(n, module.out_features, weight.view(blocks, n), module.seed)
    tensors = [f"{name}.weight", *([f"{name}.bias"] if bias is not None else [])]
    return LayerForm(form, bias, tensors, [module.out_features, n], "circulant", blocks * n,
                     blocks * n / (module.out_features * n))


def read_toeplitz(name: str, module: nn.Module, stored: StoredModel) -> LayerForm:
    """The Toeplitz :class:`CirculantForm` of a ToeplitzLinear (``{name}.weight``,
    ``[out + in - 1]``)."""
    assert isinstance(module, ToeplitzLinear)
    n, d = module.in_features, module.out_features
    weight = stored_floats(stored, f"{name}.weight", d + n - 1, f"Toeplitz layer {name!r}")
    bias = _bias(stored, name, module, d)
    form = CirculantForm(n, d, weight, module.seed, "toeplitz")
    tensors = [f"{name}.weight", *([f"{name}.bias"] if bias is not None else [])]
    return LayerForm(form, bias, tensors, [d, n], "toeplitz", d + n - 1, (d + n - 1) / (d * n))


# ------------------------------------------------------------------------------ C entry points

_i64, _vp = ctypes.c_int64, ctypes.c_void_p
_LINEAR_ARGS = [_i64, _i64, _vp, _i64, _i64, _vp, _vp, _i64, _vp, _i64, _i64]
_DENSIFY_ARGS = [_i64, _i64, _vp, _i64, _i64, _vp, _i64]


def _c_function(name: str, argtypes: list[Any]) -> Any:
    k = get_kernel()
    return None if k is None else k.function(name, argtypes)


def _torch_densify(rows: int, cols: int, buckets: torch.Tensor, seed: int,
                   r0: int = 0, r1: int | None = None) -> torch.Tensor:
    r1 = rows if r1 is None else r1
    i = torch.arange(r0, r1, device=buckets.device).unsqueeze(1)
    j = torch.arange(cols, device=buckets.device).unsqueeze(0)
    idx, sign = hash_index(i, j, buckets.numel(), seed)
    return buckets[idx] * sign.to(buckets.dtype)


def hashed_densify(form: HashedForm, who: str = "hashed layer") -> torch.Tensor:
    """The dense ``[rows, cols]`` virtual matrix (C kernel when available, else torch)."""
    fn = _c_function("dsq_hashed_densify", _DENSIFY_ARGS)
    if fn is None:
        return _torch_densify(form.rows, form.cols, form.buckets, form.seed)
    out = torch.empty(form.rows, form.cols, dtype=_F32)
    b = form.buckets
    check_rc(fn(form.rows, form.cols, b.data_ptr(), b.numel(), form.seed, out.data_ptr(),
                out.numel()), who)
    return out


# ------------------------------------------------------------------------------ hashed Linear


class _HashedBase(RuntimeLayer, ABC):
    """Holds the buckets (and bias) as buffers; checks them before a C call."""

    def __init__(self, form: HashedForm, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.rows, self.cols, self.seed = form.rows, form.cols, form.seed
        self.register_buffer("buckets", form.buckets.detach().to(_F32).contiguous(),
                             persistent=False)
        self.register_buffer("bias", None if bias is None else
                             bias.detach().to(_F32).contiguous(), persistent=False)

    def _held_ok(self) -> None:
        for t in (self.buckets, self.bias):
            if t is not None and (t.dtype != _F32 or not t.is_cpu or not t.is_contiguous()):
                raise RuntimeInputError(f"{self.who()}: holds {t.dtype} on {t.device}; runtime "
                                        "layers keep contiguous CPU float32 buffers")

    def form(self) -> HashedForm:
        return HashedForm(self.rows, self.cols, self.buckets, self.seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_input(x, self.cols)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.cols)
        if x2.shape[0] == 0:
            return torch.empty(*lead, self.rows)
        self._held_ok()
        return self.run(x2).reshape(*lead, self.rows)

    @abstractmethod
    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The layer on a checked, non-empty ``[rows, cols]`` float32 ``x``."""


class HashedKernelLinear(_HashedBase):
    """The C kernel: tiles of the index hashed on the fly, nothing but the buckets held."""

    impl = "kernel"

    def __init__(self, form: HashedForm, bias: torch.Tensor | None) -> None:
        super().__init__(form, bias)
        fn = _c_function("dsq_hashed_linear", _LINEAR_ARGS)
        if fn is None:
            raise RuntimeInputError("the hashed C kernel is not available (no C compiler)")
        self._fn = fn

    def run(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        y = torch.empty(n, self.rows)
        b = self.bias
        check_rc(self._fn(self.rows, self.cols, self.buckets.data_ptr(), self.buckets.numel(),
                          self.seed, None if b is None else b.data_ptr(), x.data_ptr(),
                          x.numel(), y.data_ptr(), y.numel(), n), self.who())
        return y


class HashedTilesLinear(_HashedBase):
    """torch: the index of :data:`TILE_WEIGHTS` virtual weights at a time, a GEMM per block."""

    impl = "tiles"

    def run(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.empty(x.shape[0], self.rows)
        step = max(1, TILE_WEIGHTS // self.cols)
        for r0 in range(0, self.rows, step):
            r1 = min(self.rows, r0 + step)
            w = _torch_densify(self.rows, self.cols, self.buckets, self.seed, r0, r1)
            torch.mm(x, w.t(), out=y[:, r0:r1])
        if self.bias is not None:
            y += self.bias
        return y


class HashedDensifyLinear(_HashedBase):
    """The dense virtual matrix written on each call (then freed), ``F.linear``."""

    impl = "densify"

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, hashed_densify(self.form(), self.who()), self.bias)


class HashedDenseLinear(RuntimeLayer):
    """The dense virtual matrix decoded once."""

    impl = "dense"

    def __init__(self, form: HashedForm, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.rows, self.cols = form.rows, form.cols
        self.register_buffer("weight", hashed_densify(form), persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.linear_input(x, self.cols), self.weight, self.bias)


# ------------------------------------------------------------------------------ hashed Conv2d


def _geometry(module: nn.Module) -> ConvGeometry:
    assert isinstance(module, HashedConv2d)
    return ConvGeometry(module.in_channels, module.out_channels, module.kernel_size,
                        module.stride, module.padding, module.dilation, module.groups)


class HashedDensifyConv2d(_ConvBase):
    """The dense filter bank written on each call from the buckets, ``F.conv2d``."""

    impl = "densify"

    def __init__(self, form: HashedForm, bias: torch.Tensor | None,
                 geometry: ConvGeometry) -> None:
        super().__init__(geometry, None if bias is None else bias.detach().to(_F32))
        self.rows, self.cols, self.seed = form.rows, form.cols, form.seed
        self.register_buffer("buckets", form.buckets.detach().to(_F32).contiguous(),
                             persistent=False)

    def run(self, x: torch.Tensor, oh: int, ow: int) -> torch.Tensor:
        b = self.buckets
        if b.dtype != _F32 or not b.is_cpu or not b.is_contiguous():
            raise RuntimeInputError(f"{self.who()}: holds {b.dtype} buckets on {b.device}")
        form = HashedForm(self.rows, self.cols, b, self.seed)
        return self._conv(x, hashed_densify(form, self.who()).view(self.geometry.weight_shape))


class HashedDenseConv2d(_ConvBase):
    """The dense filter bank decoded once."""

    impl = "dense"

    def __init__(self, form: HashedForm, bias: torch.Tensor | None,
                 geometry: ConvGeometry) -> None:
        super().__init__(geometry, None if bias is None else bias.detach().to(_F32))
        self.register_buffer("weight", hashed_densify(form).view(geometry.weight_shape),
                             persistent=False)

    def run(self, x: torch.Tensor, oh: int, ow: int) -> torch.Tensor:
        return self._conv(x, self.weight)


# ------------------------------------------------------------------------------ circulant


class CirculantFFT(RuntimeLayer):
    """``irfft(rfft(r_b) · rfft(D x))``, blocks stacked, truncated to ``out`` (O(n log n));
    Toeplitz: ``irfft(rfft(t) · rfft(D x))`` at size ``out + n``, outputs ``n-1 .. n-2+out``."""

    impl = "fft"

    def __init__(self, form: CirculantForm, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.n, self.out = form.in_features, form.out_features
        self.toeplitz = form.structure == "toeplitz"
        self.size = toeplitz_fft_size(self.out, self.n) if self.toeplitz else self.n
        self.register_buffer("weight_f", torch.fft.rfft(form.weight.to(_F32), n=self.size),
                             persistent=False)
        self.register_buffer("signs", input_signs(self.n, form.seed).to(_F32),
                             persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_input(x, self.n)
        if x.numel() == 0:
            return torch.empty(*x.shape[:-1], self.out)
        fx = torch.fft.rfft(x * self.signs, n=self.size)
        if self.toeplitz:
            y = torch.fft.irfft(fx * self.weight_f, n=self.size)[..., self.n - 1:
                                                                 self.n - 1 + self.out]
        else:
            y = torch.fft.irfft(fx.unsqueeze(-2) * self.weight_f, n=self.n)
            y = y.flatten(-2)[..., : self.out]
        return y if self.bias is None else y + self.bias


class CirculantDense(RuntimeLayer):
    """The explicit ``[out, in]`` matrix, ``F.linear``."""

    impl = "dense"

    def __init__(self, form: CirculantForm, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.n = form.in_features
        if form.structure == "toeplitz":
            c = toeplitz_matrix(form.weight.to(_F32), form.out_features, self.n)
        else:
            c = circulant_matrix(form.weight.to(_F32)).reshape(-1, self.n)[: form.out_features]
        w = (c * input_signs(self.n, form.seed).to(_F32)).contiguous()
        self.register_buffer("weight", w, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.linear_input(x, self.n), self.weight, self.bias)


# ------------------------------------------------------------------------------ registration


def _is_hashed(form: Any, module: nn.Module) -> bool:
    return isinstance(form, HashedForm)


def _kernel_ok(form: Any, module: nn.Module) -> bool:
    return _is_hashed(form, module) and get_kernel() is not None


def _no_kernel(form: Any, module: nn.Module) -> bool:
    """``tiles`` (torch hashing, ~20x slower than the C kernel) only runs without a compiler,
    where it bounds the per-call temporary that ``densify`` spends on the whole matrix."""
    return _is_hashed(form, module) and get_kernel() is None


register_layer_form(HashedLinear, read_hashed)
register_layer_form(HashedConv2d, read_hashed)
register_layer_form(CirculantLinear, read_circulant)
register_layer_form(ToeplitzLinear, read_toeplitz)

for _name, _cls, _accepts, _compact in (
    ("kernel", HashedKernelLinear, _kernel_ok, True),
    ("densify", HashedDensifyLinear, _is_hashed, True),
    ("tiles", HashedTilesLinear, _no_kernel, True),
    ("dense", HashedDenseLinear, _is_hashed, False),
):
    register_impl(HashedLinear, Impl(_name, lambda f, b, m, c=_cls: c(f, b), _accepts, _compact))

for _name, _cls, _compact in (("densify", HashedDensifyConv2d, True),
                              ("dense", HashedDenseConv2d, False)):
    register_impl(HashedConv2d, Impl(_name, lambda f, b, m, c=_cls: c(f, b, _geometry(m)),
                                     _is_hashed, _compact))

for _kind in (CirculantLinear, ToeplitzLinear):
    for _name, _cls, _compact in (("fft", CirculantFFT, True), ("dense", CirculantDense, False)):
        register_impl(_kind, Impl(
            _name, lambda f, b, m, c=_cls: c(f, b), lambda f, m: isinstance(f, CirculantForm),
            _compact))
