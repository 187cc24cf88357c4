"""The .dsq container: a fixed 28-byte header, a deflated JSON manifest, then named sections.

Byte layout (the full spec is docs/format.md)::

    0   8  magic            b"\\x89DSQ\\r\\n\\x1a\\n"
    8   2  major version    u16 = 1
    10  2  minor version    u16 = 0
    12  4  flags            u32; bit 0: the manifest is raw-deflate compressed; bit 2 (only
                            with bit 0): deflated with preset dictionary 1 (MANIFEST_DICTIONARY_1)
    16  4  stored length    u32, bytes of the manifest as stored
    20  4  manifest length  u32, bytes of the manifest JSON (after inflating)
    24  4  crc32            u32, CRC-32 of header bytes 0..23 followed by the stored manifest
    28  .  manifest         {"sections":[{"name","offset","length","crc32"},...],"meta":{...}}
    .   .  data area        the sections' bytes, contiguous, in table order, no padding

All integers little-endian. The reader trusts nothing: sizes are checked against the file before
anything is allocated or inflated, the manifest is inflated with a bounded output, the JSON is
scanned in linear time (nesting depth, number of values) and refused before parsing when what
parsing would allocate is out of proportion to the file, and every section's CRC-32 is verified.
Any defect raises :class:`DsqFormatError` naming it.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deepsqueeze.errors import DsqFormatError
from deepsqueeze.inputs import NotReadable, open_input

MAGIC = b"\x89DSQ\r\n\x1a\n"
VERSION = (1, 0)
HEADER = struct.Struct("<8sHHIIII")
HEADER_SIZE = HEADER.size  # 28
FLAG_DEFLATE = 1
FLAG_DICTIONARY_1 = 4  # bit 2; bit 1 stays reserved
KNOWN_FLAGS = FLAG_DEFLATE | FLAG_DICTIONARY_1

# Preset dictionary 1 of the manifest's raw deflate stream (zlib ``zdict``): the strings that
# manifests repeat (keys, encoding and dtype names, layer-name fragments, a typical section
# table), the most frequent last (deflate reaches nearer bytes with shorter distance codes).
# Specified byte for byte in docs/format.md; NEVER change it once written (files depend on its
# exact bytes): a new dictionary gets a new flag bit and a new constant.
MANIFEST_DICTIONARY_1 = "".join((
    '"sparse-bitmap","bfloat16","float16","int64","int32","uint8","bool",',
    '"lenet5-classic","resnet20","resnet56","mobilenet-tiny","fashion-mnist","cifar10",',
    '"LowRankLinear","LowRankConv2d","TuckerConv2d","HashedLinear","HashedConv2d",',
    '"CirculantLinear","BinaryLinear","BinaryConv2d","QuantLinear","QuantConv2d",',
    '"binary_input":false,"scaled":true,"rank":,"in_channels":1,"out_channels":,',
    '"kernel_size":,"stride":,"padding":,"groups":1,"input_scale","input_zero_point",',
    '"weight_scale","buckets","modules":{"fc1":{"type":',
    '"config":{"in_features":784,"out_features":300,"bias":true},',
    '"recipe":"deep-compression-lenet300","dataset":"mnist"}',
    '{"sections":[{"name":"conv1.weight:index","offset":0,"length":,"crc32":},',
    '{"name":"conv2.bias:data","offset":,"length":,"crc32":},',
    '{"name":"fc1.weight:codebook","offset":,"length":,"crc32":},',
    '{"name":"fc2.weight:values","offset":,"length":,"crc32":},',
    '{"name":"fc3.bias:data","offset":,"length":,"crc32":}],',
    '"meta":{"format":"deepsqueeze-model","model":{"name":"lenet300","kwargs":{',
    '"num_classes":10,"in_features":784}},"dense_parameters":266610,"parameters":[',
    '"fc1.weight","fc1.bias","fc2.weight","fc2.bias","fc3.weight","fc3.bias"],"tensors":[',
    '{"name":"conv1.bias","shape":[20],"encoding":"dense","dtype":"float32"},',
    '{"name":"conv2.weight","shape":[50,20,5,5],"encoding":"codebook","codebook_size":16,',
    '"value_bits":4,"value_coding":"huffman","dtype":"int8"},',
    '{"name":"fc1.weight","shape":[300,784],"index_bits":8,"entries":,"index_coding":"fixed",',
    '"encoding":"sparse-codebook","codebook_size":2,"value_bits":2,"value_coding":"fixed",',
    '"dtype":"float32"},{"name":"fc2.weight","shape":[100,300],"index_bits":7,"entries":,',
    '"index_coding":"huffman","encoding":"sparse-codebook","codebook_size":4,"value_bits":2,',
    '"value_coding":"huffman","dtype":"float32"},{"name":"fc2.bias","shape":[100],',
    '"encoding":"dense","dtype":"float32"}',
)).encode("ascii")
MANIFEST_DICTIONARY_1_CRC32 = 0x91D1CF95  # of its 1,830 bytes; tests check it never changes
_DICTIONARIES = {FLAG_DICTIONARY_1: MANIFEST_DICTIONARY_1}
MANIFEST_CODINGS = ("deflate", "dictionary")
"""How a writer may store the manifest: ``"deflate"`` picks the smaller of plain and
raw-deflated JSON (flags 0 or 1, what format 1.0 readers before the dictionary read);
``"dictionary"`` (the default) also tries raw deflate with preset dictionary 1 (flags 5) and
keeps the smallest of the three."""

DEFAULT_MAX_FILE_SIZE = 2 << 30  # 2 GiB
MAX_MANIFEST_SIZE = 16 << 20  # 16 MiB, stored and inflated
MAX_JSON_DEPTH = 64  # the top-level object is depth 1
MANIFEST_BUDGET_FLOOR = 6 << 20
"""Parse cost (:func:`manifest_cost`) any file's manifest may have; resnet56 needs 2.4 MiB."""
MANIFEST_BUDGET_PER_BYTE = 8
"""Further parse cost allowed per byte of file, above the floor."""
MANIFEST_BYTE_COST = 8  # the decoded text and the parsed strings: at most 4 bytes a character each
MANIFEST_VALUE_COST = 64  # one JSON value or key: its object, its slot, dict and memo overhead
MAX_NAME_LENGTH = 256
_SECTION_KEYS = ("name", "offset", "length", "crc32")
_TOP_KEYS = ("sections", "meta")
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1
_INT_DIGITS = len(str(_INT_MIN))  # the longest integer literal a manifest may hold (20)

