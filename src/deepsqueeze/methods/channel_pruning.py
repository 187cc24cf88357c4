"""Structured pruning: remove whole conv channels / linear neurons and shrink the network.

Filters are ranked by the L1 (or L2) norm of their weights (Li et al. 2017, "Pruning Filters
for Efficient ConvNets"); the weakest are removed *physically*: the producing layer gets fewer
output channels, and everything that reads those channels is resized with it (BatchNorm,
depthwise convs, the next conv's input channels, the first Linear after a flatten). The result is
an ordinary dense model with fewer parameters and fewer MACs.

Which layers can be pruned is decided by tracing the model with :mod:`torch.fx`: a layer's output
channels are followed through channel-preserving ops to the layers that consume them. Channels
that reach a residual addition, a concatenation, a reshape or the model output are *tied* to other
tensors (or to the task) and are not pruned; :func:`prunable_layers` says why for each layer.
In a ResNet this leaves the block-internal channels (``conv1 → bn1 → conv2``) prunable.
"""

from __future__ import annotations

import math
import operator
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from deepsqueeze.errors import ModelError
from deepsqueeze.methods.base import (
    Method,
    MethodParams,
    per_layer,
    register_method,
    select_layers,
)
from deepsqueeze.metrics.macs import macs_per_sample
from deepsqueeze.metrics.size import parameter_count
from deepsqueeze.models.state import check_unparametrized as _check_unparametrized
from deepsqueeze.models.state import is_depthwise as _is_depthwise
from deepsqueeze.models.state import replace_module as _replace
from deepsqueeze.models.state import resize_to_shapes  # re-exported (moved to the models layer)
from deepsqueeze.models.state import resized_module as _resized_module

__all__ = [
    "ChannelGroup",
    "ChannelPruning",
    "ChannelPruningParams",
    "ChannelPruningReport",
    "LayerChange",
    "channel_groups",
    "channel_scores",
    "prunable_layers",
    "prune_channels",
    "resize_to_shapes",
    "select_channels",
]

Norm = Literal["l1", "l2"]


# --------------------------------------------------------------------------- analysis


@dataclass(frozen=True)
class ChannelGroup:
    """Everything that must shrink together when ``producer`` loses output channels.

    ``passthrough`` holds BatchNorm layers and depthwise convs that carry the channels through
    (they lose the same channels); ``consumers`` hold the convs/linears whose *input* channels are
    cut. ``flatten_factor[c]`` is the number of consecutive input features of consumer ``c`` per
    channel (H×W for a Linear after a flatten, 1 otherwise).
    """

    producer: str
    consumers: tuple[str, ...]
    passthrough: tuple[str, ...] = ()
    flatten_factor: dict[str, int] = field(default_factory=dict)


_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Dropout, nn.Identity,
)
_SPATIAL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout2d,
    nn.Upsample, nn.ZeroPad2d,
)
_ELEMENTWISE_FUNCTIONS: set[Any] = {
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.sigmoid, F.tanh, F.dropout, torch.relu, torch.relu_,
    torch.sigmoid, torch.tanh,
}
_SPATIAL_FUNCTIONS: set[Any] = {
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.dropout2d,
    F.interpolate,
}
_SCALAR_FUNCTIONS: set[Any] = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul,
    torch.add, torch.sub, torch.mul, torch.div,
}
_ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous",
    "add", "sub", "mul", "div",
}
_SHAPE_QUERIES = {"size", "dim"}
_JOIN_FUNCTIONS: set[Any] = {torch.cat, torch.stack, torch.concat, torch.hstack, torch.vstack}


class _Tied(Exception):
    """Internal: a producer's channels cannot be removed; the message says why."""


@dataclass
class _Trace:
    graph: fx.Graph
    modules: dict[str, nn.Module]
    calls: Counter[str]
    shared: dict[str, str]


