"""Bring your own training loop: a recipe's stages applied to a model, driven step by step.

``compress`` runs its own fine-tuning. Users with a trainer of their own (a plain loop,
Lightning, Hugging Face) drive the same stages with a :class:`CompressionSession`, as TF-MOT's
``UpdatePruningStep`` callback or NNI's evaluator do::

    session = deepsqueeze.prepare(model, "recipe.yaml", example_inputs=x0)  # stage 1 applied
    for stage in session:                  # each stage: method applied, then finalized at the end
        opt = torch.optim.SGD(model.parameters(), lr=0.01)  # after the stage is applied
        for x, y in loader:
            loss = loss_fn(model(x), y) + session.loss_term()  # a method's prior (KL), or 0
            opt.zero_grad(); loss.backward(); opt.step()
            session.step()                 # after every optimizer step: drives the schedules
    session.save("model.dsq")              # finalize() (bakes), then deepsqueeze.save(...)

``compress`` itself runs through a session (its fine-tuning calls ``session.step`` after every
optimizer step), so a user's loop that makes the same updates gives the same weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from deepsqueeze import models
from deepsqueeze.data.loaders import Inputs, sample_count
from deepsqueeze.errors import DeepSqueezeError, ModelError, RecipeError
from deepsqueeze.methods.base import LossTerm, Method, StepHook, select_layers
from deepsqueeze.metrics.size import parameter_count
from deepsqueeze.outputs import check_output_file
from deepsqueeze.pipeline.recipe import Recipe, Stage, load_recipe
from deepsqueeze.training.run import check_forward


def check_finite(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    """Refuse to compress layers holding NaN or Inf weights, naming them."""
    bad = [
        f"{name}.{pname}"
        for name, mod in layers.items()
        for pname, p in mod.named_parameters(recurse=False)
        if not torch.isfinite(p).all()
    ]
    if bad:
        raise ModelError(
            f"refusing to compress: NaN or Inf values in {', '.join(bad)}; "
            "retrain or repair the model first"
        )


def spec_or_none(model: nn.Module) -> models.ModelSpec | None:
    """The zoo spec of ``model``, or None for a user's own module."""
    try:
        return models.spec_of(model)
    except ModelError:
        return None


def check_recipe_model(model: nn.Module, recipe: Recipe) -> None:
    """A recipe written for a zoo model (``model:``) only runs on that zoo model; a user's own
    module (no spec) is not checked."""
    spec = spec_or_none(model)
    if spec is not None and recipe.model is not None and recipe.model != spec.name:
        raise RecipeError(
            f"recipe {recipe.name!r} is written for model {recipe.model!r}, "
            f"but the given model is {spec.name!r}"
        )


def bake(model: nn.Module) -> list[str]:
    """Replace every parametrized tensor (pruning masks, codebooks) by a plain parameter holding
    its effective value; returns the names baked (``layer.weight``)."""
    baked = []
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            # newest first: a later parametrization may read an earlier one's original (the
            # binary layer's scale is the mean |latent weight|), so it must go while that exists
            for tensor in reversed(list(module.parametrizations)):  # type: ignore[union-attr]
                parametrize.remove_parametrizations(module, tensor, leave_parametrized=True)
                baked.append(f"{name}.{tensor}" if name else tensor)
    return baked


