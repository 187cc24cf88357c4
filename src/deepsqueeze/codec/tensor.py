"""Store one tensor in the fewest bytes its values allow, losslessly.

The compressed form of a weight is visible in its values: pruning leaves zeros, weight sharing
leaves few distinct values. So the encoder does not need to know which method produced a tensor:
it builds every applicable encoding and keeps the smallest (the real byte count decides):

- ``dense``: the raw little-endian values;
- ``codebook``: a codebook of the distinct values + one index per element;
- ``sparse``: relative indices of the nonzero positions (Deep Compression's gaps with fillers)
  + the raw nonzero values;
- ``sparse-codebook``: relative indices + one codebook index per stored entry (Deep Compression).

Index streams are Huffman- or rANS-coded when that is smaller than fixed-width packing. The
relative index always ends at the tensor's last element (stored as a zero if it is zero), so the
decoder knows the tensor is fully covered and can bound its allocation by the entries it read.
Methods that change a layer's structure store it as a layer kind whose tensors come here too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from deepsqueeze.codec.ans import ans_decode, ans_encode
from deepsqueeze.codec.bits import pack_bits, unpack_bits
from deepsqueeze.codec.huffman import huffman_decode, huffman_encode
from deepsqueeze.codec.sparse import best_index_bits, relative_index_decode, relative_index_encode
from deepsqueeze.errors import DsqFormatError

ENCODINGS = ("dense", "codebook", "sparse", "sparse-codebook")
MAX_CODEBOOK = 1 << 16
MAX_INDEX_BITS = 16
DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "int64": np.dtype("<i8"),
          "int8": np.dtype("i1"), "bfloat16": np.dtype("<u2")}
"""``int8`` holds integer-valued floats in -128..127 (quantized weights and their codebooks)
exactly, in a byte each; the encoder picks it only when every value is such an integer.
``bfloat16`` is the upper half of each fp32 value (rounded to nearest even), stored as ``<u2``
(numpy has no bfloat16): the ``float16`` of TFLite with fp32's exponent range."""


def _raw(values: np.ndarray, dtype_name: str) -> bytes:
    """``values`` (float) in the stored dtype ``dtype_name``, as bytes."""
    if dtype_name == "bfloat16":
        u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2").tobytes()
    return values.astype(DTYPES[dtype_name]).tobytes()


@dataclass(frozen=True)
class EncodedTensor:
    """A tensor's manifest entry and its sections (section name → bytes)."""

    entry: dict[str, Any]
    sections: dict[str, bytes]

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.sections.values())


def _int8_exact(values: np.ndarray) -> bool:
    """Every value an integer in -128..127 (so ``int8`` stores it exactly)."""
    return bool(values.size) and bool(np.all(values == np.rint(values))) and \
        float(values.min()) >= -128 and float(values.max()) <= 127


def _with_int8(candidates: list[EncodedTensor], values: np.ndarray, key: str) -> None:
    """Add an ``int8`` copy of the last candidate when ``values`` (its section ``key``) are
    small integers: 1 byte per value instead of 2 or 4 (quantized weights, their codebooks)."""
    last = candidates[-1]
    if last.entry["dtype"] != "int8" and _int8_exact(values):
        sections = dict(last.sections)
        sections[key] = values.astype(DTYPES["int8"]).tobytes()
        candidates.append(EncodedTensor({**last.entry, "dtype": "int8"}, sections))


def _code_indices(symbols: np.ndarray, bits: int, huffman: bool,
                  ans: bool = False) -> tuple[bytes, str]:
    """The smallest of fixed-width packing, Huffman and (``ans``) rANS coding of an index
    stream."""
    best = (pack_bits(symbols, bits) if symbols.size else b"", "fixed")
    if huffman and symbols.size:
        coded = huffman_encode(symbols)
        if len(coded) < len(best[0]):
            best = (coded, "huffman")
    if ans and symbols.size and np.any(symbols != symbols.flat[0]):
        coded = ans_encode(symbols)
        if len(coded) < len(best[0]):
            best = (coded, "ans")
    return best


def _decode_indices(data: bytes, coding: str, bits: int, count: int, what: str) -> np.ndarray:
    if coding == "huffman":
        out = huffman_decode(data)
        if out.size != count:
            raise DsqFormatError(f"{what}: {out.size} symbols decoded, expected {count}")
        return out
    if coding == "ans":
        return ans_decode(data, count)
    if coding == "fixed":
        return unpack_bits(data, bits, count)
    raise DsqFormatError(f"{what}: unknown index coding {coding!r}")


def _bits_for(n_symbols: int) -> int:
    return max(1, math.ceil(math.log2(max(n_symbols, 2))))