def _trace(model: nn.Module) -> _Trace:
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:  # fx raises many kinds of errors on untraceable code
        raise ModelError(
            f"cannot analyze {type(model).__name__} for channel pruning: torch.fx could not trace "
            f"its forward ({type(exc).__name__}: {exc})"
        ) from exc
    modules = dict(model.named_modules())
    calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
    shared: dict[str, str] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            owner = str(node.target).rpartition(".")[0]
            shared[owner] = f"its parameters are used directly in forward ({node.target!r})"
    aliases: defaultdict[int, list[str]] = defaultdict(list)
    for name, mod in model.named_modules(remove_duplicate=False):
        aliases[id(mod)].append(name)
    owners: defaultdict[int, set[str]] = defaultdict(set)
    for name, mod in modules.items():
        for p in mod.parameters(recurse=False):
            owners[id(p)].add(name)
    for names in aliases.values():
        if len(names) > 1:
            for name in names:
                shared[name] = f"the module is registered under several names {names}"
    for names in owners.values():
        if len(names) > 1:
            for name in names:
                shared[name] = f"it shares parameters with {sorted(names - {name})}"
    for name, count in calls.items():
        if count > 1:
            shared[name] = f"module {name!r} is called {count} times in forward"
    return _Trace(graph, modules, calls, shared)


def _out_channels(mod: nn.Module) -> int:
    return mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _is_batch_size(arg: Any) -> bool:
    """``x.size(0)`` / ``x.shape[0]`` as traced by fx."""
    if not isinstance(arg, fx.Node):
        return False
    if arg.op == "call_method" and arg.target == "size":
        return _arg(arg, 1, "dim", None) == 0
    if arg.op == "call_function" and arg.target is operator.getitem and arg.args[1] == 0:
        src = arg.args[0]
        return isinstance(src, fx.Node) and src.op == "call_function" and src.args[1:] == (
            "shape",
        )
    return False


def _where(node: fx.Node) -> str:
    """``'add_3' in 'layer2.0'``: a traced op and the module whose forward runs it."""
    stack = node.meta.get("nn_module_stack") or {}
    owner = next(reversed(stack), None) if stack else None
    return f"{node.name!r} in {owner!r}" if owner else repr(node.name)


