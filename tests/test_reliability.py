"""Reliability: hostile .dsq files, malicious pickles, interrupted writes and runs, bad input.

The container's own byte-level fuzzing lives in tests/test_codec.py; here the hostile input goes
through the public model-level readers (``deepsqueeze.dsq.load`` / ``inspect``), with manifests
forged *semantically* and re-written with valid checksums. docs/reliability.md tabulates what is
tried and what happens. ``DEEPSQUEEZE_RELIABILITY_STATS=<file>`` writes the per-category case
counts and outcomes of a run to ``<file>`` (JSON), for that table;
``DEEPSQUEEZE_FUZZ_EXAMPLES=<n>`` sets the examples per hostile-file property.
"""

from __future__ import annotations

import builtins
import collections
import copy
import functools
import importlib.util
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from deepsqueeze import dsq, models
from deepsqueeze.codec.container import dsq_bytes, parse_dsq
from deepsqueeze.codec.options import EncodeOptions
from deepsqueeze.data import ImageDataset
from deepsqueeze.data.registry import DATASETS
from deepsqueeze.errors import (
    CheckpointError,
    DsqFormatError,
    ModelError,
    RecipeError,
)
from deepsqueeze.io import atomic_save, load_model, safe_load, save_model
from deepsqueeze.methods.base import create_method, select_layers
from deepsqueeze.pipeline import compress, load_recipe, parse_recipe
from deepsqueeze.runtime.kernel import get_kernel
from deepsqueeze.training.loop import TrainConfig, fit
from tests.conftest import DATA_DIR, REPO, needs_mnist

