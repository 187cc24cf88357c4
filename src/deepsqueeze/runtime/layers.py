"""Inference modules that execute a compressed layer, and the registry of them.

Each compressed Linear / Conv2d of a .dsq file has several *implementations* (executors); the
autotuner (:mod:`deepsqueeze.runtime.autotune`) times them at the batch size asked for and keeps
the fastest that fits the memory budget:

==============  ========================================================  =====================
implementation  how it runs                                               weights held
==============  ========================================================  =====================
``kernel``      our C kernel on the compact form (gaps + codebook         compact form (~file)
                symbols); conv: direct (no im2col), see KernelConv2d
``kernel-f32``  the same kernel on the weights decoded to fp32 once     gaps + fp32 values
                (shared layers: trades the codebook gather for memory)
``densify``     the C kernel (numpy without it) writes the dense matrix   compact form (~file)
                on each call, then ``F.linear`` / ``F.conv2d``
``torch-csr``   ``torch.addmm`` with a ``sparse_csr`` tensor (int32        int32 CSR + fp32
                indices, fp32 values); conv via ``F.unfold``              (8 bytes / weight)
``scipy-csr``   ``scipy.sparse.csr_matrix @ x`` (Linear only)             int32 CSR + fp32
``dense``       fp32 dense weight, ``F.linear`` / ``F.conv2d``            dense fp32
==============  ========================================================  =====================

Every executor checks its input before running (and before any C call): a CPU, strided
tensor of a floating dtype (computed in fp32, the output is fp32), a Linear's last dimension
equal to its ``in_features``, a Conv2d's ``[N, C, H, W]`` (or unbatched ``[C, H, W]``) with the
layer's channels and a plane the kernel fits in; a batch of 0 gives an empty output. Anything
else raises :class:`~deepsqueeze.errors.RuntimeInputError` naming the layer. The C entry points
check their arguments again (buffer lengths, geometry, validated forms), see
``csrc/dsqkernel.c``.

Layers kept dense in the file (channel-pruned layers are just smaller dense layers) stay plain
torch modules. Later methods plug in by registering a form decoder
(:func:`deepsqueeze.runtime.forms.register_form`) and executors for that form here
(:func:`register_impl`): a low-rank form as two factor GEMMs, hashed layers from regenerated
indices, binary layers as packed bits, int8 through int8 kernels.
"""

from __future__ import annotations

import ctypes
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deepsqueeze.errors import DsqFormatError, RuntimeInputError
from deepsqueeze.runtime.forms import CompressedMatrix
from deepsqueeze.runtime.kernel import (
    MODE_CB16,
    MODE_F32,
    DsqLayer,
    Kernel,
    check_rc,
    get_kernel,
)

_TENSOR, _F32, _STRIDED = torch.Tensor, torch.float32, torch.strided
_GEOMETRY_CACHE = 64  # conv plane sizes whose kernel geometry vector is kept per layer


