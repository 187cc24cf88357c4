"""A model's architecture as a small declarative graph: captured by torch.fx, rebuilt from
allowlists, never by importing or executing anything a file names.

Why an fx graph as JSON: torch.export's serialized program is large, bound to the torch version
that wrote it and read back by a general-purpose deserializer; ONNX needs a converter back to
torch and a large operator set. A symbolic fx trace gives exactly what these models are (leaf
modules with their constructor options, and the functions and tensor methods that join them),
which fits a few hundred bytes of JSON that is fully specified (docs/format.md, "User models")
and easy to validate field by field.

- :func:`capture` traces a model with :class:`torch.fx.Tracer` (no inputs needed): every leaf
  module must be of an allowlisted ``torch.nn`` type (:data:`MODULES`; a parametrized module
  counts as its base type), every function and method call must be in :data:`FUNCTIONS` /
  :data:`METHODS`, constants must be small plain values. Anything else (control flow on
  values, custom layers, attribute reads) gives ``None``: the file is then stored without a
  graph and loads into the user's skeleton. With example inputs, the rebuilt graph is run
  against the model and kept only when the outputs agree.
- :func:`rebuild` validates every field and returns a :class:`GraphModel`: leaf modules built
  by name lookup in :data:`MODULES` with bounded options, on the meta device by default (give it
  memory with ``to_empty``), run by a small interpreter over the validated node list. Nothing
  is generated, compiled or imported; a call target is a value of a fixed dict.

Leaf module names are the model's own qualified names (``features.0``), so the rebuilt model's
``state_dict`` has the same keys as the original's and the stored weights fill it by name.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from deepsqueeze.errors import DsqFormatError, ModelError
from deepsqueeze.models.state import plain_state

__all__ = [
    "DTYPES",
    "FUNCTIONS",
    "GRAPH_VERSION",
    "MAX_NODES",
    "METHODS",
    "MODULES",
    "USER_ATTR",
    "GraphModel",
    "UserModel",
    "apply_kinds",
    "bool_option",
    "build_module",
    "capture",
    "choice_option",
    "conv_options",
    "describe",
    "float_option",
    "int_option",
    "ints_option",
    "kind_specs",
    "optional_option",
    "rebuild",
    "register_kind",
]

GRAPH_VERSION = 1
MAX_NODES = 4096
"""Most nodes a graph may have (placeholders and output included)."""
MAX_MODULES = 2048
MAX_INPUTS = 16
MAX_NAME = 200
MAX_NAME_DEPTH = 16
MAX_ITEMS = 64
"""Most values (recursively) in one node's args and kwargs."""
MAX_DEPTH = 4
"""Deepest nesting of a node's args (tuples, lists, slices)."""
MAX_STR = 64
MAX_DIM = 1 << 24
"""Largest size option of a module (features, channels, embeddings)."""
MAX_WINDOW = 1024
"""Largest kernel, stride, padding and dilation of a convolution or pooling."""
MAX_CONST = 1 << 31
"""Largest magnitude of an integer constant in a node's args."""
MAX_PARAMETERS = 1 << 24
MAX_INPUT_RANK = 8

USER_ATTR = "deepsqueeze_user"
"""Attribute holding the :class:`UserModel` of a model loaded from (or saved to) a file."""

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32,
    "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
"""Input dtypes a description may name."""


# --------------------------------------------------------------------------- option checks

Check = Callable[[Any, str], Any]


def _fail(where: str, what: str, value: Any) -> DsqFormatError:
    return DsqFormatError(f"graph: {where} must be {what}, found {value!r:.60}")


def _int(lo: int, hi: int) -> Check:
    def check(v: Any, where: str) -> int:
        if type(v) is not int or not lo <= v <= hi:
            raise _fail(where, f"an integer in {lo}..{hi}", v)
        return v
    return check


def _float(lo: float, hi: float) -> Check:
    def check(v: Any, where: str) -> float:
        if type(v) not in (int, float) or not math.isfinite(v) or not lo <= v <= hi:
            raise _fail(where, f"a number in {lo}..{hi}", v)
        return float(v)
    return check


def _bool(v: Any, where: str) -> bool:
    if type(v) is not bool:
        raise _fail(where, "true or false", v)
    return v


def _optional(inner: Check) -> Check:
    def check(v: Any, where: str) -> Any:
        return None if v is None else inner(v, where)
    return check


def _choice(*values: Any) -> Check:
    def check(v: Any, where: str) -> Any:
        if not any(type(v) is type(c) and v == c for c in values):
            raise _fail(where, f"one of {list(values)}", v)
        return v
    return check


def _ints(n: int, lo: int, hi: int, *, none: bool = False) -> Check:
    """An int or a list of exactly ``n`` ints (``None`` items where ``none``), as a tuple."""
    item = _int(lo, hi)

    def check(v: Any, where: str) -> Any:
        if type(v) is int:
            return item(v, where)
        if not isinstance(v, list) or len(v) != n:
            raise _fail(where, f"an integer or a list of {n} integers", v)
        return tuple(None if (none and x is None) else item(x, where) for x in v)
    return check


