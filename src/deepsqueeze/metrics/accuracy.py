"""Top-1 accuracy and mean cross-entropy of a classifier on a dataset; a user's own metric and
loss over batches of ``(inputs, target)``."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deepsqueeze.errors import DeepSqueezeError


@dataclass(frozen=True)
class AccuracyResult:
    """Top-1 accuracy (fraction), mean cross-entropy loss and the number of samples."""

    accuracy: float
    loss: float
    samples: int


@torch.inference_mode()
def accuracy_and_loss(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 1000,
    autocast_dtype: torch.dtype | None = None,
) -> AccuracyResult:
    """Evaluate ``model`` on normalized ``inputs`` (N×C×H×W) in eval mode, batch by batch."""
    was_training = model.training
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    correct, loss_sum = 0, 0.0
    try:
        for start in range(0, len(labels), batch_size):
            x = inputs[start : start + batch_size].to(device, non_blocking=True)
            y = labels[start : start + batch_size].to(device, non_blocking=True)
            with torch.autocast(
                device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
            ):
                logits = model(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
    finally:
        model.train(was_training)
    n = len(labels)
    return AccuracyResult(accuracy=correct / max(n, 1), loss=loss_sum / max(n, 1), samples=n)


# --------------------------------------------------------------------------------------------
# A user's own data, loss and metric
# --------------------------------------------------------------------------------------------

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]
"""``loss_fn(model_outputs, target) -> scalar tensor`` (mean over the batch), e.g.
``nn.CrossEntropyLoss()``."""

Metric = Callable[..., float]
"""``metric(outputs, targets) -> float`` on the whole evaluation set (outputs and targets of
every batch concatenated), or ``metric(model) -> float`` (the user evaluates)."""


@dataclass(frozen=True)
class MetricResult:
    """The metric (higher is better), the mean loss and the number of samples evaluated."""

    metric: float
    loss: float | None
    samples: int
    name: str = "accuracy"


def metric_arity(metric: Metric) -> int:
    """1 for ``metric(model)``, 2 for ``metric(outputs, targets)``; DeepSqueezeError otherwise."""
    try:
        params = inspect.signature(metric).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: assume (outputs, targets)
        return 2
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    if any(p.kind == p.VAR_POSITIONAL for p in params) or len(required) == 2 or (
        len(required) < 2 <= len(positional)
    ):
        return 2
    if len(required) == 1:
        return 1
    raise DeepSqueezeError(
        f"metric {getattr(metric, '__name__', metric)!r} takes {len(required)} required "
        "arguments; give metric(outputs, targets) -> float or metric(model) -> float"
    )


def top1(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy of logits ``outputs`` (N, C) against class indices ``targets`` (N)."""
    if not is_classification(outputs, targets):
        raise DeepSqueezeError(
            f"the default metric is top-1 accuracy, for outputs (N, classes) and integer class "
            f"targets (N,); the model gives {_describe(outputs)} for targets "
            f"{_describe(targets)}: pass metric=(outputs, targets) -> float (e.g. a negative "
            "mean squared error) or metric=(model) -> float"
        )
    return float((outputs.argmax(1) == targets).double().mean()) if len(targets) else 0.0


def is_classification(outputs: Any, targets: torch.Tensor) -> bool:
    """Logits (N, C) and integer class indices (N,)."""
    return (
        isinstance(outputs, torch.Tensor) and outputs.dim() == 2
        and targets.dim() == 1 and not torch.is_floating_point(targets)
        and not targets.is_complex() and targets.dtype != torch.bool
    )


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _cat(parts: list[Any], what: str) -> Any:
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat([p if p.dim() else p.view(1) for p in parts])
    if all(isinstance(p, tuple) for p in parts):
        return tuple(_cat(list(col), what) for col in zip(*parts, strict=True))
    raise DeepSqueezeError(
        f"cannot gather the model's {what} over batches (got {_describe(parts[0])}); "
        "pass metric=(model) -> float to evaluate such a model yourself"
    )


@torch.inference_mode()
def evaluate_batches(
    model: nn.Module,
    batches: Iterable[tuple[Any, torch.Tensor]],
    loss_fn: LossFn | None = None,
    metric: Metric | None = None,
) -> MetricResult:
    """``metric`` and mean ``loss_fn`` of ``model`` (eval mode) over ``(inputs, target)``
    batches; inputs a tensor or a tuple of tensors (``model(*inputs)``).

    ``metric=None`` is top-1 accuracy (classification outputs only), ``loss_fn=None``
    cross-entropy for classification (no loss otherwise). A ``metric(model)`` is called once
    and the batches are not read.
    """
    if metric is not None and metric_arity(metric) == 1:
        value = metric(model)
        return MetricResult(_as_float(value, metric), None, 0, _name(metric))
    was_training = model.training
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    outputs_all: list[Any] = []
    targets_all: list[torch.Tensor] = []
    loss_sum, samples, classify = 0.0, 0, True
    try:
        for inputs, target in batches:
            xs = inputs if isinstance(inputs, tuple) else (inputs,)
            out = model(*(x.to(device, non_blocking=True) for x in xs))
            y = target.to(device, non_blocking=True)
            n = int(y.shape[0]) if y.dim() else 1
            classify = classify and is_classification(out, y)
            if loss_fn is not None:
                loss_sum += float(loss_fn(out, y)) * n
            elif classify:
                loss_sum += F.cross_entropy(out.float(), y, reduction="sum").item()
            samples += n
            outputs_all.append(_detach(out))
            targets_all.append(y.detach().cpu())
    finally:
        model.train(was_training)
    if samples == 0:
        raise DeepSqueezeError("the evaluation data holds no samples")
    outputs, targets = _cat(outputs_all, "outputs"), _cat(targets_all, "targets")
    value = top1(outputs, targets) if metric is None else _as_float(metric(outputs, targets),
                                                                    metric)
    loss = loss_sum / samples if (loss_fn is not None or classify) else None
    return MetricResult(value, loss, samples, "accuracy" if metric is None else _name(metric))


def _detach(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.detach().float().cpu() if torch.is_floating_point(out) else out.detach().cpu()
    if isinstance(out, (tuple, list)):
        return tuple(_detach(o) for o in out)
    return out


def _name(metric: Metric) -> str:
    return str(getattr(metric, "__name__", type(metric).__name__))


def _as_float(value: Any, metric: Metric) -> float:
    try:
        result = float(value)
    except (TypeError, ValueError) as exc:
        raise DeepSqueezeError(
            f"metric {_name(metric)!r} returned {_describe(value)}; it must return a number"
        ) from exc
    if result != result:  # NaN
        raise DeepSqueezeError(f"metric {_name(metric)!r} returned NaN")
    return result
