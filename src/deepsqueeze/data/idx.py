"""Reader for the IDX format of (Fashion-/K-)MNIST, plain or gzip-compressed."""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from deepsqueeze.errors import DataError, DatasetCorruptError, DatasetNotFoundError

# IDX type code -> element dtype (multi-byte types are big-endian on disk).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_MAX_NDIM = 8


def read_bytes(path: str | Path) -> bytes:
    """All bytes of ``path``; a missing or unreadable file is a DataError."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise DatasetNotFoundError(f"{path}: no such file") from exc
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc


def decompress(raw: bytes, source: str | Path) -> bytes:
    """``raw`` gunzipped if it is gzip data (by its magic bytes), else ``raw`` itself."""
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, zlib.error, OSError) as exc:  # BadGzipFile is an OSError
        raise DatasetCorruptError(
            f"{source}: truncated or corrupt gzip data ({exc}); "
            "delete the file and download it again"
        ) from exc


def parse_idx(payload: bytes, source: str | Path) -> np.ndarray:
    """Parse decompressed IDX bytes into a native-byte-order array.

    Layout: two zero bytes, a type code, the number of dimensions, one big-endian uint32 per
    dimension, then exactly ``prod(dims)`` big-endian elements.
    """
    if len(payload) < 4:
        raise DatasetCorruptError(f"{source}: too short for an IDX header ({len(payload)} bytes)")
    zero, code, ndim = payload[:2], payload[2], payload[3]
    if zero != b"\x00\x00" or code not in IDX_DTYPES:
        raise DatasetCorruptError(
            f"{source}: bad IDX magic 0x{payload[:4].hex()} (expected 0x0000TTNN with a type "
            f"code TT in {{{', '.join(f'{c:02x}' for c in IDX_DTYPES)}}}); not an IDX file"
        )
    if not 1 <= ndim <= _MAX_NDIM:
        raise DatasetCorruptError(f"{source}: IDX header claims {ndim} dimensions")
    header = 4 + 4 * ndim
    if len(payload) < header:
        raise DatasetCorruptError(f"{source}: file ends inside the IDX header")
    dims = tuple(int(d) for d in np.frombuffer(payload, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    got = len(payload) - header
    if got != expected:
        what = "truncated" if got < expected else "trailing bytes after the data"
        raise DatasetCorruptError(
            f"{source}: payload is {got} bytes but dimensions {dims} of {dtype.name} need "
            f"{expected} ({what})"
        )
    arr = np.frombuffer(payload, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)  # own, writable, native order


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or not) into a numpy array; corrupt files raise
    DatasetCorruptError naming the file."""
    return parse_idx(decompress(read_bytes(path), path), path)
