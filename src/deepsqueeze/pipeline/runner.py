"""``compress()``: run a recipe's stages on a model, fine-tune through the one trainer, save.

The model is any ``nn.Module`` (a zoo model or the user's own); the data is a built-in dataset
(by name) or the user's own (``train_data=`` / ``eval_data=``: a Dataset, a DataLoader, a pair
``(X, y)``), fine-tuned through the user's ``loss_fn`` and scored by the user's ``metric``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from deepsqueeze.data import ImageDataset, load_dataset
from deepsqueeze.data.loaders import (
    DataLike,
    Inputs,
    first_inputs,
    is_data,
    iter_batches,
    sample_count,
)
from deepsqueeze.errors import DeepSqueezeError, ModelError, OptionError, RecipeError
from deepsqueeze.io import load_model
from deepsqueeze.metrics.accuracy import LossFn, Metric, accuracy_and_loss, evaluate_batches
from deepsqueeze.metrics.size import parameter_count
from deepsqueeze.options import check_int, short_repr
from deepsqueeze.outputs import check_output_file
from deepsqueeze.pipeline.recipe import Recipe, Stage, load_recipe
from deepsqueeze.pipeline.session import (
    CompressionSession,
    check_finite,
    spec_or_none,
)
from deepsqueeze.training.loop import fit
from deepsqueeze.training.run import check_fits, check_forward

__all__ = [
    "AccuracyFloorError", "CompressResult", "StageCallback", "StageRecord", "check_finite",
    "check_forward", "compress",
]


@dataclass
class StageRecord:
    """What one stage did: its method, layers, time and the metric after it.

    ``test_accuracy`` is the top-1 accuracy on the evaluation data when the metric is the default
    one (None with a user metric or without evaluation data); ``metric`` is the metric's value
    either way (``metric_name`` says which)."""

    stage: str
    method: dict[str, Any]
    layers: list[str]
    test_accuracy: float | None
    seconds: float
    finetune_epochs: float
    metric: float | None = None
    metric_name: str = "accuracy"


@dataclass
class CompressResult:
    """The compressed model (training form), per-stage records, and the file if one was saved.

    ``baseline_accuracy`` / ``file_accuracy`` are top-1 accuracies with the default metric;
    ``baseline_metric`` / ``file_metric`` the metric's values whatever it is."""

    model: nn.Module = field(repr=False)
    recipe: Recipe = field(repr=False)
    baseline_accuracy: float | None
    stages: list[StageRecord] = field(default_factory=list)
    path: Path | None = None
    file_report: Any = field(default=None, repr=False)
    file_accuracy: float | None = None
    baseline_metric: float | None = None
    file_metric: float | None = None
    metric_name: str = "accuracy"
    teacher: str | None = None  # what the distilling stages learned from (None: no distillation)

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe.model_dump(),
            "teacher": self.teacher,
            "baseline_accuracy": self.baseline_accuracy,
            "baseline_metric": self.baseline_metric,
            "metric_name": self.metric_name,
            "stages": [asdict(s) for s in self.stages],
            "path": str(self.path) if self.path else None,
            "file": self.file_report.to_dict() if self.file_report is not None else None,
            "file_accuracy": self.file_accuracy,
            "file_metric": self.file_metric,
        }

    def __repr__(self) -> str:
        stages = ", ".join(
            f"{s.stage}: {s.metric:.4g}" if s.metric is not None else s.stage for s in self.stages
        )
        base = "n/a" if self.baseline_metric is None else f"{self.baseline_metric:.4g}"
        out = f", path={str(self.path)!r}" if self.path is not None else ""
        ratio = ""
        if self.file_report is not None:
            ratio = f", compression={self.file_report.compression:.1f}x"
        return (f"CompressResult(recipe={self.recipe.name!r}, model={type(self.model).__name__}, "
                f"{self.metric_name}: baseline {base} -> [{stages}]{out}{ratio})")


class AccuracyFloorError(DeepSqueezeError):
    """A stage left the metric below ``accuracy_floor``: the recipe stopped there, no file was
    written; ``result`` holds the stages run so far (the last one is the one below the floor)."""

    def __init__(self, message: str, result: CompressResult) -> None:
        super().__init__(message)
        self.result = result


