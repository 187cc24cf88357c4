"""The runtime: executors equal the training-form model, autotuner and its cache, memory, ONNX,
the bench and export commands. Tiny synthetic models, no training."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from deepsqueeze import models
from deepsqueeze.cli import app
from deepsqueeze.codec.container import read_dsq
from deepsqueeze.codec.options import EncodeOptions
from deepsqueeze.dsq import inspect, load, save
from deepsqueeze.errors import DeepSqueezeError
from deepsqueeze.methods.base import create_method, select_layers
from deepsqueeze.runtime import from_dense, held_bytes, load_runtime, runtime_info
from deepsqueeze.runtime.autotune import ENV_AUTOTUNE, ENV_CACHE, load_cache
from deepsqueeze.runtime.forms import FILL
from deepsqueeze.runtime.fuse import FusedChain
from deepsqueeze.runtime.kernel import (
    ENV_KERNEL,
    MODE_BITS,
    MODE_CB4,
    MODE_CB8,
    MODE_CB16,
    MODE_F32,
    get_kernel,
)
from deepsqueeze.runtime.layers import ConvGeometry, KernelConv2d, KernelLinear

needs_kernel = pytest.mark.skipif(get_kernel() is None, reason="no C compiler for the kernel")


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_CACHE, str(tmp_path / "autotune.json"))


def _apply(net: nn.Module, method: str, **params) -> nn.Module:
    m = create_method(method, **params)
    m.apply(net, select_layers(net, m.params.layers, m.supported))
    return net


def _case(name: str) -> tuple[nn.Module, dict[str, str]]:
    """A model in training form, and the file encoding expected for some of its weights."""
    torch.manual_seed(0)
    if name == "pruned":
        net = _apply(models.create("lenet300"), "prune", sparsity=0.95)
        return net, {"fc1.weight": "sparse"}
    if name == "shared":
        net = _apply(models.create("lenet300"), "share", bits=4)
        return net, {"fc1.weight": "codebook"}
    if name == "pruned-shared":
        net = _apply(models.create("lenet300"), "prune", sparsity=0.95)
        return _apply(net, "share", bits=4), {"fc1.weight": "sparse-codebook"}
    if name == "pruned-shared-conv":
        net = _apply(models.create("lenet5"), "prune",
                     sparsity={"conv1": 0.4, "conv2": 0.9, "fc1": 0.97, "fc2": 0.8})
        net = _apply(net, "share", bits={"conv*": 6, "fc*": 4})
        return net, {"conv2.weight": "sparse-codebook", "fc1.weight": "sparse-codebook"}
    if name == "channel-pruned":
        net = _apply(models.create("lenet5"), "channel-prune", ratio=0.5)
        return net, {"conv1.weight": "dense"}
    if name == "dense":
        return models.create("lenet300"), {"fc1.weight": "dense"}
    raise KeyError(name)


CASES = ["pruned", "shared", "pruned-shared", "pruned-shared-conv", "channel-pruned", "dense"]


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_runtime_equals_training_form(case, tmp_path):
    net, encodings = _case(case)
    net.eval()
    path, huffman_only = tmp_path / "m.dsq", tmp_path / "h.dsq"
    save(net, path)  # rANS may store a random pruned layer's zeros as a codebook symbol
    save(net, huffman_only, encode=EncodeOptions(ans=False))
    stored = {e["name"]: e["encoding"] for e in read_dsq(huffman_only).meta["tensors"]}
    for key, enc in encodings.items():
        assert stored[key] == enc
    x = torch.randn(5, 1, 28, 28)
    for file in (path, huffman_only):
        for batch in (1, 5):
            rt = load(file, mode="runtime", batch_size=batch, rounds=3)
            with torch.inference_mode():
                _close(rt(x[:batch]), net(x[:batch]))
                _close(rt(x), net(x))  # tuned for one batch size, runs any
            assert models.spec_of(rt).name == models.spec_of(net).name
        # a pruned layer runs only its kept weights, whichever encoding stored it
        for layer in runtime_info(load_runtime(file, autotune=False)).layers:
            expected = encodings.get(f"{layer.layer}.weight", "")
            if expected.startswith("sparse"):
                assert layer.density < 0.5, (file.name, layer)


@pytest.mark.parametrize("case", ["pruned", "pruned-shared-conv", "shared"])
def test_every_executor_equals_dense(case, tmp_path):
    net, _ = _case(case)
    path = tmp_path / "m.dsq"
    save(net, path)
    dense = load(path)
    x = torch.randn(3, 1, 28, 28)
    layers = runtime_info(load_runtime(path, autotune=False, fuse=False)).layers
    names = {n for c in layers for n in c.held_bytes}
    assert {"dense", "densify", "torch-csr"} <= names
    for impl in sorted(names):
        forced = {c.layer: impl for c in layers if impl in c.held_bytes}
        for fuse in (False, True):
            rt = load_runtime(path, impls=forced, autotune=False, fuse=fuse)
            with torch.inference_mode():
                _close(rt(x), dense(x))
                _close(rt(x[:1]), dense(x[:1]))


@needs_kernel
def test_fused_chain_and_relu(tmp_path):
    net, _ = _case("pruned-shared")
    save(net, tmp_path / "m.dsq")
    rt = load_runtime(tmp_path / "m.dsq", autotune=False)
    chains = [m for m in rt.modules() if isinstance(m, FusedChain)]
    assert len(chains) == 1 and chains[0].relus == [True, True, False] and chains[0].flatten
    info = runtime_info(rt)
    assert info.fused[0]["layers"] == ["fc1", "fc2", "fc3"] and info.fused[0]["kept"]
    x = torch.randn(70, 1, 28, 28)  # more than one 64-column tile
    with torch.inference_mode():
        _close(rt(x), net.eval()(x))
    rt.float()  # _apply rebuilds the kernel's pointers
    with torch.inference_mode():
        _close(rt(x[:2]), net(x[:2]))


def test_autotuner_chooses_and_caches(tmp_path):
    net, _ = _case("pruned-shared-conv")
    path = tmp_path / "m.dsq"
    save(net, path)
    first = runtime_info(load_runtime(path, batch_size=2, rounds=3))
    assert all(c.source == "timed" and c.impl in c.time_us for c in first.layers)
    assert first.budget_bytes is not None and first.held_bytes <= first.budget_bytes
    entries = load_cache(tmp_path / "autotune.json")
    assert len(entries) >= len(first.layers)
    second = runtime_info(load_runtime(path, batch_size=2, rounds=3))
    assert all(c.source == "cache" for c in second.layers)
    assert second.choices() == first.choices()
    other = runtime_info(load_runtime(path, batch_size=3, rounds=3))
    assert all(c.source == "timed" for c in other.layers)  # batch size is part of the key


def test_autotune_off(tmp_path, monkeypatch):
    net, _ = _case("pruned-shared")
    save(net, tmp_path / "m.dsq")
    monkeypatch.setenv(ENV_AUTOTUNE, "0")
    info = runtime_info(load_runtime(tmp_path / "m.dsq"))
    assert not info.autotuned and all(c.source == "heuristic" for c in info.layers)
    assert not (tmp_path / "autotune.json").exists()


def test_memory_within_twice_the_file(tmp_path):
    net, _ = _case("pruned-shared")
    path = tmp_path / "m.dsq"
    report = save(net, path)
    dense = load(path)
    assert held_bytes(dense) == report.dense_bytes
    for batch in (1, 16):
        info = runtime_info(load_runtime(path, batch_size=batch, rounds=3))
        assert info.held_bytes <= 2 * report.file_bytes, info.to_dict()
        assert info.held_bytes == held_bytes(load_runtime(path, impls=info.choices(),
                                                          autotune=False,
                                                          fuse=any(f["kept"] for f in info.fused)))
    free = runtime_info(load_runtime(path, memory_budget=None, autotune=False))
    assert free.budget_bytes is None


def test_without_kernel(tmp_path, monkeypatch):
    net, _ = _case("pruned-shared-conv")
    save(net, tmp_path / "m.dsq")
    monkeypatch.setenv(ENV_KERNEL, "0")
    rt = load_runtime(tmp_path / "m.dsq", rounds=3)
    info = runtime_info(rt)
    assert info.kernel is None and all("kernel" not in c.held_bytes for c in info.layers)
    x = torch.randn(2, 1, 28, 28)
    with torch.inference_mode():
        _close(rt(x), net.eval()(x))


@needs_kernel
@pytest.mark.parametrize(("k", "mode"), [(2, MODE_BITS + 1), (5, MODE_BITS + 3), (16, MODE_CB4),
                                         (32, MODE_BITS + 5), (200, MODE_CB8),
                                         (300, MODE_CB16), (None, MODE_F32)])
def test_compact_form_and_kernel_edge_cases(k, mode):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 1000, generator=g)
    w[torch.rand(7, 1000, generator=g) > 0.1] = 0
    w[2] = 0  # an empty row
    w[3, :] = 0
    w[3, 0], w[3, 999] = 1.0, 2.0  # a gap of 999 columns: fillers
    if k is not None:
        cb = torch.linspace(0.1, 1, k)
        nz = w != 0
        w[nz] = cb[torch.arange(int(nz.sum())) % k]
    form = from_dense(w)
    assert form.mode == mode
    assert torch.equal(form.to_dense(), w)
    assert form.gaps is not None and int((form.gaps == FILL).sum()) >= 3
    bias = torch.randn(7, generator=g)
    layer = KernelLinear(form, bias)
    for n in (1, 3, 64, 70):
        x = torch.randn(n, 1000, generator=g)
        _close(layer(x), F.linear(x, w, bias))
    assert layer(torch.randn(2, 3, 1000, generator=g)).shape == (2, 3, 7)
    assert torch.equal(layer.dense_weight(), w)


@needs_kernel
@pytest.mark.parametrize(("stride", "padding", "dilation"), [(1, 0, 1), (2, 1, 1), (1, 2, 2),
                                                             ((2, 1), (0, 3), (1, 2))])
def test_kernel_conv_geometries(stride, padding, dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, (3, 5), stride=stride, padding=padding, dilation=dilation)
    with torch.no_grad():
        conv.weight[torch.rand_like(conv.weight) > 0.3] = 0
    layer = KernelConv2d(from_dense(conv.weight), conv.bias.detach().clone(),
                         ConvGeometry.of(conv))
    x = torch.randn(2, 3, 11, 13)
    with torch.no_grad():
        _close(layer(x), conv(x))
        layer.set_relu(True)
        _close(layer(x), F.relu(conv(x)))


def test_load_modes(tmp_path):
    net, _ = _case("pruned-shared")
    save(net, tmp_path / "m.dsq")
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "m.dsq")(x), net.eval()(x))  # dense stays exact
    with pytest.raises(DeepSqueezeError, match="mode"):
        load(tmp_path / "m.dsq", mode="fast")
    with pytest.raises(DeepSqueezeError, match="batch_size"):
        load_runtime(tmp_path / "m.dsq", batch_size=0)
    with pytest.raises(DeepSqueezeError, match="not available"):
        load_runtime(tmp_path / "m.dsq", impls={"fc1": "nope"})


def test_onnx_export_matches(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from deepsqueeze.runtime.onnx_export import export_onnx, onnx_session

    net, _ = _case("pruned-shared-conv")
    save(net, tmp_path / "m.dsq")
    export_onnx(tmp_path / "m.dsq", tmp_path / "m.onnx")
    session = onnx_session(tmp_path / "m.onnx", threads=1)
    x = torch.randn(3, 1, 28, 28)
    out = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    with torch.no_grad():
        _close(out, net.eval()(x))


def test_cli_bench_and_export(tmp_path):
    net, _ = _case("pruned-shared")
    save(net, tmp_path / "m.dsq")
    runner = CliRunner()
    result = runner.invoke(app, ["bench", str(tmp_path / "m.dsq"), "--batch", "1,3", "--runs",
                                 "3", "--no-memory", "--threads", "1", "--json",
                                 str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    assert "runtime" in result.output and "vs dense" in result.output
    data = json.loads((tmp_path / "b.json").read_text())
    backends = {(t["backend"], t["batch"]) for t in data["timings"]}
    assert {("dense", 1), ("runtime", 1), ("dense", 3), ("runtime", 3)} <= backends
    assert all(t["max_abs_diff"] < 1e-4 for t in data["timings"])
    assert set(data["runtime"]) == {"1", "3"}
    assert data["weights_bytes"]["runtime"] <= 2 * data["file_bytes"]
    bad = runner.invoke(app, ["bench", str(tmp_path / "m.dsq"), "--batch", "x"])
    assert bad.exit_code != 0
    if importlib.util.find_spec("onnx") is not None:
        result = runner.invoke(app, ["export", str(tmp_path / "m.dsq"), "--out",
                                     str(tmp_path / "m.onnx")])
        assert result.exit_code == 0, result.output
        assert (tmp_path / "m.onnx").stat().st_size > inspect(tmp_path / "m.dsq").file_bytes


@pytest.mark.slow
def test_peak_rss_in_a_fresh_process(tmp_path):
    from deepsqueeze.runtime.memory import measure_peak_rss

    net, _ = _case("pruned-shared")
    save(net, tmp_path / "m.dsq")
    m = measure_peak_rss("runtime", tmp_path / "m.dsq", 1, (1, 28, 28), threads=1, runs=2)
    assert m["peak_kib"] >= m["baseline_kib"] > 0 and m["weights_bytes"] > 0


def test_form_coords_match_numpy():
    w = np.zeros((4, 600), np.float32)
    w[0, [0, 1, 300, 599]] = [1, 2, 3, 4]
    w[3, 599] = 5
    form = from_dense(torch.from_numpy(w))
    row, col = form.coords()
    assert list(zip(row.tolist(), col.tolist(), strict=True)) == list(
        zip(*np.nonzero(w), strict=True))
    np.testing.assert_array_equal(form.weights(), w[np.nonzero(w)])
