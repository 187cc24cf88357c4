"""Runtime latency of a model and of each of its layers, for ``plan --target-latency``.

The model is saved as a real .dsq file and loaded with :func:`deepsqueeze.runtime.load_runtime`
tuned for the batch size, so a layer runs on the executor the runtime really picks for its
compressed form (sparse kernel, codebook, factorized, binary, int8, ...). Each swept layer's
runtime module is then timed alone on its real input shape (captured by a hook during one
whole-model call), interleaved rounds, median (:func:`deepsqueeze.runtime.autotune.time_modules`);
the whole model is timed the same way. Layer fusion is off while measuring layers (a fused chain
has no per-layer time); the planner's final check times the file as it really loads (fused).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepsqueeze.errors import DeepSqueezeError


def example_batch(data: Any, batch_size: int) -> torch.Tensor:
    """``batch_size`` normalized samples of an :class:`~deepsqueeze.data.ImageDataset`
    (repeated when it holds fewer)."""
    x = data.normalized()
    if len(x) == 0:
        raise DeepSqueezeError("no samples to time the model on")
    reps = -(-batch_size // len(x))
    return x.repeat(reps, *([1] * (x.dim() - 1)))[:batch_size].contiguous()


def file_latency_us(path: str | Path, x: torch.Tensor, *, fuse: bool = True,
                    rounds: int = 15) -> float:
    """Median microseconds of one call of the .dsq file at ``path`` in the runtime on ``x``."""
    from deepsqueeze.runtime import load_runtime
    from deepsqueeze.runtime.autotune import time_modules

    runtime = load_runtime(path, batch_size=len(x), fuse=fuse)
    return 1e6 * time_modules({"model": runtime}, x, rounds=rounds)["model"]


def runtime_latency(model: nn.Module, layers: Sequence[str], x: torch.Tensor, *,
                    rounds: int = 15, whole: bool = True, disposable: bool = False
                    ) -> tuple[dict[str, float], float | None]:
    """``({layer: microseconds}, whole-model microseconds or None without ``whole``)`` of
    ``model`` (any state a recipe stage leaves: masks and codebooks are baked first) in the
    runtime on ``x``. ``disposable``: bake ``model`` itself instead of a copy (a deep copy of
    a parametrized model shares its parametrized classes, and baking that copy breaks it)."""
    from deepsqueeze.dsq import save
    from deepsqueeze.pipeline.session import bake
    from deepsqueeze.runtime import load_runtime
    from deepsqueeze.runtime.autotune import time_modules

    work = (model if disposable else copy.deepcopy(model)).cpu().eval()
    bake(work)
    with tempfile.TemporaryDirectory(prefix="dsq-latency-") as tmp:
        path = Path(tmp) / "model.dsq"
        save(work, path)
        runtime = load_runtime(path, batch_size=len(x), fuse=False)
    inputs: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Any:
        def hook(_mod: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor):
                inputs[name] = args[0].detach().clone()
        return hook

    handles = [runtime.get_submodule(name).register_forward_pre_hook(keep(name))
               for name in layers]
    try:
        with torch.inference_mode():
            runtime(x)
    finally:
        for h in handles:
            h.remove()
    missing = [name for name in layers if name not in inputs]
    if missing:
        raise DeepSqueezeError(f"layers {missing} did not run in the runtime model")
    per_layer = {name: 1e6 * time_modules({name: runtime.get_submodule(name)}, inputs[name],
                                          rounds=rounds)[name] for name in layers}
    if not whole:
        return per_layer, None
    return per_layer, 1e6 * time_modules({"model": runtime}, x, rounds=rounds)["model"]