def _padding(n: int) -> Check:
    ints = _ints(n, 0, MAX_WINDOW)

    def check(v: Any, where: str) -> Any:
        return v if v in ("same", "valid") and type(v) is str else ints(v, where)
    return check


def _shape(v: Any, where: str) -> tuple[int, ...]:
    if not isinstance(v, list) or len(v) > MAX_INPUT_RANK:
        raise _fail(where, f"a list of at most {MAX_INPUT_RANK} integers", v)
    shape = tuple(_int(1, MAX_DIM)(x, where) for x in v)
    if math.prod(shape) > MAX_DIM:
        raise _fail(where, f"a shape of at most {MAX_DIM:,} elements", v)
    return shape


def _dims(v: Any, where: str) -> tuple[int, ...]:
    if not isinstance(v, list) or not 1 <= len(v) <= MAX_INPUT_RANK:
        raise _fail(where, f"a list of 1..{MAX_INPUT_RANK} integers", v)
    return _shape(v, where)


_DIM = _int(1, MAX_DIM)
_WIN = _int(1, MAX_WINDOW)
_EPS = _float(0.0, 1.0)
_MOMENTUM = _optional(_float(0.0, 1.0))
_P = _float(0.0, 1.0)
_AXIS = _int(-MAX_INPUT_RANK, MAX_INPUT_RANK - 1)
_PAD_MODE = _choice("zeros", "reflect", "replicate", "circular")


def _conv(n: int) -> dict[str, Check]:
    return {
        "in_channels": _DIM, "out_channels": _DIM, "kernel_size": _ints(n, 1, MAX_WINDOW),
        "stride": _ints(n, 1, MAX_WINDOW), "padding": _padding(n),
        "dilation": _ints(n, 1, MAX_WINDOW), "groups": _DIM, "bias": _bool,
        "padding_mode": _PAD_MODE,
    }


def _max_pool(n: int) -> dict[str, Check]:
    return {
        "kernel_size": _ints(n, 1, MAX_WINDOW), "stride": _ints(n, 1, MAX_WINDOW),
        "padding": _ints(n, 0, MAX_WINDOW), "dilation": _ints(n, 1, MAX_WINDOW),
        "return_indices": _choice(False), "ceil_mode": _bool,
    }


_BN = {"num_features": _DIM, "eps": _EPS, "momentum": _MOMENTUM, "affine": _bool,
       "track_running_stats": _bool}
_INPLACE = {"inplace": _bool}
_DROPOUT = {"p": _P, "inplace": _bool}
_SOFTMAX = {"dim": _optional(_AXIS)}


@dataclass(frozen=True)
class ModuleKind:
    """An allowlisted module type: its class and the checks of its constructor options."""

    cls: type[nn.Module]
    options: dict[str, Check]
    added: dict[str, Any] = field(default_factory=dict)
    """Options added after files were written: a file may lack them, and then gets this value
    (what the class did before the option existed)."""


MODULES: dict[str, ModuleKind] = {
    "Linear": ModuleKind(nn.Linear, {"in_features": _DIM, "out_features": _DIM,
                                     "bias": _bool}),
    "Conv1d": ModuleKind(nn.Conv1d, _conv(1)),
    "Conv2d": ModuleKind(nn.Conv2d, _conv(2)),
    "BatchNorm1d": ModuleKind(nn.BatchNorm1d, _BN),
    "BatchNorm2d": ModuleKind(nn.BatchNorm2d, _BN),
    "LayerNorm": ModuleKind(nn.LayerNorm, {
        "normalized_shape": _dims, "eps": _EPS,
        "elementwise_affine": _bool, "bias": _bool}),
    "Embedding": ModuleKind(nn.Embedding, {
        "num_embeddings": _DIM, "embedding_dim": _DIM,
        "padding_idx": _optional(_int(-MAX_DIM, MAX_DIM)),
        "max_norm": _optional(_float(0.0, 1e30)), "norm_type": _float(0.0, 1e3),
        "scale_grad_by_freq": _bool, "sparse": _bool}),
    "ReLU": ModuleKind(nn.ReLU, _INPLACE),
    "ReLU6": ModuleKind(nn.ReLU6, _INPLACE),
    "LeakyReLU": ModuleKind(nn.LeakyReLU, {"negative_slope": _float(-1e3, 1e3),
                                           "inplace": _bool}),
    "GELU": ModuleKind(nn.GELU, {"approximate": _choice("none", "tanh")}),
    "SiLU": ModuleKind(nn.SiLU, _INPLACE),
    "Sigmoid": ModuleKind(nn.Sigmoid, {}),
    "Tanh": ModuleKind(nn.Tanh, {}),
    "Softmax": ModuleKind(nn.Softmax, _SOFTMAX),
    "LogSoftmax": ModuleKind(nn.LogSoftmax, _SOFTMAX),
    "Dropout": ModuleKind(nn.Dropout, _DROPOUT),
    "Dropout1d": ModuleKind(nn.Dropout1d, _DROPOUT),
    "Dropout2d": ModuleKind(nn.Dropout2d, _DROPOUT),
    "Dropout3d": ModuleKind(nn.Dropout3d, _DROPOUT),
    "AlphaDropout": ModuleKind(nn.AlphaDropout, _DROPOUT),
    "FeatureAlphaDropout": ModuleKind(nn.FeatureAlphaDropout, _DROPOUT),
    "MaxPool1d": ModuleKind(nn.MaxPool1d, _max_pool(1)),
    "MaxPool2d": ModuleKind(nn.MaxPool2d, _max_pool(2)),
    "AvgPool1d": ModuleKind(nn.AvgPool1d, {
        "kernel_size": _ints(1, 1, MAX_WINDOW), "stride": _ints(1, 1, MAX_WINDOW),
        "padding": _ints(1, 0, MAX_WINDOW), "ceil_mode": _bool, "count_include_pad": _bool}),
    "AvgPool2d": ModuleKind(nn.AvgPool2d, {
        "kernel_size": _ints(2, 1, MAX_WINDOW), "stride": _ints(2, 1, MAX_WINDOW),
        "padding": _ints(2, 0, MAX_WINDOW), "ceil_mode": _bool, "count_include_pad": _bool,
        "divisor_override": _optional(_WIN)}),
    "AdaptiveAvgPool1d": ModuleKind(nn.AdaptiveAvgPool1d, {"output_size": _ints(1, 1, MAX_DIM)}),
    "AdaptiveAvgPool2d": ModuleKind(nn.AdaptiveAvgPool2d, {
        "output_size": _ints(2, 1, MAX_DIM, none=True)}),
    "Flatten": ModuleKind(nn.Flatten, {"start_dim": _AXIS, "end_dim": _AXIS}),
    "Identity": ModuleKind(nn.Identity, {}),
}
"""Module types a graph may hold, by name, with the checks of each constructor option."""

