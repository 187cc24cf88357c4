"""Magnitude pruning (Han et al. 2015; Deep Compression 2016; Zhu & Gupta 2017).

A pruned tensor is parametrized by :class:`PruningMask` (``torch.nn.utils.parametrize``): the
module's ``weight`` is computed as ``original * mask``. The mask therefore stays applied during
fine-tuning, whatever the optimizer (momentum, weight decay) does to the original, and the
effective weight the saver reads is exactly zero at pruned positions.

Masks are monotone: ranking for a new mask uses the current effective weight and never revives a
pruned position (as TF Model Optimization does), so a schedule only ever removes weights.

Usage::

    method = create_method("prune", sparsity={"conv*": 0.6, "fc*": 0.9})
    method.apply(model, select_layers(model, method.params.layers, method.supported))
    fit(model, train_set, cfg, step_hooks=method.step_hooks())
    method.finalize(model)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn
from torch.nn.utils import parametrize

from deepsqueeze.errors import ModelError
from deepsqueeze.methods.base import (
    WEIGHT_LAYERS,
    Method,
    MethodParams,
    StepHook,
    per_layer,
    register_method,
)
from deepsqueeze.methods.schedules import (
    SCHEDULE_KINDS,
    Iterative,
    OneShot,
    Polynomial,
    Schedule,
)

# --------------------------------------------------------------------------------------------
# The parametrization and helpers
# --------------------------------------------------------------------------------------------


class PruningMask(nn.Module):
    """Parametrization ``w -> w * mask`` with a boolean ``mask`` buffer of ``w``'s shape.

    Implemented with ``torch.where`` so pruned positions are exactly ``+0.0`` even if the
    original holds ``inf``; the gradient reaching the original is zero at pruned positions.
    """

    mask: torch.Tensor

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.detach().to(torch.bool).clone())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, w, torch.zeros((), dtype=w.dtype, device=w.device))

    def extra_repr(self) -> str:
        n = self.mask.numel()
        return f"shape={tuple(self.mask.shape)}, kept={int(self.mask.sum())}/{n}"


def _mask_param(module: nn.Module, tensor: str = "weight") -> PruningMask | None:
    if not parametrize.is_parametrized(module, tensor):
        return None
    for p in module.parametrizations[tensor]:
        if isinstance(p, PruningMask):
            return p
    return None


def plain_or_pruned(module: nn.Module, name: str, method: str, hint: str) -> PruningMask | None:
    """The :class:`PruningMask` of a layer whose weight is plain (None) or only pruned; a
    ``ModelError`` naming ``method`` and ``hint`` for any other parametrization."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    chain = list(module.parametrizations.weight)
    if len(chain) == 1 and isinstance(chain[0], PruningMask):
        return chain[0]
    raise ModelError(
        f"layer {name!r}: {method} works on plain or pruned weights, this one is parametrized "
        f"by {[type(p).__name__ for p in chain]}; {hint}"
    )


def masked_layers(model: nn.Module, tensor: str = "weight") -> dict[str, nn.Module]:
    """The modules of ``model`` whose ``tensor`` carries a :class:`PruningMask`, by name."""
    return {n: m for n, m in model.named_modules() if _mask_param(m, tensor) is not None}


def get_mask(module: nn.Module, tensor: str = "weight") -> torch.Tensor | None:
    """The boolean mask of ``module.<tensor>`` (True = kept), or ``None`` if it has none."""
    p = _mask_param(module, tensor)
    return None if p is None else p.mask


def set_mask(module: nn.Module, mask: torch.Tensor, tensor: str = "weight") -> PruningMask:
    """Set the mask of ``module.<tensor>``: update it in place if present, else register one."""
    target = getattr(module, tensor)
    if mask.shape != target.shape:
        raise ModelError(
            f"mask of shape {tuple(mask.shape)} does not fit {type(module).__name__}.{tensor} "
            f"of shape {tuple(target.shape)}"
        )
    p = _mask_param(module, tensor)
    if p is None:
        p = PruningMask(mask.to(target.device))
        parametrize.register_parametrization(module, tensor, p)
    else:
        p.mask.copy_(mask)
    return p