class StageCallback(Protocol):
    """Per-stage callbacks (both optional): ``on_stage_start(index, stage, model)`` after the
    stage's method is applied, before its fine-tuning; ``on_stage_end(index, record, model)``
    after it is finalized and scored."""

    def on_stage_start(self, index: int, stage: Stage, model: nn.Module) -> None: ...

    def on_stage_end(self, index: int, record: StageRecord, model: nn.Module) -> None: ...


METHOD_SAMPLES = 4096
"""Most samples of a built-in training split handed to the methods (a seeded subset)."""


def _method_data(train: Any) -> Any:
    """The training data as methods take it: a built-in split as normalized ``(X, y)`` tensors
    of at most :data:`METHOD_SAMPLES` samples; the user's own data as it is."""
    if isinstance(train, ImageDataset):
        part = train.subset(min(METHOD_SAMPLES, len(train)), seed=0)
        return part.normalized(), part.labels.long()
    return train


@dataclass
class _Data:
    """Where fine-tuning and evaluation data come from."""

    train: ImageDataset | DataLike | None
    eval: ImageDataset | DataLike | None
    dataset: str | None  # a built-in dataset's name


def _resolve_data(
    model: nn.Module,
    recipe: Recipe,
    *,
    train_data: DataLike | None,
    eval_data: DataLike | None,
    dataset: Any,
    data_dir: str | Path | None,
    subset: int | None,
    needs_data: bool,
) -> _Data:
    if dataset is not None and not isinstance(dataset, str):
        kind = type(dataset).__name__
        raise OptionError(
            f"dataset= takes the name of a built-in dataset (mnist, fashion-mnist, ...), not a "
            f"{kind}; pass your own data as train_data= (a Dataset, DataLoader or (X, y)) and "
            "eval_data="
        )
    for name, value in (("train_data", train_data), ("eval_data", eval_data)):
        if value is not None and not is_data(value):
            raise OptionError(
                f"{name}= takes a torch Dataset of (inputs, target), a DataLoader, a pair "
                f"(X, y) or a deepsqueeze dataset, got {short_repr(value)}"
            )
    if train_data is not None or eval_data is not None:
        if dataset is not None:
            raise OptionError(
                "give either dataset= (a built-in dataset) or train_data=/eval_data= (your own "
                "data), not both"
            )
        if subset is not None:
            raise OptionError("subset applies to built-in datasets; subset your own data yourself")
        return _Data(train_data, eval_data, None)
    name = dataset or recipe.dataset
    if name is None:
        if needs_data:
            raise RecipeError(
                "no data: pass train_data= and eval_data= (your own Dataset, DataLoader or "
                "(X, y)), or dataset= / --dataset (a built-in dataset), or set 'dataset' in the "
                "recipe"
            )
        return _Data(None, None, None)
    train_set = load_dataset(name, "train", data_dir=data_dir)
    test_set = load_dataset(name, "test", data_dir=data_dir)
    if subset is not None:
        train_set = train_set.subset(subset, seed=recipe.seed)
    if spec_or_none(model) is not None:
        check_fits(model, train_set)
    return _Data(train_set, test_set, name)


def _scorer(
    data: ImageDataset | DataLike | None, loss_fn: LossFn | None, metric: Metric | None
) -> Any:
    """A function ``model -> (top-1 accuracy or None, metric or None, metric name)``."""
    if data is None:
        return lambda net: (None, None, "accuracy" if metric is None else _metric_name(metric))
    if isinstance(data, ImageDataset) and loss_fn is None and metric is None:
        x_test = data.normalized()

        def builtin(net: nn.Module) -> tuple[float | None, float | None, str]:
            acc = accuracy_and_loss(net.cpu(), x_test, data.labels).accuracy
            return acc, acc, "accuracy"

        return builtin

    def user(net: nn.Module) -> tuple[float | None, float | None, str]:
        # iterating a DataLoader draws a seed from the global RNG: scoring must not change
        # what the fine-tuning that follows sees (dropout, the user's shuffling)
        with torch.random.fork_rng(devices=[]):
            scored = evaluate_batches(net.cpu(), iter_batches(data), loss_fn, metric)
        acc = scored.metric if metric is None else None
        return acc, scored.metric, scored.name

    return user


