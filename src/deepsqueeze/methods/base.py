"""What every compression method shares: layer selection, parameters, a registry.

A method is a named, configurable transform of selected layers, scikit-learn style:
``method = METHODS["prune"](sparsity=0.9)``; ``method.apply(model, layers)`` puts the model in
its *training form* (parametrizations of ``weight`` such as masks or codebooks, or module
replacement where shapes change); ``method.step_hooks()`` returns hooks the fine-tuning loop calls
after every optimizer step (sparsity schedules); ``method.loss_terms()`` returns terms the loop
adds to every batch's loss (a prior's KL divergence); ``method.finalize(model)`` runs once after
fine-tuning. Methods compose by applying them one after another (prune → share).

How a compressed weight is *stored* is decided from the weight itself when the model is saved
(zeros → sparse positions, few distinct values → codebook indices); a method whose result cannot
be seen in the values replaces the layer by a compressed layer kind (``models.graph.register_kind``)
whose tensors are stored the same way.
"""

from __future__ import annotations

import fnmatch
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from deepsqueeze.errors import ModelError, RecipeError

StepHook = Callable[[int, nn.Module], None]
"""Called after every optimizer step with the stage's step index (0-based) and the model.

Defined here, below the training loop: methods hand hooks to whichever loop trains the model
(``training.fit``, or the user's own loop through ``pipeline.CompressionSession.step``)."""

LossTerm = Callable[[int, nn.Module], torch.Tensor]
"""Called for every batch with the stage's step index (0-based) and the model; returns a scalar
tensor the loop adds to the batch's mean loss before the backward pass (a regularizer or a
variational KL term, already divided by the training-set size). Like :data:`StepHook`, handed to
whichever loop trains the model (``training.fit``, or ``CompressionSession.loss_term()``)."""

LAYER_TYPES: dict[str, type[nn.Module]] = {
    "Linear": nn.Linear, "Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Embedding": nn.Embedding,
}
"""Layer types a selector may name (``type:Linear``)."""

WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
"""Layers whose ``weight`` a shape-keeping method (masks, codebooks) can parametrize."""


