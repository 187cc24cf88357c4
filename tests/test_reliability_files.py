"""Bounded reading of hostile files and data (issue 18, findings 5, 7, 8 and the readers' part
of 10): every case ends in the reader's error type, fast, within the documented memory.

- 5: model-spec options that size work or memory (``input_size`` 2000 made ``export`` take 46 s
  and 6 GB; 100000 tried to allocate 40 GB) are bounded when the spec is validated.
- 7: a 16 KB ``.dsq`` whose manifest inflated to 16 MiB cost 960 MiB and 6-14 s to refuse; the
  manifest's parse cost is now bounded by the file's size (``16 × file + 8 MiB`` in all), and
  the JSON pre-scan is linear (its string regex was quadratic: 31 s for a 137-byte file).
- 8: overlapping zip members made a 4.8 MB model.pt cost 46-55 s (and load); a 2 MB gzip bomb
  in a data folder cost 4 GB and 28 s before its checksum error.
- 10: huge integers in a manifest, ``version: "2"`` in a model.pt, and FIFOs, directories and
  devices given as files.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import struct
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from deepsqueeze import dsq, models
from deepsqueeze.codec import container
from deepsqueeze.codec.container import (
    MANIFEST_BUDGET_FLOOR,
    dsq_bytes,
    json_shape,
    manifest_budget,
    manifest_cost,
    parse_dsq,
    read_dsq,
)
from deepsqueeze.data import DATASETS, checksum, load_dataset, read_idx
from deepsqueeze.data.dataset import clear_cache
from deepsqueeze.data.idx import gunzip
from deepsqueeze.errors import (
    CheckpointError,
    DataError,
    DatasetCorruptError,
    DeepSqueezeError,
    DsqFormatError,
    ModelError,
)
from deepsqueeze.io import MAX_ARCHIVE_MEMBERS, load_model, safe_load, save_model
from deepsqueeze.models.registry import MAX_INPUT_ELEMENTS, MAX_PARAMETERS, OPTION_LIMITS
from deepsqueeze.runtime.onnx_export import export_onnx

from .conftest import DATA_DIR, needs_mnist
from .dsq_forge import manifest_text

MAGIC = b"\x89DSQ\r\n\x1a\n"


def _measured(fn: Callable[[], Any], error: type[Exception]) -> tuple[Exception, float, int]:
    """Run ``fn``, which must raise ``error``: (the error, seconds, traced peak bytes)."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(error) as caught:
            fn()
    finally:
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return caught.value, elapsed, peak


def _container(raw: bytes, data: bytes = b"", *, deflate: bool = True) -> bytes:
    """A .dsq container holding manifest text ``raw`` (any bytes) and data area ``data``,
    with a valid header CRC: what a forger writes without the container's writer."""
    stored = raw
    if deflate:
        packer = zlib.compressobj(9, zlib.DEFLATED, -15, 9)
        stored = packer.compress(raw) + packer.flush()
    head = struct.pack("<8sHHIII", MAGIC, 1, 0, int(deflate), len(stored), len(raw))
    return head + struct.pack("<I", zlib.crc32(stored, zlib.crc32(head))) + stored + data


def _padded_manifest(body: bytes, pad: int, crc: int | None = None) -> bytes:
    """A manifest with one all-zero section of ``pad`` bytes and ``meta = {"x": body}``."""
    crc = zlib.crc32(bytes(pad)) if crc is None else crc
    return (b'{"sections":[{"name":"pad","offset":0,"length":%d,"crc32":%d}],"meta":{"x":'
            % (pad, crc)) + body + b"}}"


def _manifest_of(data: bytes) -> bytes:
    return manifest_text(data)


def _edit_manifest(data: bytes, edit: Callable[[dict], None]) -> bytes:
    f = parse_dsq(data)
    meta = dict(f.meta)
    edit(meta)
    return dsq_bytes(meta, f.sections)