def _teacher(source: nn.Module | str | Path, model: nn.Module, example: Inputs | None) -> nn.Module:
    """The distillation teacher: a module, or loaded from a model.pt / .dsq file; checked to
    give outputs of the model's shape on the example inputs."""
    if isinstance(source, nn.Module):
        net = source
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise OptionError(
                f"teacher {str(path)!r} is not a file: give a model.pt from `deepsqueeze train` "
                "or a .dsq file (relative paths are taken from the working directory)"
            )
        from deepsqueeze.dsq import load_model_or_dsq

        net = load_model_or_dsq(path)
    else:
        raise OptionError(f"teacher must be an nn.Module or a model file path, got "
                          f"{short_repr(source)}")
    net = net.eval()
    if example is not None:
        xs = example if isinstance(example, tuple) else (example,)
        with torch.no_grad():
            was = model.training
            got, want = net(*xs), model.eval()(*xs)
            model.train(was)
        if getattr(got, "shape", None) != getattr(want, "shape", None):
            raise ModelError(
                f"the teacher's outputs have shape {tuple(getattr(got, 'shape', ()))}, the "
                f"model's {tuple(getattr(want, 'shape', ()))}: a distillation teacher must give "
                "the same outputs (e.g. the same classes)"
            )
    return net


def _metric_name(metric: Metric) -> str:
    return str(getattr(metric, "__name__", type(metric).__name__))