SRC = REPO / "src"
CASE_SECONDS = 5.0  # one hostile file: load + inspect each finish well within this
TRACED_LIMIT = 64 << 20  # numpy/Python peak per call for a ~25 KB file (its model is ~1 MB)
RSS_LIMIT = 256 << 20  # peak resident growth per call (torch allocations included)
# DEEPSQUEEZE_FUZZ_EXAMPLES=<n> runs n examples per hostile-file property (docs/reliability.md)
_EXAMPLES = int(os.environ.get("DEEPSQUEEZE_FUZZ_EXAMPLES", "0"))
HOSTILE = settings(
    max_examples=_EXAMPLES or 120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
STATS: collections.Counter[tuple[str, str]] = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def _write_stats() -> Iterator[None]:
    yield
    target = os.environ.get("DEEPSQUEEZE_RELIABILITY_STATS")
    if target:
        rows = [{"category": c, "outcome": o, "cases": n} for (c, o), n in sorted(STATS.items())]
        Path(target).write_text(json.dumps(rows, indent=1))


# ============================================================================ no code executed

# Audit events that mean code is being run or a process/library started (PEP 578). Reading a
# .dsq file raises none of them; the hook only records while a check is running.
_CODE_EVENTS = ("exec", "compile", "pickle.find_class", "marshal.load", "os.system",
                "subprocess.Popen", "os.posix_spawn", "os.exec", "os.spawn", "os.fork",
                "ctypes.dlopen", "socket.connect", "code.__new__")
_AUDIT = {"on": False, "seen": []}


def _audit(event: str, args: tuple) -> None:
    if _AUDIT["on"] and event.startswith(_CODE_EVENTS):
        _AUDIT["seen"].append(event)


sys.addaudithook(_audit)


def _hwm_reset() -> int | None:
    """Reset the peak-RSS mark (Linux); returns the current RSS in bytes, None elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _status("VmRSS")
    except OSError:
        return None


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _guarded(fn: Callable[[], Any], traced_limit: int = TRACED_LIMIT,
             rss_limit: int = RSS_LIMIT) -> tuple[str, Any]:
    """Run ``fn``: ("ok", result) or ("error", DsqFormatError); any other exception propagates.

    Fails when it takes longer than CASE_SECONDS, allocates beyond the limits, or runs code.
    """
    rss0 = _hwm_reset()
    _AUDIT["seen"].clear()
    _AUDIT["on"] = True
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        outcome: tuple[str, Any] = ("ok", fn())
    except DsqFormatError as exc:
        assert str(exc).strip(), "a DsqFormatError must say what is wrong"
        outcome = ("error", exc)
    finally:
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        _AUDIT["on"] = False
    assert elapsed < CASE_SECONDS, f"took {elapsed:.1f} s"
    assert peak < traced_limit, f"traced peak {peak} bytes"
    if rss0 is not None:
        grown = _status("VmHWM") - rss0
        assert grown < rss_limit, f"resident memory grew by {grown} bytes"
    assert not _AUDIT["seen"], f"code ran while reading: {_AUDIT['seen']}"
    return outcome


@functools.cache
def _warm_runtime() -> None:
    """Build/load the runtime's C kernel and import its modules once, outside the guard (a
    compiler run, a dlopen and module imports are not the file's doing)."""
    get_kernel()
    for data in real_files().values():
        dsq.load(data, mode="runtime", autotune=False, fuse=False)


def _check_file(source: bytes | Path, category: str) -> str:
    """load and inspect ``source``: both DsqFormatError, or both a valid result."""
    kind, model = _guarded(lambda: dsq.load(source))
    kind2, report = _guarded(lambda: dsq.inspect(source))
    assert kind == kind2, f"load: {kind} ({model}) but inspect: {kind2} ({report})"
    # the runtime decodes compressed layers with its own code: same verdict, same outputs.
    # fx fusion generates Python code from the zoo model (not from the file): left out here.
    _warm_runtime()
    kind3, fast = _guarded(
        lambda: dsq.load(source, mode="runtime", autotune=False, fuse=False))
    assert kind == kind3, f"load: {kind} ({model}) but load(mode='runtime'): {kind3} ({fast})"
    if kind == "ok":
        assert isinstance(model, nn.Module) and not model.training
        assert all(torch.isfinite(t).all() for t in model.state_dict().values())
        assert report.file_bytes > 0 and report.layers
        x = torch.randn(2, *models.input_shape_of(model))
        with torch.no_grad():
            torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
    STATS[(category, kind)] += 1
    return kind


# ============================================================================ the real files


def _compressed(layers: dict[str, list[str] | None]) -> nn.Module:
    torch.manual_seed(0)
    model = models.create("lenet300")
    for name, params in (("prune", {"sparsity": 0.9}), ("share", {"bits": 4})):
        if name not in layers:
            continue
        method = create_method(name, **params, layers=layers[name])
        method.apply(model, select_layers(model, method.params.layers, method.supported))
        method.finalize(model)
    return model


@functools.cache
def real_files() -> dict[str, bytes]:
    """Three real lenet300 .dsq files that together use all four tensor encodings and all
    three index codings.

    ``all``: every layer pruned and shared, written without rANS (sparse-codebook, Huffman and
    fixed-width streams); ``ans``: the same model as every writer's default writes it (rANS
    streams where smaller: the random masks make codebooks with a zero symbol win);
    ``mixed``: fc1 pruned (sparse), fc2 shared (codebook), fc3 untouched (dense).
    """
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        for key, layers, ans in (("all", {"prune": None, "share": None}, False),
                                 ("ans", {"prune": None, "share": None}, True),
                                 ("mixed", {"prune": ["fc1"], "share": ["fc2"]}, True)):
            path = Path(folder) / f"{key}.dsq"
            dsq.save(_compressed(layers), path, encode=EncodeOptions(ans=ans))
            out[key] = path.read_bytes()
    return out


def test_the_real_files_load_and_use_every_encoding() -> None:
    encodings, codings = set(), set()
    for data in real_files().values():
        assert _check_file(data, "unmodified real file") == "ok"
        tensors = parse_dsq(data).meta["tensors"]
        encodings |= {t["encoding"] for t in tensors}
        codings |= {t.get(k) for t in tensors for k in ("index_coding", "value_coding")} - {None}
    assert encodings == {"dense", "codebook", "sparse", "sparse-codebook"}
    assert codings == {"fixed", "huffman", "ans"}


# ============================================================================ forged manifests

_INT = st.sampled_from([-1, 0, 1, 2, 3, 4, 7, 8, 15, 16, 17, 24, 31, 32, 33, 64, 255, 256,
                        2**16, 2**20, 2**31, 2**32, 2**62, 2**63 - 1, 2**64 - 1, 10**12]) | \
    st.integers(-(2**63), 2**64 - 1)
_WORD = st.sampled_from(["dense", "codebook", "sparse", "sparse-codebook", "huffman", "fixed",
                         "ans", "float32", "float16", "int64", "float64", "bool", "", "fc1.weight",
                         "fc1.bias", "deepsqueeze-model", "lenet300"])
_VALUE = st.recursive(
    st.none() | st.booleans() | _INT | st.floats(allow_nan=False, allow_infinity=False)
    | _WORD | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=3),
    max_leaves=8,
)
_FIELDS = ("name", "shape", "encoding", "dtype", "entries", "index_bits", "index_coding",
           "codebook_size", "value_bits", "value_coding", "extra")
_ZOO = ("lenet300", "lenet5", "lenet5-classic", "resnet20", "mobilenet-tiny", "nope",
        "os.system", "__import__", "")
_KWARGS = ("in_features", "num_classes", "in_channels", "input_size", "zzz")


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def _entries(meta: dict) -> list[dict] | None:
    tensors = meta.get("tensors")
    ok = isinstance(tensors, list) and tensors and all(isinstance(t, dict) for t in tensors)
    return tensors if ok else None