def _follow(
    tr: _Trace, user: fx.Node, src: fx.Node, spatial: bool, flattened: bool, channels: int
) -> tuple[str, Any]:
    """Classify how ``user`` treats the channels carried by ``src``.

    Returns ``("consumer", factor)``, ``("pass", (spatial, flattened, shrink))`` or
    ``("ignore", None)``; raises :class:`_Tied` when the channels cannot be removed.
    """
    first = user.args[0] if user.args else user.kwargs.get("input")
    if user.op == "output":
        raise _Tied("its channels reach the model output (a final classifier is never pruned)")
    if user.op == "call_module":
        name = str(user.target)
        mod = tr.modules[name]
        if name in tr.shared and isinstance(mod, (nn.Conv2d, nn.Linear, _BatchNorm)):
            raise _Tied(f"its channels reach {name!r}, which cannot be resized: {tr.shared[name]}")
        if first is not src:
            raise _Tied(f"its output is passed to {name!r} other than as the input")
        kind = type(mod).__name__
        if isinstance(mod, nn.Conv2d):
            if not spatial:
                raise _Tied(f"its flattened output feeds Conv2d {name!r}")
            if mod.groups == 1:
                return "consumer", 1
            if _is_depthwise(mod):
                return "pass", (True, False, True)
            raise _Tied(f"its channels feed grouped convolution {name!r} (groups={mod.groups})")
        if isinstance(mod, nn.Linear):
            if spatial:
                raise _Tied(f"its 4-D output feeds Linear {name!r} without a flatten")
            if flattened:
                if mod.in_features % channels:
                    raise _Tied(
                        f"Linear {name!r} has {mod.in_features} inputs, not a multiple of "
                        f"{channels} channels"
                    )
                return "consumer", mod.in_features // channels
            if mod.in_features != channels:
                raise _Tied(f"Linear {name!r} expects {mod.in_features} features, not {channels}")
            return "consumer", 1
        if isinstance(mod, _BatchNorm):
            ok_type = isinstance(mod, nn.BatchNorm2d) if spatial else (
                isinstance(mod, nn.BatchNorm1d) and not flattened
            )
            if not ok_type or mod.num_features != channels:
                raise _Tied(f"its channels reach {kind} {name!r}, which does not match them")
            return "pass", (spatial, flattened, True)
        if isinstance(mod, nn.Flatten):
            if spatial and mod.start_dim == 1 and mod.end_dim == -1:
                return "pass", (False, True, False)
            raise _Tied(f"its output is flattened by {name!r} in a way that mixes channels")
        if isinstance(mod, _ELEMENTWISE_MODULES) or (spatial and isinstance(mod, _SPATIAL_MODULES)):
            return "pass", (spatial, flattened, False)
        raise _Tied(f"its channels reach {kind} {name!r}, which channel pruning cannot resize")
    if user.op == "call_function":
        fn = user.target
        tensors = [a for a in (*user.args, *user.kwargs.values()) if isinstance(a, fx.Node)]
        if fn in (operator.add, operator.iadd, torch.add) and len(tensors) > 1:
            raise _Tied(
                f"its channels reach a residual addition ({_where(user)}): channels added to "
                "another branch are tied across the stage"
            )
        if fn in _JOIN_FUNCTIONS:
            raise _Tied(f"its output is concatenated ({_where(user)}) with other tensors")
        if fn is getattr:
            return "ignore", None
        if fn in _SCALAR_FUNCTIONS:
            if len(tensors) == 1:
                return "pass", (spatial, flattened, False)
            raise _Tied(f"its output is combined with another tensor by {_where(user)}")
        if first is not src:
            raise _Tied(f"its output is used by {_where(user)} other than as the input")
        if fn is torch.flatten:
            start, end = _arg(user, 1, "start_dim", 0), _arg(user, 2, "end_dim", -1)
            if spatial and start == 1 and end == -1:
                return "pass", (False, True, False)
            raise _Tied(f"its output is flattened by {_where(user)} in a way that mixes channels")
        if fn in _ELEMENTWISE_FUNCTIONS or (spatial and fn in _SPATIAL_FUNCTIONS):
            return "pass", (spatial, flattened, False)
        raise _Tied(f"its output reaches {_where(user)}, an op channel pruning cannot follow")
    if user.op == "call_method":
        method = str(user.target)
        if method in _SHAPE_QUERIES:
            return "ignore", None
        if first is not src:
            raise _Tied(f"its output is used by {_where(user)} other than as the input")
        if method == "flatten":
            start, end = _arg(user, 1, "start_dim", 0), _arg(user, 2, "end_dim", -1)
            if spatial and start == 1 and end == -1:
                return "pass", (False, True, False)
            raise _Tied(f"its output is flattened by {_where(user)} in a way that mixes channels")
        if method in ("view", "reshape"):
            shape = user.args[1:]
            if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
                shape = tuple(shape[0])
            if spatial and len(shape) == 2 and _is_batch_size(shape[0]) and shape[1] == -1:
                return "pass", (False, True, False)
            raise _Tied(f"its output is reshaped by {method} ({_where(user)})")
        if method in _ELEMENTWISE_METHODS:
            tensors = [a for a in (*user.args[1:], *user.kwargs.values()) if isinstance(a, fx.Node)]
            if not tensors:
                return "pass", (spatial, flattened, False)
            raise _Tied(f"its output is combined with another tensor by {_where(user)}")
        raise _Tied(f"its output reaches .{method}() ({_where(user)}), which pruning cannot follow")
    raise _Tied(f"its output reaches {user.op} {_where(user)}")


def _group_of(tr: _Trace, name: str, node: fx.Node) -> ChannelGroup:
    mod = tr.modules[name]
    channels = _out_channels(mod)
    consumers: list[str] = []
    passthrough: list[str] = []
    factors: dict[str, int] = {}
    seen: set[fx.Node] = set()
    stack = [(node, isinstance(mod, nn.Conv2d), False)]
    while stack:
        src, spatial, flattened = stack.pop()
        for user in src.users:
            kind, info = _follow(tr, user, src, spatial, flattened, channels)
            if kind == "consumer":
                target = str(user.target)
                if target in factors:
                    raise _Tied(f"its channels reach {target!r} twice")
                consumers.append(target)
                factors[target] = info
            elif kind == "pass" and user not in seen:
                seen.add(user)
                next_spatial, next_flat, shrink = info
                if shrink:
                    passthrough.append(str(user.target))
                stack.append((user, next_spatial, next_flat))
    if not consumers:
        raise _Tied("no layer consumes its output")
    return ChannelGroup(name, tuple(consumers), tuple(passthrough), factors)


