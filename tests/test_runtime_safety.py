"""Runtime safety (issue 18): every executor checks its input before any C call and the C entry
points check their arguments; the kernel cache is verified before anything is loaded from it;
codebooks wider than 16-bit symbols and all-zero layers decode as the dense loader does; a
corrupt autotune cache is dropped with a warning; the sanitizer build runs the formerly
overflowing calls cleanly and does catch a real overflow."""

from __future__ import annotations

import copy
import ctypes
import hashlib
import json
import math
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepsqueeze import models
from deepsqueeze.codec.bits import pack_bits
from deepsqueeze.codec.container import dsq_bytes, read_dsq
from deepsqueeze.dsq import load, save
from deepsqueeze.errors import DeepSqueezeError, DsqFormatError, RuntimeInputError
from deepsqueeze.methods.base import create_method, select_layers
from deepsqueeze.runtime import autotune as at
from deepsqueeze.runtime import from_dense, load_runtime, runtime_info
from deepsqueeze.runtime import kernel as K
from deepsqueeze.runtime.forms import _pack_symbols, from_coords
from deepsqueeze.runtime.fuse import FusedChain
from deepsqueeze.runtime.layers import IMPLS, ConvGeometry, KernelConv2d, KernelLinear

REPO = Path(__file__).resolve().parents[1]
needs_kernel = pytest.mark.skipif(K.get_kernel() is None, reason="no C compiler for the kernel")


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(at.ENV_CACHE, str(tmp_path / "autotune.json"))


