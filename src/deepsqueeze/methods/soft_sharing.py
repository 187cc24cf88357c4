"""Soft weight-sharing (Ullrich, Meeds & Welling 2017): a Gaussian-mixture prior on the weights.

Each selected layer gets a mixture of ``2**bits`` Gaussians over its weights: component 0 is
pinned at 0 with a large fixed mixing weight (``zero_mixing``), the others have learned means,
variances and mixing weights. During fine-tuning the mixture and the weights are fitted to each
other: every ``em_every`` optimizer steps the mixture takes an EM step on the layer's weights
(responsibilities, then means / variances / mixing weights); after every step each weight moves
a fraction ``pull`` of the way toward its responsibility-weighted mean
``sum_k r_k(w) mu_k`` -- the gradient step on the prior's negative log-likelihood
``-log sum_k pi_k N(w | mu_k, sigma_k^2)``, preconditioned by the component variances (so one
step size suits every layer's scale). ``pull`` ramps from 0 to its final value over the stage
(cubic, like the pruning schedule), so the network first fits the data, then clusters. Weights
whose most responsible component is the zero one are thereby pruned, the others share the
component means.

``finalize`` snaps every weight to the mean of its most responsible component: the layer then
holds at most ``2**bits - 1`` distinct non-zero values, which the codec stores as a sparse
codebook (positions + Huffman-coded indices) by itself. No new layer kind, no runtime change.

Composes with ``prune``: on a masked layer only the kept weights are clustered (pruned ones stay
0). Layers under another parametrization (e.g. ``share``'s codebook) are refused: apply
soft-sharing before ``share``, or instead of it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field
from torch import nn

from deepsqueeze.errors import ModelError
from deepsqueeze.methods.base import (
    WEIGHT_LAYERS,
    Method,
    MethodParams,
    StepHook,
    per_layer,
    register_method,
)
from deepsqueeze.methods.pruning import plain_or_pruned


class GaussianMixturePrior:
    """The mixture of one layer: component 0 at 0 with fixed mixing weight ``zero_mixing``."""

    def __init__(self, weights: torch.Tensor, components: int, zero_mixing: float,
                 min_std: float) -> None:
        w = weights.detach().double()
        if w.numel() == 0:
            raise ModelError("soft-share: a layer has no (unpruned) weights to cluster")
        top = float(w.abs().max())
        if not math.isfinite(top) or top == 0:
            raise ModelError("soft-share: a layer's weights are all zero or not finite")
        k = components - 1
        k_neg = k // 2
        k_pos = k - k_neg
        neg = -top * torch.arange(k_neg, 0, -1, dtype=torch.float64) / max(k_neg, 1)
        pos = top * torch.arange(1, k_pos + 1, dtype=torch.float64) / k_pos
        self.means = torch.cat([torch.zeros(1, dtype=torch.float64), neg, pos])
        spacing = 2 * top / max(k, 1)
        self.min_var = (min_std * top) ** 2
        self.vars = torch.full((components,), max(spacing**2 / 4, self.min_var),
                               dtype=torch.float64)
        self.vars[0] = max(float(w.std()) ** 2 / 4, self.min_var)
        self.zero_mixing = zero_mixing
        self.mixing = torch.full((components,), (1 - zero_mixing) / k, dtype=torch.float64)
        self.mixing[0] = zero_mixing

    def responsibilities(self, w: torch.Tensor) -> torch.Tensor:
        """``[n, K]`` posterior of each component for each weight (log-space softmax)."""
        x = w.double().reshape(-1, 1)
        logp = (torch.log(self.mixing) - 0.5 * torch.log(2 * math.pi * self.vars)
                - 0.5 * (x - self.means) ** 2 / self.vars)
        return torch.softmax(logp, dim=1)

    def em_step(self, w: torch.Tensor) -> None:
        """One EM update of means (not component 0's), variances and mixing weights."""
        x = w.double().reshape(-1, 1)
        r = self.responsibilities(w)
        n = r.sum(0) + 1e-12
        means = (r * x).sum(0) / n
        var = (r * (x - means) ** 2).sum(0) / n
        var[0] = (r[:, 0] * x[:, 0] ** 2).sum() / n[0]
        means[0] = 0.0
        self.means = means
        self.vars = var.clamp_min(self.min_var)
        rest = n[1:] / n[1:].sum()
        self.mixing = torch.cat([torch.tensor([self.zero_mixing], dtype=torch.float64),
                                 (1 - self.zero_mixing) * rest.clamp_min(1e-8)])
        self.mixing = self.mixing / self.mixing.sum()

    def target(self, w: torch.Tensor) -> torch.Tensor:
        """Responsibility-weighted mean of each weight (the pull's destination)."""
        return (self.responsibilities(w) @ self.means).to(w.dtype).reshape(w.shape)

    def snap(self, w: torch.Tensor) -> torch.Tensor:
        """Each weight replaced by the mean of its most responsible component."""
        best = self.responsibilities(w).argmax(1)
        return self.means[best].to(w.dtype).reshape(w.shape)


def _storage(name: str, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the tensor the optimizer trains, the kept-positions mask or None) of a layer."""
    mask = plain_or_pruned(module, name, "soft-share",
                           "apply soft-share before share/quantize, or instead of share")
    if mask is None:
        return module.weight, None
    return module.parametrizations.weight.original, mask.mask


class SoftSharingParams(MethodParams):
    """Parameters of ``soft-share``."""

    bits: int | dict[str, int] = Field(
        3, description="2**bits mixture components, the zero one included; one value or {glob: n}"
    )
    zero_mixing: float = Field(0.9, gt=0, lt=1, description="fixed prior weight of the zero "
                               "component (higher prunes more)")
    pull: float = Field(0.02, gt=0, le=1, description="final fraction of the way a weight moves "
                        "toward its mixture target after each optimizer step")
    steps: int = Field(2000, ge=1, description="optimizer steps over which pull ramps up "
                       "(cubic); set it to the stage's steps")
    em_every: int = Field(10, ge=1, description="optimizer steps between EM updates")
    min_std: float = Field(1e-3, gt=0, lt=1, description="smallest component std, as a "
                           "fraction of the layer's largest |weight|")
    layers: list[str] | None = None


@register_method
class SoftSharing(Method):
    """Soft weight-sharing: a Gaussian-mixture prior that clusters and prunes during training
    (Ullrich et al. 2017); ``finalize`` snaps the weights to the component means."""

    name = "soft-share"
    Params = SoftSharingParams
    supported = WEIGHT_LAYERS
    params: SoftSharingParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.priors: dict[str, GaussianMixturePrior] = {}
        self._layers: dict[str, nn.Module] = {}

    def apply(self, model: nn.Module, layers: dict[str, nn.Module]) -> None:
        bits = per_layer(self.params.bits, layers, "soft-share.bits")
        for name, b in bits.items():
            if not 2 <= b <= 8:
                raise ModelError(
                    f"soft-share.bits for {name!r} is {b}; use 2..8 (2**bits components, "
                    "the zero one included)"
                )
        priors = {}
        for name, module in layers.items():  # validate everything before keeping anything
            weight, mask = _storage(name, module)
            kept = weight.detach() if mask is None else weight.detach()[mask.bool()]
            priors[name] = GaussianMixturePrior(kept, 2 ** bits[name],
                                                self.params.zero_mixing, self.params.min_std)
        self.priors, self._layers = priors, dict(layers)

    def pull_at(self, step: int) -> float:
        """The pull after optimizer step ``step`` (0-based): cubic ramp to ``pull``."""
        t = min(1.0, (step + 1) / self.params.steps)
        return self.params.pull * (1 - (1 - t) ** 3)

    def _update(self, step: int, model: nn.Module) -> None:
        alpha = self.pull_at(step)
        with torch.no_grad():
            for name, module in self._layers.items():
                weight, mask = _storage(name, module)
                prior = self.priors[name]
                kept = weight if mask is None else weight[mask.bool()]
                if (step + 1) % self.params.em_every == 0:
                    prior.em_step(kept)
                moved = kept + alpha * (prior.target(kept) - kept)
                if mask is None:
                    weight.copy_(moved)
                else:
                    weight[mask.bool()] = moved

    def step_hooks(self) -> list[StepHook]:
        return [self._update]

    def finalize(self, model: nn.Module) -> None:
        """Snap every (kept) weight to its most responsible component's mean."""
        with torch.no_grad():
            for name, module in self._layers.items():
                weight, mask = _storage(name, module)
                prior = self.priors[name]
                if not torch.isfinite(weight).all():
                    raise ModelError(f"layer {name!r}: weights became NaN/inf in fine-tuning")
                if mask is None:
                    prior.em_step(weight)
                    weight.copy_(prior.snap(weight))
                else:
                    keep = mask.bool()
                    prior.em_step(weight[keep])
                    weight[keep] = prior.snap(weight[keep])

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        out["nonzero_fraction"] = {
            name: float((module.weight != 0).float().mean())
            for name, module in self._layers.items()
        }
        return out
