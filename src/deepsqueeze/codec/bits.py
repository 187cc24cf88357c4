"""Fixed-width bit packing, LEB128-style varints and zigzag mapping, vectorized with numpy.

Bit order everywhere in the .dsq format is MSB-first: the first value occupies the most
significant bits of the first byte. The final byte is padded with zero bits.
"""

from __future__ import annotations

import numpy as np

from deepsqueeze.errors import DsqFormatError

#: Largest number of bytes a varint may take: 9 bytes carry 63 bits, so every value fits int64.
MAX_VARINT_BYTES = 9
_MAX_VARINT = (1 << (7 * MAX_VARINT_BYTES)) - 1

# Values handled per numpy pass; a multiple of 8 so every chunk ends on a byte boundary.
_CHUNK = 1 << 18

BytesLike = bytes | bytearray | memoryview


def as_u8(data: BytesLike | np.ndarray) -> np.ndarray:
    """View any contiguous bytes-like object as a read-only 1-D ``uint8`` array (no copy)."""
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data)
        return data.reshape(-1).view(np.uint8)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected a bytes-like object, got {type(data).__name__}")
    mv = memoryview(data)
    if not mv.c_contiguous:
        mv = memoryview(mv.tobytes())
    return np.frombuffer(mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv, np.uint8)


def packed_size(count: int, bits: int) -> int:
    """Bytes taken by ``count`` values of ``bits`` bits each (the last byte zero-padded)."""
    return (count * bits + 7) // 8


def _check_width(bits: int, error: type[Exception] = ValueError) -> None:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 32:
        raise error(f"bit width must be an int in 1..32, got {bits!r}")


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack non-negative integers ``< 2**bits`` into ``bits`` bits each, MSB-first.

    Returns ``packed_size(len(values), bits)`` bytes; the padding bits of the last byte are 0.
    Raises ``ValueError`` if a value does not fit.
    """
    _check_width(bits)
    bits = int(bits)
    v = np.asarray(values)
    if v.dtype.kind not in "biu":
        raise TypeError(f"pack_bits needs integers, got dtype {v.dtype}")
    v = v.reshape(-1)
    if v.size == 0:
        return b""
    if v.dtype.kind == "i" and int(v.min()) < 0:
        raise ValueError("pack_bits: negative value")
    if int(v.max()) >= (1 << bits):
        raise ValueError(f"pack_bits: value {int(v.max())} does not fit in {bits} bits")
    if bits in (8, 16, 32):
        return v.astype(f">u{bits // 8}").tobytes()
    v = v.astype(np.uint64)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
    out = bytearray()
    for start in range(0, v.size, _CHUNK):
        chunk = v[start : start + _CHUNK]
        bit_matrix = ((chunk[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
        out += np.packbits(bit_matrix.reshape(-1)).tobytes()
    return bytes(out)


def unpack_bits(
    data: BytesLike | np.ndarray, bits: int, count: int, *, exact: bool = True
) -> np.ndarray:
    """Inverse of :func:`pack_bits`: read ``count`` values of ``bits`` bits, MSB-first.

    Returns an ``int64`` array. Raises :class:`DsqFormatError` if ``data`` is too short, or
    (when ``exact``, the default) if it has extra bytes or non-zero padding bits. ``bits`` and
    ``count`` usually come from a file, so bad ones raise :class:`DsqFormatError` too.
    """
    _check_width(bits, DsqFormatError)
    bits = int(bits)
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise DsqFormatError(f"value count must be a non-negative int, got {count!r}")
    count = int(count)
    raw = as_u8(data)
    need = packed_size(count, bits)
    if raw.size < need:
        raise DsqFormatError(
            f"bit-packed data too short: {count} values of {bits} bits need {need} bytes, "
            f"found {raw.size}"
        )
    if exact:
        if raw.size != need:
            raise DsqFormatError(
                f"bit-packed data has {raw.size - need} trailing bytes "
                f"(expected {need} bytes for {count} values of {bits} bits)"
            )
        pad = need * 8 - count * bits
        if pad and int(raw[need - 1]) & ((1 << pad) - 1):
            raise DsqFormatError("bit-packed data has non-zero padding bits")
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    raw = raw[:need]
    if bits in (8, 16, 32):
        return raw.view(f">u{bits // 8}")[:count].astype(np.int64)
    weights = np.left_shift(np.uint64(1), np.arange(bits - 1, -1, -1, dtype=np.uint64))
    out = np.empty(count, dtype=np.int64)
    for start in range(0, count, _CHUNK):
        n = min(_CHUNK, count - start)
        first_byte = start * bits // 8  # exact: start is a multiple of 8
        chunk_bytes = raw[first_byte : first_byte + packed_size(n, bits)]
        bit_array = np.unpackbits(chunk_bytes)[: n * bits].reshape(n, bits)
        out[start : start + n] = (bit_array.astype(np.uint64) @ weights).astype(np.int64)
    return out


# --------------------------------------------------------------------------- zigzag


def zigzag_encode(values: np.ndarray) -> np.ndarray:
    """Map signed ints to unsigned: 0, -1, 1, -2, ... -> 0, 1, 2, 3, ... (``uint64`` array)."""
    v = np.asarray(values).astype(np.int64)
    return ((v << 1) ^ (v >> 63)).view(np.uint64)


def zigzag_decode(values: np.ndarray) -> np.ndarray:
    """Inverse of :func:`zigzag_encode` (``int64`` array)."""
    u = np.asarray(values).astype(np.uint64)
    return ((u >> np.uint64(1)) ^ (np.uint64(0) - (u & np.uint64(1)))).view(np.int64)


# --------------------------------------------------------------------------- varints


def encode_uvarint(value: int) -> bytes:
    """One unsigned LEB128 varint (7 bits per byte, low bits first, high bit = continue)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"varint value must be an int, got {type(value).__name__}")
    value = int(value)
    if not 0 <= value <= _MAX_VARINT:
        raise ValueError(f"varint value out of range: {value}")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_uvarint(data: BytesLike | np.ndarray, pos: int = 0) -> tuple[int, int]:
    """Read one varint at ``pos``; returns ``(value, next_pos)``.

    Rejects truncated, over-long (> 9 bytes) and non-minimal encodings.
    """
    value = 0
    for i in range(MAX_VARINT_BYTES):
        if pos + i >= len(data):
            raise DsqFormatError(f"truncated varint at byte {pos}")
        byte = int(data[pos + i])
        value |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            if byte == 0 and i > 0:
                raise DsqFormatError(f"non-minimal varint at byte {pos}")
            return value, pos + i + 1
    raise DsqFormatError(f"varint longer than {MAX_VARINT_BYTES} bytes at byte {pos}")


