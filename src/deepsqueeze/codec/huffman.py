"""Canonical Huffman coding of non-negative integer symbol arrays.

Stream layout (all documented in docs/format.md, "Huffman stream")::

    varint  count                      number of coded symbols; 0 ends the stream here
    varint  k                          distinct symbols, 1 <= k <= count
    u8      desc                       bits 0-2: lw = bit width of (length - 1), 0..5
                                       bits 3-4: alphabet mode (0 = contiguous,
                                                 1 = gap list, 2 = bitmap)
                                       bits 5-7: zero
    varint  first                      smallest symbol
    varint* k - 1 gaps                 mode 1 only: symbol[i] - symbol[i-1] - 1
    varint  span, bytes bitmap         mode 2 only: span = last - first; span + 1 bits,
                                       bit i set iff first + i is used, MSB-first
    bytes   lengths                    k values (length - 1) packed at lw bits, MSB-first
    bytes   bitstream                  the codes, MSB-first, zero-padded to a byte

Code lengths come from the two-queue form of Huffman's algorithm (a heap whose ties always go
to the leaf, then to the lower symbol), so the output is deterministic. Lengths above the limit
(24 bits by default) are repaired with the bit-count adjustment of JPEG Annex K.3. Codes are
canonical: ordered by (length, symbol).

Encoding is fully vectorized. Decoding is too: the code length starting at *every* bit position
is computed at once (a window compare against the canonical per-length limits), then the chain
of code starts from bit 0 is followed by pointer doubling.
"""

from __future__ import annotations

import numpy as np

from deepsqueeze.codec.bits import (
    BytesLike,
    as_u8,
    decode_uvarint,
    decode_uvarints,
    encode_uvarint,
    encode_uvarints,
    pack_bits,
    unpack_bits,
)
from deepsqueeze.errors import DsqFormatError

#: Longest code length any stream may use (the decoder rejects longer ones).
MAX_CODE_LENGTH = 24
#: Largest number of distinct symbols in one stream.
MAX_ALPHABET = 1 << 20
#: Largest symbol value.
MAX_SYMBOL = (1 << 32) - 1

_MODE_CONTIGUOUS = 0
_MODE_LIST = 1
_MODE_BITMAP = 2
_DENSE_LIMIT = 1 << 22  # below this max symbol value, count with bincount
_ENCODE_CHUNK = 1 << 18  # symbols per bit-matrix pass when encoding
_DECODE_CHUNK = 1 << 15  # bit positions per pointer-doubling pass when decoding
_LUT_BITS = 16  # decoding table size: 2**16 entries


# --------------------------------------------------------------------------- code lengths


def _check_symbols(symbols: np.ndarray) -> np.ndarray:
    s = np.asarray(symbols)
    if s.dtype.kind not in "biu":
        raise TypeError(f"Huffman symbols must be integers, got dtype {s.dtype}")
    s = s.reshape(-1)
    if s.size:
        if s.dtype.kind == "i" and int(s.min()) < 0:
            raise ValueError("Huffman symbols must be non-negative")
        if int(s.max()) > MAX_SYMBOL:
            raise ValueError(f"Huffman symbol {int(s.max())} exceeds {MAX_SYMBOL}")
    return s.astype(np.int64, copy=False)