@pytest.fixture(scope="module")
def resnet_dsq(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A resnet20 .dsq file, its weights zeroed so it is small."""
    net = models.create("resnet20")
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    path = tmp_path_factory.mktemp("resnet") / "r.dsq"
    dsq.save(net, path)
    return path.read_bytes()


# ------------------------------------------------------------ finding 5: model-spec options


@pytest.mark.parametrize("size", [2000, 100_000])
def test_a_huge_input_size_in_a_dsq_is_refused_fast(size: int, resnet_dsq: bytes,
                                                    tmp_path: Path) -> None:
    forged = _edit_manifest(resnet_dsq, lambda m: m["model"]["kwargs"].update(input_size=size))
    path = tmp_path / "big.dsq"
    path.write_bytes(forged)
    readers: dict[str, Callable[[], Any]] = {
        "load": lambda: dsq.load(path),
        "inspect": lambda: dsq.inspect(path),
        "runtime": lambda: dsq.load(path, mode="runtime", autotune=False),
        "export_onnx": lambda: export_onnx(path),
    }
    pytest.importorskip("onnx")  # its first import (2 s on a loaded machine) is not the file's
    for name, read in readers.items():
        exc, elapsed, _ = _measured(read, DsqFormatError)
        assert f"'input_size' must be > 0 and at most 256, got {size}" in str(exc), name
        assert elapsed < 2, f"{name} took {elapsed:.1f} s"


@pytest.mark.parametrize("size", [2000, 100_000])
def test_a_huge_input_size_in_a_model_file_is_refused_fast(size: int, tmp_path: Path) -> None:
    path = save_model(models.create("resnet20"), tmp_path / "model.pt")
    obj = torch.load(path, weights_only=True)
    obj["model_spec"]["kwargs"]["input_size"] = size
    torch.save(obj, path)
    for read in (lambda: load_model(path), lambda: export_onnx(path)):
        exc, elapsed, _ = _measured(read, CheckpointError)
        assert f"'input_size' must be > 0 and at most 256, got {size}" in str(exc)
        assert elapsed < 2


def test_every_sizing_option_of_the_zoo_is_bounded() -> None:
    """Each number option of each zoo model has a limit: at it, the model builds (on the meta
    device); above it, or at 0, a ModelError names the option, the value and the range."""
    for name in models.list_models():
        info = models.model_info(name)
        numbers = {k for k, v in info.default_kwargs.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        unbounded = numbers - set(info.limits)
        assert not unbounded, f"{name}: unbounded options {unbounded}"
        for key, limit in info.limits.items():
            over = limit * 2 if isinstance(limit, float) else limit + 1
            for bad in (over, 0, -1, 10**30):
                with pytest.raises(ModelError, match=rf"'{key}' must be > 0 and at most "):
                    models.create(name, **{key: bad})
            top = {key: limit}
            if key == "in_channels" and "input_size" in info.default_kwargs:
                top["input_size"] = 16  # 256 channels of 28×28 are over the input limit
            try:
                with torch.device("meta"):
                    models.create(name, **top)
            except ModelError as exc:  # lenet5's fc1 at 256×256: too many parameters
                assert "parameters, over the limit of 16,777,216" in str(exc)


def test_input_elements_per_sample_are_bounded() -> None:
    assert MAX_INPUT_ELEMENTS == 3 * 256 * 256 == OPTION_LIMITS["in_features"]
    with torch.device("meta"):
        models.create("resnet20", in_channels=3, input_size=256)
    with pytest.raises(ModelError, match=r"4×256×256 = 262,144 elements per sample, over the "
                                         r"limit of 196,608"):
        models.create("resnet20", in_channels=4, input_size=256)
    with pytest.raises(ModelError, match="'in_features' must be > 0 and at most 196,608"):
        models.create("lenet300", in_features=MAX_INPUT_ELEMENTS + 1)


def test_parameters_are_bounded() -> None:
    """Options within their limits can still make a big model: lenet5's fc1 at 256×256."""
    assert MAX_PARAMETERS == 1 << 24
    with torch.device("meta"):
        models.create("lenet5", input_size=100)  # 13M parameters
    start = time.perf_counter()
    with pytest.raises(ModelError, match=r"'lenet5' with options .*input_size=256 has "
                                         r"93,056,080 parameters, over the limit"), \
            torch.device("meta"):
        models.create("lenet5", input_size=256)
    assert time.perf_counter() - start < 1


def test_registered_limits_are_enforced() -> None:
    from deepsqueeze.models.registry import _REGISTRY, register_model

    @register_model("test-mlp-limits", input_shape=(1, 4, 4), description="test",
                    limits={"hidden": 64})
    def _mlp(num_classes: int = 10, hidden: int = 8) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(16, hidden), nn.Linear(hidden, num_classes))

    try:
        assert models.model_info("test-mlp-limits").limits == {"num_classes": 100_000,
                                                               "hidden": 64}
        models.create("test-mlp-limits", hidden=64)
        with pytest.raises(ModelError, match="'hidden' must be > 0 and at most 64, got 65"):
            models.create("test-mlp-limits", hidden=65)
        with pytest.raises(ModelError, match="name no option"):
            register_model("test-bad-limits", input_shape=(1, 1, 1), description="x",
                           limits={"nope": 1})(lambda size=1: nn.Identity())
    finally:
        _REGISTRY.pop("test-mlp-limits", None)