_KIND_OF: dict[type[nn.Module], str] = {k.cls: name for name, k in MODULES.items()}

KINDS: dict[str, ModuleKind] = {}
"""The compressed layer kinds of the method families (low-rank, hashed, binary, quantized...):
allowlisted like :data:`MODULES` (which holds them too), and in addition recorded in a .dsq
manifest wherever a model holds one, so a file rebuilds them on the zoo model or the user's
skeleton it is loaded into (:func:`kind_specs`, :func:`apply_kinds`)."""

# Option checks for the kinds' constructor options (public: the families' modules use them).
int_option = _int
float_option = _float
bool_option = _bool
optional_option = _optional
choice_option = _choice
ints_option = _ints
conv_options = _conv


def register_kind(name: str, cls: type[nn.Module], options: dict[str, Check],
                  added: dict[str, Any] | None = None) -> None:
    """Register a compressed layer kind: ``cls(**options)`` rebuilds it, each option read from
    the module's attribute of the same name (``bias``: whether ``module.bias`` is set) and
    checked by its :data:`Check` when a file is read. The kind becomes a graph leaf and is
    recorded in every .dsq file that holds one. Re-registering the same class is a no-op.
    ``added``: options introduced after files were written, with the value a file that lacks
    them gets (every other option must be present)."""
    unknown = set(added or {}) - set(options)
    if unknown:
        raise ValueError(f"added options {sorted(unknown)} are not options of {name}")
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"kind name {name!r} must be an identifier")
    known = MODULES.get(name)
    if known is not None and known.cls is not cls:
        raise ValueError(f"kind {name!r} is already registered for {known.cls.__name__}")
    MODULES[name] = KINDS[name] = ModuleKind(cls, dict(options), dict(added or {}))
    _KIND_OF[cls] = name


def _option(mod: nn.Module, key: str) -> Any:
    """The constructor option ``key`` of ``mod``, as JSON (tuples as lists)."""
    if key == "bias":
        return getattr(mod, "bias", None) is not None
    value = getattr(mod, key)
    if isinstance(value, tuple):
        return list(value)
    return value


def _kind_name(mod: nn.Module) -> str | None:
    """The allowlisted kind of ``mod`` (a parametrized module counts as its base type)."""
    cls = type(mod)
    if parametrize.is_parametrized(mod):
        cls = cls.__bases__[0]
    return _KIND_OF.get(cls)


# --------------------------------------------------------------------------- functions

def _getattr_shape(x: torch.Tensor, name: str) -> Any:
    if name != "shape":
        raise DsqFormatError(f"graph: only .shape may be read from a tensor, not {name!r:.40}")
    return x.shape


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul,
    "truediv": operator.truediv, "floordiv": operator.floordiv, "neg": operator.neg,
    "getitem": operator.getitem, "getattr": _getattr_shape,
    "torch.add": torch.add, "torch.sub": torch.sub, "torch.mul": torch.mul,
    "torch.cat": torch.cat, "torch.stack": torch.stack, "torch.flatten": torch.flatten,
    "torch.relu": torch.relu, "torch.sigmoid": torch.sigmoid, "torch.tanh": torch.tanh,
    "torch.mean": torch.mean, "torch.sum": torch.sum, "torch.softmax": torch.softmax,
    "F.relu": F.relu, "F.relu6": F.relu6, "F.gelu": F.gelu, "F.silu": F.silu,
    "F.leaky_relu": F.leaky_relu, "F.sigmoid": F.sigmoid, "F.tanh": F.tanh,
    "F.softmax": F.softmax, "F.log_softmax": F.log_softmax, "F.dropout": F.dropout,
    "F.max_pool1d": F.max_pool1d, "F.max_pool2d": F.max_pool2d,
    "F.avg_pool1d": F.avg_pool1d, "F.avg_pool2d": F.avg_pool2d,
    "F.adaptive_avg_pool1d": F.adaptive_avg_pool1d,
    "F.adaptive_avg_pool2d": F.adaptive_avg_pool2d,
}
"""Functions a graph may call, by the name the file uses."""