def _buffers(module: nn.Module, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        module.register_buffer(name, t, persistent=False)


def as_input(x: Any, who: str) -> torch.Tensor:
    """``x`` as a contiguous CPU float32 tensor, or :class:`RuntimeInputError` saying why not.

    The slow path of the executors' input check (their fast path accepts a plain contiguous
    CPU float32 tensor as it is): floating dtypes are converted, anything else is refused.
    """
    if not isinstance(x, torch.Tensor):
        raise RuntimeInputError(f"{who}: expected a torch.Tensor, got {type(x).__name__}")
    if x.layout is not _STRIDED:
        raise RuntimeInputError(f"{who}: expected a dense (strided) tensor, got layout "
                                f"{x.layout}; convert it with .to_dense()")
    if not x.is_cpu:
        raise RuntimeInputError(f"{who}: runs on the CPU, got a tensor on {x.device}; move it "
                                "with .cpu()")
    if not x.is_floating_point():
        raise RuntimeInputError(f"{who}: expected a floating-point tensor, got {x.dtype}; "
                                "convert it with .float()")
    return x.to(_F32).contiguous()


class RuntimeLayer(nn.Module):
    """Base of every compressed-layer executor: names its implementation, counts its bytes.

    ``layer``: the model's name of the layer it runs (set by the loader), for messages.
    """

    impl: str = "?"
    layer: str = ""

    def who(self) -> str:
        """How error messages name this executor: ``layer 'fc1' (kernel)``."""
        name = f"layer {self.layer!r}" if self.layer else type(self).__name__
        return f"{name} ({self.impl})"

    def linear_input(self, x: Any, cols: int) -> torch.Tensor:
        """``x`` checked for a Linear of ``cols`` inputs (``[..., cols]``) and made a contiguous
        CPU float32 tensor; :class:`RuntimeInputError` otherwise."""
        if (type(x) is not _TENSOR or x.dtype is not _F32 or x.layout is not _STRIDED
                or not x.is_cpu or not x.is_contiguous()):
            x = as_input(x, self.who())
        shape = x.shape
        if not shape or shape[-1] != cols:
            raise self.wrong_features(shape, cols)
        return x

    def wrong_features(self, shape: Any, cols: int) -> RuntimeInputError:
        """The error for an input of ``shape`` where ``[..., cols]`` is expected."""
        return RuntimeInputError(f"{self.who()}: expected an input of shape [..., {cols}] "
                                 f"({cols} features), got {list(shape)}")

    def extra_bytes(self) -> int:
        """Bytes held outside registered buffers (scipy arrays, sparse tensors)."""
        return 0

    def held_bytes(self) -> int:
        """Bytes of weights (and indices) this layer keeps in memory (shared storage once)."""
        from deepsqueeze.runtime.memory import held_bytes

        return held_bytes(self)

    def extra_repr(self) -> str:
        return f"impl={self.impl}, held_bytes={self.held_bytes()}"


def _vals_dtype(mode: int) -> torch.dtype:
    return _F32 if mode == MODE_F32 else torch.int16 if mode == MODE_CB16 else torch.uint8


class _CompactMixin:
    """Holds a :class:`CompressedMatrix` as buffers plus the C struct describing it.

    The struct holds raw pointers into the buffers and their lengths; it is rebuilt (and
    validated by the kernel, ``dsq_validate``) whenever the buffers are replaced (``.to()``,
    ``.float()``, ... go through ``_apply``). Only CPU float32 buffers are supported: a dtype
    or device change raises :class:`RuntimeInputError` and leaves the layer refusing to run.
    """

    relu: bool = False

    def _hold(self, form: CompressedMatrix, bias: torch.Tensor | None) -> None:
        module: Any = self
        self.rows, self.cols, self.mode = form.rows, form.cols, form.mode
        self.encoding = form.encoding
        if bias is not None:
            bias = bias.detach().to(_F32).contiguous()
        _buffers(module, rowptr=form.rowptr, symptr=form.symptr, gaps=form.gaps,
                 vals=form.vals, codebook=form.codebook, bias=bias)
        self._refresh()

    def _buffer_problem(self) -> str | None:
        """What makes the held buffers unfit for the C struct, or None."""
        m: Any = self
        want = {"rowptr": (torch.int32, self.rows + 1), "symptr": (torch.int32, self.rows + 1),
                "gaps": (torch.uint8, None), "vals": (_vals_dtype(self.mode), None),
                "codebook": (_F32, None), "bias": (_F32, self.rows)}
        for name, (dtype, numel) in want.items():
            t = getattr(m, name)
            if t is None:
                if name in ("rowptr", "symptr", "vals"):
                    return f"buffer {name} is missing"
                continue
            if not t.is_cpu:
                return f"runs on the CPU only, but {name} is on {t.device}"
            if t.dtype != dtype or t.layout is not _STRIDED or not t.is_contiguous():
                return (f"buffer {name} is {t.dtype}, expected contiguous {dtype} (runtime "
                        "layers keep their dtypes: .half()/.double()/.to(dtype) are not "
                        "supported)")
            if numel is not None and t.numel() != numel:
                return f"buffer {name} has {t.numel()} elements, expected {numel}"
        if self.mode != MODE_F32 and m.codebook is None:
            return "a codebook mode without a codebook"
        return None

    def _refresh(self) -> None:
        m: Any = self
        self._struct = DsqLayer()  # not validated: the kernel refuses it until replaced
        self._addr = ctypes.addressof(self._struct)
        problem = self._buffer_problem()
        if problem is not None:
            raise RuntimeInputError(f"{type(self).__name__}: {problem}")
        nbytes = m.vals.numel() * m.vals.element_size()
        struct = DsqLayer(
            self.rows, self.cols, self.mode, int(self.relu),
            m.rowptr.data_ptr(), m.symptr.data_ptr(),
            None if m.gaps is None else m.gaps.data_ptr() or None, m.vals.data_ptr() or None,
            None if m.codebook is None else m.codebook.data_ptr() or None,
            None if m.bias is None else m.bias.data_ptr(),
            0 if m.gaps is None else m.gaps.numel(), nbytes,
            0 if m.codebook is None else m.codebook.numel(), 0,
        )
        kernel = get_kernel()
        if kernel is not None:
            rc = kernel.validate(ctypes.byref(struct))
            if rc:
                raise DsqFormatError(f"{type(self).__name__}: the C kernel refused the "
                                     f"compact form of a {self.rows} x {self.cols} matrix "
                                     f"(code {rc})")
        self._struct = struct
        self._addr = ctypes.addressof(struct)
        # the tensors the struct points into stay alive as long as the struct, even if a
        # buffer is reassigned (the struct then reads the old, still valid, memory)
        self._pinned = tuple(t for t in (m.rowptr, m.symptr, m.gaps, m.vals, m.codebook, m.bias)
                             if t is not None)

    def set_relu(self, relu: bool) -> None:
        """Fuse (or unfuse) a ReLU on this layer's output."""
        self.relu = relu
        self._struct.relu = int(relu)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        self._struct = DsqLayer()  # refused by the kernel until rebuilt
        self._addr = ctypes.addressof(self._struct)
        out = super()._apply(fn, recurse)  # type: ignore[misc]
        self._refresh()
        return out

    def form(self) -> CompressedMatrix:
        m: Any = self
        return CompressedMatrix(self.rows, self.cols, m.rowptr, m.symptr, m.gaps, self.mode,
                                m.vals, m.codebook, self.encoding)

    def dense_weight(self) -> torch.Tensor:
        """The dense fp32 ``rows`` x ``cols`` matrix, written from the compact form."""
        kernel = get_kernel()
        if kernel is None:
            return self.form().to_dense()
        out = torch.zeros(self.rows, self.cols)
        check_rc(kernel.densify(self._addr, out.data_ptr(), out.numel()),
                 f"{type(self).__name__} densify")
        return out


def _need_kernel() -> Kernel:
    kernel = get_kernel()
    if kernel is None:
        raise RuntimeInputError("the C kernel is not available (no C compiler, or "
                                "DEEPSQUEEZE_KERNEL=0)")
    return kernel


# ---------------------------------------------------------------------------------- Linear


class KernelLinear(_CompactMixin, RuntimeLayer):
    """Linear from the compact form with our C kernel: ``x @ W.T + b`` (ReLU when fused)."""

    impl = "kernel"

    def __init__(self, form: CompressedMatrix, bias: torch.Tensor | None) -> None:
        super().__init__()
        self._chain = _need_kernel().chain
        self._hold(form, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the checks of linear_input, inlined: this call is the batch-1 hot path
        if (type(x) is not _TENSOR or x.dtype is not _F32 or x.layout is not _STRIDED
                or not x.is_cpu or not x.is_contiguous()):
            x = as_input(x, self.who())
        shape = x.shape
        if not shape or shape[-1] != self.cols:
            raise self.wrong_features(shape, self.cols)
        y = torch.empty(*shape[:-1], self.rows)
        m = x.numel()
        if m:
            n = m // self.cols
            rc = self._chain(1, self._addr, x.data_ptr(), m, y.data_ptr(), n * self.rows, n)
            if rc:
                check_rc(rc, self.who())
        return y


class DensifyLinear(_CompactMixin, RuntimeLayer):
    """Linear holding only the compact form; the dense weight is written on each call."""

    impl = "densify"

    def __init__(self, form: CompressedMatrix, bias: torch.Tensor | None) -> None:
        super().__init__()
        self._hold(form, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_input(x, self.cols)
        return F.linear(x, self.dense_weight(), self.bias)


def _csr_int32(form: CompressedMatrix) -> torch.Tensor:
    row, col = form.coords()
    counts = np.bincount(row, minlength=form.rows)
    crow = np.zeros(form.rows + 1, np.int32)
    crow[1:] = np.cumsum(counts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(
            torch.from_numpy(crow),
            torch.from_numpy(col.astype(np.int32)),
            torch.from_numpy(form.weights().astype(np.float32)),
            (form.rows, form.cols),
            check_invariants=False,
        )


def _csr_bytes(w: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size()
               for t in (w.crow_indices(), w.col_indices(), w.values()))


class TorchCSRLinear(RuntimeLayer):
    """Linear with ``torch.addmm`` on a ``sparse_csr`` weight (int32 indices, fp32 values)."""

    impl = "torch-csr"

    def __init__(self, form: CompressedMatrix, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.rows, self.cols = form.rows, form.cols
        self.weight_csr = _csr_int32(form)
        _buffers(self, bias=bias)
        self._bias_col = (bias if bias is not None else torch.zeros(form.rows)).reshape(-1, 1)

    def extra_bytes(self) -> int:
        return _csr_bytes(self.weight_csr)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_input(x, self.cols)
        lead = x.shape[:-1]
        if x.numel() == 0:
            return torch.empty(*lead, self.rows)
        x2 = x.reshape(-1, self.cols)
        y = torch.addmm(self._bias_col, self.weight_csr, x2.t()).t()
        return y.reshape(*lead, self.rows)


class ScipyLinear(RuntimeLayer):
    """Linear with ``scipy.sparse.csr_matrix @ x`` (int32 indices, fp32 values)."""

    impl = "scipy-csr"

    def __init__(self, form: CompressedMatrix, bias: torch.Tensor | None) -> None:
        super().__init__()
        import scipy.sparse as sp

        self.rows, self.cols = form.rows, form.cols
        row, col = form.coords()
        self.matrix = sp.csr_matrix((form.weights().astype(np.float32), (row, col)),
                                    shape=(form.rows, form.cols))
        _buffers(self, bias=bias)
        self._bias_np = None if bias is None else bias.numpy().reshape(-1, 1)

    def extra_bytes(self) -> int:
        m = self.matrix
        return int(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_input(x, self.cols)
        lead = x.shape[:-1]
        if x.numel() == 0:
            return torch.empty(*lead, self.rows)
        xn = x.detach().reshape(-1, self.cols).numpy()
        if xn.shape[0] == 1:
            y = self.matrix @ xn[0]
            if self._bias_np is not None:
                y += self._bias_np[:, 0]
            out = torch.from_numpy(y).reshape(1, self.rows)
        else:
            y = self.matrix @ xn.T
            if self._bias_np is not None:
                y += self._bias_np
            out = torch.from_numpy(y).t()
        return out.reshape(*lead, self.rows)


class DenseLinear(RuntimeLayer):
    """Linear with the decoded dense fp32 weight (the densified fallback)."""

    impl = "dense"

    def __init__(self, form: CompressedMatrix, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.rows, self.cols = form.rows, form.cols
        _buffers(self, weight=form.to_dense(), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.linear_input(x, self.cols), self.weight, self.bias)


# ---------------------------------------------------------------------------------- Conv2d


@dataclass(frozen=True)
class ConvGeometry:
    """What a Conv2d executor needs besides the weight."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    def __post_init__(self) -> None:
        positive = (self.in_channels, self.out_channels, self.groups, *self.kernel_size,
                    *self.stride, *self.dilation)
        if min(positive) < 1 or min(self.padding) < 0 or self.in_channels % self.groups:
            raise DsqFormatError(f"convolution geometry {self} is not valid")

    @classmethod
    def of(cls, conv: nn.Conv2d) -> ConvGeometry:
        if isinstance(conv.padding, str):
            raise ValueError("string padding is not supported by the sparse executors")
        return cls(conv.in_channels, conv.out_channels, tuple(conv.kernel_size),
                   tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        def one(n: int, i: int) -> int:
            k = self.dilation[i] * (self.kernel_size[i] - 1) + 1
            return (n + 2 * self.padding[i] - k) // self.stride[i] + 1

        return one(h, 0), one(w, 1)


class _ConvBase(RuntimeLayer, ABC):
    """Input checks shared by the Conv2d executors; subclasses implement :meth:`run`."""

    def __init__(self, geometry: ConvGeometry, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.geometry = geometry
        _buffers(self, bias=bias)

    accepts_channels_last = False
    """Whether :meth:`run` takes a channels-last ``x`` as it is (else it gets a contiguous
    copy)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Check ``x`` (``[N, C, H, W]`` or unbatched ``[C, H, W]``), then :meth:`run` it."""
        g = self.geometry
        if (type(x) is not _TENSOR or x.dtype is not _F32 or x.layout is not _STRIDED
                or not x.is_cpu or not (x.is_contiguous() or (
                    self.accepts_channels_last and x.dim() == 4
                    and x.is_contiguous(memory_format=torch.channels_last)))):
            x = as_input(x, self.who())
        shape = x.shape
        if len(shape) not in (3, 4) or shape[-3] != g.in_channels:
            raise RuntimeInputError(
                f"{self.who()}: expected an input of shape [N, {g.in_channels}, H, W] (or "
                f"[{g.in_channels}, H, W]), got {list(shape)}")
        h, w = shape[-2], shape[-1]
        oh, ow = g.out_size(h, w)
        if h < 1 or w < 1 or oh < 1 or ow < 1:
            k = [g.dilation[i] * (g.kernel_size[i] - 1) + 1 for i in (0, 1)]
            raise RuntimeInputError(
                f"{self.who()}: input plane {h}x{w} (padded by {g.padding[0]}x{g.padding[1]}) "
                f"is smaller than the {k[0]}x{k[1]} kernel")
        out_h, out_w = self.output_plane(h, w, oh, ow)
        batched = x if len(shape) == 4 else x.unsqueeze(0)
        if batched.shape[0] == 0:
            y = torch.empty(0, g.out_channels, out_h, out_w)
        else:
            y = self.run(batched, oh, ow)
        return y if len(shape) == 4 else y.squeeze(0)

    def output_plane(self, h: int, w: int, oh: int, ow: int) -> tuple[int, int]:
        """The plane this executor returns for a conv output of ``oh`` x ``ow`` (from an
        ``h`` x ``w`` input); an executor with a fused pool shrinks it (and checks it fits)."""
        return oh, ow

    @abstractmethod
    def run(self, x: torch.Tensor, oh: int, ow: int) -> torch.Tensor:
        """The convolution of a checked, non-empty ``[N, C, H, W]`` float32 ``x``."""

    def _unfold(self, x: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        return F.unfold(x, g.kernel_size, dilation=g.dilation, padding=g.padding,
                        stride=g.stride).contiguous()

    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        return F.conv2d(x, weight, self.bias, g.stride, g.padding, g.dilation, g.groups)


class KernelConv2d(_CompactMixin, _ConvBase):
    """Conv2d straight from the compact form with our C kernel (groups = 1), no im2col: each
    kept weight adds a shifted window of its input plane into its output plane."""

    impl = "kernel"

    def __init__(self, form: CompressedMatrix, bias: torch.Tensor | None,
                 geometry: ConvGeometry) -> None:
        super().__init__(geometry, None)
        if geometry.groups != 1 or form.cols != geometry.in_channels * math.prod(
                geometry.kernel_size):
            raise DsqFormatError(f"a {form.rows} x {form.cols} matrix does not fit the "
                                 f"convolution {geometry}")
        self._conv_fn = _need_kernel().conv_direct
        self._hold(form, bias)
        self._geom: dict[tuple[int, int], torch.Tensor] = {}

    def _geometry_of(self, h: int, w: int, oh: int, ow: int) -> torch.Tensor:
        found = self._geom.get((h, w))
        if found is None:
            g = self.geometry
            if len(self._geom) >= _GEOMETRY_CACHE:
                self._geom.clear()
            found = self._geom[(h, w)] = torch.tensor(
                [g.in_channels, h, w, *g.kernel_size, *g.stride, *g.padding, *g.dilation, oh,
                 ow], dtype=torch.int64)
        return found

    def run(self, x: torch.Tensor, oh: int, ow: int) -> torch.Tensor:
        n, _, h, w = x.shape
        vec = self._geometry_of(h, w, oh, ow)
        y = torch.empty(n, self.rows, oh, ow)
        check_rc(self._conv_fn(self._addr, vec.data_ptr(), vec.numel(), x.data_ptr(),
                               x.numel(), y.data_ptr(), y.numel(), n), self.who())
        return y


class TorchCSRConv2d(_ConvBase):
    """Conv2d as ``F.unfold`` + ``torch.addmm`` with a ``sparse_csr`` weight (groups = 1)."""

    impl = "torch-csr"

    def __init__(self, form: CompressedMatrix, bias: torch.Tensor | None,
                 geometry: ConvGeometry) -> None:
        super().__init__(geometry, bias)
        self.rows = form.rows
        self.weight_csr = _csr_int32(form)
        self._bias_col = (bias if bias is not None else torch.zeros(form.rows)).reshape(-1, 1)

    def extra_bytes(self) -> int:
        return _csr_bytes(self.weight_csr)

    def run(self, x: torch.Tensor, oh: int, ow: int) -> torch.Tensor:
        cols = self._unfold(x)
        n, ckk, positions = cols.shape
        flat = cols.transpose(0, 1).reshape(ckk, n * positions)
        y = torch.addmm(self._bias_col, self.weight_csr, flat)
        return y.view(self.rows, n, oh, ow).transpose(0, 1)


class DensifyConv2d(_CompactMixin, _ConvBase):
    """Conv2d holding only the compact form; the dense kernel is written on each call."""

    impl = "densify"

    def __init__(self, form: CompressedMatrix, bias: torch.Tensor | None,
                 geometry: ConvGeometry) -> None:
        super().__init__(geometry, None)
        self._hold(form, bias)

    def run(self, x: torch.Tensor, oh: int, ow: int) -> torch.Tensor:
        return self._conv(x, self.dense_weight().view(self.geometry.weight_shape))


class DenseConv2d(_ConvBase):
    """Conv2d with the decoded dense fp32 weight (the densified fallback)."""

    impl = "dense"

    def __init__(self, form: CompressedMatrix, bias: torch.Tensor | None,
                 geometry: ConvGeometry) -> None:
        super().__init__(geometry, bias)
        _buffers(self, weight=form.to_dense().view(geometry.weight_shape).contiguous())

    def run(self, x: torch.Tensor, oh: int, ow: int) -> torch.Tensor:
        return self._conv(x, self.weight)


# -------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Impl:
    """One way to execute a compressed layer.

    ``build(form, bias, module)`` returns the executor replacing the torch ``module`` (used for
    its geometry only); ``accepts(form, module)`` says whether it can run this layer; ``compact``
    marks executors holding only the compact form (no fp32 copy of the weights).
    """

    name: str
    build: Callable[[Any, torch.Tensor | None, nn.Module], RuntimeLayer]
    accepts: Callable[[Any, nn.Module], bool]
    compact: bool


IMPLS: dict[type[nn.Module], list[Impl]] = {}
"""Executors of each torch layer type, in order of preference when nothing is timed."""


def register_impl(layer_type: type[nn.Module], impl: Impl) -> None:
    """Add an executor for ``layer_type`` (replacing one of the same name)."""
    impls = IMPLS.setdefault(layer_type, [])
    impls[:] = [i for i in impls if i.name != impl.name] + [impl]


def _is_matrix(form: Any) -> bool:
    return isinstance(form, CompressedMatrix)


def _kernel_ok(form: Any, module: nn.Module) -> bool:
    return _is_matrix(form) and get_kernel() is not None


def _zero_padded(conv: Any) -> bool:
    return (
        isinstance(conv, nn.Conv2d)
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    )


def _plain_conv(conv: Any) -> bool:
    return _zero_padded(conv) and conv.groups == 1


def _decoded(form: CompressedMatrix) -> CompressedMatrix:
    """The same matrix with its weights decoded to fp32 values (codebook gather done once)."""
    return CompressedMatrix(form.rows, form.cols, form.rowptr, form.symptr, form.gaps, MODE_F32,
                            torch.from_numpy(form.weights().astype(np.float32)), None,
                            form.encoding)


def _shared(form: Any, module: nn.Module) -> bool:
    return _kernel_ok(form, module) and form.mode != MODE_F32


def _conv_geometry(module: nn.Module) -> ConvGeometry:
    assert isinstance(module, nn.Conv2d)
    return ConvGeometry.of(module)


for _name, _cls, _accepts, _compact in (
    ("kernel", KernelLinear, _kernel_ok, True),
    ("kernel-f32", lambda f, b: KernelLinear(_decoded(f), b), _shared, False),
    ("torch-csr", TorchCSRLinear, lambda f, m: _is_matrix(f), False),
    ("scipy-csr", ScipyLinear, lambda f, m: _is_matrix(f), False),
    ("densify", DensifyLinear, lambda f, m: _is_matrix(f), True),
    ("dense", DenseLinear, lambda f, m: _is_matrix(f), False),
):
    register_impl(nn.Linear, Impl(_name, lambda f, b, m, c=_cls: c(f, b), _accepts, _compact))

for _name, _cls, _accepts, _compact in (
    ("kernel", KernelConv2d, lambda f, m: _kernel_ok(f, m) and _plain_conv(m), True),
    ("kernel-f32", lambda f, b, g: KernelConv2d(_decoded(f), b, g),
     lambda f, m: _shared(f, m) and _plain_conv(m), False),
    ("torch-csr", TorchCSRConv2d, lambda f, m: _is_matrix(f) and _plain_conv(m), False),
    ("densify", DensifyConv2d, lambda f, m: _is_matrix(f) and _zero_padded(m), True),
    ("dense", DenseConv2d, lambda f, m: _is_matrix(f) and _zero_padded(m), False),
):
    register_impl(
        nn.Conv2d,
        Impl(_name, lambda f, b, m, c=_cls: c(f, b, _conv_geometry(m)), _accepts, _compact),
    )


def candidates(form: Any, module: nn.Module) -> list[Impl]:
    """Executors able to run ``form`` in place of ``module`` (an exact type match)."""
    return [impl for impl in IMPLS.get(type(module), []) if impl.accepts(form, module)]