# ------------------------------------------------------------ finding 7: manifest amplification


def test_a_manifest_bomb_is_refused_before_inflating() -> None:
    """A 16 KB file whose manifest inflates to 16 MiB of ``[{},...]`` (once: 960 MiB, 6-14 s)."""
    raw = b'{"sections":[],"meta":{"x":[' + b"{}," * ((16 << 20) // 3 - 20) + b"0]}}"
    data = _container(raw)
    assert len(data) < 20_000 and len(raw) > 16_000_000
    exc, elapsed, peak = _measured(lambda: dsq.inspect(data), DsqFormatError)
    assert "out of proportion to the" in str(exc)
    assert elapsed < 1 and peak < 1 << 20


def _largest_passing(unit: Callable[[int], bytes], file_size: int) -> bytes:
    """The file of ``file_size`` bytes holding the most ``unit(n)`` the reader parses."""
    def fits(n: int) -> bool:  # the widest pad fields: the real manifest is no longer
        text = _padded_manifest(unit(n), file_size, 0xFFFFFFFF)
        budget = manifest_budget(max(file_size, len(_container(text))))
        return (8 * len(text) <= budget
                and manifest_cost(len(text), json_shape(text).values) <= budget)

    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    body = unit(lo)
    pad = 0
    for _ in range(3):  # the pad's digits change the manifest's length a little
        pad = max(0, file_size - len(_container(_padded_manifest(body, pad))))
    return _container(_padded_manifest(body, pad), bytes(pad))


_UNITS: dict[str, Callable[[int], bytes]] = {
    "empty objects": lambda n: b"[" + b"{}," * n + b"0]",
    "small objects": lambda n: b"[" + b'{"a":0},' * n + b"0]",
    "distinct keys": lambda n: b"{" + b",".join(b'"%x":0' % i for i in range(n)) + b"}",
    "astral string": lambda n: b'"\xf0\x9f\x98\x80' + b"a" * n + b'"',
    "64-bit integers": lambda n: b"[" + b"18446744073709551615," * n + b"0]",
}


@pytest.mark.parametrize("kind", sorted(_UNITS))
@pytest.mark.parametrize("file_size", [16_000, 1_000_000])
def test_the_costliest_manifest_a_file_may_have_stays_bounded(kind: str, file_size: int) -> None:
    """The most expensive JSON of each kind the reader lets through to ``json.loads`` (found with
    its own cost model) costs at most ``16 × file + 8 MiB`` and well under a second."""
    data = _largest_passing(_UNITS[kind], file_size)
    exc, elapsed, peak = _measured(lambda: dsq.inspect(data), DsqFormatError)
    assert "format" in str(exc)  # parsed, then refused as not a model: the whole cost was paid
    assert peak < 16 * len(data) + (8 << 20), f"{peak / 2**20:.1f} MiB"
    assert elapsed < 2


def test_a_manifest_just_over_the_budget_is_refused_before_parsing() -> None:
    data = _largest_passing(_UNITS["empty objects"], 16_000)
    raw = _manifest_of(data)
    area = data[len(_container(raw)) :]
    while manifest_cost(len(raw), json_shape(raw).values) <= manifest_budget(len(data)):
        raw = raw.replace(b"[{},", b"[{},{},", 1)
    over = _container(raw, area)
    exc, _, peak = _measured(lambda: parse_dsq(over), DsqFormatError)
    assert "JSON values" in str(exc) and "out of proportion" in str(exc)
    assert peak < 1 << 20  # refused on the scan, before decoding or parsing


def test_escaped_quotes_are_scanned_in_linear_time() -> None:
    """The old string regex backtracked on ``"\\"\\"...``: 31 s for a 137-byte file."""
    for body in (b'"' + b'\\"' * 300_000, b'"' + b'\\"' * 300_000 + b'"', b'"\\' * 200_000):
        data = _container(b'{"sections":[],"meta":{"x":' + body)
        _, elapsed, _ = _measured(lambda d=data: parse_dsq(d), DsqFormatError)
        assert elapsed < 1, f"{elapsed:.1f} s"


def _reference_shape(text: bytes) -> tuple[int, int]:
    depth = deepest = 0
    values = 1
    inside = False
    run = 0
    for byte in text:
        ch = chr(byte)
        if ch == '"' and run % 2 == 0:
            inside = not inside
            values += inside
        elif not inside and ch != '"':
            if ch in "[{":
                depth += 1
                deepest = max(deepest, depth)
                values += 1
            elif ch in "]}":
                depth -= 1
            elif ch in ",:":
                values += 1
        run = run + 1 if ch == "\\" else 0
    return deepest, values


@given(text=st.lists(st.sampled_from(['"', "\\", "[", "]", "{", "}", ",", ":", "a", '\\"',
                                      "\\\\", "é"]), max_size=60).map("".join),
       chunk=st.sampled_from([1, 2, 3, 7, 1 << 14]))
@settings(max_examples=300, deadline=None)
def test_json_shape_matches_a_plain_scanner(text: str, chunk: int) -> None:
    """The chunked numpy scan equals a byte-by-byte one for any text and any chunking."""
    old = container._SCAN_CHUNK
    container._SCAN_CHUNK = chunk
    try:
        shape = json_shape(text.encode())
    finally:
        container._SCAN_CHUNK = old
    assert (shape.depth, shape.values) == _reference_shape(text.encode())


def test_real_manifests_are_far_under_the_budget(tmp_path: Path) -> None:
    """resnet56, the zoo's largest manifest (128 KB), costs 2.4 MiB of the 6 MiB floor."""
    net = models.create("resnet56")
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    dsq.save(net, tmp_path / "r56.dsq")
    data = (tmp_path / "r56.dsq").read_bytes()
    raw_len = struct.unpack_from("<I", data, 20)[0]
    raw = manifest_text(data)
    assert len(raw) == raw_len
    cost = manifest_cost(len(raw), json_shape(raw).values)
    assert cost < MANIFEST_BUDGET_FLOOR / 2
    dsq.load(data)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (b"1" + b"0" * 400, "integer 1000.* does not fit 64 bits"),
        (b"9" * 4400, r"\(4400 digits\) does not fit 64 bits"),
        (b"18446744073709551616", "does not fit 64 bits"),
        (b"-9223372036854775809", "does not fit 64 bits"),
    ],
)
def test_huge_integers_in_a_manifest_are_format_errors(value: bytes, match: str,
                                                       resnet_dsq: bytes) -> None:
    f = parse_dsq(resnet_dsq)
    raw = dsq_bytes(f.meta, f.sections)
    stored = struct.unpack_from("<I", raw, 16)[0]
    text = manifest_text(raw)
    forged = text.replace(b'"dense_parameters":', b'"dense_parameters":' + value + b',"_":', 1)
    data = _container(forged, raw[28 + stored :])
    for read in (dsq.inspect, dsq.load, lambda d: dsq.load(d, mode="runtime", autotune=False)):
        with pytest.raises(DsqFormatError, match=match):
            read(data)