def _apply(net: nn.Module, method: str, **params) -> nn.Module:
    m = create_method(method, **params)
    m.apply(net, select_layers(net, m.params.layers, m.supported))
    return net


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Small compressed files: a Deep-Compressed-like LeNet-300-100 and LeNet-5."""
    root = tmp_path_factory.mktemp("files")
    torch.manual_seed(0)
    l300 = _apply(_apply(models.create("lenet300"), "prune", sparsity=0.95), "share", bits=4)
    l5 = _apply(models.create("lenet5"), "prune",
                sparsity={"conv1": 0.4, "conv2": 0.9, "fc1": 0.97, "fc2": 0.8})
    l5 = _apply(l5, "share", bits={"conv*": 6, "fc*": 4})
    out = {"lenet300": root / "lenet300.dsq", "lenet5": root / "lenet5.dsq"}
    save(l300, out["lenet300"])
    save(l5, out["lenet5"])
    return out


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _outcome(fn, x) -> tuple[torch.Tensor | None, BaseException | None]:
    try:
        with torch.inference_mode():
            return fn(x), None
    except Exception as exc:  # every exception is judged by the caller
        return None, exc


def _agrees_with_dense(rt: nn.Module, dense: nn.Module, x: torch.Tensor, what: str) -> None:
    """The runtime gives the dense model's output (on the input as fp32), or an error exactly
    where the dense model has one: a RuntimeInputError, or the dense model's own error type
    (raised by the same torch op outside our executors). Integer inputs are refused."""
    ref = x.float() if x.is_floating_point() else x
    want, dense_err = _outcome(dense, ref)
    got, rt_err = _outcome(rt, x)
    if dense_err is None and x.is_floating_point():
        assert rt_err is None, f"{what}: runtime raised {rt_err!r} where dense gives an output"
        _close(got, want)
        return
    assert rt_err is not None, f"{what}: runtime gave an output where dense raises {dense_err!r}"
    allowed = (RuntimeInputError,) if dense_err is None else (RuntimeInputError, type(dense_err))
    assert isinstance(rt_err, allowed), f"{what}: {rt_err!r} (dense: {dense_err!r})"


def _inputs(model: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    good = torch.randn(3, 1, 28, 28, generator=g)
    cases = {
        "right": good,
        "batch 1": good[:1].clone(),
        "batch 0": torch.zeros(0, 1, 28, 28),
        "float64": good.double(),
        "float16": good.half(),
        "non-contiguous": torch.randn(28, 28, 1, 3, generator=g).permute(3, 2, 0, 1),
        "int64": torch.zeros(2, 1, 28, 28, dtype=torch.int64),
        "wrong last dim": torch.zeros(1, 1, 28, 27),
        "wrong channels": torch.zeros(1, 3, 28, 28),
        "3x32x32": torch.zeros(1, 3, 32, 32),
        "too small": torch.zeros(1, 1, 4, 4),
        "unbatched": torch.zeros(1, 28, 28),
        "ndim 1": torch.zeros(784),
        "ndim 2": torch.zeros(2, 784),
        "ndim 5": torch.zeros(1, 1, 1, 28, 28),
        "batch 0 wrong": torch.zeros(0, 5),
    }
    if model == "lenet5":
        cases["empty plane"] = torch.zeros(1, 1, 0, 28)
    return cases


def _executor_sets(path: Path) -> list[dict[str, str]]:
    """For each executor name, every layer that offers it forced to it."""
    layers = runtime_info(load_runtime(path, autotune=False, fuse=False)).layers
    names = sorted({n for c in layers for n in c.held_bytes})
    return [{c.layer: impl for c in layers if impl in c.held_bytes} for impl in names]


# ----------------------------------------------------------------------- finding 1: inputs


@pytest.mark.parametrize("model", ["lenet300", "lenet5"])
def test_every_executor_checks_inputs_like_dense(files, model):
    """Every executor, fused and unfused and under every memory budget, with right and wrong
    inputs: the dense output or a clean error (the old kernel wrote past its output buffer on
    [1, 3, 32, 32] and returned garbage on [1, 1, 28, 27])."""
    path = files[model]
    dense = load(path)
    forced_sets = _executor_sets(path)
    assert {"kernel", "dense", "densify", "torch-csr"} <= {
        next(iter(f.values())) for f in forced_sets}
    configs = [dict(impls=f, fuse=fuse) for f in forced_sets for fuse in (False, True)]
    configs += [dict(memory_budget=b, fuse=fuse) for b in (1.0, 1.5, 2.0, None)
                for fuse in (False, True)]
    for config in configs:
        rt = load_runtime(path, autotune=False, **config)
        for what, x in _inputs(model).items():
            _agrees_with_dense(rt, dense, x, f"{model} {config} {what}")


def _refuses(ex: nn.Module, x: object, name: str, what: str) -> None:
    """``ex(x)`` raises a RuntimeInputError naming the executor (any other error fails)."""
    try:
        with torch.inference_mode():
            ex(x)
    except RuntimeInputError as exc:
        assert f"({name})" in str(exc), (what, str(exc))
    else:
        raise AssertionError(f"{name} accepted the bad input {what}")


def _linear_executors(form, bias) -> dict[str, nn.Module]:
    module = nn.Linear(form.cols, form.rows)
    out = {i.name: i.build(form, bias, module) for i in IMPLS[nn.Linear]
           if i.accepts(form, module)}
    for name, ex in out.items():
        ex.impl = name  # as the loader names them
    return out


def _bad_tensors(shape_ok: tuple[int, ...]) -> dict[str, object]:
    return {
        "int": torch.zeros(shape_ok, dtype=torch.int64),
        "bool": torch.zeros(shape_ok, dtype=torch.bool),
        "complex": torch.zeros(shape_ok, dtype=torch.complex64),
        "meta": torch.zeros(shape_ok, device="meta"),
        "sparse": torch.zeros(shape_ok).to_sparse(),
        "list": torch.zeros(shape_ok).tolist(),
        "scalar": torch.tensor(1.0),
    }


def test_linear_executors_refuse_bad_inputs():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 20, generator=g)
    w[torch.rand(7, 20, generator=g) > 0.4] = 0
    w[w != 0] = torch.tensor([-0.5, 0.25, 1.0])[torch.arange(int((w != 0).sum())) % 3]
    bias = torch.randn(7, generator=g)
    executors = _linear_executors(from_dense(w), bias)
    if K.get_kernel() is not None:
        assert {"kernel", "kernel-f32"} <= set(executors)
    assert {"dense", "densify", "torch-csr", "scipy-csr"} <= set(executors)
    good = {
        "2-D": torch.randn(3, 20, generator=g),
        "1-D": torch.randn(20, generator=g),
        "3-D": torch.randn(2, 3, 20, generator=g),
        "non-contiguous": torch.randn(20, 3, generator=g).t(),
        "float64": torch.randn(3, 20, generator=g, dtype=torch.float64),
        "batch 0": torch.zeros(0, 20),
        "batch 0 3-D": torch.zeros(2, 0, 20),
    }
    bad = {
        "last dim 21": torch.zeros(3, 21),
        "numel divisible": torch.zeros(2, 10),  # old scipy/torch-csr: reshaped to [1, 20]
        "last dim 40": torch.zeros(1, 40),
        "batch 0 wrong": torch.zeros(0, 5),
        **_bad_tensors((3, 20)),
    }
    for name, ex in executors.items():
        for x in good.values():
            with torch.inference_mode():
                _close(ex(x), F.linear(x.float(), w, bias))
        for what, x in bad.items():
            _refuses(ex, x, name, what)


def _conv_executors(conv: nn.Conv2d) -> dict[str, nn.Module]:
    form = from_dense(conv.weight)
    out = {i.name: i.build(form, conv.bias.detach().clone(), conv)
           for i in IMPLS[nn.Conv2d] if i.accepts(form, conv)}
    for name, ex in out.items():
        ex.impl = name
    return out


@pytest.mark.parametrize(("kernel_size", "padding", "stride"), [(3, 1, 1), (5, 0, 2)])
def test_conv_executors_refuse_bad_inputs(kernel_size, padding, stride):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, kernel_size, padding=padding, stride=stride)
    with torch.no_grad():
        conv.weight[torch.rand_like(conv.weight) > 0.5] = 0
        conv.weight.copy_(torch.round(conv.weight * 8) / 8)  # a shared (codebook) layer
    executors = _conv_executors(conv)
    assert {"dense", "densify", "torch-csr"} <= set(executors)
    if K.get_kernel() is not None:
        assert {"kernel", "kernel-f32"} <= set(executors)
    good = {
        "4-D": torch.randn(2, 3, 9, 11),
        "unbatched": torch.randn(3, 9, 11),
        "non-contiguous": torch.randn(2, 9, 11, 3).permute(0, 3, 1, 2),
        "float64": torch.randn(2, 3, 9, 11, dtype=torch.float64),
        "batch 0": torch.zeros(0, 3, 9, 11),
        "smallest plane": torch.randn(1, 3, kernel_size - 2 * padding,
                                      kernel_size - 2 * padding),
    }
    bad = {
        "channels": torch.zeros(2, 4, 9, 11),
        "unbatched channels": torch.zeros(2, 9, 11),
        "2-D": torch.zeros(9, 11),
        "5-D": torch.zeros(1, 2, 3, 9, 11),
        "plane too small": torch.zeros(1, 3, kernel_size - 2 * padding - 1, 9),
        "empty plane": torch.zeros(1, 3, 0, 11),
        "batch 0 too small": torch.zeros(0, 3, kernel_size - 2 * padding - 1, 9),
        **_bad_tensors((2, 3, 9, 11)),
    }
    for name, ex in executors.items():
        for x in good.values():
            with torch.no_grad():
                _close(ex(x), conv(x.float()))
        for what, x in bad.items():
            _refuses(ex, x, name, what)


@needs_kernel
@pytest.mark.parametrize("flatten", [True, False])
def test_fused_chain_checks_inputs(flatten):
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(30, 48, generator=g), torch.randn(10, 30, generator=g)]
    for w in ws:
        w[torch.rand(w.shape, generator=g) > 0.3] = 0
    bs = [torch.randn(w.shape[0], generator=g) for w in ws]
    chain = FusedChain([KernelLinear(from_dense(w), b) for w, b in zip(ws, bs, strict=True)],
                       [True, False], flatten)

    def ref(x):
        x = x.float().flatten(1) if flatten else x.float()
        return F.linear(F.relu(F.linear(x, ws[0], bs[0])), ws[1], bs[1])

    good = [torch.randn(3, 48), torch.randn(1, 48), torch.zeros(0, 48), torch.randn(70, 48),
            torch.randn(48, 3).t(), torch.randn(3, 48, dtype=torch.float64)]
    good += [torch.randn(2, 3, 16), torch.zeros(0, 3, 16)] if flatten else [
        torch.randn(2, 3, 48), torch.randn(48)]
    bad = [torch.zeros(3, 47), torch.zeros(1, 96), torch.zeros(0, 5), torch.zeros(2, 24),
           *_bad_tensors((3, 48)).values()]
    bad += [torch.zeros(48), torch.zeros(2, 3, 48)] if flatten else [torch.zeros(2, 3, 16)]
    for x in good:
        with torch.inference_mode():
            _close(chain(x), ref(x))
    for x in bad:
        with pytest.raises(RuntimeInputError, match="fused"):
            chain(x)
    with pytest.raises(RuntimeInputError, match="follow"):
        FusedChain([KernelLinear(from_dense(ws[0]), None)] * 2, [False, False], flatten)


@needs_kernel
def test_runtime_layers_refuse_dtype_changes_and_stay_safe():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 40, generator=g)
    w[torch.rand(6, 40, generator=g) > 0.3] = 0
    layer = KernelLinear(from_dense(w), torch.randn(6, generator=g))
    chain = FusedChain([layer], [False], False)
    for target in (chain, layer):
        with pytest.raises(RuntimeInputError, match=r"dtype|float32"):
            target.half()
    with pytest.raises(RuntimeInputError, match="refused"):  # the struct was invalidated
        layer(torch.randn(2, 40))
    with pytest.raises(RuntimeInputError, match="refused"):
        chain(torch.randn(2, 40))


# ------------------------------------------------------------------- finding 1: the C side


def _sentinel(n: int) -> torch.Tensor:
    return torch.full((n,), 12345.0)


@needs_kernel
def test_c_entry_points_refuse_bad_arguments():
    kernel = K.get_kernel()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 12, generator=g)
    w[torch.rand(5, 12, generator=g) > 0.5] = 0
    a = KernelLinear(from_dense(w), None)
    b = KernelLinear(from_dense(torch.randn(3, 7, generator=g)), None)  # 7 != a.rows
    x, y = torch.randn(2 * 12), _sentinel(2 * 5)
    xp, yp = x.data_ptr(), y.data_ptr()
    assert kernel.chain(1, a._addr, xp, 24, yp, 10, 2) == K.DSQ_OK
    y.fill_(12345.0)
    for args, rc in [
        ((1, a._addr, xp, 24, yp, 10, -1), K.DSQ_EINVAL),
        ((0, a._addr, xp, 24, yp, 10, 2), K.DSQ_EINVAL),
        ((1, None, xp, 24, yp, 10, 2), K.DSQ_EINVAL),
        ((1, a._addr, xp, 23, yp, 10, 2), K.DSQ_ESIZE),
        ((1, a._addr, xp, 24, yp, 9, 2), K.DSQ_ESIZE),
        ((1, a._addr, None, 24, yp, 10, 2), K.DSQ_EINVAL),
        ((1, a._addr, xp, 1 << 62, yp, 10, 1 << 62), K.DSQ_ESIZE),  # n * cols overflows
    ]:
        assert kernel.chain(*args) == rc, args
    assert torch.equal(y, _sentinel(10))  # nothing written
    structs = (K.DsqLayer * 2)()
    for i, layer in enumerate((a, b)):
        ctypes.memmove(ctypes.byref(structs, i * ctypes.sizeof(K.DsqLayer)),
                       ctypes.byref(layer._struct), ctypes.sizeof(K.DsqLayer))
    assert kernel.chain(2, ctypes.addressof(structs), xp, 24, yp, 6, 2) == K.DSQ_ESIZE
    unchecked = K.DsqLayer.from_buffer_copy(a._struct)
    unchecked.checked = 0
    assert kernel.chain(1, ctypes.addressof(unchecked), xp, 24, yp, 10, 2) == K.DSQ_EUNCHECKED
    out = _sentinel(60)
    assert kernel.densify(a._addr, out.data_ptr(), 59) == K.DSQ_ESIZE
    assert kernel.densify(ctypes.addressof(unchecked), out.data_ptr(), 60) == K.DSQ_EUNCHECKED
    assert kernel.densify(a._addr, None, 60) == K.DSQ_EINVAL
    assert torch.equal(out, _sentinel(60))

    conv = nn.Conv2d(2, 3, 3, padding=1)
    c = KernelConv2d(from_dense(conv.weight), None, ConvGeometry.of(conv))
    geo = [2, 6, 5, 3, 3, 1, 1, 1, 1, 1, 1, 6, 5]
    xc, yc = torch.randn(1, 2, 6, 5), _sentinel(3 * 6 * 5)

    def call(vec, xlen=60, ylen=90, n=1, ng=13):
        v = torch.tensor(vec, dtype=torch.int64)
        return kernel.conv_direct(c._addr, v.data_ptr(), ng, xc.data_ptr(), xlen,
                                  yc.data_ptr(), ylen, n)

    bad_geometries = [
        [2, 6, 5, 3, 3, 1, 1, 1, 1, 1, 1, 7, 5],  # OH inconsistent
        [2, 6, 5, 3, 3, 1, 1, 1, 1, 1, 1, 6, 6],  # OW inconsistent
        [2, 6, 5, 3, 3, 0, 1, 1, 1, 1, 1, 6, 5],  # stride 0
        [2, 6, 5, 3, 3, 1, 1, -1, 1, 1, 1, 4, 5],  # negative padding
        [2, 6, 5, 3, 3, 1, 1, 1, 1, 0, 1, 6, 5],  # dilation 0
        [3, 6, 5, 3, 3, 1, 1, 1, 1, 1, 1, 6, 5],  # C * KH * KW != cols
        [2, 0, 5, 3, 3, 1, 1, 1, 1, 1, 1, 6, 5],  # H = 0
        [2, 6, 5, 3, 3, 1, 1, 1 << 62, 1, 1, 1, 6, 5],  # padding overflow
    ]
    for vec in bad_geometries:
        assert call(vec) == K.DSQ_EGEOMETRY, vec
    assert call(geo, xlen=59) == K.DSQ_ESIZE
    assert call(geo, ylen=91) == K.DSQ_ESIZE
    assert call(geo, ng=12) == K.DSQ_EINVAL
    assert call(geo, n=-1) == K.DSQ_EINVAL
    assert torch.equal(yc, _sentinel(90))
    assert call(geo) == K.DSQ_OK
    with torch.no_grad():
        _close(yc.view(1, 3, 6, 5), F.conv2d(xc, conv.weight, None, 1, 1))


@needs_kernel
def test_c_validate_refuses_malformed_forms():
    kernel = K.get_kernel()
    w = torch.zeros(3, 600)
    w[0, [0, 5, 300]] = torch.tensor([1.0, 2.0, 3.0])
    w[1, 10], w[2, 599] = 2.0, 1.0
    layer = KernelLinear(from_dense(w), None)  # codebook of 3 entries: 2-bit symbols
    assert layer.mode == K.MODE_BITS + 2
    base = layer._struct
    assert base.checked != 0

    def rc_of(**change) -> int:
        s = K.DsqLayer.from_buffer_copy(base)
        for key, value in change.items():
            setattr(s, key, value)
        return kernel.validate(ctypes.byref(s))

    assert rc_of() == K.DSQ_OK
    gaps = layer.gaps.clone()
    gaps[-1] = 254  # row 2 (two fillers, then 255): its entry lands on column 764
    assert rc_of(gaps=gaps.data_ptr()) == K.DSQ_EFORM
    assert rc_of(cols=599) == K.DSQ_EFORM  # column 599 outside
    assert rc_of(ncb=2) == K.DSQ_EFORM  # symbol 2 outside a 2-entry codebook
    assert rc_of(nvals=1) == K.DSQ_EFORM  # packed symbols longer than vals
    assert rc_of(ngaps=int(layer.gaps.numel()) - 1) == K.DSQ_EFORM
    assert rc_of(mode=8) == K.DSQ_EFORM and rc_of(mode=16) == K.DSQ_EFORM
    assert rc_of(rows=0) == K.DSQ_EFORM and rc_of(cols=-1) == K.DSQ_EFORM
    assert rc_of(cb=None) == K.DSQ_EFORM
    rowptr = layer.rowptr.clone()
    rowptr[1], rowptr[2] = rowptr[2], rowptr[1]  # decreasing
    assert rc_of(rowptr=rowptr.data_ptr(), symptr=rowptr.data_ptr()) == K.DSQ_EFORM
    rowptr = layer.rowptr.clone() + 1
    assert rc_of(rowptr=rowptr.data_ptr(), symptr=rowptr.data_ptr()) == K.DSQ_EFORM
    assert kernel.validate(None) == K.DSQ_EINVAL


def test_from_coords_refuses_entries_outside_the_matrix():
    with pytest.raises(DsqFormatError, match="outside"):
        from_coords(2, 3, np.array([0, 1]), np.array([0, 3]), values=np.ones(2))
    with pytest.raises(DsqFormatError, match="outside"):
        from_coords(2, 3, np.array([0, 2]), np.array([0, 0]), values=np.ones(2))
    with pytest.raises(DsqFormatError, match="order"):
        from_coords(2, 3, np.array([0, 0]), np.array([2, 1]), values=np.ones(2))
    with pytest.raises(DsqFormatError, match="values"):
        from_coords(2, 3, np.array([0]), np.array([1]), values=np.ones(2))
    with pytest.raises(DsqFormatError, match="no elements"):
        from_coords(0, 3, np.zeros(0), np.zeros(0), values=np.zeros(0))


# ------------------------------------------------------------- finding 4: wide codebooks


def test_wide_codebook_forms_decode_to_fp32_values():
    k = 70_000
    rng = np.random.default_rng(0)
    pos = np.sort(rng.choice(300 * 784, size=100_000, replace=False))
    codebook = np.linspace(-1, 1, k, dtype=np.float32)
    symbols = rng.integers(0, k, size=pos.size)
    form = from_coords(300, 784, pos // 784, pos % 784, symbols=symbols, codebook=codebook,
                       encoding="sparse-codebook")
    assert form.mode == K.MODE_F32 and form.codebook is None
    dense = np.zeros(300 * 784, np.float32)
    dense[pos] = codebook[symbols]
    assert torch.equal(form.to_dense(), torch.from_numpy(dense.reshape(300, 784)))
    for bad in (k, -1):
        wrong = symbols.copy()
        wrong[7] = bad
        with pytest.raises(DsqFormatError, match="symbol out of range"):
            from_coords(300, 784, pos // 784, pos % 784, symbols=wrong, codebook=codebook)
    with pytest.raises(ValueError, match="at most"):
        _pack_symbols(symbols, k)  # the old code truncated these to uint16 silently
    edge = from_coords(1, 3, np.zeros(3), np.arange(3), symbols=np.array([0, 65535, 7]),
                       codebook=np.arange(65536, dtype=np.float32))
    assert edge.mode == K.MODE_CB16 and edge.weights().tolist() == [0, 65535, 7]


def _wide_codebook_file(path: Path, k: int = 70_000) -> None:
    """A valid lenet300 file whose fc1.weight is sparse-codebook with ``k`` > 65,536 entries
    (17-bit symbols): our encoder never writes one, but the format and the dense reader allow
    it. Built from a saved file by re-encoding the layer's entries."""
    torch.manual_seed(0)
    net = models.create("lenet300")
    g = torch.Generator().manual_seed(0)
    w = torch.zeros(300 * 784)
    pos = torch.randperm(300 * 784, generator=g)[:100_000]
    w[pos] = torch.linspace(-1, 1, k)[torch.arange(pos.numel()) % k]
    with torch.no_grad():
        net.fc1.weight.copy_(w.view(300, 784))
    save(net, path)
    dsq = read_dsq(path)
    meta, sections = copy.deepcopy(dsq.meta), dict(dsq.sections)
    entry = next(e for e in meta["tensors"] if e["name"] == "fc1.weight")
    assert entry["encoding"] == "sparse" and entry["dtype"] == "float32"
    vals = np.frombuffer(sections["fc1.weight:values"], "<f4")
    codebook = np.unique(vals[vals != 0])
    assert codebook.size == k
    symbols = np.searchsorted(codebook, vals)
    symbols[vals == 0] = k  # fillers: the zero symbol after the codebook
    entry.update(encoding="sparse-codebook", codebook_size=k, value_bits=17,
                 value_coding="fixed")
    sections["fc1.weight:values"] = pack_bits(symbols, 17)
    sections["fc1.weight:codebook"] = codebook.astype("<f4").tobytes()
    path.write_bytes(dsq_bytes(meta, sections))


