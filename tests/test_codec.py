"""Tests of the .dsq codec: bit packing, varints, Huffman, relative index, container."""

from __future__ import annotations

import json
import os
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepsqueeze.codec import (
    HEADER_SIZE,
    MAGIC,
    MAX_CODE_LENGTH,
    best_index_bits,
    decode_uvarint,
    decode_uvarints,
    dsq_bytes,
    encode_uvarint,
    encode_uvarints,
    filler_count,
    huffman_code_lengths,
    huffman_decode,
    huffman_encode,
    huffman_size_bits,
    index_cost_bits,
    pack_bits,
    packed_size,
    parse_dsq,
    read_dsq,
    relative_index_decode,
    relative_index_encode,
    unpack_bits,
    write_dsq,
    zigzag_decode,
    zigzag_encode,
)
from deepsqueeze.errors import DsqFormatError

from .dsq_forge import manifest_text

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ============================================================================ bits


@pytest.mark.parametrize("bits", range(1, 33))
def test_pack_bits_round_trip_every_width(bits: int) -> None:
    rng = np.random.default_rng(bits)
    for count in (0, 1, 7, 8, 9, 61):
        values = rng.integers(0, 1 << bits, count, dtype=np.int64)
        if count:
            values[0] = (1 << bits) - 1  # the largest value fits
        data = pack_bits(values, bits)
        assert len(data) == packed_size(count, bits)
        np.testing.assert_array_equal(unpack_bits(data, bits, count), values)


def test_pack_bits_is_msb_first_with_zero_padding() -> None:
    assert pack_bits(np.array([1, 0, 3]), 2) == bytes([0b01_00_11_00])
    assert pack_bits(np.array([5]), 3) == bytes([0b101_00000])
    assert pack_bits(np.array([0x123]), 12) == bytes([0x12, 0x30])


def test_pack_bits_rejects_values_that_do_not_fit() -> None:
    with pytest.raises(ValueError):
        pack_bits(np.array([8]), 3)
    with pytest.raises(ValueError):
        pack_bits(np.array([-1]), 3)
    with pytest.raises(ValueError):
        pack_bits(np.array([1]), 0)
    with pytest.raises(TypeError):
        pack_bits(np.array([1.0]), 3)


def test_unpack_bits_validates_lengths() -> None:
    data = pack_bits(np.arange(10), 4)
    with pytest.raises(DsqFormatError, match="too short"):
        unpack_bits(data[:-1], 4, 10)
    with pytest.raises(DsqFormatError, match="trailing"):
        unpack_bits(data + b"\x00", 4, 10)
    np.testing.assert_array_equal(unpack_bits(data + b"\x00", 4, 10, exact=False), np.arange(10))
    with pytest.raises(DsqFormatError, match="padding"):
        unpack_bits(bytes([0b101_00001]), 3, 1)
    with pytest.raises(DsqFormatError):
        unpack_bits(b"", 33, 0)  # a width read from a file
    with pytest.raises(DsqFormatError):
        unpack_bits(b"", 3, -1)


def test_varints_round_trip_and_reject_bad_encodings() -> None:
    values = [0, 1, 127, 128, 300, 16383, 16384, 2**32, 2**63 - 1]
    blob = b"".join(encode_uvarint(v) for v in values)
    assert blob == encode_uvarints(np.array(values, dtype=np.uint64))
    pos, got = 0, []
    for _ in values:
        v, pos = decode_uvarint(blob, pos)
        got.append(v)
    assert got == values and pos == len(blob)
    arr, end = decode_uvarints(blob, 0, len(values))
    assert arr.tolist() == values and end == len(blob)
    assert encode_uvarint(300) == b"\xac\x02"
    for bad in (b"\x80", b"\x80\x00", b"\xff" * 9 + b"\x01"):
        with pytest.raises(DsqFormatError):
            decode_uvarint(bad)
        with pytest.raises(DsqFormatError):
            decode_uvarints(bad, 0, 1)
    with pytest.raises(DsqFormatError):
        decode_uvarints(b"\x01", 0, 2)
    with pytest.raises(ValueError):
        encode_uvarint(-1)


def test_zigzag_round_trip() -> None:
    x = np.array([0, -1, 1, -2, 2, 2**62, -(2**63)], dtype=np.int64)
    z = zigzag_encode(x)
    assert z[:5].tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(zigzag_decode(z), x)


# ============================================================================ Huffman


