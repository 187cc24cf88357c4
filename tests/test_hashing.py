"""HashedNets (xxHash) and circulant layers: hash, layers, methods, file, runtime, hostile files."""

from __future__ import annotations

import copy
import ctypes
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import xxhash
from torch import nn

from deepsqueeze import dsq, models
from deepsqueeze.codec.container import dsq_bytes, parse_dsq
from deepsqueeze.errors import DsqFormatError, ModelError, RecipeError, RuntimeInputError
from deepsqueeze.methods import create_method, select_layers
from deepsqueeze.methods.hashing import hash_layer
from deepsqueeze.models.hashed import (
    MAX_BUCKETS,
    SIGN_SALT,
    CirculantLinear,
    HashedConv2d,
    HashedLinear,
    ToeplitzLinear,
    buckets_for,
    circulant_matrix,
    hash_index,
    index_check,
    input_signs,
    toeplitz_matrix,
    xxh32_pairs,
)
from deepsqueeze.runtime import kernel as K
from deepsqueeze.runtime import load_runtime, runtime_info

REPO = Path(__file__).resolve().parents[1]


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------ the hash


@pytest.mark.parametrize("seed", [0, 1, 3, 0x5BD1E995, 2**32 - 1])
def test_torch_xxh32_equals_the_xxhash_package(seed: int) -> None:
    i = torch.randint(0, 2**32, (500,), generator=_g(seed % 97))
    j = torch.randint(0, 2**32, (500,), generator=_g(seed % 89 + 1))
    i[:4] = torch.tensor([0, 2**32 - 1, 0, 2**31])
    j[:4] = torch.tensor([0, 2**32 - 1, 2**32 - 1, 7])
    ref = [xxhash.xxh32_intdigest(struct.pack("<II", a, b), seed=seed)
           for a, b in zip(i.tolist(), j.tolist(), strict=True)]
    assert xxh32_pairs(i, j, seed).tolist() == ref


def test_c_xxh32_equals_the_xxhash_package() -> None:
    k = K.get_kernel()
    if k is None:
        pytest.skip("no C compiler")
    fn = k.function("dsq_hashed_xxh32",
                    [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                     ctypes.c_int64])
    pairs = torch.randint(0, 2**32, (300, 2), generator=_g(3)).to(torch.int64)
    buf = pairs.to(torch.int64).numpy().astype("<u4")
    out = (ctypes.c_uint32 * 300)()
    for seed in (0, 17, 2**32 - 1):
        assert fn(buf.ctypes.data, 300, seed, ctypes.addressof(out), 300) == 0
        ref = [xxhash.xxh32_intdigest(struct.pack("<II", a, b), seed=seed)
               for a, b in pairs.tolist()]
        assert list(out) == ref
    assert fn(buf.ctypes.data, 300, 0, ctypes.addressof(out), 299) == K.DSQ_ESIZE
    assert fn(buf.ctypes.data, 300, 2**32, ctypes.addressof(out), 300) == K.DSQ_EINVAL
    assert fn(None, 300, 0, ctypes.addressof(out), 300) == K.DSQ_EINVAL


def test_indices_are_the_stored_expected_values() -> None:
    """Fixed seeds give fixed indices on every run and platform (values from xxhash)."""
    layer = HashedLinear(5, 3, buckets=7, seed=3)
    idx, sign = layer.index()
    assert idx.tolist() == [[3, 6, 3, 2, 0], [5, 0, 5, 5, 3], [3, 3, 5, 4, 4]]
    assert sign.tolist() == [[1, 1, -1, -1, -1], [-1, -1, 1, -1, 1], [1, 1, 1, -1, -1]]
    assert layer.check == 2168551350
    assert index_check(300, 784, 29400, 12345) == 4068493180
    assert input_signs(8, 5).tolist() == [-1, 1, -1, 1, -1, 1, 1, -1]
    # the definition, spelled out with the reference package
    h = xxhash.xxh32_intdigest(struct.pack("<II", 2, 4), seed=3)
    s = xxhash.xxh32_intdigest(struct.pack("<II", 2, 4), seed=3 ^ SIGN_SALT)
    assert idx[2, 4] == (h * 7) >> 32 and sign[2, 4] == (-1 if s >> 31 else 1)