def test_manifest_integers_must_fit_where_they_are_used(resnet_dsq: bytes) -> None:
    for bound in (-(2**63), 2**64 - 1):
        assert parse_dsq(dsq_bytes({"n": bound}, {})).meta == {"n": bound}
    big = _edit_manifest(resnet_dsq, lambda m: m.update(dense_parameters=2**64 - 1))
    with pytest.raises(DsqFormatError, match=r"'dense_parameters' must be an integer in "
                                             r"0\.\.2\*\*63-1"):
        dsq.inspect(big)
    ok = _edit_manifest(resnet_dsq, lambda m: m.update(dense_parameters=2**63 - 1))
    report = dsq.inspect(ok)
    assert report.dense_bytes == (2**63 - 1) * 4 and report.compression > 1e12


# ------------------------------------------------------------ finding 8a: zip archives


def _central_records(data: bytes) -> tuple[list[bytes], int]:
    """The central directory records of a (zip64) torch.save archive, and its offset."""
    eocd = data.rindex(b"PK\x05\x06")
    locator = data.rfind(b"PK\x06\x07", 0, eocd)
    z64 = struct.unpack_from("<Q", data, locator + 8)[0]
    size, offset = struct.unpack_from("<QQ", data, z64 + 40)
    cd = data[offset : offset + size]
    records, pos = [], 0
    while pos < len(cd):
        n, e, c = struct.unpack_from("<HHH", cd, pos + 28)
        records.append(cd[pos : pos + 46 + n + e + c])
        pos += 46 + n + e + c
    return records, offset


