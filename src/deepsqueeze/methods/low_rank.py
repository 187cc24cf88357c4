"""Low-rank factorization: truncated SVD, sparse low rank (SLR), Tucker-2 of convolutions.

- ``svd``: a Linear weight ``W`` (out × in) becomes ``A·B`` with ``A = U_k Σ_k^½`` (out × k) and
  ``B = Σ_k^½ V_kᵀ`` (k × in) — a :class:`~deepsqueeze.models.low_rank.LowRankLinear`. A Conv2d
  (O × C × kh × kw) is factorized as the matrix O × (C·kh·kw): a k×k conv to ``k`` channels, then
  a 1×1 conv (channel decomposition, Jaderberg et al. 2014 / Denton et al. 2014).
- ``sparse-svd``: SLR of Swaminathan et al. 2020 on Linear layers: after the rank-k SVD, the
  least important input and output neurons keep fewer components (masks on the factors, kept
  through fine-tuning). The rule is written in docs/methods.md and :func:`slr_masks`.
- ``tucker``: Tucker-2 of a k×k conv (1×1 → k×k core → 1×1) by tensorly's ``partial_tucker``.

The rank of a layer is given (``rank``), chosen by retained energy (``energy``: the smallest
``k`` with ``Σ_{i<k} σ_i² ≥ energy · Σ σ_i²``), or by the layer's compression (``ratio``: the
largest ``k`` with ``k·(m + n) · ratio ≤ m·n``). The factors are plain Linear/Conv2d children,
so pruning and weight sharing compose (svd → prune → share) and the codec stores them through
its smallest lossless encoding.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn
from torch.nn.utils import parametrize

from deepsqueeze.errors import ModelError, RecipeError
from deepsqueeze.methods.base import Method, MethodParams, per_layer, register_method
from deepsqueeze.methods.pruning import set_mask
from deepsqueeze.models.low_rank import CPConv2d, LowRankConv2d, LowRankLinear, TuckerConv2d
from deepsqueeze.models.state import replace_module

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_KINDS = (LowRankLinear, LowRankConv2d, TuckerConv2d)

# --------------------------------------------------------------------------------------------
# Math on tensors
# --------------------------------------------------------------------------------------------


def svd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U, S, Vh`` of ``weight`` viewed as a matrix (rows = dim 0), computed in float64."""
    w = weight.detach().to(torch.float64).flatten(1)
    if not bool(torch.isfinite(w).all()):
        raise ModelError("cannot factorize a weight holding NaN or Inf values")
    return torch.linalg.svd(w, full_matrices=False)


def energy_rank(singular: torch.Tensor, energy: float) -> int:
    """Smallest ``k`` with ``Σ_{i<k} σ_i² ≥ energy · Σ σ_i²`` (1 for an all-zero matrix)."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    sq = singular.to(torch.float64) ** 2
    total = float(sq.sum())
    if total == 0.0:
        return 1
    cum = torch.cumsum(sq, 0) / total
    # a relative tolerance so that energy 1.0 does not ask for components of rounding noise
    k = int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=torch.float64))) + 1
    return max(1, min(k, singular.numel()))


def ratio_rank(rows: int, cols: int, ratio: float) -> int:
    """Largest ``k ≥ 1`` whose factors hold at most ``1/ratio`` of the ``rows·cols`` weights."""
    if not ratio > 0:
        raise ValueError(f"ratio must be positive, got {ratio}")
    return max(1, min(min(rows, cols), math.floor(rows * cols / (ratio * (rows + cols)))))


def choose_rank(
    singular: torch.Tensor, rows: int, cols: int, *, rank: int | None = None,
    energy: float | None = None, ratio: float | None = None,
) -> int:
    """The rank by exactly one rule (given, energy, ratio), capped at ``min(rows, cols)``."""
    if sum(v is not None for v in (rank, energy, ratio)) != 1:
        raise ValueError("give exactly one of rank, energy, ratio")
    full = min(rows, cols)
    if rank is not None:
        return max(1, min(rank, full))
    if energy is not None:
        return energy_rank(singular, energy)
    assert ratio is not None
    return ratio_rank(rows, cols, ratio)


def split_factors(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = U_k Σ_k^½`` (rows × k) and ``B = Σ_k^½ V_kᵀ`` (k × cols): the singular values split
    evenly, so both factors have the same scale (better for later pruning and sharing)."""
    root = s[:k].sqrt()
    return u[:, :k] * root, root[:, None] * vh[:k]


