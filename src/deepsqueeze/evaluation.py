"""``evaluate()``: accuracy (or the user's metric), size, compute and speed of a model on a
dataset or the user's own data, in one report."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from torch import nn

from deepsqueeze import models
from deepsqueeze.data import load_dataset
from deepsqueeze.data.loaders import DataLike, Inputs, first_inputs, is_data, iter_batches
from deepsqueeze.errors import DeepSqueezeError, ModelError, OptionError
from deepsqueeze.metrics.accuracy import LossFn, Metric, accuracy_and_loss, evaluate_batches
from deepsqueeze.metrics.macs import macs_per_sample
from deepsqueeze.metrics.size import dense_fp32_bytes, file_bytes, nonzero_count, parameter_count
from deepsqueeze.metrics.timing import time_model
from deepsqueeze.options import short_repr
from deepsqueeze.training.run import check_fits, check_forward


class DatasetMismatchWarning(UserWarning):
    """A model file is evaluated on another dataset than the one it records."""


def recorded_data(path: str | Path) -> dict[str, str]:
    """What a .dsq or model.pt file records about its data: ``{"dataset": name}`` for a
    built-in dataset, ``{"data": file name}`` for the user's own; empty when nothing is."""
    path = Path(path)
    if path.suffix == ".dsq":
        from deepsqueeze.dsq import read_model_file

        meta: dict[str, Any] = read_model_file(path).file.meta
    else:
        from deepsqueeze.io import safe_load

        meta = safe_load(path)
    return {k: meta[k] for k in ("dataset", "data") if isinstance(meta.get(k), str)}


def resolve_dataset(path: str | Path, dataset: str | None) -> str:
    """The dataset to evaluate the model file ``path`` on: ``dataset`` when given (with a
    :class:`DatasetMismatchWarning` when the file records another), else the one the file
    records, else ``mnist``. A file made on the user's own data needs that data."""
    from deepsqueeze.data.registry import get_info

    recorded = recorded_data(path)
    if "dataset" in recorded:
        try:
            get_info(recorded["dataset"])
        except DeepSqueezeError:
            if dataset is None:
                raise OptionError(f"{path} records an unknown dataset {recorded['dataset']!r:.80}; "
                                  "pass the dataset to evaluate on (--dataset)") from None
            recorded.pop("dataset")
    if dataset is None:
        if "dataset" in recorded:
            return get_info(recorded["dataset"]).name
        if "data" in recorded:
            raise OptionError(
                f"{path} was made on your own data ({recorded['data']:.200}), not a built-in "
                "dataset: evaluate it on that data (--data FILE, or data= in Python)"
            )
        return "mnist"
    given = get_info(dataset).name
    if "dataset" in recorded and get_info(recorded["dataset"]).name != given:
        warnings.warn(
            f"{path} records dataset {recorded['dataset']:.80}, evaluating on {given} as asked; "
            "the accuracy means little on another dataset (omit --dataset to use the recorded "
            "one)", DatasetMismatchWarning, stacklevel=3)
    elif "data" in recorded:
        warnings.warn(
            f"{path} was made on your own data ({recorded['data']:.200}), evaluating on {given} "
            "as asked", DatasetMismatchWarning, stacklevel=3)
    return given


@dataclass
class EvalReport:
    """Every number ``evaluate`` measures; ``to_dict`` is what ``--json`` writes."""

    model: str
    dataset: str
    split: str
    samples: int
    top1_accuracy: float | None
    loss: float | None
    parameters: int
    nonzero_parameters: int
    weights_bytes_fp32: int
    file_bytes: int | None
    macs_per_sample: int
    latency_ms_median: float | None
    latency_ms_p95: float | None
    latency_runs: int | None
    throughput_samples_per_s: float | None
    throughput_batch: int | None
    torch_threads: int
    metric: float | None = None
    metric_name: str = "accuracy"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> Table:
        """The report as a two-column rich table."""
        table = Table(
            title=f"{self.model} on {self.dataset} ({self.split}, {self.samples} samples)"
        )
        table.add_column("metric")
        table.add_column("value", justify="right")
        rows = []
        if self.top1_accuracy is not None:
            rows.append(("top-1 accuracy", f"{self.top1_accuracy:.2%}"))
        elif self.metric is not None:
            rows.append((self.metric_name, f"{self.metric:.6g}"))
        if self.loss is not None:
            rows.append(("loss", f"{self.loss:.4f}"))
        rows += [
            ("parameters", f"{self.parameters:,}"),
            ("nonzero parameters", f"{self.nonzero_parameters:,}"),
            ("weights bytes (fp32)", f"{self.weights_bytes_fp32:,}"),
        ]
        if self.file_bytes is not None:
            rows.append(("file bytes", f"{self.file_bytes:,}"))
        rows.append(("MACs per sample", f"{self.macs_per_sample:,}"))
        if self.latency_ms_median is not None:
            rows.append(
                (
                    "latency batch 1 (median)",
                    f"{self.latency_ms_median:.3f} ms (p95 {self.latency_ms_p95:.3f}, "
                    f"{self.latency_runs} runs)",
                )
            )
        if self.throughput_samples_per_s is not None:
            rows.append(
                (
                    f"throughput batch {self.throughput_batch}",
                    f"{self.throughput_samples_per_s:,.0f} samples/s",
                )
            )
        rows.append(("torch threads", str(self.torch_threads)))
        for name, value in rows:
            table.add_row(name, value)
        return table


