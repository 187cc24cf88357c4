"""``compress()``: run a recipe's stages on a model, fine-tune through the one trainer, save."""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepsqueeze import models
from deepsqueeze.data import load_dataset
from deepsqueeze.errors import ModelError, RecipeError
from deepsqueeze.io import load_model
from deepsqueeze.methods.base import select_layers
from deepsqueeze.metrics.accuracy import accuracy_and_loss
from deepsqueeze.options import check_int
from deepsqueeze.outputs import check_output_file
from deepsqueeze.pipeline.recipe import Recipe, load_recipe
from deepsqueeze.training.loop import fit
from deepsqueeze.training.run import check_fits


@dataclass
class StageRecord:
    """What one stage did: its method, layers, time and the test accuracy after it."""

    stage: str
    method: dict[str, Any]
    layers: list[str]
    test_accuracy: float
    seconds: float
    finetune_epochs: float


@dataclass
class CompressResult:
    """The compressed model (training form), per-stage records, and the file if one was saved."""

    model: nn.Module
    recipe: Recipe
    baseline_accuracy: float
    stages: list[StageRecord] = field(default_factory=list)
    path: Path | None = None
    file_report: Any = None
    file_accuracy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe.model_dump(),
            "baseline_accuracy": self.baseline_accuracy,
            "stages": [asdict(s) for s in self.stages],
            "path": str(self.path) if self.path else None,
            "file": self.file_report.to_dict() if self.file_report is not None else None,
            "file_accuracy": self.file_accuracy,
        }


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


def compress(
    model: nn.Module | str | Path,
    recipe: Recipe | str | Path | dict[str, Any],
    *,
    dataset: str | None = None,
    out: str | Path | None = None,
    data_dir: str | Path | None = None,
    subset: int | None = None,
    progress: bool = True,
    evaluate_file: bool = True,
) -> CompressResult:
    """Apply ``recipe`` to ``model`` (an nn.Module from the zoo or a model.pt path).

    Each stage applies its method to its selected layers, then fine-tunes with the stage's
    settings through :func:`deepsqueeze.training.fit`. With ``out``, the result is saved as a
    .dsq file, and (``evaluate_file``) the file itself is loaded back and evaluated; ``out`` is
    checked first (:class:`OutputPathError` when it is a folder, cannot be written, or is the
    model or recipe file), before any work.
    """
    if out is not None:
        inputs = [p for p in (model, recipe) if isinstance(p, (str, Path))]
        check_output_file(out, inputs=inputs)
    if subset is not None:
        check_int("subset (--subset)", subset, 1, 1 << 31)
    recipe = load_recipe(recipe)
    if isinstance(model, (str, Path)):
        model = load_model(model)
    spec = models.spec_of(model)
    if recipe.model is not None and recipe.model != spec.name:
        raise RecipeError(
            f"recipe {recipe.name!r} is written for model {recipe.model!r}, "
            f"but the given model is {spec.name!r}"
        )
    dataset = dataset or recipe.dataset
    if dataset is None:
        raise RecipeError("no dataset: pass --dataset or set 'dataset' in the recipe")
    train_set = load_dataset(dataset, "train", data_dir=data_dir)
    test_set = load_dataset(dataset, "test", data_dir=data_dir)
    if subset is not None:
        train_set = train_set.subset(subset, seed=recipe.seed)
    check_fits(model, train_set)
    x_test = test_set.normalized()

    def test_accuracy(net: nn.Module) -> float:
        return accuracy_and_loss(net.cpu(), x_test, test_set.labels).accuracy

    result = CompressResult(model=model, recipe=recipe, baseline_accuracy=test_accuracy(model))
    # fine-tuning stages with `distill` learn from the model as it was before compression
    distilling = any(s.finetune is not None and s.finetune.distill > 0 for s in recipe.stages)
    teacher = copy.deepcopy(model).eval() if distilling else None
    methods = recipe.methods()
    torch.manual_seed(recipe.seed)
    for index, (stage, method) in enumerate(zip(recipe.stages, methods, strict=False)):
        t0 = time.perf_counter()
        layers = select_layers(model, method.params.layers, method.supported)
        check_finite(model, layers)
        method.apply(model, layers)
        epochs = 0.0
        if stage.finetune is not None and stage.finetune.epochs > 0:
            cfg = stage.finetune.model_copy(update={"seed": recipe.seed + index})
            fit(
                model,
                train_set,
                cfg,
                test_set=None,
                step_hooks=method.step_hooks(),
                progress=progress,
                description=f"stage {index + 1} {stage.label}",
                teacher=teacher,
            )
            epochs = cfg.epochs
        method.finalize(model)
        model.cpu()
        result.stages.append(
            StageRecord(
                stage=stage.label,
                method=method.summary(),
                layers=list(layers),
                test_accuracy=test_accuracy(model),
                seconds=time.perf_counter() - t0,
                finetune_epochs=epochs,
            )
        )
    if out is not None:
        from deepsqueeze.dsq import inspect, load, save
        from deepsqueeze.training.distributed import barrier, current_context, is_main_process

        # under torchrun every rank holds the same model: rank 0 writes, the others read it back
        if not is_main_process():
            barrier(current_context())
            result.file_report, result.path = inspect(out), Path(out)
            if evaluate_file:
                result.file_accuracy = test_accuracy(load(out))
            return result
        result.file_report = save(
            model, out, encode=recipe.encode, extra_meta={"recipe": recipe.name, "dataset": dataset}
        )
        result.path = Path(out)
        barrier(current_context())
        if evaluate_file:
            result.file_accuracy = test_accuracy(load(out))
    return result
