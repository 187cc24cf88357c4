"""Sparse variational dropout (Molchanov, Ashukha & Vetrov 2017): learned per-weight dropout rates.

Each selected layer's weight ``θ`` gets a learned log-variance ``log σ²`` of the same shape: the
weight is Gaussian, ``w ~ N(θ, σ²)``, with dropout rate ``α = σ²/θ²``. Training minimizes the
data loss plus the KL divergence from the log-uniform prior, approximated as in the paper
(``-KL ≈ k1·sigmoid(k2 + k3·log α) − ½·log(1 + 1/α) − k1``), summed over the weights and divided
by the training-set size (the per-sample ELBO). The KL pushes ``log α`` up; weights whose
``log α`` exceeds ``threshold`` (3: dropout rate above 95 %) carry only noise and are pruned.

Training form: the layer keeps its type and weight; the method adds a ``log_sigma2`` parameter to
it and a forward hook that, in training, adds the local-reparameterization noise
``sqrt(op(x², σ²))·ε`` to the layer's output (``op`` the layer's own linear map: ``F.linear`` or
its convolution), and at evaluation recomputes the output with the weights of ``log α ≥
threshold`` set to 0 — the model evaluates as it will be stored. ``loss_terms`` gives the KL term
(with an optional linear warm-up of its weight), which ``fit`` / ``CompressionSession.loss_term``
add to the loss. ``finalize`` removes the parameter and hook and leaves the layer pruned: its
weight under a :class:`~deepsqueeze.methods.pruning.PruningMask` (an existing mask is narrowed),
so later stages (``share``) keep the zeros and the codec stores sparse positions by itself.

Composes after ``prune`` (pruned weights stay 0 and count as dropped); a layer under another
parametrization (``share``'s codebook, fake quantization) is refused.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from deepsqueeze.data.loaders import sample_count
from deepsqueeze.errors import ModelError
from deepsqueeze.methods.base import LossTerm, Method, MethodParams, register_method
from deepsqueeze.methods.pruning import PruningMask, plain_or_pruned

# The paper's fit of -KL(q || log-uniform prior) as a function of log α (its eq. 14).
_K1, _K2, _K3 = 0.63576, 1.87320, 1.48695
_LOG_ALPHA_RANGE = (-10.0, 10.0)  # clamped, as in the authors' code: keeps σ² from underflowing
_EPS = 1e-8


def log_alpha(weight: torch.Tensor, log_sigma2: torch.Tensor) -> torch.Tensor:
    """``log α = log σ² − log θ²``, clamped to [-10, 10]."""
    return torch.clamp(log_sigma2 - torch.log(weight * weight + _EPS), *_LOG_ALPHA_RANGE)


def kl_divergence(log_alpha_: torch.Tensor) -> torch.Tensor:
    """The paper's approximation of ``KL(N(θ, αθ²) || log-uniform)``, summed over the weights."""
    neg_kl = (_K1 * torch.sigmoid(_K2 + _K3 * log_alpha_)
              - 0.5 * F.softplus(-log_alpha_) - _K1)
    return -neg_kl.sum()


