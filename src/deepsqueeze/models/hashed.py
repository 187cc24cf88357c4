"""Hashed and circulant layer kinds: weight sharing whose structure is regenerated, never stored.

HashedNets (Chen, Wilson, Tyree, Weinberger, Chen, ICML 2015, "Compressing Neural Networks with
the Hashing Trick"): a layer's *virtual* weight ``V[i, j] = ξ(i, j) · w[h(i, j)]`` is drawn from
``K`` real parameters ``w`` (the *buckets*) by a bucket hash ``h`` and a sign hash ``ξ``. Both are
xxHash32 (:func:`xxh32_pairs`) of the pair ``(i, j)`` packed as two little-endian ``uint32``
(8 bytes) with a per-layer seed: ``h`` = :func:`bucket_of` (Lemire's multiply-shift reduction of
the hash with ``seed`` to ``0..K-1``), ``ξ`` = ``+1`` / ``-1`` from the top bit of the hash with
``seed ^ SIGN_SALT``. ``i`` is the output row (out channel), ``j`` the flat input column (for a
convolution the flat index over ``in_channels/groups × kh × kw``). The same function is
implemented in torch (any device, int64 arithmetic), in C (``runtime/csrc/hashed.c``, for the
on-the-fly kernel) and checked against the ``xxhash`` package in the tests.

A file stores only the buckets (``weight_buckets``) and the bias; the seed, the bucket count and
``check`` -- a CRC-32 of the indices and signs of 64 fixed sample positions -- are constructor
options. A layer rebuilt with a ``check`` that its own hash does not reproduce raises
:class:`~deepsqueeze.errors.DsqFormatError` (a file from a different hash definition, or forged
options).

Circulant projections (Cheng et al., ICCV 2015, "An exploration of parameter redundancy in deep
networks with circulant projections"): ``y = C(r) D x`` with ``D`` a fixed random ±1 diagonal
(signs from the same hash, from ``seed``) and ``C(r)[a, b] = r[(a - b) mod n]`` an ``n × n``
circulant matrix, ``n = in_features``, computed as a circular convolution by FFT in
``O(n log n)``. A ``d × n`` map (``d = out_features``) stacks ``ceil(d / n)`` circulant blocks
(each its own ``r``) and keeps the first ``d`` outputs: ``ceil(d/n) · n`` parameters.
"""

from __future__ import annotations

import itertools
import math
import struct
import zlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deepsqueeze.errors import DsqFormatError, ModelError
from deepsqueeze.models.graph import (
    bool_option,
    int_option,
    ints_option,
    optional_option,
    register_kind,
)
from deepsqueeze.models.registry import register_model, require_positive

__all__ = [
    "MAX_BUCKETS",
    "MAX_VIRTUAL",
    "SIGN_SALT",
    "STRUCTURED",
    "CirculantLinear",
    "HashedConv2d",
    "HashedLinear",
    "HashedMLP",
    "ToeplitzLinear",
    "bucket_of",
    "buckets_for",
    "circulant_matrix",
    "hash_index",
    "index_check",
    "input_signs",
    "sign_of",
    "toeplitz_fft_size",
    "toeplitz_matrix",
    "xxh32_pairs",
]

_M32 = 0xFFFFFFFF
_P1, _P2, _P3, _P4, _P5 = 2654435761, 2246822519, 3266489917, 668265263, 374761393
SIGN_SALT = 0x5BD1E995
"""The sign hash uses seed ``seed ^ SIGN_SALT`` (independent of the bucket hash)."""
MAX_BUCKETS = (1 << 31) - 1
"""Most buckets a hashed layer may have (the reduction ``(h · K) >> 32`` stays below 2**63)."""
MAX_VIRTUAL = 1 << 28
"""Most virtual weights (out × in) a hashed or circulant layer may stand for: its dense form
(decoding, the dense executor) is at most 1 GiB of fp32."""
MAX_SEED = _M32
CHECK_SAMPLES = 64
"""Sample positions hashed into a layer's ``check``."""