def slr_masks(
    k: int, out_scores: torch.Tensor, in_scores: torch.Tensor, sr: float, rr: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """SLR masks of ``A`` (out × k) and ``B`` (k × in); True = kept.

    The ``round(sr·out)`` output neurons and ``round(sr·in)`` input neurons of lowest score
    (ties: the lower index counts as less important) keep only the first
    ``k − round(rr·k)`` components: the rest of their row of ``A`` / column of ``B`` is zero.
    """
    if not 0.0 <= sr < 1.0 or not 0.0 <= rr <= 1.0:
        raise ValueError(f"sr must be in [0, 1) and rr in [0, 1], got sr={sr}, rr={rr}")
    keep_low = k - round(rr * k)
    comps = torch.arange(k)

    def rows(scores: torch.Tensor) -> torch.Tensor:
        n = scores.numel()
        weak = torch.zeros(n, dtype=torch.bool)
        count = round(sr * n)
        if count:
            order = torch.argsort(scores.detach().to(torch.float64).cpu(), stable=True)
            weak[order[:count]] = True
        return ~(weak[:, None] & (comps[None, :] >= keep_low))

    return rows(out_scores), rows(in_scores).t().contiguous()


def _check_conv(conv: nn.Conv2d, name: str, method: str) -> None:
    if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ModelError(
            f"{method}: layer {name!r} is a grouped, non-zero-padded or padding={conv.padding!r} "
            "conv; only ordinary convs (groups=1, numeric zero padding) can be factorized; "
            "leave it out with 'layers'"
        )


def _check_plain(module: nn.Module, name: str, method: str) -> None:
    if parametrize.is_parametrized(module):
        raise ModelError(
            f"{method}: layer {name!r} has parametrized weights (a mask or codebook of an "
            "earlier stage); factorize first, then prune or share the factors"
        )


def _like(new: nn.Module, old: nn.Module) -> nn.Module:
    ref = old.weight
    new = new.to(device=ref.device, dtype=ref.dtype)
    new.train(old.training)
    return new


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.view_as(param).to(param.dtype))


def factorize_linear(linear: nn.Linear, rank: int) -> LowRankLinear:
    """The rank-``rank`` truncated SVD of ``linear`` as a :class:`LowRankLinear`."""
    u, s, vh = svd(linear.weight)
    rank = max(1, min(rank, s.numel()))
    a, b = split_factors(u, s, vh, rank)
    new = LowRankLinear(linear.in_features, linear.out_features, rank, linear.bias is not None)
    new = _like(new, linear)
    return _fill_linear(new, linear, a, b)


def _fill_linear(new: LowRankLinear, old: nn.Linear, a: torch.Tensor, b: torch.Tensor
                 ) -> LowRankLinear:
    _set(new.first.weight, b)
    _set(new.second.weight, a)
    if old.bias is not None:
        assert new.second.bias is not None
        _set(new.second.bias, old.bias.detach())
    return new


def factorize_conv(conv: nn.Conv2d, rank: int) -> LowRankConv2d:
    """Channel decomposition of ``conv``: k×k conv to ``rank`` channels, then 1×1."""
    _check_conv(conv, type(conv).__name__, "svd")
    u, s, vh = svd(conv.weight)
    rank = max(1, min(rank, s.numel()))
    a, b = split_factors(u, s, vh, rank)
    new = LowRankConv2d(
        conv.in_channels, conv.out_channels, rank, conv.kernel_size, stride=conv.stride,
        padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None,
    )
    new = _like(new, conv)
    _set(new.first.weight, b)
    _set(new.second.weight, a)
    if conv.bias is not None:
        assert new.second.bias is not None
        _set(new.second.bias, conv.bias.detach())
    return new


def mode_ranks_by_energy(weight: torch.Tensor, energy: float) -> tuple[int, int]:
    """``(rank_in, rank_out)`` of a conv kernel by the energy of its mode-1 / mode-0 unfoldings
    (the HOSVD rule)."""
    w = weight.detach().to(torch.float64)
    s_out = torch.linalg.svdvals(w.flatten(1))
    s_in = torch.linalg.svdvals(w.transpose(0, 1).flatten(1))
    return energy_rank(s_in, energy), energy_rank(s_out, energy)


def tucker_conv(conv: nn.Conv2d, rank_in: int, rank_out: int, n_iter_max: int = 100
                ) -> TuckerConv2d:
    """Tucker-2 of ``conv`` (modes 0 and 1) by tensorly's HOOI (``partial_tucker``)."""
    import tensorly
    from tensorly.decomposition import partial_tucker

    _check_conv(conv, type(conv).__name__, "tucker")
    rank_in = max(1, min(rank_in, conv.in_channels))
    rank_out = max(1, min(rank_out, conv.out_channels))
    w = conv.weight.detach().to(torch.float64).cpu().numpy()
    tensorly.set_backend("numpy")
    (core, (u_out, u_in)), _ = partial_tucker(
        w, rank=[rank_out, rank_in], modes=[0, 1], n_iter_max=n_iter_max, init="svd",
        random_state=0,
    )
    new = TuckerConv2d(
        conv.in_channels, conv.out_channels, rank_in, rank_out, conv.kernel_size,
        stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
        bias=conv.bias is not None,
    )
    new = _like(new, conv)
    _set(new.first.weight, torch.from_numpy(u_in).t())  # r_in × C
    _set(new.core.weight, torch.from_numpy(core))  # r_out × r_in × kh × kw
    _set(new.last.weight, torch.from_numpy(u_out))  # O × r_out
    if conv.bias is not None:
        assert new.last.bias is not None
        _set(new.last.bias, conv.bias.detach())
    return new


