"""Conv2d executors chosen by filter size and form: sparse direct, codebook, Winograd, FFT, im2col.

Registered for ``nn.Conv2d`` layers stored compressed (a :class:`CompressedMatrix` form, rows =
output channels, columns = ``C/groups * kh * kw``) next to the executors of
:mod:`deepsqueeze.runtime.layers`; the autotuner times every one that accepts the layer:

=============  ==========================================================  =================
executor       algorithm                                                   accepts
=============  ==========================================================  =================
``sparse-os``  C, output-stationary direct conv over the kept weights:     any stride,
               blocks of 64 outputs (batch innermost) accumulated in        padding, dilation,
               registers, split between torch's threads; fuses bias,       groups
               ReLU, max-pool and a folded BatchNorm (compact form held)
``codebook``   the same, weights grouped by centroid: the inputs of a      as sparse-os; a
               centroid's weights are summed, then multiplied once         codebook of <= 256
``winograd2``  Winograd F(2x2, 3x3) (Lavin & Gray 2016): weights           3x3, stride 1,
``winograd4``  transformed once at load, batched matmuls per tile point;   dilation 1, any
               F(4x4, 3x3) does 2.25x fewer multiplies than F(2x2, 3x3)    padding, groups
``fft``        ``torch.fft.rfft2`` of input and kernel, a complex matmul   kernel >= 5x5; any
               over channels per frequency, ``irfft2`` (kernel spectra     stride, padding,
               cached per input size)                                      dilation, groups
``im2col``     ``F.unfold`` + one (grouped) GEMM with the dense weight     everything
=============  ==========================================================  =================

Every executor accepts zero padding given as numbers (``padding_mode="zeros"``, not
``"same"``/``"valid"`` strings) and checks its input before running, as every runtime layer
does; :func:`refusal` says why one does not accept a layer. The weights of ``sparse-os`` and
``codebook`` are read from the compact form on each call (a few microseconds): they hold
about the file's bytes; the others hold dense (or transformed) fp32 weights.

Fusion (:mod:`deepsqueeze.runtime.fuse`): a BatchNorm2d after any of these is folded into it
(:meth:`FusableConv.fold_affine`); a ReLU and a max-pool (kernel = stride, no padding) after it
are fused: the C executors write the pooled, rectified output directly (the full-size output
never reaches memory), the torch ones apply them in the same call.
"""

from __future__ import annotations

import ctypes
import math
from abc import abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deepsqueeze.errors import DsqFormatError, RuntimeInputError
from deepsqueeze.runtime.forms import CompressedMatrix
from deepsqueeze.runtime.kernel import MODE_F32, check_rc, get_kernel
from deepsqueeze.runtime.layers import (
    ConvGeometry,
    Impl,
    _CompactMixin,
    _ConvBase,
    register_impl,
)

_F32 = torch.float32
_GEOMETRY_CACHE = 64
MAX_CODEBOOK_CENTROIDS = 256
"""Most centroids the codebook executor groups by (its per-row counting sort)."""
FFT_MIN_KERNEL = 5
"""The FFT executor runs kernels of at least this size in both dimensions."""
_FFT_CACHE = 8  # input sizes whose kernel spectra are kept


def _conv_module(module: Any) -> bool:
    return isinstance(module, nn.Conv2d) and not isinstance(module.padding, str)


