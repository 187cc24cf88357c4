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
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, BinaryIO

import torch
from torch import nn

from deepsqueeze import models
from deepsqueeze.errors import CheckpointError, DsqFormatError, ModelError
from deepsqueeze.inputs import NotReadable, open_input
from deepsqueeze.models.graph import USER_ATTR, UserModel, describe, rebuild
from deepsqueeze.models.state import fit_skeleton, plain_state, resize_to_shapes

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

    Raises :class:`CheckpointError` for a missing file or one that is not a regular file (a
    FIFO, a directory, a device), a damaged archive, a pickle that carries code or objects
    beyond tensors and plain containers, or a file of another kind.
    """
    path = Path(path)
    try:
        handle = open_input(path)
    except NotReadable as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    with handle:
        _check_archive(handle, path)
        handle.seek(0)
        try:
            obj = torch.load(handle, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"{path}: refused to load: the file holds objects other than tensors and plain "
                f"containers (a pickle payload?). Only weights are loaded from files, never "
                f"code. Detail: {str(exc).splitlines()[0]}"
            ) from exc
        except Exception as exc:  # a damaged archive or pickle can fail in many ways
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(f"{path}: not a readable torch file ({detail})") from exc
    if not isinstance(obj, dict) or "format" not in obj:
        raise CheckpointError(
            f"{path}: not a deepsqueeze file (no 'format' tag); save models with "
            "deepsqueeze.save_model or `deepsqueeze train`"
        )
    fmt, version = obj["format"], obj.get("version", 0)
    if not isinstance(fmt, str):
        raise CheckpointError(f"{path}: field 'format' must be a string, got {fmt!r:.40}")
    if type(version) is not int or version < 0:
        raise CheckpointError(
            f"{path}: field 'version' must be a non-negative integer, got {version!r:.40}"
        )
    if expected_format is not None and fmt != expected_format:
        raise CheckpointError(f"{path}: is a {fmt!r:.60} file, expected {expected_format!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer deepsqueeze; upgrade to read it")
    if fmt == CHECKPOINT_FORMAT:
        _check_checkpoint(obj, path)
    return obj


MAX_ARCHIVE_MEMBERS = 1 << 16
"""Most members a model file's zip archive may have (torch.save writes one per tensor + 5)."""
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., name length, extra length
_LOCAL_MAGIC = b"PK\x03\x04"
_CRC_CHUNK = 1 << 20


def _check_archive(handle: BinaryIO, path: Path) -> None:
    """Verify the layout and the CRC-32 of every member of a torch.save zip archive.

    torch.load checks no CRC, so a flipped bit in the weights would otherwise load silently.
    Members must be stored uncompressed, as torch.save writes them, under distinct names, and
    must not overlap one another or the central directory: each byte of the file is then read
    at most once, whatever the archive claims (overlapping members once made a 4.8 MB file
    cost 55 s). Files that are not zip archives (the legacy torch format, or garbage) are left
    to torch.load.
    """
    size = os.fstat(handle.fileno()).st_size
    try:
        if not zipfile.is_zipfile(handle):
            return
        declared = _declared_members(handle, size)
        if declared > MAX_ARCHIVE_MEMBERS:  # refused before zipfile parses each of them
            raise CheckpointError(
                f"{path}: damaged or foreign archive: {declared} members, over the "
                f"{MAX_ARCHIVE_MEMBERS} a model file may have"
            )
        handle.seek(0)
        with zipfile.ZipFile(handle) as archive:
            infos = archive.infolist()
            end = min(size, getattr(archive, "start_dir", size))  # the central directory
        if len(infos) > MAX_ARCHIVE_MEMBERS:
            raise CheckpointError(
                f"{path}: damaged or foreign archive: {len(infos)} members, over the "
                f"{MAX_ARCHIVE_MEMBERS} a model file may have"
            )
        names: set[str] = set()
        for info in infos:
            if info.filename in names:
                raise CheckpointError(
                    f"{path}: damaged or foreign archive: member {info.filename!r:.80} "
                    "appears twice"
                )
            names.add(info.filename)
            if (
                info.compress_type != zipfile.ZIP_STORED
                or info.compress_size != info.file_size
                or info.file_size > size
                or info.flag_bits & 0x1
            ):
                raise CheckpointError(
                    f"{path}: damaged or foreign archive: member {info.filename!r:.80} is "
                    "compressed, encrypted or larger than the file (torch.save writes none)"
                )
        done = 0  # members may not start before the previous one ends
        for info in sorted(infos, key=lambda i: i.header_offset):
            done = _check_member(handle, path, info, done, end)
    except CheckpointError:
        raise
    except Exception as exc:  # a damaged archive can fail in many ways
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: damaged archive ({detail})") from exc


