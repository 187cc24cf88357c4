"""``train()``: build a zoo model for a dataset, fit it, and write the run folder.

A run folder holds ``run.json`` (what was asked), ``checkpoint.pt`` (after every epoch),
``metrics.jsonl`` (one line per epoch) and ``model.pt`` (the final model).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deepsqueeze import models
from deepsqueeze.data import ImageDataset, load_dataset
from deepsqueeze.data.loaders import Inputs, as_tuple
from deepsqueeze.errors import CheckpointError, DeepSqueezeError, ModelError, OptionError
from deepsqueeze.io import atomic_write, save_model
from deepsqueeze.options import check_int, short_repr
from deepsqueeze.outputs import check_output_dir
from deepsqueeze.training.distributed import is_main_process
from deepsqueeze.training.loop import CHECKPOINT_NAME, FitResult, TrainConfig, fit

RUN_NAME = "run.json"
MODEL_NAME = "model.pt"
MAX_RUN_FILE_BYTES = 1 << 20  # run.json is a few hundred bytes
MAX_SUBSET = 1 << 31

# Recipes that reach the documented baselines (benchmarks/baselines.py measures them).
RECOMMENDED: dict[str, dict[str, Any]] = {
    "lenet300": {"epochs": 20, "lr": 0.1, "weight_decay": 1e-4, "batch_size": 128},
    # Caffe LeNet-5 has no ReLU between its convolutions: lr 0.05 diverges, Caffe used 0.01.
    "lenet5": {"epochs": 12, "lr": 0.01, "weight_decay": 5e-4, "batch_size": 64},
    "lenet5-classic": {"epochs": 15, "lr": 0.02, "weight_decay": 5e-4, "batch_size": 128},
}


@dataclass
class TrainResult:
    """The trained model, its history and where its files are."""

    model: nn.Module
    fit: FitResult
    out_dir: Path | None
    model_path: Path | None
    model_name: str = ""
    dataset: str = ""


def model_kwargs_for(name: str, dataset: ImageDataset, overrides: dict[str, Any]) -> dict[str, Any]:
    """Fill ``in_channels``/``num_classes``/``input_size`` from the dataset where the model
    has them."""
    accepted = set(models.model_info(name).default_kwargs)
    derived = {
        "in_channels": dataset.input_shape[0],
        "num_classes": dataset.num_classes,
        "input_size": dataset.input_shape[1],
        "in_features": dataset.input_shape[0] * dataset.input_shape[1] * dataset.input_shape[2],
    }
    kwargs = {k: v for k, v in derived.items() if k in accepted}
    kwargs.update(overrides)
    return kwargs


def check_fits(model: nn.Module, dataset: ImageDataset) -> None:
    """Raise a clear error when the dataset's images or classes do not fit the model.

    A zoo model's expected input shape comes from its spec; a user's own module (no spec) is run
    once on the dataset's first image instead (:func:`check_forward`)."""
    try:
        models.spec_of(model)
    except ModelError:
        first = dataset.images[:1].to(torch.float32) / 255.0
        check_forward(model, first, f"{dataset.name} images")
        return
    expected = tuple(models.input_shape_of(model))
    if expected != tuple(dataset.input_shape):
        raise ModelError(
            f"model {models.spec_of(model).name} expects inputs of shape {expected} but "
            f"{dataset.name} has images of shape {tuple(dataset.input_shape)}; build the model "
            "for this dataset (train does this for you) or pick a matching dataset"
        )


def check_forward(model: nn.Module, example_inputs: Inputs, where: str) -> None:
    """Run ``model(*example_inputs)`` once (eval mode, no grad) so that a model and data that do
    not fit fail here, clearly, instead of deep in training."""
    xs = as_tuple(example_inputs)
    if not xs or not all(isinstance(x, torch.Tensor) for x in xs):
        raise OptionError(
            f"example_inputs must be a tensor or a tuple of tensors (batch dimension first), got "
            f"{short_repr(example_inputs)}"
        )
    was_training = model.training
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    try:
        with torch.no_grad():
            model(*(x.to(device) for x in xs))
    except Exception as exc:  # any failure of the user's forward is reported
        shapes = ", ".join(f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}" for x in xs)
        detail = " ".join(str(exc).split())[:300]
        raise ModelError(
            f"{type(model).__name__} cannot run on {where} (model(*inputs) with {len(xs)} "
            f"input(s) of shape {shapes}): {type(exc).__name__}: {detail}. A batch is "
            "(inputs, target); inputs is a tensor, or a tuple of tensors for a model whose "
            "forward takes several"
        ) from exc
    finally:
        model.train(was_training)


def _config_from(options: dict[str, Any], model_name: str, source: str = "") -> TrainConfig:
    given = {k: v for k, v in options.items() if v is not None}
    merged = {**RECOMMENDED.get(model_name, {}), **given}
    fields = set(TrainConfig.model_fields)
    unknown = set(merged) - fields
    if unknown:
        raise OptionError(
            f"{source}unknown training options {sorted(unknown)}; known: {sorted(fields)}"
        )
    try:
        return TrainConfig(**merged)
    except OptionError as exc:
        raise OptionError(f"{source}{exc}") from exc