class CompressionSession:
    """A recipe's stages applied to ``model`` one at a time, for the user's own training loop.

    A stage *starts* when its method is applied to the selected layers (in place: masks,
    codebooks, or smaller modules for channel pruning, so build the optimizer after it) and
    *ends* when the method is finalized (a schedule cut short reaches its target then).
    :meth:`step` must be called after every optimizer step of the stage. Iterating over the
    session starts each stage, hands it to the loop body, and ends it when the body is done.
    """

    def __init__(
        self,
        model: nn.Module,
        recipe: Recipe | str | Path | dict[str, Any],
        *,
        example_inputs: Inputs | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ModelError(
                f"prepare() takes a torch nn.Module, got {type(model).__name__}"
            )
        self.model = model
        self.recipe = load_recipe(recipe)
        check_recipe_model(model, self.recipe)
        if example_inputs is not None:
            check_forward(model, example_inputs, "example_inputs")
        self.example_inputs = example_inputs
        self.dense_parameters = parameter_count(model)  # before compression: the ratio's base
        self.methods: list[Method] = self.recipe.methods()
        self.index = -1  # the current stage; -1 before the first, len(stages) after the last
        self.layers: dict[str, nn.Module] = {}
        self.steps = 0  # optimizer steps of the current stage
        self._hooks: list[StepHook] = []
        self._terms: list[LossTerm] = []
        self._open = False  # the current stage is applied and not yet finalized
        self._finalized = False
        self.data: Any = None
        self.loss_fn: Callable[..., Any] | None = None
        self.train_size: int | None = None

    def use_data(self, data: Any, loss_fn: Callable[..., Any] | None = None, *,
                 train_size: int | None = None) -> None:
        """Training data handed to each stage's method before it is applied (calibration of
        ``quantize``, neuron importance of ``sparse-svd``, the KL scale of ``sparse-vd``; see
        :meth:`Method.use_data`); ``train_size``: the fine-tuning set's size when ``data`` is a
        sample of it."""
        self.data, self.loss_fn, self.train_size = data, loss_fn, train_size

    # --- the current stage --------------------------------------------------------------------

    @property
    def stage(self) -> Stage:
        """The current stage (its ``finetune`` holds the recipe's training settings, if any)."""
        if not 0 <= self.index < len(self.recipe.stages):
            raise DeepSqueezeError("no current stage: the session has not started or has ended")
        return self.recipe.stages[self.index]

    @property
    def method(self) -> Method:
        """The current stage's method (its state: masks, schedule, report)."""
        self.stage  # noqa: B018 (raises outside the stages)
        return self.methods[self.index]

    @property
    def done(self) -> bool:
        """Every stage has been applied and finalized."""
        return self.index >= len(self.recipe.stages) and not self._open

    def start_stage(self) -> Stage:
        """Apply the next stage's method to the model (the current stage must have ended)."""
        if self._finalized:
            raise DeepSqueezeError("the session is finalized; prepare a new one")
        if self._open:
            raise DeepSqueezeError(
                f"stage {self.index + 1} ({self.stage.label}) is still running: end it with "
                "end_stage() or call next_stage()"
            )
        if self.index + 1 >= len(self.recipe.stages):
            raise DeepSqueezeError("every stage of the recipe has run; call finalize()")
        self.index += 1
        method = self.methods[self.index]
        layers = select_layers(self.model, method.params.layers, method.supported)
        check_finite(self.model, layers)
        if self.data is not None:
            method.use_data(self.data, self.loss_fn)
            method.use_train_size(self.train_size)
        method.apply(self.model, layers)
        self.layers = layers
        self._hooks = method.step_hooks()
        self._terms = method.loss_terms()
        self.steps = 0
        self._open = True
        return self.recipe.stages[self.index]

    def step(self) -> None:
        """Call after every optimizer step of the current stage: advances its schedule (e.g.
        raises the sparsity of a polynomial pruning schedule at its steps)."""
        if not self._open:
            raise DeepSqueezeError(
                "session.step() outside a stage: start one (prepare, next_stage, or iterate "
                "over the session) before training"
            )
        for hook in self._hooks:
            hook(self.steps, self.model)
        self.steps += 1

    @property
    def has_loss_term(self) -> bool:
        """Whether the current stage's method adds anything to the loss (loops may skip
        :meth:`loss_term` otherwise)."""
        return bool(self._terms)

    def loss_term(self) -> torch.Tensor:
        """What the current stage's method adds to the loss of the next batch (e.g. sparse
        variational dropout's KL divergence; a zero tensor for most methods): in your own loop,
        ``loss = criterion(model(x), y) + session.loss_term()`` before ``backward()``."""
        if not self._open:
            raise DeepSqueezeError(
                "session.loss_term() outside a stage: start one (prepare, next_stage, or iterate "
                "over the session) before training"
            )
        total = torch.zeros(())
        for term in self._terms:
            extra = term(self.steps, self.model)
            total = total.to(extra.device) + extra
        return total

    def fit_loss_term(self, _step: int, _model: nn.Module) -> torch.Tensor:
        """:meth:`loss_term` as a ``training.fit`` loss term."""
        return self.loss_term()

    def fit_hook(self, _step: int, _model: nn.Module) -> None:
        """:meth:`step` as a ``training.fit`` step hook."""
        self.step()

    def end_stage(self) -> None:
        """Finalize the current stage's method (no-op when no stage is running)."""
        if self._open:
            self.methods[self.index].finalize(self.model)
            self._hooks, self._terms = [], []
            self._open = False

    def next_stage(self) -> Stage | None:
        """End the current stage and start the next; None (and nothing started) after the last."""
        self.end_stage()
        if self.index + 1 >= len(self.recipe.stages):
            self.index = len(self.recipe.stages)
            return None
        return self.start_stage()

    def __iter__(self) -> Iterator[Stage]:
        if self.index < 0:
            self.start_stage()
        while self.index < len(self.recipe.stages):
            # a stage ended by hand inside the body: go on with the next
            if not self._open and self.next_stage() is None:
                return
            yield self.stage
            self.next_stage()

    def finalize(self, *, bake_weights: bool = True) -> nn.Module:
        """End the last stage and (``bake_weights``) bake every parametrization into plain
        weights; returns the model, ready for ``deepsqueeze.save``. Stages not yet run are an
        error naming them."""
        if self._finalized:
            return self.model
        if self.index < 0:
            raise DeepSqueezeError("no stage has run: train through the session first")
        self.end_stage()
        left = [s.label for s in self.recipe.stages[self.index + 1:]]
        if left:
            raise DeepSqueezeError(
                f"stage(s) {left} of recipe {self.recipe.name!r} have not run: call "
                "next_stage() for each (or iterate over the session) before finalize()"
            )
        self.index = len(self.recipe.stages)
        if bake_weights:
            bake(self.model)
        self._finalized = True
        return self.model

    def save(self, path: str | Path, **options: Any) -> Any:
        """Finalize and write the model as a .dsq file with ``deepsqueeze.save``: the recipe's
        encoding, its name in the manifest, the session's ``example_inputs`` and the parameter
        count before compression (so the ratio is measured against the original model).
        ``options`` go to ``deepsqueeze.save`` (e.g. ``extra_meta``); returns its FileReport."""
        from deepsqueeze.dsq import save

        check_output_file(path)
        self.finalize()
        extra = {**options.pop("extra_meta", {}), "recipe": self.recipe.name}
        if spec_or_none(self.model) is not None:  # a zoo model is rebuilt from its spec
            return save(self.model, path, encode=self.recipe.encode, extra_meta=extra, **options)
        options.setdefault("example_inputs", self.example_inputs)
        options.setdefault("dense_parameters", self.dense_parameters)
        return save(self.model, path, encode=self.recipe.encode, extra_meta=extra, **options)

    def __repr__(self) -> str:
        where = ("not started" if self.index < 0 else "done" if self.done
                 else f"stage {self.index + 1}/{len(self.recipe.stages)} {self.stage.label}")
        return f"CompressionSession(recipe={self.recipe.name!r}, {where}, steps={self.steps})"


def prepare(
    model: nn.Module,
    recipe: Recipe | str | Path | dict[str, Any],
    *,
    example_inputs: Inputs | None = None,
    train_data: Any = None,
) -> CompressionSession:
    """Start compressing ``model`` in place with ``recipe`` in the user's own training loop:
    the first stage's method is applied; see :class:`CompressionSession`. ``example_inputs``
    (a tensor or a tuple, batch dimension first) are checked to run through the model and are
    what :meth:`CompressionSession.save` records. ``train_data`` (a Dataset, DataLoader or
    ``(X, y)``) is handed to the methods that measure on it or need its size
    (:meth:`CompressionSession.use_data`)."""
    session = CompressionSession(model, recipe, example_inputs=example_inputs)
    if train_data is not None:
        session.use_data(train_data, train_size=sample_count(train_data))
    session.start_stage()
    return session


__all__ = ["CompressionSession", "bake", "check_finite", "prepare"]
