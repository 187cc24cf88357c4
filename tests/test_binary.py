"""Binary layers (issue 13): the packed XNOR/popcount and sign-select kernels equal the float
sign math, straight-through gradients, XNOR scales, the ``binarize`` method, ``.dsq`` round trips
at 1 bit per weight (dense load and every runtime executor), hostile files refused."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepsqueeze import models
from deepsqueeze.codec.container import dsq_bytes, read_dsq
from deepsqueeze.dsq import inspect, load, save
from deepsqueeze.errors import DsqFormatError, ModelError, RecipeError, RuntimeInputError
from deepsqueeze.methods.base import create_method, select_layers
from deepsqueeze.models.binary import (
    BinaryLinear,
    fold_batchnorm,
    from_float,
    is_training_form,
    sign,
    sign_ste,
    train_binary,
)
from deepsqueeze.pipeline.recipe import load_recipe
from deepsqueeze.runtime import autotune as at
from deepsqueeze.runtime import kernel as K
from deepsqueeze.runtime import load_runtime, runtime_info
from deepsqueeze.runtime.executors.binary import binary_product, pack_signs, unpack_signs

REPO = Path(__file__).resolve().parents[1]
needs_kernel = pytest.mark.skipif(K.get_kernel() is None, reason="no C compiler for the kernel")
SHAPES = [(1, 1, 1), (3, 63, 2), (5, 64, 1), (7, 65, 3), (9, 127, 4), (33, 200, 5),
          (17, 1000, 1), (64, 513, 70), (130, 4096, 2)]


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(at.ENV_CACHE, str(tmp_path / "autotune.json"))


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ kernel


def test_pack_signs_round_trip_and_layout():
    w = sign(_rand(5, 70))
    bits = pack_signs(w)
    assert bits.dtype == torch.int64 and bits.numel() == 5 * 2
    assert torch.equal(unpack_signs(bits, 5, 70), w)
    one = torch.ones(1, 70)
    one[0, 3] = one[0, 64] = -1
    words = pack_signs(one)
    assert words.tolist() == [1 << 3, 1]  # bit j of word k = column 64k + j; padding clear
    assert sign(torch.tensor([0.0, -0.0, float("nan"), -2.0])).tolist() == [1, 1, -1, -1]


@needs_kernel
@pytest.mark.parametrize(("rows", "cols", "n"), SHAPES)
def test_xnor_kernel_equals_float_sign_math(rows, cols, n):
    w, x = sign(_rand(rows, cols, seed=1)), _rand(n, cols, seed=2)
    x[0, 0] = 0.0  # sign(0) = +1 in both
    bits = pack_signs(w)
    ref = sign(x) @ w.T
    for threads in (1, 2):
        y = binary_product("xnor", bits, rows, cols, None, None, x, threads=threads)
        assert torch.equal(y, ref)  # exact integers
    scale, bias = torch.rand(rows) + 0.1, _rand(rows, seed=3)
    y = binary_product("xnor", bits, rows, cols, scale, bias, x, threads=2)
    torch.testing.assert_close(y, ref * scale + bias, rtol=1e-6, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize(("rows", "cols", "n"), SHAPES)
def test_select_kernel_equals_float_math(rows, cols, n):
    w, x = sign(_rand(rows, cols, seed=4)), _rand(n, cols, seed=5)
    bits = pack_signs(w)
    scale, bias = torch.rand(rows) + 0.1, _rand(rows, seed=6)
    for threads in (1, 2):
        y = binary_product("select", bits, rows, cols, scale, bias, x, threads=threads)
        ref = (x.double() @ w.double().T * scale.double() + bias.double()).float()
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4 * cols**0.5)
    assert torch.equal(binary_product("select", bits, rows, cols, None, None, x[:0]),
                       torch.empty(0, rows))


@needs_kernel
@pytest.mark.parametrize(("c", "o", "k", "stride", "dilation", "hw", "n"), [
    (1, 3, (5, 5), (1, 1), (1, 1), (9, 9), 2), (3, 4, (3, 2), (2, 1), (1, 2), (11, 70), 1),
    (20, 8, (5, 5), (1, 1), (1, 1), (12, 12), 3), (2, 5, (1, 70), (1, 3), (1, 1), (3, 200), 2),
    (7, 2, (3, 3), (3, 2), (2, 3), (20, 130), 1), (64, 3, (1, 1), (1, 1), (1, 1), (2, 65), 4),
])
def test_xnor_conv_kernel_equals_float_sign_math(c, o, k, stride, dilation, hw, n):
    from deepsqueeze.runtime.executors.binary import binary_xnor_conv2d
    from deepsqueeze.runtime.layers import ConvGeometry

    w, x = sign(_rand(o, c, *k, seed=8)), _rand(n, c, *hw, seed=9)
    geometry = ConvGeometry(c, o, k, stride, (0, 0), dilation, 1)
    ref = F.conv2d(sign(x), w, None, stride, 0, dilation)
    for threads in (1, 2):
        y = binary_xnor_conv2d(pack_signs(w), geometry, None, None, x, threads=threads)
        assert torch.equal(y, ref)
    scale, bias = torch.rand(o) + 0.1, _rand(o, seed=10)
    y = binary_xnor_conv2d(pack_signs(w), geometry, scale, bias, x)
    torch.testing.assert_close(y, ref * scale.view(-1, 1, 1) + bias.view(-1, 1, 1))


@needs_kernel
def test_kernel_refuses_bad_arguments():
    fn = K.get_kernel().function("dsq_binary_xnor_linear", [ctypes.c_void_p, *[ctypes.c_int64] * 3,
                                                            ctypes.c_void_p, ctypes.c_int64,
                                                            ctypes.c_void_p, ctypes.c_int64,
                                                            ctypes.c_void_p, ctypes.c_int64,
                                                            ctypes.c_void_p, ctypes.c_int64,
                                                            ctypes.c_int64, ctypes.c_int64])
    w = pack_signs(sign(_rand(4, 100)))
    x, y, s = torch.zeros(2, 100), torch.zeros(2, 4), torch.ones(4)
    ok = (w.data_ptr(), 8, 4, 100, s.data_ptr(), 4, None, 0, x.data_ptr(), 200, y.data_ptr(), 8,
          2, 1)
    assert fn(*ok) == K.DSQ_OK

    def call(**change):
        args = list(ok)
        names = ["w", "words", "rows", "cols", "scale", "nscale", "bias", "nbias", "x", "nx",
                 "y", "ny", "n", "threads"]
        for k, v in change.items():
            args[names.index(k)] = v
        return fn(*args)

    assert call(words=7) == K.DSQ_ESIZE  # a packed matrix shorter than rows x words
    assert call(nx=199) == K.DSQ_ESIZE and call(ny=9) == K.DSQ_ESIZE
    assert call(nscale=3) == K.DSQ_ESIZE and call(nbias=4) == K.DSQ_ESIZE  # bias NULL, count 4
    assert call(rows=0) == K.DSQ_EINVAL and call(cols=-1) == K.DSQ_EINVAL
    assert call(n=-1) == K.DSQ_EINVAL and call(threads=0) == K.DSQ_EINVAL
    assert call(threads=65) == K.DSQ_EINVAL and call(w=None) == K.DSQ_EINVAL
    assert call(x=None) == K.DSQ_EINVAL
    assert call(rows=1 << 62, words=1 << 62) == K.DSQ_ESIZE  # rows x words overflows
    with pytest.raises(RuntimeInputError, match="float32"):
        binary_product("xnor", w, 4, 100, None, None, torch.zeros(2, 100, dtype=torch.float64))
    conv = K.get_kernel().function("dsq_binary_xnor_conv2d", [ctypes.c_void_p, ctypes.c_int64,
                                                              ctypes.c_void_p, ctypes.c_int64,
                                                              ctypes.c_void_p, ctypes.c_int64,
                                                              ctypes.c_void_p, ctypes.c_int64,
                                                              ctypes.c_void_p, ctypes.c_int64,
                                                              ctypes.c_void_p, ctypes.c_int64,
                                                              ctypes.c_int64, ctypes.c_int64])
    cw = pack_signs(sign(_rand(2, 3, 3, 3)))  # 2 x 27 columns: 1 word a row
    xc, yc = torch.zeros(1, 3, 5, 5), torch.zeros(1, 2, 3, 3)
    good = [3, 5, 5, 2, 3, 3, 1, 1, 1, 1, 3, 3]

    def conv_call(geom, words=2, nx=75, ny=18):
        g = torch.tensor(geom, dtype=torch.int64)
        return conv(cw.data_ptr(), words, g.data_ptr(), g.numel(), None, 0, None, 0,
                    xc.data_ptr(), nx, yc.data_ptr(), ny, 1, 1)

    assert conv_call(good) == K.DSQ_OK
    assert conv_call(good, words=3) == K.DSQ_ESIZE and conv_call(good, nx=74) == K.DSQ_ESIZE
    assert conv_call(good[:11]) == K.DSQ_EINVAL  # 11 geometry values
    assert conv_call([*good[:10], 4, 3]) == K.DSQ_EINVAL  # an output size torch would not give
    assert conv_call([3, 5, 5, 2, 6, 3, 1, 1, 1, 1, 1, 3]) == K.DSQ_EINVAL  # kernel > input
    assert conv_call([3, 5, 5, 2, 3, 3, 1, 1, 1 << 62, 1, 3, 3]) == K.DSQ_ESIZE  # overflow
    with pytest.raises(RuntimeInputError, match="sizes"):
        binary_product("xnor", w, 4, 129, None, None, torch.zeros(2, 129))  # 3 words a row


# ------------------------------------------------------------------------------ training form


def test_sign_ste_gradient_is_hardtanh():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5], requires_grad=True)
    y = sign_ste(x)
    assert y.tolist() == [-1, -1, -1, 1, 1, 1, 1]
    y.backward(torch.arange(1.0, 8.0))
    assert x.grad.tolist() == [0, 2, 3, 4, 5, 6, 0]


def test_binary_linear_training_form_gradients_and_clipping():
    torch.manual_seed(0)
    dense = nn.Linear(6, 4)
    layer = from_float(dense, scaled=True, binary_input=True)
    assert is_training_form(layer)
    latent = layer.parametrizations.weight.original
    assert torch.equal(latent, dense.weight)  # the trained weights start the latents
    assert set(torch.unique(layer.weight).tolist()) <= {-1.0, 1.0}
    alpha = dense.weight.abs().mean(dim=1)
    torch.testing.assert_close(layer.weight_scale, alpha)  # XNOR-Net: mean |W| per output
    x = torch.tensor([[0.5, -3.0, 0.2, -0.1, 2.0, 0.0]], requires_grad=True)
    y = layer(x)
    ref = (sign(x) @ sign(dense.weight).T) * alpha + dense.bias
    torch.testing.assert_close(y, ref)
    g = torch.randn(1, 4)
    y.backward(g)
    # input STE: gradient only where |x| <= 1
    assert (x.grad[0, [1, 4]] == 0).all() and (x.grad[0, [0, 2, 3, 5]] != 0).any()
    # latent gradient: straight through the sign plus the scale's mean |W| term
    xb = sign(x.detach())
    expect = (g * alpha).T @ xb + (g * (xb @ sign(dense.weight).T)).T * sign(
        dense.weight) / dense.weight.shape[1]
    torch.testing.assert_close(latent.grad, expect)
    with torch.no_grad():
        latent[0, 0] = 5.0
    layer.train()(x)  # a training forward clips the latents to [-1, 1]
    assert float(latent.detach()[0, 0]) == 1.0
    layer.eval()
    with torch.no_grad():
        latent[0, 1] = -7.0
    layer(x)
    assert float(latent.detach()[0, 1]) == -7.0  # not in eval mode


def test_learned_scale_is_a_trained_parameter_and_conv_matches_float():
    conv = nn.Conv2d(3, 5, 3, padding=1, stride=2)
    layer = from_float(conv, scale="learned")
    assert not hasattr(layer.parametrizations, "weight_scale")
    assert isinstance(layer.weight_scale, nn.Parameter)
    x = _rand(2, 3, 9, 9)
    ref = F.conv2d(x, sign(conv.weight), None, 2, 1) * layer.weight_scale.view(-1, 1, 1)
    torch.testing.assert_close(layer(x), ref + conv.bias.view(-1, 1, 1))
    layer(x).square().sum().backward()
    assert layer.weight_scale.grad is not None and layer.weight_scale.grad.abs().sum() > 0
    with pytest.raises(ModelError, match="already in training form"):
        train_binary(layer)
    with pytest.raises(ModelError, match="zero-padded"):
        from_float(nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"))


def test_binary_layer_refuses_non_binary_weights_on_load():
    layer = BinaryLinear(4, 3)
    state = layer.state_dict()
    state["weight"] = state["weight"] * 0.5
    with pytest.raises(RuntimeError, match="only -1 and \\+1"):
        layer.load_state_dict(state)


# ------------------------------------------------------------------------------ method


def test_binarize_method_keeps_first_and_last_real():
    torch.manual_seed(0)
    net = models.create("lenet300")
    m = create_method("binarize")
    m.apply(net, select_layers(net, m.params.layers, m.supported))
    assert type(net.fc1) is nn.Linear and type(net.fc3) is nn.Linear
    assert isinstance(net.fc2, BinaryLinear) and m.converted == ["fc2"]
    net2 = models.create("lenet300")
    m2 = create_method("binarize", keep_first=False, scaled={"fc1": False, "*": True})
    m2.apply(net2, select_layers(net2, None, m2.supported))
    assert not net2.fc1.scaled and net2.fc2.scaled and type(net2.fc3) is nn.Linear
    m2.finalize(net2)
    with pytest.raises(ModelError, match="no layer left"):
        m3 = create_method("binarize")
        m3.apply(net, select_layers(net, ["fc1", "fc3"], m3.supported))
    with pytest.raises(RecipeError, match="scale"):
        create_method("binarize", scale="median")
    pruned = models.create("lenet300")
    p = create_method("prune", sparsity=0.5)
    p.apply(pruned, select_layers(pruned, None, p.supported))
    with pytest.raises(ModelError, match="parametrized"):
        create_method("binarize", keep_first=False).apply(
            pruned, select_layers(pruned, None, (nn.Linear,)))


def test_shipped_recipe_parses():
    recipe = load_recipe(REPO / "recipes" / "binary-lenet300.yaml")
    assert recipe.model == "lenet300" and recipe.stages[0].method == "binarize"


# ------------------------------------------------------------------------------ files


def _binarized_lenet300(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = models.create("lenet300")
    m = create_method("binarize", keep_first=False)
    m.apply(net, select_layers(net, None, m.supported))
    return net.eval()


@pytest.fixture(scope="module")
def lenet300_file(tmp_path_factory) -> tuple[nn.Module, Path]:
    net = _binarized_lenet300()
    path = tmp_path_factory.mktemp("bin") / "l300.dsq"
    save(net, path)
    return net, path


def test_file_holds_one_bit_per_weight_and_loads_back(lenet300_file):
    net, path = lenet300_file
    report = inspect(path)
    rows = {r.layer: r for r in report.layers}
    dsq_file = read_dsq(path)
    for name, numel in (("fc1", 784 * 300), ("fc2", 300 * 100)):
        entry = next(e for e in dsq_file.meta["tensors"] if e["name"] == f"{name}.weight")
        assert entry["encoding"] == "codebook" and entry["value_bits"] == 1
        assert len(dsq_file.sections[f"{name}.weight:values"]) == (numel + 7) // 8  # 1 bit each
        assert rows[name].bits_per_weight < 1.25  # signs + scales + biases
    weights = 784 * 300 + 300 * 100
    assert report.file_bytes < weights / 8 + 4 * (1010 + 400 + 400 + 10) + 3000
    meta = read_dsq(path).meta
    assert meta["modules"]["fc1"] == {"type": "BinaryLinear", "config": {
        "in_features": 784, "out_features": 300, "bias": True, "scaled": True,
        "binary_input": False}}
    dense = load(path)
    assert isinstance(dense.fc1, BinaryLinear) and not is_training_form(dense.fc1)
    x = _rand(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), net(x), rtol=1e-5, atol=1e-5)
        for impl in ("select", "torch"):
            rt = load_runtime(path, impls={"fc1": impl, "fc2": impl}, fuse=False)
            assert runtime_info(rt).choices()["fc1"] == impl
            torch.testing.assert_close(rt(x), dense(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("binary_activations", [False, True])
def test_binary_lenet5_round_trip_every_executor(tmp_path, binary_activations):
    torch.manual_seed(1)
    net = models.create("binary-lenet5", binary_activations=binary_activations)
    net.train()
    net(_rand(8, 1, 28, 28))  # BatchNorm statistics
    net.eval()
    path = tmp_path / "b5.dsq"
    save(net, path)
    dense = load(path)
    x = _rand(3, 1, 28, 28, seed=7)
    with torch.no_grad():
        ref = net(x)
        torch.testing.assert_close(dense(x), ref, rtol=1e-5, atol=1e-5)
        impls = ["torch"] + (["xnor", "select"] if K.get_kernel() is not None else [])
        for impl in impls:
            forced = {"conv2": impl, "fc1": impl, "fc2": impl}
            if impl == "select" and binary_activations:
                forced = {"conv2": "select"}
            if impl == "xnor" and not binary_activations:
                continue
            rt = load_runtime(path, impls=forced, fuse=False)
            torch.testing.assert_close(rt(x), ref, rtol=1e-4, atol=1e-4)
            with pytest.raises(RuntimeInputError):
                rt(torch.zeros(1, 2, 28, 28))
        rt = load_runtime(path)
        assert rt(x[:0]).shape == (0, 10)


@needs_kernel
def test_runtime_executor_input_checks(lenet300_file):
    _, path = lenet300_file
    rt = load_runtime(path, impls={"fc1": "select"}, fuse=False)
    layer = rt.fc1
    with pytest.raises(RuntimeInputError, match="784"):
        layer(torch.zeros(2, 783))
    with pytest.raises(RuntimeInputError, match="floating"):
        layer(torch.zeros(2, 784, dtype=torch.int64))
    x = _rand(784, 2).t()  # not contiguous
    torch.testing.assert_close(layer(x), layer(x.contiguous()))
    assert layer(torch.zeros(0, 784)).shape == (0, 300)
    assert layer.held_bytes() < 784 * 300 / 8 + 8 * 300 + 64 * 300


@pytest.mark.parametrize(("name", "kwargs"), [
    ("bnn-mlp", {"hidden": 48, "binary_activations": False, "binary_first": False}),
    ("bnn-mlp", {"hidden": 48, "scaled": True}),
    ("binary-lenet5", {"binary_activations": True, "binary_last": False}),
])
def test_fold_batchnorm_is_exact_and_smaller(tmp_path, name, kwargs):
    torch.manual_seed(2)
    net = models.create(name, **kwargs).train()
    net(_rand(32, 1, 28, 28))
    with torch.no_grad():  # negative BatchNorm scales too: the folded scale takes the sign
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(-1, 1)
                m.bias.uniform_(-1, 1)
    net.eval()
    folded = fold_batchnorm(net)
    assert models.spec_of(folded).kwargs["folded"] is True
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    x = _rand(6, 1, 28, 28, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-4, atol=1e-4)
        a, b = save(net, tmp_path / "bn.dsq"), save(folded, tmp_path / "folded.dsq")
        assert b.file_bytes < a.file_bytes
        torch.testing.assert_close(load(tmp_path / "folded.dsq")(x), folded(x))
        rt = load_runtime(tmp_path / "folded.dsq")
        torch.testing.assert_close(rt(x), folded(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ModelError, match="unfolded"):
        fold_batchnorm(folded)


# ------------------------------------------------------------------------------ hostile files


def _forge(path: Path, tmp: Path, change) -> Path:
    dsq = read_dsq(path)
    meta, sections = dict(dsq.meta), dict(dsq.sections)
    change(meta, sections)
    out = tmp / "forged.dsq"
    out.write_bytes(dsq_bytes(meta, sections))
    return out


def _entry(meta, name):
    return next(e for e in meta["tensors"] if e["name"] == name)


def _both_refuse(path: Path, match: str) -> None:
    with pytest.raises(DsqFormatError, match=match):
        load(path)
    with pytest.raises(DsqFormatError, match=match):
        load_runtime(path)


def test_hostile_packed_sections_are_refused(lenet300_file, tmp_path):
    _, path = lenet300_file

    def codebook(meta, sections):  # the 2-entry codebook says {-1, 2}: not a binary weight
        entry = _entry(meta, "fc2.weight")
        dtype = {"int8": torch.int8, "float32": torch.float32}[entry["dtype"]]
        sections["fc2.weight:codebook"] = torch.tensor([-1, 2], dtype=dtype).numpy().tobytes()

    _both_refuse(_forge(path, tmp_path, codebook), "-1 and \\+1|other than")

    def short(meta, sections):  # a packed stream shorter than the weight
        sections["fc1.weight:values"] = sections["fc1.weight:values"][:-3]

    _both_refuse(_forge(path, tmp_path, short), "fc1.weight|too short")

    def scales(meta, sections):  # scales for 299 of 300 outputs
        entry = _entry(meta, "fc1.weight_scale")
        entry["shape"] = [299]
        data = sections["fc1.weight_scale:data"]
        sections["fc1.weight_scale:data"] = data[:-4]

    _both_refuse(_forge(path, tmp_path, scales), "weight_scale|fc1")

    def unscaled(meta, sections):  # the manifest says unscaled, the file stores scales
        meta["modules"] = {**meta["modules"], "fc1": {**meta["modules"]["fc1"], "config": {
            **meta["modules"]["fc1"]["config"], "scaled": False}}}

    _both_refuse(_forge(path, tmp_path, unscaled), "weight_scale|fc1")

    def option(meta, sections):  # a forged option: not a bool / an absurd size
        cfg = meta["modules"]["fc2"]["config"]
        meta["modules"] = {**meta["modules"], "fc2": {"type": "BinaryLinear",
                                                      "config": {**cfg, "binary_input": 1}}}

    _both_refuse(_forge(path, tmp_path, option), "binary_input")

    def huge(meta, sections):
        cfg = meta["modules"]["fc2"]["config"]
        meta["modules"] = {**meta["modules"], "fc2": {"type": "BinaryLinear",
                                                      "config": {**cfg, "in_features": 1 << 40}}}

    _both_refuse(_forge(path, tmp_path, huge), "in_features")


# ------------------------------------------------------------------------------ sanitizer

_ASAN_SCRIPT = r"""
import torch
from deepsqueeze.runtime import kernel as K
from deepsqueeze.models.binary import sign
from deepsqueeze.runtime.executors.binary import binary_product, pack_signs
assert K.get_kernel() is not None and K.get_kernel().sanitized
g = torch.Generator().manual_seed(0)
for rows, cols, n in [(1, 1, 1), (3, 63, 2), (7, 65, 3), (64, 513, 70), (130, 4096, 2)]:
    w, x = sign(torch.randn(rows, cols, generator=g)), torch.randn(n, cols, generator=g)
    bits, s, b = pack_signs(w), torch.rand(rows), torch.randn(rows)
    for mode in ("xnor", "select"):
        for t in (1, 2, 3):
            y = binary_product(mode, bits, rows, cols, s, b, x, threads=t)
            xs = sign(x) if mode == "xnor" else x
            assert torch.allclose(y, xs @ w.T * s + b, rtol=1e-4, atol=1e-3), (mode, rows, cols)
