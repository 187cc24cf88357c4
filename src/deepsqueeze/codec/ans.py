"""rANS coding of non-negative integer symbol arrays with a stored static model.

Huffman spends a whole number of bits per symbol: on skewed streams (a pruned layer's 2-bit
codebook indices, the gaps of its positions) that is up to ~0.5 bit per symbol above the
entropy. Asymmetric numeral systems (Duda 2013) code within a fraction of a percent of it. The
coder is the ``constriction`` library's (Bamler 2022): a stack-based rANS coder with 32-bit
words (``constriction.stream.stack.AnsCoder``); what this module adds is the stream's
self-describing header and the model's quantization, so that the decoder rebuilds exactly the
encoder's model.

Stream layout (docs/format.md, "ANS stream")::

    varint  count           number of coded symbols; 0 ends the stream here
    varint  k               distinct symbols, 2 <= k <= count (one symbol: not ANS-coded)
    u8      desc            bits 0-3: P - 1, the model's precision (sum of frequencies 2**P,
                            P in 1..16); bits 4-5: alphabet mode (0 contiguous, 1 gap list,
                            2 bitmap, as in the Huffman stream); bits 6-7 zero
    varint  first           smallest symbol
    ...     alphabet        as in the Huffman stream (mode 1: k - 1 gap varints; mode 2:
                            varint span + bitmap)
    varint* k               frequencies - 1 (each frequency >= 1, their sum exactly 2**P)
    u32le*  words           the coder's compressed words (at least one)

Symbol ``i`` of the alphabet has probability ``f_i / 2**P``; the words are what
``AnsCoder.encode_reverse`` writes for the symbols' alphabet positions under
``constriction.stream.model.Categorical(f / 2**P, perfect=False)``. The decoder reads exactly
``count`` symbols and requires the words to be exactly their encoding (it re-encodes them):
extra, missing or altered words and a count that lies are errors.
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
)
from deepsqueeze.codec.huffman import MAX_ALPHABET, MAX_SYMBOL, read_alphabet, write_alphabet
from deepsqueeze.errors import DsqFormatError

MAX_PRECISION = 16
"""Largest model precision P (frequencies sum to 2**P); constriction's coder takes up to 24."""
_PRECISIONS = range(4, MAX_PRECISION + 1)


def _constriction():  # imported on use: a file without ANS streams never needs the library
    import constriction

    return constriction


def quantize_frequencies(counts: np.ndarray, precision: int) -> np.ndarray:
    """Integer frequencies >= 1 summing to exactly ``2**precision``, close to proportional to
    ``counts`` (all > 0; at most ``2**precision`` of them)."""
    total = 1 << precision
    k = counts.size
    if k > total:
        raise ValueError(f"{k} symbols need a precision of at least {int(k - 1).bit_length()}")
    scaled = counts.astype(np.float64) * (total / counts.sum())
    freqs = np.maximum(1, np.floor(scaled)).astype(np.int64)
    excess = int(freqs.sum()) - total
    if excess < 0:  # hand the rest to the largest remainders
        order = np.argsort(-(scaled - freqs), kind="stable")
        freqs[order[:-excess]] += 1
    while excess > 0:  # take from the largest frequencies (those lose the least per unit)
        order = np.argsort(-freqs, kind="stable")
        room = freqs[order] - 1
        take = np.minimum(room, 1)
        take[np.cumsum(take) > excess] = 0
        freqs[order] -= take
        excess -= int(take.sum())
    return freqs


def _payload(index: np.ndarray, freqs: np.ndarray, precision: int) -> bytes:
    c = _constriction()
    model = c.stream.model.Categorical(freqs / float(1 << precision), perfect=False)
    coder = c.stream.stack.AnsCoder()
    coder.encode_reverse(index.astype(np.int32), model)
    return coder.get_compressed().astype("<u4").tobytes()


def _header(count: int, used: np.ndarray, freqs: np.ndarray, precision: int) -> bytes:
    mode, first, alphabet = write_alphabet(used)
    out = bytearray(encode_uvarint(count))
    out += encode_uvarint(used.size)
    out.append((precision - 1) | (mode << 4))
    out += encode_uvarint(first)
    out += alphabet
    out += encode_uvarints(freqs - 1)
    return bytes(out)