def _forge_tensor(data: st.DataObject, meta: dict, sections: dict) -> str:
    tensors = _entries(meta)
    if tensors is None:  # an earlier forgery broke the list
        return _forge_meta(data, meta, sections)
    entry = tensors[data.draw(st.integers(0, len(tensors) - 1))]
    how = data.draw(st.sampled_from(("set", "delete", "shape", "count", "nest")))
    key = data.draw(st.sampled_from(_FIELDS))
    if how == "set":
        entry[key] = data.draw(_VALUE)
    elif how == "delete":
        entry.pop(key, None)
    elif how == "nest":  # deep (the container refuses > 64 levels) or huge JSON
        entry[key] = data.draw(st.sampled_from([_nested(60), [1] * 100_000, "x" * 1_000_000]))
    elif how == "shape":
        shape = entry.get("shape")
        shape = [d if isinstance(d, int) else 1 for d in shape] if isinstance(shape, list) else []
        lie = data.draw(st.sampled_from(("scale", "plus", "minus", "zero", "negative", "huge",
                                         "extra dim", "drop dim", "transpose")))
        i = data.draw(st.integers(0, max(len(shape) - 1, 0)))
        if lie == "extra dim":
            shape.append(data.draw(st.sampled_from([1, 2, 10**12])))
        elif lie == "drop dim" and shape:
            shape.pop(i)
        elif lie == "transpose":
            shape.reverse()
        elif shape:
            d = shape[i]
            shape[i] = {"scale": d * data.draw(st.sampled_from([2, 1000])), "plus": d + 1,
                        "minus": d - 1, "zero": 0, "negative": -d, "huge": 10**12}[lie]
        entry["shape"] = shape
    else:  # counts that lie
        key = data.draw(st.sampled_from(("entries", "codebook_size", "index_bits", "value_bits")))
        old = entry.get(key, 1)
        old = old if isinstance(old, int) else 1
        entry[key] = data.draw(st.sampled_from([old + 1, old - 1, old * 2, old // 2, 0, -old,
                                                old + 2**32, 10**12]))
    return f"tensor field: {how}"


def _forge_table(data: st.DataObject, meta: dict, sections: dict) -> str:
    tensors = _entries(meta)
    if tensors is None:
        return _forge_meta(data, meta, sections)
    how = data.draw(st.sampled_from(("drop", "duplicate", "extra", "reverse", "replace")))
    i = data.draw(st.integers(0, len(tensors) - 1))
    if how == "drop":
        tensors.pop(i)
    elif how == "duplicate":
        tensors.insert(data.draw(st.integers(0, len(tensors))), copy.deepcopy(tensors[i]))
    elif how == "extra":
        twin = copy.deepcopy(tensors[i])
        twin["name"] = data.draw(st.sampled_from(["fc4.weight", "fc1.mask", "x", "fc1"]))
        for key, value in list(sections.items()):
            if key.startswith(f"{tensors[i].get('name')}:"):
                sections[twin["name"] + key[key.index(":"):]] = value
        tensors.append(twin)
    elif how == "reverse":
        tensors.reverse()
    else:
        meta["tensors"] = data.draw(_VALUE)
    return f"tensor list: {how}"


def _forge_spec(data: st.DataObject, meta: dict, sections: dict) -> str:
    how = data.draw(st.sampled_from(("name", "kwarg", "gigantic", "kwargs", "spec")))
    spec = meta.get("model")
    if not isinstance(spec, dict) or not isinstance(spec.get("kwargs"), dict):
        meta["model"] = spec = {"name": "lenet300", "kwargs": {}}
    if how == "name":
        spec["name"] = data.draw(st.sampled_from(_ZOO) | _VALUE)
    elif how == "kwarg":
        spec["kwargs"][data.draw(st.sampled_from(_KWARGS))] = data.draw(_VALUE)
    elif how == "gigantic":
        spec["kwargs"][data.draw(st.sampled_from(_KWARGS))] = data.draw(
            st.sampled_from([10**6, 10**9, 10**12, 2**62, 2**63 - 1, 2**64 - 1]))
    elif how == "kwargs":
        spec["kwargs"] = data.draw(_VALUE)
    else:
        meta["model"] = data.draw(_VALUE)
    return f"model spec: {how}"


def _forge_meta(data: st.DataObject, meta: dict, sections: dict) -> str:
    key = data.draw(st.sampled_from(("format", "parameters", "dense_parameters", "tensors",
                                     "model", "recipe")))
    if data.draw(st.booleans()):
        meta.pop(key, None)
        return "meta entry: delete"
    meta[key] = data.draw(_VALUE)
    return "meta entry: set"


