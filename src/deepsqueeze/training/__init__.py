"""Training: the loop (``fit``), mixed precision, and ``train()`` for zoo models."""

from deepsqueeze.training.loop import FitResult, StepHook, TrainConfig, epoch_order, fit
from deepsqueeze.training.precision import PrecisionPolicy, resolve_device, resolve_precision
from deepsqueeze.training.run import RECOMMENDED, TrainResult, check_fits, model_kwargs_for, train

__all__ = [
    "RECOMMENDED", "FitResult", "PrecisionPolicy", "StepHook", "TrainConfig", "TrainResult",
    "check_fits", "epoch_order", "fit", "model_kwargs_for", "resolve_device", "resolve_precision",
    "train",
]