def _entropy_bits(symbols: np.ndarray) -> float:
    _, counts = np.unique(symbols, return_counts=True)
    p = counts / counts.sum()
    return float(-(counts * np.log2(p)).sum())


def _distributions() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "empty": np.zeros(0, dtype=np.int64),
        "one": np.array([7]),
        "single-symbol": np.full(1000, 42),
        "two-symbols": rng.integers(0, 2, 999),
        "uniform-32": rng.integers(0, 32, 20000),
        "geometric": rng.geometric(0.3, 20000) - 1,
        "zipf": np.minimum(rng.zipf(1.3, 20000), 5000),
        "sparse-alphabet": rng.choice(np.array([3, 1000, 70000, 2**32 - 1]), 5000),
        "large-alphabet": rng.integers(0, 65536, 100000),
        "uint8-dtype": rng.integers(0, 256, 5000).astype(np.uint8),
    }


@pytest.mark.parametrize("name", list(_distributions()))
def test_huffman_round_trip(name: str) -> None:
    symbols = _distributions()[name]
    data = huffman_encode(symbols)
    out = huffman_decode(data)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, symbols.astype(np.int64))
    assert huffman_size_bits(symbols) == 8 * len(data)
    assert huffman_encode(symbols) == data  # deterministic


@given(st.lists(st.integers(0, 300), max_size=300))
@FAST
def test_huffman_round_trip_property(values: list[int]) -> None:
    symbols = np.array(values, dtype=np.int64)
    data = huffman_encode(symbols)
    np.testing.assert_array_equal(huffman_decode(data), symbols)
    assert huffman_size_bits(symbols) == 8 * len(data)


def test_huffman_known_code() -> None:
    symbols = np.array([0, 0, 0, 0, 1, 1, 2, 3])
    assert huffman_code_lengths(symbols) == {0: 1, 1: 2, 2: 3, 3: 3}
    data = huffman_encode(symbols)
    # header: count 8, k 4, desc (lw=2, contiguous), first 0, lengths-1 = 0,1,2,2 at 2 bits
    assert data[:5] == bytes([8, 4, 2, 0, 0b00_01_10_10])
    # canonical codes 0, 10, 110, 111: 0000 1010 110 111 + 00 padding
    assert data[5:] == bytes([0b0000_1010, 0b1101_1100])
    assert huffman_size_bits(symbols, include_header=False) == 14


@pytest.mark.parametrize(
    ("alphabet", "mode"),
    [([5, 6, 7, 8], 0), ([0, 1000, 2**32 - 1], 1), ([0, 2, 3, 5, 7, 11, 13, 17, 19, 23], 2)],
)
def test_huffman_alphabet_modes(alphabet: list[int], mode: int) -> None:
    symbols = np.repeat(np.array(alphabet), np.arange(1, len(alphabet) + 1))
    data = huffman_encode(symbols)
    assert data[2] >> 3 == mode  # count and k are one-byte varints here
    np.testing.assert_array_equal(huffman_decode(data), symbols)
    if mode == 2:  # bitmap: span 23 -> 24 bits, first and last bits set
        assert data[4:8] == bytes([23, 0b10110101, 0b00010100, 0b01010001])
        for bad in (bytes([23, 0b00110101]), bytes([23, 0b10110101, 0b00010100, 0b01010000]),
                    bytes([23, 0b10110111, 0b00010100, 0b01010001])):
            with pytest.raises(DsqFormatError, match="bitmap"):
                huffman_decode(data[:4] + bad + data[8:])
        with pytest.raises(DsqFormatError, match="bitmap"):
            huffman_decode(data[:4] + bytes([0xFF, 0xFF, 0x0F]) + data[8:])


def test_huffman_single_symbol_costs_one_bit_each() -> None:
    data = huffman_encode(np.full(80, 5))
    assert huffman_code_lengths(np.full(80, 5)) == {5: 1}
    assert len(data) == 4 + 10  # count, k, desc, first + 80 bits
    assert huffman_encode(np.zeros(0, dtype=np.int64)) == b"\x00"


def test_huffman_size_close_to_entropy() -> None:
    rng = np.random.default_rng(1)
    for symbols in (rng.geometric(0.2, 50000) - 1, rng.integers(0, 32, 50000)):
        h = _entropy_bits(symbols)
        payload = huffman_size_bits(symbols, include_header=False)
        assert h <= payload <= h + symbols.size
        header = len(huffman_encode(symbols)) - (payload + 7) // 8
        assert header < 64


