"""Safe, atomic reading and writing of checkpoints and model files.

Every write goes to a temporary file in the destination folder and is renamed into place, so an
interrupted process leaves the previous good file intact. Every read uses
``torch.load(..., weights_only=True)``: files from users never execute code on load.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import secrets
import stat
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from deepsqueeze import models
from deepsqueeze.errors import CheckpointError, ModelError

MODEL_FORMAT = "deepsqueeze-model"
CHECKPOINT_FORMAT = "deepsqueeze-checkpoint"
FORMAT_VERSION = 1


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temp file beside ``path``; on success fsync and rename it over ``path``.

    On any exception the temp file is removed and ``path`` is untouched. A new file gets the
    permissions of a normal new file (0o666 less the umask); a file that is replaced keeps its
    permission bits (a private 0o600 file stays private). The rename is made durable by an fsync
    of the folder (POSIX, best effort).
    """
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    try:
        keep_mode: int | None = stat.S_IMODE(os.stat(path).st_mode) & 0o777
    except OSError:
        keep_mode = None  # a new file: the umask decides
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = folder / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o600 if keep_mode is not None else 0o666)
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - 100 random-name collisions
        raise FileExistsError(f"could not create a temporary file in {folder}")
    try:
        with os.fdopen(fd, mode) as handle:
            if keep_mode is not None:
                os.chmod(handle.fileno() if os.chmod in os.supports_fd else tmp, keep_mode)
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    """Best effort: make a rename in ``folder`` durable (POSIX only)."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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
    _check_archive(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: the file holds objects other than tensors and plain "
            f"containers (a pickle payload?). Only weights are loaded from files, never code. "
            f"Detail: {str(exc).splitlines()[0]}"
        ) from exc
    except Exception as exc:  # a damaged archive or pickle can fail in many ways
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable torch file ({detail})") from exc
    if not isinstance(obj, dict) or "format" not in obj:
        raise CheckpointError(
            f"{path}: not a deepsqueeze file (no 'format' tag); save models with "
            "deepsqueeze.save_model or `deepsqueeze train`"
        )
    if expected_format is not None and obj["format"] != expected_format:
        raise CheckpointError(f"{path}: is a {obj['format']!r} file, expected {expected_format!r}")
    if obj.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer deepsqueeze; upgrade to read it")
    if obj["format"] == CHECKPOINT_FORMAT:
        _check_checkpoint(obj, path)
    return obj


def _check_archive(path: Path) -> None:
    """Verify the CRC-32 of every member of a torch.save zip archive (torch.load does not).

    A flipped bit in the weights would otherwise load silently. Members must be stored
    uncompressed and no larger than the file, as torch.save writes them, so checking costs one
    read of the file whatever the archive claims. Files that are not zip archives (the legacy
    torch format, or garbage) are left to torch.load.
    """
    try:
        if not zipfile.is_zipfile(path):
            return
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.compress_type != zipfile.ZIP_STORED or info.file_size > size:
                    raise CheckpointError(
                        f"{path}: damaged or foreign archive: member {info.filename!r} is "
                        "compressed or larger than the file (torch.save writes neither)"
                    )
            bad = archive.testzip()
    except CheckpointError:
        raise
    except Exception as exc:  # a damaged archive can fail in many ways
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: damaged archive ({detail})") from exc
    if bad is not None:
        raise CheckpointError(
            f"{path}: damaged: the checksum of {bad!r} does not match its bytes "
            "(a truncated or corrupted file)"
        )


def _check_checkpoint(obj: dict[str, Any], path: Path) -> None:
    """The fields ``fit(resume=True)`` reads must be there with the right types."""
    for key in ("model", "optimizer", "scheduler", "scaler"):
        if not isinstance(obj.get(key), dict):
            raise CheckpointError(f"{path}: checkpoint field {key!r} is missing or not a dict")
    epoch = obj.get("epoch")
    if type(epoch) is not int or epoch < 0:
        raise CheckpointError(
            f"{path}: checkpoint field 'epoch' must be a non-negative integer, got {epoch!r:.40}"
        )
    history = obj.get("history")
    try:
        records = json.loads(history) if isinstance(history, str) else None
    except (ValueError, RecursionError):
        records = None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise CheckpointError(
            f"{path}: checkpoint field 'history' must be a JSON list of per-epoch records"
        )


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


def model_for_shapes(spec: models.ModelSpec, shapes: Mapping[str, tuple[int, ...]]) -> nn.Module:
    """Zoo model ``spec`` sized for stored tensors of ``shapes``, on the meta device.

    Nothing is allocated, so a forged spec (``in_features: 10**12``) costs nothing; give the
    result memory of exactly the stored sizes with ``model.to_empty(device="cpu")`` and fill it
    with ``load_state_dict``. Raises :class:`ModelError` when the spec cannot be built, the
    tensor names are not the model's, a stored shape is larger than the model's (channel pruning
    only shrinks layers) or the shapes do not chain (a shape-only forward pass fails).
    """
    try:
        with torch.device("meta"):
            model = models.create(spec.name, **spec.kwargs)
    except Exception as exc:  # a forged spec can make a factory fail in any way
        raise ModelError(f"model spec cannot be built: {_first_line(exc)}") from exc
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if set(shapes) != set(expected):
        missing, extra = set(expected) - set(shapes), set(shapes) - set(expected)
        raise ModelError(
            f"tensors do not fit model {spec.name}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(extra)[:5]}"
        )
    for key, shape in shapes.items():
        want = expected[key]
        if len(shape) != len(want) or any(d > w for d, w in zip(shape, want, strict=True)):
            raise ModelError(
                f"stored {key!r} has shape {list(shape)}, which does not fit {spec.name}'s "
                f"{list(want)} (a stored layer may only be smaller)"
            )
    try:
        if dict(shapes) != expected:
            from deepsqueeze.methods.channel_pruning import resize_to_shapes  # channel-pruned

            model = resize_to_shapes(model, shapes)
        resized = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        wrong = sorted(k for k in shapes if tuple(shapes[k]) != resized.get(k))
        if wrong:
            raise ModelError(
                f"stored {wrong[0]!r} has shape {list(shapes[wrong[0]])} but the layers around "
                f"it give {list(resized.get(wrong[0], ()))} ({len(wrong)} such tensors)"
            )
        model.eval()
        with torch.no_grad():
            model(torch.empty((1, *models.input_shape_of(model)), device="meta"))
    except Exception as exc:
        raise ModelError(
            f"stored shapes do not form a working {spec.name} with options {spec.kwargs}: "
            f"{_first_line(exc)}"
        ) from exc
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def model_from_state(obj: dict[str, Any], source: str | Path) -> nn.Module:
    """Rebuild a zoo model from a loaded model file or checkpoint dict."""
    try:
        spec = models.ModelSpec.from_dict(obj["model_spec"])
        state = obj["state_dict"] if "state_dict" in obj else obj["model"]
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise TypeError("the weights are not a dict of named tensors")
        model = model_for_shapes(spec, {k: tuple(v.shape) for k, v in state.items()})
        model = model.to_empty(device="cpu")  # memory for exactly the stored shapes
        model.load_state_dict(state)
    except (KeyError, TypeError, RuntimeError, ModelError) as exc:
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
