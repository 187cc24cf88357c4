"""Executors of the low-rank layer kind LowRankLinear (``W ≈ A·B``).

When both factors are stored dense, the layer is read as one :class:`FactorForm` and the
autotuner times two ways to run it:

``factors``
    two products, ``(x Bᵀ) Aᵀ + b``: ``k·(m + n)`` multiply-adds per sample, holds the factors.
``product``
    ``A·B`` multiplied out once at load, then one product ``x Wᵀ + b``: ``m·n`` multiply-adds,
    holds the m × n matrix (so the memory budget usually rules it out unless k is large).

When a factor is stored compressed (pruned: sparse positions; shared: codebook indices), the
layer is not read as a whole: its ``first`` / ``second`` children run with the sparse and
codebook executors of any Linear. LowRankConv2d and TuckerConv2d always run child by child.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deepsqueeze.errors import DsqFormatError
from deepsqueeze.models.low_rank import LowRankLinear
from deepsqueeze.runtime.forms import LayerForm, register_layer_form
from deepsqueeze.runtime.layers import Impl, RuntimeLayer, register_impl

__all__ = ["FactorForm", "FactorsLinear", "ProductLinear", "read_low_rank_linear"]


@dataclass
class FactorForm:
    """The two dense factors of a LowRankLinear: ``a`` (out × k), ``b`` (k × in)."""

    a: torch.Tensor
    b: torch.Tensor


def read_low_rank_linear(name: str, module: nn.Module, stored: Any) -> LayerForm | None:
    """Both factors when both are stored dense (else None: the children run on their own)."""
    assert isinstance(module, LowRankLinear)
    keys = [f"{name}.first.weight", f"{name}.second.weight"]
    if any(stored.entries.get(k, {}).get("encoding") != "dense" for k in keys):
        return None
    b, a = (stored.decode(k).float() for k in keys)
    k, m, n = module.rank, module.out_features, module.in_features
    if tuple(b.shape) != (k, n) or tuple(a.shape) != (m, k):
        raise DsqFormatError(
            f"low-rank layer {name!r}: factors of shapes {list(a.shape)} and {list(b.shape)} "
            f"do not fit out={m}, rank={k}, in={n}"
        )
    tensors = list(keys)
    bias = None
    if module.bias is not None:
        bias = stored.decode(f"{name}.second.bias").float()
        if tuple(bias.shape) != (m,):
            raise DsqFormatError(f"low-rank layer {name!r}: bias of shape {list(bias.shape)}, "
                                 f"expected [{m}]")
        tensors.append(f"{name}.second.bias")
    kept = k * (m + n)
    return LayerForm(FactorForm(a.contiguous(), b.contiguous()), bias, tensors, [m, n],
                     f"low-rank (k={k})", kept, kept / max(1, m * n))


class FactorsLinear(RuntimeLayer):
    """``(x Bᵀ) Aᵀ + b``: the two factors, two products."""

    impl = "factors"

    def __init__(self, form: FactorForm, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.cols = form.b.shape[1]
        self.register_buffer("a", form.a, persistent=False)
        self.register_buffer("b", form.b, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_input(x, self.cols)
        return F.linear(F.linear(x, self.b), self.a, self.bias)


class ProductLinear(RuntimeLayer):
    """``x Wᵀ + b`` with ``W = A·B`` multiplied out at load."""

    impl = "product"

    def __init__(self, form: FactorForm, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.cols = form.b.shape[1]
        self.register_buffer("weight", (form.a @ form.b).contiguous(), persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_input(x, self.cols)
        return F.linear(x, self.weight, self.bias)


def _is_factors(form: Any, module: nn.Module) -> bool:
    return isinstance(form, FactorForm)


register_layer_form(LowRankLinear, read_low_rank_linear)
register_impl(LowRankLinear, Impl("factors", lambda f, b, m: FactorsLinear(f, b), _is_factors,
                                  True))
register_impl(LowRankLinear, Impl("product", lambda f, b, m: ProductLinear(f, b), _is_factors,
                                  False))