def _read_run_file(path: Path) -> dict[str, Any]:
    """The run folder's ``run.json``, checked: a CheckpointError naming the field otherwise."""
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file; resume a folder written by train")
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_RUN_FILE_BYTES + 1)
        if len(raw) > MAX_RUN_FILE_BYTES:
            raise ValueError(f"larger than {MAX_RUN_FILE_BYTES:,} bytes")
        recorded = json.loads(raw.decode("utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read it ({exc.strerror})") from exc
    except (ValueError, RecursionError) as exc:  # JSON, UTF-8, size
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{path}: damaged, not the JSON train writes ({detail}); start a new --out folder"
        ) from exc
    if not isinstance(recorded, dict):
        raise CheckpointError(f"{path}: must hold a JSON object, got {type(recorded).__name__}")
    expected: dict[str, tuple[type, ...]] = {
        "model": (str,), "dataset": (str,), "subset": (int, type(None)),
        "model_kwargs": (dict, type(None)), "config": (dict,),
    }
    for key, types in expected.items():
        value = recorded.get(key)
        if key in ("model", "dataset", "config") and key not in recorded:
            raise CheckpointError(f"{path}: field {key!r} is missing; start a new --out folder")
        if not isinstance(value, types) or isinstance(value, bool):
            raise CheckpointError(
                f"{path}: field {key!r} must be "
                f"{' or '.join('null' if t is type(None) else t.__name__ for t in types)}, "
                f"got {short_repr(value)}"
            )
    return recorded


def train(
    model: str = "lenet5",
    dataset: str = "mnist",
    *,
    out: str | Path | None = None,
    resume: bool = False,
    epochs: float | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    optimizer: str | None = None,
    weight_decay: float | None = None,
    lr_schedule: str | None = None,
    precision: str | None = None,
    seed: int | None = None,
    device: str | None = None,
    data_dir: str | Path | None = None,
    subset: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train zoo model ``model`` on ``dataset`` and, with ``out``, write a run folder.

    Options left as ``None`` take the model's recommended value (see ``RECOMMENDED``), then the
    ``TrainConfig`` default. ``resume=True`` continues the run in ``out`` from its last epoch
    checkpoint with the options recorded in ``out/run.json`` (``epochs`` may be raised).

    Under ``torchrun`` every process calls ``train`` unchanged: training is data-parallel with
    ``batch_size`` the global batch, only rank 0 writes the run folder (other ranks get
    ``model_path=None``), and ``out`` must be a folder every node sees for ``resume``.
    """
    options = {
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "optimizer": optimizer,
        "weight_decay": weight_decay, "lr_schedule": lr_schedule, "precision": precision,
        "seed": seed, "device": device,
    }
    out_dir = Path(out) if out is not None else None
    run_file = out_dir / RUN_NAME if out_dir is not None else None
    source = ""
    if out_dir is not None:
        check_output_dir(out_dir)  # before any work: a file, or a folder it cannot write
    if resume:
        if run_file is None or not run_file.exists():
            raise DeepSqueezeError(
                f"--resume needs a run folder with {RUN_NAME}; none found in {out_dir}"
            )
        recorded = _read_run_file(run_file)
        model, dataset = recorded["model"], recorded["dataset"]
        subset, model_kwargs = recorded.get("subset"), recorded.get("model_kwargs")
        options = {**recorded["config"], **({"epochs": epochs} if epochs is not None else {})}
        source = f"{run_file} (the options recorded for this run): "
    elif out_dir is not None and (out_dir / CHECKPOINT_NAME).exists():
        raise DeepSqueezeError(
            f"{out_dir} already holds a run; pass --resume to continue it or choose another --out"
        )
    if not isinstance(model, str):
        raise ModelError("train() takes a zoo model name; for your own nn.Module use training.fit")
    models.model_info(model)  # an unknown name fails here, before the data is loaded
    if not isinstance(dataset, str):
        raise OptionError(f"dataset must be a dataset name, got {short_repr(dataset)}")
    cfg = _config_from(options, model, source)
    if subset is not None:
        check_int(f"{source}subset (--subset)", subset, 1, MAX_SUBSET)

    train_set = load_dataset(dataset, "train", data_dir=data_dir)
    test_set = load_dataset(dataset, "test", data_dir=data_dir)
    if subset is not None:
        train_set = train_set.subset(subset, seed=cfg.seed)
    kwargs = model_kwargs_for(model, train_set, model_kwargs or {})
    _seed_everything(cfg.seed)
    net = models.create(model, **kwargs)
    check_fits(net, train_set)

    main = is_main_process()  # under torchrun only rank 0 writes the run folder
    if out_dir is not None and not resume and main:
        with atomic_write(run_file, "w") as handle:
            json.dump({"model": model, "dataset": dataset, "subset": subset,
                       "model_kwargs": model_kwargs, "config": cfg.model_dump()}, handle, indent=2)
    result = fit(net, train_set, cfg, test_set=test_set, out_dir=out_dir, resume=resume,
                 progress=progress, description=f"{model}/{dataset}")
    model_path = None
    if out_dir is not None and main:
        model_path = save_model(
            net.cpu(), out_dir / MODEL_NAME, dataset=dataset,
            metrics=json.dumps({"test_accuracy": result.test_accuracy,
                                "test_loss": result.test_loss,
                                "epochs": result.epochs_completed}),
        )
    return TrainResult(model=net.cpu(), fit=result, out_dir=out_dir, model_path=model_path,
                       model_name=model, dataset=dataset)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


__all__ = [
    "RECOMMENDED", "TrainResult", "check_fits", "check_forward", "model_kwargs_for", "train",
]