def cp_conv(conv: nn.Conv2d, rank: int, n_iter_max: int = 200) -> CPConv2d:
    """Rank-``rank`` CP of ``conv``'s O×C×kh×kw kernel by tensorly's ALS (``parafac``, SVD
    initialization, float64), as :class:`CPConv2d`; each component's scale is spread evenly
    over its four factors."""
    import tensorly
    from tensorly.decomposition import parafac

    _check_conv(conv, type(conv).__name__, "cp")
    w = conv.weight.detach().to(torch.float64).cpu().numpy()
    tensorly.set_backend("numpy")
    with warnings.catch_warnings():  # a rank above a mode's size: tensorly pads its SVD init
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
        weights, (f_out, f_in, f_h, f_w) = parafac(w, rank=rank, n_iter_max=n_iter_max,
                                                   init="svd", random_state=0,
                                                   normalize_factors=True)
    factors = [torch.from_numpy(f).clone() for f in (f_out, f_in, f_h, f_w)]  # each dim × R
    lam = torch.from_numpy(weights).clone()
    sign = torch.sign(lam)
    root = lam.abs().pow(0.25)
    factors = [f * root for f in factors]
    factors[0] = factors[0] * torch.where(sign == 0, torch.ones_like(sign), sign)
    new = _like(CPConv2d(conv.in_channels, conv.out_channels, rank, conv.kernel_size,
                         stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                         bias=conv.bias is not None), conv)
    kh, kw = new.kernel_size
    _set(new.last.weight, factors[0].reshape(conv.out_channels, rank, 1, 1))
    _set(new.first.weight, factors[1].t().reshape(rank, conv.in_channels, 1, 1))
    _set(new.vertical.weight, factors[2].t().reshape(rank, 1, kh, 1))
    _set(new.horizontal.weight, factors[3].t().reshape(rank, 1, 1, kw))
    if conv.bias is not None:
        assert new.last.bias is not None
        _set(new.last.bias, conv.bias.detach())
    return new