def test_huffman_code_lengths_form_a_complete_code() -> None:
    rng = np.random.default_rng(2)
    for _ in range(20):
        symbols = rng.geometric(rng.uniform(0.05, 0.9), 3000)
        lengths = np.array(list(huffman_code_lengths(symbols).values()))
        if lengths.size > 1:
            assert np.sum(2.0 ** -lengths) == 1.0


def _fibonacci_symbols(n: int) -> np.ndarray:
    fib = [1, 1]
    while len(fib) < n:
        fib.append(fib[-1] + fib[-2])
    symbols = np.repeat(np.arange(n), fib)
    np.random.default_rng(3).shuffle(symbols)
    return symbols


def test_huffman_length_limit_on_fibonacci_frequencies() -> None:
    small = _fibonacci_symbols(20)  # unlimited Huffman depth 19
    assert max(huffman_code_lengths(small).values()) == 19
    for limit in (5, 8, 12):
        lengths = huffman_code_lengths(small, max_len=limit)
        assert max(lengths.values()) == limit
        assert sum(2.0 ** -v for v in lengths.values()) == 1.0
        data = huffman_encode(small, max_len=limit)
        np.testing.assert_array_equal(huffman_decode(data), small)
        # limiting costs little against the unlimited code (and beats fixed width)
        payload = huffman_size_bits(small, include_header=False, max_len=limit)
        assert payload <= (1.08 if limit > 5 else 1.25) * huffman_size_bits(
            small, include_header=False)
        assert payload < 5 * small.size
    big = _fibonacci_symbols(27)  # unlimited depth 26 > 24
    lengths = huffman_code_lengths(big)
    assert max(lengths.values()) == MAX_CODE_LENGTH
    np.testing.assert_array_equal(huffman_decode(huffman_encode(big)), big)
    with pytest.raises(ValueError):
        huffman_encode(np.arange(40), max_len=5)  # 40 symbols need 6 bits


def test_huffman_rejects_bad_input_to_encode() -> None:
    with pytest.raises(ValueError):
        huffman_encode(np.array([-1, 2]))
    with pytest.raises(TypeError):
        huffman_encode(np.array([1.5]))
    with pytest.raises(ValueError):
        huffman_encode(np.array([2**32]))


def test_huffman_decode_speed() -> None:
    symbols = np.random.default_rng(4).geometric(0.15, 50000) - 1
    data = huffman_encode(symbols)
    huffman_decode(data)
    start = time.perf_counter()
    out = huffman_decode(data)
    assert time.perf_counter() - start < 0.5
    np.testing.assert_array_equal(out, symbols)


def _stream(count: int, k: int, desc: int, first: int, lengths: bytes, bitstream: bytes) -> bytes:
    return (encode_uvarint(count) + encode_uvarint(k) + bytes([desc]) + encode_uvarint(first)
            + lengths + bitstream)


def test_huffman_rejects_hostile_streams() -> None:
    good = huffman_encode(np.array([0, 0, 0, 0, 1, 1, 2, 3]))
    assert good == _stream(8, 4, 2, 0, bytes([0b00011010]), bytes([0b00001010, 0b11011100]))
    for cut in range(len(good)):
        with pytest.raises(DsqFormatError):
            huffman_decode(good[:cut])
    cases = {
        "trailing byte": good + b"\x00",
        "padding bits set": good[:-1] + bytes([good[-1] | 1]),
        "Kraft sum < 1": _stream(8, 4, 2, 0, bytes([0b00011011]), good[5:]),
        "Kraft sum > 1": _stream(8, 4, 2, 0, bytes([0b00010110]), good[5:]),
        "length over 24": _stream(8, 2, 5, 0, pack_bits(np.array([0, 25]), 5), good[5:]),
        "single symbol longer than 1 bit": _stream(8, 1, 1, 0, bytes([0b10000000]), b"\x00"),
        "count over 8x bits": _stream(17, 4, 2, 0, bytes([0b00011010]), good[5:]),
        # 9 or 10 symbols would decode: the 2 zero padding bits read as symbol 0 (code "0")
        "count lies up": _stream(11, 4, 2, 0, bytes([0b00011010]), good[5:]),
        "count lies down": _stream(2, 4, 2, 0, bytes([0b00011010]), good[5:]),
        "k over count": _stream(3, 4, 2, 0, bytes([0b00011010]), good[5:]),
        "k zero": _stream(8, 0, 2, 0, b"", good[5:]),
        "bad descriptor": _stream(8, 4, 0x12, 0, bytes([0b00011010]), good[5:]),
        "lw over 5": _stream(8, 4, 6, 0, bytes([0b00011010]), good[5:]),
        "symbol over 2**32": _stream(8, 4, 2, 2**32 - 2, bytes([0b00011010]), good[5:]),
        "invalid code (single symbol, bit 1)": _stream(8, 1, 0, 0, b"", b"\x01"),
        "empty with trailing bytes": b"\x00\x00",
    }
    for what, data in cases.items():
        with pytest.raises(DsqFormatError):
            huffman_decode(data)
            pytest.fail(what)