def _rezip(body: bytes, records: list[bytes]) -> bytes:
    """``body`` + a central directory of ``records`` + zip64 and plain end records."""
    cd = b"".join(records)
    count = len(records)
    z64 = struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, len(cd),
                      len(body))
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, len(body) + len(cd), 1)
    eocd = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, min(count, 0xFFFF),
                       min(count, 0xFFFF), len(cd), len(body), 0)
    return body + cd + z64 + locator + eocd


def _named(record: bytes, name: bytes) -> bytes:
    n = struct.unpack_from("<H", record, 28)[0]
    return record[:28] + struct.pack("<H", len(name)) + record[30:46] + name + record[46 + n :]


@pytest.fixture(scope="module")
def weights_pt() -> bytes:
    """A model file as torch.save writes it, with one 4 MB tensor."""
    buf = io.BytesIO()
    torch.save({"format": "deepsqueeze-model", "version": 1,
                "state_dict": {"w": torch.zeros(1 << 20)}}, buf)
    return buf.getvalue()


def _largest(records: list[bytes]) -> bytes:
    return max(records, key=lambda r: struct.unpack_from("<I", r, 20)[0])


def test_overlapping_zip_members_are_refused_in_linear_time(weights_pt: bytes,
                                                            tmp_path: Path) -> None:
    """10,000 central records of the 4 MB member: once 46 s of CRC checks, then it loaded."""
    records, offset = _central_records(weights_pt)
    big = _largest(records)
    path = tmp_path / "model.pt"
    forged = {
        "appears twice": _rezip(weights_pt[:offset], records + [big] * 10_000),
        "overlaps the one before|names another file": _rezip(
            weights_pt[:offset],
            records + [_named(big, b"archive/data/%d" % (i + 1)) for i in range(10_000)]),
    }
    for match, data in forged.items():
        assert len(data) > 4_000_000
        path.write_bytes(data)
        exc, elapsed, peak = _measured(lambda: safe_load(path), CheckpointError)
        assert any(m in str(exc) for m in match.split("|")), str(exc)
        assert elapsed < 5 and peak < 16 * len(data) + (8 << 20)


def test_zip_members_out_of_place_are_refused(weights_pt: bytes, tmp_path: Path) -> None:
    records, offset = _central_records(weights_pt)
    first = min(records, key=lambda r: struct.unpack_from("<I", r, 42)[0])
    big = _largest(records)
    i_big = records.index(big)
    inside = records.copy()  # a member whose header lies inside the first member's data
    inside[i_big] = big[:42] + struct.pack("<I", struct.unpack_from("<I", first, 42)[0] + 1) \
        + big[46:]
    last = max(records, key=lambda r: struct.unpack_from("<I", r, 42)[0])
    longer = records.copy()  # the last member claiming bytes of the central directory
    size = struct.unpack_from("<I", last, 20)[0] + 100
    longer[records.index(last)] = last[:20] + struct.pack("<II", size, size) + last[28:]
    path = tmp_path / "model.pt"
    for data, match in ((_rezip(weights_pt[:offset], inside), "overlaps the one before"),
                        (_rezip(weights_pt[:offset], longer), "runs past the end")):
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=match):
            safe_load(path)


def test_too_many_zip_members_are_refused_before_parsing(weights_pt: bytes,
                                                         tmp_path: Path) -> None:
    records, offset = _central_records(weights_pt)
    small = min(records, key=len)
    data = _rezip(weights_pt[:offset], records + [small] * MAX_ARCHIVE_MEMBERS)
    path = tmp_path / "model.pt"
    path.write_bytes(data)
    exc, elapsed, peak = _measured(lambda: safe_load(path), CheckpointError)
    assert f"over the {MAX_ARCHIVE_MEMBERS} a model file may have" in str(exc)
    assert elapsed < 0.5 and peak < 1 << 20