def test_wide_codebook_file_runs_the_dense_weights(tmp_path):
    """The old runtime held these symbols as uint16: max |dense - runtime| was 11.2."""
    path = tmp_path / "wide.dsq"
    _wide_codebook_file(path)
    try:
        dense = load(path)
    except DsqFormatError:  # a reader that bounds codebooks refuses it: so must the runtime
        with pytest.raises(DsqFormatError):
            load_runtime(path, autotune=False)
        return
    assert read_dsq(path).meta["tensors"][0]["encoding"] == "sparse-codebook"
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = dense(x)
    forced_sets = _executor_sets(path)
    assert len(forced_sets) >= 4
    for forced in forced_sets:
        for fuse in (False, True):
            rt = load_runtime(path, impls=forced, autotune=False, fuse=fuse)
            with torch.inference_mode():
                _close(rt(x), want)
                _close(rt(x[:1]), want[:1])


# ---------------------------------------------------------------- finding 6: zero layers


@pytest.mark.parametrize(("model", "layer", "encode"), [
    ("lenet300", "fc2", None),  # sparse-codebook with an empty codebook
    ("lenet300", "fc2", {"codebook_dtype": "float16"}),  # sparse (fp32 values), no entries
    ("lenet5", "conv2", None),
    ("lenet5", "fc1", None),
])
def test_all_zero_layer_runs_in_every_executor(tmp_path, model, layer, encode):
    """Our own save of a model with an all-zero layer: the old runtime loader raised
    IndexError in forms.py."""
    torch.manual_seed(0)
    net = models.create(model).eval()
    with torch.no_grad():
        net.get_submodule(layer).weight.zero_()
    path = tmp_path / "zero.dsq"
    save(net, path, encode=encode)
    entry = next(e for e in read_dsq(path).meta["tensors"] if e["name"] == f"{layer}.weight")
    assert entry["encoding"].startswith("sparse")
    dense = load(path)
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = net(x)
        _close(dense(x), want)
    forced_sets = _executor_sets(path)
    assert any(layer in f for f in forced_sets)
    for forced in forced_sets:
        for fuse in (False, True):
            rt = load_runtime(path, impls=forced, autotune=False, fuse=fuse)
            with torch.inference_mode():
                _close(rt(x), want)
                _close(rt(x[:1]), want[:1])
    form = from_dense(torch.zeros(4, 9))
    assert form.nnz == 0 and form.coords()[0].size == 0
    assert torch.equal(form.to_dense(), torch.zeros(4, 9))