@given(st.binary(max_size=64))
@FAST
def test_huffman_decode_random_bytes_only_raises_format_errors(data: bytes) -> None:
    try:
        out = huffman_decode(data)
    except DsqFormatError:
        return
    assert out.ndim == 1


# ============================================================================ relative index


def test_relative_index_fillers_exactly_on_overflow() -> None:
    gaps, filler = relative_index_encode(np.array([0, 20]), 3)
    assert gaps.tolist() == [0, 7, 7, 3]
    assert filler.tolist() == [False, True, True, False]
    assert relative_index_decode(gaps, 21).tolist() == [0, 8, 16, 20]
    assert filler_count(np.array([0, 20]), 3) == 2
    # a gap of exactly 2**bits fits; one more needs a filler
    assert relative_index_encode(np.array([7]), 3)[0].tolist() == [7]
    assert relative_index_encode(np.array([8]), 3)[0].tolist() == [7, 0]
    assert relative_index_encode(np.array([3, 11]), 3)[1].tolist() == [False, False]
    assert relative_index_encode(np.array([3, 12]), 3)[1].tolist() == [False, True, False]
    empty_gaps, empty_filler = relative_index_encode(np.zeros(0, dtype=np.int64), 4)
    assert empty_gaps.size == 0 and empty_filler.size == 0
    assert relative_index_decode(np.zeros(0, dtype=np.int64), 0).size == 0


@pytest.mark.parametrize("bits", range(1, 17))
def test_relative_index_round_trip(bits: int) -> None:
    rng = np.random.default_rng(bits)
    total = 5000
    positions = np.flatnonzero(rng.random(total) < rng.uniform(0.001, 0.5))
    gaps, filler = relative_index_encode(positions, bits)
    assert gaps.min(initial=0) >= 0 and gaps.max(initial=0) < 2**bits
    decoded = relative_index_decode(gaps, total, bits)
    np.testing.assert_array_equal(decoded[~filler], positions)
    assert filler.sum() == filler_count(positions, bits)
    assert np.all(np.diff(decoded) > 0)
    assert np.all(np.diff(np.concatenate(([-1], decoded))) <= 2**bits)


def test_relative_index_rejects_bad_input() -> None:
    gaps, _ = relative_index_encode(np.array([0, 20]), 3)
    with pytest.raises(DsqFormatError, match="outside"):
        relative_index_decode(gaps, 20)
    with pytest.raises(DsqFormatError, match="fit"):
        relative_index_decode(np.array([8]), 100, 3)
    with pytest.raises(DsqFormatError, match="negative"):
        relative_index_decode(np.array([-1, 3]), 100)
    with pytest.raises(DsqFormatError):
        relative_index_decode(np.array([1]), 100, 0)
    with pytest.raises(ValueError):
        relative_index_encode(np.array([3, 3]), 4)
    with pytest.raises(ValueError):
        relative_index_encode(np.array([-1, 3]), 4)


def test_best_index_bits() -> None:
    positions = np.arange(9, 10000, 10)  # every gap is 10
    # fixed width: 3 bits need a filler per entry (2 x 3 bits), 4 bits fit (4 bits)
    assert best_index_bits(positions, 10000, cost="fixed") == 4
    assert index_cost_bits(positions, 4, cost="fixed") == 4 * positions.size
    assert index_cost_bits(positions, 3, cost="fixed") == 6 * positions.size
    # Huffman: a constant gap costs ~1 bit whatever the width, fillers add entries
    assert best_index_bits(positions, 10000) >= 4
    rng = np.random.default_rng(5)
    sparse = np.flatnonzero(rng.random(100000) < 0.05)
    b = best_index_bits(sparse, 100000, value_bits=5.0)
    costs = {c: index_cost_bits(sparse, c, value_bits=5.0) for c in range(1, 17)}
    assert costs[b] == min(costs.values())
    assert best_index_bits(np.zeros(0, dtype=np.int64), 0) == 1