def refusal(impl: str, form: Any, module: Any) -> str | None:
    """Why executor ``impl`` does not run ``module`` with ``form``, or None when it does."""
    if not isinstance(form, CompressedMatrix):
        return "its weight is not stored in a compressed matrix form"
    if not _conv_module(module):
        return "not an nn.Conv2d with numeric padding"
    if module.padding_mode != "zeros":
        return f"padding_mode {module.padding_mode!r} (only 'zeros')"
    kh, kw = module.kernel_size
    if impl in ("sparse-os", "codebook"):
        if get_kernel() is None:
            return "the C kernel is not available"
        if impl == "codebook" and (form.mode == MODE_F32 or form.codebook is None):
            return "its weights are not shared through a codebook"
        if impl == "codebook" and form.codebook.numel() > MAX_CODEBOOK_CENTROIDS:
            return (f"a codebook of {form.codebook.numel()} centroids (at most "
                    f"{MAX_CODEBOOK_CENTROIDS})")
    elif impl in ("winograd2", "winograd4"):
        if (kh, kw) != (3, 3):
            return f"a {kh}x{kw} kernel (Winograd F(m, 3x3) runs 3x3 kernels only)"
        if tuple(module.stride) != (1, 1) or tuple(module.dilation) != (1, 1):
            return "stride or dilation other than 1"
    elif impl == "fft":
        if min(kh, kw) < FFT_MIN_KERNEL:
            return f"a {kh}x{kw} kernel (the FFT executor runs kernels of at least 5x5)"
    elif impl != "im2col":
        return f"unknown executor {impl!r}"
    return None


