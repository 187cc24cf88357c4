"""Fusion: chains of compressed Linear layers (with their ReLUs and the flatten before them) run
as one kernel call.

At batch 1 a small layer costs far more in framework overhead (module call, output allocation,
a separate ReLU op) than in arithmetic: the Deep-Compressed LeNet-300-100 does ~11k multiply-adds
per sample. The runtime model is traced with :mod:`torch.fx` (executors are leaves); each maximal
chain ``[flatten] → Linear → [ReLU] → Linear → [ReLU] → ...`` whose layers have a compact form
becomes one :class:`FusedChain` call (intermediate activations never leave C), and a kernel
convolution followed by a ReLU gets the ReLU fused. The autotuner keeps a chain only when it
measures faster than the modules it replaces (see :func:`fuse_model`).

Convolutions (:func:`fuse_conv_relus`): an eval-mode BatchNorm2d directly after a convolution is
folded into it (``scale = gamma / sqrt(var + eps)`` multiplies the weights, ``beta - mean *
scale`` joins the bias): into the executors of :mod:`deepsqueeze.runtime.executors.conv` (the C
ones keep the compact form and apply the scale while reading it), the dense executor and plain
``nn.Conv2d`` layers. A ReLU and a max-pool with kernel = stride (no padding, dilation or
ceil_mode) that follow are fused into those executors: the C kernel writes the pooled, rectified
output directly, so the full-size output never goes through memory.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from deepsqueeze.errors import RuntimeInputError
from deepsqueeze.runtime.executors.conv import FusableConv
from deepsqueeze.runtime.kernel import DsqLayer, check_rc, get_kernel
from deepsqueeze.runtime.layers import (
    DenseConv2d,
    KernelConv2d,
    KernelLinear,
    RuntimeLayer,
    as_input,
)

_TENSOR, _F32, _STRIDED = torch.Tensor, torch.float32, torch.strided

_RELU_FUNCS = {F.relu, torch.relu, torch.nn.functional.relu}


class _Tracer(fx.Tracer):
    """Traces through the zoo model; runtime executors and torch layers stay leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, RuntimeLayer) or super().is_leaf_module(m, qualname)


class FusedChain(RuntimeLayer):
    """Several :class:`KernelLinear` layers (ReLUs fused) in one C call.

    ``flatten``: the chain's input is flattened from dim 1 first (the flatten was folded in).
    The input is checked like a :class:`KernelLinear`'s (``[N, ...]`` flattening to the first
    layer's ``in_features`` with ``flatten``, else ``[..., in_features]``).
    """

    impl = "fused"

    def __init__(self, layers: list[KernelLinear], relus: list[bool], flatten: bool) -> None:
        super().__init__()
        kernel = get_kernel()
        if kernel is None:
            raise RuntimeInputError("the C kernel is not available")
        if not layers or len(relus) != len(layers) or any(
                b.cols != a.rows for a, b in itertools.pairwise(layers)):
            raise RuntimeInputError("a fused chain needs layers whose sizes follow each other")
        self.layers = nn.ModuleList(layers)
        self.relus = list(relus)
        self.flatten = flatten
        self.cols, self.rows = layers[0].cols, layers[-1].rows
        self._chain = kernel.chain
        self._refresh()

    def _refresh(self) -> None:
        self._structs = (DsqLayer * len(self.layers))()  # unvalidated: refused until rebuilt
        self._addr = ctypes.addressof(self._structs)
        self._n = len(self.layers)
        structs = (DsqLayer * len(self.layers))()
        for i, (layer, relu) in enumerate(zip(self.layers, self.relus, strict=True)):
            layer._refresh()
            ctypes.memmove(ctypes.byref(structs, i * ctypes.sizeof(DsqLayer)),
                           ctypes.byref(layer._struct), ctypes.sizeof(DsqLayer))
            structs[i].relu = int(relu)
        self._structs = structs
        self._addr = ctypes.addressof(structs)
        self._pinned = [layer._pinned for layer in self.layers]  # what the structs point into

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        self._structs = (DsqLayer * len(self.layers))()  # refused by the kernel until rebuilt
        self._addr = ctypes.addressof(self._structs)
        out = super()._apply(fn, recurse)
        self._refresh()
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (type(x) is not _TENSOR or x.dtype is not _F32 or x.layout is not _STRIDED
                or not x.is_cpu or not x.is_contiguous()):
            x = as_input(x, self.who())
        shape = x.shape
        m = x.numel()
        if self.flatten:
            if len(shape) < 2 or (m != shape[0] * self.cols if shape[0]
                                  else math.prod(shape[1:]) != self.cols):
                raise RuntimeInputError(
                    f"{self.who()}: expected an input of shape [N, ...] flattening to "
                    f"[N, {self.cols}], got {list(shape)}")
            n = shape[0]
            y = torch.empty(n, self.rows)
        else:
            if not shape or shape[-1] != self.cols:
                raise RuntimeInputError(
                    f"{self.who()}: expected an input of shape [..., {self.cols}], got "
                    f"{list(shape)}")
            n = m // self.cols
            y = torch.empty(*shape[:-1], self.rows)
        if n:
            rc = self._chain(self._n, self._addr, x.data_ptr(), m, y.data_ptr(),
                             n * self.rows, n)
            if rc:
                check_rc(rc, self.who())
        return y

    def extra_repr(self) -> str:
        return f"flatten={self.flatten}, relus={self.relus}"