# ------------------------------------------------------------ finding 8b: gzip bombs


def _bomb(mib: int, header: bytes = b"") -> bytes:
    """gzip data of ``header`` then ``mib`` MiB of zeros (about 1 KB per MiB)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    zero = bytes(1 << 20)
    return b"".join([packer.compress(header), *(packer.compress(zero) for _ in range(mib)),
                     packer.flush()])


_MNIST_IMAGES = b"\x00\x00\x08\x03" + struct.pack(">III", 60_000, 28, 28)


@pytest.fixture
def isolated_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("DEEPSQUEEZE_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    clear_cache()
    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    return folder


@pytest.mark.parametrize("header", [_MNIST_IMAGES, b""])
def test_a_gzip_bomb_in_a_data_folder_is_refused_quickly(header: bytes,
                                                         isolated_data: Path) -> None:
    """200 MiB of zeros in 200 KB as MNIST's training images (2 GiB: once 4 GB and 28 s)."""
    (isolated_data / "train-images-idx3-ubyte.gz").write_bytes(_bomb(200, header))
    (isolated_data / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"x"))
    exc, elapsed, peak = _measured(
        lambda: load_dataset("mnist", "train", data_dir=isolated_data.parent, download=False),
        DatasetCorruptError)
    # the real file's size, or at once when the first bytes are no IDX header
    assert f"decompresses to more than {'47,040,016' if header else '36'} bytes" in str(exc)
    assert elapsed < 5 and peak < 8 << 20, (elapsed, peak)


def test_a_dataset_file_larger_than_its_contents_is_not_read(isolated_data: Path) -> None:
    """A 1 GiB (sparse) file named like MNIST's 47 MB training images is refused unread."""
    images = isolated_data / "train-images-idx3-ubyte"
    with open(images, "wb") as f:
        f.truncate(1 << 30)
    (isolated_data / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"x"))
    limit = DATASETS["mnist"].train[0].max_size
    assert limit is not None and 47_040_016 < limit < 48_000_000
    exc, elapsed, peak = _measured(
        lambda: load_dataset("mnist", "train", data_dir=isolated_data.parent, download=False),
        DataError)
    assert f"it is 1,073,741,824 bytes, over the {limit:,}-byte limit" in str(exc)
    assert elapsed < 0.5 and peak < 1 << 20


def test_an_unverifiable_gzip_file_is_never_decompressed(isolated_data: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """KMNIST publishes no checksum of the contents: a .gz of another MD5 is refused as is."""
    folder = isolated_data.parent / "kmnist"
    folder.mkdir()
    (folder / "train-images-idx3-ubyte.gz").write_bytes(_bomb(64, _MNIST_IMAGES))
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"x"))

    def no_gunzip(*args: Any, **kwargs: Any) -> bytearray:
        raise AssertionError("decompressed an unverifiable file")

    monkeypatch.setattr(checksum, "gunzip", no_gunzip)
    with pytest.raises(DatasetCorruptError, match="checksum mismatch"):
        load_dataset("kmnist", "train", data_dir=folder.parent, download=False)


def test_read_idx_decompresses_no_more_than_the_header_declares(tmp_path: Path) -> None:
    path = tmp_path / "labels-idx1-ubyte.gz"
    path.write_bytes(_bomb(64, b"\x00\x00\x08\x01" + struct.pack(">I", 10)))
    exc, elapsed, peak = _measured(lambda: read_idx(path), DatasetCorruptError)
    assert "decompresses to more than 18 bytes" in str(exc)
    assert elapsed < 0.5 and peak < 4 << 20
    path.write_bytes(_bomb(300, b"\x00\x00\x08\x01" + struct.pack(">I", 2**32 - 1)))
    exc, elapsed, _ = _measured(lambda: read_idx(path), DatasetCorruptError)
    assert "more than 268,435,456 bytes" in str(exc)  # MAX_PAYLOAD when nothing else is known