def layer_sparsity(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{name: (total, zeros)}`` of the effective weight of every weight layer (Linear, Conv1d,
    Conv2d, Embedding) or masked layer.

    Zeros are counted in the effective weight (what the saver sees), so they include any exact
    zeros the training produced besides the pruned positions.
    """
    out: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if not name:
            continue
        if isinstance(module, WEIGHT_LAYERS) or _mask_param(module) is not None:
            with torch.no_grad():
                w = module.weight
                out[name] = (w.numel(), int((w == 0).sum()))
    return out


def remove_pruning(model: nn.Module) -> list[str]:
    """Bake every mask into a plain tensor (``leave_parametrized=True``); returns the names.

    Other parametrizations of the same tensor are baked too (``parametrize`` removes a tensor's
    whole chain at once).
    """
    names: list[str] = []
    for name, module in list(model.named_modules()):
        for tensor in ("weight", "bias"):
            if _mask_param(module, tensor) is not None:
                parametrize.remove_parametrizations(module, tensor, leave_parametrized=True)
                names.append(f"{name}.{tensor}" if name else tensor)
    return names


# --------------------------------------------------------------------------------------------
# Mask computation (pure functions on tensors)
# --------------------------------------------------------------------------------------------


def kept_count(n: int, sparsity: float) -> int:
    """How many of ``n`` entries survive at ``sparsity``: ``round((1 - sparsity) * n)``."""
    return max(0, min(n, round((1.0 - sparsity) * n)))


def _keep_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of 1-D ``scores``; ties go to lower indices."""
    n = scores.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=scores.device)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=scores.device)
    kth = torch.kthvalue(scores, n - k + 1).values  # the k-th largest
    keep = scores > kth
    missing = k - int(keep.sum())
    if missing > 0:
        ties = torch.nonzero(scores == kth).squeeze(1)[:missing]
        keep[ties] = True
    return keep