def encode_uvarints(values: np.ndarray) -> bytes:
    """Concatenated varints of a non-negative integer array (vectorized)."""
    v = np.asarray(values)
    if v.dtype.kind not in "biu":
        raise TypeError(f"varints need integers, got dtype {v.dtype}")
    v = v.reshape(-1)
    if v.size == 0:
        return b""
    if v.dtype.kind == "i" and int(v.min()) < 0:
        raise ValueError("varint value must be non-negative")
    if int(v.max()) > _MAX_VARINT:
        raise ValueError(f"varint value out of range: {int(v.max())}")
    v = v.astype(np.uint64)
    nbytes = np.ones(v.size, dtype=np.int64)
    for k in range(1, MAX_VARINT_BYTES):
        nbytes += v >= np.uint64(1 << (7 * k))
    width = int(nbytes.max())
    groups = np.arange(width, dtype=np.uint64)
    matrix = ((v[:, None] >> (np.uint64(7) * groups)) & np.uint64(0x7F)).astype(np.uint8)
    cols = np.arange(width)
    matrix[cols[None, :] < (nbytes[:, None] - 1)] |= 0x80
    return matrix[cols[None, :] < nbytes[:, None]].tobytes()


def decode_uvarints(
    data: BytesLike | np.ndarray, pos: int, count: int
) -> tuple[np.ndarray, int]:
    """Read ``count`` varints starting at ``pos``; returns ``(int64 array, next_pos)``."""
    if count == 0:
        return np.zeros(0, dtype=np.int64), pos
    raw = as_u8(data)[pos : pos + MAX_VARINT_BYTES * count]
    ends = np.flatnonzero(raw < 0x80)[:count]
    if ends.size < count:
        raise DsqFormatError(f"truncated varint list at byte {pos}: expected {count} varints")
    starts = np.empty(count, dtype=np.int64)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    if int(lengths.max()) > MAX_VARINT_BYTES:
        raise DsqFormatError(f"varint longer than {MAX_VARINT_BYTES} bytes after byte {pos}")
    if np.any((lengths > 1) & (raw[ends] == 0)):
        raise DsqFormatError(f"non-minimal varint after byte {pos}")
    seg = raw[: int(ends[-1]) + 1]
    group = np.arange(seg.size, dtype=np.int64) - np.repeat(starts, lengths)
    parts = (seg & 0x7F).astype(np.uint64) << (np.uint64(7) * group.astype(np.uint64))
    values = np.bitwise_or.reduceat(parts, starts)
    return values.astype(np.int64), pos + int(ends[-1]) + 1