SectionData = bytes | bytearray | memoryview | np.ndarray


@dataclass(frozen=True)
class DsqFile:
    """A parsed, fully verified .dsq file."""

    meta: dict[str, Any]
    sections: dict[str, bytes]
    file_size: int
    manifest_size: int  # header + stored manifest: the container's own overhead in bytes
    version: tuple[int, int] = VERSION

    @property
    def section_sizes(self) -> dict[str, int]:
        """``{name: bytes}`` for every section, in file order."""
        return {name: len(data) for name, data in self.sections.items()}

    def __getitem__(self, name: str) -> bytes:
        try:
            return self.sections[name]
        except KeyError:
            raise KeyError(f"no section {name!r} in this .dsq file") from None


# --------------------------------------------------------------------------- JSON helpers

_SCAN_CHUNK = 1 << 14  # bytes per step of the scan: its temporaries stay under 1 MiB
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_NEST = np.zeros(256, dtype=np.int8)  # +1 opens an array/object, -1 closes one
_NEST[[ord("["), ord("{")]] = 1
_NEST[[ord("]"), ord("}")]] = -1
_SEPARATOR = np.zeros(256, dtype=bool)
_SEPARATOR[[ord(","), ord(":")]] = True


@dataclass(frozen=True)
class JsonShape:
    """What :func:`json_shape` finds in JSON text, without parsing it."""

    depth: int
    """Deepest array/object nesting (the top-level container is depth 1)."""
    values: int
    """Upper bound on the values and keys parsing creates: 1 + separators and openings + strings."""


