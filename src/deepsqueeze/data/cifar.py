"""Reader for the CIFAR-10/100 "python version" batches, with a restricted unpickler.

The official batches are pickled dicts (``data``: uint8 array N×3072, labels: list of ints).
Plain ``pickle.load`` would run whatever a tampered file asks for, so batches are read with
an unpickler that can only build numpy arrays; any other global is refused.
"""

from __future__ import annotations

import codecs
import io
import pickle
import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deepsqueeze.errors import DatasetCorruptError
from deepsqueeze.inputs import NotReadable, open_input, read_input

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1.26
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]

PIXELS = 3 * 32 * 32
MAX_BATCH_BYTES = 256 << 20
"""Most bytes a batch file may have (CIFAR-100's train batch, the largest, is 155 MB)."""


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as pickles of bytes use it, for the latin-1 codec only."""
    if encoding.replace("_", "-").lower() not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"codec {encoding!r} is not allowed")
    return codecs.encode(text, "latin1", errors)


# Everything a CIFAR batch (or a numpy array pickled by Python 3) needs, by pickle name.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numeric._frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals in ``_ALLOWED``."""

    def __init__(self, file: io.BytesIO, source: str) -> None:
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise DatasetCorruptError(
                f"refusing to load {self.source}: it contains object {module}.{name}, which a "
                "CIFAR batch never needs (only numpy arrays, lists, dicts and numbers are "
                "allowed); the file is corrupt or has been tampered with"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise DatasetCorruptError(f"refusing to load {self.source}: it uses persistent ids")


def load_batch(raw: bytes, source: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode one pickled batch into (uint8 images N×3×32×32, int64 labels N)."""
    try:
        obj = RestrictedUnpickler(io.BytesIO(raw), source).load()
    except DatasetCorruptError:
        raise
    except Exception as exc:  # a damaged pickle can fail with almost any error type
        raise DatasetCorruptError(
            f"{source}: not a readable CIFAR batch ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(obj, dict):
        raise DatasetCorruptError(f"{source}: expected a dict, found {type(obj).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    data, labels = batch.get("data"), batch.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DatasetCorruptError(f"{source}: 'data' is not a 2-D uint8 array")
    if data.shape[1] != PIXELS:
        raise DatasetCorruptError(f"{source}: rows have {data.shape[1]} values, not {PIXELS}")
    if labels is None:
        raise DatasetCorruptError(f"{source}: no {label_key!r} entry")
    try:
        label_arr = np.asarray(labels)
    except Exception as exc:
        raise DatasetCorruptError(f"{source}: unreadable {label_key!r}: {exc}") from exc
    if label_arr.ndim != 1 or not np.issubdtype(label_arr.dtype, np.integer):
        raise DatasetCorruptError(f"{source}: {label_key!r} is not a flat list of integers")
    if len(label_arr) != len(data):
        raise DatasetCorruptError(f"{source}: {len(data)} images but {len(label_arr)} labels")
    return data.reshape(-1, 3, 32, 32).copy(), label_arr.astype(np.int64)


def _concat(
    parts: Sequence[tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def read_batches(paths: Sequence[Path], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Read and concatenate extracted batch files."""
    parts = []
    for path in paths:
        try:
            raw = read_input(path, MAX_BATCH_BYTES)
        except (NotReadable, OSError) as exc:
            raise DatasetCorruptError(f"cannot read {path}: {exc}") from None
        parts.append(load_batch(raw, str(path), label_key))
    return _concat(parts)


def read_archive_members(archive: Path, names: Sequence[str]) -> dict[str, bytes]:
    """The bytes of the named regular-file members of a ``.tar.gz``, in one pass, in memory.

    Nothing is extracted to disk. Member names are compared after dropping a leading ``./``.
    """
    wanted = set(names)
    found: dict[str, bytes] = {}
    try:
        handle = open_input(archive)
    except NotReadable as exc:
        raise DatasetCorruptError(f"cannot read {archive}: {exc}") from None
    try:
        with handle, tarfile.open(fileobj=handle, mode="r:gz") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if name not in wanted or name in found:
                    continue
                f = tar.extractfile(member) if member.isfile() else None
                if f is None:
                    raise DatasetCorruptError(f"{archive}: member {name} is not a regular file")
                if member.size > MAX_BATCH_BYTES:
                    raise DatasetCorruptError(
                        f"{archive}: member {name} claims {member.size:,} bytes, more than any "
                        f"CIFAR batch ({MAX_BATCH_BYTES:,} at most)"
                    )
                found[name] = f.read(member.size)
                if len(found) == len(wanted):
                    break
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DatasetCorruptError(
            f"{archive}: truncated or corrupt archive ({exc}); delete it and download it again"
        ) from exc
    missing = [n for n in names if n not in found]
    if missing:
        raise DatasetCorruptError(f"{archive}: archive has no member(s) {', '.join(missing)}")
    return found


def read_archive(
    archive: Path, names: Sequence[str], label_key: str
) -> tuple[np.ndarray, np.ndarray]:
    """Read and concatenate batches straight from the archive (no extraction)."""
    raws = read_archive_members(archive, names)
    return _concat([load_batch(raws[n], f"{archive}:{n}", label_key) for n in names])