def test_gunzip_streams_with_a_cap() -> None:
    data = bytes(range(256)) * 1000
    packed = gzip.compress(data) + gzip.compress(b"tail") + b"\x00" * 8
    assert bytes(gunzip(packed, "x")) == data + b"tail"
    digest = hashlib.md5()
    assert gunzip(packed, "x", keep=False, update=digest.update) == b""
    assert digest.hexdigest() == hashlib.md5(data + b"tail").hexdigest()
    with pytest.raises(DatasetCorruptError, match="more than 1,000 bytes"):
        gunzip(packed, "x", 1000)
    for bad in (packed[:-20], packed[:-8] + b"junk"):
        with pytest.raises(DatasetCorruptError, match="truncated or corrupt gzip"):
            gunzip(bad, "x")


@needs_mnist
def test_a_recompressed_real_file_is_still_verified(isolated_data: Path) -> None:
    assert DATA_DIR is not None
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        payload = gzip.decompress((DATA_DIR / "mnist" / f"{stem}.gz").read_bytes())
        (isolated_data / f"{stem}.gz").write_bytes(gzip.compress(payload, compresslevel=1))
    test = load_dataset("mnist", "test", data_dir=isolated_data.parent, download=False)
    assert len(test) == 10_000


# ------------------------------------------------------------ finding 10: fields and file kinds


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("version", "2", "field 'version' must be a non-negative integer, got '2'"),
        ("version", -1, "field 'version' must be a non-negative integer"),
        ("version", 2.0, "field 'version' must be a non-negative integer"),
        ("format", 5, "field 'format' must be a string"),
    ],
)
def test_model_file_fields_of_the_wrong_type(field: str, value: Any, match: str,
                                             tmp_path: Path) -> None:
    path = save_model(models.create("lenet300"), tmp_path / "model.pt")
    obj = torch.load(path, weights_only=True)
    obj[field] = value
    torch.save(obj, path)
    for read in (safe_load, load_model):
        with pytest.raises(CheckpointError, match=match):
            read(path)


def _returns_in_time(fn: Callable[[], Any], fifo: Path | None, seconds: float = 5) -> Any:
    """Run ``fn`` in a thread: its result or exception, failing if it blocks; a reader stuck
    on ``fifo`` is released before failing."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # handed to the test
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if fifo is not None:
            with contextlib.suppress(OSError):  # EOF for the reader
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"blocked for more than {seconds} s")
    if "error" in box:
        raise box["error"]
    return box.get("result")


_READERS: dict[str, tuple[Callable[[Path], Any], type[DeepSqueezeError]]] = {
    "read_dsq": (read_dsq, DsqFormatError),
    "inspect": (dsq.inspect, DsqFormatError),
    "load": (dsq.load, DsqFormatError),
    "load runtime": (lambda p: dsq.load(p, mode="runtime", autotune=False), DsqFormatError),
    "load_model": (load_model, CheckpointError),
    "safe_load": (safe_load, CheckpointError),
    "load_model_or_dsq": (dsq.load_model_or_dsq, CheckpointError),
    "read_idx": (read_idx, DataError),
}


@pytest.mark.parametrize("reader", sorted(_READERS))
@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_only_regular_files_are_read(reader: str, kind: str, tmp_path: Path) -> None:
    """A FIFO made ``inspect`` and ``evaluate`` hang; a directory or a device is refused too."""
    read, error = _READERS[reader]
    fifo = None
    if kind == "fifo":
        path = fifo = tmp_path / "model.pt"
        os.mkfifo(path)
        want = r"FIFO \(named pipe\), not a regular file"
    elif kind == "directory":
        path = tmp_path
        want = "directory, not a regular file"
    else:
        path = Path("/dev/zero")
        if not path.exists():
            pytest.skip("no /dev/zero")
        want = "character device, not a regular file"
    with pytest.raises(error, match=want):
        _returns_in_time(lambda: read(path), fifo)


def test_missing_files_keep_their_messages(tmp_path: Path) -> None:
    with pytest.raises(DsqFormatError, match="cannot read: no such file"):
        dsq.inspect(tmp_path / "none.dsq")
    with pytest.raises(CheckpointError, match=r"none\.pt: no such file"):
        load_model(tmp_path / "none.pt")
    with pytest.raises(DataError, match="no such file"):
        read_idx(tmp_path / "none-idx1-ubyte")