def cp_rank_for_ratio(conv: nn.Conv2d, ratio: float) -> int:
    """The largest CP rank whose factors hold at most ``1 / ratio`` of the kernel's weights."""
    kh, kw = conv.kernel_size
    per = conv.in_channels + conv.out_channels + kh + kw
    return max(1, int(conv.weight.numel() / ratio) // per)


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------

Scalar = float | dict[str, float]


def _values(value: Any) -> list[tuple[str, Any]]:
    if value is None:
        return []
    if isinstance(value, dict):
        return [(f"{k!r}: ", v) for k, v in value.items()]
    return [("", value)]


def _check_rank(value: Any) -> Any:
    for key, v in _values(value):
        if isinstance(v, bool) or v < 1:
            raise ValueError(f"{key}rank must be a positive integer, got {v}")
    return value


def _check_energy(value: Any) -> Any:
    for key, v in _values(value):
        if not 0.0 < v <= 1.0:
            raise ValueError(
                f"{key}energy must be in (0, 1] (the share of the squared singular values kept, "
                f"e.g. 0.9), got {v}"
            )
    return value


class RankParams(MethodParams):
    """How the rank of each layer is chosen: exactly one of ``rank``, ``energy``, ``ratio``."""

    rank: int | dict[str, int] | None = Field(
        None, description="rank k of the factors (capped at the layer's full rank)"
    )
    energy: Scalar | None = Field(
        None, description="share of Σσ² kept, in (0, 1]: the smallest k reaching it"
    )
    ratio: Scalar | None = Field(
        None, description="the layer's weights / the factors' weights, > 1 (largest k within)"
    )
    layers: list[str] | None = Field(None, description="globs or type:Linear; default all")
    skip_unprofitable: bool = Field(
        False, description="leave a layer dense when its factors would not be smaller"
    )

    @field_validator("rank")
    @classmethod
    def _rank_range(cls, value: Any) -> Any:
        return _check_rank(value)

    @field_validator("energy")
    @classmethod
    def _energy_range(cls, value: Any) -> Any:
        return _check_energy(value)

    @field_validator("ratio")
    @classmethod
    def _ratio_range(cls, value: Any) -> Any:
        for key, v in _values(value):
            if not (v > 1.0 and math.isfinite(v)):
                raise ValueError(
                    f"{key}ratio must be a finite number > 1 (how many times fewer weights the "
                    f"factors hold than the layer, e.g. 4), got {v}"
                )
        return value

    @model_validator(mode="after")
    def _one_rule(self) -> RankParams:
        given = [n for n in ("rank", "energy", "ratio") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of 'rank' (e.g. 20), 'energy' (share of Σσ² kept, e.g. 0.9) "
                "or 'ratio' (weight reduction of the layer, e.g. 4)"
                + (f"; got {', '.join(given)}" if given else "")
            )
        return self


def _layer_rule(params: RankParams, names: list[str], method: str) -> dict[str, dict[str, Any]]:
    """Per layer: ``{"rank": k}`` / ``{"energy": e}`` / ``{"ratio": r}``."""
    for key in ("rank", "energy", "ratio"):
        value = getattr(params, key)
        if value is not None:
            return {n: {key: v} for n, v in per_layer(value, names, f"{method}.{key}").items()}
    raise AssertionError("unreachable: validated")


def _check_not_factor(model: nn.Module, layers: dict[str, nn.Module], method: str) -> None:
    kinds = {n for n, m in model.named_modules() if isinstance(m, _KINDS)}
    bad = [n for n in layers if n.rpartition(".")[0] in kinds]
    if bad:
        raise ModelError(
            f"{method}: {bad} are factors of an already factorized layer; select the original "
            "layers with 'layers' (e.g. ['fc1', 'fc2'])"
        )


# --------------------------------------------------------------------------------------------
# svd
# --------------------------------------------------------------------------------------------


def _stats(rows: int, cols: int, k: int, s: torch.Tensor) -> dict[str, Any]:
    sq = s.to(torch.float64) ** 2
    total = float(sq.sum())
    return {
        "rank": k,
        "full_rank": min(rows, cols),
        "energy_kept": float(sq[:k].sum()) / total if total > 0 else 1.0,
        "weights_before": rows * cols,
        "weights_after": k * (rows + cols),
    }


@register_method
class TruncatedSVD(Method):
    """Truncated SVD of Linear layers and channel decomposition of Conv2d layers."""

    name = "svd"
    Params = RankParams
    supported = (nn.Linear, nn.Conv2d)
    params: RankParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.report: dict[str, dict[str, Any]] = {}

    def apply(self, model: nn.Module, layers: dict[str, nn.Module]) -> None:
        """Replace each selected layer by its factorized kind (in place)."""
        if not layers:
            raise ModelError("svd: no layers selected")
        _check_not_factor(model, layers, self.name)
        for name, mod in layers.items():
            _check_plain(mod, name, self.name)
            if isinstance(mod, nn.Conv2d):
                _check_conv(mod, name, self.name)
        rules = _layer_rule(self.params, list(layers), self.name)
        self.report = {}
        for name, mod in layers.items():
            u, s, vh = svd(mod.weight)
            rows, cols = u.shape[0], vh.shape[1]
            k = choose_rank(s, rows, cols, **rules[name])
            stats = _stats(rows, cols, k, s)
            if self.params.skip_unprofitable and stats["weights_after"] >= rows * cols:
                self.report[name] = {**stats, "factorized": False}
                continue
            if isinstance(mod, nn.Conv2d):
                new: nn.Module = factorize_conv(mod, k)
            else:
                assert isinstance(mod, nn.Linear)
                new = _fill_linear(
                    _like(LowRankLinear(mod.in_features, mod.out_features, k,
                                        mod.bias is not None), mod),
                    mod, *split_factors(u, s, vh, k),
                )
            replace_module(model, name, new)
            self.report[name] = {**stats, "factorized": True}


# --------------------------------------------------------------------------------------------
# sparse-svd (SLR)
# --------------------------------------------------------------------------------------------


class Calibration(BaseModel):
    """Training data the importance of neurons is measured on (SLR-a, SLR-c)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(description="built-in dataset, training split (e.g. mnist)")
    samples: int = Field(1000, ge=1, le=1 << 20, description="samples drawn (stratified)")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    batch_size: int = Field(500, ge=1, le=1 << 16)


_IMPORTANCE = {"w": "weight", "a": "activation", "c": "loss",
               "weight": "weight", "activation": "activation", "loss": "loss"}


def refit_masked(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, mask_a: torch.Tensor,
                 mask_b: torch.Tensor, rounds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Refit factors ``A`` (m × k) and ``B`` (k × n) whose zeros are fixed by the masks to ``W``:
    ``rounds`` of alternating least squares on ``‖W − A·B‖_F`` (each row of ``A`` and column of
    ``B`` solved exactly on its kept components, in float64), which never increases the error.

    Masking the truncated SVD's factors (SLR's rule) leaves the components an unimportant
    neuron keeps as they were; refitting lets them take up part of what the dropped ones
    carried. Rows (columns) with the same support are solved together: SLR has two supports."""
    w64, a64, b64 = w.detach().double(), a.detach().double(), b.detach().double()
    ma, mb = mask_a.to(a64.device), mask_b.to(b64.device)
    ridge = 1e-10 * float((w64 ** 2).sum()) / max(1, min(w64.shape)) + 1e-30

    def solve(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        return torch.linalg.solve(gram + ridge * eye, rhs)

    for _ in range(rounds):
        for support in torch.unique(ma, dim=0):  # rows of A sharing a support
            rows = (ma == support).all(dim=1)
            keep = support.nonzero().flatten()
            if keep.numel() == 0:
                continue
            bs = b64[keep]  # kept components x n
            a64[rows] = 0.0
            a64[rows.nonzero().flatten()[:, None], keep[None, :]] = solve(
                bs @ bs.T, bs @ w64[rows].T).T
        for support in torch.unique(mb, dim=1).T:  # columns of B sharing a support
            cols = (mb == support[:, None]).all(dim=0)
            keep = support.nonzero().flatten()
            if keep.numel() == 0:
                continue
            ak = a64[:, keep]  # m x kept components
            b64[:, cols] = 0.0
            b64[keep[:, None], cols.nonzero().flatten()[None, :]] = solve(ak.T @ ak,
                                                                        ak.T @ w64[:, cols])
    # balance each component's scale between the factors (as split_factors does): ALS may
    # leave A large and B small, which fine-tuning at a normal learning rate does not survive
    na, nb = a64.norm(dim=0), b64.norm(dim=1)
    scale = torch.where((na > 0) & (nb > 0), (nb / na.clamp_min(1e-300)).sqrt(),
                        torch.ones_like(na))
    return (a64 * scale).to(a.dtype), (b64 / scale[:, None]).to(b.dtype)


class SparseSVDParams(RankParams):
    """Parameters of ``sparse-svd``: the rank rule, then ``sr``, ``rr`` and the importance."""

    sr: float = Field(0.5, ge=0.0, lt=1.0,
                      description="share of input and of output neurons treated as unimportant")
    rr: float = Field(0.5, ge=0.0, le=1.0,
                      description="share of the k components the unimportant neurons lose")
    importance: Literal["weight", "activation", "loss", "w", "a", "c"] = Field(
        "weight", description="SLR-w |W| sums, SLR-a mean |activation|, SLR-c |Δloss|"
    )
    refit: int = Field(10, ge=0, le=1000, description=(
        "rounds of alternating least squares refitting the masked factors to W (0: the "
        "paper's rule, the SVD factors masked as they are)"))
    calibration: Calibration | None = Field(
        None, description="data for importance activation/loss (or call set_data)"
    )

    @field_validator("importance")
    @classmethod
    def _long_name(cls, value: str) -> str:
        return _IMPORTANCE[value]


@register_method
class SparseSVD(Method):
    """Sparse low rank (SLR, Swaminathan et al. 2020) of Linear layers.

    ``W = A·B`` by the rank-k truncated SVD; the ``round(sr·n)`` least important input neurons
    and ``round(sr·m)`` output neurons keep only the first ``k − round(rr·k)`` components (masks
    on ``B``'s columns and ``A``'s rows, kept through fine-tuning). Importance is measured on the
    model as it was before any selected layer was factorized.
    """

    name = "sparse-svd"
    Params = SparseSVDParams
    supported = (nn.Linear,)
    params: SparseSVDParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.report: dict[str, dict[str, Any]] = {}
        self._data: tuple[Any, torch.Tensor, LossFn] | None = None
        self._scores: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._batch = 500

    def set_data(self, inputs: Any, targets: torch.Tensor, loss_fn: LossFn | None = None,
                 batch_size: int = 500) -> SparseSVD:
        """Data for importance ``activation``/``loss``: an input tensor (or a tuple of them, batch
        first) and targets; ``loss_fn(outputs, targets)`` defaults to cross-entropy. Overrides
        ``calibration``."""
        n = (inputs[0] if isinstance(inputs, tuple) else inputs).shape[0]
        if not isinstance(targets, torch.Tensor) or targets.shape[0] != n or n == 0:
            raise RecipeError(
                f"sparse-svd.set_data: {n} inputs need as many targets (a tensor, batch first)"
            )
        self._data = (inputs, targets, loss_fn or F.cross_entropy)
        self._batch = batch_size
        return self

    def use_data(self, data: Any, loss_fn: LossFn | None = None) -> None:
        """The stage's training data (its first ``calibration.samples`` or 1,000 samples) for
        importance ``activation``/``loss``, unless ``set_data`` or ``calibration`` says
        otherwise."""
        if self._data is not None or self.params.calibration is not None:
            return
        from deepsqueeze.data.loaders import as_tuple, iter_batches

        inputs: list[tuple[torch.Tensor, ...]] = []
        targets: list[torch.Tensor] = []
        count = 0
        for batch_inputs, target in iter_batches(data, 500):
            inputs.append(as_tuple(batch_inputs))
            targets.append(target)
            count += int(target.shape[0])
            if count >= 1000:
                break
        if not targets:
            return
        joined = tuple(torch.cat(parts)[:1000] for parts in zip(*inputs, strict=True))
        self.set_data(joined[0] if len(joined) == 1 else joined, torch.cat(targets)[:1000],
                      loss_fn)

    def set_scores(self, scores: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> SparseSVD:
        """Importance scores measured beforehand (``{layer: (out_scores, in_scores)}``, e.g. by
        :func:`activation_importance` once for several runs); used instead of measuring."""
        self._scores = {n: (o.detach().cpu(), i.detach().cpu()) for n, (o, i) in scores.items()}
        return self

    def _calibration(self) -> tuple[Any, torch.Tensor, LossFn, int]:
        if self._data is not None:
            return (*self._data, self._batch)
        cal = self.params.calibration
        if cal is None:
            raise RecipeError(
                f"sparse-svd: importance {self.params.importance!r} is measured on data: add "
                "'calibration: {dataset: mnist, samples: 1000}' to the stage's params, or call "
                "method.set_data(inputs, targets) before apply (importance 'weight' needs none)"
            )
        from deepsqueeze.data import load_dataset

        data = load_dataset(cal.dataset, "train")
        if cal.samples < len(data):
            data = data.subset(cal.samples, seed=cal.seed)
        return data.normalized(), data.labels.long(), F.cross_entropy, cal.batch_size

    def apply(self, model: nn.Module, layers: dict[str, nn.Module]) -> None:
        """Score neurons (on the unfactorized model), factorize, register the SLR masks."""
        p = self.params
        if not layers:
            raise ModelError("sparse-svd: no layers selected")
        _check_not_factor(model, layers, self.name)
        for name, mod in layers.items():
            _check_plain(mod, name, self.name)
        rules = _layer_rule(p, list(layers), self.name)
        if self._scores is not None:
            scores = self._scores
            for name, mod in layers.items():
                assert isinstance(mod, nn.Linear)
                got = scores.get(name)
                if got is None or got[0].shape != (mod.out_features,) or got[1].shape != (
                        mod.in_features,):
                    raise ModelError(
                        f"sparse-svd: set_scores gives no (out, in) scores of shapes "
                        f"({mod.out_features},), ({mod.in_features},) for layer {name!r}"
                    )
        elif p.importance == "weight":
            scores = {n: weight_importance(m.weight) for n, m in layers.items()}
        else:
            inputs, targets, loss_fn, batch = self._calibration()
            if p.importance == "activation":
                scores = activation_importance(model, layers, inputs, batch)
            else:
                scores = loss_importance(model, layers, inputs, targets, loss_fn, batch)
        self.report = {}
        for name, mod in layers.items():
            assert isinstance(mod, nn.Linear)
            u, s, vh = svd(mod.weight)
            rows, cols = u.shape[0], vh.shape[1]
            k = choose_rank(s, rows, cols, **rules[name])
            out_scores, in_scores = scores[name]
            mask_a, mask_b = slr_masks(k, out_scores, in_scores, p.sr, p.rr)
            a, b = split_factors(u, s, vh, k)
            before = float(torch.linalg.norm(mod.weight.detach() - (a * mask_a) @ (b * mask_b)))
            after = before
            if p.refit and not (bool(mask_a.all()) and bool(mask_b.all())):
                a, b = refit_masked(mod.weight, a * mask_a, b * mask_b, mask_a, mask_b, p.refit)
                after = float(torch.linalg.norm(mod.weight.detach() - a @ b))
            new = _fill_linear(
                _like(LowRankLinear(cols, rows, k, mod.bias is not None), mod), mod, a, b)
            set_mask(new.second, mask_a.to(new.second.weight.device))
            set_mask(new.first, mask_b.to(new.first.weight.device))
            replace_module(model, name, new)
            kept = int(mask_a.sum()) + int(mask_b.sum())
            norm = float(torch.linalg.norm(mod.weight.detach())) or 1.0
            self.report[name] = {**_stats(rows, cols, k, s), "weights_after": kept,
                                 "reduced_rank": k - round(p.rr * k),
                                 "relative_error_masked": before / norm,
                                 "relative_error_refit": after / norm}


def weight_importance(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SLR-w: ``(Σ_j |W_ij| per output neuron i, Σ_i |W_ij| per input neuron j)``."""
    w = weight.detach().abs().to(torch.float64)
    return w.sum(1), w.sum(0)


def _batches(inputs: Any, batch: int) -> list[tuple[Any, slice]]:
    n = (inputs[0] if isinstance(inputs, tuple) else inputs).shape[0]
    out = []
    for start in range(0, n, batch):
        sl = slice(start, min(n, start + batch))
        part = tuple(x[sl] for x in inputs) if isinstance(inputs, tuple) else (inputs[sl],)
        out.append((part, sl))
    return out


def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def activation_importance(
    model: nn.Module, layers: dict[str, nn.Module], inputs: Any, batch: int = 500
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """SLR-a: mean ``|y_i|`` of each output neuron (the layer's output) and mean ``|x_j|`` of each
    input neuron (the layer's input) over ``inputs``; ``{name: (out, in)}``."""
    sums: dict[str, list[torch.Tensor]] = {}
    counts: dict[str, int] = dict.fromkeys(layers, 0)

    def hook_for(name: str) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            x = args[0].detach().flatten(0, -2).abs().to(torch.float64)
            y = out.detach().flatten(0, -2).abs().to(torch.float64)
            acc = sums.setdefault(name, [torch.zeros(y.shape[1], dtype=torch.float64),
                                         torch.zeros(x.shape[1], dtype=torch.float64)])
            acc[0] += y.sum(0).cpu()
            acc[1] += x.sum(0).cpu()
            counts[name] += x.shape[0]
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in layers.items()]
    was_training = model.training
    model.eval()
    device = _device(model)
    try:
        with torch.no_grad():
            for part, _ in _batches(inputs, batch):
                model(*(x.to(device) for x in part))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [n for n in layers if counts[n] == 0]
    if missing:
        raise ModelError(f"sparse-svd: layers {missing} were not run by the model's forward")
    return {n: (sums[n][0] / counts[n], sums[n][1] / counts[n]) for n in layers}


def loss_importance(
    model: nn.Module, layers: dict[str, nn.Module], inputs: Any, targets: torch.Tensor,
    loss_fn: LossFn, batch: int = 500,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """SLR-c: ``|L(neuron removed) − L|`` on ``(inputs, targets)`` for every input neuron (its
    input feature zeroed) and output neuron (its output zeroed) of each layer, one at a time.

    Costs ``Σ (in + out)`` forward passes over the data: keep the calibration set small."""
    device = _device(model)
    parts = _batches(inputs, batch)
    n = targets.shape[0]
    zero: dict[str, Any] = {"where": None, "index": -1}

    def total_loss() -> float:
        value = 0.0
        for part, sl in parts:
            out = model(*(x.to(device) for x in part))
            value += float(loss_fn(out, targets[sl].to(device))) * (sl.stop - sl.start)
        return value / n

    def pre(name: str) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> Any:
            if zero["where"] == (name, "in"):
                x = args[0].clone()
                x[..., zero["index"]] = 0
                return (x, *args[1:])
            return None
        return hook

    def post(name: str) -> Any:
        def hook(_m: nn.Module, _args: Any, out: torch.Tensor) -> Any:
            if zero["where"] == (name, "out"):
                out = out.clone()
                out[..., zero["index"]] = 0
                return out
            return None
        return hook

    handles = []
    for name, m in layers.items():
        handles.append(m.register_forward_pre_hook(pre(name)))
        handles.append(m.register_forward_hook(post(name)))
    was_training = model.training
    model.eval()
    result: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        with torch.no_grad():
            base = total_loss()
            for name, m in layers.items():
                assert isinstance(m, nn.Linear)
                deltas = []
                for side, count in (("out", m.out_features), ("in", m.in_features)):
                    d = torch.empty(count, dtype=torch.float64)
                    for i in range(count):
                        zero["where"], zero["index"] = (name, side), i
                        d[i] = abs(total_loss() - base)
                    deltas.append(d)
                    zero["where"] = None
                result[name] = (deltas[0], deltas[1])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return result


# --------------------------------------------------------------------------------------------
# tucker
# --------------------------------------------------------------------------------------------


def _kxk_convs(model: nn.Module, layers: dict[str, nn.Module], by_default: bool,
               method: str) -> dict[str, nn.Module]:
    """The convolutions ``tucker`` / ``cp`` factorize, checked: with the default selection only
    k×k (k > 1) ungrouped ones (the ones a factorization can shrink)."""
    _check_not_factor(model, layers, method)
    if by_default:
        layers = {n: m for n, m in layers.items()
                  if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1 and m.groups == 1}
    if not layers:
        raise ModelError(f"{method}: no k×k (k > 1) convolution selected")
    for name, mod in layers.items():
        _check_plain(mod, name, method)
        assert isinstance(mod, nn.Conv2d)
        _check_conv(mod, name, method)
    return layers


class TuckerParams(MethodParams):
    """Parameters of ``tucker``: ranks given (``rank``: one int for both modes, or
    ``[rank_in, rank_out]``) or by ``energy`` of each mode's unfolding."""

    rank: int | list[int] | dict[str, int | list[int]] | None = Field(
        None, description="rank_in = rank_out, or [rank_in, rank_out]; capped at the channels"
    )
    energy: Scalar | None = Field(None, description="share of each unfolding's Σσ² kept")
    n_iter_max: int = Field(100, ge=1, le=10_000, description="HOOI iterations")
    layers: list[str] | None = Field(
        None, description="globs or type:Conv2d; default every k×k conv with k > 1"
    )

    @field_validator("rank")
    @classmethod
    def _ranks(cls, value: Any) -> Any:
        for key, v in _values(value):
            vals = v if isinstance(v, list) else [v]
            if len(vals) not in (1, 2) or any(isinstance(x, bool) or x < 1 for x in vals):
                raise ValueError(
                    f"{key}rank must be a positive int or [rank_in, rank_out], got {v}"
                )
        return value

    @field_validator("energy")
    @classmethod
    def _energy_range(cls, value: Any) -> Any:
        return _check_energy(value)

    @model_validator(mode="after")
    def _one_rule(self) -> TuckerParams:
        if (self.rank is None) == (self.energy is None):
            raise ValueError(
                "give exactly one of 'rank' (e.g. 8 or [8, 16]) or 'energy' (e.g. 0.9)"
            )
        return self


@register_method
class Tucker(Method):
    """Tucker-2 of k×k convolutions: 1×1 (C → r_in), k×k core (r_in → r_out), 1×1 (→ O)."""

    name = "tucker"
    Params = TuckerParams
    supported = (nn.Conv2d,)
    params: TuckerParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.report: dict[str, dict[str, Any]] = {}

    def apply(self, model: nn.Module, layers: dict[str, nn.Module]) -> None:
        """Replace each selected conv by a :class:`TuckerConv2d`."""
        p = self.params
        layers = _kxk_convs(model, layers, p.layers is None, self.name)
        names = list(layers)
        ranks = (per_layer(p.rank, names, "tucker.rank") if p.rank is not None  # type: ignore[arg-type]
                 else None)
        energies = per_layer(p.energy, names, "tucker.energy") if p.energy is not None else None
        self.report = {}
        for name, mod in layers.items():
            assert isinstance(mod, nn.Conv2d)
            if ranks is not None:
                r = ranks[name]
                r_in, r_out = (r[0], r[-1]) if isinstance(r, list) else (r, r)
            else:
                assert energies is not None
                r_in, r_out = mode_ranks_by_energy(mod.weight, energies[name])
            new = tucker_conv(mod, r_in, r_out, p.n_iter_max)
            replace_module(model, name, new)
            kh, kw = mod.kernel_size
            o, c = mod.out_channels, mod.in_channels
            self.report[name] = {
                "rank_in": new.rank_in, "rank_out": new.rank_out,
                "weights_before": o * c * kh * kw,
                "weights_after": c * new.rank_in + new.rank_in * new.rank_out * kh * kw
                + new.rank_out * o,
            }


# --------------------------------------------------------------------------------------------
# cp
# --------------------------------------------------------------------------------------------


class CPParams(MethodParams):
    """Parameters of ``cp``: the rank given, or chosen by the parameter reduction ``ratio``."""

    rank: int | dict[str, int] | None = Field(None, description="CP rank R per layer")
    ratio: Scalar | None = Field(None, description="kernel weights / factor weights (> 1)")
    n_iter_max: int = Field(200, ge=1, le=10_000, description="ALS iterations")
    layers: list[str] | None = Field(
        None, description="globs or type:Conv2d; default every k×k conv with k > 1"
    )

    @field_validator("rank")
    @classmethod
    def _rank_range(cls, value: Any) -> Any:
        return _check_rank(value)

    @field_validator("ratio")
    @classmethod
    def _ratio_range(cls, value: Any) -> Any:
        for key, v in _values(value):
            if not v > 1:
                raise ValueError(f"{key}ratio must be > 1 (e.g. 4: a quarter of the weights), "
                                 f"got {v}")
        return value

    @model_validator(mode="after")
    def _one_rule(self) -> CPParams:
        if (self.rank is None) == (self.ratio is None):
            raise ValueError("give exactly one of 'rank' (e.g. 16) or 'ratio' (e.g. 4)")
        return self


@register_method
class CP(Method):
    """CP decomposition of k×k convolutions (Lebedev et al. 2015): 1×1 (C → R), depthwise kh×1,
    depthwise 1×kw, 1×1 (R → O); R·(C + O + kh + kw) weights instead of O·C·kh·kw."""

    name = "cp"
    Params = CPParams
    supported = (nn.Conv2d,)
    params: CPParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.report: dict[str, dict[str, Any]] = {}

    def apply(self, model: nn.Module, layers: dict[str, nn.Module]) -> None:
        """Replace each selected conv by a :class:`CPConv2d`."""
        p = self.params
        layers = _kxk_convs(model, layers, p.layers is None, self.name)
        names = list(layers)
        ranks = per_layer(p.rank, names, "cp.rank") if p.rank is not None else None
        ratios = per_layer(p.ratio, names, "cp.ratio") if p.ratio is not None else None
        self.report = {}
        for name, mod in layers.items():
            assert isinstance(mod, nn.Conv2d)
            if ranks is not None:
                rank = int(ranks[name])
            else:
                assert ratios is not None
                rank = cp_rank_for_ratio(mod, float(ratios[name]))
            new = cp_conv(mod, rank, p.n_iter_max)
            replace_module(model, name, new)
            w = mod.weight.detach()
            err = float(torch.linalg.norm(w - new.dense_weight().detach()) /
                        max(float(torch.linalg.norm(w)), 1e-30))
            self.report[name] = {
                "rank": rank, "weights_before": w.numel(),
                "weights_after": sum(math.prod(shape) for key, shape in
                                     new.factor_shapes().items() if key.endswith("weight")),
                "relative_error": err,
            }


__all__ = [
    "CP", "CPParams", "Calibration", "RankParams", "SparseSVD", "SparseSVDParams", "TruncatedSVD",
    "Tucker", "TuckerParams", "activation_importance", "choose_rank", "cp_conv",
    "cp_rank_for_ratio", "energy_rank", "factorize_conv", "factorize_linear", "loss_importance",
    "mode_ranks_by_energy", "ratio_rank", "slr_masks", "split_factors", "svd", "tucker_conv",
    "weight_importance",
]