# ============================================================================ container


def _sections() -> dict[str, object]:
    return {
        "fc1:index": b"\x01\x02\x03",
        "fc1:empty": b"",
        "fc1:codebook": np.linspace(-1, 1, 8, dtype=np.float32),
        "fc2:weights": bytearray(range(256)) * 3,
        "fc2:view": memoryview(b"abcdef")[1:4],
        "big-endian": np.arange(4, dtype=">i4"),
    }


META = {"model": {"name": "lenet300", "kwargs": {}}, "layers": [{"bits": 5, "q": 0.25}],
        "note": "ünïcode ✓", "flag": True, "none": None}


def _expected(sections: dict[str, object]) -> dict[str, bytes]:
    out = {}
    for name, data in sections.items():
        if isinstance(data, np.ndarray):
            data = data.astype(data.dtype.newbyteorder("<")).tobytes()
        out[name] = bytes(data)
    return out


def test_container_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "model.dsq"
    sections = _sections()
    written = write_dsq(path, META, sections)
    assert written == path.stat().st_size
    f = read_dsq(path)
    assert f.meta == META
    assert f.sections == _expected(sections)
    assert list(f.sections) == list(sections)  # file order kept
    assert f.file_size == written
    assert f.manifest_size + sum(f.section_sizes.values()) == written
    assert f.section_sizes["fc1:empty"] == 0
    assert f["big-endian"] == bytes([0, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0])
    assert f.version == (1, 0)
    assert parse_dsq(path.read_bytes()) == f
    assert dsq_bytes(META, sections) == path.read_bytes()
    with pytest.raises(KeyError):
        f["missing"]


def test_container_layout_is_as_documented() -> None:
    data = dsq_bytes({}, {"a": b"xyz"})
    magic, major, minor, flags, stored, raw, crc = struct.unpack_from("<8sHHIIII", data)
    assert (magic, major, minor) == (MAGIC, 1, 0)
    assert HEADER_SIZE == 28
    manifest = data[HEADER_SIZE:HEADER_SIZE + stored]
    assert flags in (0, 1, 5)  # plain, raw deflate, raw deflate with preset dictionary 1
    text = manifest_text(data)
    assert len(text) == raw
    assert json.loads(text) == {"sections": [{"name": "a", "offset": 0, "length": 3,
                                              "crc32": zlib.crc32(b"xyz")}], "meta": {}}
    assert crc == zlib.crc32(data[:24] + manifest)
    assert data.endswith(b"xyz") and len(data) == HEADER_SIZE + stored + 3
    empty = dsq_bytes({}, {})
    assert len(empty) <= 60  # header + '{"sections":[],"meta":{}}'


@pytest.mark.parametrize(
    ("meta", "sections", "error"),
    [
        ({"x": float("nan")}, {}, ValueError),
        ({"x": float("inf")}, {}, ValueError),
        ({1: "int key"}, {}, TypeError),
        ({"x": np.float32(1)}, {}, TypeError),
        ({"x": 2**64}, {}, ValueError),
        ({"x": "\ud800"}, {}, ValueError),
        ([], {}, TypeError),
        ({}, {"": b""}, ValueError),
        ({}, {"x" * 257: b""}, ValueError),
        ({}, {3: b""}, ValueError),
        ({}, {"a": "text"}, TypeError),
        ({}, {"a": np.array([object()])}, TypeError),
    ],
)
def test_write_rejects_bad_arguments(tmp_path: Path, meta, sections, error) -> None:
    with pytest.raises(error):
        write_dsq(tmp_path / "x.dsq", meta, sections)
    assert list(tmp_path.iterdir()) == []


def test_write_rejects_too_deep_meta() -> None:
    deep: dict = {}
    node = deep
    for _ in range(70):
        node["a"] = {}
        node = node["a"]
    with pytest.raises(ValueError, match="deeper"):
        dsq_bytes(deep, {})
    cyclic: list = []
    cyclic.append(cyclic)
    with pytest.raises(ValueError):
        dsq_bytes({"c": cyclic}, {})
    ok: dict = {}
    node = ok
    for _ in range(61):  # meta is depth 2; 63 nested objects in all stays within 64
        node["a"] = {}
        node = node["a"]
    assert parse_dsq(dsq_bytes(ok, {})).meta == ok