def compress(
    model: nn.Module | str | Path,
    recipe: Recipe | str | Path | dict[str, Any],
    *,
    train_data: DataLike | None = None,
    eval_data: DataLike | None = None,
    loss_fn: LossFn | None = None,
    metric: Metric | None = None,
    example_inputs: Inputs | None = None,
    dataset: str | None = None,
    out: str | Path | None = None,
    data_dir: str | Path | None = None,
    subset: int | None = None,
    progress: bool = True,
    evaluate_file: bool = True,
    callbacks: Sequence[Any] = (),
    accuracy_floor: float | None = None,
    extra_meta: dict[str, Any] | None = None,
    teacher: nn.Module | str | Path | None = None,
) -> CompressResult:
    """Apply ``recipe`` to ``model``: any ``nn.Module`` (a zoo model, the user's own) or a
    model.pt path.

    Each stage applies its method to its selected layers, then fine-tunes with the stage's
    settings through :func:`deepsqueeze.training.fit`; with ``distill`` the teacher is the model
    as it was before the first stage, or ``teacher`` (a module, or a model.pt / .dsq path;
    default: the recipe's ``teacher``), which must give outputs of the model's shape.

    Data: ``dataset`` names a built-in dataset (default: the recipe's); or ``train_data`` /
    ``eval_data`` are the user's own (a Dataset of ``(inputs, target)``, a DataLoader, a pair
    ``(X, y)``; inputs a tuple for a model with several). Fine-tuning minimizes ``loss_fn``
    (default cross-entropy); each stage is scored on ``eval_data`` by ``metric`` (default top-1
    accuracy; ``metric(outputs, targets)`` or ``metric(model)``, higher is better).
    ``example_inputs`` (a tensor or tuple, batch first; default: the first batch of the data)
    are checked to run through the model and are recorded in the file.

    ``callbacks``: objects with ``on_stage_start(index, stage, model)`` and/or
    ``on_stage_end(index, record, model)``. ``accuracy_floor``: after each stage the metric
    must be at least this; otherwise the recipe stops there and :class:`AccuracyFloorError`
    (carrying the result so far) is raised before anything is saved.

    With ``out``, the result is saved as a .dsq file (``extra_meta``: more JSON fields for its
    manifest, e.g. ``{"data": "x.npz"}``), and (``evaluate_file``) the file itself
    is loaded back and scored; ``out`` is checked first (:class:`OutputPathError` when it is a
    folder, cannot be written, or is the model or recipe file), before any work. Beside it go
    the run's numbers and recipe (:func:`run_record_paths`: ``model.dsq`` -> ``model.json``,
    ``model.recipe.yaml``), which ``deepsqueeze report`` reads.
    """
    if out is not None:
        inputs = [p for p in (model, recipe) if isinstance(p, (str, Path))]
        check_output_file(out, inputs=inputs)
        numbers, recipe_copy = run_record_paths(out)
        check_output_file(numbers, inputs=inputs)
        if not any(_same_file(recipe_copy, p) for p in inputs):
            check_output_file(recipe_copy, inputs=inputs)
    if subset is not None:
        check_int("subset (--subset)", subset, 1, 1 << 31)
    if accuracy_floor is not None and (
        isinstance(accuracy_floor, bool) or not isinstance(accuracy_floor, (int, float))
        or not math.isfinite(accuracy_floor)
    ):
        raise OptionError(
            f"accuracy_floor must be a finite number, got {short_repr(accuracy_floor)}"
        )
    if loss_fn is not None and not callable(loss_fn):
        raise OptionError(f"loss_fn must be callable(outputs, target), got {short_repr(loss_fn)}")
    if metric is not None and not callable(metric):
        raise OptionError(f"metric must be callable, got {short_repr(metric)}")
    callbacks = list(callbacks or ())
    recipe = load_recipe(recipe)
    if isinstance(model, (str, Path)):
        model = load_model(model)
    if not isinstance(model, nn.Module):
        raise ModelError(f"compress() takes a torch nn.Module or a model.pt path, got "
                         f"{short_repr(model)}")
    session = CompressionSession(model, recipe)  # checks the recipe's model against the spec
    finetunes = any(s.finetune is not None and s.finetune.epochs > 0 for s in recipe.stages)
    data = _resolve_data(
        model, recipe, train_data=train_data, eval_data=eval_data, dataset=dataset,
        data_dir=data_dir, subset=subset, needs_data=finetunes or accuracy_floor is not None,
    )
    if finetunes and data.train is None:
        raise OptionError("the recipe fine-tunes: pass train_data= (eval_data= only scores)")
    if accuracy_floor is not None and data.eval is None:
        raise OptionError("accuracy_floor needs eval_data= (the data the metric is measured on)")
    user_model = spec_or_none(model) is None
    if example_inputs is None:
        source = data.train if data.train is not None else data.eval
        if source is not None:
            example_inputs = first_inputs(source)
    if example_inputs is not None and (user_model or data.dataset is None):
        check_forward(model, example_inputs, "example_inputs (by default, the first batch of "
                      "the data)")
    score = _scorer(data.eval, loss_fn, metric)
    if data.train is not None:  # what methods measure on when applied (calibration, importance)
        session.use_data(_method_data(data.train), loss_fn,
                         train_size=sample_count(data.train))
    dense_parameters = parameter_count(model)
    skeleton = copy.deepcopy(model) if (out is not None and user_model) else None
    acc, value, name = score(model)
    result = CompressResult(model=model, recipe=recipe, baseline_accuracy=acc,
                            baseline_metric=value, metric_name=name)
    # fine-tuning stages with `distill` learn from the model as it was before compression
    distilling = any(s.finetune is not None and s.finetune.distill > 0 for s in recipe.stages)
    teacher_source = teacher if teacher is not None else recipe.teacher
    teacher_model: nn.Module | None = None
    if teacher_source is not None:
        if not distilling:
            raise OptionError(
                "a teacher is given but no stage distils: set finetune.distill > 0 in the "
                "stages that should learn from it, or drop the teacher"
            )
        teacher_model = _teacher(teacher_source, model, example_inputs)
    elif distilling:
        teacher_model = copy.deepcopy(model).eval()
    if teacher_model is not None:
        result.teacher = ("the model before compression" if teacher_source is None
                          else f"{type(teacher_source).__name__} module"
                          if isinstance(teacher_source, nn.Module) else str(teacher_source))
    torch.manual_seed(recipe.seed)
    for index, stage in enumerate(recipe.stages):
        t0 = time.perf_counter()
        session.start_stage()
        for cb in callbacks:
            if hasattr(cb, "on_stage_start"):
                cb.on_stage_start(index, stage, model)
        epochs = 0.0
        if stage.finetune is not None and stage.finetune.epochs > 0:
            cfg = stage.finetune.model_copy(update={"seed": recipe.seed + index})
            fit(
                model,
                data.train,
                cfg,
                test_set=None,
                step_hooks=[session.fit_hook],
                loss_terms=[session.fit_loss_term] if session.has_loss_term else [],
                progress=progress,
                description=f"stage {index + 1} {stage.label}",
                teacher=teacher_model,
                loss_fn=loss_fn,
                metric=metric,
            )
            epochs = cfg.epochs
        session.end_stage()
        model.cpu()
        acc, value, name = score(model)
        record = StageRecord(
            stage=stage.label,
            method=session.method.summary(),
            layers=list(session.layers),
            test_accuracy=acc,
            seconds=time.perf_counter() - t0,
            finetune_epochs=epochs,
            metric=value,
            metric_name=name,
        )
        result.stages.append(record)
        for cb in callbacks:
            if hasattr(cb, "on_stage_end"):
                cb.on_stage_end(index, record, model)
        if accuracy_floor is not None and value is not None and value < accuracy_floor:
            left = [s.label for s in recipe.stages[index + 1:]]
            raise AccuracyFloorError(
                f"stage {index + 1} ({stage.label}) left {name} at {value:.4g}, below "
                f"accuracy_floor {accuracy_floor:.4g} (baseline {result.baseline_metric:.4g}); "
                f"the recipe stopped there{f' (not run: {left})' if left else ''} and nothing "
                "was saved. Fine-tune longer, compress less, or lower the floor; the result so "
                "far is in this error's .result",
                result,
            )
    if out is not None:
        _save(result, model, out, recipe, data, example_inputs, dense_parameters, skeleton,
              evaluate_file, score, extra_meta)
        from deepsqueeze.training.distributed import is_main_process

        if is_main_process():
            write_run_record(result, out, inputs)
    return result