def json_shape(text: bytes | bytearray | memoryview) -> JsonShape:
    """Nesting depth and value count of JSON ``text``, strings skipped, without parsing.

    Linear time and memory of a fixed size (the text is scanned in chunks), whatever the text:
    a quote preceded by an odd run of backslashes is escaped, the others open and close
    strings, and brackets and separators count only outside strings. On invalid JSON the
    counts are those of the prefix a parser reads before it fails, or larger.
    """
    buf = np.frombuffer(text, dtype=np.uint8)
    depth = max_depth = 0
    values = 1
    quotes = 0
    inside = 0  # 1 while the scan is inside a string
    run = 0  # backslashes at the end of the previous chunk
    for start in range(0, buf.size, _SCAN_CHUNK):
        a = buf[start : start + _SCAN_CHUNK]
        idx = np.arange(a.size, dtype=np.int32)
        backslash = a == _BACKSLASH
        # index of the last non-backslash at or before each position (a run carried over
        # from the previous chunk counts as starting before this one)
        last = np.maximum.accumulate(np.where(backslash, np.int32(-1 - run), idx))
        before = np.empty_like(last)
        before[0] = -1 - run
        before[1:] = last[:-1]
        quote = (a == _QUOTE) & (((idx - 1 - before) & 1) == 0)
        toggles = np.cumsum(quote, dtype=np.int32)
        outside = (((toggles - quote + inside) & 1) == 0) & ~quote
        step = np.where(outside, _NEST[a], np.int8(0))
        profile = np.cumsum(step, dtype=np.int32) + depth
        max_depth = max(max_depth, int(profile.max()))
        depth = int(profile[-1])
        values += int(np.count_nonzero(step > 0)) + int(np.count_nonzero(outside & _SEPARATOR[a]))
        quotes += int(toggles[-1])
        inside = (inside + int(toggles[-1])) & 1
        run = int(a.size - 1 - last[-1])
    return JsonShape(depth=max_depth, values=values + (quotes + 1) // 2)


def manifest_cost(size: int, values: int) -> int:
    """Bytes that parsing a manifest of ``size`` bytes holding ``values`` values may allocate.

    An upper bound measured on the costliest JSON per byte (``[{},{},...]``, many distinct
    keys, astral-plane strings, 20-digit integers): the decoded text and the parsed strings
    take at most 8 bytes per manifest byte, each value or key at most 64 more.
    """
    return MANIFEST_BYTE_COST * size + MANIFEST_VALUE_COST * values


def manifest_budget(file_size: int) -> int:
    """The parse cost (:func:`manifest_cost`) the manifest of a ``file_size``-byte file may have.

    A fixed floor every file gets, plus a share proportional to the file: a small forged
    file cannot make the reader allocate much more than its size (a 16 KB file whose manifest
    inflates to 16 MiB of ``[{},{},...]`` once cost 960 MiB to refuse).
    """
    return MANIFEST_BUDGET_FLOOR + MANIFEST_BUDGET_PER_BYTE * file_size


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _check_meta_value(value: Any, where: str, depth: int) -> None:
    """Reject what would not round-trip exactly through the manifest JSON.

    ``depth`` is the JSON nesting depth ``value`` would have if it is a container.
    """
    if isinstance(value, (dict, list, tuple)) and depth > MAX_JSON_DEPTH:
        raise ValueError(f"meta nests deeper than {MAX_JSON_DEPTH} levels at {where}")
    if value is None or isinstance(value, (bool, str)):
        return
    if isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise ValueError(f"meta integer at {where} does not fit 64 bits")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"meta float at {where} is {value}; NaN and Inf are not allowed")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"meta key {key!r} at {where} is not a str")
            _check_meta_value(item, f"{where}.{key}", depth + 1)
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_meta_value(item, f"{where}[{i}]", depth + 1)
        return
    raise TypeError(
        f"meta value at {where} has type {type(value).__name__}; use JSON types "
        "(dict, list, str, int, float, bool, None; numpy scalars need .item())"
    )


# --------------------------------------------------------------------------- writing


