"""``pareto``: a grid across methods; validation accuracy against file bytes and latency.

Each grid point applies one option to every Linear/Conv2d layer that takes it (a recipe built
by :func:`~deepsqueeze.analysis.planner.build_recipe`, run by ``compress`` with optional short
fine-tuning on the training part), saves the .dsq file and measures the file itself: its bytes
on disk, its top-1 accuracy on the validation split, and its batch-1 latency (median and p95)
in the runtime (:func:`deepsqueeze.runtime.load_runtime`, which runs from the compressed form).
The frontier holds the points no other point beats on both axes.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from deepsqueeze.analysis.planner import Finetune, build_recipe
from deepsqueeze.analysis.sweeps import (
    CHAINS,
    Option,
    apply_option,
    available_sweeps,
    sweepable_layers,
)
from deepsqueeze.data import ImageDataset
from deepsqueeze.errors import DeepSqueezeError
from deepsqueeze.metrics.accuracy import accuracy_and_loss
from deepsqueeze.metrics.size import FP32_BYTES, parameter_count
from deepsqueeze.metrics.timing import time_model

PARETO_CHAIN_SETTINGS: dict[str, tuple[Any, ...]] = {
    "prune": (0.9, 0.95, 0.98), "share": (5, 4, 3), "quantize": (8, 4),
}
"""The chains' settings in a Pareto grid (a coarse grid: the planner searches finer)."""


@dataclass
class GridPoint:
    """One compressed file of the grid."""

    label: str
    method: str
    option: list[dict[str, Any]]
    layers: list[str]
    file_bytes: int | None = None
    compression: float | None = None
    val_accuracy: float | None = None
    latency_ms_p50: float | None = None
    latency_ms_p95: float | None = None
    seconds: float = 0.0
    error: str | None = None
    on_bytes_front: bool = False
    on_latency_front: bool = False