def _save(
    result: CompressResult,
    model: nn.Module,
    out: str | Path,
    recipe: Recipe,
    data: _Data,
    example_inputs: Inputs | None,
    dense_parameters: int,
    skeleton: nn.Module | None,
    evaluate_file: bool,
    score: Any,
    extra_meta: dict[str, Any] | None = None,
) -> None:
    """Write the .dsq file (rank 0 under torchrun), then score the file itself."""
    from deepsqueeze.dsq import inspect, load, save
    from deepsqueeze.training.distributed import barrier, current_context, is_main_process

    def load_file() -> nn.Module:
        if skeleton is None:
            return load(out)
        return load(out, model=skeleton)

    def score_file() -> None:
        acc, value, _ = score(load_file())
        result.file_accuracy, result.file_metric = acc, value

    # under torchrun every rank holds the same model: rank 0 writes, the others read it back
    if not is_main_process():
        barrier(current_context())
        result.file_report, result.path = inspect(out), Path(out)
        if evaluate_file:
            score_file()
        return
    meta: dict[str, Any] = {**(extra_meta or {}), "recipe": recipe.name}
    if data.dataset is not None:
        meta["dataset"] = data.dataset
    if skeleton is None:  # a zoo model: rebuilt from its spec
        result.file_report = save(model, out, encode=recipe.encode, extra_meta=meta)
    else:
        result.file_report = save(
            model, out, encode=recipe.encode, extra_meta=meta, example_inputs=example_inputs,
            dense_parameters=dense_parameters,
        )
    result.path = Path(out)
    barrier(current_context())
    if evaluate_file:
        score_file()


def run_record_paths(out: str | Path) -> tuple[Path, Path]:
    """Where :func:`compress` writes its numbers and recipe beside ``out``:
    ``<stem>.json`` and ``<stem>.recipe.yaml`` (``model.dsq`` -> ``model.json``,
    ``model.recipe.yaml``)."""
    out = Path(out)
    return out.with_suffix(".json"), out.with_name(out.stem + ".recipe.yaml")


def write_run_record(result: CompressResult, out: str | Path,
                     inputs: Sequence[object] = ()) -> tuple[Path, Path]:
    """Write the run's numbers (baseline, every stage, the file's bytes and accuracy) and its
    recipe beside ``out``, each atomically, so ``deepsqueeze report`` can read the folder."""
    import json
    import platform

    import yaml

    from deepsqueeze.io import atomic_write

    numbers, recipe = run_record_paths(out)
    data = result.to_dict()
    data["path"] = Path(out).name  # relative: the folder can move
    data["environment"] = {"torch": torch.__version__, "python": platform.python_version(),
                           "torch_threads": torch.get_num_threads()}
    with atomic_write(numbers, "w") as handle:
        json.dump(data, handle, indent=2, default=str)
    if not any(_same_file(recipe, p) for p in inputs):  # never rewrite the user's recipe
        with atomic_write(recipe, "w") as handle:
            yaml.safe_dump(result.recipe.model_dump(mode="json", exclude_none=True), handle,
                           sort_keys=False)
    return numbers, recipe


def _same_file(a: Path, b: object) -> bool:
    if not isinstance(b, (str, Path)):
        return False
    try:
        return a.resolve() == Path(b).resolve() or (a.exists() and a.samefile(b))
    except OSError:
        return False