def _section_view(name: str, data: SectionData) -> memoryview:
    if isinstance(data, np.ndarray):
        if data.dtype.hasobject:
            raise TypeError(f"section {name!r}: object arrays cannot be stored")
        if data.dtype.byteorder == ">" or (data.dtype.byteorder == "=" and not _LITTLE):
            data = data.astype(data.dtype.newbyteorder("<"))
        data = np.ascontiguousarray(data)
        return memoryview(data.reshape(-1).view(np.uint8))
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(
            f"section {name!r}: expected bytes, bytearray, memoryview or numpy array, "
            f"got {type(data).__name__}"
        )
    view = memoryview(data)
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


_LITTLE = np.little_endian


def _deflate(raw: bytes, zdict: bytes | None = None) -> bytes:
    packer = (zlib.compressobj(9, zlib.DEFLATED, -15, 9) if zdict is None
              else zlib.compressobj(9, zlib.DEFLATED, -15, 9, zdict=zdict))
    return packer.compress(raw) + packer.flush()


def _check_coding(manifest: str) -> None:
    if manifest not in MANIFEST_CODINGS:
        raise ValueError(
            f"manifest coding {manifest!r} is not one of {list(MANIFEST_CODINGS)}"
        )


def _build(
    meta: dict[str, Any], sections: Mapping[str, SectionData],
    manifest_coding: str = "dictionary",
) -> tuple[bytes, list]:
    """(header + stored manifest, [section memoryviews]) for a file."""
    _check_coding(manifest_coding)
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    if not isinstance(sections, Mapping):
        raise TypeError(f"sections must be a mapping of name -> bytes, got {type(sections)}")
    _check_meta_value(meta, "meta", 2)
    table = []
    views = []
    offset = 0
    for name, data in sections.items():
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME_LENGTH:
            raise ValueError(
                f"section name {name!r} must be a str of 1..{MAX_NAME_LENGTH} characters"
            )
        view = _section_view(name, data)
        table.append({"name": name, "offset": offset, "length": view.nbytes,
                      "crc32": zlib.crc32(view)})
        views.append(view)
        offset += view.nbytes
    manifest = {"sections": table, "meta": meta}
    try:
        raw = json.dumps(
            manifest, ensure_ascii=False, allow_nan=False, separators=(",", ":")
        ).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"meta or a section name is not valid Unicode text: {exc}") from exc
    if len(raw) > MAX_MANIFEST_SIZE:
        raise ValueError(f"manifest is {len(raw)} bytes, over the {MAX_MANIFEST_SIZE} limit")
    if json_shape(raw).depth > MAX_JSON_DEPTH:
        raise ValueError(f"manifest nests deeper than {MAX_JSON_DEPTH} levels")
    deflated = _deflate(raw)
    flags, stored = (FLAG_DEFLATE, deflated) if len(deflated) < len(raw) else (0, raw)
    if manifest_coding == "dictionary":
        packed = _deflate(raw, MANIFEST_DICTIONARY_1)
        if len(packed) < len(stored):
            flags, stored = FLAG_DEFLATE | FLAG_DICTIONARY_1, packed
    head = struct.pack("<8sHHIII", MAGIC, VERSION[0], VERSION[1], flags, len(stored), len(raw))
    crc = zlib.crc32(stored, zlib.crc32(head))
    return head + struct.pack("<I", crc) + stored, views


def dsq_bytes(
    meta: dict[str, Any], sections: Mapping[str, SectionData], *, manifest: str = "dictionary"
) -> bytes:
    """The complete .dsq file for ``meta`` and ``sections`` as bytes (no file written).

    ``manifest``: how the manifest is stored, one of :data:`MANIFEST_CODINGS`."""
    head, views = _build(meta, sections, manifest)
    return b"".join([head, *views])


