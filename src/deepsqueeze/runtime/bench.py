"""``bench``: latency, throughput and memory of a .dsq model on three backends, from one run.

Backends: ``dense`` (the decoded fp32 model in PyTorch), ``runtime`` (:func:`load_runtime`, tuned
for each batch size) and ``onnxruntime`` (the dense model exported to ONNX, CPU provider). At each
batch size the three are timed interleaved — every round calls each backend once, in rotating
order — so load on a shared machine hits all alike; ratios are dense median / backend median.
Peak RSS of each backend is measured in a fresh interpreter (:mod:`deepsqueeze.runtime.memory`).
"""

from __future__ import annotations

import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from deepsqueeze import models
from deepsqueeze.errors import OptionError
from deepsqueeze.options import check_float, check_int
from deepsqueeze.runtime.autotune import cpu_model
from deepsqueeze.runtime.loader import RuntimeInfo, load_runtime, runtime_info
from deepsqueeze.runtime.memory import held_bytes, measure_peak_rss

BACKENDS = ("dense", "runtime", "onnxruntime")
MAX_BATCH = 1 << 16  # inputs of 2^16 samples; a larger batch measures nothing a smaller does not
MAX_RUNS = 1_000_000
MAX_THREADS = 1024
MAX_MEMORY_BUDGET = 1e6


@dataclass
class BackendTiming:
    """One backend at one batch size."""

    backend: str
    batch: int
    median_ms: float
    p95_ms: float
    throughput: float
    speedup_vs_dense: float
    max_abs_diff: float
    runs: int


@dataclass
class BenchReport:
    """Everything ``bench`` measured; ``to_dict`` is what ``--json`` writes."""

    path: str
    model: str
    file_bytes: int
    dense_bytes: int
    threads: int
    cpu: str
    torch_version: str
    onnxruntime_version: str | None
    python: str
    timings: list[BackendTiming] = field(default_factory=list)
    weights_bytes: dict[str, int] = field(default_factory=dict)
    memory: list[dict[str, Any]] = field(default_factory=list)
    runtime: dict[str, Any] = field(default_factory=dict)  # batch -> RuntimeInfo dict
    notes: list[str] = field(default_factory=list)
    runtime_infos: dict[int, RuntimeInfo] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("runtime_infos")
        return d

    def timing(self, backend: str, batch: int) -> BackendTiming | None:
        return next((t for t in self.timings if t.backend == backend and t.batch == batch), None)

    def speed_table(self) -> Table:
        table = Table(title=f"bench {self.path} ({self.model}, {self.threads} threads, "
                      f"{self.timings[0].runs if self.timings else 0} runs)")
        for col in ("batch", "backend", "median ms", "p95 ms", "samples/s", "vs dense",
                    "max |Δ|"):
            table.add_column(col, justify="left" if col == "backend" else "right")
        for t in self.timings:
            table.add_row(str(t.batch), t.backend, f"{t.median_ms:.4f}", f"{t.p95_ms:.4f}",
                          f"{t.throughput:,.0f}", f"{t.speedup_vs_dense:.2f}x",
                          f"{t.max_abs_diff:.1e}")
        return table

    def memory_table(self) -> Table:
        table = Table(title=f"memory (file {self.file_bytes:,} B, dense fp32 "
                      f"{self.dense_bytes:,} B)")
        for col in ("backend", "batch", "weights in memory B", "vs file", "peak RSS MiB",
                    "RSS over baseline MiB"):
            table.add_column(col, justify="left" if col == "backend" else "right")
        rows = self.memory or [{"backend": b, "batch": None} for b in self.weights_bytes]
        for m in rows:
            w = m.get("weights_bytes") or self.weights_bytes.get(m["backend"])
            table.add_row(
                m["backend"], "-" if m.get("batch") is None else str(m["batch"]),
                "-" if w is None else f"{w:,}",
                "-" if w is None else f"{w / self.file_bytes:.2f}x",
                f"{m['peak_kib'] / 1024:.1f}" if "peak_kib" in m else "-",
                f"{m['delta_kib'] / 1024:.1f}" if "delta_kib" in m else "-",
            )
        return table