def test_buckets_are_used_evenly() -> None:
    idx, sign = hash_index(torch.arange(300).unsqueeze(1), torch.arange(784).unsqueeze(0),
                           1000, 42)
    counts = torch.bincount(idx.flatten(), minlength=1000).float()
    assert counts.min() > 0.5 * counts.mean() and counts.max() < 1.6 * counts.mean()
    assert abs(float(sign.float().mean())) < 0.01


# ------------------------------------------------------------------------------ layers


def test_hashed_linear_gradient_equals_the_tied_dense_layer() -> None:
    torch.manual_seed(0)
    layer = HashedLinear(12, 9, buckets=10, seed=5)
    x = torch.randn(4, 12)
    target = torch.randn(4, 9)
    F.mse_loss(layer(x), target).backward()
    dense_w = layer.virtual_matrix().detach().requires_grad_(True)
    F.mse_loss(F.linear(x, dense_w, layer.bias.detach()), target).backward()
    idx, sign = layer.index()
    expected = torch.zeros(10).index_add_(0, idx.flatten(), (dense_w.grad * sign).flatten())
    torch.testing.assert_close(layer.weight_buckets.grad, expected)
    # tied dense layer: equal virtual weights share one value (up to sign)
    w = layer.weight.detach()
    for b in range(10):
        vals = (w * sign)[idx == b]
        assert torch.allclose(vals, vals[0].expand_as(vals)) if len(vals) else True


def test_hashed_conv_gradient_and_output_equal_the_tied_dense_conv() -> None:
    torch.manual_seed(1)
    conv = HashedConv2d(4, 6, 3, buckets=20, seed=9, stride=1, padding=1, groups=2)
    x = torch.randn(2, 4, 7, 7)
    w = conv.weight.detach().requires_grad_(True)
    y = conv(x)
    ref = F.conv2d(x, w, conv.bias.detach(), 1, 1, 1, 2)
    torch.testing.assert_close(y, ref)
    y.square().sum().backward()
    ref.square().sum().backward()
    idx, sign = conv.index()
    expected = torch.zeros(20).index_add_(0, idx.flatten(),
                                          (w.grad.reshape(6, -1) * sign).flatten())
    torch.testing.assert_close(conv.weight_buckets.grad, expected)


def _collision_free_seed(rows: int, cols: int) -> int:
    i, j = torch.arange(rows).unsqueeze(1), torch.arange(cols).unsqueeze(0)
    for seed in range(10_000):
        idx, _ = hash_index(i, j, rows * cols, seed)
        if idx.unique().numel() == rows * cols:
            return seed
    raise AssertionError("no collision-free seed")


def test_conversion_at_factor_1_without_collisions_reproduces_the_layer() -> None:
    torch.manual_seed(2)
    dense = nn.Linear(3, 2)
    seed = _collision_free_seed(2, 3)
    hashed = hash_layer(dense, 1.0, seed)
    assert hashed.buckets == 6
    torch.testing.assert_close(hashed.weight, dense.weight.detach())
    x = torch.randn(5, 3)
    torch.testing.assert_close(hashed(x), dense(x))


def test_conversion_starts_buckets_at_the_mean_of_their_weights() -> None:
    torch.manual_seed(3)
    dense = nn.Linear(20, 10)
    hashed = hash_layer(dense, 0.125, 77)
    idx, sign = hashed.index()
    w = dense.weight.detach() * sign
    for b in range(hashed.buckets):
        members = w[idx == b]
        want = members.mean() if len(members) else torch.tensor(0.0)
        torch.testing.assert_close(hashed.weight_buckets[b], want)
    torch.testing.assert_close(hashed.bias, dense.bias)


def test_layers_are_device_agnostic_and_rebuild_on_meta() -> None:
    layer = HashedLinear(6, 4, 5, seed=1)
    assert layer.to(torch.float64)(torch.randn(2, 6, dtype=torch.float64)).dtype == torch.float64
    with torch.device("meta"):
        meta = HashedLinear(6, 4, 5, seed=1, check=layer.check)
        assert meta(torch.empty(3, 6)).shape == (3, 4)
    circ = CirculantLinear(6, 4, seed=2).to(torch.float64)
    assert circ(torch.randn(2, 6, dtype=torch.float64)).dtype == torch.float64