def _forge_sections(data: st.DataObject, meta: dict, sections: dict) -> str:
    names = sorted(sections) or ["fc1.bias:data"]
    sections.setdefault(names[0], b"")
    a, b = data.draw(st.sampled_from(names)), data.draw(st.sampled_from(names))
    how = data.draw(st.sampled_from(("swap", "copy", "random", "random same length", "truncate",
                                     "extend", "delete", "extra", "non-finite")))
    if how == "swap":  # section bytes swapped between tensors
        sections[a], sections[b] = sections[b], sections[a]
    elif how == "copy":
        sections[a] = sections[b]
    elif how == "random":  # e.g. a Huffman stream replaced by random bytes
        sections[a] = data.draw(st.binary(max_size=64))
    elif how == "random same length":
        sections[a] = np.random.default_rng(data.draw(st.integers(0, 2**32))).bytes(
            len(sections[a]))
    elif how == "truncate":
        sections[a] = sections[a][: data.draw(st.integers(0, max(len(sections[a]) - 1, 0)))]
    elif how == "extend":
        sections[a] = sections[a] + data.draw(st.binary(min_size=1, max_size=8))
    elif how == "delete":
        del sections[a]
    elif how == "extra":
        sections[data.draw(st.sampled_from(["fc1.weight:extra", "zzz", "fc1.weight:data"]))] = \
            b"\x00" * 8
    else:  # a float section full of NaN or Inf (save never writes them)
        word = data.draw(st.sampled_from([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f",
                                          b"\x00\x00\x80\xff"]))
        sections[a] = word * (len(sections[a]) // 4) + sections[a][len(sections[a]) // 4 * 4:]
    return f"section bytes: {how}"


_FORGERS = (_forge_tensor, _forge_tensor, _forge_table, _forge_spec, _forge_meta,
            _forge_sections, _forge_sections)


@given(data=st.data())
@HOSTILE
def test_forged_manifests_give_a_format_error_or_a_valid_model(data: st.DataObject) -> None:
    """Semantic lies in a manifest with valid checksums: DsqFormatError, bounded, never a crash."""
    f = parse_dsq(real_files()[data.draw(st.sampled_from(["all", "ans", "mixed"]))])
    meta, sections = copy.deepcopy(f.meta), dict(f.sections)
    steps = [data.draw(st.sampled_from(_FORGERS))(data, meta, sections)
             for _ in range(data.draw(st.sampled_from([1, 1, 1, 2, 3])))]
    forged = dsq_bytes(meta, sections)  # the container's writer: every CRC is valid
    _check_file(forged, steps[0] if len(steps) == 1 else "several forgeries at once")


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda m: m["model"]["kwargs"].update(in_features=10**12), id="in_features"),
        pytest.param(lambda m: m["model"]["kwargs"].update(in_features=10**7), id="in_features7"),
        pytest.param(lambda m: m["model"]["kwargs"].update(num_classes=2**63 - 1), id="classes"),
        pytest.param(lambda m: m["model"].update(name="resnet56", kwargs={"num_classes": 10**9}),
                     id="resnet56"),
        pytest.param(lambda m: m["tensors"][1].update(shape=[10**12, 784]), id="shape"),
        pytest.param(lambda m: m["tensors"][1].update(shape=[2**40, 2**40]), id="shape2"),
        pytest.param(lambda m: m["tensors"][1].update(shape=[300, 784 * 1000]), id="shape3"),
        pytest.param(lambda m: m["tensors"][1].update(entries=10**12), id="entries"),
        pytest.param(lambda m: m["tensors"][1].update(codebook_size=2**63), id="codebook"),
        pytest.param(lambda m: m["tensors"][0].update(shape=[1] * 100_000), id="rank"),
    ],
)
def test_gigantic_declarations_are_refused_before_allocating(forge) -> None:
    """A ~25 KB file that declares a huge model must cost no more memory than its size."""
    f = parse_dsq(real_files()["all"])
    meta = copy.deepcopy(f.meta)
    forge(meta)
    data = dsq_bytes(meta, f.sections)
    limit = 16 * len(data) + (8 << 20)  # the file, its inflated manifest, bookkeeping
    for reader in (dsq.load, dsq.inspect):
        kind, exc = _guarded(lambda r=reader: r(data), traced_limit=limit, rss_limit=32 << 20)
        assert kind == "error", f"{reader.__name__} accepted it"
        assert any(w in str(exc) for w in ("limit", "fit", "working", "built", "elements",
                                           "shape", "entr", "hold"))
    STATS[("gigantic declarations (peak memory checked)", "error")] += 1


def test_forged_spec_messages_name_the_problem() -> None:
    f = parse_dsq(real_files()["all"])

    def forged(change: Callable[[dict], None]) -> bytes:
        meta = copy.deepcopy(f.meta)
        change(meta)
        return dsq_bytes(meta, f.sections)

    cases = {
        "in_features": lambda m: m["model"]["kwargs"].update(in_features=10**12),
        "unknown model 'os.system'": lambda m: m["model"].update(name="os.system"),
        "no option 'zzz'": lambda m: m["model"]["kwargs"].update(zzz=1),
        "appears twice": lambda m: m["tensors"].append(copy.deepcopy(m["tensors"][0])),
        "missing ['fc1.bias']": lambda m: m["tensors"].pop(0),
        "'fc1.weight' has shape [300, 785]": lambda m: m["tensors"][1].update(shape=[300, 785]),
    }
    for needle, change in cases.items():
        with pytest.raises(DsqFormatError, match=needle.replace("[", r"\[").replace("(", r"\(")):
            dsq.load(forged(change))


def test_non_finite_weights_in_a_file_are_refused() -> None:
    f = parse_dsq(real_files()["all"])
    sections = dict(f.sections)
    sections["fc2.bias:data"] = np.full(100, np.nan, "<f4").tobytes()
    data = dsq_bytes(f.meta, sections)
    for reader in (dsq.load, dsq.inspect):
        with pytest.raises(DsqFormatError, match=r"fc2\.bias.*NaN or Inf"):
            reader(data)