def write_dsq(
    path: str | os.PathLike[str],
    meta: dict[str, Any],
    sections: Mapping[str, SectionData],
    *,
    manifest: str = "dictionary",
) -> int:
    """Write a .dsq file atomically; returns the number of bytes written.

    ``meta``: JSON-compatible dict (str keys, finite floats, 64-bit ints). ``sections``: name ->
    bytes-like or numpy array (stored as its raw little-endian bytes), written in mapping order.
    The data goes to a temp file beside ``path``, is fsynced, then renamed over ``path``; on any
    failure the temp file is removed and an existing ``path`` is left untouched.
    ``manifest``: how the manifest is stored, one of :data:`MANIFEST_CODINGS` (the default
    ``"dictionary"`` saves a few hundred bytes on a small model's file; ``"deflate"`` writes a
    file that deepsqueeze versions before the dictionary also read). Bad arguments raise
    ``ValueError`` / ``TypeError``.
    """
    from deepsqueeze.io import atomic_write  # the one atomic writer (io imports torch)

    head, views = _build(meta, sections, manifest)
    with atomic_write(path) as handle:
        handle.write(head)
        for view in views:
            handle.write(view)
    return len(head) + sum(v.nbytes for v in views)


def compact_dsq(
    source: str | os.PathLike[str] | bytes | bytearray | memoryview,
    dest: str | os.PathLike[str],
    *,
    max_size: int = DEFAULT_MAX_FILE_SIZE,
) -> int:
    """Rewrite a verified .dsq file with its manifest in the ``"dictionary"`` coding.

    The meta and every section stay byte for byte the same; ``dest`` (which may be the source
    path) is written atomically. Returns the new file's size in bytes.
    """
    f = read_dsq(source, max_size=max_size)
    return write_dsq(dest, f.meta, f.sections, manifest="dictionary")


# --------------------------------------------------------------------------- reading


