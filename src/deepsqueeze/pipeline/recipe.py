"""Compression recipes: YAML files validated into a list of stages plus encoding options.

Example (``recipes/deep-compression-lenet300.yaml``)::

    name: deep-compression-lenet300
    model: lenet300
    dataset: mnist
    stages:
      - method: prune
        params: {sparsity: {fc1: 0.92, fc2: 0.91, fc3: 0.74}}
        finetune: {epochs: 6, lr: 0.01}
      - method: share
        params: {bits: 5}
        finetune: {epochs: 2, lr: 0.001}
    encode: {huffman: true, index_bits: auto}

Every error names the field that is wrong (``stages.1.finetune.lr: ...``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

import deepsqueeze.methods  # noqa: F401  (registers every method)
from deepsqueeze.codec.options import EncodeOptions  # re-exported: part of the recipe schema
from deepsqueeze.errors import RecipeError
from deepsqueeze.methods.base import METHODS, Method, create_method
from deepsqueeze.options import describe_validation_error
from deepsqueeze.training.loop import MAX_SEED, TrainConfig

MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few hundred bytes; 1 MiB is far beyond any real one


class Stage(BaseModel):
    """One compression step: a method with parameters, then optional fine-tuning."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: str
    name: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    finetune: TrainConfig | None = None

    def build(self, index: int) -> Method:
        """Instantiate this stage's method; errors are prefixed with the stage's location."""
        if self.method not in METHODS:
            raise RecipeError(
                f"stages.{index}.method: unknown method {self.method!r}; "
                f"known: {', '.join(sorted(METHODS))}"
            )
        try:
            return create_method(self.method, **self.params)
        except RecipeError as exc:
            raise RecipeError(f"stages.{index}.params: {exc}") from exc

    @property
    def label(self) -> str:
        return self.name or self.method


class Recipe(BaseModel):
    """A validated compression recipe."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = "recipe"
    model: str | None = Field(None, description="zoo model this recipe is written for (checked)")
    dataset: str | None = Field(None, description="default fine-tuning/evaluation dataset")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    stages: list[Stage] = Field(min_length=1)
    encode: EncodeOptions = Field(default_factory=EncodeOptions)
    teacher: str | None = Field(
        None, min_length=1, max_length=4096,
        description="the stages' distillation teacher (finetune.distill > 0): a model file "
        "(model.pt from `train`, or a .dsq) giving the same outputs as the model, e.g. a larger "
        "network; relative paths are taken from the working directory. Default: the model as "
        "it was before the first stage")

    def methods(self) -> list[Method]:
        """Instantiate (and so validate) every stage's method."""
        return [stage.build(i) for i, stage in enumerate(self.stages)]


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate a mapping into a :class:`Recipe` (method parameters included)."""
    if data is None or data == {}:
        raise RecipeError(f"{source}: the recipe is empty; it needs at least a 'stages' list")
    if not isinstance(data, dict):
        raise RecipeError(
            f"{source}: a recipe must be a mapping with a 'stages' list, got {type(data).__name__}"
        )
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{source}: " + describe_validation_error(exc, options=False)) from exc
    try:
        recipe.methods()
    except RecipeError as exc:
        raise RecipeError(f"{source}: {exc}") from exc
    return recipe


def load_recipe(recipe: str | Path | dict[str, Any] | Recipe) -> Recipe:
    """A recipe from a YAML file path, a mapping, or a Recipe (returned as is)."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return parse_recipe(recipe)
    return parse_recipe(_parse_yaml(Path(recipe)), str(recipe))


def _parse_yaml(path: Path) -> Any:
    """The YAML document in recipe file ``path``: a regular file of UTF-8 text, at most
    ``MAX_RECIPE_BYTES``."""
    if path.is_dir():
        raise RecipeError(f"recipe {path} is a folder; give a recipe .yaml file (see recipes/)")
    if not path.is_file():  # missing, or a FIFO / device whose read could block forever
        raise RecipeError(f"recipe file {path} not found (or not a regular file)")
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_RECIPE_BYTES + 1)
    except OSError as exc:
        raise RecipeError(f"recipe file {path}: cannot read it ({exc.strerror})") from exc
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe file {path} is larger than {MAX_RECIPE_BYTES:,} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(
            f"recipe file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8"
        ) from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc
    except RecursionError as exc:
        raise RecipeError(f"{path}: the YAML nests too deeply") from exc