@dataclass
class ParetoResult:
    """The grid, the dense reference, and both frontiers."""

    model: str
    dataset: str
    val_samples: int
    dense_bytes: int
    dense_file_bytes: int
    dense_val_accuracy: float
    dense_latency_ms_p50: float
    finetune_epochs: float
    points: list[GridPoint] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParetoResult:
        names = set(cls.__dataclass_fields__)
        fields = {k: v for k, v in data.items() if k in names and k != "points"}
        return cls(**fields, points=[GridPoint(**p) for p in data.get("points", [])])

    def plot(self, path: str | Path) -> Path:
        """Accuracy against file bytes (log) and against batch-1 runtime latency, one colour per
        method, frontiers drawn as steps (PNG)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ok = [p for p in self.points if p.error is None]
        methods = list(dict.fromkeys(p.method for p in ok))
        cmap = plt.get_cmap("tab10")
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
        for ax, attr, front, xlabel in (
            (axes[0], "file_bytes", "on_bytes_front", "file bytes (log scale)"),
            (axes[1], "latency_ms_p50", "on_latency_front",
             "runtime latency, batch 1, median (ms)"),
        ):
            for i, method in enumerate(methods):
                pts = [p for p in ok if p.method == method]
                ax.scatter([getattr(p, attr) for p in pts],
                           [100 * (p.val_accuracy or 0) for p in pts],
                           color=cmap(i % 10), label=method, s=28)
            fr = sorted((p for p in ok if getattr(p, front)), key=lambda p: getattr(p, attr))
            if fr:
                ax.step([getattr(p, attr) for p in fr], [100 * (p.val_accuracy or 0) for p in fr],
                        where="post", color="black", lw=1.2, label="frontier")
            dense_x = self.dense_file_bytes if attr == "file_bytes" else self.dense_latency_ms_p50
            ax.scatter([dense_x], [100 * self.dense_val_accuracy], marker="*", s=160,
                       color="black", label="dense")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("validation top-1 (%)")
            lo = min([100 * (p.val_accuracy or 0) for p in ok] + [100 * self.dense_val_accuracy])
            floor = max(lo - 2, 100 * self.dense_val_accuracy - 30)
            ax.set_ylim(floor, 100 * self.dense_val_accuracy + 2)
            below = sum(100 * (p.val_accuracy or 0) < floor for p in ok)
            if below:
                ax.set_title(f"{below} point(s) below {floor:.0f}% not shown (in the JSON)",
                             fontsize=8)
            if attr == "file_bytes":
                ax.set_xscale("log")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7, ncol=2)
        tune = (f"{self.finetune_epochs:g} epoch fine-tuning" if self.finetune_epochs
                else "no fine-tuning")
        fig.suptitle(f"{self.model} on {self.dataset}: every method, every layer, {tune} "
                     f"(validation split, {self.val_samples} samples)")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def mark_front(points: list[GridPoint], attr: str, flag: str) -> None:
    """Set ``flag`` on the points no other point beats: fewer-or-equal ``attr`` and higher
    accuracy."""
    ok = sorted((p for p in points if p.error is None),
                key=lambda p: (getattr(p, attr), -(p.val_accuracy or 0)))
    best = -1.0
    for p in ok:
        if (p.val_accuracy or 0) > best:
            setattr(p, flag, True)
            best = p.val_accuracy or 0


def grid_options(methods: Sequence[str] | None = None, chains: bool = True) -> list[Option]:
    """Every setting of every method of ``methods`` (default: all registered) and the coarse
    chains."""
    sweeps = available_sweeps(methods)
    options = [Option(((name, v),)) for name, s in sweeps.items() for v in s.settings]
    if chains:
        for first, second in CHAINS:
            if first in sweeps and second in sweeps:
                options += [Option(((first, a), (second, b)))
                            for a in PARETO_CHAIN_SETTINGS[first]
                            for b in PARETO_CHAIN_SETTINGS[second]]
    return options


def _latency(path: Path, example: Any) -> tuple[float, float]:
    from deepsqueeze.runtime import load_runtime

    rt = load_runtime(path, batch_size=1)
    t = time_model(rt, None, 1, runs=30, warmup=3, max_seconds=3.0, example_inputs=example)
    return t.median_s * 1e3, t.p95_s * 1e3


def pareto(
    model: nn.Module,
    val: ImageDataset,
    *,
    fit_data: ImageDataset | None = None,
    methods: Sequence[str] | None = None,
    options: Sequence[Option] | None = None,
    finetune_epochs: float = 0.0,
    model_name: str = "model",
    dataset: str | None = None,
    keep_files: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> ParetoResult:
    """Run the grid (``options``, default :func:`grid_options` of ``methods``) on ``model``;
    each point's layers are those the option applies to (checked on a copy, one layer at a
    time). ``finetune_epochs`` > 0 fine-tunes each point on ``fit_data``."""
    from deepsqueeze.dsq import save
    from deepsqueeze.pipeline import compress

    t_start = time.perf_counter()
    say = progress or (lambda _m: None)
    if finetune_epochs > 0 and fit_data is None:
        raise DeepSqueezeError("fine-tuning the grid needs the training data (fit_data)")
    model = copy.deepcopy(model).cpu().eval()
    options = list(options) if options is not None else grid_options(methods)
    layers = sweepable_layers(model)
    x, y = val.normalized(), val.labels
    example = x[:1]
    tmp = tempfile.TemporaryDirectory(prefix="dsq-pareto-")
    where = Path(keep_files) if keep_files is not None else Path(tmp.name)
    where.mkdir(parents=True, exist_ok=True)
    try:
        dense_path = where / "dense.dsq"
        save(copy.deepcopy(model), dense_path)
        dense_p50, _ = _latency(dense_path, example)
        result = ParetoResult(
            model=model_name, dataset=val.name, val_samples=len(val),
            dense_bytes=parameter_count(model) * FP32_BYTES,
            dense_file_bytes=dense_path.stat().st_size,
            dense_val_accuracy=accuracy_and_loss(model, x, y).accuracy,
            dense_latency_ms_p50=dense_p50, finetune_epochs=finetune_epochs,
        )
        for i, option in enumerate(options):
            t0 = time.perf_counter()
            method = "+".join(m for m, _ in option.steps)
            usable = []
            for layer in layers:
                try:
                    apply_option(copy.deepcopy(model), layer, option)
                    usable.append(layer)
                except DeepSqueezeError:
                    continue
            point = GridPoint(option.label, method, option.to_dict(), usable)
            result.points.append(point)
            if not usable:
                point.error = "no layer of this model takes this option"
                continue
            recipe = build_recipe(dict.fromkeys(usable, option), model=None, dataset=dataset,
                                  finetune=Finetune(epochs=finetune_epochs),
                                  train_samples=len(fit_data) if fit_data is not None else 1)
            path = where / f"point-{i:03d}.dsq"
            try:
                res = compress(copy.deepcopy(model), recipe, train_data=fit_data,
                               eval_data=val, out=path, progress=False,
                               extra_meta={"dataset": dataset} if dataset else None)
                point.file_bytes = path.stat().st_size
                point.compression = result.dense_bytes / point.file_bytes
                point.val_accuracy = res.file_accuracy
                point.latency_ms_p50, point.latency_ms_p95 = _latency(path, example)
            except DeepSqueezeError as exc:
                point.error = str(exc)[:300]
            point.seconds = time.perf_counter() - t0
            say(f"{i + 1}/{len(options)} {option.label}: "
                + (point.error or f"{point.file_bytes:,} B, {point.val_accuracy:.2%}, "
                   f"{point.latency_ms_p50:.3f} ms"))
    finally:
        tmp.cleanup()
    mark_front(result.points, "file_bytes", "on_bytes_front")
    mark_front(result.points, "latency_ms_p50", "on_latency_front")
    result.seconds = time.perf_counter() - t_start
    return result