# --------------------------------------------------------------------------------- xxHash32


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """``(a * c) mod 2**32`` for int64 ``a`` in ``[0, 2**32)`` and a 32-bit constant ``c``,
    in 16-bit halves so that no product leaves int64 (works on every device)."""
    lo = a * (c & 0xFFFF)
    hi = ((a * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _rotl17(a: torch.Tensor) -> torch.Tensor:
    return ((a << 17) | (a >> 15)) & _M32


def _lane(acc: torch.Tensor, lane: torch.Tensor) -> torch.Tensor:
    return _mul32(_rotl17((acc + _mul32(lane, _P3)) & _M32), _P4)


def xxh32_pairs(i: torch.Tensor, j: torch.Tensor, seed: int) -> torch.Tensor:
    """xxHash32 of the 8 bytes ``pack('<II', i, j)`` with ``seed``, elementwise (broadcasting).

    ``i`` and ``j`` are integer tensors in ``[0, 2**32)``; the result is int64 in
    ``[0, 2**32)``, equal to ``xxhash.xxh32_intdigest(struct.pack('<II', i, j), seed)``.
    """
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be in 0..{MAX_SEED}, got {seed}")
    acc0 = (seed + _P5 + 8) & _M32
    h = _lane(torch.full_like(i, acc0, dtype=torch.int64), i.to(torch.int64))
    h = _lane(h, j.to(torch.int64))
    h = h ^ (h >> 15)
    h = _mul32(h, _P2)
    h = h ^ (h >> 13)
    h = _mul32(h, _P3)
    return h ^ (h >> 16)


def bucket_of(h: torch.Tensor, buckets: int) -> torch.Tensor:
    """Bucket ``(h · K) >> 32`` of 32-bit hashes ``h`` (Lemire's reduction; no division)."""
    return (h * buckets) >> 32


def sign_of(h: torch.Tensor) -> torch.Tensor:
    """``+1`` where the hash's top bit is 0, ``-1`` where it is 1 (int64)."""
    return 1 - 2 * (h >> 31)


def hash_index(
    rows: torch.Tensor, cols: torch.Tensor, buckets: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bucket indices (int64) and signs (int64, ±1) of positions ``(rows, cols)`` (broadcast)."""
    idx = bucket_of(xxh32_pairs(rows, cols, seed), buckets)
    sign = sign_of(xxh32_pairs(rows, cols, seed ^ SIGN_SALT))
    return idx, sign


def _sample(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.arange(CHECK_SAMPLES, dtype=torch.int64, device="cpu")
    return (t * 7919 + 13) % rows, (t * 104729 + 7) % cols


def index_check(rows: int, cols: int, buckets: int, seed: int) -> int:
    """CRC-32 of the bucket indices and signs of :data:`CHECK_SAMPLES` fixed positions."""
    i, j = _sample(rows, cols)
    idx, sign = hash_index(i, j, buckets, seed)
    data = struct.pack(f"<{CHECK_SAMPLES}q{CHECK_SAMPLES}b", *idx.tolist(), *sign.tolist())
    return zlib.crc32(data)


def buckets_for(virtual: int, factor: float) -> int:
    """Buckets of a layer of ``virtual`` weights at compression ``factor`` (at least 1)."""
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
        raise ValueError(f"factor must be a number > 0, got {factor!r}")
    return max(1, min(MAX_BUCKETS, round(virtual * factor)))


# --------------------------------------------------------------------------------- layers


def _check_hash_options(who: str, rows: int, cols: int, buckets: int, seed: int) -> None:
    if rows * cols > MAX_VIRTUAL:
        raise ModelError(f"{who}: {rows} x {cols} = {rows * cols:,} virtual weights, over the "
                         f"limit of {MAX_VIRTUAL:,}")
    if not 1 <= buckets <= MAX_BUCKETS:
        raise ModelError(f"{who}: buckets must be in 1..{MAX_BUCKETS}, got {buckets}")
    if not 0 <= seed <= MAX_SEED:
        raise ModelError(f"{who}: seed must be in 0..{MAX_SEED}, got {seed}")


class _Hashed(nn.Module):
    """Shared machinery: the buckets, the index (regenerated per device, never stored)."""

    rows: int
    cols: int
    buckets: int
    seed: int
    check: int

    def _init_hash(self, rows: int, cols: int, buckets: int, seed: int, check: int | None,
                   bias: bool, out: int, factory: dict[str, object]) -> None:
        who = type(self).__name__
        _check_hash_options(who, rows, cols, buckets, seed)
        self.rows, self.cols, self.buckets, self.seed = rows, cols, buckets, seed
        own = index_check(rows, cols, buckets, seed)
        if check is not None and check != own:
            raise DsqFormatError(
                f"{who}: the stored index checksum {check} does not match the regenerated "
                f"indices ({own}); the file was written with a different hash definition or its "
                "options were altered")
        self.check = own
        self.weight_buckets = nn.Parameter(torch.empty(buckets, **factory))  # type: ignore[arg-type]
        self.bias = nn.Parameter(torch.empty(out, **factory)) if bias else None  # type: ignore[arg-type]
        self._index: tuple[torch.device, torch.Tensor, torch.Tensor] | None = None

    def index(self, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(bucket index, sign)`` of every virtual weight, ``[rows, cols]`` int32 / int8
        (5 bytes per virtual weight; computed once per device and cached, in row blocks so the
        int64 hashing temporaries stay small; not part of the state dict)."""
        device = self.weight_buckets.device if device is None else device
        if self._index is None or self._index[0] != device:
            idx = torch.empty(self.rows, self.cols, dtype=torch.int32, device=device)
            sign = torch.empty(self.rows, self.cols, dtype=torch.int8, device=device)
            j = torch.arange(self.cols, device=device).unsqueeze(0)
            step = max(1, (1 << 20) // self.cols)
            for r0 in range(0, self.rows, step):
                i = torch.arange(r0, min(self.rows, r0 + step), device=device).unsqueeze(1)
                b, s = hash_index(i, j, self.buckets, self.seed)
                idx[r0:r0 + step], sign[r0:r0 + step] = b, s
            self._index = (device, idx, sign)
        return self._index[1], self._index[2]

    def virtual_matrix(self) -> torch.Tensor:
        """The virtual weight as a ``[rows, cols]`` matrix (differentiable in the buckets)."""
        idx, sign = self.index()
        w = self.weight_buckets
        return w[idx] * sign.to(w.dtype)

    def reset_buckets(self) -> None:
        """Uniform init in ``±1/sqrt(cols)``, like ``nn.Linear``'s."""
        bound = 1.0 / math.sqrt(self.cols)
        with torch.no_grad():
            self.weight_buckets.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    def load_dense(self, weight: torch.Tensor) -> None:
        """Set every bucket to the mean of the sign-corrected weights hashed into it (the
        least-squares fit of ``weight``); empty buckets get 0."""
        w = weight.detach().reshape(self.rows, self.cols).to(self.weight_buckets)
        idx, sign = self.index(w.device)
        flat = idx.reshape(-1).long()
        sums = torch.zeros(self.buckets, dtype=w.dtype, device=w.device)
        sums.index_add_(0, flat, (w * sign.to(w.dtype)).reshape(-1))
        counts = torch.bincount(flat, minlength=self.buckets).to(w.dtype)
        with torch.no_grad():
            self.weight_buckets.copy_(sums / counts.clamp_min(1))

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        self._index = None  # device or dtype may change: regenerate on next use
        return super()._apply(fn, recurse)


class HashedLinear(_Hashed):
    """A Linear layer whose ``out × in`` weight is hashed into ``buckets`` shared parameters."""

    def __init__(self, in_features: int, out_features: int, buckets: int, seed: int = 0,
                 bias: bool = True, check: int | None = None, device: torch.device | str | None
                 = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_hash(out_features, in_features, buckets, seed, check, bias, out_features,
                        {"device": device, "dtype": dtype})
        if self.weight_buckets.device.type != "meta":
            self.reset_buckets()

    @property
    def weight(self) -> torch.Tensor:
        """The virtual ``[out, in]`` weight (materialized)."""
        return self.virtual_matrix()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.virtual_matrix(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"buckets={self.buckets}, seed={self.seed}, bias={self.bias is not None}")


def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2 or not all(isinstance(a, int) for a in t):
        raise ModelError(f"HashedConv2d: {name} must be an int or two ints, got {v!r}")
    return t  # type: ignore[return-value]


class HashedConv2d(_Hashed):
    """A Conv2d whose ``[out, in/groups, kh, kw]`` weight is hashed into ``buckets`` shared
    parameters (row ``i`` = out channel, column ``j`` = flat index within the filter)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 buckets: int, seed: int = 0, stride: int | Sequence[int] = 1,
                 padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1,
                 groups: int = 1, bias: bool = True, check: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None
                 ) -> None:
        super().__init__()
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ModelError(f"HashedConv2d: groups={groups} must divide in_channels="
                             f"{in_channels} and out_channels={out_channels}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        cols = in_channels // groups * self.kernel_size[0] * self.kernel_size[1]
        self._init_hash(out_channels, cols, buckets, seed, check, bias, out_channels,
                        {"device": device, "dtype": dtype})
        if self.weight_buckets.device.type != "meta":
            self.reset_buckets()

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @property
    def weight(self) -> torch.Tensor:
        """The virtual ``[out, in/groups, kh, kw]`` weight (materialized)."""
        return self.virtual_matrix().view(self.weight_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, buckets={self.buckets}, "
                f"seed={self.seed}")


# --------------------------------------------------------------------------------- circulant


def input_signs(n: int, seed: int, device: torch.device | None = None) -> torch.Tensor:
    """The ±1 diagonal ``D`` of a circulant layer: sign hash of ``(0xFFFFFFFF, j)``."""
    j = torch.arange(n, device=device)
    return sign_of(xxh32_pairs(torch.full_like(j, _M32), j, seed ^ SIGN_SALT))


def circulant_matrix(r: torch.Tensor) -> torch.Tensor:
    """The ``n × n`` circulant matrix ``C[a, b] = r[(a - b) mod n]`` of a vector ``r``."""
    n = r.shape[-1]
    a = torch.arange(n, device=r.device)
    return r[..., (a.unsqueeze(1) - a.unsqueeze(0)) % n]


def toeplitz_matrix(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The ``rows × cols`` Toeplitz matrix ``T[a, b] = t[a - b + cols - 1]`` of a vector ``t``
    of ``rows + cols - 1`` values (``t[cols - 1]`` on the main diagonal)."""
    if t.shape[-1] != rows + cols - 1:
        raise ValueError(f"a {rows} x {cols} Toeplitz matrix needs {rows + cols - 1} values, "
                         f"got {t.shape[-1]}")
    a = torch.arange(rows, device=t.device).unsqueeze(1)
    b = torch.arange(cols, device=t.device).unsqueeze(0)
    return t[..., a - b + cols - 1]


def toeplitz_fft_size(rows: int, cols: int) -> int:
    """FFT length of a Toeplitz product: ``rows + cols`` (``2n`` for a square map), at least the
    ``rows + cols - 1`` that keeps the wrapped-around terms out of the kept outputs."""
    return rows + cols


class _Structured(nn.Module):
    """Shared part of the circulant and Toeplitz layers: shape and seed checks, the ±1
    diagonal ``D`` (regenerated from ``seed``, cached per device and dtype), the init."""

    structure: str
    in_features: int
    out_features: int
    seed: int
    weight: nn.Parameter

    def _init_structured(self, in_features: int, out_features: int, seed: int, bias: bool,
                         shape: tuple[int, ...], factory: dict[str, object]) -> None:
        who = type(self).__name__
        if in_features * out_features > MAX_VIRTUAL or min(in_features, out_features) < 1:
            raise ModelError(f"{who}: {out_features} x {in_features} must be "
                             f"positive and at most {MAX_VIRTUAL:,} weights")
        if not 0 <= seed <= MAX_SEED:
            raise ModelError(f"{who}: seed must be in 0..{MAX_SEED}, got {seed}")
        self.in_features, self.out_features, self.seed = in_features, out_features, seed
        self.weight = nn.Parameter(torch.empty(*shape, **factory))  # type: ignore[arg-type]
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None  # type: ignore[arg-type]
        self._signs: torch.Tensor | None = None
        if self.weight.device.type != "meta":
            bound = 1.0 / math.sqrt(in_features)
            with torch.no_grad():
                self.weight.uniform_(-bound, bound)
                if self.bias is not None:
                    self.bias.uniform_(-bound, bound)

    def signs(self) -> torch.Tensor:
        """``D`` as a float vector on the weight's device (cached)."""
        w = self.weight
        if self._signs is None or self._signs.device != w.device or self._signs.dtype != w.dtype:
            self._signs = input_signs(self.in_features, self.seed, w.device).to(w.dtype)
        return self._signs

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        self._signs = None
        return super()._apply(fn, recurse)

    def _project(self, weight: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
        """Mean of the sign-corrected entries of ``weight`` ``[out, in]`` that share each of the
        ``size`` parameters (``index``: parameter of every entry): the Frobenius-nearest
        structured matrix (parameters no entry uses get 0)."""
        w = (weight.detach().to(self.weight) * self.signs()).reshape(-1)
        flat = index.reshape(-1)
        sums = torch.zeros(size, dtype=w.dtype, device=w.device).index_add_(0, flat, w)
        counts = torch.bincount(flat, minlength=size).to(w.dtype)
        return sums / counts.clamp_min(1)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"params={self.weight.numel()}, seed={self.seed}, bias={self.bias is not None}")


class CirculantLinear(_Structured):
    """``y = (stacked circulant C(r_b)) · D · x`` truncated to ``out_features``, by FFT.

    ``weight`` holds the ``blocks × n`` defining vectors (``n = in_features``,
    ``blocks = ceil(out / n)``); ``D`` is regenerated from ``seed``.
    """

    structure = "circulant"

    def __init__(self, in_features: int, out_features: int, seed: int = 0, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None
                 ) -> None:
        super().__init__()
        self.blocks = -(-out_features // max(1, in_features))
        self._init_structured(in_features, out_features, seed, bias,
                              (self.blocks, in_features), {"device": device, "dtype": dtype})

    def dense_weight(self) -> torch.Tensor:
        """The explicit ``[out, in]`` matrix."""
        c = circulant_matrix(self.weight).reshape(self.blocks * self.in_features,
                                                  self.in_features)
        return (c * self.signs())[: self.out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.in_features
        xs = x * self.signs()
        fx = torch.fft.rfft(xs, n=n)
        fr = torch.fft.rfft(self.weight, n=n)  # [blocks, n//2+1]
        y = torch.fft.irfft(fx.unsqueeze(-2) * fr, n=n)  # [..., blocks, n]
        y = y.flatten(-2)[..., : self.out_features]
        return y if self.bias is None else y + self.bias

    def load_dense(self, weight: torch.Tensor) -> None:
        """The nearest (Frobenius) structured matrix to ``weight``: each ``r_b[k]`` is the mean
        of the sign-corrected entries of its wrapped diagonal."""
        n, d = self.in_features, self.out_features
        a = torch.arange(d, device=self.weight.device).unsqueeze(1)
        b = torch.arange(n, device=self.weight.device).unsqueeze(0)
        index = (a // n) * n + (a - b) % n
        with torch.no_grad():
            self.weight.copy_(self._project(weight, index, self.blocks * n).view(self.blocks, n))


class ToeplitzLinear(_Structured):
    """``y = T(t) · D · x``: an ``out × in`` Toeplitz map ``T[a, b] = t[a - b + in - 1]`` from
    ``out + in - 1`` parameters (``2n - 1`` for a square map), computed by embedding ``T`` in a
    circulant of :func:`toeplitz_fft_size` (``2n``) and FFT; ``D`` as in :class:`CirculantLinear`.
    """

    structure = "toeplitz"

    def __init__(self, in_features: int, out_features: int, seed: int = 0, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None
                 ) -> None:
        super().__init__()
        self._init_structured(in_features, out_features, seed, bias,
                              (out_features + in_features - 1,),
                              {"device": device, "dtype": dtype})

    def dense_weight(self) -> torch.Tensor:
        """The explicit ``[out, in]`` matrix."""
        return toeplitz_matrix(self.weight, self.out_features, self.in_features) * self.signs()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, d = self.in_features, self.out_features
        size = toeplitz_fft_size(d, n)
        fx = torch.fft.rfft(x * self.signs(), n=size)
        ft = torch.fft.rfft(self.weight, n=size)
        y = torch.fft.irfft(fx * ft, n=size)[..., n - 1: n - 1 + d]
        return y if self.bias is None else y + self.bias

    def load_dense(self, weight: torch.Tensor) -> None:
        """The nearest (Frobenius) Toeplitz-with-signs matrix to ``weight``: each ``t[k]`` is
        the mean of the sign-corrected entries of its diagonal."""
        n, d = self.in_features, self.out_features
        a = torch.arange(d, device=self.weight.device).unsqueeze(1)
        b = torch.arange(n, device=self.weight.device).unsqueeze(0)
        with torch.no_grad():
            self.weight.copy_(self._project(weight, a - b + n - 1, d + n - 1))


STRUCTURED: dict[str, type[CirculantLinear] | type[ToeplitzLinear]] = {
    "circulant": CirculantLinear, "toeplitz": ToeplitzLinear}
"""The structured-projection layer of each ``structure`` of the ``circulant`` method."""


# --------------------------------------------------------------------------------- registry

_FEATURES = int_option(1, 1 << 24)
_SEED = int_option(0, MAX_SEED)
_CHECK = optional_option(int_option(0, _M32))
_WIN = ints_option(2, 1, 1024)

register_kind("HashedLinear", HashedLinear, {
    "in_features": _FEATURES, "out_features": _FEATURES,
    "buckets": int_option(1, MAX_BUCKETS), "seed": _SEED, "bias": bool_option, "check": _CHECK,
})
register_kind("HashedConv2d", HashedConv2d, {
    "in_channels": _FEATURES, "out_channels": _FEATURES, "kernel_size": _WIN,
    "buckets": int_option(1, MAX_BUCKETS), "seed": _SEED, "stride": _WIN,
    "padding": ints_option(2, 0, 1024), "dilation": _WIN, "groups": _FEATURES,
    "bias": bool_option, "check": _CHECK,
})
register_kind("CirculantLinear", CirculantLinear, {
    "in_features": _FEATURES, "out_features": _FEATURES, "seed": _SEED, "bias": bool_option,
})
# Its own kind (not an option of CirculantLinear's): a kind's stored options must be exactly its
# registered ones, so a new CirculantLinear option would make every older file unreadable.
register_kind("ToeplitzLinear", ToeplitzLinear, {
    "in_features": _FEATURES, "out_features": _FEATURES, "seed": _SEED, "bias": bool_option,
})


# --------------------------------------------------------------------------------- zoo model


class HashedMLP(nn.Module):
    """An MLP whose every layer is a :class:`HashedLinear` at compression ``factor``."""

    def __init__(self, hidden: Sequence[int], factor: float, num_classes: int = 10,
                 in_features: int = 784, seed: int = 0) -> None:
        super().__init__()
        sizes = [in_features, *hidden, num_classes]
        layers = []
        for k, (a, b) in enumerate(itertools.pairwise(sizes)):
            layers.append(HashedLinear(a, b, buckets_for(a * b, factor),
                                       seed=(seed + k) & _M32))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        for k, layer in enumerate(self.layers):
            x = layer(x)
            if k < len(self.layers) - 1:
                x = F.relu(x)
        return x


@register_model(
    "hashed-mlp",
    input_shape=(1, 28, 28),
    description="MLP of HashedLinear layers at a compression factor (Chen et al. 2015)",
    limits={"factor": 1.0, "seed": MAX_SEED},
)
def hashed_mlp(hidden: list = [1000], factor: float = 0.125,  # noqa: B006 (JSON default)
               num_classes: int = 10, in_features: int = 784, seed: int = 1) -> HashedMLP:
    """HashedNets MLP: ``hidden`` sizes, every layer hashed at ``factor`` (e.g. 1/8, 1/64)."""
    require_positive("hashed-mlp", num_classes=num_classes, in_features=in_features,
                     factor=factor)
    if (not isinstance(hidden, list) or not 1 <= len(hidden) <= 16
            or not all(type(h) is int and 1 <= h <= 65536 for h in hidden)):
        raise ModelError(f"model 'hashed-mlp' option 'hidden' must be a list of 1..16 ints in "
                         f"1..65536, got {hidden!r:.60}")
    return HashedMLP(hidden, factor, num_classes, in_features, seed)