def _percentile(sorted_s: list[float], q: float) -> float:
    return sorted_s[min(len(sorted_s) - 1, round(q * (len(sorted_s) - 1)))]


def time_interleaved(
    fns: dict[str, Callable[[], object]], runs: int, warmup: int = 5, max_seconds: float = 60.0
) -> dict[str, list[float]]:
    """Seconds of each call; every round calls each function once, order rotating."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    deadline = time.perf_counter() + max_seconds
    for i in range(max(runs, 1)):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - t0)
        if i >= 2 and time.perf_counter() > deadline:
            break
    return samples


def bench(
    path: str | Path,
    batches: Sequence[int] = (1, 32, 256),
    *,
    runs: int = 50,
    threads: int | None = None,
    backends: Sequence[str] = BACKENDS,
    memory: bool = True,
    autotune: bool | None = None,
    memory_budget: float | None = 2.0,
    progress: Callable[[str], None] | None = None,
    model: torch.nn.Module | None = None,
) -> BenchReport:
    """Benchmark ``path`` at each batch size on ``backends`` (see module doc).

    A file of the user's own model loads from its graph, or into ``model`` (an instance of its
    class); its inputs are the ones the file records (floats random, integers zero, so token
    ids stay valid). Peak RSS is measured for zoo models only (the fresh interpreter rebuilds
    the model by name); for a user's model a note says so.

    Raises :class:`OptionError` for a batch size outside 1..``MAX_BATCH``, ``runs`` outside
    1..``MAX_RUNS``, ``threads`` outside 1..``MAX_THREADS``, a ``memory_budget`` that is not a
    number in 0..``MAX_MEMORY_BUDGET`` (0 or None: no limit) or an unknown backend, before any
    work.
    """
    from deepsqueeze.dsq import load

    batches = [check_int("batch size (--batch)", b, 1, MAX_BATCH) for b in batches]
    if not batches:
        raise OptionError("--batch needs at least one batch size")
    check_int("runs (--runs)", runs, 1, MAX_RUNS)
    if threads is not None:
        check_int("threads (--threads)", threads, 1, MAX_THREADS)
    if memory_budget is not None and memory_budget != 0:  # 0 or None: no limit
        check_float("memory budget (--memory-budget, times the file's bytes; 0: no limit)",
                    memory_budget, 0.0, MAX_MEMORY_BUDGET)
    memory_budget = memory_budget or None
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise OptionError(f"unknown backends {unknown}; known: {', '.join(BACKENDS)}")
    say = progress or (lambda _msg: None)
    if threads is not None:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    dense = load(path, model=model)
    zoo = isinstance(getattr(dense, models.registry.SPEC_ATTR, None), models.ModelSpec)
    if zoo:
        shape = tuple(models.input_shape_of(dense))
        model_name = models.spec_of(dense).name
    else:
        from deepsqueeze.models.graph import USER_ATTR

        stored = getattr(dense, USER_ATTR, None)
        if stored is None or stored.inputs is None:
            raise OptionError(f"{path}: the file records no input shapes; save it with "
                              "example_inputs= to benchmark it")
        shape, model_name = (), stored.short_name

    def inputs_for(batch: int) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(batch)
        if zoo:
            return (torch.randn(batch, *shape, generator=gen),)
        return tuple(
            torch.randn(x.shape, generator=gen) if x.is_floating_point() else torch.zeros_like(x)
            for x in stored.example_inputs(batch, device="cpu"))
    ort_version = None
    session = None
    notes: list[str] = []
    tmpdir = tempfile.TemporaryDirectory(prefix="dsq-bench-")
    onnx_path = Path(tmpdir.name) / "model.onnx"
    if "onnxruntime" in backends:
        try:
            import onnxruntime

            from deepsqueeze.runtime.onnx_export import export_onnx, onnx_session

            say("exporting to ONNX")
            export_onnx(dense, onnx_path)
            session = onnx_session(onnx_path, threads=threads)
            ort_version = onnxruntime.__version__
        except Exception as exc:  # missing packages or an unexportable model: say so, go on
            notes.append(f"onnxruntime skipped: {exc}")
            backends = [b for b in backends if b != "onnxruntime"]
    from deepsqueeze.codec.container import read_dsq

    dsq = read_dsq(path)
    report = BenchReport(
        path=str(path),
        model=model_name,
        file_bytes=dsq.file_size,
        dense_bytes=int(dsq.meta.get("dense_parameters", 0)) * 4,
        threads=threads,
        cpu=cpu_model(),
        torch_version=torch.__version__,
        onnxruntime_version=ort_version,
        python=platform.python_version(),
        notes=notes,
    )
    report.weights_bytes["dense"] = held_bytes(dense)
    if session is not None:
        report.weights_bytes["onnxruntime"] = onnx_path.stat().st_size
    try:
        for batch in batches:
            xs = inputs_for(batch)
            fns: dict[str, Callable[[], object]] = {}
            outs: dict[str, torch.Tensor] = {}
            rt = None
            with torch.inference_mode():
                if "dense" in backends or "runtime" in backends:
                    outs["dense"] = dense(*xs)
                if "dense" in backends:
                    fns["dense"] = lambda xs=xs: dense(*xs)
                if "runtime" in backends:
                    say(f"batch {batch}: tuning the runtime")
                    rt = load_runtime(path, batch_size=batch, autotune=autotune,
                                      memory_budget=memory_budget, model=model)
                    info = runtime_info(rt)
                    report.runtime[str(batch)] = info.to_dict()
                    report.runtime_infos[batch] = info
                    report.weights_bytes["runtime"] = info.held_bytes
                    outs["runtime"] = rt(*xs)
                    fns["runtime"] = lambda xs=xs, rt=rt: rt(*xs)
                if session is not None:
                    names = [i.name for i in session.get_inputs()]
                    feed = {n: x.numpy() for n, x in zip(names, xs, strict=True)}
                    outs["onnxruntime"] = torch.from_numpy(session.run(None, feed)[0])
                    fns["onnxruntime"] = lambda feed=feed: session.run(None, feed)
                say(f"batch {batch}: timing {', '.join(fns)}")
                samples = time_interleaved(fns, runs)
            med = {n: statistics.median(s) for n, s in samples.items()}
            base = med.get("dense")
            for name, s in samples.items():
                s = sorted(s)
                diff = (outs[name] - outs["dense"]).abs().max().item() if "dense" in outs else 0.0
                report.timings.append(BackendTiming(
                    backend=name, batch=batch, median_ms=med[name] * 1e3,
                    p95_ms=_percentile(s, 0.95) * 1e3, throughput=batch / med[name],
                    speedup_vs_dense=(base / med[name]) if base else float("nan"),
                    max_abs_diff=diff, runs=len(s),
                ))
            if memory and not zoo:
                if batch == batches[0]:
                    report.notes.append("peak RSS not measured: the fresh interpreter that "
                                        "measures it rebuilds zoo models only")
            elif memory:
                for name in fns:
                    say(f"batch {batch}: peak RSS of {name}")
                    is_rt = name == "runtime" and rt is not None
                    try:
                        report.memory.append(measure_peak_rss(
                            name, path, batch, shape, threads=threads,
                            impls=info.choices() if is_rt else None,
                            fuse=is_rt and any(f["kept"] for f in info.fused),
                            onnx=onnx_path if name == "onnxruntime" else None))
                    except Exception as exc:
                        report.notes.append(f"peak RSS of {name} at batch {batch} failed: {exc}")
    finally:
        tmpdir.cleanup()
    return report