# ============================================================================ damaged bytes


def _section_spans(data: bytes) -> list[tuple[int, int]]:
    f = parse_dsq(data)
    start, spans = f.manifest_size, []
    for size in f.section_sizes.values():
        spans.append((start, start + size))
        start += size
    return spans


@given(data=st.data())
@settings(max_examples=_EXAMPLES or 80, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
def test_damaged_files_through_the_public_loader(data: st.DataObject,
                                                 tmp_path_factory: pytest.TempPathFactory
                                                 ) -> None:
    """Truncated, flipped, section-duplicated and section-reordered files, loaded from a path."""
    original = real_files()[data.draw(st.sampled_from(["all", "ans", "mixed"]))]
    spans = _section_spans(original)
    buf = bytearray(original)
    how = data.draw(st.sampled_from(("truncate", "flip", "duplicate section", "reorder sections",
                                     "drop section")))
    if how == "truncate":
        del buf[data.draw(st.integers(0, len(buf) - 1)):]
    elif how == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            buf[data.draw(st.integers(0, len(buf) - 1))] ^= data.draw(st.integers(1, 255))
    else:
        i, j = sorted(data.draw(st.lists(st.integers(0, len(spans) - 1), min_size=2,
                                         max_size=2, unique=True)))
        (a0, a1), (b0, b1) = spans[i], spans[j]
        if how == "duplicate section":
            buf[a1:a1] = original[a0:a1]
        elif how == "reorder sections":
            buf[a0:b1] = original[b0:b1] + original[a1:b0] + original[a0:a1]
        else:
            del buf[a0:a1]
    path = tmp_path_factory.mktemp("damaged") / "model.dsq"
    path.write_bytes(bytes(buf))
    kind = _check_file(path, f"damaged bytes: {how}")
    if bytes(buf) != original:
        assert kind == "error", "a changed file was accepted"


# ============================================================================ pickle payloads


class _Payload:
    """Unpickling this would create ``marker`` (via ``open``): proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (builtins.open, (str(self.marker), "w"))


def _evil_files(folder: Path, fmt: str) -> dict[str, Path]:
    """The same payload as a raw pickle and inside a real torch.save archive."""
    marker = folder / "PWNED"
    raw, zipped = folder / "raw.pt", folder / "zipped.pt"
    raw.write_bytes(pickle.dumps({"format": fmt, "version": 1, "x": _Payload(marker)}))
    torch.save({"format": fmt, "version": 1, "x": _Payload(marker)}, zipped)
    return {"raw pickle": raw, "torch.save archive": zipped}


def test_pickle_payloads_are_refused_everywhere(tmp_path: Path, capsys) -> None:
    from deepsqueeze.cli import main

    marker = tmp_path / "PWNED"
    for kind, path in _evil_files(tmp_path, "deepsqueeze-model").items():
        with pytest.raises(CheckpointError, match="refused to load"):
            load_model(path)
        # compress of a model file: refused before anything else happens
        with pytest.raises(CheckpointError, match="refused to load"):
            compress(path, {"stages": [{"method": "prune", "params": {"sparsity": 0.5}}]},
                     dataset="mnist")
        # the evaluate command: one clear line, exit code 2, no traceback
        argv = sys.argv
        sys.argv = ["deepsqueeze", "evaluate", str(path), "--no-speed"]
        try:
            with pytest.raises(SystemExit) as stop:
                main()
        finally:
            sys.argv = argv
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert "refused to load" in err and "Traceback" not in err
        STATS[(f"pickle payload ({kind}): load_model, compress, evaluate CLI", "refused")] += 3
    assert not marker.exists()


def _tiny_dataset(n: int = 64) -> ImageDataset:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=gen)
    return ImageDataset("mnist", "train", images, torch.arange(n) % 10, DATASETS["mnist"])


def test_resume_from_a_malicious_checkpoint_is_refused(tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=2, batch_size=32, device="cpu")
    for kind, path in _evil_files(tmp_path, "deepsqueeze-checkpoint").items():
        run = tmp_path / kind.replace(" ", "-")
        run.mkdir()
        path.rename(run / "checkpoint.pt")
        with pytest.raises(CheckpointError, match="refused to load"):
            fit(models.create("lenet300"), _tiny_dataset(), cfg, out_dir=run, resume=True,
                progress=False)
        STATS[(f"pickle payload ({kind}): fit(resume=True)", "refused")] += 1
    assert not (tmp_path / "PWNED").exists()


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    run = tmp_path_factory.mktemp("ckpt")
    fit(models.create("lenet300"), _tiny_dataset(), TrainConfig(epochs=1, batch_size=32,
                                                                 device="cpu"),
        out_dir=run, progress=False)
    return safe_load(run / "checkpoint.pt")


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"epoch": None}, "'epoch'"),
        ({"epoch": "1"}, "'epoch'"),
        ({"epoch": -3}, "'epoch'"),
        ({"history": None}, "'history'"),
        ({"history": "{"}, "'history'"),
        ({"history": "[" * 100_000}, "'history'"),
        ({"history": "[1, 2]"}, "'history'"),
        ({"model": [1]}, "'model'"),
        ({"optimizer": None}, "'optimizer'"),
        ({"scheduler": 3}, "'scheduler'"),
        ({"scaler": "x"}, "'scaler'"),
        ({"model": {"fc1.weight": torch.zeros(2)}}, "does not fit"),
    ],
)
def test_resume_from_a_forged_checkpoint_names_the_field(
    tmp_path: Path, good_checkpoint: dict[str, Any], change: dict, needle: str
) -> None:
    atomic_save({**good_checkpoint, **change}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=needle):
        fit(models.create("lenet300"), _tiny_dataset(), TrainConfig(epochs=2, batch_size=32,
                                                                     device="cpu"),
            out_dir=tmp_path, resume=True, progress=False)
    STATS[("forged checkpoint fields: fit(resume=True)", "CheckpointError")] += 1


@functools.cache
def _small_model_file() -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.pt"
        save_model(models.create("lenet300", in_features=16), path)
        return path.read_bytes()


@given(edits=st.lists(st.tuples(st.integers(0, 2**40), st.integers(1, 255)), max_size=4),
       cut=st.none() | st.integers(0, 2**40))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_damaged_model_files_give_a_checkpoint_error(
    edits: list[tuple[int, int]], cut: int | None, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """torch.load(weights_only=True) of a damaged archive fails in many ways; all are wrapped."""
    data = bytearray(_small_model_file())
    for pos, bits in edits:
        data[pos % len(data)] ^= bits
    if cut is not None:
        del data[cut % len(data):]
    path = tmp_path_factory.mktemp("pt") / "m.pt"
    path.write_bytes(bytes(data))
    try:
        model = load_model(path)
    except CheckpointError as exc:
        assert str(exc)
        outcome = "CheckpointError"
    else:  # the damage hit bytes no checksum covers (zip padding): the weights must be intact
        original = load_model(_write(path, _small_model_file())).state_dict()
        assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
        outcome = "loaded, weights intact"
    STATS[("damaged model.pt bytes: load_model", outcome)] += 1


def test_a_forged_spec_in_a_model_file_is_refused_before_allocating(tmp_path: Path) -> None:
    obj = torch.load(_write(tmp_path / "m.pt", _small_model_file()), weights_only=True)
    obj["model_spec"]["kwargs"]["in_features"] = 10**11  # 120 GB if built for real
    atomic_save(obj, tmp_path / "forged.pt")
    rss0 = _hwm_reset()
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(tmp_path / "forged.pt")
    if rss0 is not None:
        assert _status("VmHWM") - rss0 < 32 << 20


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ============================================================================ atomic writes

_SLOW_WRITER = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {src!r})
    import torch
    from deepsqueeze import dsq, io, models

    real_fdopen = os.fdopen

    class Stalling:
        # a file whose writes stall (forever) once {stall} bytes are on disk
        def __init__(self, handle):
            self.handle, self.written = handle, 0
        def write(self, data):
            n = self.handle.write(data)
            self.written += n
            if self.written >= {stall}:
                self.handle.flush()
                print("STALLED", flush=True)
                time.sleep(600)
            return n
        def __getattr__(self, name):
            return getattr(self.handle, name)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

    os.fdopen = lambda *a, **k: Stalling(real_fdopen(*a, **k))
    torch.manual_seed(1)
    model = models.create("lenet300")
    if sys.argv[1] == "dsq":
        dsq.save(model, sys.argv[2])
    else:
        io.atomic_save({{"format": "deepsqueeze-checkpoint", "model": model.state_dict()}},
                       sys.argv[2])
    print("FINISHED", flush=True)
    """
)


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if DATA_DIR is not None:
        env["DEEPSQUEEZE_DATA"] = str(DATA_DIR)
    return env