def read_dsq(
    source: str | os.PathLike[str] | bytes | bytearray | memoryview,
    *,
    max_size: int = DEFAULT_MAX_FILE_SIZE,
) -> DsqFile:
    """Read and fully verify a .dsq file from a path or from its bytes.

    Raises :class:`DsqFormatError` for any malformed input, a file over ``max_size`` bytes, or
    a path that cannot be read or is not a regular file (a FIFO, a directory, a device).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return parse_dsq(source, max_size=max_size)
    path = Path(source)
    try:
        # only a regular file (a FIFO would block, a device never end); read(n) allocates n
        # bytes up front, so ask for what fstat says is there (+1 to see a file that grew
        # meanwhile; parse_dsq re-checks the limit)
        with open_input(path) as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > max_size:
                raise DsqFormatError(
                    f"{path}: file is {size} bytes, over the {max_size}-byte limit"
                )
            data = handle.read(size + 1)
    except NotReadable as exc:
        raise DsqFormatError(f"{path}: cannot read: {exc}") from None
    except OSError as exc:
        raise DsqFormatError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        return parse_dsq(data, max_size=max_size)
    except DsqFormatError as exc:
        raise DsqFormatError(f"{path}: {exc}") from None


def parse_dsq(
    data: bytes | bytearray | memoryview, *, max_size: int = DEFAULT_MAX_FILE_SIZE
) -> DsqFile:
    """Parse and fully verify the bytes of a .dsq file (see :func:`read_dsq`)."""
    buf = memoryview(data)
    if buf.ndim != 1 or buf.itemsize != 1:
        buf = buf.cast("B")
    size = buf.nbytes
    if size > max_size:
        raise DsqFormatError(f"file is {size} bytes, over the {max_size}-byte limit")
    if bytes(buf[:8]) != MAGIC[: min(size, 8)] or size == 0:
        raise DsqFormatError("not a .dsq file (bad magic bytes)")
    if size < HEADER_SIZE:
        raise DsqFormatError(f"truncated: {size} bytes, the header alone is {HEADER_SIZE}")
    _, major, minor, flags, stored_len, raw_len, crc = HEADER.unpack(buf[:HEADER_SIZE])
    if major > VERSION[0]:
        raise DsqFormatError(
            f"format version {major}.{minor} was written by a newer deepsqueeze "
            f"(this one reads {VERSION[0]}.x); upgrade deepsqueeze to read it"
        )
    if major < VERSION[0]:
        raise DsqFormatError(f"unsupported format version {major}.{minor}")
    if flags & ~KNOWN_FLAGS:
        raise DsqFormatError(f"unknown header flags 0x{flags:08x}")
    if flags & FLAG_DICTIONARY_1 and not flags & FLAG_DEFLATE:
        raise DsqFormatError(
            f"header flags 0x{flags:08x} name a deflate dictionary for a manifest that is "
            "not deflated (bit 2 needs bit 0)"
        )
    if stored_len > MAX_MANIFEST_SIZE or raw_len > MAX_MANIFEST_SIZE:
        raise DsqFormatError(
            f"manifest length {max(stored_len, raw_len)} is over the {MAX_MANIFEST_SIZE} limit"
        )
    if MANIFEST_BYTE_COST * raw_len > manifest_budget(size):
        raise DsqFormatError(
            f"manifest length {raw_len} is out of proportion to the {size}-byte file (at most "
            f"{manifest_budget(size) // MANIFEST_BYTE_COST} bytes for a file of this size)"
        )
    data_start = HEADER_SIZE + stored_len
    if data_start > size:
        raise DsqFormatError(
            f"manifest length {stored_len} runs past the end of the {size}-byte file"
        )
    if not flags & FLAG_DEFLATE and stored_len != raw_len:
        raise DsqFormatError(
            f"uncompressed manifest: stored length {stored_len} != manifest length {raw_len}"
        )
    stored = buf[HEADER_SIZE:data_start]
    found = zlib.crc32(stored, zlib.crc32(buf[:24]))
    if found != crc:
        raise DsqFormatError(
            f"header/manifest checksum mismatch: expected crc32 {crc:08x}, found {found:08x}"
        )
    zdict = _DICTIONARIES.get(flags & FLAG_DICTIONARY_1)
    raw = _inflate(stored, raw_len, zdict) if flags & FLAG_DEFLATE else bytes(stored)
    manifest = _parse_manifest(raw, size)
    table = _check_manifest(manifest, strict=minor == 0)
    data_len = size - data_start
    sections: dict[str, bytes] = {}
    end = 0
    for name, offset, length, want in table:
        if offset != end:
            raise DsqFormatError(
                f"section {name!r}: offset {offset}, expected {end} (sections must be "
                "contiguous and in table order)"
            )
        end = offset + length
        if end > data_len:
            raise DsqFormatError(
                f"section {name!r}: bytes {offset}..{end} run past the {data_len}-byte data area"
            )
        chunk = buf[data_start + offset : data_start + end]
        got = zlib.crc32(chunk)
        if got != want:
            raise DsqFormatError(
                f"section {name!r}: checksum mismatch: expected crc32 {want:08x}, found {got:08x}"
            )
        sections[name] = bytes(chunk)
    if end != data_len:
        raise DsqFormatError(
            f"{data_len - end} unexpected trailing bytes after the last section "
            f"(data area {data_len} bytes, sections cover {end})"
        )
    return DsqFile(
        meta=manifest["meta"], sections=sections, file_size=size, manifest_size=data_start,
        version=(major, minor),
    )


def _inflate(stored: memoryview, raw_len: int, zdict: bytes | None = None) -> bytes:
    """Inflate (with preset dictionary ``zdict`` if given) with the output capped at
    ``raw_len + 1`` bytes (zip-bomb safe)."""
    inflater = zlib.decompressobj(-15) if zdict is None else zlib.decompressobj(-15, zdict=zdict)
    try:
        raw = inflater.decompress(stored, raw_len + 1)
    except zlib.error as exc:
        raise DsqFormatError(f"manifest is not valid deflate data: {exc}") from exc
    if len(raw) > raw_len:
        raise DsqFormatError(f"manifest inflates to more than its declared {raw_len} bytes")
    if not inflater.eof:
        raise DsqFormatError("manifest deflate stream is truncated")
    if inflater.unused_data:
        raise DsqFormatError("garbage after the manifest deflate stream")
    if len(raw) != raw_len:
        raise DsqFormatError(
            f"manifest inflates to {len(raw)} bytes, header declares {raw_len}"
        )
    return raw


def _bounded_int(text: str) -> int:
    """An integer literal of the manifest: 64-bit, as the writer allows (checked before
    converting, so a 4,000-digit literal costs nothing)."""
    if len(text) > _INT_DIGITS or not _INT_MIN <= (value := int(text)) <= _INT_MAX:
        shown = text if len(text) <= 24 else f"{text[:24]}... ({len(text)} digits)"
        raise ValueError(f"integer {shown} does not fit 64 bits")
    return value


def _parse_manifest(raw: bytes, file_size: int) -> Any:
    """Parse the manifest JSON after checking, on the text, its depth and what parsing costs."""
    shape = json_shape(raw)
    if shape.depth > MAX_JSON_DEPTH:
        raise DsqFormatError(
            f"manifest JSON nests {shape.depth} levels, over the {MAX_JSON_DEPTH} limit"
        )
    cost, budget = manifest_cost(len(raw), shape.values), manifest_budget(file_size)
    if cost > budget:
        raise DsqFormatError(
            f"manifest holds {shape.values} JSON values in {len(raw)} bytes, out of proportion "
            f"to the {file_size}-byte file (parsing would take {cost >> 20} MiB, the limit for "
            f"a file of this size is {budget >> 20} MiB)"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DsqFormatError(f"manifest is not valid UTF-8: {exc}") from exc
    try:
        return json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_float=_finite_float,
            parse_int=_bounded_int,
            parse_constant=_no_constant,
        )
    except _DuplicateKey as exc:
        raise DsqFormatError(f"manifest JSON has a duplicate key {exc.args[0]!r}") from None
    except RecursionError:
        raise DsqFormatError("manifest JSON nests too deeply") from None
    except ValueError as exc:
        raise DsqFormatError(f"manifest is not valid JSON: {exc}") from None


def _is_int(value: Any) -> bool:
    return type(value) is int


def _check_manifest(manifest: Any, *, strict: bool) -> list[tuple[str, int, int, int]]:
    """Validate the container-level manifest; returns the section table as tuples."""
    if not isinstance(manifest, dict):
        raise DsqFormatError(f"manifest must be a JSON object, found {type(manifest).__name__}")
    for key in _TOP_KEYS:
        if key not in manifest:
            raise DsqFormatError(f"manifest has no {key!r} entry")
    extra = sorted(set(manifest) - set(_TOP_KEYS))
    if strict and extra:
        raise DsqFormatError(f"manifest has unknown entries {extra} (format 1.0 allows none)")
    if not isinstance(manifest["meta"], dict):
        raise DsqFormatError("manifest 'meta' must be a JSON object")
    entries = manifest["sections"]
    if not isinstance(entries, list):
        raise DsqFormatError("manifest 'sections' must be a list")
    table = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DsqFormatError(f"section table entry {i} is not a JSON object")
        missing = [k for k in _SECTION_KEYS if k not in entry]
        if missing:
            raise DsqFormatError(f"section table entry {i} lacks {missing}")
        unknown = sorted(set(entry) - set(_SECTION_KEYS))
        if strict and unknown:
            raise DsqFormatError(f"section table entry {i} has unknown keys {unknown}")
        name = entry["name"]
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME_LENGTH:
            raise DsqFormatError(
                f"section table entry {i}: name must be a string of 1..{MAX_NAME_LENGTH} "
                f"characters, found {name!r:.80}"
            )
        if name in seen:
            raise DsqFormatError(f"section {name!r} appears twice in the section table")
        seen.add(name)
        values = []
        for key in ("offset", "length", "crc32"):
            value = entry[key]
            if not _is_int(value) or value < 0:
                raise DsqFormatError(
                    f"section {name!r}: {key} must be a non-negative integer, "
                    f"found {value!r:.80}"
                )
            values.append(value)
        if values[2] > 0xFFFFFFFF:
            raise DsqFormatError(f"section {name!r}: crc32 {values[2]} is not a 32-bit value")
        table.append((name, values[0], values[1], values[2]))
    return table