@pytest.mark.parametrize("fail_at", ["os.fsync", "os.replace"])
def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: str) -> None:
    path = tmp_path / "model.dsq"
    write_dsq(path, {"v": 1}, {"a": b"old"})
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr(fail_at, boom)
    with pytest.raises(OSError, match="disk on fire"):
        write_dsq(path, {"v": 2}, {"a": b"new" * 1000})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.dsq"]


def test_write_failure_while_preparing_sections_leaves_old_file(tmp_path: Path) -> None:
    path = tmp_path / "model.dsq"
    write_dsq(path, {}, {"a": b"old"})
    with pytest.raises(TypeError):
        write_dsq(path, {}, {"a": b"ok", "b": 12345})
    assert read_dsq(path).sections == {"a": b"old"}
    assert [p.name for p in tmp_path.iterdir()] == ["model.dsq"]


def test_write_replaces_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "m.dsq"
    write_dsq(path, {"v": 1}, {"a": b"1"})
    write_dsq(str(path), {"v": 2}, {"b": b"22"})
    assert read_dsq(str(path)).meta == {"v": 2}
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


SMALL = dsq_bytes({"k": [1, 2.5, "s"]}, {"a": b"\x00\x01", "b": b"", "c": b"xyz"})


def test_reader_rejects_every_truncation() -> None:
    for cut in range(len(SMALL)):
        with pytest.raises(DsqFormatError):
            parse_dsq(SMALL[:cut])


def test_reader_rejects_every_single_byte_flip() -> None:
    for i in range(len(SMALL)):
        for mask in (0x01, 0x80, 0xFF):
            data = bytearray(SMALL)
            data[i] ^= mask
            with pytest.raises(DsqFormatError):
                parse_dsq(bytes(data))


def test_reader_rejects_trailing_bytes_and_wrong_magic() -> None:
    with pytest.raises(DsqFormatError, match="trailing"):
        parse_dsq(SMALL + b"\x00")
    with pytest.raises(DsqFormatError, match=r"not a \.dsq file"):
        parse_dsq(b"PK\x03\x04" + SMALL[4:])
    with pytest.raises(DsqFormatError, match=r"not a \.dsq file"):
        parse_dsq(b"")
    with pytest.raises(DsqFormatError, match=r"not a \.dsq file"):
        parse_dsq(SMALL.replace(b"\r\n", b"\n", 1))  # text-mode mangling


def _forge(
    manifest: object,
    data: bytes = b"",
    *,
    major: int = 1,
    minor: int = 0,
    flags: int | None = None,
    raw_len: int | None = None,
    stored_len: int | None = None,
) -> bytes:
    """A file with a correct header checksum around an arbitrary manifest."""
    if isinstance(manifest, bytes):
        raw = manifest
    else:
        raw = json.dumps(manifest, separators=(",", ":")).encode()
    deflate = flags is None or flags & 1
    stored = zlib.compress(raw, 9, wbits=-15) if deflate else raw
    head = struct.pack(
        "<8sHHIII", MAGIC, major, minor, 1 if flags is None else flags,
        len(stored) if stored_len is None else stored_len,
        len(raw) if raw_len is None else raw_len,
    )
    return head + struct.pack("<I", zlib.crc32(head + stored)) + stored + data


def _table(*entries: tuple) -> list[dict]:
    return [{"name": n, "offset": o, "length": ln, "crc32": c} for n, o, ln, c in entries]


CRC_AB = zlib.crc32(b"ab")
CRC_CD = zlib.crc32(b"cd")


def test_forged_valid_file_is_accepted() -> None:
    f = parse_dsq(_forge({"sections": _table(("x", 0, 2, CRC_AB), ("y", 2, 2, CRC_CD)),
                          "meta": {}}, b"abcd"))
    assert f.sections == {"x": b"ab", "y": b"cd"}
    assert parse_dsq(_forge({"sections": [], "meta": {}}, flags=0)).sections == {}