_FUNCTION_NAME: dict[int, str] = {id(fn): name for name, fn in FUNCTIONS.items()}
_FUNCTION_NAME[id(getattr)] = "getattr"

METHODS: frozenset[str] = frozenset({
    "view", "reshape", "flatten", "relu", "sigmoid", "tanh", "mean", "sum", "size", "permute",
    "transpose", "contiguous", "squeeze", "unsqueeze", "softmax", "add", "mul",
})
"""Tensor methods a graph may call."""

_OPS = ("placeholder", "call_module", "call_function", "call_method", "output")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_SEGMENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+")
_NODE_KEYS = {"name", "op", "target", "args", "kwargs"}


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class _Ref:
    """A reference to an earlier node's value."""

    index: int


@dataclass(frozen=True)
class _Step:
    op: str
    target: Any  # module name (call_module), callable (call_function), method name
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class GraphModel(nn.Module):
    """A model rebuilt from a graph: its leaf modules under their original names, run by an
    interpreter over a validated list of steps (no code is generated or compiled)."""

    def __init__(self, n_inputs: int, steps: list[_Step], output: Any) -> None:
        super().__init__()
        self._n_inputs = n_inputs
        self._steps = steps
        self._output = output

    def forward(  # explicit inputs, not *args: torch.fx can trace a rebuilt model again
        self, x0: Any, x1: Any = None, x2: Any = None, x3: Any = None, x4: Any = None,
        x5: Any = None, x6: Any = None, x7: Any = None, x8: Any = None, x9: Any = None,
        x10: Any = None, x11: Any = None, x12: Any = None, x13: Any = None, x14: Any = None,
        x15: Any = None,
    ) -> Any:
        given = (x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15)
        inputs = given[: self._n_inputs]
        if any(isinstance(x, torch.Tensor) for x in given[self._n_inputs :]) or any(
            x is None for x in inputs
        ):
            raise TypeError(f"this model takes {self._n_inputs} input(s)")
        values: list[Any] = list(inputs)
        for step in self._steps:
            args = _resolve(step.args, values)
            kwargs = {k: _resolve(v, values) for k, v in step.kwargs.items()}
            if step.op == "call_module":
                values.append(self.get_submodule(step.target)(*args, **kwargs))
            elif step.op == "call_function":
                values.append(step.target(*args, **kwargs))
            else:  # call_method, from METHODS
                values.append(getattr(args[0], step.target)(*args[1:], **kwargs))
        return _resolve(self._output, values)


def _resolve(value: Any, values: list[Any]) -> Any:
    if isinstance(value, _Ref):
        return values[value.index]
    if isinstance(value, tuple):
        return tuple(_resolve(v, values) for v in value)
    if isinstance(value, list):
        return [_resolve(v, values) for v in value]
    if isinstance(value, slice):
        return slice(*(_resolve(v, values) for v in (value.start, value.stop, value.step)))
    return value


# --------------------------------------------------------------------------- rebuild


