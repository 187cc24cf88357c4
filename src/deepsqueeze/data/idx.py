"""Reader for the IDX format of (Fashion-/K-)MNIST, plain or gzip-compressed."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from deepsqueeze.errors import DataError, DatasetCorruptError, DatasetNotFoundError
from deepsqueeze.inputs import NotReadable, read_input

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


MAX_PAYLOAD = 256 << 20
"""Most bytes an IDX file may hold or decompress to when its size is not known (the largest
known, MNIST's training images, is 47 MB)."""
_INFLATE_STEP = 1 << 20  # output bytes per inflate call: a bomb is stopped within one step
_FEED_STEP = 1 << 16  # input bytes per inflate call


def read_bytes(path: str | Path, limit: int = MAX_PAYLOAD) -> bytes:
    """All bytes of ``path``: a regular file of at most ``limit`` bytes.

    A missing file is a DatasetNotFoundError; a FIFO, a directory, a device (refused before
    anything is read: a FIFO would block), an unreadable or a larger file is a DataError.
    """
    try:
        return read_input(path, limit)
    except NotReadable as exc:
        if exc.missing:
            raise DatasetNotFoundError(f"{path}: no such file") from None
        raise DataError(f"cannot read {path}: {exc}") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc


def is_gzip(raw: bytes | bytearray) -> bool:
    """Whether ``raw`` starts with the gzip magic bytes."""
    return raw[:2] == b"\x1f\x8b"


def _idx_size(head: bytes | bytearray) -> int | None:
    """Total bytes of the IDX file whose first bytes are ``head``: None while ``head`` is too
    short to tell, or not an IDX header (parse_idx then names the defect)."""
    if len(head) < 4:
        return None
    code, ndim = head[2], head[3]
    if head[:2] != b"\x00\x00" or code not in IDX_DTYPES or not 1 <= ndim <= _MAX_NDIM:
        return len(head)  # not IDX: nothing more is needed to refuse it
    header = 4 + 4 * ndim
    if len(head) < header:
        return None
    dims = np.frombuffer(bytes(head[4:header]), dtype=">u4")
    return header + math.prod(int(d) for d in dims) * IDX_DTYPES[code].itemsize


def gunzip(
    raw: bytes | bytearray,
    source: str | Path,
    limit: int = MAX_PAYLOAD,
    *,
    idx: bool = False,
    keep: bool = True,
    update: Callable[[bytes], object] | None = None,
) -> bytearray:
    """Decompress the gzip data ``raw``, refusing more than ``limit`` bytes of output.

    Streamed: the output grows in steps of at most 1 MiB, and a stream that inflates beyond
    ``limit`` (a gzip bomb) is refused after at most one step more, whatever it claims.
    ``idx``: the output is an IDX file, so its own header (read from the first bytes) lowers
    the limit to the exact size it declares. ``keep=False`` keeps nothing (the result is
    empty): with ``update`` (e.g. a ``hashlib`` object's, given every output chunk) it computes
    a checksum in the memory of one step. Multi-member gzip data is read as one stream, and
    zero bytes after the last member are ignored, as by :func:`gzip.decompress`.
    Damaged data or more output than allowed raise DatasetCorruptError naming ``source``.
    """
    view = memoryview(raw)
    out = bytearray()
    head = bytearray()
    total = pos = 0
    try:
        while True:  # one gzip member per round
            inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
            pending: bytes | memoryview = b""
            while not inflater.eof:
                if not pending and pos < len(view):  # the input goes in by slices, too
                    pending = view[pos : pos + _FEED_STEP]
                    pos += len(pending)
                chunk = inflater.decompress(pending, min(limit - total + 1, _INFLATE_STEP))
                pending = inflater.unconsumed_tail
                if not chunk and not pending and pos >= len(view) and not inflater.eof:
                    raise EOFError("compressed file ended before the end-of-stream marker")
                if idx and len(head) < 36:
                    head += chunk[: 36 - len(head)]
                    size = _idx_size(head)
                    if size is not None and size < limit:
                        limit = max(size, total)  # the declared size, or what is already out
                total += len(chunk)
                if total > limit:
                    raise DatasetCorruptError(
                        f"{source}: decompresses to more than {limit:,} bytes, the most this "
                        "file can hold (a corrupt file or a gzip bomb); delete it and download "
                        "it again"
                    )
                if update is not None:
                    update(chunk)
                if keep:
                    out += chunk
            pos -= len(inflater.unused_data)  # where the next member (if any) starts
            rest = view[pos:]
            if not bytes(rest).strip(b"\x00"):
                return out
            if rest[:2] != b"\x1f\x8b":
                raise zlib.error("trailing garbage after the gzip data")
    except (EOFError, zlib.error) as exc:
        raise DatasetCorruptError(
            f"{source}: truncated or corrupt gzip data ({exc}); "
            "delete the file and download it again"
        ) from exc


def decompress(
    raw: bytes | bytearray, source: str | Path, limit: int = MAX_PAYLOAD
) -> bytes | bytearray:
    """``raw`` gunzipped if it is gzip data (by its magic bytes), else ``raw`` itself.

    The output is capped at ``limit`` bytes and at the size its IDX header declares
    (:func:`gunzip`), so a gzip bomb costs at most what a real file of that shape would.
    """
    if not is_gzip(raw):
        return raw
    return gunzip(raw, source, limit, idx=True)


def parse_idx(payload: bytes | bytearray, source: str | Path) -> np.ndarray:
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
    DatasetCorruptError naming the file. Bounded: a file or its decompressed contents of more
    than :data:`MAX_PAYLOAD` bytes, or than its IDX header declares, is refused."""
    return parse_idx(decompress(read_bytes(path), path), path)
