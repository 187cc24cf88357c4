"""Trained quantization and weight sharing (Han, Mao, Dally, "Deep Compression", ICLR 2016, §3).

Per layer, the weights that survived pruning are clustered with 1-D k-means into at most
``k = 2**bits`` clusters; every weight is then replaced by its cluster's centroid, so the layer
stores only a small codebook and a ``bits``-wide index per weight. The centroids are then
fine-tuned: the gradient of a centroid is the sum of the gradients of the weights in its cluster.

In training form a layer's ``weight`` is parametrized (``torch.nn.utils.parametrize``) by
:class:`SharedWeights`: ``weight = where(mask, centroids[assignments], 0)``. The gather's
backward is a scatter-add, which gives exactly the paper's centroid gradient; ``mask`` keeps
pruned positions at exactly zero forever. Zero is reserved for pruned positions (the file format
reads zeros as "absent"), so no centroid is ever exactly ``0.0``.

Pruning is detected from the weight itself, not from a particular parametrization: every weight
that is exactly zero in the layer's effective weight is treated as pruned. (In an unpruned, trained
layer exact zeros do not occur in practice; if one does, it simply stays zero.) Biases are not
shared, as in the paper.
"""

from __future__ import annotations

import zlib
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from deepsqueeze.errors import ModelError
from deepsqueeze.methods.base import (
    WEIGHT_LAYERS,
    Method,
    MethodParams,
    per_layer,
    register_method,
)

Init = Literal["linear", "density", "random"]
Bits = Annotated[int, Field(ge=1, le=16)]

__all__ = [
    "SharedWeights",
    "WeightSharing",
    "WeightSharingParams",
    "codebook_of",
    "kmeans_1d",
    "remove_sharing",
    "share_layer",
    "shared_layers",
]


# --------------------------------------------------------------------------------------------
# 1-D k-means
# --------------------------------------------------------------------------------------------


def _init_centroids(v: np.ndarray, k: int, init: Init, seed: int) -> np.ndarray:
    """Initial centroids for sorted values ``v`` (float64), ``k`` of them."""
    if init == "linear":
        return np.linspace(v[0], v[-1], k)
    if init == "density":
        # Evenly spaced levels of the empirical CDF, mapped back to weight values.
        return np.quantile(v, (np.arange(k) + 0.5) / k)
    if init == "random":
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(v, size=k, replace=False))
    raise ValueError(f"unknown k-means init {init!r}; known: linear, density, random")