def _analyze(model: nn.Module) -> tuple[dict[str, ChannelGroup], dict[str, str]]:
    """Groups of prunable layers and the reason for every other Conv2d/Linear."""
    tr = _trace(model)
    nodes = {str(n.target): n for n in tr.graph.nodes if n.op == "call_module"}
    groups: dict[str, ChannelGroup] = {}
    reasons: dict[str, str] = {}
    for name, mod in tr.modules.items():
        if not name or not isinstance(mod, (nn.Conv2d, nn.Linear)):
            continue
        if isinstance(mod, nn.Conv2d) and mod.groups > 1:
            reasons[name] = (
                "depthwise convolution: its channels follow the layer that feeds it"
                if _is_depthwise(mod)
                else f"grouped convolution (groups={mod.groups})"
            )
        elif name not in nodes:
            reasons[name] = "it is not called as a module in forward"
        elif name in tr.shared:
            reasons[name] = tr.shared[name]
        else:
            try:
                groups[name] = _group_of(tr, name, nodes[name])
            except _Tied as why:
                reasons[name] = str(why)
    for group in groups.values():
        for dw in group.passthrough:
            if dw in reasons:
                reasons[dw] = (
                    f"depthwise convolution: its channels follow {group.producer!r} and are "
                    "pruned with it"
                )
    return groups, reasons


def channel_groups(model: nn.Module) -> dict[str, ChannelGroup]:
    """The :class:`ChannelGroup` of every prunable layer of ``model``, by layer name."""
    return _analyze(model)[0]


def prunable_layers(model: nn.Module) -> dict[str, str | None]:
    """Every Conv2d/Linear of ``model``: ``None`` if its outputs can be pruned, else why not.

    Raises :class:`ModelError` when ``torch.fx`` cannot trace the model.
    """
    groups, reasons = _analyze(model)
    return {
        name: None if name in groups else reasons[name]
        for name, mod in model.named_modules()
        if name and isinstance(mod, (nn.Conv2d, nn.Linear))
    }


# --------------------------------------------------------------------------- scoring


def channel_scores(module: nn.Module, norm: Norm = "l1") -> torch.Tensor:
    """Per-output-channel L1 or L2 norm of ``module``'s weight (a Conv2d filter or Linear row)."""
    if not isinstance(module, (nn.Conv2d, nn.Linear)):
        raise ModelError(f"channel scores need a Conv2d or Linear, got {type(module).__name__}")
    if norm not in ("l1", "l2"):
        raise ModelError(f"unknown norm {norm!r}; use 'l1' or 'l2'")
    w = module.weight.detach().float().flatten(1)
    return w.abs().sum(1) if norm == "l1" else w.pow(2).sum(1).sqrt()


def select_channels(
    module: nn.Module, ratio: float, norm: Norm = "l1", round_to: int = 1
) -> torch.Tensor:
    """Sorted indices of the channels to keep when removing a ``ratio`` of the weakest.

    ``floor(ratio × C)`` channels are removed; the kept count is rounded *up* to a multiple of
    ``round_to`` (capped at C) and is never below 1. Ties keep the lower index.
    """
    if not 0 <= ratio < 1:
        raise ModelError(f"ratio must be in [0, 1), got {ratio!r}")
    scores = channel_scores(module, norm)
    total = scores.numel()
    keep = total - math.floor(ratio * total + 1e-9)
    if round_to > 1:
        keep = math.ceil(keep / round_to) * round_to
    keep = max(1, min(total, keep))
    order = torch.argsort(scores, descending=True, stable=True)
    return torch.sort(order[:keep]).values


# --------------------------------------------------------------------------- surgery


def _keep_tensor(name: str, keep: Sequence[int] | torch.Tensor, total: int) -> torch.Tensor:
    idx = torch.as_tensor(keep)
    if idx.dim() != 1 or idx.numel() == 0 or idx.is_floating_point() or idx.dtype == torch.bool:
        raise ModelError(f"keep indices of {name!r} must be a non-empty 1-D list of integers")
    idx = torch.unique(idx.long().cpu())  # sorted, deduplicated
    if idx.numel() != torch.as_tensor(keep).numel():
        raise ModelError(f"keep indices of {name!r} contain duplicates")
    if idx[0] < 0 or idx[-1] >= total:
        raise ModelError(f"keep indices of {name!r} must lie in [0, {total}), got {keep!r}")
    return idx