def _declared_members(handle: BinaryIO, size: int) -> int:
    """The member count an archive's end-of-central-directory record (zip64 or not) declares;
    0 when there is none to read (zipfile then reports the damage)."""
    tail_size = min(size, 22 + 0xFFFF)  # the record and the longest comment
    handle.seek(size - tail_size)
    tail = handle.read(tail_size)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + 22 > len(tail):
        return 0
    count = struct.unpack_from("<H", tail, at + 10)[0]
    if at >= 20 and tail[at - 20 : at - 16] == b"PK\x06\x07":  # zip64 locator
        offset = struct.unpack_from("<Q", tail, at - 12)[0]
        if offset + 40 <= size:
            handle.seek(offset)
            record = handle.read(40)
            if record[:4] == b"PK\x06\x06":
                count = max(count, struct.unpack_from("<Q", record, 32)[0])
    return count


def _check_member(
    handle: BinaryIO, path: Path, info: zipfile.ZipInfo, start: int, end: int
) -> int:
    """Check one member lying in ``start..end`` of the file; returns where its data ends."""
    name = info.filename
    if info.header_offset < start:
        raise CheckpointError(
            f"{path}: damaged or foreign archive: member {name!r:.80} overlaps the one before"
        )
    handle.seek(info.header_offset)
    head = handle.read(_LOCAL_HEADER.size)
    if len(head) < _LOCAL_HEADER.size:
        raise CheckpointError(f"{path}: damaged archive: no local header for {name!r:.80}")
    magic, name_len, extra_len = _LOCAL_HEADER.unpack(head)
    if magic != _LOCAL_MAGIC:
        raise CheckpointError(f"{path}: damaged archive: no local header for {name!r:.80}")
    data_start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    data_end = data_start + info.compress_size
    if data_end > end:
        raise CheckpointError(
            f"{path}: damaged or foreign archive: member {name!r:.80} runs past the end of "
            "the archive's data"
        )
    encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"
    if handle.read(name_len) != info.orig_filename.encode(encoding, "replace"):
        raise CheckpointError(
            f"{path}: damaged archive: the local header of {name!r:.80} names another file"
        )
    handle.seek(data_start)
    crc, left = 0, info.compress_size
    while left:
        chunk = handle.read(min(left, _CRC_CHUNK))
        if not chunk:
            raise CheckpointError(f"{path}: damaged archive: {name!r:.80} is truncated")
        crc = zlib.crc32(chunk, crc)
        left -= len(chunk)
    if crc != info.CRC:
        raise CheckpointError(
            f"{path}: damaged: the checksum of {name!r:.80} does not match its bytes "
            "(a truncated or corrupted file)"
        )
    return data_end


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


def save_model(
    model: nn.Module,
    path: str | Path,
    *,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    **extra: Any,
) -> Path:
    """Save a model (architecture + fp32 weights) atomically as a ``.pt`` file.

    A zoo model is recorded by its spec; any other ``nn.Module`` by its description (class
    name, inputs from ``example_inputs``, and its graph where it can be captured, see
    :mod:`deepsqueeze.models.graph`), stored as JSON text: :func:`load_model` rebuilds it from
    the graph or fills the instance given as ``model=``.
    """
    if not isinstance(model, nn.Module):
        raise ModelError(f"save_model: expected a torch nn.Module, got {type(model).__name__}")
    spec = getattr(model, models.registry.SPEC_ATTR, None)
    if isinstance(spec, models.ModelSpec):
        described: dict[str, Any] = {"model_spec": spec.to_dict()}
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    else:
        user = describe(model, example_inputs)
        described = {"model_user": json.dumps(user.to_dict(), separators=(",", ":"))}
        state = {k: v.clone() for k, v in plain_state(model)[0].items()}
    atomic_save(
        {
            "format": MODEL_FORMAT,
            "version": FORMAT_VERSION,
            **described,
            "state_dict": state,
            **extra,
        },
        path,
    )
    return Path(path)