def kmeans_1d(
    values: np.ndarray | torch.Tensor,
    k: int,
    init: Init = "linear",
    iters: int = 30,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Cluster scalar ``values`` into at most ``k`` clusters (Lloyd's algorithm).

    Returns ``(centroids, assignments)``: ``centroids`` is a float64 array of length ``<= k``,
    sorted ascending, with no empty cluster; ``assignments`` is an int64 array shaped like
    ``values`` holding each value's centroid index. Each value is assigned to its nearest
    centroid; once converged (fewer than ``iters`` iterations needed), each centroid is the mean
    of its cluster. With at most ``k`` distinct values the result is exact (centroids = the
    distinct values). Deterministic for a given ``seed`` (only ``init="random"`` uses it).

    ``init``: ``"linear"`` spaces centroids evenly between min and max (the paper's best: it keeps
    the rare large weights), ``"density"`` at evenly spaced quantiles, ``"random"`` picks ``k``
    of the values (Forgy). ``iters=0`` gives plain nearest-centroid quantization to the init.
    """
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().to(torch.float64).numpy()
    arr = np.asarray(values, dtype=np.float64)
    flat = arr.ravel()
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    if flat.size == 0:
        raise ValueError("cannot cluster an empty set of values")
    if not np.isfinite(flat).all():
        raise ValueError("cannot cluster NaN or infinite values")

    v = np.sort(flat)
    starts = np.concatenate(([True], v[1:] != v[:-1]))
    if np.count_nonzero(starts) <= k:
        distinct = v[starts]
        return distinct, np.searchsorted(distinct, arr).astype(np.int64)

    # A purpose-built Lloyd instead of scipy.cluster.vq.kmeans2: in 1-D every cluster is a
    # contiguous run of the sorted values, so after one sort an iteration is a searchsorted of the
    # k-1 midpoints plus prefix sums -- O(k log n) rather than kmeans2's O(n k) distance pass
    # (n is millions for large fc layers, k up to 2**16) -- and empty clusters get a defined,
    # warning-free treatment (kept in place while iterating, dropped from the result).
    csum = np.concatenate(([0.0], np.cumsum(v)))
    c = _init_centroids(v, k, init, seed)
    prev_edges: np.ndarray | None = None
    for _ in range(iters):
        # Values below a midpoint go to the lower centroid, values on or above it to the upper.
        edges = np.concatenate(([0], np.searchsorted(v, (c[:-1] + c[1:]) / 2, "left"), [v.size]))
        if prev_edges is not None and np.array_equal(edges, prev_edges):
            break  # assignments unchanged: c already holds their cluster means
        prev_edges = edges
        counts = np.diff(edges)
        sums = csum[edges[1:]] - csum[edges[:-1]]
        c = np.sort(np.where(counts > 0, sums / np.maximum(counts, 1), c))

    assign = np.searchsorted((c[:-1] + c[1:]) / 2, flat, "right")
    used = np.bincount(assign, minlength=c.size) > 0
    remap = np.cumsum(used) - 1
    return c[used], remap[assign].reshape(arr.shape).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Parametrization
# --------------------------------------------------------------------------------------------


class SharedWeights(nn.Module):
    """Parametrization ``weight = where(mask, centroids[assignments], 0)``; ignores the original.

    ``centroids`` (k,) is the only trainable tensor; buffers ``assignments`` (int64, weight's
    shape) and ``mask`` (bool, weight's shape, True = kept) are fixed. The gradient reaching
    ``centroids[j]`` is the sum of the weight gradients over the kept positions of cluster ``j``.
    """

    def __init__(self, centroids: torch.Tensor, assignments: torch.Tensor, mask: torch.Tensor):
        super().__init__()
        if assignments.shape != mask.shape:
            raise ValueError(
                f"assignments {tuple(assignments.shape)} and mask "
                f"{tuple(mask.shape)} differ in shape"
            )
        if centroids.dim() != 1 or centroids.numel() == 0:
            raise ValueError("centroids must be a non-empty 1-D tensor")
        self.centroids = nn.Parameter(centroids.detach().clone())
        self.register_buffer("assignments", assignments.detach().to(torch.int64).clone())
        self.register_buffer("mask", mask.detach().to(torch.bool).clone())

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        # where, not "* mask": pruned positions are exactly +0.0 (never -0.0 or inf * 0).
        # Its backward sends the weight gradient at kept positions only to the gather, whose
        # backward (a scatter-add) sums them per centroid.
        zero = torch.zeros((), dtype=self.centroids.dtype, device=self.centroids.device)
        return torch.where(self.mask, self.centroids[self.assignments], zero)

    @property
    def num_clusters(self) -> int:
        return self.centroids.numel()

    def extra_repr(self) -> str:
        kept = int(self.mask.sum())
        return f"clusters={self.num_clusters}, kept={kept}/{self.mask.numel()}"


def _nonzero_centroids(c: torch.Tensor, scale: float) -> torch.Tensor:
    """Move any centroid that is exactly 0 to a tiny positive value (0 means "pruned")."""
    nudge = max(scale * 2.0**-20, float(torch.finfo(c.dtype).tiny))
    return torch.where(c == 0, torch.full_like(c, nudge), c)


def _check_finite_nonzero(name: str, w: torch.Tensor) -> None:
    if not torch.isfinite(w).all():
        raise ModelError(f"layer {name!r}: weight has NaN or infinite values; cannot share weights")
    if not (w != 0).any():
        raise ModelError(
            f"layer {name!r}: every weight is zero (fully pruned); nothing to share "
            "-- lower the sparsity or leave the layer out of the selection"
        )


def share_layer(
    module: nn.Module,
    bits: int,
    *,
    init: Init = "linear",
    iters: int = 30,
    seed: int = 0,
    name: str = "",
) -> SharedWeights:
    """Cluster ``module.weight``'s nonzero values into ``<= 2**bits`` centroids and parametrize it.

    Uses the current *effective* weight (any pruning parametrization applied), removes existing
    ``weight`` parametrizations keeping their values, and registers :class:`SharedWeights`.
    Positions that are zero stay zero. Returns the registered parametrization.
    """
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    label = name or type(module).__name__
    w = module.weight.detach()
    _check_finite_nonzero(label, w)
    mask = w != 0
    kept = w[mask]
    centroids, idx = kmeans_1d(kept, 2**bits, init=init, iters=iters, seed=seed)
    c = torch.as_tensor(centroids, dtype=w.dtype, device=w.device)
    c = _nonzero_centroids(c, float(kept.abs().max()))
    assignments = torch.zeros(w.shape, dtype=torch.int64, device=w.device)
    assignments[mask] = torch.as_tensor(idx, device=w.device)
    if parametrize.is_parametrized(module, "weight"):
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    shared = SharedWeights(c, assignments, mask)
    parametrize.register_parametrization(module, "weight", shared)
    return shared


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _sharing_of(module: nn.Module) -> SharedWeights | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations["weight"]:
        if isinstance(p, SharedWeights):
            return p
    return None


def shared_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The modules of ``model`` whose ``weight`` is parametrized by :class:`SharedWeights`."""
    return {name: mod for name, mod in model.named_modules() if _sharing_of(mod) is not None}


def codebook_of(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(centroids, assignments, mask)`` of a shared layer (detached tensors)."""
    shared = _sharing_of(module)
    if shared is None:
        raise ModelError(f"{type(module).__name__} has no shared weights (apply 'share' first)")
    return shared.centroids.detach(), shared.assignments, shared.mask


def remove_sharing(model: nn.Module) -> list[str]:
    """Bake every shared layer's effective weight into a plain parameter; returns their names."""
    names = list(shared_layers(model))
    modules = dict(model.named_modules())
    for name in names:
        parametrize.remove_parametrizations(modules[name], "weight", leave_parametrized=True)
    return names


# --------------------------------------------------------------------------------------------
# Method
# --------------------------------------------------------------------------------------------


class WeightSharingParams(MethodParams):
    """Parameters of ``share``."""

    bits: Bits | dict[str, Bits] = Field(
        5, description="index width per weight (k = 2**bits clusters); one value or {glob: bits}"
    )
    init: Init = "linear"
    layers: list[str] | None = None
    iters: int = Field(30, ge=0, description="maximum k-means (Lloyd) iterations")
    seed: int = 0


@register_method
class WeightSharing(Method):
    """k-means weight sharing with trainable centroids (Deep Compression §3).

    ``share(bits={"conv*": 8, "fc*": 5})`` after ``prune`` reproduces the paper's pipeline;
    fine-tune afterwards to train the centroids.
    """

    name = "share"
    Params = WeightSharingParams
    supported = WEIGHT_LAYERS
    params: WeightSharingParams

    def apply(self, model: nn.Module, layers: dict[str, nn.Module]) -> None:
        bits = per_layer(self.params.bits, layers, "share.bits")
        for name, module in layers.items():  # validate everything before changing anything
            _check_finite_nonzero(name, module.weight.detach())
        for name, module in layers.items():
            share_layer(
                module,
                bits[name],
                init=self.params.init,
                iters=self.params.iters,
                seed=zlib.crc32(f"{self.params.seed}:{name}".encode()),
                name=name,
            )

    def finalize(self, model: nn.Module) -> None:
        """Check the fine-tuned codebooks; re-nudge any centroid trained onto exactly 0."""
        for name, module in shared_layers(model).items():
            shared = _sharing_of(module)
            assert shared is not None
            c = shared.centroids.detach()
            if not torch.isfinite(c).all():
                raise ModelError(f"layer {name!r}: centroids became NaN/inf during fine-tuning")
            with torch.no_grad():
                shared.centroids.copy_(_nonzero_centroids(c, float(c.abs().max())))