def _is_relu(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_function" and node.target in _RELU_FUNCS:
        return len(node.args) == 1
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return len(node.args) == 1
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), nn.ReLU)
    return False


def _is_flatten1(node: fx.Node, gm: fx.GraphModule) -> bool:
    """``torch.flatten(x, 1)`` (end_dim -1), ``x.flatten(1)`` or ``nn.Flatten()``."""
    if node.op in ("call_function", "call_method") and node.target in (torch.flatten, "flatten"):
        args = list(node.args[1:])
        start = args[0] if args else node.kwargs.get("start_dim", 0)
        end = args[1] if len(args) > 1 else node.kwargs.get("end_dim", -1)
        return start == 1 and end == -1
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        return isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1
    return False


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


@dataclass
class Segment:
    """Nodes of one fusable chain, in order, and what the chain needs."""

    input: Any
    nodes: list[fx.Node] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    relus: list[bool] = field(default_factory=list)
    flatten: bool = False


def find_segments(gm: fx.GraphModule, linear_ok: Callable[[str], bool]) -> list[Segment]:
    """Maximal chains of Linear layers that ``linear_ok`` accepts (see module doc)."""
    segments: list[Segment] = []
    used: set[fx.Node] = set()

    def is_lin(n: fx.Node | None) -> bool:
        return (n is not None and n.op == "call_module" and n not in used
                and linear_ok(str(n.target)) and len(n.args) == 1 and not n.kwargs)

    for node in list(gm.graph.nodes):
        if not is_lin(node):
            continue
        src = node.args[0]
        seg = Segment(input=src)
        if (isinstance(src, fx.Node) and _is_flatten1(src, gm) and _only_user(src) is node
                and src not in used):
            seg.input, seg.flatten = src.args[0], True
            seg.nodes.append(src)
        cur: fx.Node | None = node
        while is_lin(cur):
            assert cur is not None
            seg.nodes.append(cur)
            seg.layers.append(str(cur.target))
            nxt = _only_user(cur)
            relu = nxt is not None and _is_relu(nxt, gm)
            seg.relus.append(relu)
            if relu:
                assert nxt is not None
                seg.nodes.append(nxt)
                cur = nxt
            after = _only_user(cur)
            if after is None or not is_lin(after) or after.args[0] is not cur:
                break
            cur = after
        used.update(seg.nodes)
        segments.append(seg)
    return segments


