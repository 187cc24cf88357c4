"""Layer kinds of the low-rank family: factorized Linear and Conv2d layers.

Each kind holds its factors as plain ``nn.Linear`` / ``nn.Conv2d`` children, so every other
method (pruning, weight sharing) and the codec see ordinary layers: a pruned factor is stored as
sparse positions, a shared factor as codebook indices, and the runtime runs each child with its
own executors.

- :class:`LowRankLinear` — ``W ≈ A·B``: ``first = Linear(in, rank)`` (B, no bias), then
  ``second = Linear(rank, out)`` (A, the original bias).
- :class:`LowRankConv2d` — channel decomposition (Jaderberg et al. 2014; Denton et al. 2014;
  Zhang et al. 2015): a k×k conv ``C → rank`` with the original stride/padding/dilation, then a
  1×1 conv ``rank → O`` with the original bias.
- :class:`TuckerConv2d` — Tucker-2 (Kim et al. 2016): 1×1 ``C → rank_in``, k×k core
  ``rank_in → rank_out`` (stride/padding/dilation of the original), 1×1 ``rank_out → O`` + bias.
- :class:`CPConv2d` — CP (Lebedev et al. 2015): 1×1 ``C → rank``, depthwise kh×1 and 1×kw
  (the original stride/padding/dilation split by axis), 1×1 ``rank → O`` + bias.

The constructor arguments are the kind's options (read back from attributes of the same names);
``cls(**options)`` rebuilds an equivalent, uninitialized module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from deepsqueeze.errors import ModelError
from deepsqueeze.models.graph import bool_option, int_option, ints_option, register_kind

MAX_FEATURES = 1 << 24
MAX_KERNEL = 1 << 10


def _pair(value: int | tuple[int, ...] | list[int], what: str) -> tuple[int, int]:
    if isinstance(value, bool):
        raise ModelError(f"{what} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return (int(value[0]), int(value[1]))
    raise ModelError(f"{what} must be an int or a pair of ints, got {value!r}")


def _positive(**values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ModelError(f"{name} must be a positive int, got {v!r}")


class _Factored(nn.Module, ABC):
    """Checks, when a state dict is loaded, that the factors have the shapes the options say
    (a file whose options disagree with its tensors is refused, not silently resized)."""

    @abstractmethod
    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Expected shape of each factor tensor, by state-dict key below this module."""

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        error_msgs = args[-1]
        for key, shape in self.factor_shapes().items():
            value = state_dict.get(prefix + key)
            if value is not None and tuple(value.shape) != shape:
                error_msgs.append(
                    f"{prefix}{key}: stored shape {list(value.shape)} does not fit the layer's "
                    f"options ({type(self).__name__} needs {list(shape)})"
                )
        super()._load_from_state_dict(state_dict, prefix, *args)


class LowRankLinear(_Factored):
    """``y = second(first(x))``: a Linear layer factorized through ``rank`` features."""

    def __init__(
        self, in_features: int, out_features: int, rank: int, bias: bool = True,
        device: Any = None, dtype: Any = None,
    ) -> None:
        super().__init__()
        _positive(in_features=in_features, out_features=out_features, rank=rank)
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        """The layer's bias (held by ``second``)."""
        return self.second.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"first.weight": (self.rank, self.in_features),
                "second.weight": (self.out_features, self.rank),
                "second.bias": (self.out_features,)}

    def dense_weight(self) -> torch.Tensor:
        """The product ``A·B`` (out × in) the two factors stand for."""
        return self.second.weight @ self.first.weight

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}")