class MethodParams(BaseModel):
    """Base of every method's parameter model: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid")


def select_layers(
    model: nn.Module,
    patterns: Sequence[str] | None = None,
    supported: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d),
) -> dict[str, nn.Module]:
    """Modules of ``model`` chosen by name globs (``fc*``, ``layer1.*.conv1``) or ``type:Conv2d``.

    ``None`` or ``["*"]`` selects every supported layer. A pattern that matches nothing, or a
    matched module of an unsupported type, is an error naming what exists.
    """
    named = {name: mod for name, mod in model.named_modules() if name}
    candidates = {name: mod for name, mod in named.items() if isinstance(mod, supported)}
    if not candidates:
        kinds = sorted({type(m).__name__ for m in named.values()}) or ["(no submodules)"]
        raise ModelError(
            f"{type(model).__name__} has no layer this method can handle: its layers are of "
            f"types {kinds}; supported: {sorted(t.__name__ for t in supported)}"
        )
    if not patterns:
        return candidates
    chosen: dict[str, nn.Module] = {}
    for pattern in patterns:
        if pattern.startswith("type:"):
            kind = LAYER_TYPES.get(pattern[5:])
            if kind is None:
                raise ModelError(
                    f"unknown layer type {pattern!r}; known: "
                    f"{', '.join('type:' + k for k in LAYER_TYPES)}"
                )
            if not issubclass(kind, supported):
                raise ModelError(
                    f"layer type {pattern!r}: this method cannot handle {kind.__name__} layers; "
                    f"supported: {sorted(t.__name__ for t in supported)}"
                )
            hits = {n: m for n, m in candidates.items() if isinstance(m, kind)}
        else:
            hits = {n: m for n, m in named.items() if fnmatch.fnmatchcase(n, pattern)}
            if pattern == "*":
                hits = dict(candidates)
            bad = [n for n, m in hits.items() if not isinstance(m, supported)]
            hits = {n: m for n, m in hits.items() if isinstance(m, supported)}
            if bad and not hits:
                raise ModelError(
                    f"layer pattern {pattern!r} matches {bad} of types "
                    f"{sorted({type(named[n]).__name__ for n in bad})}, which this method cannot "
                    f"handle; supported: {sorted(t.__name__ for t in supported)}"
                )
        if not hits:
            raise ModelError(
                f"layer pattern {pattern!r} matches no layer; layers: {', '.join(candidates)}"
            )
        chosen.update(hits)
    return chosen


class Method(ABC):
    """A compression method. Subclasses set ``name``, ``Params`` and implement ``apply``."""

    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    supported: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, nn.Conv2d)

    def __init__(self, **params: Any) -> None:
        try:
            self.params = self.Params(**params)
        except ValidationError as exc:
            raise RecipeError(_validation_message(f"method {self.name!r}", exc)) from exc

    @abstractmethod
    def apply(self, model: nn.Module, layers: dict[str, nn.Module]) -> None:
        """Put ``layers`` of ``model`` into this method's training form (in place)."""

    def use_data(self, data: Any, loss_fn: Callable[..., Any] | None = None) -> None:  # noqa: B027
        """Training data for a method that measures something when applied (calibration,
        neuron importance): ``data`` is what the trainer takes (a Dataset, a DataLoader,
        ``(X, y)``; batches of ``(inputs, target)``), possibly a sample of the fine-tuning set
        (see :meth:`use_train_size`); ``loss_fn(outputs, target)`` the loss (None:
        cross-entropy). The session hands the stage's data over
        before :meth:`apply`; a method's own explicit data settings take precedence. Ignored by
        default."""

    def use_train_size(self, size: int | None) -> None:  # noqa: B027
        """The number of samples the stage fine-tunes on (None: unknown), for a method whose
        loss term is per sample of the whole set (sparse-vd's KL); handed over after
        :meth:`use_data`, whose data may be a sample of it. Ignored by default."""

    def step_hooks(self) -> list[StepHook]:
        """Hooks for the fine-tuning loop (e.g. a sparsity schedule); none by default."""
        return []

    def loss_terms(self) -> list[LossTerm]:
        """Terms the fine-tuning loop adds to every batch's loss; none by default."""
        return []

    def finalize(self, model: nn.Module) -> None:  # noqa: B027 (optional hook)
        """Called once after fine-tuning; nothing by default."""

    def summary(self) -> dict[str, Any]:
        """The method and its parameters, for manifests and reports."""
        return {"method": self.name, **self.params.model_dump()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.model_dump().items())
        return f"{type(self).__name__}({args})"


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to :data:`METHODS` under ``cls.name``."""
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    METHODS[cls.name] = cls
    return cls


def create_method(name: str, /, **params: Any) -> Method:
    """Instantiate a registered method by name with validated parameters."""
    if name not in METHODS:
        raise RecipeError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name](**params)


def _validation_message(where: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{loc}: {err['msg']}")
    return f"invalid parameters for {where}: " + "; ".join(parts)


def per_layer(
    value: float | int | dict[str, Any], names: Iterable[str], what: str
) -> dict[str, Any]:
    """Expand a scalar or a ``{glob: value}`` mapping to one value per layer name.

    In a mapping, the most specific matching glob wins (an exact name, then the glob with the
    fewest wildcards, then the longest); ``"*"`` gives a default.
    """
    names = list(names)
    if not isinstance(value, dict):
        return dict.fromkeys(names, value)
    # keys matching nothing first: a typo ("fcc2") is the error, not the layer it left uncovered
    unused = [g for g in value if not any(fnmatch.fnmatchcase(n, g) for n in names)]
    if unused:
        missing = [n for n in names if not any(fnmatch.fnmatchcase(n, g) for g in value)]
        hint = f" (no value for {missing}: a misspelled name?)" if missing else ""
        raise RecipeError(
            f"{what}: {', '.join(repr(g) for g in unused)} "
            f"match{'es' if len(unused) == 1 else ''} no selected layer{hint}; layers: {names}"
        )
    out: dict[str, Any] = {}
    for name in names:
        matches = [g for g in value if fnmatch.fnmatchcase(name, g)]
        if not matches:
            raise RecipeError(f"{what}: no value for layer {name!r} (add it or a '*' default)")
        out[name] = value[max(matches, key=lambda g: _specificity(g, name))]
    return out


def _specificity(glob: str, name: str) -> tuple[bool, int, int]:
    wildcards = sum(glob.count(c) for c in "*?[")
    return (glob == name, -wildcards, len(glob))