def replace_segment(gm: fx.GraphModule, seg: Segment, name: str, module: nn.Module) -> None:
    """Put ``module`` (called on the segment's input) in place of the segment's nodes."""
    gm.add_submodule(name, module)
    last = seg.nodes[-1]
    with gm.graph.inserting_after(last):
        new = gm.graph.call_module(name, (seg.input,))
    last.replace_all_uses_with(new)
    for node in reversed(seg.nodes):
        gm.graph.erase_node(node)


def segment_callable(gm: fx.GraphModule, seg: Segment) -> Callable[[torch.Tensor], Any]:
    """The segment's original computation (for timing against the fused chain)."""
    steps: list[Callable[[Any], Any]] = []
    for node in seg.nodes:
        if node.op == "call_module":
            steps.append(gm.get_submodule(str(node.target)))
        elif node.op == "call_method":
            steps.append(operator.methodcaller(str(node.target), *node.args[1:], **node.kwargs))
        else:
            fn, rest, kw = node.target, node.args[1:], node.kwargs
            steps.append(lambda x, fn=fn, rest=rest, kw=kw: fn(x, *rest, **kw))

    def run(x: torch.Tensor) -> Any:
        for step in steps:
            x = step(x)
        return x

    return run


def trace(model: nn.Module) -> fx.GraphModule | None:
    """The model as a GraphModule (executors as leaves), or None when it cannot be traced."""
    try:
        graph = _Tracer().trace(model)
    except Exception:  # data-dependent control flow etc.: run unfused
        return None
    return fx.GraphModule(model, graph, class_name=type(model).__name__)


_MAXPOOL_FUNCS = {F.max_pool2d, torch.max_pool2d}
_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode",
              "return_indices")


def _same_pair(value: Any, want: int | None = None) -> int | None:
    """``value`` as one int (an int, or a pair / 1-tuple of equal ints), or None."""
    if isinstance(value, (tuple, list)) and 1 <= len(value) <= 2:
        if len(set(value)) != 1:
            return None
        value = value[0]
    if type(value) is not int or (want is not None and value != want):
        return None
    return value


def max_pool_size(node: fx.Node, gm: fx.GraphModule) -> int | None:
    """``p`` when ``node`` max-pools its one input over p x p windows with stride p (no padding,
    dilation 1, floor mode, no indices): what a fused executor can write directly."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        if not isinstance(m, nn.MaxPool2d) or len(node.args) != 1 or node.kwargs:
            return None
        opts = {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
                "dilation": m.dilation, "ceil_mode": m.ceil_mode,
                "return_indices": m.return_indices}
    elif node.op == "call_function" and node.target in _MAXPOOL_FUNCS:
        if len(node.args) > len(_POOL_ARGS) or not set(node.kwargs) <= set(_POOL_ARGS[1:]):
            return None
        opts = dict(zip(_POOL_ARGS, node.args, strict=False)) | dict(node.kwargs)
    else:
        return None
    p = _same_pair(opts.get("kernel_size"))
    stride = opts.get("stride")
    if p is None or p < 1 or (stride not in (None, [], ()) and _same_pair(stride, p) is None):
        return None
    if (_same_pair(opts.get("padding", 0), 0) is None
            or _same_pair(opts.get("dilation", 1), 1) is None
            or opts.get("ceil_mode", False) is not False
            or opts.get("return_indices", False) is not False):
        return None
    return p


def batchnorm_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(scale, shift)`` of an eval-mode BatchNorm2d with running statistics (its output is
    ``scale[c] * x + shift[c]``), or None when it cannot be folded."""
    if (not isinstance(bn, nn.BatchNorm2d) or bn.training or bn.running_mean is None
            or bn.running_var is None):
        return None
    scale = 1.0 / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    shift = -bn.running_mean.detach().double() * scale
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
        shift = shift * bn.weight.detach().double()
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    if not (torch.isfinite(scale).all() and torch.isfinite(shift).all()):
        return None
    return scale.float(), shift.float()