def _scores(weight: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """|w| flattened, with previously pruned positions below every survivor (-1)."""
    s = weight.detach().abs().flatten().to(torch.float32)
    if previous is not None:
        s = torch.where(previous.flatten(), s, torch.full_like(s, -1.0))
    return s


def magnitude_mask(
    weight: torch.Tensor, sparsity: float, previous: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep the ``round((1 - sparsity) * n)`` largest ``|weight|`` (True = kept).

    Ties at the threshold are broken deterministically (lower flat index kept). With
    ``previous`` (an existing mask) the result is a subset of it: if fewer than the wanted count
    survive, all survivors are kept and nothing is revived.
    """
    k = kept_count(weight.numel(), sparsity)
    if previous is not None:
        k = min(k, int(previous.sum()))
    return _keep_top(_scores(weight, previous), k).view(weight.shape)


def threshold_mask(
    weight: torch.Tensor, quality: float, previous: torch.Tensor | None = None
) -> torch.Tensor:
    """Han et al.'s rule: keep ``|w| > quality * std(w)`` (population std).

    With ``previous``, the std is taken over the surviving weights only and the result is a
    subset of ``previous`` (one more round of threshold pruning applied to the survivors).
    """
    w = weight.detach().to(torch.float32)
    alive = w if previous is None else w[previous]
    std = float(alive.std(correction=0)) if alive.numel() > 1 else 0.0
    keep = w.abs() > quality * std
    return keep if previous is None else keep & previous


def global_magnitude_masks(
    weights: Mapping[str, torch.Tensor],
    sparsity: float,
    previous: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """One magnitude threshold over all ``weights``: keep ``round((1 - s) * N)`` of all ``N``.

    Layers end up with different sparsities; ties broken deterministically (mapping order, then
    flat index). ``previous`` masks (per name, optional) are respected as in
    :func:`magnitude_mask`.
    """
    previous = previous or {}
    names = list(weights)
    if not names:
        return {}
    scores = torch.cat([_scores(weights[n], previous.get(n)) for n in names])
    k = kept_count(scores.numel(), sparsity)
    k = min(k, int((scores >= 0).sum()))
    keep = _keep_top(scores, k)
    out: dict[str, torch.Tensor] = {}
    start = 0
    for n in names:
        w = weights[n]
        out[n] = keep[start : start + w.numel()].view(w.shape)
        start += w.numel()
    return out


# --------------------------------------------------------------------------------------------
# Method
# --------------------------------------------------------------------------------------------


def _items(value: float | dict[str, float] | None) -> list[tuple[str, float]]:
    """(label prefix, value) pairs of a scalar or {glob: value} parameter, for messages."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [(f"{k!r}: ", v) for k, v in value.items()]
    return [("", value)]


class PruningParams(MethodParams):
    """Parameters of ``prune``; exactly one of ``sparsity`` and ``quality``."""

    sparsity: float | dict[str, float] | None = Field(
        None, description="fraction of weights removed, in [0, 1); one value or {glob: value}"
    )
    quality: float | dict[str, float] | None = Field(
        None, description="Han et al.'s threshold: prune |w| <= quality × std(w) of the layer"
    )
    scope: Literal["layer", "global"] = Field(
        "layer", description="rank weights per layer, or all selected layers together"
    )
    schedule: Schedule = Field(default_factory=OneShot)
    layers: list[str] | None = Field(None, description="globs or type:Conv2d; default all")
    include_bias: bool = Field(False, description="prune biases too (same sparsity)")

    @field_validator("schedule", mode="before")
    @classmethod
    def _schedule_by_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value not in SCHEDULE_KINDS:
                raise ValueError(f"unknown schedule {value!r}; known: {', '.join(SCHEDULE_KINDS)}")
            return {"kind": value}
        return value

    @field_validator("sparsity")
    @classmethod
    def _sparsity_range(cls, value: float | dict[str, float] | None) -> Any:
        for key, v in _items(value):
            if not 0.0 <= v < 1.0:
                raise ValueError(
                    f"{key}must be in [0, 1) (the fraction of weights removed; 1.0 would remove "
                    f"every weight), got {v}"
                )
        return value

    @field_validator("quality")
    @classmethod
    def _quality_range(cls, value: float | dict[str, float] | None) -> Any:
        for key, v in _items(value):
            if not (v > 0.0 and math.isfinite(v)):
                raise ValueError(
                    f"{key}must be a positive number (threshold = quality × std), got {v}"
                )
        return value

    @model_validator(mode="after")
    def _check(self) -> PruningParams:
        if (self.sparsity is None) == (self.quality is None):
            raise ValueError(
                "give exactly one of 'sparsity' (fraction removed, e.g. 0.9) or 'quality' "
                "(Han et al.'s threshold multiplier, e.g. 1.0)"
                + ("; both were given" if self.sparsity is not None else "")
            )
        if self.scope == "global" and (self.quality is not None or isinstance(self.sparsity, dict)):
            raise ValueError(
                "scope 'global' needs one scalar 'sparsity' (a single threshold over all selected "
                "layers); use scope 'layer' for per-layer values or 'quality'"
            )
        if self.quality is not None and isinstance(self.schedule, Polynomial):
            raise ValueError(
                "'quality' sets a threshold, not a sparsity, so it cannot follow a polynomial "
                "schedule; use schedule 'one-shot' or 'iterative' (each round re-applies the "
                "threshold to the surviving weights), or give 'sparsity'"
            )
        return self


_Target = tuple[str, nn.Module, str]  # (layer name, module, tensor name)


@register_method
class MagnitudePruning(Method):
    """Magnitude pruning with an optional schedule (one-shot, polynomial, iterative rounds).

    ``sparsity`` prunes an exact fraction per layer (or over all layers with ``scope: global``);
    ``quality`` applies Han et al.'s threshold ``quality × std`` once (one-shot) or once per round
    (iterative: each round re-applies it to the survivors, with their std).
    """

    name = "prune"
    Params = PruningParams
    supported = WEIGHT_LAYERS
    params: PruningParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._targets: dict[str, _Target] = {}
        self._final: dict[str, float] = {}
        self._quality: dict[str, float] = {}
        self._last_step = 0
        self._rounds_done = 0

    # --- lifecycle ---------------------------------------------------------------------------

    def apply(self, model: nn.Module, layers: dict[str, nn.Module]) -> None:
        """Register masks on ``layers`` and prune to the schedule's value at step 0."""
        p = self.params
        targets: dict[str, _Target] = {}
        for name, module in layers.items():
            targets[f"{name}.weight"] = (name, module, "weight")
            if p.include_bias and getattr(module, "bias", None) is not None:
                targets[f"{name}.bias"] = (name, module, "bias")
        if not targets:
            raise ModelError("prune: no layers selected")
        for key, (_, module, tensor) in targets.items():  # validate before changing anything
            _check_finite(key, getattr(module, tensor))
        self._targets = targets
        if p.sparsity is not None:
            values = per_layer(p.sparsity, layers, "prune.sparsity")
            self._final = {key: values[t[0]] for key, t in targets.items()}
        else:
            assert p.quality is not None
            values = per_layer(p.quality, layers, "prune.quality")
            self._quality = {key: values[t[0]] for key, t in targets.items()}
        self._last_step = 0
        self._rounds_done = 0
        for _, module, tensor in targets.values():
            if get_mask(module, tensor) is None:
                ones = torch.ones_like(getattr(module, tensor), dtype=torch.bool)
                set_mask(module, ones, tensor)
        self._update(0)

    def step_hooks(self) -> list[StepHook]:
        """A hook that updates the masks at the schedule's steps (none for one-shot)."""
        if isinstance(self.params.schedule, OneShot):
            return []
        schedule = self.params.schedule

        def hook(step: int, model: nn.Module) -> None:
            t = step + 1  # completed optimizer steps
            self._last_step = max(self._last_step, t)
            if schedule.due(t):
                self._update(t)

        return [hook]

    def finalize(self, model: nn.Module) -> None:
        """Make sure the final target is reached; warn if the schedule was cut short."""
        schedule = self.params.schedule
        if not self._targets:
            raise ModelError("prune: finalize called before apply")
        if not isinstance(schedule, OneShot) and self._last_step < schedule.end:
            warnings.warn(
                f"prune: the {schedule.kind} schedule ends at step {schedule.end} but fine-tuning "
                f"stopped after {self._last_step} steps; pruned to the final target without "
                "retraining (fine-tune longer or lower end_step)",
                stacklevel=2,
            )
        if self.params.quality is not None:
            rounds = schedule.rounds if isinstance(schedule, Iterative) else 1
            while self._rounds_done < rounds:
                self._threshold_round()
        else:
            self._prune_to(self._final)

    # --- internals ---------------------------------------------------------------------------

    def _update(self, step: int) -> None:
        schedule = self.params.schedule
        if self.params.quality is not None:
            if schedule.due(step):
                self._threshold_round()
            return
        targets = {k: schedule.sparsity_at(step, s) for k, s in self._final.items()}
        if any(v is not None for v in targets.values()):
            self._prune_to({k: v for k, v in targets.items() if v is not None})

    def _prune_to(self, sparsity: dict[str, float]) -> None:
        weights: dict[str, torch.Tensor] = {}
        masks: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for key in sparsity:
                _, module, tensor = self._targets[key]
                weights[key] = getattr(module, tensor).detach()
                _check_finite(key, weights[key])
                mask = get_mask(module, tensor)
                assert mask is not None
                masks[key] = mask
            if self.params.scope == "global":
                (s,) = set(sparsity.values())
                new = global_magnitude_masks(weights, s, masks)
            else:
                new = {k: magnitude_mask(weights[k], s, masks[k]) for k, s in sparsity.items()}
            for key, mask in new.items():
                masks[key].copy_(mask)

    def _threshold_round(self) -> None:
        with torch.no_grad():
            for key, q in self._quality.items():
                _, module, tensor = self._targets[key]
                w = getattr(module, tensor).detach()
                _check_finite(key, w)
                mask = get_mask(module, tensor)
                assert mask is not None
                mask.copy_(threshold_mask(w, q, mask))
        self._rounds_done += 1

    def current_sparsity(self) -> dict[str, float]:
        """Current fraction of masked-out entries per pruned tensor (``layer.weight``)."""
        out: dict[str, float] = {}
        for key, (_, module, tensor) in self._targets.items():
            mask = get_mask(module, tensor)
            if mask is not None:
                out[key] = 1.0 - float(mask.sum()) / mask.numel()
        return out


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ModelError(
            f"layer {name!r}: {bad} weight(s) are NaN or infinite; cannot prune by magnitude "
            "(check the checkpoint or the previous stage's training)"
        )


__all__ = [
    "MagnitudePruning",
    "PruningMask",
    "PruningParams",
    "get_mask",
    "global_magnitude_masks",
    "kept_count",
    "layer_sparsity",
    "magnitude_mask",
    "masked_layers",
    "remove_pruning",
    "set_mask",
    "threshold_mask",
]
