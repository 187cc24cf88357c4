"""Latency and throughput: wall-clock medians over repeated runs after a warm-up."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    """Seconds per call over ``runs`` timed calls: median and 95th percentile."""

    median_s: float
    p95_s: float
    runs: int
    batch_size: int

    @property
    def throughput(self) -> float:
        """Samples per second at the median."""
        return self.batch_size / self.median_s


def time_callable(
    fn: Callable[[], object],
    batch_size: int,
    runs: int = 50,
    warmup: int = 5,
    max_seconds: float = 10.0,
) -> Timing:
    """Time ``fn`` ``runs`` times after ``warmup`` calls (stops early after ``max_seconds``)."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    budget_end = time.perf_counter() + max_seconds
    for _ in range(max(runs, 1)):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
        if time.perf_counter() > budget_end and len(samples) >= 3:
            break
    samples.sort()
    p95 = samples[min(len(samples) - 1, round(0.95 * (len(samples) - 1)))]
    return Timing(statistics.median(samples), p95, len(samples), batch_size)


def example_batch(
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...], batch_size: int
) -> tuple[torch.Tensor, ...]:
    """A batch of ``batch_size`` samples built from ``example_inputs`` (a tensor or a tuple,
    batch dimension first): its samples repeated in turn, so values (token ids, say) stay valid."""
    xs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    out = []
    for x in xs:
        if x.dim() == 0 or len(x) == 0:
            raise ValueError("example_inputs need a batch dimension with at least one sample")
        reps = -(-batch_size // len(x))
        out.append(x.repeat(reps, *([1] * (x.dim() - 1)))[:batch_size].contiguous())
    return tuple(out)


def time_model(
    model: torch.nn.Module,
    input_shape: tuple[int, ...] | None,
    batch_size: int,
    runs: int = 50,
    warmup: int = 5,
    max_seconds: float = 10.0,
    *,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
) -> Timing:
    """Time inference of ``model`` on a batch of ``batch_size`` samples: random normal samples of
    ``input_shape`` (no batch dimension), or ``example_inputs``' samples repeated (any shape,
    any number of inputs: ``model(*inputs)``)."""
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    if example_inputs is not None:
        xs = tuple(x.to(device) for x in example_batch(example_inputs, batch_size))
    else:
        if input_shape is None:
            raise ValueError("give input_shape or example_inputs")
        gen = torch.Generator().manual_seed(0)
        xs = (torch.randn(batch_size, *input_shape, generator=gen).to(device),)

    @torch.inference_mode()
    def run() -> None:
        model(*xs)

    return time_callable(run, batch_size, runs, warmup, max_seconds)