def rebuild(graph: Any, *, device: str | torch.device = "meta") -> GraphModel:
    """The model a graph describes, every field checked; on ``device`` (meta by default:
    nothing allocated). Any defect raises :class:`DsqFormatError`."""
    if not isinstance(graph, dict) or set(graph) != {"version", "modules", "nodes"}:
        raise DsqFormatError(
            "graph: must be an object with exactly 'version', 'modules' and 'nodes'"
        )
    if graph["version"] != GRAPH_VERSION or type(graph["version"]) is not int:
        raise DsqFormatError(
            f"graph: version {graph['version']!r:.20} is not supported (this reader: "
            f"{GRAPH_VERSION}); upgrade deepsqueeze"
        )
    modules, nodes = graph["modules"], graph["nodes"]
    if not isinstance(modules, dict) or len(modules) > MAX_MODULES:
        raise DsqFormatError(f"graph: 'modules' must be an object of at most {MAX_MODULES}")
    if not isinstance(nodes, list) or not 2 <= len(nodes) <= MAX_NODES:
        raise DsqFormatError(f"graph: 'nodes' must be a list of 2..{MAX_NODES} nodes")
    built = {name: _build_module(name, spec, device) for name, spec in modules.items()}
    count = sum(p.numel() for m in built.values() for p in m.parameters())
    if count > MAX_PARAMETERS:
        raise DsqFormatError(
            f"graph: the modules hold {count:,} parameters, over the limit of {MAX_PARAMETERS:,}"
        )
    index: dict[str, int] = {}
    steps: list[_Step] = []
    n_inputs = 0
    output: Any = None
    used: set[str] = set()
    for i, node in enumerate(nodes):
        where = f"node {i}"
        if not isinstance(node, dict) or not set(node) <= _NODE_KEYS or not {
            "name", "op"} <= set(node):
            raise DsqFormatError(
                f"graph: {where} must be an object with 'name', 'op' and at most 'target', "
                "'args', 'kwargs'"
            )
        name, op = node["name"], node["op"]
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise _fail(f"{where} name", "an identifier of at most 64 characters", name)
        where = f"node {name!r}"
        if name in index:
            raise DsqFormatError(f"graph: {where} appears twice")
        if op not in _OPS:
            raise _fail(f"{where} op", f"one of {list(_OPS)}", op)
        if op == "output":
            if i != len(nodes) - 1:
                raise DsqFormatError(f"graph: the output node must be the last, found at {i}")
        elif i == len(nodes) - 1:
            raise DsqFormatError("graph: the last node must be the output")
        budget = [MAX_ITEMS]
        args = _value(node.get("args", []), index, f"{where} args", budget, 0)
        if not isinstance(args, list):
            raise _fail(f"{where} args", "a list", node.get("args"))
        raw_kwargs = node.get("kwargs", {})
        if not isinstance(raw_kwargs, dict) or len(raw_kwargs) > 16:
            raise _fail(f"{where} kwargs", "an object of at most 16 members", raw_kwargs)
        kwargs: dict[str, Any] = {}
        for key, val in raw_kwargs.items():
            if not _NAME_RE.fullmatch(key):
                raise _fail(f"{where} kwarg name", "an identifier", key)
            kwargs[key] = _value(val, index, f"{where} kwarg {key!r}", budget, 0)
        target = node.get("target")
        if op == "placeholder":
            if steps or i != n_inputs or n_inputs >= MAX_INPUTS:
                raise DsqFormatError(
                    f"graph: {where}: inputs (at most {MAX_INPUTS}) must come first"
                )
            if args or kwargs:
                raise DsqFormatError(f"graph: {where}: an input takes no default values")
            n_inputs += 1
        elif op == "output":
            if kwargs or len(args) != 1:
                raise DsqFormatError(f"graph: {where}: the output holds exactly one value")
            output = args[0]
        elif op == "call_module":
            if not isinstance(target, str) or target not in built:
                raise _fail(f"{where} target", "the name of a module in 'modules'", target)
            if not args or not isinstance(args[0], _Ref):
                raise DsqFormatError(f"graph: {where}: a module is called on a node's value")
            used.add(target)
            steps.append(_Step(op, target, tuple(args), kwargs))
        elif op == "call_function":
            if not isinstance(target, str) or target not in FUNCTIONS:
                raise _fail(f"{where} target", f"one of {sorted(FUNCTIONS)}", target)
            _check_call(target, args, kwargs, where)
            steps.append(_Step(op, FUNCTIONS[target], tuple(args), kwargs))
        else:  # call_method
            if not isinstance(target, str) or target not in METHODS:
                raise _fail(f"{where} target", f"one of {sorted(METHODS)}", target)
            if not args or not isinstance(args[0], _Ref):
                raise DsqFormatError(f"graph: {where}: a method is called on a node's value")
            steps.append(_Step(op, target, tuple(args), kwargs))
        index[name] = n_inputs + len(steps) - 1 if op != "output" else -1  # its value's slot
    if n_inputs == 0:
        raise DsqFormatError("graph: the model takes no input")
    unused = sorted(set(built) - used)
    if unused:
        raise DsqFormatError(f"graph: modules never called: {unused[:5]}")
    model = GraphModel(n_inputs, steps, output)
    for name in sorted(built):
        _attach(model, name, built[name])
    return model.eval()


def _check_call(target: str, args: list[Any], kwargs: dict[str, Any], where: str) -> None:
    """Extra shape of the calls whose arguments are not all tensors."""
    if len(args) > 8:
        raise DsqFormatError(f"graph: {where}: at most 8 positional arguments")
    if target == "getitem":
        if len(args) != 2 or kwargs or not isinstance(args[0], _Ref) or not _is_index(args[1]):
            raise DsqFormatError(
                f"graph: {where}: getitem takes a node and an integer, a slice or a tuple of "
                "them (None and ... allowed)"
            )
    elif target == "getattr" and (
        len(args) != 2 or kwargs or not isinstance(args[0], _Ref) or args[1] != "shape"
    ):
        raise DsqFormatError(f"graph: {where}: getattr may only read a node's 'shape'")


def _is_index(v: Any) -> bool:
    if type(v) is int or v is None or v is Ellipsis or isinstance(v, (slice, _Ref)):
        return True
    return isinstance(v, tuple) and all(
        type(x) is int or x is None or x is Ellipsis or isinstance(x, (slice, _Ref)) for x in v
    )