@pytest.mark.parametrize("kind", ["dsq", "checkpoint"])
def test_sigkill_during_a_write_leaves_the_previous_file_intact(tmp_path: Path,
                                                                kind: str) -> None:
    target = tmp_path / ("model.dsq" if kind == "dsq" else "checkpoint.pt")
    if kind == "dsq":
        dsq.save(_compressed({"prune": None}), target)
    else:
        atomic_save({"format": "deepsqueeze-checkpoint", "epoch": 1}, target)
    before = target.read_bytes()
    script = _SLOW_WRITER.format(src=str(SRC), stall=4096)
    child = subprocess.Popen([sys.executable, "-c", script, kind, str(target)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=_env())
    try:
        line = child.stdout.readline()
        assert line.strip() == "STALLED", child.stderr.read()
        temps = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        assert len(temps) == 1 and temps[0].stat().st_size >= 4096  # half-written new file
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    assert target.read_bytes() == before  # the previous good file, byte for byte
    if kind == "dsq":
        dsq.load(target)
    else:
        assert torch.load(target, weights_only=True)["epoch"] == 1
    # documented limit: the killed process's temp file stays beside the target (a hidden
    # ".<name>.<random>.tmp"); it is never read, and the next save still works.
    assert [p.name.startswith(f".{target.name}.") for p in tmp_path.iterdir()
            if p.name.endswith(".tmp")] == [True]
    if kind == "dsq":
        dsq.save(_compressed({"share": None}), target)
        dsq.load(target)
    STATS[(f"SIGKILL mid-write ({kind})", "previous file intact")] += 1


# ============================================================================ killed training


def _train(out: Path, *extra: str) -> subprocess.Popen:
    args = ["--model", "lenet300", "--subset", "2000", "--epochs", "3", "--batch-size", "100",
            "--seed", "3"] if "--resume" not in extra else []
    return subprocess.Popen(
        [sys.executable, "-m", "deepsqueeze", "train", *args, "--out", str(out),
         "--no-progress", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
    )


def _finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out


@needs_mnist
def test_sigkill_mid_epoch_then_resume_gives_the_same_weights(tmp_path: Path) -> None:
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    reference = _train(ref)
    victim = _train(cut)
    try:
        deadline = time.monotonic() + 240
        while not (cut / "checkpoint.pt").exists():  # epoch 1 is done, epoch 2 has begun
            assert victim.poll() is None, victim.communicate()[0]
            assert time.monotonic() < deadline, "no checkpoint after 240 s"
            time.sleep(0.01)
        first = json.loads((cut / "metrics.jsonl").read_text().splitlines()[0])
        time.sleep(min(0.3 * first["epoch_time_s"], 2.0))  # well inside epoch 2
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (cut / "model.pt").exists(), "the run finished before it was killed"
    killed_after = safe_load(cut / "checkpoint.pt")["epoch"]
    assert killed_after in (1, 2)
    _finish(_train(cut, "--resume"))
    _finish(reference)
    a = load_model(ref / "model.pt").state_dict()
    b = load_model(cut / "model.pt").state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    STATS[(f"SIGKILL training mid-epoch {killed_after + 1}, resume", "same weights")] += 1


# ============================================================================ bad input


@needs_mnist
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_layer(bad: float, tmp_path: Path) -> None:
    model = models.create("lenet300")
    with torch.no_grad():
        model.fc2.weight[3, 7] = bad
    recipe = {"stages": [{"method": "prune", "params": {"sparsity": 0.5}}]}
    with pytest.raises(ModelError, match=r"refusing to compress.*fc2\.weight"):
        compress(model, recipe, dataset="mnist", subset=100, progress=False)
    with pytest.raises(ModelError, match=r"refusing to save.*fc2\.weight"):
        dsq.save(model, tmp_path / "x.dsq")
    assert not (tmp_path / "x.dsq").exists()
    STATS[("NaN/Inf weights: compress and save", "refused, layer named")] += 2


def test_unsupported_layers_are_named_with_what_is_supported() -> None:
    resnet = models.create("resnet20")
    with pytest.raises(ModelError, match=r"'bn1'.*BatchNorm2d.*supported: \['Conv2d', 'Linear'\]"):
        select_layers(resnet, ["bn1"])
    with pytest.raises(ModelError, match=r"Identity.*supported"):
        select_layers(resnet, ["layer1.0.shortcut"])
    with pytest.raises(ModelError, match=r"matches no layer"):
        select_layers(models.create("lenet300"), ["relu*"])
    only_bad = nn.Sequential(nn.ReLU(), nn.BatchNorm1d(4))
    for patterns in (None, ["*"]):
        with pytest.raises(ModelError, match=r"\['BatchNorm1d', 'ReLU'\]; supported: "
                                             r"\['Conv2d', 'Linear'\]"):
            select_layers(only_bad, patterns)
    STATS[("layer types a method cannot handle", "ModelError naming them")] += 5


@needs_mnist
def test_a_dataset_that_does_not_fit_the_model_is_refused(tmp_path: Path, capsys) -> None:
    from deepsqueeze.cli import main

    net = models.create("lenet5", in_channels=3, input_size=32)
    recipe = {"stages": [{"method": "prune", "params": {"sparsity": 0.5}}]}
    with pytest.raises(ModelError, match=r"expects inputs of shape \(3, 32, 32\).*\(1, 28, 28\)"):
        compress(net, recipe, dataset="mnist", subset=100, progress=False)
    save_model(net, tmp_path / "cifar-lenet5.pt")
    argv = sys.argv
    sys.argv = ["deepsqueeze", "evaluate", str(tmp_path / "cifar-lenet5.pt"), "--no-speed",
                "--subset", "100"]
    try:
        with pytest.raises(SystemExit) as stop:
            main()
    finally:
        sys.argv = argv
    assert stop.value.code == 2 and "expects inputs of shape" in capsys.readouterr().err
    STATS[("dataset shape does not fit the model: compress, evaluate CLI", "ModelError")] += 2


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "the recipe is empty"),
        ("# nothing\n", "the recipe is empty"),
        ("- prune\n- share\n", "must be a mapping.*got list"),
        ("prune\n", "must be a mapping.*got str"),
        ("stages: [\n", "not valid YAML"),
        ("stages: []\n", "stages: List should have at least 1 item"),
        ("stages: prune\n", "stages: Input should be a valid list"),
        ("stages: [prune]\n", "stages.0: Input should be a valid dictionary"),
        ("stages: [{method: prune, finetune: {epochs: ten}}]\n", "stages.0.finetune.epochs"),
        ("stages: [{method: prune, finetune: {lr: -1}}]\n", "stages.0.finetune.lr"),
        ("stages: [{method: squeeze}]\n", "stages.0.method: unknown method 'squeeze'"),
        ("stages: [{method: prune, params: {sparsity: 0.5, speed: 3}}]\n", "speed"),
        ("stages: [{method: prune, params: {sparsity: 1.5}}]\n", "sparsity"),
        ("stages: [{method: prune, params: {name: x}}]\n", "name"),
        ("stages: [{method: share, params: {bits: many}}]\n", "bits"),
        ("stages: [{method: prune}]\nencode: {index_bits: 40}\n", "encode.index_bits"),
        ("stages: [{method: prune}]\nencode: {huffman: maybe}\n", "encode.huffman"),
        ("stages: [{method: prune}]\nseed: [1]\n", "seed"),
        ("stages: [{method: prune}]\ncolour: red\n", "colour"),
    ],
)
def test_bad_recipes_raise_recipe_error_naming_the_field(tmp_path: Path, text: str,
                                                         needle: str) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=needle):
        load_recipe(path)
    STATS[("bad recipe files (empty, list, wrong types, unknown method/param)",
           "RecipeError naming the field")] += 1