def _histogram(s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sorted used symbols, their counts, index of each input symbol into them)."""
    if int(s.max()) < _DENSE_LIMIT:
        counts = np.bincount(s)
        used = np.flatnonzero(counts)
        lut = np.zeros(counts.size, dtype=np.int64)
        lut[used] = np.arange(used.size)
        return used.astype(np.int64), counts[used].astype(np.int64), lut[s]
    used, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    return used.astype(np.int64), counts.astype(np.int64), inverse.reshape(-1)


def _huffman_lengths(freqs: np.ndarray) -> np.ndarray:
    """Unlimited Huffman code lengths for ``freqs`` (all > 0), in the same order."""
    k = freqs.size
    if k == 1:
        return np.ones(1, dtype=np.int64)
    order = np.argsort(freqs, kind="stable")  # ties: lower symbol first
    leaf_w = freqs[order].tolist()
    node_w: list[int] = []
    parent = [0] * (2 * k - 1)  # nodes 0..k-1 = leaves in `order`, k.. = merged nodes
    i = j = 0
    for t in range(k - 1):
        picked = []
        for _ in range(2):
            if i < k and (j >= len(node_w) or leaf_w[i] <= node_w[j]):
                picked.append((i, leaf_w[i]))
                i += 1
            else:
                picked.append((k + j, node_w[j]))
                j += 1
        node = k + t
        parent[picked[0][0]] = node
        parent[picked[1][0]] = node
        node_w.append(picked[0][1] + picked[1][1])
    depth = [0] * (2 * k - 1)
    for node in range(2 * k - 3, -1, -1):  # parents always have larger ids than children
        depth[node] = depth[parent[node]] + 1
    lengths = np.empty(k, dtype=np.int64)
    lengths[order] = depth[:k]
    return lengths


def _limit_lengths(lengths: np.ndarray, freqs: np.ndarray, max_len: int) -> np.ndarray:
    """Re-shape a complete code so no length exceeds ``max_len`` (JPEG Annex K.3)."""
    longest = int(lengths.max())
    if longest <= max_len:
        return lengths
    bl = np.bincount(lengths, minlength=longest + 1).tolist()
    for n in range(longest, max_len, -1):
        while bl[n] > 0:
            m = n - 2
            while m > 0 and bl[m] == 0:
                m -= 1
            if m < 1:  # impossible for a complete code with k <= 2**max_len leaves
                raise RuntimeError("code-length limiting failed")
            # two leaves at depth n become: one leaf at n-1, and a leaf at m splits in two.
            bl[n] -= 2
            bl[n - 1] += 1
            bl[m + 1] += 2
            bl[m] -= 1
    new_sorted = np.repeat(np.arange(max_len + 1), bl[: max_len + 1])
    # most frequent symbols get the shortest codes; ties by the old length, then symbol.
    order = np.lexsort((np.arange(freqs.size), lengths, -freqs))
    out = np.empty_like(lengths)
    out[order] = new_sorted
    return out


def _lengths_for(freqs: np.ndarray, max_len: int) -> np.ndarray:
    if not 1 <= max_len <= MAX_CODE_LENGTH:
        raise ValueError(f"max_len must be in 1..{MAX_CODE_LENGTH}, got {max_len}")
    if freqs.size > (1 << max_len):
        raise ValueError(f"{freqs.size} distinct symbols cannot have codes of <= {max_len} bits")
    if freqs.size > MAX_ALPHABET:
        raise ValueError(f"{freqs.size} distinct symbols exceed the limit of {MAX_ALPHABET}")
    return _limit_lengths(_huffman_lengths(freqs), freqs, max_len)


def huffman_code_lengths(symbols: np.ndarray, max_len: int = MAX_CODE_LENGTH) -> dict[int, int]:
    """``{symbol: code length in bits}`` for the symbols used in ``symbols``."""
    s = _check_symbols(symbols)
    if s.size == 0:
        return {}
    used, freqs, _ = _histogram(s)
    return dict(zip(used.tolist(), _lengths_for(freqs, max_len).tolist(), strict=True))


def _canonical_codes(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Canonical codes for ``lengths`` (symbols in ascending order); returns (codes, rank order).

    ``order`` lists symbol indices sorted by (length, symbol): the canonical order.
    """
    order = np.lexsort((np.arange(lengths.size), lengths))
    sorted_len = lengths[order]
    max_len = int(sorted_len[-1])
    bl = np.bincount(sorted_len, minlength=max_len + 1)
    first = np.zeros(max_len + 2, dtype=np.int64)
    code = 0
    for n in range(1, max_len + 1):
        code = (code + int(bl[n - 1])) << 1  # bl[0] == 0, so first[1] == 0
        first[n] = code
    offset = np.concatenate(([0], np.cumsum(bl)))  # symbols with length < n
    rank = np.arange(lengths.size) - offset[sorted_len]
    codes = np.empty(lengths.size, dtype=np.int64)
    codes[order] = first[sorted_len] + rank
    return codes, order


# --------------------------------------------------------------------------- encode