def _value(v: Any, index: dict[str, int], where: str, budget: list[int], depth: int) -> Any:
    """A node argument from JSON: constants, ``{"node": name}``, tuples, slices, ``...``."""
    budget[0] -= 1
    if budget[0] < 0 or depth > MAX_DEPTH:
        raise DsqFormatError(
            f"graph: {where}: more than {MAX_ITEMS} values or nested deeper than {MAX_DEPTH}"
        )
    if v is None or type(v) is bool:
        return v
    if type(v) is int:
        if abs(v) > MAX_CONST:
            raise _fail(where, f"an integer of magnitude at most {MAX_CONST}", v)
        return v
    if type(v) is float:
        if not math.isfinite(v):
            raise _fail(where, "a finite number", v)
        return v
    if type(v) is str:
        if len(v) > MAX_STR:
            raise _fail(where, f"a string of at most {MAX_STR} characters", v)
        return v
    if isinstance(v, list):
        return [_value(x, index, where, budget, depth + 1) for x in v]
    if isinstance(v, dict) and len(v) == 1:
        (key, inner), = v.items()
        if key == "node":
            if not isinstance(inner, str) or inner not in index or index[inner] < 0:
                raise DsqFormatError(
                    f"graph: {where}: {inner!r:.60} is not an earlier node (references go "
                    "backwards only)"
                )
            return _Ref(index[inner])
        if key == "tuple" and isinstance(inner, list):
            return tuple(_value(x, index, where, budget, depth + 1) for x in inner)
        if key == "slice" and isinstance(inner, list) and len(inner) == 3:
            parts = [_value(x, index, where, budget, depth + 1) for x in inner]
            if not all(p is None or type(p) is int or isinstance(p, _Ref) for p in parts):
                raise _fail(where, "a slice of integers, nodes or null", inner)
            return slice(*parts)
        if key == "ellipsis" and inner is True:
            return Ellipsis
    raise _fail(
        where,
        "null, a boolean, a number, a short string, a list, {\"node\": name}, "
        "{\"tuple\": [...]}, {\"slice\": [a, b, c]} or {\"ellipsis\": true}",
        v,
    )