def test_reader_version_checks() -> None:
    with pytest.raises(DsqFormatError, match=r"written by a newer deepsqueeze.*upgrade"):
        parse_dsq(_forge({"sections": [], "meta": {}}, major=2))
    with pytest.raises(DsqFormatError, match="unsupported"):
        parse_dsq(_forge({"sections": [], "meta": {}}, major=0))
    with pytest.raises(DsqFormatError, match="flags"):
        parse_dsq(_forge({"sections": [], "meta": {}}, flags=3))
    # a newer minor version may add manifest entries that this reader ignores
    future = {"sections": _table(("x", 0, 2, CRC_AB)) , "meta": {}, "index": [1]}
    future["sections"][0]["align"] = 1
    assert parse_dsq(_forge(future, b"ab", minor=1)).sections == {"x": b"ab"}
    with pytest.raises(DsqFormatError, match="unknown"):
        parse_dsq(_forge(future, b"ab", minor=0))


@pytest.mark.parametrize(
    ("manifest", "data", "match"),
    [
        ({"sections": _table(("x", 0, 2, CRC_AB), ("y", 1, 2, CRC_CD)), "meta": {}}, b"abcd",
         "offset 1, expected 2"),
        ({"sections": _table(("x", 0, 2, CRC_AB), ("y", 2, 3, CRC_CD)), "meta": {}}, b"abcd",
         "run past"),
        ({"sections": _table(("x", 0, 2, CRC_AB), ("y", 2, 2, CRC_CD)), "meta": {}}, b"abcde",
         "trailing"),
        ({"sections": _table(("x", 0, -2, CRC_AB)), "meta": {}}, b"ab", "non-negative"),
        ({"sections": _table(("x", False, 2, CRC_AB)), "meta": {}}, b"ab", "integer"),
        ({"sections": _table(("x", 0, 2.0, CRC_AB)), "meta": {}}, b"ab", "integer"),
        ({"sections": _table(("x", 0, 2, 2**32)), "meta": {}}, b"ab", "32-bit"),
        ({"sections": _table(("x", 0, 2, CRC_AB ^ 1)), "meta": {}}, b"ab", "checksum"),
        ({"sections": _table(("x", 0, 2, CRC_AB), ("x", 2, 2, CRC_CD)), "meta": {}}, b"abcd",
         "twice"),
        ({"sections": _table(("y", 2, 2, CRC_CD), ("x", 0, 2, CRC_AB)), "meta": {}}, b"abcd",
         "offset 2, expected 0"),
        ({"sections": _table(("", 0, 2, CRC_AB)), "meta": {}}, b"ab", "name"),
        ({"sections": _table((7, 0, 2, CRC_AB)), "meta": {}}, b"ab", "name"),
        ({"sections": [{"name": "x", "offset": 0, "length": 2}], "meta": {}}, b"ab", "lacks"),
        ({"sections": ["x"], "meta": {}}, b"", "not a JSON object"),
        ({"sections": {}, "meta": {}}, b"", "must be a list"),
        ({"sections": [], "meta": []}, b"", "meta"),
        ({"sections": []}, b"", "no 'meta'"),
        ([], b"", "JSON object"),
        ({"sections": [], "meta": {}, "extra": 1}, b"", "unknown"),
    ],
)
def test_reader_rejects_lying_section_tables(manifest, data, match) -> None:
    with pytest.raises(DsqFormatError, match=match):
        parse_dsq(_forge(manifest, data))


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b'{"sections":[],"meta":{},"meta":{}}', "duplicate key 'meta'"),
        (b'{"sections":[],"meta":{"a":NaN}}', "JSON"),
        (b'{"sections":[],"meta":{"a":1e999}}', "JSON"),
        (b'{"sections":[],"meta":{"a":1', "JSON"),
        (b'{"sections":[],"meta":{"a":"\xff"}}', "UTF-8"),
        (b'{"sections":[],"meta":{"a":' + b"9" * 5000 + b"}}", "JSON"),
        (b"[" * 100_000, "nests"),
        (b'{"a":' * 100_000, "nests"),
    ],
)
def test_reader_rejects_bad_manifest_json(raw: bytes, match: str) -> None:
    start = time.perf_counter()
    with pytest.raises(DsqFormatError, match=match):
        parse_dsq(_forge(raw))
    assert time.perf_counter() - start < 1.0


def test_deep_nesting_inside_strings_is_not_counted() -> None:
    meta = {"s": "[" * 1000 + '\\"{' * 100}
    assert parse_dsq(dsq_bytes(meta, {})).meta == meta


