"""Model state below the methods: effective weights, skeletons sized for stored shapes.

Everything that rebuilding a model from a file needs and that the methods also use lives here,
so that the file readers (``dsq``, ``io``, the runtime) only look down at the models layer:
:func:`plain_state` (a model's effective tensors, parametrizations baked), :func:`resize_to_shapes`
(a channel-pruned model's smaller layers), :func:`fit_skeleton` (a user's skeleton checked
against stored names and shapes, the safetensors convention) and :func:`meta_copy`.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from deepsqueeze.errors import ModelError

__all__ = [
    "check_unparametrized",
    "fit_skeleton",
    "is_depthwise",
    "meta_copy",
    "plain_state",
    "replace_module",
    "resize_to_shapes",
    "resized_module",
]


def plain_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``model``'s state dict with every parametrization replaced by its effective value.

    Returns the tensors (keys as in the unparametrized model) and the names that are parameters.
    The model itself is not touched (removing parametrizations from a deep copy would not do:
    the copy shares the parametrized class whose properties removal deletes).
    """
    state: dict[str, torch.Tensor] = {}
    params: list[str] = []
    for mname, module in model.named_modules():
        if mname.startswith("parametrizations") or ".parametrizations" in mname:
            continue
        prefix = f"{mname}." if mname else ""
        for pname, p in module.named_parameters(recurse=False):
            state[prefix + pname] = p.detach().cpu()
            params.append(prefix + pname)
        if parametrize.is_parametrized(module):
            for pname in module.parametrizations:
                state[prefix + pname] = getattr(module, pname).detach().cpu()
                params.append(prefix + pname)
        skip = getattr(module, "_non_persistent_buffers_set", set())
        for bname, b in module.named_buffers(recurse=False):
            if bname not in skip:
                state[prefix + bname] = b.detach().cpu()
    return state, params


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers live on the meta device (nothing of
    their memory is copied); the original is untouched."""
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    try:
        return copy.deepcopy(model, memo)
    except Exception as exc:  # a user's module may hold objects that cannot be copied
        raise ModelError(
            f"the given {type(model).__name__} cannot be copied to the meta device "
            f"({type(exc).__name__}: {str(exc)[:200]}); pass a plain instance of the architecture"
        ) from exc


def fit_skeleton(
    model: nn.Module, shapes: Mapping[str, tuple[int, ...]], what: str = "the file"
) -> nn.Module:
    """Check a user's skeleton against stored tensor names and shapes; resize where allowed.

    Names must match exactly (no missing, no unexpected tensor: the safetensors convention).
    A stored shape smaller than the skeleton's (a channel-pruned model saved from this
    architecture) is met by :func:`resize_to_shapes` when that gives exactly the stored shapes;
    any other difference is an error. Raises :class:`ModelError` listing the missing,
    unexpected and mis-shaped tensors; works in place and returns ``model``.
    """
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise ModelError(
            f"the model given to fill from {what} has parametrized layers (masks or codebooks); "
            "pass a freshly built, plain instance of the architecture"
        )
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise ModelError(
            f"{what} does not fit the given {type(model).__name__}: "
            f"missing in the file: {_few(missing)}; unexpected in the file: {_few(unexpected)} "
            "(the names must be those of the model's state_dict; pass an instance of the "
            "architecture that was saved)"
        )

    def wrong() -> list[str]:
        now = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        return sorted(k for k in shapes if tuple(shapes[k]) != now[k])

    bad = wrong()
    smaller = all(
        len(shapes[k]) == len(expected[k])
        and all(d <= w for d, w in zip(shapes[k], expected[k], strict=True))
        for k in bad
    )
    if bad and smaller:
        with contextlib.suppress(ModelError):  # reported below with every mis-shaped tensor
            resize_to_shapes(model, shapes)
        bad = wrong()
    if bad:
        now = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        listed = ", ".join(f"{k}: file {list(shapes[k])} vs model {list(now[k])}" for k in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise ModelError(
            f"{what} does not fit the given {type(model).__name__}: mis-shaped tensors: "
            f"{listed}{more}"
        )
    return model


def _few(names: list[str]) -> str:
    if not names:
        return "none"
    return ", ".join(names[:8]) + (f" (and {len(names) - 8} more)" if len(names) > 8 else "")


def is_depthwise(mod: nn.Module) -> bool:
    return (
        isinstance(mod, nn.Conv2d)
        and mod.groups > 1
        and mod.groups == mod.in_channels == mod.out_channels
    )


def check_unparametrized(mod: nn.Module, name: str) -> None:
    if parametrize.is_parametrized(mod):
        raise ModelError(
            f"layer {name!r} has parametrized weights (a mask or codebook from an earlier method); "
            "apply channel pruning before methods that parametrize weights"
        )


def _take(t: torch.Tensor, dim: int, idx: torch.Tensor | None) -> torch.Tensor:
    return t if idx is None else t.index_select(dim, idx.to(t.device))


def _copy_param(new: nn.Module, old: nn.Module, name: str, value: torch.Tensor) -> None:
    param = getattr(new, name)
    with torch.no_grad():
        param.copy_(value)
    param.requires_grad_(getattr(old, name).requires_grad)


def resized_module(
    mod: nn.Module, out_keep: torch.Tensor | None, in_keep: torch.Tensor | None
) -> nn.Module:
    """A new module holding the kept slices of ``mod``'s parameters and buffers."""
    if isinstance(mod, nn.Conv2d):
        w = mod.weight.detach()
        if is_depthwise(mod):
            keep = out_keep if out_keep is not None else in_keep
            w = _take(w, 0, keep)
            cin = cout = groups = w.shape[0]
        else:
            w = _take(_take(w, 0, out_keep), 1, in_keep)
            cout, groups = w.shape[0], mod.groups
            cin = w.shape[1] * groups
        new: nn.Module = nn.Conv2d(
            cin, cout, mod.kernel_size, stride=mod.stride, padding=mod.padding,
            dilation=mod.dilation, groups=groups, bias=mod.bias is not None,
            padding_mode=mod.padding_mode, device=w.device, dtype=w.dtype,
        )
        _copy_param(new, mod, "weight", w)
        if mod.bias is not None:
            _copy_param(new, mod, "bias", _take(mod.bias.detach(), 0, out_keep))
    elif isinstance(mod, nn.Linear):
        w = _take(_take(mod.weight.detach(), 0, out_keep), 1, in_keep)
        new = nn.Linear(
            w.shape[1], w.shape[0], bias=mod.bias is not None, device=w.device, dtype=w.dtype
        )
        _copy_param(new, mod, "weight", w)
        if mod.bias is not None:
            _copy_param(new, mod, "bias", _take(mod.bias.detach(), 0, out_keep))
    elif isinstance(mod, _BatchNorm):
        ref = mod.running_mean if mod.running_mean is not None else mod.weight
        n = mod.num_features if out_keep is None else len(out_keep)
        new = type(mod)(
            n, eps=mod.eps, momentum=mod.momentum, affine=mod.affine,
            track_running_stats=mod.track_running_stats,
            device=ref.device if ref is not None else None,
            dtype=ref.dtype if ref is not None else None,
        )
        if mod.affine:
            _copy_param(new, mod, "weight", _take(mod.weight.detach(), 0, out_keep))
            _copy_param(new, mod, "bias", _take(mod.bias.detach(), 0, out_keep))
        for buf in ("running_mean", "running_var"):
            if getattr(mod, buf) is not None:
                getattr(new, buf).copy_(_take(getattr(mod, buf), 0, out_keep))
        if mod.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(mod.num_batches_tracked)
    else:  # pragma: no cover - the analysis only yields the types above
        raise ModelError(f"cannot resize {type(mod).__name__}")
    new.train(mod.training)
    return new


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def resize_to_shapes(
    model: nn.Module, shapes: Mapping[str, Sequence[int] | torch.Size | torch.Tensor]
) -> nn.Module:
    """Resize Conv2d/Linear/BatchNorm layers of ``model`` to the shapes of a saved state dict.

    For loading a channel-pruned model: build the original architecture, then replace each layer
    whose saved ``weight`` (or, for BN without affine, ``running_mean``) shape differs with a new,
    uninitialized layer of the saved size; ``load_state_dict`` then fills it. ``shapes`` maps
    state-dict keys to shapes (a state dict itself also works). Works in place; returns ``model``.
    """
    def shape_of(key: str) -> tuple[int, ...] | None:
        if key not in shapes:
            return None
        value = shapes[key]
        return tuple(value.shape if isinstance(value, torch.Tensor) else value)

    for name, mod in list(model.named_modules()):
        if not name:
            continue
        if isinstance(mod, (nn.Conv2d, nn.Linear)) or (isinstance(mod, _BatchNorm) and mod.affine):
            key = f"{name}.weight"
        elif isinstance(mod, _BatchNorm) and mod.running_mean is not None:
            key = f"{name}.running_mean"
        else:
            continue
        saved = shape_of(key)
        current = tuple(getattr(mod, key.rpartition(".")[2]).shape)
        if saved is None or saved == current:
            continue
        check_unparametrized(mod, name)
        bad = ModelError(f"saved {key!r} has shape {list(saved)}, which does not fit "
                         f"{type(mod).__name__} {name!r} of shape {list(current)}")
        if len(saved) != len(current) or min(saved) < 1:
            raise bad
        if isinstance(mod, nn.Conv2d):
            if saved[2:] != current[2:] or (is_depthwise(mod) and saved[1] != 1):
                raise bad
            out_idx = torch.arange(saved[0])
            if is_depthwise(mod):
                new = resized_module(mod, out_idx, None)
            else:
                new = resized_module(mod, out_idx, torch.arange(saved[1]))
        elif isinstance(mod, nn.Linear):
            new = resized_module(mod, torch.arange(saved[0]), torch.arange(saved[1]))
        else:
            new = resized_module(mod, torch.arange(saved[0]), None)
        replace_module(model, name, new)
    return model