def _build_module(name: Any, spec: Any, device: str | torch.device) -> nn.Module:
    if (
        not isinstance(name, str)
        or not 0 < len(name) <= MAX_NAME
        or len(name.split(".")) > MAX_NAME_DEPTH
        or not all(_SEGMENT_RE.fullmatch(s) for s in name.split("."))
    ):
        raise _fail("module name", "dot-separated identifiers or indices", name)
    where = f"module {name!r}"
    if not isinstance(spec, dict) or set(spec) != {"type", "config"}:
        raise DsqFormatError(f"graph: {where} must be an object with 'type' and 'config'")
    kind = MODULES.get(spec["type"]) if isinstance(spec["type"], str) else None
    if kind is None:
        raise _fail(f"{where} type", f"one of {sorted(MODULES)}", spec["type"])
    config = spec["config"]
    if isinstance(config, dict) and set(config) <= set(kind.options):
        config = {**{k: v for k, v in kind.added.items() if k not in config}, **config}
    if not isinstance(config, dict) or set(config) != set(kind.options):
        got = sorted(config) if isinstance(config, dict) else config
        raise DsqFormatError(
            f"graph: {where} ({spec['type']}) options must be exactly "
            f"{sorted(kind.options)}, found {got!r:.200}"
        )
    kwargs = {k: check(config[k], f"{where} option {k!r}") for k, check in kind.options.items()}
    try:
        with torch.device(device):
            return kind.cls(**kwargs)
    except Exception as exc:  # options valid one by one can still clash (groups, padding)
        raise DsqFormatError(
            f"graph: {where} ({spec['type']}) cannot be built with {config!r:.200}: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc


def build_module(name: str, spec: Any, device: str | torch.device = "meta") -> nn.Module:
    """The allowlisted module ``spec`` (``{"type", "config"}``) describes, every option checked
    (:class:`DsqFormatError` otherwise), on ``device`` (meta: nothing allocated)."""
    return _build_module(name, spec, device)


def _spec_of(mod: nn.Module, kind: str) -> dict[str, Any]:
    return {"type": kind, "config": {k: _option(mod, k) for k in MODULES[kind].options}}


def kind_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Module name → ``{"type", "config"}`` of every compressed layer kind in ``model``
    (:data:`KINDS`), each config checked as a reader will check it (:class:`ModelError` when a
    kind's module does not describe itself validly). A kind inside a kind is not allowed."""
    specs: dict[str, dict[str, Any]] = {}
    for name, mod in model.named_modules():
        kind = _kind_name(mod)
        if kind not in KINDS:
            continue
        outer = next((o for o in specs if name.startswith(o + ".")), None)
        if outer is not None:
            raise ModelError(f"layer kind {kind} at {name!r} is inside the layer kind at {outer!r}")
        spec = _spec_of(mod, kind)
        try:
            _build_module(name, spec, "meta")
        except DsqFormatError as exc:
            raise ModelError(f"layer {name!r} ({kind}) cannot be stored: {exc}") from exc
        specs[name] = spec
    return specs


def apply_kinds(model: nn.Module, specs: Any, what: str = "the file") -> nn.Module:
    """Put the stored layer kinds (``{name: {"type", "config"}}``, read from a file: checked
    here) in place of the modules of the same names in ``model`` (a skeleton, usually on the
    meta device); raises :class:`DsqFormatError`. Works in place; returns ``model``."""
    if not isinstance(specs, dict) or len(specs) > MAX_MODULES:
        raise DsqFormatError(f"{what}: 'modules' must be an object of at most {MAX_MODULES}")
    device = next((t.device for t in model.parameters()), torch.device("meta"))
    for name, spec in specs.items():
        if isinstance(spec, dict) and spec.get("type") not in KINDS:
            raise DsqFormatError(
                f"{what}: module {name!r:.80} has type {spec.get('type')!r:.60}, which is not "
                f"a compressed layer kind ({sorted(KINDS)})"
            )
        new = _build_module(name, spec, device)
        try:
            model.get_submodule(name)
        except AttributeError:
            raise DsqFormatError(
                f"{what}: stored layer {name!r:.80} ({spec['type']}) is not a module of the "
                f"model it is loaded into ({type(model).__name__})"
            ) from None
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return model


def _attach(model: nn.Module, name: str, module: nn.Module) -> None:
    """Register ``module`` at the dotted ``name`` under ``model``, creating plain parents."""
    parent = model
    *path, leaf = name.split(".")
    try:
        for part in path:
            child = parent._modules.get(part)
            if child is None:
                child = nn.Module()
                parent.add_module(part, child)
            elif type(child) is not nn.Module:
                raise KeyError(f"{part!r} is a module of its own")
            parent = child
        if leaf in parent._modules:
            raise KeyError(f"{leaf!r} is already a container")
        parent.add_module(leaf, module)
    except (KeyError, TypeError) as exc:
        raise DsqFormatError(f"graph: module name {name!r} cannot be used: {exc}") from None


# --------------------------------------------------------------------------- capture


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _kind_name(m) is not None


class _NotCapturable(Exception):
    pass


def capture(
    model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None
) -> dict[str, Any] | None:
    """``model``'s architecture as a graph (JSON-able dict), or None when it cannot be one.

    Traced symbolically (no inputs needed). With ``example_inputs`` the rebuilt graph, given
    the model's effective weights, must reproduce the model's outputs on them (eval mode), or
    None is returned.
    """
    try:
        was_training = model.training
        model.eval()  # functional dropout records training=self.training as a constant
        try:
            graph = _Tracer().trace(model)
        finally:
            model.train(was_training)
        encoded = _encode(model, graph)
        rebuilt = rebuild(encoded, device="cpu")  # the reader's checks, run at the source
    except Exception:  # fx raises many kinds on untraceable code; _NotCapturable on our lists
        return None
    state = dict(rebuilt.state_dict())
    names = set(plain_state(model)[0])
    if set(state) != names:
        return None  # tensors outside the graph's modules (attributes, unused layers)
    with torch.no_grad():
        for key in state:
            mod_name, _, attr = key.rpartition(".")
            state[key].copy_(getattr(model.get_submodule(mod_name), attr))
    if example_inputs is not None and not _same_outputs(model, rebuilt, example_inputs):
        return None
    return encoded


def _same_outputs(model: nn.Module, rebuilt: nn.Module, example: Any) -> bool:
    inputs = (example,) if isinstance(example, torch.Tensor) else tuple(example)
    inputs = tuple(x[:4] for x in inputs)  # a few samples are enough to check the wiring
    was_training = model.training
    try:
        device = next(iter(model.parameters()), torch.empty(0)).device
        rebuilt.to(device)
        inputs = tuple(x.to(device) for x in inputs)
        model.eval()
        with torch.no_grad():
            want = model(*inputs)
            got = rebuilt(*inputs)
    except Exception:
        return False
    finally:
        model.train(was_training)
    want_list = [want] if isinstance(want, torch.Tensor) else list(want)
    got_list = [got] if isinstance(got, torch.Tensor) else list(got)
    return len(want_list) == len(got_list) and all(
        isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
        and torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5)
        for a, b in zip(want_list, got_list, strict=True)
    )


def _encode(model: nn.Module, graph: fx.Graph) -> dict[str, Any]:
    modules: dict[str, Any] = {}
    nodes: list[dict[str, Any]] = []
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    while inputs and inputs[-1].args == (None,) and not inputs[-1].users:
        inputs.pop()
    dropped = {n.name for n in graph.nodes if n.op == "placeholder"} - {n.name for n in inputs}
    for node in graph.nodes:
        entry: dict[str, Any] = {"name": node.name, "op": node.op}
        if node.op == "placeholder":
            if node.name in dropped:
                continue  # trailing optional inputs the model never uses
            if node.args not in ((), (None,)):
                raise _NotCapturable("an input with a default value other than None")
            entry["target"] = str(node.target)
        elif node.op == "call_module":
            mod = model.get_submodule(node.target)
            kind = _kind_name(mod)
            if kind is None:
                raise _NotCapturable(node.target)
            modules[node.target] = {
                "type": kind,
                "config": {k: _option(mod, k) for k in MODULES[kind].options},
            }
            entry["target"] = node.target
        elif node.op == "call_function":
            name = _FUNCTION_NAME.get(id(node.target))
            if name is None:
                raise _NotCapturable(str(node.target))
            entry["target"] = name
        elif node.op == "call_method":
            if node.target not in METHODS:
                raise _NotCapturable(node.target)
            entry["target"] = node.target
        elif node.op != "output":
            raise _NotCapturable(node.op)  # get_attr: a tensor outside any leaf module
        if node.op != "placeholder":
            entry["args"] = [_encode_value(a) for a in node.args]
            if node.kwargs:
                entry["kwargs"] = {k: _encode_value(v) for k, v in node.kwargs.items()}
        nodes.append(entry)
    return {"version": GRAPH_VERSION, "modules": modules, "nodes": nodes}


def _encode_value(v: Any) -> Any:
    if isinstance(v, fx.Node):
        return {"node": v.name}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, tuple):
        return {"tuple": [_encode_value(x) for x in v]}
    if isinstance(v, list):
        return [_encode_value(x) for x in v]
    if isinstance(v, slice):
        return {"slice": [_encode_value(x) for x in (v.start, v.stop, v.step)]}
    if v is Ellipsis:
        return {"ellipsis": True}
    raise _NotCapturable(type(v).__name__)