def test_reader_rejects_lying_manifest_lengths() -> None:
    manifest = {"sections": [], "meta": {}}
    cases = {
        "over the": _forge(manifest, raw_len=2**32 - 1),
        "runs past": _forge(manifest, stored_len=10**6),
        "inflates to": _forge(manifest, raw_len=5),
        "declares": _forge(manifest, raw_len=100),
        "stored length": _forge(manifest, flags=0, raw_len=3),
    }
    for match, data in cases.items():
        with pytest.raises(DsqFormatError, match=match):
            parse_dsq(data)
    raw = json.dumps(manifest).encode()
    deflated = zlib.compress(raw, 9, wbits=-15)
    for stored, match in [
        (deflated + b"junk", "garbage"),
        (deflated[:-2], "truncated"),
        (b"\xff" * 20, "not valid deflate"),
    ]:
        head = struct.pack("<8sHHIII", MAGIC, 1, 0, 1, len(stored), len(raw))
        with pytest.raises(DsqFormatError, match=match):
            parse_dsq(head + struct.pack("<I", zlib.crc32(head + stored)) + stored)


def test_reader_refuses_a_zip_bomb_without_inflating_it() -> None:
    bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
    stored = bomb.compress(b" " * (16 << 20)) + bomb.flush()  # 16 MiB of spaces, 16 KiB stored
    head = struct.pack("<8sHHIII", MAGIC, 1, 0, 1, len(stored), 1000)
    data = head + struct.pack("<I", zlib.crc32(head + stored)) + stored
    tracemalloc.start()
    try:
        with pytest.raises(DsqFormatError, match="more than its declared 1000"):
            parse_dsq(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


def test_reader_size_limit_and_unreadable_paths(tmp_path: Path) -> None:
    path = tmp_path / "m.dsq"
    write_dsq(path, {}, {"a": b"x" * 100})
    with pytest.raises(DsqFormatError, match="limit"):
        read_dsq(path, max_size=100)
    with pytest.raises(DsqFormatError, match="limit"):
        parse_dsq(path.read_bytes(), max_size=100)
    with pytest.raises(DsqFormatError, match="cannot read"):
        read_dsq(tmp_path / "missing.dsq")
    with pytest.raises(DsqFormatError, match="cannot read"):
        read_dsq(tmp_path)
    bad = tmp_path / "bad.dsq"
    bad.write_bytes(b"hello")
    with pytest.raises(DsqFormatError, match=r"bad\.dsq.*not a \.dsq file"):
        read_dsq(bad)


_json_leaf = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
              | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
_json = st.recursive(
    _json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20,
)


@given(
    meta=st.dictionaries(st.text(max_size=10), _json, max_size=5),
    sections=st.dictionaries(st.text(min_size=1, max_size=12), st.binary(max_size=64),
                             max_size=6),
)
@FAST
def test_container_round_trip_property(meta: dict, sections: dict[str, bytes]) -> None:
    data = dsq_bytes(meta, sections)
    f = parse_dsq(data)
    assert f.meta == meta
    assert f.sections == sections
    assert f.file_size == len(data)


@given(
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1,
                   max_size=4),
    cut=st.none() | st.integers(0, 10**6),
    insert=st.none() | st.tuples(st.integers(0, 10**6), st.binary(min_size=1, max_size=4)),
)
@settings(max_examples=150, deadline=None)
def test_random_mutations_give_the_same_content_or_a_format_error(edits, cut, insert) -> None:
    data = bytearray(SMALL)
    for pos, value in edits:
        data[pos % len(data)] = value
    if insert is not None:
        at = insert[0] % (len(data) + 1)
        data[at:at] = insert[1]
    if cut is not None:
        del data[cut % (len(data) + 1):]
    try:
        f = parse_dsq(bytes(data))
    except DsqFormatError:
        return
    assert f == parse_dsq(SMALL)


@pytest.mark.parametrize("density", [0.5, 0.7])
def test_a_half_or_more_dense_pruned_tensor_is_still_stored_sparse_when_smaller(
        density: float) -> None:
    """Sparse positions + values win up to ~80 % density: 50 % pruned used to be stored dense."""
    import torch

    from deepsqueeze.codec.tensor import decode_tensor, encode_tensor

    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 784, generator=g)
    w[torch.rand(w.shape, generator=g) > density] = 0
    enc = encode_tensor("w", w)
    assert enc.entry["encoding"] == "sparse" and enc.nbytes < 0.9 * w.numel() * 4
    assert torch.equal(decode_tensor(enc.entry, enc.sections), w)
