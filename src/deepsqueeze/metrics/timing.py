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


def time_model(
    model: torch.nn.Module,
    input_shape: tuple[int, ...],
    batch_size: int,
    runs: int = 50,
    warmup: int = 5,
    max_seconds: float = 10.0,
) -> Timing:
    """Time inference of ``model`` on a random batch of ``batch_size`` × ``input_shape``."""
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    x = torch.randn(batch_size, *input_shape, generator=torch.Generator().manual_seed(0)).to(device)

    @torch.inference_mode()
    def run() -> None:
        model(x)

    return time_callable(run, batch_size, runs, warmup, max_seconds)