def _linear_map(module: nn.Module, x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    return module._conv_forward(x, weight, bias)  # type: ignore[operator]


class _LayerState:
    """What the method added to one layer: its ``log_sigma2`` parameter and forward hook."""

    def __init__(self, module: nn.Module, init: float, threshold: float) -> None:
        self.module = module
        self.threshold = threshold
        module.register_parameter(
            "log_sigma2", nn.Parameter(torch.full_like(module.weight.detach(), init))
        )
        self.handle = module.register_forward_hook(self._forward)

    def log_alpha(self) -> torch.Tensor:
        return log_alpha(self.module.weight, self.module.log_sigma2)

    def keep(self) -> torch.Tensor:
        """Weights kept at evaluation (and by ``finalize``): ``log α < threshold``, nonzero."""
        w = self.module.weight
        return (self.log_alpha() < self.threshold) & (w != 0)

    def _forward(self, module: nn.Module, inputs: tuple[Any, ...],
                 output: torch.Tensor) -> torch.Tensor:
        (x,) = inputs
        if module.training:  # local reparameterization: noise on the pre-activation
            var = _linear_map(module, x * x, torch.exp(module.log_sigma2), None)
            return output + torch.sqrt(var + _EPS) * torch.randn_like(output)
        w = module.weight
        sparse = torch.where(self.keep(), w, torch.zeros((), dtype=w.dtype, device=w.device))
        return _linear_map(module, x, sparse, module.bias)

    def remove(self) -> None:
        self.handle.remove()
        del self.module.log_sigma2


class SparseVDParams(MethodParams):
    """Parameters of ``sparse-vd``."""

    threshold: float = Field(3.0, ge=-10, le=10, description="log α above which a weight is "
                             "pruned (3: dropout rate above 95 %)")
    kl_weight: float = Field(1.0, ge=0, description="final weight of the KL term (1: the ELBO)")
    warmup_steps: int = Field(0, ge=0, description="optimizer steps over which the KL weight "
                              "rises linearly from 0 to kl_weight")
    init_log_sigma2: float = Field(-10.0, ge=-20, le=0, description="initial log σ² of every "
                                   "weight (small: training starts from the dense model)")
    train_size: int | None = Field(None, ge=1, description="training samples the KL is divided "
                                   "by; default: the stage's training data")
    layers: list[str] | None = None


@register_method
class SparseVariationalDropout(Method):
    """Learned per-weight Gaussian dropout with a log-uniform prior; weights with ``log α`` above
    ``threshold`` are pruned (Molchanov et al. 2017)."""

    name = "sparse-vd"
    Params = SparseVDParams
    supported = (nn.Linear, nn.Conv1d, nn.Conv2d)
    params: SparseVDParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._states: dict[str, _LayerState] = {}
        self._data_size: int | None = None

    def use_data(self, data: Any, loss_fn: Any = None) -> None:
        self._data_size = sample_count(data)

    def use_train_size(self, size: int | None) -> None:
        if size is not None:
            self._data_size = size

    @property
    def train_size(self) -> int:
        size = self.params.train_size or self._data_size
        if not size:
            raise ModelError(
                "sparse-vd: the KL term is divided by the training-set size, which is unknown "
                "here; set params.train_size (e.g. 60000 for MNIST)"
            )
        return size

    def apply(self, model: nn.Module, layers: dict[str, nn.Module]) -> None:
        for name, module in layers.items():  # validate everything before changing anything
            if hasattr(module, "log_sigma2"):
                raise ModelError(f"layer {name!r} already has a log_sigma2 (sparse-vd twice?)")
            plain_or_pruned(module, name, "sparse-vd", "apply sparse-vd before share/quantize")
        self.train_size  # noqa: B018 (raises now, not at the first batch)
        self._states = {
            name: _LayerState(module, self.params.init_log_sigma2, self.params.threshold)
            for name, module in layers.items()
        }

    def kl_weight_at(self, step: int) -> float:
        """The KL term's weight at optimizer step ``step`` (0-based): linear warm-up."""
        if self.params.warmup_steps == 0:
            return self.params.kl_weight
        return self.params.kl_weight * min(1.0, (step + 1) / self.params.warmup_steps)

    def kl(self) -> torch.Tensor:
        """The KL divergence of every selected layer, summed (not scaled)."""
        terms = [kl_divergence(state.log_alpha()) for state in self._states.values()]
        return torch.stack(terms).sum()

    def _loss_term(self, step: int, model: nn.Module) -> torch.Tensor:
        return self.kl() * (self.kl_weight_at(step) / self.train_size)

    def loss_terms(self) -> list[LossTerm]:
        return [self._loss_term]

    def finalize(self, model: nn.Module) -> None:
        """Prune the weights with ``log α ≥ threshold``; remove ``log_sigma2`` and the hook."""
        with torch.no_grad():
            for name, state in self._states.items():
                module = state.module
                if not torch.isfinite(module.weight).all():
                    raise ModelError(f"layer {name!r}: weights became NaN/inf in fine-tuning")
                keep = state.keep()
                state.remove()
                pruned = plain_or_pruned(module, name, "sparse-vd", "")
                if pruned is not None:
                    pruned.mask.copy_(pruned.mask & keep)
                else:
                    module.weight.mul_(keep)
                    parametrize.register_parametrization(module, "weight", PruningMask(keep))
        self.kept = {name: float(_kept(state.module)) for name, state in self._states.items()}

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        kept = getattr(self, "kept", None)
        if kept is None and self._states:
            with torch.no_grad():
                kept = {n: float(s.keep().float().mean()) for n, s in self._states.items()}
        if kept is not None:
            out["kept_fraction"] = kept
        if self._states:
            out["kl_divisor"] = self.train_size
        return out


def _kept(module: nn.Module) -> float:
    w = module.weight
    return float((w != 0).float().mean()) if w.numel() else math.nan