def evaluate(
    model: nn.Module | str | Path,
    dataset: str | None = None,
    *,
    data: DataLike | None = None,
    skeleton: nn.Module | None = None,
    example_inputs: Inputs | None = None,
    metric: Metric | None = None,
    loss_fn: LossFn | None = None,
    split: str = "test",
    data_dir: str | Path | None = None,
    subset: int | None = None,
    batch_size: int = 1000,
    measure_speed: bool = True,
    latency_runs: int = 50,
    throughput_batch: int = 256,
    throughput_runs: int = 10,
) -> EvalReport:
    """Evaluate a model object (any ``nn.Module``), a model.pt or a .dsq file on the CPU.

    Data: built-in ``dataset``/``split``, or the user's own ``data`` (a Dataset of
    ``(inputs, target)``, a DataLoader, a pair ``(X, y)``; inputs a tuple for a model with several
    inputs), scored by ``metric`` (default top-1 accuracy; ``metric(outputs, targets)`` or
    ``metric(model)``) and ``loss_fn`` (default cross-entropy for classifiers).
    ``example_inputs`` (a tensor or a tuple, batch dimension first; default: the first batch of
    the data) drive the MAC count and the latency and throughput batches, so any input shape and
    any number of inputs work.

    A .dsq file is evaluated as loaded from the file itself: its accuracy is the file's accuracy.
    ``skeleton``: an instance of the user's architecture for a file of the user's own model
    (filled with strict name and shape checks; optional when the file holds a zoo model or a
    graph). Without ``dataset`` and ``data`` a file is evaluated on the dataset it records
    (:func:`resolve_dataset`; a :class:`DatasetMismatchWarning` when ``dataset`` differs);
    a model object on ``mnist``.
    Counts and sizes out of range raise :class:`OptionError` before any work.
    """
    from deepsqueeze.options import check_int

    check_int("batch_size", batch_size, 1, 1 << 24)
    check_int("latency runs (--runs)", latency_runs, 1, 1_000_000)
    check_int("throughput batch (--throughput-batch)", throughput_batch, 1, 1 << 16)
    check_int("throughput_runs", throughput_runs, 1, 1_000_000)
    if subset is not None:
        check_int("subset (--subset)", subset, 1, 1 << 31)
    if data is not None and not is_data(data):
        raise OptionError(
            "data= takes a torch Dataset of (inputs, target), a DataLoader, a pair (X, y) or a "
            f"deepsqueeze dataset, got {short_repr(data)}"
        )
    if data is not None and subset is not None:
        raise OptionError("subset applies to built-in datasets; subset your own data yourself")
    path = None
    if isinstance(model, (str, Path)):
        from deepsqueeze.dsq import load_model_or_dsq

        path = Path(model)
        if data is None:
            dataset = resolve_dataset(path, dataset)
        model = load_model_or_dsq(path, model=skeleton)
    if not isinstance(model, nn.Module):
        raise ModelError(f"evaluate() takes an nn.Module or a file path, got {short_repr(model)}")
    model = model.cpu().eval()
    try:
        name = models.spec_of(model).name
    except ModelError:  # a user's model: the class the file records, else the object's
        from deepsqueeze.models.graph import USER_ATTR

        stored = getattr(model, USER_ATTR, None)
        name = getattr(stored, "short_name", None) or type(model).__name__
    if data is None:
        dataset = dataset or "mnist"
        images = load_dataset(dataset, split, data_dir=data_dir)
        if subset is not None:
            images = images.subset(subset)
        check_fits(model, images)
        data_label = dataset
        if loss_fn is None and metric is None:
            acc = accuracy_and_loss(model, images.normalized(), images.labels, batch_size)
            top1, value, loss, samples, metric_name = (
                acc.accuracy, acc.accuracy, acc.loss, acc.samples, "accuracy"
            )
        else:
            scored = evaluate_batches(model, iter_batches(images, batch_size), loss_fn, metric)
            top1 = scored.metric if metric is None else None
            value, loss, samples, metric_name = (
                scored.metric, scored.loss, scored.samples, scored.name
            )
        if example_inputs is None:
            example_inputs = first_inputs(images)
    else:
        data_label, split = "user data", "given"
        if example_inputs is None:
            example_inputs = first_inputs(data)
        check_forward(model, example_inputs, "example_inputs (by default, the data's first batch)")
        scored = evaluate_batches(model, iter_batches(data, batch_size), loss_fn, metric)
        top1 = scored.metric if metric is None else None
        value, loss, samples, metric_name = scored.metric, scored.loss, scored.samples, scored.name
    latency = throughput = None
    if measure_speed:
        latency = time_model(model, None, 1, runs=latency_runs, example_inputs=example_inputs)
        throughput = time_model(model, None, throughput_batch, runs=throughput_runs,
                                example_inputs=example_inputs)
    return EvalReport(
        model=name,
        dataset=data_label,
        split=split,
        samples=samples,
        top1_accuracy=top1,
        loss=loss,
        parameters=parameter_count(model),
        nonzero_parameters=nonzero_count(model),
        weights_bytes_fp32=dense_fp32_bytes(model),
        file_bytes=file_bytes(path) if path is not None else None,
        macs_per_sample=macs_per_sample(model, example_inputs=example_inputs),
        latency_ms_median=latency.median_s * 1e3 if latency else None,
        latency_ms_p95=latency.p95_s * 1e3 if latency else None,
        latency_runs=latency.runs if latency else None,
        throughput_samples_per_s=throughput.throughput if throughput else None,
        throughput_batch=throughput_batch if throughput else None,
        torch_threads=torch.get_num_threads(),
        metric=value,
        metric_name=metric_name,
    )