_RECIPE_KEYS = st.sampled_from(["name", "model", "dataset", "seed", "stages", "encode", "method",
                                "params", "finetune", "sparsity", "bits", "layers", "epochs",
                                "lr", "huffman", "index_bits", "schedule", "scope", "ratio"])
_RECIPE_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats()
    | st.text(max_size=6) | st.sampled_from(["prune", "share", "channel-prune", "auto", "fc*",
                                             "type:Linear", "type:Nope", "["]),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(_RECIPE_KEYS | st.text(max_size=4), inner, max_size=4),
    max_leaves=20,
)
_STAGE = st.fixed_dictionaries(
    {"method": st.sampled_from(["prune", "share", "channel-prune"]) | _RECIPE_VALUE},
    optional={"params": st.dictionaries(_RECIPE_KEYS, _RECIPE_VALUE, max_size=4),
              "finetune": _RECIPE_VALUE, "name": _RECIPE_VALUE},
)
_RECIPE = st.fixed_dictionaries(
    {"stages": st.lists(_STAGE, max_size=3) | _RECIPE_VALUE},
    optional={"encode": _RECIPE_VALUE, "name": _RECIPE_VALUE, "seed": _RECIPE_VALUE},
)


@given(_RECIPE | _RECIPE_VALUE)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_recipes_are_valid_or_a_recipe_error(data: Any) -> None:
    try:
        parse_recipe(data)
        outcome = "valid recipe"
    except RecipeError as exc:
        assert str(exc)
        outcome = "RecipeError"
    STATS[("random recipe structures", outcome)] += 1