def test_bad_layer_options_are_refused() -> None:
    with pytest.raises(ModelError, match="buckets"):
        HashedLinear(4, 4, 0)
    with pytest.raises(ModelError, match="buckets"):
        HashedLinear(4, 4, MAX_BUCKETS + 1)
    with pytest.raises(ModelError, match="virtual weights"):
        HashedLinear(1 << 20, 1 << 20, 8)
    with pytest.raises(ModelError, match="seed"):
        HashedLinear(4, 4, 3, seed=-1)
    with pytest.raises(DsqFormatError, match="checksum"):
        HashedLinear(4, 4, 3, seed=1, check=123)
    with pytest.raises(ModelError, match="groups"):
        HashedConv2d(3, 4, 3, buckets=5, groups=2)
    with pytest.raises(ValueError, match="factor"):
        buckets_for(100, 0.0)


@pytest.mark.parametrize("n, d", [(8, 8), (8, 5), (8, 20), (7, 16), (1, 3)])
def test_circulant_layer_equals_its_explicit_matrix(n: int, d: int) -> None:
    torch.manual_seed(n * d)
    layer = CirculantLinear(n, d, seed=11)
    r = layer.weight.detach()
    explicit = torch.zeros(layer.blocks * n, n)
    for b in range(layer.blocks):
        for a in range(n):
            for c in range(n):
                explicit[b * n + a, c] = r[b, (a - c) % n]
    explicit = explicit[:d] * input_signs(n, 11).float()
    torch.testing.assert_close(layer.dense_weight(), explicit)
    x = torch.randn(3, n)
    torch.testing.assert_close(layer(x), x @ explicit.T + layer.bias, atol=1e-5, rtol=1e-5)
    assert layer.weight.numel() == -(-d // n) * n


def test_circulant_projection_recovers_a_circulant_matrix() -> None:
    torch.manual_seed(4)
    source = CirculantLinear(10, 25, seed=3)
    target = CirculantLinear(10, 25, seed=3)
    target.load_dense(source.dense_weight())
    torch.testing.assert_close(target.dense_weight(), source.dense_weight())
    assert circulant_matrix(torch.arange(3.0)).tolist() == [[0, 2, 1], [1, 0, 2], [2, 1, 0]]


@pytest.mark.parametrize("n, d", [(8, 8), (8, 5), (5, 13), (1, 3), (7, 1)])
def test_toeplitz_layer_equals_its_explicit_matrix(n: int, d: int) -> None:
    torch.manual_seed(n + 10 * d)
    layer = ToeplitzLinear(n, d, seed=5)
    t = layer.weight.detach()
    assert t.shape == (d + n - 1,)
    explicit = torch.empty(d, n)
    for a in range(d):
        for c in range(n):
            explicit[a, c] = t[a - c + n - 1]
    explicit = explicit * input_signs(n, 5).float()
    torch.testing.assert_close(layer.dense_weight(), explicit)
    x = torch.randn(4, n)
    torch.testing.assert_close(layer(x), x @ explicit.T + layer.bias, atol=1e-5, rtol=1e-5)
    target = ToeplitzLinear(n, d, seed=5)
    target.load_dense(layer.dense_weight())  # projection recovers a Toeplitz matrix
    torch.testing.assert_close(target.dense_weight(), layer.dense_weight())
    assert toeplitz_matrix(torch.arange(4.0), 2, 3).tolist() == [[2, 1, 0], [3, 2, 1]]


# ------------------------------------------------------------------------------ methods


def _converted(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = models.create("lenet300")
    create_method("hash", factor={"fc1": 0.125, "fc2": 1 / 64}).apply(
        m, select_layers(m, ["fc1", "fc2"]))
    create_method("circulant").apply(m, select_layers(m, ["fc3"]))
    return m


def test_methods_replace_the_selected_layers() -> None:
    m = _converted()
    assert isinstance(m.fc1, HashedLinear) and m.fc1.buckets == 29400
    assert isinstance(m.fc2, HashedLinear) and m.fc2.buckets == round(30000 / 64)
    assert isinstance(m.fc3, CirculantLinear) and m.fc3.weight.shape == (1, 100)
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    lenet5 = models.create("lenet5")
    create_method("hash", factor=0.25).apply(lenet5, select_layers(lenet5, ["conv2"]))
    assert isinstance(lenet5.conv2, HashedConv2d)
    assert lenet5(torch.randn(1, 1, 28, 28)).shape == (1, 10)


@pytest.mark.parametrize("name, params, message", [
    ("hash", {"factor": 0}, "factor"),
    ("hash", {"factor": 1.5}, "factor"),
    ("hash", {"factor": 0.1, "init": "zeros"}, "init"),
    ("hash", {"fator": 0.1}, "fator"),
    ("circulant", {"seed": -1}, "seed"),
    ("circulant", {"structure": "hankel"}, "structure"),
])
def test_bad_method_parameters_name_the_field(name: str, params: dict[str, Any],
                                              message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        create_method(name, **params)


def test_circulant_refuses_convolutions_and_hash_checks_weights() -> None:
    lenet5 = models.create("lenet5")
    with pytest.raises(ModelError, match="supported"):
        create_method("circulant").apply(lenet5, select_layers(lenet5, ["conv1"],
                                                               (nn.Linear,)))
    lenet5.fc2.weight.data[0, 0] = float("nan")
    with pytest.raises(ModelError, match="NaN"):
        create_method("hash").apply(lenet5, select_layers(lenet5, ["fc2"]))
    assert isinstance(lenet5.fc2, nn.Linear)  # nothing changed


def test_hashed_mlp_trains_from_scratch() -> None:
    torch.manual_seed(0)
    m = models.create("hashed-mlp", hidden=[64, 32], factor=0.25, in_features=20)
    assert sum(p.numel() for p in m.parameters()) == (
        buckets_for(20 * 64, 0.25) + buckets_for(64 * 32, 0.25) + buckets_for(320, 0.25)
        + 64 + 32 + 10)
    x, y = torch.randn(64, 20), torch.randint(0, 10, (64,))
    opt = torch.optim.Adam(m.parameters(), lr=0.02)
    first = None
    for _ in range(60):
        loss = F.cross_entropy(m(x), y)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first
    with pytest.raises(ModelError, match="hidden"):
        models.create("hashed-mlp", hidden=[0])


# ------------------------------------------------------------------------------ file


def test_dsq_round_trip_stores_only_buckets(tmp_path: Path) -> None:
    m = _converted()
    path = tmp_path / "h.dsq"
    dsq.save(m, path)
    x = torch.randn(3, 1, 28, 28)
    loaded = dsq.load(path)
    torch.testing.assert_close(loaded(x), m(x))
    assert isinstance(loaded.fc1, HashedLinear) and loaded.fc1.seed == m.fc1.seed
    stored = dsq.read_model_file(path)
    assert set(stored.entries) == {"fc1.weight_buckets", "fc1.bias", "fc2.weight_buckets",
                                   "fc2.bias", "fc3.weight", "fc3.bias"}
    real = 29400 + 469 + 100 + 300 + 100 + 10
    assert path.stat().st_size < 4 * real + 4096
    # into the user's skeleton (a plain lenet300)
    filled = dsq.load(path, model=models.create("lenet300"))
    torch.testing.assert_close(filled(x), m(x))


def test_hashed_conv_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = models.create("lenet5")
    create_method("hash", factor=0.25).apply(m, select_layers(m, ["conv1", "conv2", "fc1"]))
    path = tmp_path / "c.dsq"
    dsq.save(m, path)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(dsq.load(path)(x), m(x))


def _toeplitz_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = models.create("lenet300")
    create_method("circulant", structure="toeplitz").apply(m, select_layers(m, ["fc2"]))
    create_method("circulant").apply(m, select_layers(m, ["fc3"]))
    return m


def test_toeplitz_round_trip_and_runtime(tmp_path: Path) -> None:
    m = _toeplitz_model()
    assert isinstance(m.fc2, ToeplitzLinear) and m.fc2.weight.numel() == 300 + 100 - 1
    path = tmp_path / "t.dsq"
    dsq.save(m, path)
    x = torch.randn(4, 1, 28, 28)
    dense = dsq.load(path)
    assert isinstance(dense.fc2, ToeplitzLinear) and isinstance(dense.fc3, CirculantLinear)
    torch.testing.assert_close(dense(x), m(x))
    torch.testing.assert_close(dsq.load(path, model=models.create("lenet300"))(x), m(x))
    specs = parse_dsq(path.read_bytes()).meta["modules"]
    assert specs["fc2"]["type"] == "ToeplitzLinear"
    # circulant layers keep the options files were written with before Toeplitz existed
    assert set(specs["fc3"]["config"]) == {"in_features", "out_features", "seed", "bias"}
    assert dsq.read_model_file(path).entries["fc2.weight"]["shape"] == [399]
    want = dense(x)
    for impl in ("fft", "dense"):
        rt = load_runtime(path, autotune=False, impls={"fc2": impl, "fc3": impl})
        with torch.inference_mode():
            torch.testing.assert_close(rt(x), want, atol=1e-5, rtol=1e-4)
            assert rt(x[:0]).shape == (0, 10)
            with pytest.raises(RuntimeInputError):
                rt.fc2(torch.zeros(2, 299))


@pytest.mark.parametrize("change, message", [
    (lambda m: _config("fc2")(m).update(out_features=101), "fit|stored|399"),
    (lambda m: _config("fc2")(m).update(in_features=301), "fit|stored|399|shape"),
    (lambda m: _config("fc2")(m).update(seed=2**33), "seed"),
    (lambda m: _config("fc2")(m).update(structure="toeplitz"), "options must be exactly"),
    (lambda m: _config("fc3")(m).update(structure="toeplitz"), "options must be exactly"),
    (lambda m: m["modules"]["fc2"].update(type="CirculantLinear"), "fit|stored|shape"),
    (lambda m: m["modules"]["fc2"].update(type="ToeplitzMatrix"), "type|kind"),
])
def test_forged_toeplitz_options_are_refused(tmp_path: Path, change: Any, message: str) -> None:
    path = tmp_path / "t.dsq"
    dsq.save(_toeplitz_model(), path)
    data = _forge(path, change)
    for load in (dsq.load, lambda d: load_runtime(d, autotune=False)):
        with pytest.raises(DsqFormatError, match=message):
            load(data)


# ------------------------------------------------------------------------------ runtime


def test_runtime_equals_the_dense_decoding_for_every_executor(tmp_path: Path) -> None:
    path = tmp_path / "h.dsq"
    dsq.save(_converted(), path)
    dense = dsq.load(path)
    x = torch.randn(5, 1, 28, 28)
    want = dense(x)
    names = {c.layer: set(c.held_bytes)
             for c in runtime_info(load_runtime(path, autotune=False)).layers}
    assert names["fc3"] == {"fft", "dense"}
    assert {"densify", "dense"} <= names["fc1"]
    assert ("kernel" in names["fc1"]) == (K.get_kernel() is not None)
    assert ("tiles" in names["fc1"]) == (K.get_kernel() is None)
    for impl in sorted(names["fc1"]):
        rt = load_runtime(path, autotune=False, impls={"fc1": impl, "fc2": impl, "fc3": "fft"})
        with torch.inference_mode():
            torch.testing.assert_close(rt(x), want, atol=1e-5, rtol=1e-4)
            assert rt(x[:0]).shape == (0, 10)
            torch.testing.assert_close(rt.fc1(torch.zeros(2, 3, 784)).shape,
                                       torch.Size([2, 3, 300]))
            with pytest.raises(RuntimeInputError):
                rt.fc1(torch.zeros(2, 783))
            with pytest.raises(RuntimeInputError):
                rt.fc1(torch.zeros(2, 784, dtype=torch.int64))
    rt = load_runtime(path, autotune=False, impls={"fc3": "dense"})
    torch.testing.assert_close(rt(x), want, atol=1e-5, rtol=1e-4)


def test_compact_executors_hold_about_the_file_size(tmp_path: Path) -> None:
    path = tmp_path / "h.dsq"
    dsq.save(_converted(), path)
    info = runtime_info(load_runtime(path, autotune=False))
    fc1 = next(c for c in info.layers if c.layer == "fc1")
    assert fc1.held_bytes["densify"] == 4 * (29400 + 300)
    assert fc1.held_bytes["dense"] >= 4 * 784 * 300
    compact = "kernel" if "kernel" in fc1.held_bytes else "tiles"
    assert fc1.held_bytes[compact] == 4 * (29400 + 300)


def test_without_a_compiler_the_torch_executors_run(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "h.dsq"
    dsq.save(_converted(), path)
    monkeypatch.setenv(K.ENV_KERNEL, "0")
    x = torch.randn(3, 1, 28, 28)
    want = dsq.load(path)(x)
    for impl in ("tiles", "densify"):
        rt = load_runtime(path, autotune=False, impls={"fc1": impl, "fc2": impl})
        with torch.inference_mode():
            torch.testing.assert_close(rt(x), want, atol=1e-5, rtol=1e-4)


def test_runtime_runs_hashed_convolutions(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = models.create("lenet5")
    create_method("hash", factor=0.25).apply(m, select_layers(m, ["conv1", "conv2"]))
    path = tmp_path / "c.dsq"
    dsq.save(m, path)
    x = torch.randn(2, 1, 28, 28)
    for impl in ("densify", "dense"):
        rt = load_runtime(path, autotune=False, impls={"conv1": impl, "conv2": impl})
        torch.testing.assert_close(rt(x), m(x), atol=1e-5, rtol=1e-4)
        with pytest.raises(RuntimeInputError):
            rt.conv1(torch.zeros(1, 2, 28, 28))


def test_c_kernel_refuses_bad_arguments() -> None:
    k = K.get_kernel()
    if k is None:
        pytest.skip("no C compiler")
    i64, vp = ctypes.c_int64, ctypes.c_void_p
    fn = k.function("dsq_hashed_linear", [i64, i64, vp, i64, i64, vp, vp, i64, vp, i64, i64])
    b, x, y = torch.randn(7), torch.randn(2, 5), torch.empty(2, 3)
    ok = (3, 5, b.data_ptr(), 7, 3, None, x.data_ptr(), 10, y.data_ptr(), 6, 2)
    assert fn(*ok) == 0
    torch.testing.assert_close(y, x @ HashedLinear(5, 3, 7, 3).index()[1].float().mul(
        b[HashedLinear(5, 3, 7, 3).index()[0]]).T)
    for pos, bad, rc in ((1, 0, K.DSQ_EINVAL), (3, 0, K.DSQ_EINVAL), (2, None, K.DSQ_EINVAL),
                         (4, 2**32, K.DSQ_EINVAL), (7, 9, K.DSQ_ESIZE), (9, 5, K.DSQ_ESIZE),
                         (10, -1, K.DSQ_EINVAL), (10, 2**62, K.DSQ_ESIZE),
                         (3, MAX_BUCKETS + 1, K.DSQ_EINVAL)):
        args = list(ok)
        args[pos] = bad
        assert fn(*args) == rc, (pos, bad)
    dens = k.function("dsq_hashed_densify", [i64, i64, vp, i64, i64, vp, i64])
    out = torch.empty(3, 5)
    assert dens(3, 5, b.data_ptr(), 7, 3, out.data_ptr(), 14) == K.DSQ_ESIZE
    assert dens(3, 5, b.data_ptr(), 7, 3, None, 15) == K.DSQ_EINVAL
    assert dens(3, 5, b.data_ptr(), 7, 3, out.data_ptr(), 15) == 0


# ------------------------------------------------------------------------------ hostile files


def _forge(path: Path, change: Any) -> bytes:
    f = parse_dsq(path.read_bytes())
    meta = copy.deepcopy(f.meta)
    change(meta)
    return dsq_bytes(meta, f.sections)


def _config(name: str) -> Any:
    return lambda m: m["modules"][name]["config"]


@pytest.mark.parametrize("change, message", [
    (lambda m: _config("fc1")(m).update(check=12345), "checksum"),
    (lambda m: _config("fc1")(m).update(seed=7), "checksum"),
    (lambda m: _config("fc1")(m).update(buckets=29401), "checksum|fit"),
    (lambda m: _config("fc1")(m).update(buckets=0), "buckets"),
    (lambda m: _config("fc1")(m).update(buckets=2**40), "buckets"),
    (lambda m: _config("fc1")(m).update(seed=-1), "seed"),
    (lambda m: _config("fc1")(m).update(check="x"), "check"),
    (lambda m: _config("fc1")(m).update(in_features=1 << 24, out_features=1 << 24,
                                        check=None), "virtual weights"),
    (lambda m: _config("fc3")(m).update(out_features=500), "fit|stored"),
    (lambda m: _config("fc3")(m).update(seed=2**33), "seed"),
    (lambda m: _config("fc1")(m).pop("check"), "options must be exactly"),
])
def test_forged_hashed_options_are_refused(tmp_path: Path, change: Any, message: str) -> None:
    path = tmp_path / "h.dsq"
    dsq.save(_converted(), path)
    data = _forge(path, change)
    for load in (dsq.load, lambda d: load_runtime(d, autotune=False)):
        with pytest.raises(DsqFormatError, match=message):
            load(data)


def test_forged_bucket_tensor_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "h.dsq"
    dsq.save(_converted(), path)

    def shrink(meta: dict[str, Any]) -> None:
        for entry in meta["tensors"]:
            if entry["name"] == "fc1.weight_buckets":
                entry["shape"] = [29399]

    try:
        data = _forge(path, shrink)
    except DsqFormatError:
        return  # the container itself refuses the inconsistent entry
    for load in (dsq.load, lambda d: load_runtime(d, autotune=False)):
        with pytest.raises(DsqFormatError):
            load(data)


# ------------------------------------------------------------------------------ sanitizer

_ASAN = r'''
import sys, torch
from deepsqueeze import dsq
from deepsqueeze.runtime import load_runtime
from deepsqueeze.runtime.kernel import get_kernel
k = get_kernel()
assert k is not None and k.sanitized
path = sys.argv[1]
dense = dsq.load(path)
for n in (1, 3, 17):
    x = torch.randn(n, 1, 28, 28)
    for impl in ("kernel", "densify"):
        rt = load_runtime(path, autotune=False, fuse=False, impls={"fc1": impl, "fc2": impl})
        assert (rt(x) - dense(x)).abs().max() < 1e-4
print("SANITIZED-OK", flush=True)
'''


def _asan_usable() -> bool:
    cc = os.environ.get("CC") or "cc"
    if K.sanitizer_runtime() is None:
        return False
    probe = subprocess.run([cc, "-fsanitize=address,undefined", "-x", "c", "-shared", "-fPIC",
                            "-o", os.devnull, "-"], input=b"int f(void){return 0;}",
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _asan_usable(), reason="the C compiler has no libasan")
def test_hashed_kernel_is_clean_under_asan(tmp_path: Path) -> None:
    path = tmp_path / "h.dsq"
    dsq.save(_converted(), path)
    env = K.sanitizer_env()
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
               DEEPSQUEEZE_AUTOTUNE_CACHE=str(tmp_path / "tune.json"),
               PYTHONPATH=os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _ASAN, str(path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SANITIZED-OK" in proc.stdout
    assert "AddressSanitizer" not in proc.stderr and "runtime error" not in proc.stderr


# ------------------------------------------------------------------------------ recipes


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["hashed-lenet300", "circulant-lenet300"])
def test_shipped_recipes_compress_and_evaluate(tmp_path: Path, recipe: str) -> None:
    import deepsqueeze
    from deepsqueeze.pipeline import load_recipe

    from .conftest import have_mnist

    if not have_mnist():
        pytest.skip("MNIST not found")
    shipped = load_recipe(REPO / "recipes" / f"{recipe}.yaml")
    for stage in shipped.stages:
        assert stage.finetune is not None
        stage.finetune.epochs = 0.05  # the shipped schedule, shortened: the path, not accuracy
    torch.manual_seed(0)
    model = models.create("lenet300")
    result = deepsqueeze.compress(model, shipped, subset=2000, progress=False,
                                  out=tmp_path / "m.dsq")
    kinds = {type(m).__name__ for m in result.model.modules()}
    assert ("HashedLinear" if recipe.startswith("hashed") else "CirculantLinear") in kinds
    report = deepsqueeze.evaluate(tmp_path / "m.dsq", "mnist", measure_speed=False)
    assert report.top1_accuracy == pytest.approx(result.file_accuracy, abs=1e-9)
    assert result.file_report.compression > 7
