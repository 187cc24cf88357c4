"""``evaluate()``: accuracy, size, compute and speed of a model on a dataset, in one report."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from torch import nn

from deepsqueeze import models
from deepsqueeze.data import load_dataset
from deepsqueeze.metrics.accuracy import accuracy_and_loss
from deepsqueeze.metrics.macs import macs_per_sample
from deepsqueeze.metrics.size import dense_fp32_bytes, file_bytes, nonzero_count, parameter_count
from deepsqueeze.metrics.timing import time_model
from deepsqueeze.training.run import check_fits


@dataclass
class EvalReport:
    """Every number ``evaluate`` measures; ``to_dict`` is what ``--json`` writes."""

    model: str
    dataset: str
    split: str
    samples: int
    top1_accuracy: float
    loss: float
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> Table:
        """The report as a two-column rich table."""
        table = Table(
            title=f"{self.model} on {self.dataset} ({self.split}, {self.samples} samples)"
        )
        table.add_column("metric")
        table.add_column("value", justify="right")
        rows = [
            ("top-1 accuracy", f"{self.top1_accuracy:.2%}"),
            ("loss", f"{self.loss:.4f}"),
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
    dataset: str = "mnist",
    *,
    split: str = "test",
    data_dir: str | Path | None = None,
    subset: int | None = None,
    batch_size: int = 1000,
    measure_speed: bool = True,
    latency_runs: int = 50,
    throughput_batch: int = 256,
    throughput_runs: int = 10,
) -> EvalReport:
    """Evaluate a model object, a model.pt or a .dsq file on ``dataset``/``split`` on the CPU.

    A .dsq file is evaluated as loaded from the file itself: its accuracy is the file's accuracy.
    Counts and sizes out of range raise :class:`OptionError` before any work.
    """
    from deepsqueeze.options import check_int

    check_int("batch_size", batch_size, 1, 1 << 24)
    check_int("latency runs (--runs)", latency_runs, 1, 1_000_000)
    check_int("throughput batch (--throughput-batch)", throughput_batch, 1, 1 << 16)
    check_int("throughput_runs", throughput_runs, 1, 1_000_000)
    if subset is not None:
        check_int("subset (--subset)", subset, 1, 1 << 31)
    path = None
    if isinstance(model, (str, Path)):
        from deepsqueeze.dsq import load_model_or_dsq

        path = Path(model)
        model = load_model_or_dsq(path)
    model = model.cpu().eval()
    data = load_dataset(dataset, split, data_dir=data_dir)
    if subset is not None:
        data = data.subset(subset)
    check_fits(model, data)
    shape = tuple(data.input_shape)
    acc = accuracy_and_loss(model, data.normalized(), data.labels, batch_size)
    latency = throughput = None
    if measure_speed:
        latency = time_model(model, shape, 1, runs=latency_runs)
        throughput = time_model(model, shape, throughput_batch, runs=throughput_runs)
    return EvalReport(
        model=models.spec_of(model).name,
        dataset=dataset,
        split=split,
        samples=acc.samples,
        top1_accuracy=acc.accuracy,
        loss=acc.loss,
        parameters=parameter_count(model),
        nonzero_parameters=nonzero_count(model),
        weights_bytes_fp32=dense_fp32_bytes(model),
        file_bytes=file_bytes(path) if path is not None else None,
        macs_per_sample=macs_per_sample(model, shape),
        latency_ms_median=latency.median_s * 1e3 if latency else None,
        latency_ms_p95=latency.p95_s * 1e3 if latency else None,
        latency_runs=latency.runs if latency else None,
        throughput_samples_per_s=throughput.throughput if throughput else None,
        throughput_batch=throughput_batch if throughput else None,
        torch_threads=torch.get_num_threads(),
    )
