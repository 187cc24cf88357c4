"""The model registry: one name per architecture, built by a plain factory function.

A factory is registered with :func:`register_model`. :func:`create` checks the options against
the factory's signature, builds the model and records a :class:`ModelSpec` on it, so the same
architecture can be rebuilt later from a checkpoint or a compressed file::

    model = create("lenet5", in_channels=3, input_size=32)
    spec = spec_of(model)                      # ModelSpec(name="lenet5", kwargs={...})
    twin = create(spec.name, **spec.kwargs)    # same architecture

Specs come from files (``model.pt``, ``.dsq``), so every option that sizes work or memory is
bounded before anything is built: the options in :data:`OPTION_LIMITS` (and any a model
registers with ``limits=``) must be > 0 and at most their limit, and the input a model is built
for may have at most :data:`MAX_INPUT_ELEMENTS` elements per sample (export and benchmarks run
real inputs of that shape). A model may have at most :data:`MAX_PARAMETERS` parameters
(counted after building; the readers build on the meta device, where that costs nothing).
"""

from __future__ import annotations

import difflib
import inspect
import json
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch import nn

from deepsqueeze.errors import ModelError

__all__ = [
    "MAX_INPUT_ELEMENTS",
    "MAX_PARAMETERS",
    "OPTION_LIMITS",
    "SPEC_ATTR",
    "ModelInfo",
    "ModelSpec",
    "create",
    "input_shape_of",
    "list_models",
    "model_info",
    "register_model",
    "spec_of",
]

SPEC_ATTR = "deepsqueeze_spec"
"""Name of the attribute :func:`create` sets on every model it returns."""

Factory = TypeVar("Factory", bound=Callable[..., nn.Module])

MAX_INPUT_SIZE = 256
MAX_INPUT_ELEMENTS = 3 * MAX_INPUT_SIZE * MAX_INPUT_SIZE
"""Most input elements per sample (C×H×W) a model may be built for: 3×256×256. Export and the
benchmarks run real inputs of the model's shape; a resnet56 built for 512×512 already takes
6.5 s and 1.4 GB to export, for 2000×2000 46 s and 6 GB."""

MAX_PARAMETERS = 1 << 24
"""Most parameters a model may have (64 MiB as fp32, 20 times the zoo's largest default):
options within their limits can still combine into a large model (lenet5's fc1 grows with the
square of ``input_size``: 93M parameters at 256, whose ONNX export takes 9 s and 1.1 GB)."""

OPTION_LIMITS: dict[str, int | float] = {
    "num_classes": 100_000,
    "in_channels": 256,
    "input_size": MAX_INPUT_SIZE,
    "in_features": MAX_INPUT_ELEMENTS,
    "width_mult": 4.0,
}
"""Upper limits of the options that size a model, for every model that has them (each must
also be > 0). A model registers limits for its own options with ``register_model(limits=)``."""