# ------------------------------------------------------------- finding 9: autotune cache


def _choice(times: dict[str, float]) -> at.LayerChoice:
    return at.LayerChoice(layer="fc1", layer_type="Linear", weight_shape=[3, 4],
                          encoding="sparse", kept=3, density=0.25, input_shape=[1, 4],
                          file_bytes=10, held_bytes={"a": 10, "b": 20, "c": 40},
                          time_us=times)


def _in_thread(fn, timeout: float = 20.0):
    result: list = []
    t = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "did not terminate"
    return result[0]


def test_choose_terminates_on_non_finite_times():
    """NaN times made the old choose() loop forever."""
    nan, inf = math.nan, math.inf
    cases = [
        ({"a": nan, "b": nan, "c": nan}, None, "a"),
        ({"a": nan, "b": 1.0, "c": nan}, None, "b"),
        ({"a": 5.0, "b": nan, "c": 1.0}, None, "c"),
        ({"a": 5.0, "b": inf, "c": -inf}, None, "a"),
        ({"a": 5.0, "b": 1.0, "c": -3.0}, None, "b"),  # negative: unmeasured
        ({"a": nan, "b": 2.0, "c": 1.0}, 35, "b"),  # the budget has room for b, not c
        ({"a": 3.0, "c": 1.0}, None, "c"),  # b missing
    ]
    for times, budget, want in cases:
        choices = [_choice(dict(times)), _choice({"a": nan, "b": nan, "c": nan})]
        _in_thread(lambda c=choices, b=budget: at.choose(c, b, 0))
        assert choices[0].impl == want, (times, budget, choices[0].impl)
        assert choices[1].impl == "a"


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def test_corrupt_cache_entries_are_dropped_with_a_warning(tmp_path):
    good = {"layer": "m.fc1", "batch": 1, "time_us": {"kernel": 1.5, "dense": 3}}
    bad = {
        "nan": {"time_us": {"kernel": math.nan}},
        "inf": {"time_us": {"kernel": math.inf}},
        "negative": {"time_us": {"kernel": -1.0}},
        "string time": {"time_us": {"kernel": "fast"}},
        "bool time": {"time_us": {"kernel": True}},
        "huge int time": {"time_us": {"kernel": 10**400}},  # OverflowError in math.isfinite
        "int time past float precision": {"time_us": {"kernel": 2**60}},
        "nested": {"time_us": {"kernel": [[1.0]]}},
        "times list": {"time_us": [1.0]},
        "empty times": {"time_us": {}},
        "no times": {"layer": "x"},
        "string entry": "kernel",
        "list entry": [1, 2],
        "batch str": {"batch": "1", "time_us": {"kernel": 1.0}},
        "layers int": {"layers": 3, "time_us": {"kernel": 1.0}},
        "x" * 300: {"time_us": {"kernel": 1.0}},
    }
    text = json.dumps({"version": 1, "entries": {"ok": good, **bad}})  # NaN/Infinity literals
    path = _write(tmp_path / "c.json", text)
    with pytest.warns(RuntimeWarning, match=f"{len(bad)} malformed entries dropped"):
        assert at.load_cache(path) == {"ok": good}
    for text in ("[]", '{"version": 1, "entries": []}', '{"version": "1"}', "not json",
                 b"\xff\xfe", "{}"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert at.load_cache(_write(tmp_path / "c.json", text)) == {}
    at.save_cache({"new": good}, path)  # merged over the valid entries only
    assert set(at.load_cache(path)) == {"new"}


def test_cache_depth_bombs_and_huge_files_are_ignored(tmp_path):
    deep = '{"version": 1, "entries": {"k": {"time_us": {"a": ' + "[" * 100_000 + "]" * 100_000
    deep += "}}}}"
    with pytest.warns(RuntimeWarning, match="deeper"):
        assert at.load_cache(_write(tmp_path / "deep.json", deep)) == {}
    huge = json.dumps({"version": 1, "entries": {}}) + " " * (at.MAX_CACHE_BYTES + 1)
    with pytest.warns(RuntimeWarning, match="over"):
        assert at.load_cache(_write(tmp_path / "huge.json", huge)) == {}
    many = {f"k{i}": {"time_us": {"a": float(i)}} for i in range(at.MAX_CACHE_ENTRIES + 10)}
    at.save_cache(many, tmp_path / "many.json")
    kept = at.load_cache(tmp_path / "many.json")
    assert len(kept) == at.MAX_CACHE_ENTRIES and f"k{at.MAX_CACHE_ENTRIES + 9}" in kept


def test_loader_survives_a_poisoned_cache(files, tmp_path):
    """The real cache of a timed load, every time replaced by NaN / strings / nesting: the
    load warns, re-times and chooses as usual (the old loader hung or raised)."""
    path, cache = files["lenet300"], tmp_path / "autotune.json"
    first = runtime_info(load_runtime(path, rounds=1))
    data = json.loads(cache.read_text())
    assert data["entries"]
    for poison in (math.nan, "fast", [[1.0]]):
        for entry in data["entries"].values():
            entry["time_us"] = {k: poison for k in entry["time_us"]}
        cache.write_text(json.dumps(data))
        with pytest.warns(RuntimeWarning, match="malformed"):
            info = runtime_info(_in_thread(lambda: load_runtime(path, rounds=1), 120))
        assert all(c.source == "timed" for c in info.layers)
        assert {c.layer for c in info.layers} == {c.layer for c in first.layers}
        assert all(math.isfinite(t) for c in info.layers for t in c.time_us.values())


# -------------------------------------------------------------- finding 3: kernel cache


def _cc() -> str | None:
    return K._compiler()


needs_cc = pytest.mark.skipif(_cc() is None or K.get_kernel() is None,
                              reason="no C compiler for the kernel")


def _compile_so(tmp_path: Path, name: str, body: str) -> bytes:
    src = tmp_path / f"{name}.c"
    src.write_text(body)
    out = tmp_path / f"{name}.so"
    subprocess.run([_cc(), "-shared", "-fPIC", "-o", str(out), str(src)], check=True,
                   capture_output=True)
    return out.read_bytes()


def _planted(tmp_path: Path, marker: Path) -> bytes:
    """A library whose constructor writes ``marker``: proof that it was loaded."""
    return _compile_so(tmp_path, "planted", textwrap.dedent(f"""
        #include <stdio.h>
        __attribute__((constructor)) static void planted(void) {{
            FILE *f = fopen("{marker}", "w");
            if (f) {{ fputs("ran", f); fclose(f); }}
        }}
        int dsq_chain(void) {{ return 0; }}
    """))


@pytest.fixture
def kernel_cache(tmp_path, monkeypatch):
    """An empty cache folder; compiles are counted and served from the real built library."""
    real = K.get_kernel()
    if real is None:
        pytest.skip("no C kernel")
    good = real.path.read_bytes()
    assert hashlib.sha256(good).hexdigest() == real.sha256
    compiles: list[int] = []

    def fake_compile(source, flag_sets):
        assert source == K.kernel_sources()  # every csrc/*.c, the core first
        compiles.append(1)
        return good

    monkeypatch.setattr(K, "_compile", fake_compile)
    monkeypatch.setattr(K, "_warned", set())
    cache = tmp_path / "cache" / "kernels"
    return cache, K.library_name(), compiles, good


def _plant(cache: Path, name: str, data: bytes, digest: str | None) -> None:
    cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    (cache / name).write_bytes(data)
    os.chmod(cache / name, 0o600)
    if digest is not None:
        (cache / (name + ".sha256")).write_text(f"sha256 {digest}\n")
        os.chmod(cache / (name + ".sha256"), 0o600)


def _works(kernel: K.Kernel) -> None:
    layer = torch.zeros(2, 3)
    layer[0, 1], layer[1, 2] = 2.0, -1.0
    form = from_dense(layer)
    x = torch.tensor([1.0, 2.0, 3.0])
    struct = K.DsqLayer(2, 3, form.mode, 0, form.rowptr.data_ptr(), form.symptr.data_ptr(),
                        form.gaps.data_ptr(), form.vals.data_ptr(), None, None,
                        form.gaps.numel(), form.vals.numel() * 4, 0, 0)
    y = torch.zeros(2)
    assert kernel.validate(ctypes.byref(struct)) == K.DSQ_OK
    assert kernel.chain(1, ctypes.byref(struct), x.data_ptr(), 3, y.data_ptr(), 2, 1) == 0
    assert y.tolist() == [4.0, -3.0]


@needs_cc
def test_fresh_cache_is_private_and_reused(kernel_cache):
    cache, name, compiles, good = kernel_cache
    kernel = K.load_kernel(cache)
    _works(kernel)
    assert compiles == [1] and kernel.path == cache / name
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    for f in (cache / name, cache / (name + ".sha256")):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert (cache / (name + ".sha256")).read_text().split() == [
        "sha256", hashlib.sha256(good).hexdigest()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _works(K.load_kernel(cache))  # verified and loaded, no rebuild, no warning
    assert compiles == [1]


@needs_cc
@pytest.mark.parametrize("digest", [None, "0" * 64, "garbage"])
def test_planted_library_never_runs(kernel_cache, tmp_path, digest):
    """A library at the predictable path without a digest, or with a wrong one, is never
    loaded (the old code loaded it: its constructor ran); the kernel is rebuilt over it."""
    cache, name, compiles, good = kernel_cache
    marker = tmp_path / "constructor-ran"
    _plant(cache, name, _planted(tmp_path, marker), digest)
    with pytest.warns(RuntimeWarning, match="digest"):
        kernel = K.load_kernel(cache)
    assert not marker.exists()
    assert compiles == [1]
    _works(kernel)
    assert (cache / name).read_bytes() == good
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        K.load_kernel(cache)  # the rebuilt entry verifies
    assert compiles == [1] and not marker.exists()


@needs_cc
def test_tampered_library_is_rebuilt(kernel_cache):
    cache, name, compiles, good = kernel_cache
    K.load_kernel(cache)
    tampered = bytearray(good)
    tampered[len(tampered) // 2] ^= 0xFF
    (cache / name).write_bytes(bytes(tampered))
    with pytest.warns(RuntimeWarning, match="does not match"):
        _works(K.load_kernel(cache))
    assert compiles == [1, 1] and (cache / name).read_bytes() == good


@needs_cc
@pytest.mark.parametrize("weak", ["dir world-writable", "dir group-writable",
                                  "file group-writable", "file symlink", "dir not ours",
                                  "file not ours"])
def test_insecure_cache_is_refused(kernel_cache, tmp_path, weak):
    """Even a library with a matching digest is not loaded from a folder others can write,
    nor from a file that is not a private regular file of ours."""
    cache, name, compiles, good = kernel_cache
    if "not ours" in weak and os.getuid() != 0:
        pytest.skip("changing a file's owner needs root")
    marker = tmp_path / "constructor-ran"
    planted = _planted(tmp_path, marker)
    _plant(cache, name, planted, hashlib.sha256(planted).hexdigest())
    target = cache if weak.startswith("dir") else cache / name
    if "world" in weak:
        os.chmod(target, 0o777)
    elif "group" in weak:
        os.chmod(target, 0o770 if target == cache else 0o660)
    elif "symlink" in weak:
        (cache / "elsewhere.so").write_bytes(planted)
        (cache / name).unlink()
        (cache / name).symlink_to(cache / "elsewhere.so")
    else:
        os.chown(target, 65534, 65534)
    before = sorted(p.name for p in cache.iterdir())
    with pytest.warns(RuntimeWarning, match="not used"):
        kernel = K.load_kernel(cache)
    assert not marker.exists()
    _works(kernel)
    assert compiles == [1]
    if weak.startswith("dir"):
        assert cache not in kernel.path.parents  # built privately, nothing cached
        assert kernel.path.read_bytes() == good
        assert sorted(p.name for p in cache.iterdir()) == before
    else:
        assert (cache / name).read_bytes() == good and not (cache / name).is_symlink()


@needs_cc
def test_library_without_the_entry_points_is_refused(kernel_cache, tmp_path):
    cache, name, compiles, good = kernel_cache
    other = _compile_so(tmp_path, "other", "int dsq_chain(void) { return 0; }\n")
    _plant(cache, name, other, hashlib.sha256(other).hexdigest())
    with pytest.warns(RuntimeWarning, match="lacks the entry points"):
        _works(K.load_kernel(cache))
    assert compiles == [1] and (cache / name).read_bytes() == good
    K._warned.clear()
    wrong_abi = _compile_so(tmp_path, "abi", K.kernel_source().decode().replace(
        "#define DSQ_ABI 2", "#define DSQ_ABI 1"))
    _plant(cache, name, wrong_abi, hashlib.sha256(wrong_abi).hexdigest())
    with pytest.warns(RuntimeWarning, match="ABI 1"):
        _works(K.load_kernel(cache))
    assert compiles == [1, 1]


def test_kernel_source_is_package_data():
    source = K.kernel_source()
    assert b"int dsq_chain(" in source and b"#define DSQ_ABI 2" in source
    sources = K.kernel_sources()  # the families' C files, compiled into the same library
    assert next(iter(sources)) == "dsqkernel.c" and sources["dsqkernel.c"] == source
    assert {n for n in sources} >= {"binary.c", "conv.c", "hashed.c"}
    assert "csrc/*.c" in (REPO / "pyproject.toml").read_text()
    assert K.library_name() != K.library_name(sanitize=True)
    assert K.library_name(sanitize=True).startswith("dsqkernel-asan-")


# --------------------------------------------------------------------- sanitizer build


def _asan_usable() -> bool:
    if K.sanitizer_runtime() is None or _cc() is None:
        return False
    probe = subprocess.run([_cc(), "-fsanitize=address,undefined", "-x", "c", "-shared",
                            "-fPIC", "-o", os.devnull, "-"], input=b"int f(void){return 0;}",
                           capture_output=True)
    return probe.returncode == 0


needs_asan = pytest.mark.skipif(not _asan_usable(), reason="the C compiler has no libasan")

_ASAN_SCRIPT = r'''
import sys, torch
from deepsqueeze.errors import RuntimeInputError
from deepsqueeze.runtime import load_runtime, runtime_info
from deepsqueeze.runtime.kernel import get_kernel
from deepsqueeze.dsq import load
kernel = get_kernel()
assert kernel is not None and kernel.sanitized, "no sanitizer build"
mode = sys.argv[1]
if mode == "lie":  # a call whose lengths agree but exceed the real buffers
    rt = load_runtime(sys.argv[2], fuse=False, autotune=False, impls={"fc1": "kernel"})
    x, y = torch.zeros(1, 784), torch.zeros(1, 300)
    print("calling", flush=True)
    kernel.chain(1, rt.fc1._addr, x.data_ptr(), 3 * 784, y.data_ptr(), 3 * 300, 3)
    print("NOT DETECTED", flush=True)
    sys.exit(0)
bad = {"lenet300": [torch.zeros(1, 3, 32, 32), torch.zeros(1, 1, 28, 27), torch.zeros(2, 392)],
       "lenet5": [torch.zeros(1, 3, 28, 28), torch.zeros(1, 1, 28, 27), torch.zeros(1, 1, 4, 4)]}
x = torch.randn(3, 1, 28, 28)
for model, path in zip(("lenet300", "lenet5"), sys.argv[2:]):
    dense = load(path)
    layers = runtime_info(load_runtime(path, autotune=False, fuse=False)).layers
    names = sorted({n for c in layers for n in c.held_bytes})
    for impl in names:
        forced = {c.layer: impl for c in layers if impl in c.held_bytes}
        for fuse in (False, True):
            rt = load_runtime(path, impls=forced, autotune=False, fuse=fuse)
            with torch.inference_mode():
                assert (rt(x) - dense(x)).abs().max() < 1e-4
                assert rt(x[:0]).shape == (0, 10)
                for b in bad[model]:
                    try:
                        rt(b)
                    except (RuntimeInputError, RuntimeError):
                        pass
                    else:
                        raise AssertionError(f"{model} {impl} accepted {tuple(b.shape)}")
print("SANITIZED-OK", flush=True)
'''


@pytest.fixture(scope="module")
def asan_env(tmp_path_factory) -> dict[str, str]:
    env = K.sanitizer_env()
    env["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("asan-cache"))
    env["OMP_NUM_THREADS"] = "1"
    env["TMPDIR"] = str(tmp_path_factory.mktemp("asan-tmp"))  # what an abort leaves behind
    env["DEEPSQUEEZE_AUTOTUNE_CACHE"] = str(tmp_path_factory.mktemp("asan-tune") / "a.json")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    return env


def _run_asan(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _ASAN_SCRIPT, *args], env=env,
                          capture_output=True, text=True, timeout=900)


@needs_asan
@pytest.mark.slow
def test_formerly_overflowing_calls_are_clean_under_asan(files, asan_env):
    proc = _run_asan(asan_env, "run", str(files["lenet300"]), str(files["lenet5"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SANITIZED-OK" in proc.stdout
    assert "AddressSanitizer" not in proc.stderr and "runtime error" not in proc.stderr


@needs_asan
@pytest.mark.slow
def test_asan_build_reports_a_real_overflow(files, asan_env):
    """The test mode is live: a call that lies about its buffers is caught by ASan."""
    proc = _run_asan(asan_env, "lie", str(files["lenet300"]))
    assert "calling" in proc.stdout and "NOT DETECTED" not in proc.stdout
    assert proc.returncode != 0
    assert "AddressSanitizer: heap-buffer-overflow" in proc.stderr


def test_sanitize_mode_needs_the_runtime_preloaded(monkeypatch):
    monkeypatch.setattr(K, "_sanitizer_loaded", lambda: False)
    with pytest.raises(K.KernelUnavailable, match="LD_PRELOAD"):
        K.load_kernel(None, sanitize=True)
    assert issubclass(K.KernelUnavailable, DeepSqueezeError)
    if K.sanitizer_runtime() is not None:
        env = K.sanitizer_env({"LD_PRELOAD": "/x/other.so", "ASAN_OPTIONS": "verbosity=1"})
        assert env["LD_PRELOAD"].split(":")[-1] == "/x/other.so"
        assert "libasan" in env["LD_PRELOAD"].split(":")[0]
        assert env["ASAN_OPTIONS"].startswith("detect_leaks=0")
        assert env["ASAN_OPTIONS"].endswith("verbosity=1")
        assert env[K.ENV_SANITIZE] == "1"


def test_cache_scan_is_linear_and_never_blocks(tmp_path):
    """A cache of escaped quotes took the old regex depth check quadratic time (hours at
    16 MiB); a FIFO at the cache path blocked the read forever."""
    quotes = '{"version": 1, "entries": {"k": "' + '\\"' * 2_000_000  # never closed
    t0 = time.perf_counter()
    with pytest.warns(RuntimeWarning):
        assert _in_thread(lambda: at.load_cache(_write(tmp_path / "q.json", quotes)), 30) == {}
    assert time.perf_counter() - t0 < 10
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.warns(RuntimeWarning, match="FIFO"):
        assert _in_thread(lambda: at.load_cache(fifo), 10) == {}


def test_fused_model_raises_without_printing(tmp_path, capfd):
    """A fused runtime model is a torch.fx GraphModule, whose call wrapper printed the generated
    code's traceback to stderr when a graph op (the flatten before a dense fc1) refused the
    input (found by benchmarks/fuzz_runtime.py); now it only raises, as the dense model does."""
    torch.manual_seed(0)
    model = _apply(models.create("lenet300"), "prune", layers=["fc2", "fc3"], sparsity=0.9)
    path = tmp_path / "dense-fc1.dsq"
    save(model, path)
    dense = load(path)
    fused = load(path, mode="runtime", autotune=False, fuse=True)
    assert isinstance(fused, torch.fx.GraphModule)
    for bad in (torch.zeros(12), torch.zeros(())):
        with pytest.raises(Exception) as dense_exc:
            dense(bad)
        with pytest.raises(Exception) as fused_exc:
            fused(bad)
        assert isinstance(fused_exc.value, (type(dense_exc.value), DeepSqueezeError))
    err = capfd.readouterr().err
    assert "Traceback" not in err and "FX-traced" not in err, err
    x = torch.randn(3, 1, 28, 28)
    assert torch.allclose(fused(x), dense(x), atol=1e-5)


def test_floating_inputs_run_in_fp32_from_the_first_layer(tmp_path):
    """A bfloat16 input ran a BatchNorm1d before the first compressed Linear in bfloat16, then
    was cast to fp32 there: an answer neither dense nor dense-on-x.float() gives (found by
    benchmarks/fuzz_runtime.py on a user tabular model). The runtime converts on entry now."""

    class Tabular(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.BatchNorm1d(20)
            self.fc1 = nn.Linear(20, 64)
            self.fc2 = nn.Linear(64, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(F.relu(self.fc1(self.norm(x))))

    torch.manual_seed(0)
    net = Tabular().eval()
    net.norm.running_mean.uniform_(-2, 2)
    net.norm.running_var.uniform_(0.1, 3)
    net = _apply(net, "prune", layers=["fc1", "fc2"], sparsity=0.8)
    x = torch.randn(5, 20) * 3
    path = tmp_path / "tab.dsq"
    save(net, path, example_inputs=x)
    want = load(path)(x)
    for fuse in (False, True):
        rt = load(path, mode="runtime", autotune=False, fuse=fuse)
        for dtype in (torch.bfloat16, torch.float16, torch.float64):
            got = rt(x.to(dtype))
            ref = load(path)(x.to(dtype).float())
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(rt(x), want, rtol=1e-4, atol=1e-5)