# ============================================================================ the atheris harness


def _harness() -> Any:
    spec = importlib.util.spec_from_file_location("fuzz_dsq", REPO / "benchmarks" / "fuzz_dsq.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fuzz_harness_explains_when_atheris_is_missing(monkeypatch, capsys) -> None:
    harness = _harness()
    monkeypatch.setattr(harness, "atheris", None)
    harness.main(["fuzz_dsq.py", "-atheris_runs=1"])
    assert "atheris is not installed" in capsys.readouterr().out


def test_fuzz_harness_meta_mutations_stay_writable() -> None:
    """The custom mutator's JSON edits keep the manifest writable (so the CRCs stay valid)."""
    import random

    harness = _harness()
    meta = parse_dsq(real_files()["mixed"]).meta
    frozen = json.dumps(meta)
    changed = 0
    for seed in range(200):
        new = harness._mutate_meta(meta, random.Random(seed))
        dsq_bytes(new, {})
        changed += new != meta
    assert json.dumps(meta) == frozen and changed > 150


def test_a_stored_tensor_that_does_not_fit_its_layer_is_refused_by_every_reader() -> None:
    """Regression (found by hypothesis): an empty fc1.bias beside a full fc1.weight was refused
    by load but reported by inspect."""
    f = parse_dsq(real_files()["all"])
    meta, sections = copy.deepcopy(f.meta), dict(f.sections)
    for entry in meta["tensors"]:
        if entry["name"] == "fc1.bias":
            entry["shape"] = [0]
    sections["fc1.bias:data"] = b""
    assert _check_file(dsq_bytes(meta, sections), "bias shape does not fit its layer") == "error"