class FusableConv(_ConvBase):
    """A conv executor that can absorb what follows it: a BatchNorm (:meth:`fold_affine`), a
    ReLU (:meth:`set_relu`) and a max-pool of kernel = stride ``pool`` (:meth:`set_pool`).

    The output of a pooled executor is ``[N, out, OH // pool, OW // pool]``.
    """

    relu: bool = False
    pool: int = 1

    def set_relu(self, relu: bool) -> None:
        """Apply (or not) a ReLU to the output."""
        self.relu = bool(relu)
        self._changed()

    def set_pool(self, pool: int) -> None:
        """Max-pool the output over ``pool`` x ``pool`` windows, stride ``pool``."""
        if not isinstance(pool, int) or pool < 1:
            raise ValueError(f"pool must be a positive integer, got {pool!r}")
        self.pool = pool
        self._changed()

    def fold_affine(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """Make the output ``scale[o] * conv(x)[o] + shift[o]`` (a folded BatchNorm)."""
        rows = self.geometry.out_channels
        scale = scale.detach().to(_F32).reshape(-1).contiguous()
        shift = shift.detach().to(_F32).reshape(-1).contiguous()
        if scale.numel() != rows or shift.numel() != rows:
            raise ValueError(f"{self.who()}: an affine of {scale.numel()} channels for "
                             f"{rows} output channels")
        if not (torch.isfinite(scale).all() and torch.isfinite(shift).all()):
            raise ValueError(f"{self.who()}: the folded affine holds NaN or Inf")
        bias = self.bias if self.bias is not None else torch.zeros(rows)
        self._fold(scale, (bias * scale + shift).contiguous())
        self._changed()

    @abstractmethod
    def _fold(self, scale: torch.Tensor, bias: torch.Tensor) -> None:
        """Make the executor compute ``scale[o] * conv(x)[o] + bias[o]``."""

    def _changed(self) -> None:
        """Called after a fusion changed what the executor computes."""

    def output_plane(self, h: int, w: int, oh: int, ow: int) -> tuple[int, int]:
        """The conv output's plane, shrunk by the fused max-pool (which must fit in it)."""
        if oh < self.pool or ow < self.pool:
            raise RuntimeInputError(
                f"{self.who()}: the {oh}x{ow} output is smaller than its fused {self.pool}x"
                f"{self.pool} max-pool (input plane {h}x{w})")
        return oh // self.pool, ow // self.pool

    def _post(self, y: torch.Tensor) -> torch.Tensor:
        """ReLU and max-pool of a torch executor's output (in the same call)."""
        if self.relu:
            y = F.relu_(y)
        if self.pool > 1:
            y = F.max_pool2d(y, self.pool)
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, relu={self.relu}, pool={self.pool}"


# ------------------------------------------------------------------------ C executors


class SparseConv2d(_CompactMixin, FusableConv):
    """Output-stationary sparse direct convolution from the compact form (``csrc/conv.c``).

    ``codebook``: the shared-weight variant (inputs summed per centroid, one multiply each).
    Holds the compact form, the bias and, after a BatchNorm fold, a per-channel scale.
    """

    impl = "sparse-os"

    def __init__(self, form: CompressedMatrix, bias: torch.Tensor | None,
                 geometry: ConvGeometry, *, codebook: bool = False) -> None:
        FusableConv.__init__(self, geometry, None)
        if form.rows != geometry.out_channels or form.cols != (
                geometry.in_channels // geometry.groups * math.prod(geometry.kernel_size)):
            raise DsqFormatError(f"a {form.rows} x {form.cols} matrix does not fit the "
                                 f"convolution {geometry}")
        if codebook and (form.mode == MODE_F32 or form.codebook is None
                         or form.codebook.numel() > MAX_CODEBOOK_CENTROIDS):
            raise DsqFormatError("the codebook executor needs a codebook of at most "
                                 f"{MAX_CODEBOOK_CENTROIDS} centroids")
        kernel = get_kernel()
        if kernel is None:
            raise RuntimeInputError("the C kernel is not available (no C compiler, or "
                                    "DEEPSQUEEZE_KERNEL=0)")
        i64, vp = ctypes.c_int64, ctypes.c_void_p
        self._fn = kernel.function("dsq_conv_sparse",
                                   [vp, vp, i64, vp, i64, vp, i64, vp, i64, i64])
        self.algo = int(codebook)
        self.impl = "codebook" if codebook else "sparse-os"
        self.register_buffer("scale", None, persistent=False)
        self._hold(form, bias)
        self._geom: dict[tuple[int, int, int], torch.Tensor] = {}

    def _changed(self) -> None:
        self._geom = {}

    def set_relu(self, relu: bool) -> None:
        """Apply (or not) a ReLU to the output (before the max-pool: they commute)."""
        FusableConv.set_relu(self, relu)

    def _fold(self, scale: torch.Tensor, bias: torch.Tensor) -> None:
        self.scale = scale if self.scale is None else (self.scale * scale).contiguous()
        self.bias = bias
        self._refresh()  # the struct points at the new bias

    def _vector(self, h: int, w: int, oh: int, ow: int) -> torch.Tensor:
        threads = torch.get_num_threads()
        found = self._geom.get((h, w, threads))
        if found is None:
            g = self.geometry
            if len(self._geom) >= _GEOMETRY_CACHE:
                self._geom.clear()
            found = self._geom[(h, w, threads)] = torch.tensor(
                [g.in_channels, h, w, *g.kernel_size, *g.stride, *g.padding, *g.dilation, oh, ow,
                 g.groups, self.pool, int(self.relu), max(1, min(threads, 64)), self.algo],
                dtype=torch.int64)
        return found

    def run(self, x: torch.Tensor, oh: int, ow: int) -> torch.Tensor:
        n, _, h, w = x.shape
        vec = self._vector(h, w, oh, ow)
        scale = self.scale
        if scale is not None and (scale.dtype is not _F32 or not scale.is_contiguous()
                                  or not scale.is_cpu or scale.numel() != self.rows):
            raise RuntimeInputError(f"{self.who()}: its folded scale is not a contiguous CPU "
                                    f"float32 tensor of {self.rows} values")
        y = torch.empty(n, self.rows, oh // self.pool, ow // self.pool)
        rc = self._fn(self._addr, vec.data_ptr(), vec.numel(),
                      None if scale is None else scale.data_ptr(),
                      0 if scale is None else scale.numel(), x.data_ptr(), x.numel(),
                      y.data_ptr(), y.numel(), n)
        if rc:
            check_rc(rc, self.who())
        return y


# --------------------------------------------------------------------- torch executors


class _DenseWeightConv(FusableConv):
    """Holds the dense fp32 weight ``[out, in/groups, kh, kw]`` (folds scale into it)."""

    def __init__(self, form: CompressedMatrix, bias: torch.Tensor | None,
                 geometry: ConvGeometry) -> None:
        super().__init__(geometry, bias)
        if (form.rows, form.cols) != (geometry.out_channels,
                                      math.prod(geometry.weight_shape[1:])):
            raise DsqFormatError(f"a {form.rows} x {form.cols} matrix does not fit the "
                                 f"convolution {geometry}")
        self.register_buffer("weight", form.to_dense().view(geometry.weight_shape).contiguous(),
                             persistent=False)
        self._prepare()

    def _prepare(self) -> None:
        """Derive the executor's own weight layout from ``self.weight``."""

    def _fold(self, scale: torch.Tensor, bias: torch.Tensor) -> None:
        self.weight = (self.weight * scale.view(-1, 1, 1, 1)).contiguous()
        self.bias = bias
        self._prepare()


class Im2colConv2d(_DenseWeightConv):
    """``F.unfold`` (im2col) then one GEMM per group with the dense weight."""

    impl = "im2col"

    def _prepare(self) -> None:
        g = self.geometry
        self._w = self.weight.view(g.groups, g.out_channels // g.groups, -1)

    def run(self, x: torch.Tensor, oh: int, ow: int) -> torch.Tensor:
        g = self.geometry
        n = x.shape[0]
        cols = F.unfold(x, g.kernel_size, dilation=g.dilation, padding=g.padding,
                        stride=g.stride)  # [n, C*kh*kw, L]
        if g.groups == 1:
            y = torch.matmul(self._w[0], cols)
        else:
            y = torch.matmul(self._w, cols.view(n, g.groups, -1, oh * ow))
        y = y.reshape(n, g.out_channels, oh, ow)
        if self.bias is not None:
            y += self.bias.view(1, -1, 1, 1)
        return self._post(y)


# Winograd transforms (Lavin & Gray 2016): Y = A^T [(G g G^T) * (B^T d B)] A
_WINOGRAD = {
    2: (
        [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]],
    ),
    4: (
        [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
         [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    ),
}


class WinogradConv2d(_DenseWeightConv):
    """Winograd F(m x m, 3 x 3): the weight is transformed once (``U = G g G^T``, computed in
    float64). Each call is three GEMMs: all input tiles transformed at once (``B^T d B`` as
    ``kron(B^T, B^T)`` times the tiles, one column per tile and channel), ``U`` times the
    transformed tiles per tile point and group, and the inverse transform ``A^T M A`` as
    ``kron(A^T, A^T)`` times the products."""

    def __init__(self, form: CompressedMatrix, bias: torch.Tensor | None,
                 geometry: ConvGeometry, m: int) -> None:
        if m not in _WINOGRAD:
            raise ValueError(f"Winograd tile size {m} (2 or 4)")
        self.m = m
        self.impl = f"winograd{m}"
        bt, gm, at = (torch.tensor(t, dtype=torch.float64) for t in _WINOGRAD[m])
        self._g = gm
        super().__init__(form, bias, geometry)
        self._s = torch.kron(bt, bt).float()  # [a*a, a*a]: input tile transform
        self._t = torch.kron(at, at).float()  # [m*m, a*a]: output tile transform

    def _prepare(self) -> None:
        g = self.geometry
        a = self.m + 2
        u = torch.einsum("ai,ocij,bj->aboc", self._g, self.weight.double(), self._g)
        self.u = u.float().reshape(a * a, g.groups, g.out_channels // g.groups, -1).contiguous()

    def run(self, x: torch.Tensor, oh: int, ow: int) -> torch.Tensor:
        g, m = self.geometry, self.m
        a = m + 2
        n, c = x.shape[0], x.shape[1]
        th, tw = -(-oh // m), -(-ow // m)
        ph, pw = g.padding
        xp = F.pad(x, (pw, pw + tw * m + 2 - (x.shape[3] + 2 * pw),
                       ph, ph + th * m + 2 - (x.shape[2] + 2 * ph)))
        tiles = xp.unfold(2, a, m).unfold(3, a, m)  # [n, C, th, tw, a, a]
        d = tiles.permute(4, 5, 1, 0, 2, 3).reshape(a * a, -1)  # [a*a, C * n * th * tw]
        v = (self._s @ d).view(a * a, g.groups, c // g.groups, n * th * tw)
        mm = torch.matmul(self.u, v)  # [a*a, G, O/G, n * th * tw]
        y = (self._t @ mm.view(a * a, -1)).view(m, m, g.out_channels, n, th, tw)
        y = y.permute(3, 2, 4, 0, 5, 1).reshape(n, g.out_channels, th * m, tw * m)
        y = y[:, :, :oh, :ow]
        y = y + self.bias.view(1, -1, 1, 1) if self.bias is not None else y.contiguous()
        return self._post(y)


class FFTConv2d(_DenseWeightConv):
    """Convolution through ``torch.fft``: circular cross-correlation of the zero-padded input
    with the (dilated) kernel, whose valid part is the convolution; strides subsample it.
    The kernel's spectrum is computed once per padded input size (a few are cached)."""

    impl = "fft"

    def _prepare(self) -> None:
        self._spectra: dict[tuple[int, int], torch.Tensor] = {}

    def _spectrum(self, hp: int, wp: int) -> torch.Tensor:
        found = self._spectra.get((hp, wp))
        if found is None:
            g = self.geometry
            kh, kw = g.kernel_size
            dh, dw = g.dilation
            k = torch.zeros(g.out_channels, g.in_channels // g.groups,
                            dh * (kh - 1) + 1, dw * (kw - 1) + 1)
            k[:, :, ::dh, ::dw] = self.weight
            spec = torch.fft.rfft2(k, s=(hp, wp)).conj()
            if len(self._spectra) >= _FFT_CACHE:
                self._spectra.clear()
            found = self._spectra[(hp, wp)] = spec.reshape(
                g.groups, g.out_channels // g.groups, g.in_channels // g.groups, -1).contiguous()
        return found

    def extra_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._spectra.values())

    def run(self, x: torch.Tensor, oh: int, ow: int) -> torch.Tensor:
        g = self.geometry
        n = x.shape[0]
        ph, pw = g.padding
        xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
        hp, wp = xp.shape[2], xp.shape[3]
        spec = self._spectrum(hp, wp)  # [G, O/G, C/G, F]
        xf = torch.fft.rfft2(xp).reshape(n, g.groups, g.in_channels // g.groups, -1)
        # per frequency: [O/G, C/G] @ [C/G, n]  (batched over groups and frequencies)
        yf = torch.matmul(spec.permute(0, 3, 1, 2), xf.permute(1, 3, 2, 0))  # [G, F, O/G, n]
        yf = yf.permute(3, 0, 2, 1).reshape(n, g.out_channels, hp, wp // 2 + 1)
        y = torch.fft.irfft2(yf, s=(hp, wp))
        sh, sw = g.stride
        y = y[:, :, : (oh - 1) * sh + 1 : sh, : (ow - 1) * sw + 1 : sw]
        y = y + self.bias.view(1, -1, 1, 1) if self.bias is not None else y.contiguous()
        return self._post(y)


# ------------------------------------------------------------------------------ registry


def _geometry(module: nn.Module) -> ConvGeometry:
    if not isinstance(module, nn.Conv2d):
        raise TypeError(f"a Conv2d executor cannot run a {type(module).__name__}")
    return ConvGeometry.of(module)


_BUILDERS: dict[str, Any] = {
    "sparse-os": lambda f, b, g: SparseConv2d(f, b, g),
    "codebook": lambda f, b, g: SparseConv2d(f, b, g, codebook=True),
    "winograd2": lambda f, b, g: WinogradConv2d(f, b, g, 2),
    "winograd4": lambda f, b, g: WinogradConv2d(f, b, g, 4),
    "fft": FFTConv2d,
    "im2col": Im2colConv2d,
}
COMPACT = {"sparse-os", "codebook"}
"""Executors holding only the compact form (about the file's bytes)."""

for _name, _build in _BUILDERS.items():
    register_impl(nn.Conv2d, Impl(
        _name,
        lambda f, b, m, build=_build: build(f, b, _geometry(m)),
        lambda f, m, name=_name: refusal(name, f, m) is None,
        _name in COMPACT,
    ))