def prune_channels(
    model: nn.Module,
    plan: Mapping[str, Sequence[int] | torch.Tensor],
    groups: Mapping[str, ChannelGroup] | None = None,
) -> nn.Module:
    """Keep only ``plan[layer]`` output channels of each named layer; shrink its consumers too.

    Layers are replaced (``setattr`` on their parents) by new, smaller ``nn.Conv2d`` /
    ``nn.Linear`` / ``nn.BatchNorm*`` modules holding the kept slices of weights, biases and
    running statistics. Works in place and returns ``model``. ``groups`` may pass a precomputed
    :func:`channel_groups` result of this same model.
    """
    if groups is None:
        groups, reasons = _analyze(model)
    else:
        reasons = {}
    modules = dict(model.named_modules())
    out_keep: dict[str, torch.Tensor] = {}
    in_keep: dict[str, torch.Tensor] = {}

    def assign(table: dict[str, torch.Tensor], name: str, idx: torch.Tensor) -> None:
        if name in table:
            raise ModelError(f"layer {name!r} would be resized twice by this plan")
        table[name] = idx

    for name, keep in plan.items():
        if name not in groups:
            why = reasons.get(name) or prunable_layers(model).get(name, "no such Conv2d/Linear")
            raise ModelError(f"layer {name!r} cannot be channel-pruned: {why}")
        group = groups[name]
        idx = _keep_tensor(name, keep, _out_channels(modules[name]))
        if idx.numel() == _out_channels(modules[name]):
            continue
        assign(out_keep, name, idx)
        for other in group.passthrough:
            assign(out_keep, other, idx)
        for consumer in group.consumers:
            f = group.flatten_factor.get(consumer, 1)
            cols = idx if f == 1 else (idx[:, None] * f + torch.arange(f)).flatten()
            assign(in_keep, consumer, cols)
    touched = list(dict.fromkeys([*out_keep, *in_keep]))
    for name in touched:
        _check_unparametrized(modules[name], name)
    for name in touched:
        _replace(model, name, _resized_module(modules[name], out_keep.get(name), in_keep.get(name)))
    return model


# --------------------------------------------------------------------------- method


@dataclass(frozen=True)
class LayerChange:
    """Shape of one Conv2d/Linear before → after pruning."""

    in_channels: tuple[int, int]
    out_channels: tuple[int, int]
    params: tuple[int, int]


