"""Mixed precision: autocast dtype and gradient scaling per device (fp32 master weights)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from deepsqueeze.errors import DeepSqueezeError

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class PrecisionPolicy:
    """How one run computes: the autocast dtype (None: plain fp32) and whether to scale grads."""

    name: str
    autocast_dtype: torch.dtype | None
    grad_scaling: bool

    def autocast(self, device: torch.device) -> torch.autocast:
        """An autocast context for ``device`` (disabled for fp32)."""
        return torch.autocast(
            device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
        )

    def grad_scaler(self, device: torch.device) -> torch.amp.GradScaler:
        """A GradScaler, enabled only where fp16 needs it (a no-op otherwise)."""
        return torch.amp.GradScaler(device.type, enabled=self.grad_scaling)


def resolve_precision(precision: str, device: torch.device) -> PrecisionPolicy:
    """Validate ``precision`` for ``device``: bf16 anywhere, fp16 (+ grad scaling) on CUDA."""
    if precision not in PRECISIONS:
        raise DeepSqueezeError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if precision == "fp32":
        return PrecisionPolicy("fp32", None, False)
    if precision == "bf16":
        return PrecisionPolicy("bf16", torch.bfloat16, False)
    if device.type != "cuda":
        raise DeepSqueezeError(
            "fp16 training needs a CUDA device (fp16 autocast with gradient scaling); "
            "on a CPU use --precision bf16"
        )
    return PrecisionPolicy("fp16", torch.float16, True)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; anything else is passed to torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise DeepSqueezeError(f"unknown device {device!r}: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeepSqueezeError("--device cuda was asked for but no CUDA device is available")
    return dev