import torch.nn.functional as F
from deepsqueeze.runtime.executors.binary import binary_xnor_conv2d
from deepsqueeze.runtime.layers import ConvGeometry
for c, o, k, st, d, hw in [(3, 4, (3, 2), (2, 1), (1, 2), (11, 70)), (2, 5, (1, 70), (1, 3),
                                                                        (1, 1), (3, 200))]:
    w, x = sign(torch.randn(o, c, *k, generator=g)), torch.randn(2, c, *hw, generator=g)
    geom = ConvGeometry(c, o, k, st, (0, 0), d, 1)
    for t in (1, 2):
        y = binary_xnor_conv2d(pack_signs(w), geom, None, None, x, threads=t)
        assert torch.equal(y, F.conv2d(sign(x), w, None, st, 0, d))
print("SANITIZED-OK")
"""


def _asan_usable() -> bool:
    try:
        return K.get_kernel() is not None and K.sanitizer_runtime() is not None
    except Exception:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _asan_usable(), reason="the C compiler has no libasan")
def test_binary_kernel_clean_under_sanitizers(tmp_path):
    env = K.sanitizer_env()
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _ASAN_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SANITIZED-OK" in proc.stdout
    assert "AddressSanitizer" not in proc.stderr and "runtime error" not in proc.stderr


def test_bake_keeps_a_binary_layer_exact() -> None:
    """bake removes the newest parametrization first: the scale reads the latent weight."""
    import copy

    from deepsqueeze.analysis.sweeps import Option, apply_option
    from deepsqueeze.models.binary import BinaryLinear
    from deepsqueeze.pipeline.session import bake

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 3))
    work = copy.deepcopy(net)
    apply_option(work, "0", Option((("binarize", "on"),)))
    x = torch.randn(4, 20)
    with torch.no_grad():
        before = work(x)
    assert bake(work) == ["0.weight_scale", "0.weight"]
    assert type(work[0]) is BinaryLinear
    with torch.no_grad():
        torch.testing.assert_close(work(x), before, atol=0, rtol=0)