@dataclass
class ChannelPruningReport:
    """What :class:`ChannelPruning` did: per-layer changes, layers skipped and why, totals."""

    layers: dict[str, LayerChange]
    """Every Conv2d/Linear whose shape changed (pruned layers and their consumers)."""
    pruned: list[str]
    """Layers whose output channels were pruned."""
    skipped: dict[str, str]
    """Selected layers that cannot be pruned, with the reason."""
    params: tuple[int, int]
    macs: tuple[int, int] | None
    """MACs per sample before → after (``None`` when the input shape is unknown)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "layers": {
                n: {"in_channels": list(c.in_channels), "out_channels": list(c.out_channels),
                    "params": list(c.params)}
                for n, c in self.layers.items()
            },
            "pruned": list(self.pruned),
            "skipped": dict(self.skipped),
            "params": list(self.params),
            "macs": list(self.macs) if self.macs else None,
        }

    def __str__(self) -> str:
        lines = [f"{'layer':<24} {'in':>11} {'out':>11} {'params':>17}"]
        for n, c in self.layers.items():
            lines.append(
                f"{n:<24} {c.in_channels[0]:>4} → {c.in_channels[1]:<4} "
                f"{c.out_channels[0]:>4} → {c.out_channels[1]:<4} "
                f"{c.params[0]:>7} → {c.params[1]:<7}"
            )
        lines.append(f"params {self.params[0]:,} → {self.params[1]:,}")
        if self.macs:
            lines.append(f"MACs/sample {self.macs[0]:,} → {self.macs[1]:,}")
        return "\n".join(lines)


def _layer_shapes(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            out[name] = (mod.in_channels, mod.out_channels, parameter_count(mod))
        elif isinstance(mod, nn.Linear):
            out[name] = (mod.in_features, mod.out_features, parameter_count(mod))
    return out


def _macs(model: nn.Module) -> int | None:
    from deepsqueeze import models

    try:
        shape = models.input_shape_of(model)
    except ModelError:
        return None
    return macs_per_sample(model, shape)


class ChannelPruningParams(MethodParams):
    """Parameters of ``channel-prune``."""

    ratio: float | dict[str, float]
    """Fraction of output channels to remove from each selected layer, in [0, 1)."""
    norm: Norm = "l1"
    round_to: int = Field(1, ge=1)
    """Round kept channel counts up to a multiple of this (e.g. 8 for fast kernels)."""
    layers: list[str] | None = None
    """Layer names/globs; ``None`` means every prunable layer."""

    @field_validator("ratio")
    @classmethod
    def _ratio_in_range(cls, value: float | dict[str, float]) -> float | dict[str, float]:
        for key, r in (value.items() if isinstance(value, dict) else [("ratio", value)]):
            if not 0 <= r < 1:
                raise ValueError(
                    f"{key}: fraction of channels to remove must be in [0, 1), got {r!r}"
                )
        return value


@register_method
class ChannelPruning(Method):
    """Structured L1/L2-norm filter pruning that physically shrinks layers (Li et al. 2017).

    One-shot: ``apply`` removes the weakest output channels of each selected prunable layer and
    resizes everything that reads them; fine-tuning is the usual ``fit`` afterwards. Channels
    tied by residual additions (ResNet stem, block ``conv2``, shortcuts) and the classifier
    outputs are never pruned. With ``layers=None`` every prunable layer is pruned; a glob pattern
    picks the prunable layers it matches; an exact name of a layer that cannot be pruned is a
    :class:`ModelError` saying why. After ``apply``, ``self.report`` holds a
    :class:`ChannelPruningReport`.
    """

    name = "channel-prune"
    Params = ChannelPruningParams
    params: ChannelPruningParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.report: ChannelPruningReport | None = None

    def _targets(self, model: nn.Module, layers: dict[str, nn.Module],
                 groups: dict[str, ChannelGroup], reasons: dict[str, str]) -> list[str]:
        for pattern in self.params.layers or []:
            if pattern in reasons:
                raise ModelError(
                    f"layer {pattern!r} cannot be channel-pruned: {reasons[pattern]}"
                )
            hits = select_layers(model, [pattern], self.supported)
            if not any(h in groups for h in hits):
                why = "; ".join(f"{h!r}: {reasons[h]}" for h in list(hits)[:4])
                raise ModelError(
                    f"layer pattern {pattern!r} matches no layer that can be channel-pruned "
                    f"({why})"
                )
        return [name for name in layers if name in groups]

    def apply(self, model: nn.Module, layers: dict[str, nn.Module]) -> None:
        """Score, select and remove channels of the prunable ``layers`` (in place)."""
        groups, reasons = _analyze(model)
        targets = self._targets(model, layers, groups, reasons)
        skipped = {n: reasons.get(n, "not a Conv2d or Linear") for n in layers if n not in groups}
        ratios = per_layer(self.params.ratio, targets, "channel-prune ratio") if targets else {}
        shapes_before = _layer_shapes(model)
        params_before, macs_before = parameter_count(model), _macs(model)
        plan = {}
        for name in targets:
            if ratios[name] > 0:
                mod = model.get_submodule(name)
                plan[name] = select_channels(mod, ratios[name], self.params.norm,
                                             self.params.round_to)
        prune_channels(model, plan, groups)
        shapes_after = _layer_shapes(model)
        macs_after = _macs(model)
        both = macs_before is not None and macs_after is not None
        self.report = ChannelPruningReport(
            layers={
                n: LayerChange((b[0], a[0]), (b[1], a[1]), (b[2], a[2]))
                for n, b in shapes_before.items()
                if (a := shapes_after[n]) != b
            },
            pruned=[n for n in plan if len(plan[n]) < shapes_before[n][1]],
            skipped=skipped,
            params=(params_before, parameter_count(model)),
            macs=(macs_before, macs_after) if both else None,
        )
