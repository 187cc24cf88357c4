"""Sensitivity: each layer alone, at each setting of each method; accuracy and real bytes.

For every (layer, option) a copy of the model gets the option on that one layer only (through
the method's own ``apply``/``finalize``, as a recipe stage would, no fine-tuning); its top-1
accuracy is measured on the validation split and its bytes are the real encoded bytes of the
tensors it changed (each through the codec's smallest lossless encoding, as ``save`` writes
them). A method that also changes other layers (channel pruning shrinks the next layer's
inputs) has that change recorded apart (``other_bytes``): a point's ``bytes`` are the layer's
own tensors.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from torch import nn

from deepsqueeze.analysis.sweeps import (
    SWEEPS,
    Option,
    Sweep,
    apply_option,
    available_sweeps,
    layer_options,
    sweepable_layers,
)
from deepsqueeze.codec.options import EncodeOptions
from deepsqueeze.codec.tensor import encode_tensor
from deepsqueeze.data import ImageDataset
from deepsqueeze.errors import DeepSqueezeError, OptionError
from deepsqueeze.metrics.accuracy import accuracy_and_loss
from deepsqueeze.models.state import plain_state


class TensorBytes:
    """Encoded bytes of a model's tensors, with the dense model's as the reference: a tensor
    equal to the reference's is not encoded again."""

    def __init__(self, model: nn.Module, encode: EncodeOptions | None = None) -> None:
        self.encode = encode or EncodeOptions()
        state, _ = plain_state(model)
        self.reference = state
        self.bytes = {k: self._encode(k, v) for k, v in state.items()}

    def _encode(self, name: str, tensor: torch.Tensor) -> int:
        o = self.encode
        return encode_tensor(name, tensor, huffman=o.huffman, ans=o.ans, index_bits=o.index_bits,
                             codebook_dtype=o.codebook_dtype, dense_dtype=o.dense_dtype).nbytes

    def layer(self, layer: str) -> int:
        """Dense encoded bytes of ``layer``'s tensors."""
        return sum(b for k, b in self.bytes.items() if k.startswith(f"{layer}."))

    def measure(self, model: nn.Module, layer: str) -> tuple[int, int]:
        """``(bytes of layer's tensors, change of every other tensor's bytes)`` of ``model``
        against the reference (the second is nonzero when a method also changed a neighbour,
        e.g. channel pruning shrinking the next layer's inputs)."""
        state, _ = plain_state(model)
        own = other = 0
        for key, tensor in state.items():
            ref = self.reference.get(key)
            same = (ref is not None and ref.shape == tensor.shape and ref.dtype == tensor.dtype
                    and torch.equal(ref, tensor))
            nbytes = self.bytes[key] if same else self._encode(key, tensor)
            if key.startswith(f"{layer}."):
                own += nbytes
            else:
                other += nbytes - self.bytes.get(key, 0)
        removed = [k for k in self.reference if k not in state and not k.startswith(f"{layer}.")]
        other -= sum(self.bytes[k] for k in removed)
        return own, other


@dataclass
class Point:
    """One layer at one option: validation accuracy, its drop in points, and real bytes."""

    layer: str
    option: list[dict[str, Any]]
    label: str
    accuracy: float | None
    drop_points: float | None
    bytes: int | None
    dense_bytes: int
    seconds: float
    error: str | None = None
    other_bytes: int = 0
    """Change of the other layers' bytes (channel pruning shrinks its consumers): a point
    with a nonzero change is not additive across layers, so the planner leaves it out."""
    latency_us: float | None = None
    """The layer's runtime latency at the plan's batch size (measured only for
    ``--target-latency``; :mod:`.latency`)."""
    loss_increase: float | None = None
    """Validation cross-entropy minus the baseline's: a smooth measure of the harm that, unlike
    the accuracy drop, does not read 0 for every option below one sample's worth of
    accuracy (the planner sums it across layers)."""

    @property
    def method(self) -> str:
        return "+".join(step["method"] for step in self.option)