def encode_tensor(
    name: str,
    tensor: torch.Tensor,
    *,
    huffman: bool = True,
    index_bits: int | str = "auto",
    codebook_dtype: str = "float32",
    dense_dtype: str = "float32",
    ans: bool = False,
) -> EncodedTensor:
    """Encode ``tensor`` (floating point) under section names prefixed by ``name``; index
    streams are rANS-coded too where that is smaller with ``ans`` (files older readers cannot
    open: off by default here, on by default in :class:`EncodeOptions`)."""
    t = tensor.detach().cpu()
    if not torch.is_floating_point(t):
        raw = t.numpy().astype(DTYPES["int64"]).tobytes()
        return EncodedTensor(
            {"name": name, "shape": list(t.shape), "encoding": "dense", "dtype": "int64"},
            {f"{name}:data": raw},
        )
    values = t.float().reshape(-1).numpy()
    shape = list(t.shape)
    base = {"name": name, "shape": shape}
    candidates: list[EncodedTensor] = []

    candidates.append(
        EncodedTensor(
            {**base, "encoding": "dense", "dtype": dense_dtype},
            {f"{name}:data": _raw(values, dense_dtype)},
        )
    )
    _with_int8(candidates, values, f"{name}:data")
    distinct, inverse = np.unique(values, return_inverse=True)
    exact_codebook = codebook_dtype == "float32" or dense_dtype == "float16" or (
        codebook_dtype == dense_dtype)
    if distinct.size <= MAX_CODEBOOK and distinct.size < values.size // 2 and exact_codebook:
        bits = _bits_for(distinct.size)
        coded, coding = _code_indices(inverse, bits, huffman, ans)
        candidates.append(
            EncodedTensor(
                {
                    **base,
                    "encoding": "codebook",
                    "codebook_size": int(distinct.size),
                    "value_bits": bits,
                    "value_coding": coding,
                    "dtype": codebook_dtype,
                },
                {
                    f"{name}:codebook": _raw(distinct, codebook_dtype),
                    f"{name}:values": coded,
                },
            )
        )
        _with_int8(candidates, distinct, f"{name}:codebook")
    nonzero = np.flatnonzero(values)
    if nonzero.size <= values.size * 4 // 5:  # sparse can win up to ~80 % density: let bytes decide
        positions = nonzero
        if values.size and (positions.size == 0 or positions[-1] != values.size - 1):
            positions = np.append(positions, values.size - 1)  # cover the whole tensor
        if index_bits == "auto":
            ib = best_index_bits(
                positions,
                values.size,
                range(1, MAX_INDEX_BITS + 1),
                cost="huffman" if huffman else "fixed",
                value_bits=5.0,
            )
        else:
            ib = int(index_bits)
        gaps, _ = relative_index_encode(positions, ib)
        entry_pos = np.cumsum(gaps + 1) - 1
        entry_vals = values[entry_pos]  # fillers and a zero last element read as 0.0
        gap_bytes, gap_coding = _code_indices(gaps, ib, huffman, ans)
        sparse_base = {
            **base,
            "index_bits": ib,
            "entries": int(gaps.size),
            "index_coding": gap_coding,
        }
        candidates.append(
            EncodedTensor(
                {**sparse_base, "encoding": "sparse", "dtype": dense_dtype},
                {
                    f"{name}:index": gap_bytes,
                    f"{name}:values": _raw(entry_vals, dense_dtype),
                },
            )
        )
        nz_distinct = np.unique(values[nonzero])
        if nz_distinct.size <= MAX_CODEBOOK - 1 and exact_codebook:
            # symbols 0..K-1 are the codebook, symbol K is the zero of fillers
            symbols = np.searchsorted(nz_distinct, entry_vals)
            symbols[entry_vals == 0] = nz_distinct.size
            bits = _bits_for(nz_distinct.size + 1)
            coded, coding = _code_indices(symbols, bits, huffman, ans)
            candidates.append(
                EncodedTensor(
                    {
                        **sparse_base,
                        "encoding": "sparse-codebook",
                        "codebook_size": int(nz_distinct.size),
                        "value_bits": bits,
                        "value_coding": coding,
                        "dtype": codebook_dtype,
                    },
                    {
                        f"{name}:index": gap_bytes,
                        f"{name}:codebook": _raw(nz_distinct, codebook_dtype),
                        f"{name}:values": coded,
                    },
                )
            )
            _with_int8(candidates, nz_distinct, f"{name}:codebook")
    return min(candidates, key=lambda c: c.nbytes)


def _field(entry: dict[str, Any], key: str, kind: type, name: str) -> Any:
    value = entry.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DsqFormatError(f"tensor {name}: field {key!r} missing or not a {kind.__name__}")
    return value


