"""Deep Compression's relative index: sparse positions as bounded gaps with filler entries.

Convention (docs/format.md, "Relative index"): a layer's weights are flattened in C order and
only some entries are stored. Stored entry ``k`` sits at flat position
``cumsum(gaps)[k] - 1``: the first gap is ``position + 1``, later gaps are position differences.
Each gap must lie in ``[1, 2**index_bits]`` and is stored as ``gap - 1``, so it fits
``index_bits`` bits. A real gap larger than ``2**index_bits`` is split by *filler* entries, each
advancing exactly ``2**index_bits``; a filler is a stored entry whose weight is zero (the caller
stores its reserved "zero" value symbol there), as in Han et al. (2016).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import numpy as np

from deepsqueeze.codec.huffman import huffman_size_bits
from deepsqueeze.errors import DsqFormatError

MAX_INDEX_BITS = 32


def _check_index_bits(index_bits: int, error: type[Exception] = ValueError) -> int:
    if (
        isinstance(index_bits, bool)
        or not isinstance(index_bits, (int, np.integer))
        or not 1 <= index_bits <= MAX_INDEX_BITS
    ):
        raise error(f"index_bits must be an int in 1..{MAX_INDEX_BITS}, got {index_bits!r}")
    return int(index_bits)


def _check_positions(positions: np.ndarray) -> np.ndarray:
    p = np.asarray(positions)
    if p.ndim != 1 or p.dtype.kind not in "iu":
        raise ValueError("positions must be a 1-D integer array")
    p = p.astype(np.int64)
    if p.size and (int(p[0]) < 0 or np.any(np.diff(p) <= 0)):
        raise ValueError("positions must be non-negative and strictly increasing")
    return p


def relative_index_encode(
    positions: np.ndarray, index_bits: int
) -> tuple[np.ndarray, np.ndarray]:
    """Relative-index code of strictly increasing flat ``positions``.

    Returns ``(gaps_minus_one, is_filler)``: one entry per stored element, fillers included.
    ``gaps_minus_one`` (int64) is in ``[0, 2**index_bits - 1]``; ``is_filler`` (bool) marks the
    inserted filler entries. Example: ``index_bits=3``, positions ``[0, 20]`` -> gaps
    ``[1, 8, 8, 4]`` (stored ``[0, 7, 7, 3]``), entries at ``[0, 8, 16, 20]``, two fillers.
    """
    span = 1 << _check_index_bits(index_bits)
    p = _check_positions(positions)
    if p.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, bool)
    gaps = np.diff(p, prepend=-1)  # first gap = position + 1
    fillers = (gaps - 1) // span
    real_at = np.cumsum(fillers + 1) - 1  # where each real entry lands in the output
    n_out = int(real_at[-1]) + 1
    out = np.full(n_out, span - 1, dtype=np.int64)
    out[real_at] = gaps - fillers * span - 1
    is_filler = np.ones(n_out, dtype=bool)
    is_filler[real_at] = False
    return out, is_filler


def relative_index_decode(
    gaps_minus_one: np.ndarray, total: int, index_bits: int | None = None
) -> np.ndarray:
    """Flat positions (int64, fillers included) of a relative-index code.

    Raises :class:`DsqFormatError` if a gap is negative, does not fit ``index_bits`` bits (when
    given; otherwise 32 bits), or the last position is not below ``total`` (a bad
    ``index_bits`` or ``total``, usually read from a file, raises it too).
    """
    given = MAX_INDEX_BITS if index_bits is None else index_bits
    bits = _check_index_bits(given, DsqFormatError)
    if isinstance(total, bool) or not isinstance(total, (int, np.integer)) or total < 0:
        raise DsqFormatError(f"relative index: bad element count {total!r}")
    g = np.asarray(gaps_minus_one)
    if g.dtype.kind not in "iu":
        raise DsqFormatError(f"relative index: gaps must be integers, got dtype {g.dtype}")
    g = g.reshape(-1)
    if g.size == 0:
        return np.zeros(0, np.int64)
    if g.dtype.kind == "i" and int(g.min()) < 0:
        raise DsqFormatError(f"relative index: negative gap {int(g.min())}")
    if int(g.max()) >= 1 << bits:
        raise DsqFormatError(
            f"relative index: gap-1 value {int(g.max())} does not fit {bits} bits"
        )
    positions = np.cumsum(g.astype(np.int64) + 1) - 1
    last = int(positions[-1])
    if last >= total:
        raise DsqFormatError(
            f"relative index: entry at position {last} is outside the {total} weights"
        )
    return positions


def filler_count(positions: np.ndarray, index_bits: int) -> int:
    """Number of filler entries :func:`relative_index_encode` would insert."""
    span = 1 << _check_index_bits(index_bits)
    p = _check_positions(positions)
    if p.size == 0:
        return 0
    return int(np.sum((np.diff(p, prepend=-1) - 1) // span))


def index_cost_bits(
    positions: np.ndarray,
    index_bits: int,
    *,
    cost: Literal["huffman", "fixed"] = "huffman",
    value_bits: float = 0.0,
) -> float:
    """Estimated stored bits of the relative index of ``positions`` at ``index_bits``.

    ``cost="fixed"``: every entry takes ``index_bits`` bits (Han et al.'s fixed-width index).
    ``cost="huffman"``: the exact size of ``huffman_encode(gaps_minus_one)``, header included.
    Both add ``value_bits`` per stored entry (fillers included): pass the cost of one stored
    value, so the fillers' extra values are counted.
    """
    gaps, _ = relative_index_encode(positions, index_bits)
    if cost == "fixed":
        index = gaps.size * int(index_bits)
    elif cost == "huffman":
        index = huffman_size_bits(gaps)
    else:
        raise ValueError(f"cost must be 'huffman' or 'fixed', got {cost!r}")
    return float(index) + float(value_bits) * gaps.size


def best_index_bits(
    positions: np.ndarray,
    total: int,
    candidates: Iterable[int] = range(1, 17),
    *,
    cost: Literal["huffman", "fixed"] = "huffman",
    value_bits: float = 0.0,
) -> int:
    """The index width in ``candidates`` minimizing :func:`index_cost_bits` (ties: narrower).

    Widths beyond the one that needs no fillers for ``total`` weights are skipped.
    """
    p = _check_positions(positions)
    if p.size and int(p[-1]) >= total:
        raise ValueError(f"position {int(p[-1])} is outside the {total} weights")
    widest_useful = max(1, int(total).bit_length())  # 2**b >= total: no fillers possible
    best: tuple[float, int] | None = None
    for b in sorted({_check_index_bits(c) for c in candidates}):
        if b > widest_useful and best is not None:
            break
        c = index_cost_bits(p, b, cost=cost, value_bits=value_bits)
        if best is None or c < best[0]:
            best = (c, b)
    if best is None:
        raise ValueError("best_index_bits: no candidate widths")
    return best[1]
