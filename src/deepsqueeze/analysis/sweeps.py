"""The sweep table: per method, the knob swept per layer, its settings, and its parameters.

A :class:`Sweep` says how to turn ``{layer: setting}`` into a method's parameters (so one entry
serves both sensitivity, which sets one layer, and a plan's stage, which sets many). An
:class:`Option` is what a planner may give one layer: one method at one setting, or a chain of
them applied in order (``prune 0.95 → share 4 bits``, Deep Compression's pair).

Methods appear here when their family is registered (:func:`available_sweeps`); a family that
is not installed is simply absent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from deepsqueeze.errors import OptionError
from deepsqueeze.methods.base import METHODS, Method, create_method, select_layers


@dataclass(frozen=True)
class Sweep:
    """How one method is swept per layer.

    ``knob``: the parameter taking ``{layer: setting}`` (None for an on/off method: its only
    setting is ``"on"``); ``settings``: from least to most compressing; ``fixed``: parameters
    every use gets; ``finetune``: whether a plan's stage of this method fine-tunes (a
    post-training method whose integers are final does not); ``order``: where its stage goes
    in a plan (module-replacing methods first, then masks, then value sharing)."""

    method: str
    knob: str | None
    settings: tuple[Any, ...]
    fixed: dict[str, Any] = field(default_factory=dict)
    finetune: bool = True
    order: int = 50
    label: str = ""

    def params(self, values: dict[str, Any]) -> dict[str, Any]:
        """The method's parameters setting each layer of ``values`` (``{layer: setting}``)."""
        params: dict[str, Any] = {**self.fixed, "layers": sorted(values)}
        if self.knob is not None:
            params[self.knob] = {_exact(name): v for name, v in values.items()}
        return params

    def describe(self, value: Any) -> str:
        """``prune 0.9``, ``share 4``, ``binarize``."""
        return self.method if self.knob is None else f"{self.method} {value:g}" if isinstance(
            value, float) else f"{self.method} {value}"


def _exact(name: str) -> str:
    """A layer name as a glob that matches only itself (module names hold no ``[``, but escape
    the glob characters anyway)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


SWEEPS: dict[str, Sweep] = {
    s.method: s
    for s in (
        Sweep("channel-prune", "ratio", (0.25, 0.5, 0.75), order=10,
              label="fraction of output channels removed"),
        Sweep("svd", "ratio", (2.0, 4.0, 8.0, 16.0, 32.0), order=20,
              label="weights / factor weights"),
        Sweep("hash", "factor", (0.5, 0.25, 0.125, 1 / 16, 1 / 32, 1 / 64), order=20,
              label="real parameters per virtual weight"),
        Sweep("circulant", None, ("on",), order=20, label="circulant projection"),
        Sweep("binarize", None, ("on",), fixed={"keep_first": False, "keep_last": False},
              order=30, label="±1 weights with per-channel scale"),
        Sweep("prune", "sparsity", (0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99), order=40,
              label="fraction of weights set to zero"),
        Sweep("share", "bits", (8, 6, 5, 4, 3, 2), order=50, label="codebook bits"),
        Sweep("quantize", "bits", (8, 6, 4, 3, 2), fixed={"activations": False},
              finetune=False, order=60, label="integer weight bits (weights only)"),
    )
}
"""Every sweepable method; :func:`available_sweeps` keeps those whose family is registered."""


def available_sweeps(names: Sequence[str] | None = None) -> dict[str, Sweep]:
    """The sweeps of ``names`` (default: every registered method of :data:`SWEEPS`); an unknown
    or unregistered name is an :class:`OptionError` listing what can be swept."""
    known = {n: s for n, s in SWEEPS.items() if n in METHODS}
    if names is None:
        return known
    out = {}
    for name in names:
        if name not in known:
            why = " (its family is not installed)" if name in SWEEPS else ""
            raise OptionError(f"cannot sweep method {name!r}{why}; sweepable: "
                              f"{', '.join(known)}")
        out[name] = known[name]
    return out


@dataclass(frozen=True)
class Option:
    """What one layer gets: ``steps`` = ``((method, setting), ...)`` applied in order."""

    steps: tuple[tuple[str, Any], ...]

    @property
    def label(self) -> str:
        return " + ".join(SWEEPS[m].describe(v) for m, v in self.steps)

    def to_dict(self) -> list[dict[str, Any]]:
        return [{"method": m, "setting": v} for m, v in self.steps]


CHAINS: tuple[tuple[str, str], ...] = (("prune", "share"), ("prune", "quantize"))
"""Two-step options a planner considers (both shape-keeping, so they compose on one layer)."""

CHAIN_SETTINGS: dict[str, tuple[Any, ...]] = {
    "prune": (0.8, 0.9, 0.95, 0.97, 0.98, 0.99),
    "share": (6, 5, 4, 3, 2),
    "quantize": (8, 6, 4),
}
"""Settings the chains combine (a subset of each sweep's, to keep the grid small)."""


def layer_options(
    methods: dict[str, Sweep], chains: bool = True
) -> list[Option]:
    """Every single-method option of ``methods`` and, with ``chains``, every chain of
    :data:`CHAINS` whose methods are all in ``methods``."""
    options = [Option(((name, v),)) for name, sweep in methods.items() for v in sweep.settings]
    if chains:
        for first, second in CHAINS:
            if first in methods and second in methods:
                options += [Option(((first, a), (second, b)))
                            for a in CHAIN_SETTINGS[first] for b in CHAIN_SETTINGS[second]]
    return options


def apply_option(
    model: nn.Module, layer: str, option: Option,
    after_apply: Callable[[Method, nn.Module], None] | None = None,
) -> None:
    """Apply ``option`` to ``layer`` of ``model`` (in place) as a recipe's stages would: each
    method applied to the layer, then finalized (``after_apply`` runs between, e.g. to
    calibrate)."""
    for method_name, value in option.steps:
        method = create_method(method_name, **SWEEPS[method_name].params({layer: value}))
        layers = select_layers(model, method.params.layers, method.supported)
        method.apply(model, layers)
        if after_apply is not None:
            after_apply(method, model)
        method.finalize(model)


def sweepable_layers(model: nn.Module) -> list[str]:
    """The Linear and Conv2d layers of ``model`` (in module order): what a sweep visits."""
    return [n for n, m in model.named_modules() if n and isinstance(m, (nn.Linear, nn.Conv2d))]


def stage_order(method: str) -> int:
    if method not in SWEEPS:
        raise OptionError(f"method {method!r} has no sweep entry")
    return SWEEPS[method].order