@dataclass
class SensitivityResult:
    """Every point of a sweep, the baseline, and where it was measured."""

    model: str
    dataset: str
    val_samples: int
    baseline_accuracy: float
    layers: list[str]
    dense_layer_bytes: dict[str, int]
    points: list[Point] = field(default_factory=list)
    seconds: float = 0.0
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for p, obj in zip(d["points"], self.points, strict=True):
            p["method"] = obj.method
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SensitivityResult:
        points = [Point(**{k: v for k, v in p.items() if k != "method"})
                  for p in data.get("points", [])]
        fields = {k: v for k, v in data.items() if k != "points"}
        return cls(**fields, points=points)

    def curve(self, method: str, layer: str) -> list[Point]:
        """The measured points of one method (or chain, ``prune+share``) on one layer."""
        return [p for p in self.points if p.layer == layer and p.method == method
                and p.error is None]

    def methods(self) -> list[str]:
        return list(dict.fromkeys(p.method for p in self.points))

    def table(self) -> Table:
        table = Table(title=f"sensitivity of {self.model} on the {self.dataset} validation split "
                            f"({self.val_samples} samples, baseline {self.baseline_accuracy:.2%})")
        for col in ("layer", "option", "accuracy", "drop (points)", "bytes", "layer ratio",
                    "other layers"):
            table.add_column(col, justify="left" if col in ("layer", "option") else "right")
        for p in self.points:
            if p.error is not None:
                table.add_row(p.layer, p.label, "-", "-", "-", f"not applicable: {p.error}"[:60],
                              "-")
                continue
            assert p.accuracy is not None and p.bytes is not None and p.drop_points is not None
            ratio = p.dense_bytes / p.bytes if p.bytes > 0 else math.inf
            table.add_row(p.layer, p.label, f"{p.accuracy:.2%}", f"{p.drop_points:+.2f}",
                          f"{p.bytes:,}", f"{ratio:.1f}x",
                          f"{p.other_bytes:+,}" if p.other_bytes else "")
        return table

    def plot(self, path: str | Path) -> Path:
        """Per method: validation accuracy and the layer's bytes against the setting, one line
        per layer (PNG)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        methods = [m for m in self.methods() if "+" not in m]
        if not methods:
            methods = self.methods()
        ncols = min(4, len(methods))
        nrows = -(-len(methods) // ncols)
        fig, axes = plt.subplots(2 * nrows, ncols, figsize=(4.2 * ncols, 5.6 * nrows),
                                 squeeze=False)
        for index in range(len(methods), nrows * ncols):  # empty slots of the last row
            axes[2 * (index // ncols)][index % ncols].set_visible(False)
            axes[2 * (index // ncols) + 1][index % ncols].set_visible(False)
        for index, method in enumerate(methods):
            row, col = 2 * (index // ncols), index % ncols
            top, bottom = axes[row][col], axes[row + 1][col]
            for layer in self.layers:
                pts = self.curve(method, layer)
                if not pts:
                    continue
                xs = [_setting_text(p) for p in pts]
                top.plot(xs, [100 * (p.accuracy or 0) for p in pts], marker="o", label=layer)
                bottom.plot(xs, [p.bytes for p in pts], marker="o", label=layer)
            knob = SWEEPS[method].knob if method in SWEEPS else None
            top.set_title(method)
            top.axhline(100 * self.baseline_accuracy, color="grey", lw=0.8, ls="--")
            top.set_ylabel("validation top-1 (%)")
            bottom.set_yscale("log")
            bottom.set_ylabel("layer bytes (encoded)")
            bottom.set_xlabel(knob or "setting")
            top.legend(fontsize=7)
        fig.suptitle(f"{self.model}: each layer alone ({self.dataset} validation split)")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _setting_text(p: Point) -> str:
    v = p.option[-1]["setting"]
    return f"{v:g}" if isinstance(v, float) else str(v)


def measure(
    model: nn.Module,
    val: ImageDataset,
    layers: Sequence[str],
    options: Sequence[Option],
    *,
    baseline: float | None = None,
    encode: EncodeOptions | None = None,
    progress: Callable[[str], None] | None = None,
    bytes_cache: TensorBytes | None = None,
    latency_input: torch.Tensor | None = None,
) -> tuple[float, dict[str, int], list[Point]]:
    """``(baseline accuracy, dense bytes per layer, points)`` of every option on every layer
    (each alone, on a copy of ``model``); with ``latency_input`` (a batch) each point's layer
    is also timed in the runtime (:func:`.latency.runtime_latency`)."""
    model = model.cpu().eval()
    x, y = val.normalized(), val.labels
    scored = accuracy_and_loss(model, x, y)
    if baseline is None:
        baseline = scored.accuracy
    ref = bytes_cache or TensorBytes(model, encode)
    dense = {layer: ref.layer(layer) for layer in layers}
    points: list[Point] = []
    for i, layer in enumerate(layers):
        if progress is not None:
            progress(f"layer {i + 1}/{len(layers)} {layer}: {len(options)} options")
        for option in options:
            t0 = time.perf_counter()
            work = copy.deepcopy(model)
            try:
                apply_option(work, layer, option)
            except DeepSqueezeError as exc:  # the method cannot handle this layer: say why
                points.append(Point(layer, option.to_dict(), option.label, None, None, None,
                                    dense[layer], time.perf_counter() - t0, str(exc)[:300]))
                continue
            got = accuracy_and_loss(work.eval(), x, y)
            nbytes, other = ref.measure(work, layer)
            latency = None
            if latency_input is not None:
                from deepsqueeze.analysis.latency import runtime_latency

                latency = runtime_latency(work, [layer], latency_input, whole=False,
                                          disposable=True)[0][layer]
            points.append(Point(layer, option.to_dict(), option.label, got.accuracy,
                                100 * (baseline - got.accuracy), nbytes, dense[layer],
                                time.perf_counter() - t0, other_bytes=other,
                                loss_increase=got.loss - scored.loss, latency_us=latency))
    return baseline, dense, points


def sensitivity(
    model: nn.Module,
    val: ImageDataset,
    methods: Sequence[str] | None = None,
    *,
    layers: Sequence[str] | None = None,
    chains: bool = False,
    model_name: str = "model",
    encode: EncodeOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> SensitivityResult:
    """Sweep each of ``layers`` (default: every Linear/Conv2d) alone through each method of
    ``methods`` (default: every registered method of the sweep table); ``chains`` adds the
    two-step options (prune → share, prune → quantize)."""
    t0 = time.perf_counter()
    sweeps: dict[str, Sweep] = available_sweeps(methods)
    all_layers = sweepable_layers(model)
    if layers is None:
        chosen = all_layers
    else:
        unknown = [name for name in layers if name not in all_layers]
        if unknown:
            raise OptionError(f"unknown layers {unknown}; sweepable layers: {all_layers}")
        chosen = list(layers)
    if not chosen:
        raise OptionError(f"{model_name} has no Linear or Conv2d layer to sweep")
    options = layer_options(sweeps, chains=chains)
    base, dense, points = measure(model, val, chosen, options, encode=encode, progress=progress)
    return SensitivityResult(
        model=model_name, dataset=val.name, val_samples=len(val), baseline_accuracy=base,
        layers=chosen, dense_layer_bytes=dense, points=points,
        seconds=time.perf_counter() - t0,
        settings={name: {"knob": s.knob, "settings": list(s.settings), "label": s.label}
                  for name, s in sweeps.items()},
    )