@dataclass(frozen=True)
class ModelSpec:
    """What is needed to rebuild a model: its registry name and the factory options.

    ``kwargs`` holds every factory option (defaults included), as plain JSON values.
    """

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ModelError(f"model spec name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.kwargs, dict) or not all(isinstance(k, str) for k in self.kwargs):
            raise ModelError(f"model spec kwargs must be a dict with string keys: {self.kwargs!r}")
        _json_copy(self.kwargs, f"model {self.name!r}")

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict: ``{"name": ..., "kwargs": {...}}``."""
        return {"name": self.name, "kwargs": _json_copy(self.kwargs, f"model {self.name!r}")}

    @classmethod
    def from_dict(cls, d: Any) -> ModelSpec:
        """Inverse of :meth:`to_dict`; raises ModelError on a malformed dict."""
        if not isinstance(d, dict):
            raise ModelError(f"model spec must be a dict, got {type(d).__name__}")
        extra = sorted(set(d) - {"name", "kwargs"})
        if extra:
            raise ModelError(f"model spec has unknown keys {extra}; expected 'name' and 'kwargs'")
        if "name" not in d:
            raise ModelError("model spec has no 'name'")
        kwargs = d.get("kwargs", {})
        return cls(name=d["name"], kwargs=_json_copy(kwargs, f"model {d['name']!r}"))


@dataclass(frozen=True)
class ModelInfo:
    """Registry entry of one model, as shown to users."""

    name: str
    description: str
    input_shape: tuple[int, int, int]
    """Default input shape (C, H, W), for the default options."""
    default_kwargs: dict[str, Any]
    limits: dict[str, int | float] = field(default_factory=dict)
    """Upper limits of the options that size the model (each must also be > 0)."""


@dataclass(frozen=True)
class _Entry:
    info: ModelInfo
    factory: Callable[..., nn.Module]
    signature: inspect.Signature
    hints: dict[str, Any]


_REGISTRY: dict[str, _Entry] = {}


def register_model(
    name: str,
    *,
    input_shape: tuple[int, int, int],
    description: str,
    limits: dict[str, int | float] | None = None,
) -> Callable[[Factory], Factory]:
    """Decorator registering a model factory under ``name``.

    The factory must take only keyword-capable options, each with a JSON-able default
    (int, float, str, bool, None or list), and return an ``nn.Module``. ``limits`` bounds
    options that size the model beyond :data:`OPTION_LIMITS` (``{"hidden": 4096}``): such an
    option must be a number > 0 and at most its limit, checked before the factory runs.
    """
    if not isinstance(name, str) or not name or name != name.strip():
        raise ModelError(f"model name must be a non-empty string without spaces, got {name!r}")
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(v, int) and v > 0 for v in shape):
        raise ModelError(f"input_shape of model {name!r} must be (C, H, W) ints > 0, got {shape}")
    own = dict(limits or {})
    if not all(isinstance(v, (int, float)) and v > 0 for v in own.values()):
        raise ModelError(f"limits of model {name!r} must be numbers > 0, got {own}")

    def decorator(factory: Factory) -> Factory:
        sig = inspect.signature(factory)
        defaults: dict[str, Any] = {}
        for p in sig.parameters.values():
            if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                raise ModelError(f"factory of {name!r}: parameter {p.name!r} must be a keyword")
            if p.default is p.empty:
                raise ModelError(f"factory of {name!r}: parameter {p.name!r} needs a default")
            if p.name == "name":
                raise ModelError(f"factory of {name!r}: 'name' is reserved, rename the parameter")
            defaults[p.name] = _json_copy(p.default, f"default of {name!r} option {p.name!r}")
        old = _REGISTRY.get(name)
        if old is not None and _qualname(old.factory) != _qualname(factory):
            raise ModelError(
                f"model {name!r} is already registered by {_qualname(old.factory)}; "
                f"cannot register {_qualname(factory)} under the same name"
            )
        bounded = {**OPTION_LIMITS, **own}
        unknown = sorted(set(own) - set(defaults))
        if unknown:
            raise ModelError(f"limits of model {name!r} name no option of it: {unknown}")
        info = ModelInfo(
            name=name,
            description=description,
            input_shape=shape,
            default_kwargs=defaults,
            limits={k: v for k, v in bounded.items() if k in defaults},
        )
        _REGISTRY[name] = _Entry(info, factory, sig, typing.get_type_hints(factory))
        return factory

    return decorator


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def model_info(name: str) -> ModelInfo:
    """Registry entry of model ``name``; raises ModelError for an unknown name."""
    info = _entry(name).info
    return ModelInfo(
        info.name, info.description, info.input_shape, dict(info.default_kwargs),
        dict(info.limits),
    )


def create(name: str, **kwargs: Any) -> nn.Module:
    """Build model ``name`` with the given options; the result carries its :class:`ModelSpec`."""
    entry = _entry(name)
    params = entry.signature.parameters
    accepted = ", ".join(params) or "(none)"
    for key in kwargs:
        if key not in params:
            close = difflib.get_close_matches(key, list(params), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ModelError(
                f"model {name!r} has no option {key!r}.{hint} Accepted options: {accepted}"
            )
    resolved = dict(entry.info.default_kwargs)
    for key, value in kwargs.items():
        resolved[key] = _check_option(name, key, value, entry.hints.get(key))
    for key, limit in entry.info.limits.items():
        _check_limit(name, key, resolved[key], limit)
    shape = _input_shape(entry, resolved)
    if math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise ModelError(
            f"model {name!r} with options {_short(resolved)} takes inputs of shape "
            f"{'×'.join(map(str, shape))} = {math.prod(shape):,} elements per sample, over the "
            f"limit of {MAX_INPUT_ELEMENTS:,} (3×{MAX_INPUT_SIZE}×{MAX_INPUT_SIZE})"
        )
    model = entry.factory(**resolved)
    if not isinstance(model, nn.Module):
        raise ModelError(f"factory of {name!r} returned {type(model).__name__}, not an nn.Module")
    count = sum(p.numel() for p in model.parameters())
    if count > MAX_PARAMETERS:  # readers build on the meta device first: nothing allocated
        raise ModelError(
            f"model {name!r} with options {_short(resolved)} has {count:,} parameters, over "
            f"the limit of {MAX_PARAMETERS:,}"
        )
    setattr(model, SPEC_ATTR, ModelSpec(name=name, kwargs=resolved))
    return model


def spec_of(model: nn.Module) -> ModelSpec:
    """The :class:`ModelSpec` recorded by :func:`create`; ModelError if there is none."""
    spec = getattr(model, SPEC_ATTR, None)
    if not isinstance(spec, ModelSpec):
        raise ModelError(
            f"{type(model).__name__} has no model spec: it was not built by "
            "deepsqueeze.models.create(), so it cannot be rebuilt by name. "
            f"Build it with create(<name>, ...); known models: {', '.join(list_models())}"
        )
    return spec


def input_shape_of(model: nn.Module) -> tuple[int, int, int]:
    """Input shape (C, H, W) that ``model`` expects, from its spec.

    Starts from the registered default shape and applies the options that change it:
    ``in_channels`` sets C, ``input_size`` sets H and W, and ``in_features`` (flattening
    models) gives (3, s, s), (1, s, s) or (1, 1, n), whichever fits first.
    """
    spec = spec_of(model)
    return _input_shape(_entry(spec.name), spec.kwargs)


# --------------------------------------------------------------------------- helpers


def _entry(name: str) -> _Entry:
    if not isinstance(name, str):
        raise ModelError(f"model name must be a string, got {type(name).__name__}")
    entry = _REGISTRY.get(name)
    if entry is None:
        known = list_models()
        lowered = {k.lower(): k for k in known}
        close = difflib.get_close_matches(name.lower().replace("_", "-"), list(lowered), n=1)
        hint = f" Did you mean {lowered[close[0]]!r}?" if close else ""
        raise ModelError(f"unknown model {name!r}.{hint} Known models: {', '.join(known)}")
    return entry


def _input_shape(entry: _Entry, kw: dict[str, Any]) -> tuple[int, int, int]:
    """The (C, H, W) model ``entry`` built with options ``kw`` takes (see input_shape_of)."""
    c, h, w = entry.info.input_shape
    if "in_features" in kw and kw["in_features"] != c * h * w:
        return _shape_for_features(int(kw["in_features"]))
    if "in_channels" in kw:
        c = int(kw["in_channels"])
    if "input_size" in kw:
        h = w = int(kw["input_size"])
    return (c, h, w)


def _check_limit(model: str, key: str, value: Any, limit: float) -> None:
    """ModelError unless option ``key`` is a number > 0 and at most ``limit``."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not 0 < value <= limit:
        raise ModelError(
            f"model {model!r} option {key!r} must be > 0 and at most {limit:,}, got {value!r:.40}"
        )


def _short(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r:.20}" for k, v in kwargs.items())


def _qualname(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _shape_for_features(n: int) -> tuple[int, int, int]:
    for c in (3, 1):
        if n % c == 0:
            s = math.isqrt(n // c)
            if s * s * c == n:
                return (c, s, s)
    return (1, 1, n)


def _json_copy(value: Any, where: str) -> Any:
    """Deep copy of a JSON-able value; tuples become lists; anything else is a ModelError."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ModelError(f"{where}: {value!r} is not allowed (must be a finite number)")
        return value
    if isinstance(value, (list, tuple)):
        return [_json_copy(v, where) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ModelError(f"{where}: dict keys must be strings")
        return {k: _json_copy(v, where) for k, v in value.items()}
    raise ModelError(
        f"{where}: value {value!r} of type {type(value).__name__} is not JSON-able; "
        "use int, float, str, bool, None or a list of those"
    )


def _check_option(model: str, key: str, value: Any, hint: Any) -> Any:
    """Validate ``value`` against the factory annotation; returns the value to record."""
    where = f"model {model!r} option {key!r}"
    value = _json_copy(value, where)
    allowed = _allowed_types(hint)
    if allowed is None:
        return value
    if value is None:
        if type(None) in allowed:
            return None
    elif float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value) if int not in allowed else value
    elif any(type(value) is t for t in allowed):
        return value
    names = " or ".join(sorted({t.__name__ for t in allowed}))
    raise ModelError(f"{where} must be {names}, got {value!r} ({type(value).__name__})")


def _allowed_types(hint: Any) -> tuple[type, ...] | None:
    """Plain types an annotation admits, or None when it is not one we check."""
    if hint is None or hint is Any:
        return None
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        parts = [_allowed_types(a) for a in typing.get_args(hint)]
        if any(p is None for p in parts):
            return None
        return tuple(t for p in parts for t in p)  # type: ignore[union-attr]
    base = typing.get_origin(hint) or hint
    if base is type(None):
        return (type(None),)
    if base in (bool, int, float, str, list, dict):
        return (base,)
    return None


def require_positive(model: str, **values: float) -> None:
    """For factories: ModelError unless every given option is > 0."""
    for key, value in values.items():
        if not value > 0:
            raise ModelError(f"model {model!r} option {key!r} must be > 0, got {value!r}")