class _FactorConv(_Factored):
    """Shared geometry of the factorized convolutions."""

    def _geometry(
        self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any, padding: Any,
        dilation: Any,
    ) -> None:
        _positive(in_channels=in_channels, out_channels=out_channels)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        if min(self.kernel_size + self.stride + self.dilation) < 1 or min(self.padding) < 0:
            raise ModelError(
                f"kernel_size, stride and dilation must be >= 1 and padding >= 0, got "
                f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}"
            )
        if max(self.kernel_size + self.stride + self.dilation + self.padding) > MAX_KERNEL:
            raise ModelError(f"conv geometry above {MAX_KERNEL}: {self.kernel_size}, "
                             f"{self.stride}, {self.padding}, {self.dilation}")

    def _geometry_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}")


class LowRankConv2d(_FactorConv):
    """Channel decomposition: k×k conv ``C → rank`` (``first``), 1×1 conv ``rank → O``
    (``second``, with the bias)."""

    def __init__(
        self, in_channels: int, out_channels: int, rank: int, kernel_size: Any,
        stride: Any = 1, padding: Any = 0, dilation: Any = 1, bias: bool = True,
        device: Any = None, dtype: Any = None,
    ) -> None:
        super().__init__()
        self._geometry(in_channels, out_channels, kernel_size, stride, padding, dilation)
        _positive(rank=rank)
        self.rank = rank
        self.first = nn.Conv2d(in_channels, rank, self.kernel_size, stride=self.stride,
                               padding=self.padding, dilation=self.dilation, bias=False,
                               device=device, dtype=dtype)
        self.second = nn.Conv2d(rank, out_channels, 1, bias=bias, device=device, dtype=dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.second.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"first.weight": (self.rank, self.in_channels, *self.kernel_size),
                "second.weight": (self.out_channels, self.rank, 1, 1),
                "second.bias": (self.out_channels,)}

    def dense_weight(self) -> torch.Tensor:
        """The O×C×kh×kw kernel the factors stand for."""
        a = self.second.weight.flatten(1)  # O × r
        b = self.first.weight.flatten(1)  # r × C·kh·kw
        return (a @ b).view(self.out_channels, self.in_channels, *self.kernel_size)

    def extra_repr(self) -> str:
        return f"{self._geometry_repr()}, rank={self.rank}, bias={self.bias is not None}"


class TuckerConv2d(_FactorConv):
    """Tucker-2: 1×1 ``C → rank_in`` (``first``), k×k ``rank_in → rank_out`` (``core``),
    1×1 ``rank_out → O`` (``last``, with the bias)."""

    def __init__(
        self, in_channels: int, out_channels: int, rank_in: int, rank_out: int, kernel_size: Any,
        stride: Any = 1, padding: Any = 0, dilation: Any = 1, bias: bool = True,
        device: Any = None, dtype: Any = None,
    ) -> None:
        super().__init__()
        self._geometry(in_channels, out_channels, kernel_size, stride, padding, dilation)
        _positive(rank_in=rank_in, rank_out=rank_out)
        self.rank_in = rank_in
        self.rank_out = rank_out
        self.first = nn.Conv2d(in_channels, rank_in, 1, bias=False, device=device, dtype=dtype)
        self.core = nn.Conv2d(rank_in, rank_out, self.kernel_size, stride=self.stride,
                              padding=self.padding, dilation=self.dilation, bias=False,
                              device=device, dtype=dtype)
        self.last = nn.Conv2d(rank_out, out_channels, 1, bias=bias, device=device, dtype=dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.last.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(x)))

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"first.weight": (self.rank_in, self.in_channels, 1, 1),
                "core.weight": (self.rank_out, self.rank_in, *self.kernel_size),
                "last.weight": (self.out_channels, self.rank_out, 1, 1),
                "last.bias": (self.out_channels,)}

    def dense_weight(self) -> torch.Tensor:
        """The O×C×kh×kw kernel the factors stand for: core ×₀ U_out ×₁ U_in."""
        u_in = self.first.weight.flatten(1)  # r_in × C
        u_out = self.last.weight.flatten(1)  # O × r_out
        core = self.core.weight  # r_out × r_in × kh × kw
        return torch.einsum("or,rshw,sc->ochw", u_out, core, u_in)

    def extra_repr(self) -> str:
        return (f"{self._geometry_repr()}, rank_in={self.rank_in}, rank_out={self.rank_out}, "
                f"bias={self.bias is not None}")