def write_alphabet(used: np.ndarray) -> tuple[int, int, bytes]:
    """``(mode, first symbol, bytes after it)`` of the sorted used symbols, in the smallest of
    the three alphabet forms (contiguous, gap list, bitmap); shared with the ANS stream."""
    k = used.size
    lo, hi = int(used[0]), int(used[-1])
    if hi - lo == k - 1:
        return _MODE_CONTIGUOUS, lo, b""
    as_list = encode_uvarints(np.diff(used) - 1)
    as_bitmap = encode_uvarint(hi - lo)
    if len(as_bitmap) + (hi - lo + 8) // 8 < len(as_list):
        present = np.zeros(hi - lo + 1, dtype=np.uint8)
        present[used - lo] = 1
        return _MODE_BITMAP, lo, as_bitmap + np.packbits(present).tobytes()
    return _MODE_LIST, lo, as_list


def _header(count: int, used: np.ndarray, lengths: np.ndarray) -> bytes:
    k = used.size
    lw = (int(lengths.max()) - 1).bit_length()
    mode, lo, alphabet = write_alphabet(used)
    out = bytearray(encode_uvarint(count))
    out += encode_uvarint(k)
    out.append(lw | (mode << 3))
    out += encode_uvarint(lo)
    out += alphabet
    if lw:
        out += pack_bits(lengths - 1, lw)
    return bytes(out)


