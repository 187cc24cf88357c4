"""Safe, atomic reading and writing of checkpoints and model files.

Every write goes to a temporary file in the destination folder and is renamed into place, so an
interrupted process leaves the previous good file intact. Every read uses
``torch.load(..., weights_only=True)``: files from users never execute code on load.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from deepsqueeze import models
from deepsqueeze.errors import CheckpointError

MODEL_FORMAT = "deepsqueeze-model"
CHECKPOINT_FORMAT = "deepsqueeze-checkpoint"
FORMAT_VERSION = 1


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temp file beside ``path``; on success fsync and rename it over ``path``.

    On any exception the temp file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically."""
    with atomic_write(path) as handle:
        torch.save(obj, handle)


def safe_load(path: str | Path, expected_format: str | None = None) -> dict[str, Any]:
    """Load a torch file with ``weights_only=True`` and check its ``format`` tag.

    Raises :class:`CheckpointError` for a missing file, a pickle that carries code or objects
    beyond tensors and plain containers, or a file of another kind.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: the file holds objects other than tensors and plain "
            f"containers (a pickle payload?). Only weights are loaded from files, never code. "
            f"Detail: {str(exc).splitlines()[0]}"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable torch file ({exc})") from exc
    if not isinstance(obj, dict) or "format" not in obj:
        raise CheckpointError(
            f"{path}: not a deepsqueeze file (no 'format' tag); save models with "
            "deepsqueeze.save_model or `deepsqueeze train`"
        )
    if expected_format is not None and obj["format"] != expected_format:
        raise CheckpointError(f"{path}: is a {obj['format']!r} file, expected {expected_format!r}")
    if obj.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer deepsqueeze; upgrade to read it")
    return obj


def save_model(model: nn.Module, path: str | Path, **extra: Any) -> Path:
    """Save a zoo model (architecture spec + fp32 weights) atomically as a ``.pt`` file."""
    spec = models.spec_of(model)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    atomic_save(
        {
            "format": MODEL_FORMAT,
            "version": FORMAT_VERSION,
            "model_spec": spec.to_dict(),
            "state_dict": state,
            **extra,
        },
        path,
    )
    return Path(path)


def model_from_state(obj: dict[str, Any], source: str | Path) -> nn.Module:
    """Rebuild a zoo model from a loaded model file or checkpoint dict."""
    try:
        spec = models.ModelSpec.from_dict(obj["model_spec"])
        model = models.create(spec.name, **spec.kwargs)
        state = obj["state_dict"] if "state_dict" in obj else obj["model"]
        expected = model.state_dict()
        if any(
            k in expected and tuple(v.shape) != tuple(expected[k].shape) for k, v in state.items()
        ):
            from deepsqueeze.methods.channel_pruning import resize_to_shapes  # channel-pruned

            model = resize_to_shapes(model, state)
        model.load_state_dict(state)
    except (KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{source}: model spec and weights do not fit: {exc}") from exc
    return model


def load_model(path: str | Path) -> nn.Module:
    """Load a model saved by :func:`save_model` (or the model inside a training checkpoint)."""
    obj = safe_load(path)
    if obj["format"] not in (MODEL_FORMAT, CHECKPOINT_FORMAT):
        raise CheckpointError(f"{path}: is a {obj['format']!r} file, not a model")
    model = model_from_state(obj, path)
    model.eval()
    return model