def ans_encode(symbols: np.ndarray) -> bytes:
    """Encode a non-negative integer array (flattened) as a self-describing rANS stream, with
    the model precision that makes the stream smallest."""
    s = np.asarray(symbols).reshape(-1)
    if s.dtype.kind not in "biu":
        raise TypeError(f"ANS symbols must be integers, got dtype {s.dtype}")
    if s.size == 0:
        return encode_uvarint(0)
    if (s.dtype.kind == "i" and int(s.min()) < 0) or int(s.max()) > MAX_SYMBOL:
        raise ValueError(f"ANS symbols must be in 0..{MAX_SYMBOL}")
    used, index, counts = np.unique(s.astype(np.int64), return_inverse=True, return_counts=True)
    if not 2 <= used.size <= MAX_ALPHABET:
        raise ValueError(f"ANS codes 2..{MAX_ALPHABET} distinct symbols, got {used.size} "
                         "(a single symbol costs nothing to Huffman or fixed-width coding)")
    # estimated size per precision (header + sum count_i * -log2 p_i bits + one spare word);
    # the two best estimates are really encoded and the smaller kept
    estimates = []
    for precision in _PRECISIONS:
        if used.size > 1 << precision:
            continue
        freqs = quantize_frequencies(counts, precision)
        bits = float(np.dot(counts, precision - np.log2(freqs)))
        head = _header(s.size, used, freqs, precision)
        estimates.append((len(head) + 4 * (int(bits) // 32 + 2), precision, freqs, head))
    if not estimates:
        raise ValueError(f"{used.size} distinct symbols exceed 2**{MAX_PRECISION}")
    estimates.sort(key=lambda e: (e[0], e[1]))
    streams = [head + _payload(index, freqs, precision)
               for _, precision, freqs, head in estimates[:2]]
    return min(streams, key=len)


def ans_decode(data: BytesLike, expected: int) -> np.ndarray:
    """Decode a stream from :func:`ans_encode` into an ``int64`` array.

    ``expected`` (the count the manifest promises, which bounds the allocation: a stream's size
    does not, a near-certain symbol costs almost no bits) must match the stream's count.
    Raises :class:`DsqFormatError` for any malformed stream: bad header or frequency table,
    a count that does not match, words missing or left over.
    """
    raw = as_u8(data)
    count, pos = decode_uvarint(raw, 0)
    if count != expected:
        raise DsqFormatError(f"ANS stream: holds {count} symbols, expected {expected}")
    if count == 0:
        if pos != raw.size:
            raise DsqFormatError(f"ANS stream: {raw.size - pos} bytes after an empty stream")
        return np.zeros(0, dtype=np.int64)
    k, pos = decode_uvarint(raw, pos)
    if not 2 <= k <= min(count, MAX_ALPHABET, 1 << MAX_PRECISION):
        raise DsqFormatError(
            f"ANS stream: {k} distinct symbols for {count} symbols (must be 2..count)"
        )
    if pos >= raw.size:
        raise DsqFormatError("ANS stream: truncated header")
    desc = int(raw[pos])
    pos += 1
    precision, mode = (desc & 15) + 1, desc >> 4
    if precision > MAX_PRECISION or k > 1 << precision:
        raise DsqFormatError(f"ANS stream: bad descriptor byte 0x{desc:02x}")
    used, pos = read_alphabet(raw, pos, k, mode, "ANS stream")
    freqs, pos = decode_uvarints(raw, pos, k)
    freqs = freqs + 1
    if int(freqs.sum()) != 1 << precision:
        raise DsqFormatError(
            f"ANS stream: frequencies sum to {int(freqs.sum())}, expected 2**{precision}"
        )
    body = raw[pos:]
    if body.size == 0 or body.size % 4:
        raise DsqFormatError(f"ANS stream: {body.size} payload bytes, not whole 32-bit words")
    words = body.view("<u4").astype(np.uint32)
    c = _constriction()
    model = c.stream.model.Categorical(freqs / float(1 << precision), perfect=False)
    try:
        coder = c.stream.stack.AnsCoder(words)
        index = coder.decode(model, count)
    except (ValueError, RuntimeError) as exc:
        raise DsqFormatError(f"ANS stream: {exc}") from exc
    index = np.asarray(index, dtype=np.int64)
    # the words must be exactly the encoding of what they decode to: words left over, symbols
    # read past the data (an empty coder still yields symbols) or altered words fail here
    if not coder.is_empty() or _payload(index, freqs, precision) != body.tobytes():
        raise DsqFormatError(
            f"ANS stream: the words are not the encoding of {count} symbols (count or data "
            "damaged)"
        )
    return used[index]