def huffman_size_bits(
    symbols: np.ndarray, *, include_header: bool = True, max_len: int = MAX_CODE_LENGTH
) -> int:
    """Size of ``huffman_encode(symbols)`` in bits, without building the bitstream.

    With ``include_header=False``: only the code bits, ``sum(freq * length)`` (no padding).
    """
    s = _check_symbols(symbols)
    if s.size == 0:
        return 8 if include_header else 0
    used, freqs, _ = _histogram(s)
    lengths = _lengths_for(freqs, max_len)
    payload = int(np.dot(freqs, lengths))
    if not include_header:
        return payload
    return 8 * len(_header(s.size, used, lengths)) + 8 * ((payload + 7) // 8)


def huffman_encode(symbols: np.ndarray, max_len: int = MAX_CODE_LENGTH) -> bytes:
    """Encode a non-negative integer array (any shape, flattened) as a self-describing stream."""
    s = _check_symbols(symbols)
    if s.size == 0:
        return encode_uvarint(0)
    used, freqs, index = _histogram(s)
    lengths = _lengths_for(freqs, max_len)
    codes, _ = _canonical_codes(lengths)
    longest = int(lengths.max())
    # each code left-justified in a big-endian u32; unpack its bits, keep the first `length`.
    just = (codes << (32 - lengths)).astype(">u4")
    cols = np.arange(longest)
    sym_len = lengths[index]
    bit_array = np.empty(int(sym_len.sum()), dtype=np.uint8)
    written = 0
    for start in range(0, s.size, _ENCODE_CHUNK):
        idx = index[start : start + _ENCODE_CHUNK]
        lens = sym_len[start : start + _ENCODE_CHUNK]
        word_bytes = just[idx].view(np.uint8).reshape(idx.size, 4)
        matrix = np.unpackbits(word_bytes, axis=1)[:, :longest]
        chunk_bits = matrix[cols[None, :] < lens[:, None]]
        bit_array[written : written + chunk_bits.size] = chunk_bits
        written += chunk_bits.size
    return _header(s.size, used, lengths) + np.packbits(bit_array).tobytes()


# --------------------------------------------------------------------------- decode


def read_alphabet(
    raw: np.ndarray, pos: int, k: int, mode: int, what: str
) -> tuple[np.ndarray, int]:
    """The ``k`` sorted symbols written by :func:`write_alphabet` (its first symbol at
    ``pos``) and the position after them; every symbol checked against :data:`MAX_SYMBOL`."""
    if mode not in (_MODE_CONTIGUOUS, _MODE_LIST, _MODE_BITMAP):
        raise DsqFormatError(f"{what}: unknown alphabet mode {mode}")
    first, pos = decode_uvarint(raw, pos)
    if first > MAX_SYMBOL:
        raise DsqFormatError(f"{what}: symbol {first} exceeds {MAX_SYMBOL}")
    if mode == _MODE_CONTIGUOUS:
        symbols = first + np.arange(k, dtype=np.int64)
    elif mode == _MODE_LIST:
        gaps, pos = decode_uvarints(raw, pos, k - 1)
        if gaps.size and int(gaps.max()) > MAX_SYMBOL:
            raise DsqFormatError(f"{what}: symbol gap out of range")
        symbols = first + np.concatenate(([0], np.cumsum(gaps + 1)))
    else:
        span, pos = decode_uvarint(raw, pos)
        nbytes = (span + 8) // 8
        if span > MAX_SYMBOL or pos + nbytes > raw.size:
            raise DsqFormatError(f"{what}: truncated or oversized symbol bitmap")
        present = np.unpackbits(raw[pos : pos + nbytes])
        pos += nbytes
        if present[span + 1 :].any() or not (present[0] and present[span]):
            raise DsqFormatError(f"{what}: symbol bitmap has bad end or padding bits")
        symbols = first + np.flatnonzero(present)
        if symbols.size != k:
            raise DsqFormatError(
                f"{what}: symbol bitmap holds {symbols.size} symbols, header says {k}"
            )
    if int(symbols[-1]) > MAX_SYMBOL:
        raise DsqFormatError(f"{what}: symbol {int(symbols[-1])} exceeds {MAX_SYMBOL}")
    return symbols, pos


def _read_header(raw: np.ndarray) -> tuple[int, np.ndarray, np.ndarray, int]:
    """Parse and validate the header; returns (count, symbols, lengths, bitstream start)."""
    count, pos = decode_uvarint(raw, 0)
    if count == 0:
        if pos != raw.size:
            raise DsqFormatError(f"Huffman stream: {raw.size - pos} bytes after an empty stream")
        return 0, np.zeros(0, np.int64), np.zeros(0, np.int64), pos
    if count > 8 * raw.size:  # early, loose form of the 1-bit-per-symbol bound: caps k too
        raise DsqFormatError(
            f"Huffman stream: {count} symbols cannot fit in a {raw.size}-byte stream"
        )
    k, pos = decode_uvarint(raw, pos)
    if not 1 <= k <= min(count, MAX_ALPHABET):
        raise DsqFormatError(
            f"Huffman stream: {k} distinct symbols for {count} symbols "
            f"(must be 1..min(count, {MAX_ALPHABET}))"
        )
    if pos >= raw.size:
        raise DsqFormatError("Huffman stream: truncated header")
    desc = int(raw[pos])
    pos += 1
    lw, mode = desc & 7, desc >> 3
    if lw > 5 or mode not in (_MODE_CONTIGUOUS, _MODE_LIST, _MODE_BITMAP):
        raise DsqFormatError(f"Huffman stream: bad descriptor byte 0x{desc:02x}")
    symbols, pos = read_alphabet(raw, pos, k, mode, "Huffman stream")
    if lw == 0:
        lengths = np.ones(k, dtype=np.int64)
    else:
        nbytes = (k * lw + 7) // 8
        if pos + nbytes > raw.size:
            raise DsqFormatError("Huffman stream: truncated code-length table")
        lengths = unpack_bits(raw[pos : pos + nbytes], lw, k) + 1
        pos += nbytes
    if int(lengths.max()) > MAX_CODE_LENGTH:
        raise DsqFormatError(
            f"Huffman stream: code length {int(lengths.max())} exceeds {MAX_CODE_LENGTH}"
        )
    if k == 1:
        if int(lengths[0]) != 1:
            raise DsqFormatError("Huffman stream: a single symbol must have a 1-bit code")
    else:
        kraft = int(np.sum(np.left_shift(1, MAX_CODE_LENGTH - lengths)))
        if kraft != 1 << MAX_CODE_LENGTH:
            raise DsqFormatError(
                "Huffman stream: code lengths do not form a complete prefix code "
                f"(Kraft sum {kraft / (1 << MAX_CODE_LENGTH):.6f}, expected 1)"
            )
    return count, symbols, lengths, pos


def huffman_decode(data: BytesLike) -> np.ndarray:
    """Decode a stream from :func:`huffman_encode` into an ``int64`` array.

    Raises :class:`DsqFormatError` for any malformed stream: bad header, invalid code lengths,
    a symbol count the bitstream cannot hold, a bitstream that ends early, extra bytes or
    non-zero padding bits.
    """
    raw = as_u8(data)
    count, symbols, lengths, pos = _read_header(raw)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    stream = raw[pos:]
    n_bits = 8 * stream.size
    if count > n_bits:
        raise DsqFormatError(
            f"Huffman stream: {count} symbols cannot fit in {stream.size} bitstream bytes"
        )
    _, order = _canonical_codes(lengths)
    sorted_syms = symbols[order]
    longest = int(lengths.max())
    bl = np.bincount(lengths, minlength=longest + 1)
    first = np.zeros(longest + 2, dtype=np.int64)
    code = 0
    for n in range(2, longest + 1):
        code = (code + int(bl[n - 1])) << 1
        first[n] = code
    offset = np.concatenate(([0], np.cumsum(bl)))
    # window value w (the next `longest` bits) starts a code of length n iff
    # limit[n-1] <= w < limit[n]; so length = 1 + #{n : limit[n] <= w}.
    per_len = np.arange(1, longest + 1)
    limits = (first[per_len] + bl[per_len]) << (longest - per_len)
    # Table lookup on the first min(longest, 16) bits; a limit for a length <= 16 is a multiple
    # of 2**(longest - 16), so the prefix decides those lengths exactly. Longer ones (> 16,
    # marked by a table value > 16) are resolved by a search on the full window.
    lut_bits = min(longest, _LUT_BITS)
    lut_shift = longest - lut_bits
    lut = np.searchsorted(limits, np.arange(1 << lut_bits) << lut_shift, side="right") + 1
    # 32-bit big-endian word starting at each byte (3 zero bytes of padding at the end).
    padded = np.zeros(stream.size + 3, dtype=np.int64)
    padded[: stream.size] = stream
    words = (padded[:-3] << 24) | (padded[1:-2] << 16) | (padded[2:-1] << 8) | padded[3:]
    low_shift = 32 - longest

    out = np.empty(count, dtype=np.int64)
    produced = 0
    p = 0  # bit position of the next code
    while produced < count:
        if p >= n_bits:
            raise DsqFormatError(
                f"Huffman stream: bitstream ended after {produced} of {count} symbols"
            )
        hi = min(p + _DECODE_CHUNK, n_bits)
        size = hi - p
        pos_bits = np.arange(p, hi, dtype=np.int64)
        win = ((words[pos_bits >> 3] << (pos_bits & 7)) & 0xFFFFFFFF) >> low_shift
        code_len = lut[win >> lut_shift]
        if lut_shift:
            slow = np.flatnonzero(code_len > lut_bits)
            code_len[slow] = np.searchsorted(limits, win[slow], side="right") + 1
        # jump[i]: local start of the code after the one starting at i (size = "left chunk").
        jump = np.empty(size + 1, dtype=np.int64)
        np.minimum(np.arange(size) + code_len, size, out=jump[:size])
        jump[size] = size
        need = count - produced
        chain = np.zeros(1, dtype=np.int64)
        while chain.size < need:
            nxt = jump[chain]
            inside = int(np.count_nonzero(nxt < size))  # leaving is final: a prefix stays
            chain = np.concatenate((chain, nxt[:inside]))
            if inside < nxt.size:
                break
            jump = jump[jump]
        chain = chain[:need]
        lens = code_len[chain]
        if int(lens.max()) > longest:
            raise DsqFormatError(
                f"Huffman stream: invalid code at bit {p + int(chain[np.argmax(lens > longest)])}"
            )
        codes = win[chain] >> (longest - lens)
        out[produced : produced + chain.size] = sorted_syms[codes - first[lens] + offset[lens]]
        produced += chain.size
        p += int(chain[-1]) + int(lens[-1])
    if p > n_bits:
        raise DsqFormatError(
            f"Huffman stream: bitstream truncated ({n_bits} bits, codes need {p})"
        )
    spare = n_bits - p
    if spare > 7:
        raise DsqFormatError(f"Huffman stream: {spare // 8} trailing bytes after the last code")
    if spare and int(stream[-1]) & ((1 << spare) - 1):
        raise DsqFormatError("Huffman stream: non-zero padding bits")
    return out