MAX_DESCRIPTION = 16 << 20
"""Longest user model description (JSON text) a model file may hold."""


def _user_of(obj: dict[str, Any], source: str | Path) -> UserModel:
    text = obj["model_user"]
    if not isinstance(text, str) or len(text) > MAX_DESCRIPTION:
        raise CheckpointError(f"{source}: field 'model_user' must be JSON text of at most 16 MiB")
    try:
        return UserModel.from_dict(json.loads(text, parse_constant=_no_constant))
    except (ValueError, RecursionError, DsqFormatError) as exc:
        raise CheckpointError(f"{source}: bad user model description: {exc}") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def model_for_shapes(
    spec: models.ModelSpec,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    kinds: Callable[[nn.Module], nn.Module] | None = None,
) -> nn.Module:
    """Zoo model ``spec`` sized for stored tensors of ``shapes``, on the meta device.

    Nothing is allocated, so a forged spec (``in_features: 10**12``) costs nothing; give the
    result memory of exactly the stored sizes with ``model.to_empty(device="cpu")`` and fill it
    with ``load_state_dict``. Raises :class:`ModelError` when the spec cannot be built, the
    tensor names are not the model's, a stored shape is larger than the model's (channel pruning
    only shrinks layers) or the shapes do not chain (a shape-only forward pass fails).
    ``kinds`` puts the stored compressed layer kinds in place first (its errors pass through).
    """
    try:
        with torch.device("meta"):
            model = models.create(spec.name, **spec.kwargs)
    except Exception as exc:  # a forged spec can make a factory fail in any way
        raise ModelError(f"model spec cannot be built: {_first_line(exc)}") from exc
    if kinds is not None:
        model = kinds(model)
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
            model = resize_to_shapes(model, shapes)  # channel-pruned
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


def model_from_state(
    obj: dict[str, Any], source: str | Path, model: nn.Module | None = None
) -> nn.Module:
    """Rebuild the model of a loaded model file or checkpoint dict.

    A zoo spec is rebuilt from the registry; a user model from its graph, or into ``model`` (an
    instance of its architecture: strict names and shapes, layers stored smaller resized;
    filled in place). A user model stored without a graph needs ``model``.
    """
    state = obj["state_dict"] if "state_dict" in obj else obj.get("model")
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{source}: the weights are not a dict of named tensors")
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    user = _user_of(obj, source) if "model_user" in obj else None
    if model is not None:
        fit_skeleton(model, shapes, str(source))  # a ModelError: the instance does not fit
    elif user is not None:
        if user.graph is None:
            short = user.short_name
            raise ModelError(
                f"{source} holds a {short} ({user.class_name}) stored without a graph: "
                f"load it with deepsqueeze.load_model(path, model={short}())"
            )
        try:
            model = rebuild(user.graph).to_empty(device="cpu")
        except DsqFormatError as exc:
            raise CheckpointError(f"{source}: {exc}") from None
    elif obj.get("model_spec", ...) is None:  # a checkpoint of a user's model: weights only
        raise ModelError(
            f"{source} holds the weights of a model that is not in the zoo, without its "
            "architecture (a training checkpoint): load it into an instance of the class with "
            "deepsqueeze.load_model(path, model=MyNet())"
        )
    else:
        try:
            spec = models.ModelSpec.from_dict(obj["model_spec"])
            model = model_for_shapes(spec, shapes).to_empty(device="cpu")  # the stored sizes
        except (KeyError, ModelError) as exc:
            raise CheckpointError(f"{source}: model spec and weights do not fit: {exc}") from exc
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: model and weights do not fit: {exc}") from exc
    if user is not None:
        setattr(model, USER_ATTR, user)
    return model


def load_model(path: str | Path, *, model: nn.Module | None = None) -> nn.Module:
    """Load a model saved by :func:`save_model` (or the model inside a training checkpoint).

    ``model``: an instance of the saved architecture to fill (needed for a user model saved
    without a graph; optional otherwise).
    """
    obj = safe_load(path)
    if obj["format"] not in (MODEL_FORMAT, CHECKPOINT_FORMAT):
        raise CheckpointError(f"{path}: is a {obj['format']!r} file, not a model")
    model = model_from_state(obj, path, model)
    model.eval()
    return model