# --------------------------------------------------------------------------- description


@dataclass(frozen=True)
class UserModel:
    """How a file describes a model not built by ``models.create``.

    ``class_name`` (``module:qualname``) is informational, never imported; ``inputs`` holds
    ``(shape without batch, dtype)`` per model input, None when unknown; ``graph`` the
    architecture (:func:`capture`) or None.
    """

    class_name: str
    inputs: tuple[tuple[tuple[int, ...], str], ...] | None
    graph: dict[str, Any] | None

    @property
    def short_name(self) -> str:
        """The class name without its module (``FashionCNN``)."""
        return self.class_name.rpartition(":")[2].rpartition(".")[2] or self.class_name

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "user",
            "class": self.class_name,
            "inputs": None if self.inputs is None
            else [[list(shape), dtype] for shape, dtype in self.inputs],
            "graph": self.graph,
        }

    @classmethod
    def from_dict(cls, d: Any) -> UserModel:
        """Checked inverse of :meth:`to_dict` (the graph itself is checked by :func:`rebuild`);
        raises :class:`DsqFormatError`."""
        if not isinstance(d, dict) or set(d) != {"kind", "class", "inputs", "graph"}:
            raise DsqFormatError(
                "user model description must have exactly 'kind', 'class', 'inputs', 'graph'"
            )
        name = d["class"]
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or not name.isprintable():
            raise _fail("user model 'class'", f"a printable string of 1..{MAX_NAME} characters",
                        name)
        inputs = d["inputs"]
        parsed = None
        if inputs is not None:
            if not isinstance(inputs, list) or not 1 <= len(inputs) <= MAX_INPUTS:
                raise _fail("user model 'inputs'", f"null or a list of 1..{MAX_INPUTS}", inputs)
            items = []
            for item in inputs:
                if not isinstance(item, list) or len(item) != 2 or item[1] not in DTYPES:
                    raise _fail("user model input", f"[shape, dtype in {sorted(DTYPES)}]", item)
                items.append((_shape(item[0], "user model input shape"), item[1]))
            parsed = tuple(items)
        graph = d["graph"]
        if graph is not None and not isinstance(graph, dict):
            raise _fail("user model 'graph'", "null or an object", graph)
        return cls(name, parsed, graph)

    def example_inputs(self, batch: int = 1, device: str = "meta") -> tuple[torch.Tensor, ...]:
        """Zero inputs of the recorded shapes (meta: nothing allocated); needs known inputs."""
        if self.inputs is None:
            raise DsqFormatError("the file records no input shapes")
        return tuple(
            torch.zeros((batch, *shape), dtype=DTYPES[dtype], device=device)
            for shape, dtype in self.inputs
        )


def _check_runs(model: nn.Module, inputs: tuple[Any, ...]) -> None:
    """ModelError unless ``model(*inputs)`` runs (a few samples, eval mode, no grad)."""
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*(x[:4] if isinstance(x, torch.Tensor) and x.dim() else x for x in inputs))
    except Exception as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                  for x in inputs]
        raise ModelError(
            f"example_inputs {shapes} do not run {type(model).__name__}: {text[:300]}; pass "
            "what its forward takes (a tensor or a tuple of tensors, batch dimension first)"
        ) from exc
    finally:
        model.train(was_training)


def describe(
    model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None
) -> UserModel:
    """The :class:`UserModel` of a model not built by ``models.create``.

    Inputs come from ``example_inputs`` (batch dimension first), else from a description the
    model already carries (a model loaded from a file); the graph from :func:`capture`.
    """
    known = getattr(model, USER_ATTR, None)
    cls = type(model)
    name = f"{cls.__module__}:{cls.__qualname__}"
    if isinstance(known, UserModel):
        name = known.class_name
    inputs = None
    if example_inputs is not None:
        tensors = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(
            example_inputs)
        names = {v: k for k, v in DTYPES.items()}
        if all(isinstance(t, torch.Tensor) and t.dim() >= 1 and t.dtype in names
               for t in tensors) and 1 <= len(tensors) <= MAX_INPUTS:
            inputs = tuple((tuple(t.shape[1:]), names[t.dtype]) for t in tensors)
        _check_runs(model, tensors)
    elif isinstance(known, UserModel):
        inputs = known.inputs
    if example_inputs is None and inputs is not None:
        example_inputs = UserModel(name, inputs, None).example_inputs(device="cpu")
    graph = capture(model, example_inputs)
    return UserModel(name[:MAX_NAME], inputs, graph)