class CPConv2d(_FactorConv):
    """Rank-R CP decomposition ``W[o,c,i,j] = Σ_r L[o,r] V[r,i] H[r,j] F[r,c]``: 1×1
    ``C → rank`` (``first`` = F), depthwise kh×1 (``vertical`` = V), depthwise 1×kw
    (``horizontal`` = H), 1×1 ``rank → O`` (``last`` = L, with the bias)."""

    def __init__(
        self, in_channels: int, out_channels: int, rank: int, kernel_size: Any,
        stride: Any = 1, padding: Any = 0, dilation: Any = 1, bias: bool = True,
        device: Any = None, dtype: Any = None,
    ) -> None:
        super().__init__()
        self._geometry(in_channels, out_channels, kernel_size, stride, padding, dilation)
        _positive(rank=rank)
        self.rank = rank
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        (ph, pw), (dh, dw) = self.padding, self.dilation
        self.first = nn.Conv2d(in_channels, rank, 1, bias=False, device=device, dtype=dtype)
        self.vertical = nn.Conv2d(rank, rank, (kh, 1), stride=(sh, 1), padding=(ph, 0),
                                  dilation=(dh, 1), groups=rank, bias=False, device=device,
                                  dtype=dtype)
        self.horizontal = nn.Conv2d(rank, rank, (1, kw), stride=(1, sw), padding=(0, pw),
                                    dilation=(1, dw), groups=rank, bias=False, device=device,
                                    dtype=dtype)
        self.last = nn.Conv2d(rank, out_channels, 1, bias=bias, device=device, dtype=dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.last.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.horizontal(self.vertical(self.first(x))))

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        kh, kw = self.kernel_size
        return {"first.weight": (self.rank, self.in_channels, 1, 1),
                "vertical.weight": (self.rank, 1, kh, 1),
                "horizontal.weight": (self.rank, 1, 1, kw),
                "last.weight": (self.out_channels, self.rank, 1, 1),
                "last.bias": (self.out_channels,)}

    def dense_weight(self) -> torch.Tensor:
        """The O×C×kh×kw kernel the factors stand for."""
        f = self.first.weight.flatten(1)  # R × C
        v = self.vertical.weight.flatten(1)  # R × kh
        h = self.horizontal.weight.flatten(1)  # R × kw
        last = self.last.weight.flatten(1)  # O × R
        return torch.einsum("or,ri,rj,rc->ocij", last, v, h, f)

    def extra_repr(self) -> str:
        return f"{self._geometry_repr()}, rank={self.rank}, bias={self.bias is not None}"


def _register() -> None:
    """Register the kinds with the models layer (options = constructor arguments)."""
    feat = int_option(1, MAX_FEATURES)
    geometry = {
        "in_channels": feat, "out_channels": feat,
        "kernel_size": ints_option(2, 1, MAX_KERNEL), "stride": ints_option(2, 1, MAX_KERNEL),
        "padding": ints_option(2, 0, MAX_KERNEL), "dilation": ints_option(2, 1, MAX_KERNEL),
        "bias": bool_option,
    }
    register_kind("LowRankLinear", LowRankLinear, {
        "in_features": feat, "out_features": feat, "rank": feat, "bias": bool_option,
    })
    register_kind("LowRankConv2d", LowRankConv2d, {**geometry, "rank": feat})
    register_kind("TuckerConv2d", TuckerConv2d, {**geometry, "rank_in": feat, "rank_out": feat})
    register_kind("CPConv2d", CPConv2d, {**geometry, "rank": feat})


_register()

__all__ = ["CPConv2d", "LowRankConv2d", "LowRankLinear", "TuckerConv2d"]
