"""The compact manifest: raw deflate with preset dictionary 1 (header flag bit 2)."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
import torch

from deepsqueeze import dsq, models
from deepsqueeze.codec.container import (
    FLAG_DEFLATE,
    FLAG_DICTIONARY_1,
    HEADER_SIZE,
    MAGIC,
    MANIFEST_DICTIONARY_1,
    MANIFEST_DICTIONARY_1_CRC32,
    compact_dsq,
    dsq_bytes,
    parse_dsq,
    read_dsq,
    write_dsq,
)
from deepsqueeze.errors import DsqFormatError

torch.set_num_threads(1)

META = {
    "format": "deepsqueeze-model",
    "model": {"name": "lenet300", "kwargs": {"num_classes": 10, "in_features": 784}},
    "tensors": [{"name": "fc1.weight", "shape": [300, 784], "encoding": "sparse-codebook",
                 "index_coding": "huffman", "value_coding": "huffman", "dtype": "float32"}],
    "text": "ünïcode ✓",
}
SECTIONS = {"fc1.weight:index": b"\x01\x02\x03", "fc1.weight:codebook": b"", "fc1.bias:data": b"z"}


def _header(data: bytes) -> tuple[int, int, int, int]:
    _, _, _, flags, stored, raw, crc = struct.unpack_from("<8sHHIIII", data)
    return flags, stored, raw, crc


def _forge(raw: bytes, flags: int, *, zdict: bytes | None = MANIFEST_DICTIONARY_1,
           stored: bytes | None = None, raw_len: int | None = None, data: bytes = b"") -> bytes:
    """A file with a valid header checksum around ``raw`` stored as ``flags`` say."""
    if stored is None:
        packer = (zlib.compressobj(9, zlib.DEFLATED, -15) if zdict is None
                  else zlib.compressobj(9, zlib.DEFLATED, -15, zdict=zdict))
        stored = packer.compress(raw) + packer.flush()
    head = struct.pack("<8sHHIII", MAGIC, 1, 0, flags, len(stored),
                       len(raw) if raw_len is None else raw_len)
    return head + struct.pack("<I", zlib.crc32(head + stored)) + stored + data


def test_dictionary_is_the_documented_constant() -> None:
    assert len(MANIFEST_DICTIONARY_1) == 1830
    assert zlib.crc32(MANIFEST_DICTIONARY_1) == MANIFEST_DICTIONARY_1_CRC32 == 0x91D1CF95
    assert MANIFEST_DICTIONARY_1.isascii()
    doc = (Path(__file__).resolve().parents[1] / "docs" / "format.md").read_text()
    section = doc[doc.index("**Preset dictionary 1**"):]
    assert "0x91D1CF95" in section
    listed = section.split("```text\n", 1)[1].split("\n```", 1)[0]
    assert listed.replace("\n", "").encode("ascii") == MANIFEST_DICTIONARY_1


def test_round_trip_and_smaller(tmp_path: Path) -> None:
    plain = dsq_bytes(META, SECTIONS, manifest="deflate")
    small = dsq_bytes(META, SECTIONS, manifest="dictionary")
    assert dsq_bytes(META, SECTIONS) == small  # the compact manifest is the default
    assert _header(plain)[0] == FLAG_DEFLATE
    assert _header(small)[0] == FLAG_DEFLATE | FLAG_DICTIONARY_1
    assert len(small) < len(plain)
    a, b = parse_dsq(plain), parse_dsq(small)
    assert a.meta == b.meta == META and a.sections == b.sections == SECTIONS
    assert b.manifest_size < a.manifest_size
    path = tmp_path / "m.dsq"
    assert write_dsq(path, META, SECTIONS) == len(small)
    assert path.read_bytes() == small
    assert write_dsq(path, META, SECTIONS, manifest="deflate") == len(plain)
    assert path.read_bytes() == plain
    assert read_dsq(path).meta == META


def test_writer_keeps_the_smallest_coding() -> None:
    for meta in ({}, {"k": "3f9a0c71e5d2b8a4"}, META):
        plain = dsq_bytes(meta, {}, manifest="deflate")
        small = dsq_bytes(meta, {}, manifest="dictionary")
        assert _header(plain)[0] in (0, FLAG_DEFLATE)
        assert len(small) <= len(plain)
        assert (len(small) < len(plain)) == bool(_header(small)[0] & FLAG_DICTIONARY_1)
        assert parse_dsq(small).meta == parse_dsq(plain).meta == meta
    with pytest.raises(ValueError, match="manifest coding 'zstd'"):
        dsq_bytes({}, {}, manifest="zstd")


def test_old_format_files_still_read() -> None:
    raw = json.dumps({"sections": [{"name": "x", "offset": 0, "length": 2,
                                    "crc32": zlib.crc32(b"ab")}], "meta": {"k": 1}},
                     separators=(",", ":")).encode()
    for flags, zdict in ((0, None), (FLAG_DEFLATE, None)):
        stored = None if flags else raw
        f = parse_dsq(_forge(raw, flags, zdict=zdict, stored=stored, data=b"ab"))
        assert f.meta == {"k": 1} and f.sections == {"x": b"ab"}


def test_compact_rewrites_a_real_model_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = models.create("lenet300")
    path = tmp_path / "net.dsq"
    dsq.save(net, path, encode={"manifest": "deflate"})
    before = path.read_bytes()
    size = compact_dsq(path, tmp_path / "small.dsq")
    after = (tmp_path / "small.dsq").read_bytes()
    assert size == len(after) < len(before) - 150
    assert parse_dsq(after).sections == parse_dsq(before).sections
    assert parse_dsq(after).meta == parse_dsq(before).meta
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(dsq.load(after)(x), dsq.load(before)(x))
    assert dsq.inspect(after).to_dict()["layers"] == dsq.inspect(before).to_dict()["layers"]


def test_forged_dictionary_flags_are_refused() -> None:
    raw = b'{"sections":[],"meta":{"format":"deepsqueeze-model"}}'
    # the dictionary flag without the deflate flag
    with pytest.raises(DsqFormatError, match="bit 2 needs bit 0"):
        parse_dsq(_forge(raw, FLAG_DICTIONARY_1, stored=raw))
    # a stream that needs the dictionary, read without it: invalid distance
    with pytest.raises(DsqFormatError, match="not valid deflate"):
        parse_dsq(_forge(raw, FLAG_DEFLATE))
    # reserved bit 1 and unknown higher bits
    for flags in (2, 3, 7, 8 | 5, 1 << 31):
        with pytest.raises(DsqFormatError, match="unknown header flags"):
            parse_dsq(_forge(raw, flags))


def test_checksum_covers_the_dictionary_flag() -> None:
    good = dsq_bytes(META, SECTIONS, manifest="dictionary")
    bad = bytearray(good)
    bad[12] &= ~FLAG_DICTIONARY_1  # header flags, checksum left as it was
    with pytest.raises(DsqFormatError, match="checksum mismatch"):
        parse_dsq(bytes(bad))


def test_truncated_and_oversize_dictionary_manifests_are_refused() -> None:
    raw = json.dumps({"sections": [], "meta": META}, separators=(",", ":")).encode()
    flags = FLAG_DEFLATE | FLAG_DICTIONARY_1
    packer = zlib.compressobj(9, zlib.DEFLATED, -15, zdict=MANIFEST_DICTIONARY_1)
    stored = packer.compress(raw) + packer.flush()
    assert parse_dsq(_forge(raw, flags, stored=stored)).meta == META
    with pytest.raises(DsqFormatError, match="truncated"):
        parse_dsq(_forge(raw, flags, stored=stored[:-3]))
    with pytest.raises(DsqFormatError, match="more than its declared"):
        parse_dsq(_forge(raw, flags, stored=stored, raw_len=len(raw) - 1))
    with pytest.raises(DsqFormatError, match="header declares"):
        parse_dsq(_forge(raw, flags, stored=stored, raw_len=len(raw) + 5))
    with pytest.raises(DsqFormatError, match="garbage after"):
        parse_dsq(_forge(raw, flags, stored=stored + b"\x00"))
    # a dictionary bomb: 16 MiB of repeats of the dictionary in a few KB is refused by the
    # header's declared length (bounded inflate), never inflated in full
    bomb = MANIFEST_DICTIONARY_1 * 9000
    packer = zlib.compressobj(9, zlib.DEFLATED, -15, zdict=MANIFEST_DICTIONARY_1)
    stored = packer.compress(bomb) + packer.flush()
    with pytest.raises(DsqFormatError, match=r"more than its declared|out of proportion"):
        parse_dsq(_forge(b"{}", flags, stored=stored, raw_len=100))
    with pytest.raises(DsqFormatError, match=r"out of proportion|over the"):
        parse_dsq(_forge(bomb, flags, stored=stored))


def test_manifest_bytes_saved_on_zoo_files(tmp_path: Path) -> None:
    """The dictionary halves a small model's manifest (the fixed cost of every file)."""
    for name in ("lenet300", "lenet5"):
        net = models.create(name)
        dsq.save(net, tmp_path / f"{name}.dsq", encode={"manifest": "deflate"})
        before = read_dsq(tmp_path / f"{name}.dsq")
        compact_dsq(tmp_path / f"{name}.dsq", tmp_path / f"{name}-c.dsq")
        after = read_dsq(tmp_path / f"{name}-c.dsq")
        assert after.manifest_size < 0.7 * before.manifest_size, name
        assert after.manifest_size >= HEADER_SIZE
        dsq.save(net, tmp_path / f"{name}-d.dsq")  # the default: already compact
        default = (tmp_path / f"{name}-d.dsq").read_bytes()
        assert default == (tmp_path / f"{name}-c.dsq").read_bytes()