def fold_batchnorm(conv: nn.Module, bn: nn.Module) -> bool:
    """Fold ``bn`` (following ``conv``) into ``conv``: a fusable executor, the dense executor
    or a plain ``nn.Conv2d``. False (nothing changed) when either does not allow it."""
    affine = batchnorm_affine(bn)
    if affine is None:
        return False
    scale, shift = affine
    out = getattr(getattr(conv, "geometry", None), "out_channels", None)
    if isinstance(conv, nn.Conv2d):
        out = conv.out_channels
    if out is None or scale.numel() != out:
        return False
    if isinstance(conv, FusableConv):
        conv.fold_affine(scale, shift)
        return True
    if isinstance(conv, DenseConv2d) or type(conv) is nn.Conv2d:
        weight = conv.weight.detach() * scale.view(-1, 1, 1, 1)
        bias = conv.bias.detach() * scale + shift if conv.bias is not None else shift
        if type(conv) is nn.Conv2d:
            conv.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
            conv.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
        else:
            conv.weight, conv.bias = weight.contiguous(), bias.contiguous()
        return True
    return False


def fuse_conv_relus(gm: fx.GraphModule) -> list[str]:
    """Fuse what follows each convolution (see module doc): a BatchNorm2d is folded in (fusable
    executors, the dense executor, plain ``nn.Conv2d``); then ReLUs and kernel = stride
    max-pools are fused into fusable executors, ReLUs into kernel convolutions. Returns one
    ``conv+bn+relu+pool2`` description per changed layer."""
    fused = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(str(node.target))
        if not isinstance(mod, (FusableConv, KernelConv2d, DenseConv2d, nn.Conv2d)):
            continue
        steps = []
        nxt = _only_user(node)
        if (nxt is not None and nxt.op == "call_module" and nxt.args == (node,)
                and not nxt.kwargs
                and fold_batchnorm(mod, gm.get_submodule(str(nxt.target)))):
            nxt.replace_all_uses_with(node)
            gm.graph.erase_node(nxt)
            steps.append("bn")
        while True:
            nxt = _only_user(node)
            if nxt is None or not nxt.args or nxt.args[0] is not node:
                break
            pool = max_pool_size(nxt, gm)
            if _is_relu(nxt, gm) and isinstance(mod, (FusableConv, KernelConv2d)) \
                    and not mod.relu:
                mod.set_relu(True)
                steps.append("relu")
            elif pool is not None and isinstance(mod, FusableConv) and mod.pool == 1:
                mod.set_pool(pool)
                steps.append(f"pool{pool}")
            else:
                break
            nxt.replace_all_uses_with(node)
            gm.graph.erase_node(nxt)
        if steps:
            fused.append("+".join([str(node.target), *steps]))
    return fused


def raise_plainly(gm: fx.GraphModule) -> fx.GraphModule:
    """Make ``gm`` raise errors of its graph ops as a plain module does.

    torch.fx's call wrapper prints the generated forward's source and traceback to stderr before
    re-raising an error of a graph op (say a ``flatten`` given a 1-D input), where the dense
    model only raises. Every GraphModule has a class of its own, so this changes ``gm`` only
    (until it is recompiled).
    """
    type(gm).__call__ = nn.Module.__call__  # type: ignore[method-assign]
    used = [n for n in gm.graph.nodes if n.op == "placeholder" and n.users]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(used) < len(placeholders):
        # A traced forward with optional inputs (a class-free user model takes up to 16) keeps
        # them all as placeholders: an input beyond those the model uses would be ignored,
        # where the model before tracing refuses it.
        gm.register_forward_pre_hook(_refuse_extra_inputs(len(used), len(placeholders)))
    return gm


def _refuse_extra_inputs(n_used: int, n_placeholders: int) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        if any(a is not None for a in args[n_used:n_placeholders]):
            raise TypeError(f"this model takes {n_used} input(s), got {len(args)}")

    return hook