def _section(sections: dict[str, bytes], key: str) -> bytes:
    if key not in sections:
        raise DsqFormatError(f"section {key!r} is missing")
    return sections[key]


def _floats(data: bytes, dtype_name: str, count: int | None, what: str) -> np.ndarray:
    if dtype_name not in DTYPES:
        raise DsqFormatError(f"{what}: unknown dtype {dtype_name!r}")
    dtype = DTYPES[dtype_name]
    if len(data) % dtype.itemsize or (count is not None and len(data) != count * dtype.itemsize):
        raise DsqFormatError(
            f"{what}: {len(data)} bytes do not hold "
            f"{'a whole number of' if count is None else count} {dtype_name} values"
        )
    out = np.frombuffer(data, dtype=dtype)
    if dtype_name == "bfloat16":
        return (out.astype(np.uint32) << 16).view(np.float32)
    return out


def _codebook_and_symbols(
    entry: dict[str, Any], sections: dict[str, bytes], name: str, dtype: str, count: int,
    zero_symbol: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """The fp32 codebook (plus a trailing 0.0 for fillers if ``zero_symbol``) and its indices."""
    size = _field(entry, "codebook_size", int, name)
    codebook = _floats(_section(sections, f"{name}:codebook"), dtype, size, name)
    codebook = codebook.astype(np.float32)
    if zero_symbol:
        codebook = np.append(codebook, np.float32(0))
    symbols = _decode_indices(
        _section(sections, f"{name}:values"), entry.get("value_coding"),
        _field(entry, "value_bits", int, name), count, name,
    )
    if symbols.size and int(symbols.max()) >= codebook.size:
        raise DsqFormatError(f"tensor {name}: codebook index out of range")
    return codebook, symbols


def sparse_positions(
    entry: dict[str, Any], sections: dict[str, bytes], name: str, total: int
) -> np.ndarray:
    """Flat positions of a sparse entry's stored values (fillers included), fully checked."""
    ib = _field(entry, "index_bits", int, name)
    entries = _field(entry, "entries", int, name)
    # every entry advances at least one position; fixed and Huffman gaps cost >= 1 bit each
    # (rANS gaps may cost less: for them the tensor's size is the bound)
    bits_bound = (entry.get("index_coding") != "ans"
                  and entries > 8 * len(sections.get(f"{name}:index", b"")) + 1)
    if not 1 <= ib <= MAX_INDEX_BITS or not 0 <= entries <= total or bits_bound:
        raise DsqFormatError(f"tensor {name}: index_bits {ib} or entry count {entries} invalid")
    if total > entries * (1 << ib):
        raise DsqFormatError(f"tensor {name}: {entries} entries cannot cover {total} elements")
    gaps = _decode_indices(
        _section(sections, f"{name}:index"), entry.get("index_coding"), ib, entries, name
    )
    positions = relative_index_decode(gaps, total, ib)
    if entries and int(positions[-1]) != total - 1:
        raise DsqFormatError(f"tensor {name}: relative index does not end at the last element")
    return positions


def decode_tensor(
    entry: dict[str, Any], sections: dict[str, bytes], max_elements: int = 1 << 28
) -> torch.Tensor:
    """Rebuild a tensor from its manifest entry; every inconsistency raises DsqFormatError."""
    name = _field(entry, "name", str, "?")
    shape = _field(entry, "shape", list, name)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise DsqFormatError(f"tensor {name}: bad shape {shape}")
    total = math.prod(shape)
    if total > max_elements:
        raise DsqFormatError(f"tensor {name}: {total} elements exceeds the limit {max_elements}")
    encoding = _field(entry, "encoding", str, name)
    dtype = _field(entry, "dtype", str, name)
    if encoding == "dense":
        flat = _floats(_section(sections, f"{name}:data"), dtype, total, name)
        out = flat.astype(np.int64 if dtype == "int64" else np.float32)
        return torch.from_numpy(out.copy()).reshape(shape)
    if encoding not in ENCODINGS:
        raise DsqFormatError(f"tensor {name}: unknown encoding {encoding!r}; known: {ENCODINGS}")
    if encoding == "codebook":
        codebook, symbols = _codebook_and_symbols(entry, sections, name, dtype, total, False)
        return torch.from_numpy(codebook[symbols]).reshape(shape)
    positions = sparse_positions(entry, sections, name, total)
    entries = _field(entry, "entries", int, name)
    if encoding == "sparse":
        vals = _floats(_section(sections, f"{name}:values"), dtype, entries, name)
        vals = vals.astype(np.float32)
    else:
        codebook, symbols = _codebook_and_symbols(entry, sections, name, dtype, entries, True)
        vals = codebook[symbols]
    out = np.zeros(total, np.float32)
    out[positions] = vals
    return torch.from_numpy(out).reshape(shape)
