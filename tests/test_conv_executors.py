"""Conv2d executors (issue 15): sparse direct and codebook conv in C, Winograd, FFT, im2col.

Every executor equals ``F.conv2d`` on random shapes, strides, paddings, groups and dilations it
claims (and refuses the others, saying why); fused ReLU / max-pool and a folded BatchNorm give
the unfused answer; inputs are checked before any C call and the C entry point checks its
arguments; threads give the one-thread answer; the sanitizer build runs clean.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from deepsqueeze.dsq import load, save
from deepsqueeze.errors import DsqFormatError, RuntimeInputError
from deepsqueeze.runtime import autotune as at
from deepsqueeze.runtime import kernel as K
from deepsqueeze.runtime import load_runtime, runtime_info
from deepsqueeze.runtime.executors import conv as C
from deepsqueeze.runtime.forms import from_coords, from_dense
from deepsqueeze.runtime.fuse import batchnorm_affine, max_pool_size, trace
from deepsqueeze.runtime.layers import IMPLS, ConvGeometry, candidates

REPO = Path(__file__).resolve().parents[1]
needs_kernel = pytest.mark.skipif(K.get_kernel() is None, reason="no C compiler for the kernel")
NAMES = list(C._BUILDERS)


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(at.ENV_CACHE, str(tmp_path / "autotune.json"))


def _conv(cin: int, cout: int, k: tuple[int, int], *, stride=1, padding=0, dilation=1,
          groups=1, bias=True, density=0.5, bits: int | None = None, seed: int = 0) -> nn.Conv2d:
    """A Conv2d with a pruned (and, with ``bits``, codebook-shared) weight."""
    g = torch.Generator().manual_seed(seed)
    m = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation,
                  groups=groups, bias=bias)
    w = torch.randn(m.weight.shape, generator=g)
    w = w * (torch.rand(w.shape, generator=g) < density)
    if bits is not None:
        cb = torch.randn(2 ** bits, generator=g)
        w = torch.where(w != 0, cb[torch.randint(0, 2 ** bits, w.shape, generator=g)], 0.0)
    with torch.no_grad():
        m.weight.copy_(w)
        if bias:
            m.bias.copy_(torch.randn(cout, generator=g))
    return m.eval()


def _build(name: str, m: nn.Conv2d):
    form = from_dense(m.weight)
    impl = next(i for i in IMPLS[nn.Conv2d] if i.name == name)
    ex = impl.build(form, None if m.bias is None else m.bias.detach().clone(), m).eval()
    ex.impl, ex.layer = name, "conv"
    return ex


def _close(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-4 * scale)


# ------------------------------------------------------------------ equal to F.conv2d


@st.composite
def geometries(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    if draw(st.booleans()):
        kh = kw = draw(st.sampled_from([3, 5]))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    if draw(st.booleans()):
        stride = (1, 1)
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    span_h, span_w = dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1
    h = draw(st.integers(max(1, span_h - 2 * padding[0]), span_h + 9))
    w = draw(st.integers(max(1, span_w - 2 * padding[1]), span_w + 9))
    return dict(cin=cin, cout=cout, k=(kh, kw), stride=stride, padding=padding,
                dilation=dilation, groups=groups, h=h, w=w,
                n=draw(st.sampled_from([1, 2, 9])), bits=draw(st.sampled_from([None, 1, 3, 8])),
                density=draw(st.sampled_from([0.1, 0.5, 1.0])), bias=draw(st.booleans()),
                seed=draw(st.integers(0, 1000)))


@settings(max_examples=45, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(geometries())
def test_every_executor_equals_conv2d_or_refuses(g):
    m = _conv(g["cin"], g["cout"], g["k"], stride=g["stride"], padding=g["padding"],
              dilation=g["dilation"], groups=g["groups"], bias=g["bias"],
              density=g["density"], bits=g["bits"], seed=g["seed"])
    x = torch.randn(g["n"], g["cin"], g["h"], g["w"], generator=torch.Generator().manual_seed(1))
    ref = F.conv2d(x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
    form = from_dense(m.weight)
    accepted = {i.name for i in candidates(form, m)}
    for name in NAMES:
        why = C.refusal(name, form, m)
        assert (why is None) == (name in accepted), (name, why)
        if why is not None:
            continue
        ex = _build(name, m)
        with torch.inference_mode():
            _close(ex(x), ref, scale=g["cin"])
            _close(ex(x[0]), ref[0], scale=g["cin"])  # unbatched
            assert ex(x[:0]).shape == (0, *ref.shape[1:])


@needs_kernel
def test_the_c_executors_are_accepted_everywhere_the_torch_ones_are():
    m = _conv(4, 6, (3, 3), stride=(2, 1), padding=(1, 2), dilation=(2, 1), groups=2, bits=3)
    names = {i.name for i in candidates(from_dense(m.weight), m)}
    assert {"sparse-os", "codebook", "im2col"} <= names
    assert not names & {"winograd2", "winograd4", "fft"}


@pytest.mark.parametrize("m_tile", [2, 4])
@pytest.mark.parametrize(("cin", "cout", "groups", "padding", "hw"), [
    (3, 8, 1, 1, (9, 13)), (4, 6, 2, 0, (8, 8)), (6, 6, 3, 2, (5, 7)), (16, 16, 1, 1, (16, 16)),
])
def test_winograd_equals_conv2d(m_tile, cin, cout, groups, padding, hw):
    m = _conv(cin, cout, (3, 3), padding=padding, groups=groups, density=0.7)
    x = torch.randn(3, cin, *hw)
    ex = _build(f"winograd{m_tile}", m)
    _close(ex(x), m(x), scale=cin)


@pytest.mark.parametrize(("k", "stride", "dilation", "groups"), [
    (5, 1, 1, 1), (7, 2, 1, 1), (5, 1, 2, 2), (11, 3, 1, 1), ((5, 7), (1, 2), (2, 1), 1),
])
def test_fft_equals_conv2d_for_large_kernels(k, stride, dilation, groups):
    m = _conv(2 * groups, 3 * groups, k, stride=stride, padding=2, dilation=dilation,
              groups=groups)
    x = torch.randn(2, 2 * groups, 30, 27)
    ex = _build("fft", m)
    _close(ex(x), m(x), scale=10)
    _close(ex(x[:, :, :24]), m(x[:, :, :24]), scale=10)  # another size: another spectrum


# ------------------------------------------------------------------------- refusals


def test_refusals_say_why():
    form3 = from_dense(_conv(2, 2, 3).weight)
    assert "3x3" in C.refusal("winograd2", from_dense(_conv(2, 2, 5).weight), _conv(2, 2, 5))
    assert "stride" in C.refusal("winograd4", form3, _conv(2, 2, 3, stride=2))
    assert "dilation" in C.refusal("winograd4", form3, _conv(2, 2, 3, dilation=2))
    assert "5x5" in C.refusal("fft", form3, _conv(2, 2, 3))
    assert "5x5" in C.refusal("fft", from_dense(_conv(2, 2, (3, 7)).weight), _conv(2, 2, (3, 7)))
    unshared = from_dense(torch.randn(2, 2, 3, 3))
    assert "codebook" in C.refusal("codebook", unshared, _conv(2, 2, 3))
    rows, cols = 4, 18
    row = np.repeat(np.arange(rows), cols)
    col = np.tile(np.arange(cols), rows)
    wide = from_coords(rows, cols, row, col, symbols=np.arange(rows * cols) % 300,
                       codebook=np.linspace(-1, 1, 300), encoding="sparse-codebook")
    assert "300 centroids" in C.refusal("codebook", wide, _conv(2, 4, 3))
    reflect = nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")
    same = nn.Conv2d(2, 2, 3, padding="same")
    for name in NAMES:
        assert "padding_mode" in C.refusal(name, form3, reflect)
        assert "numeric padding" in C.refusal(name, form3, same)
        assert "compressed matrix" in C.refusal(name, object(), _conv(2, 2, 3))
        assert not any(i.name == name for i in candidates(form3, reflect))


def test_a_form_that_does_not_fit_the_geometry_is_refused():
    m = _conv(2, 4, 3)
    wrong = from_dense(torch.randn(4, 2, 5, 5))
    for name in NAMES:
        if name in ("sparse-os", "codebook") and K.get_kernel() is None:
            continue
        with pytest.raises(DsqFormatError, match="does not fit"):
            next(i for i in IMPLS[nn.Conv2d] if i.name == name).build(wrong, None, m)


# --------------------------------------------------------------------- input checks


@pytest.mark.parametrize("name", NAMES)
def test_inputs_are_checked_before_running(name):
    if name in ("sparse-os", "codebook") and K.get_kernel() is None:
        pytest.skip("no C kernel")
    k = 3 if name.startswith("winograd") else 5
    ex = _build(name, _conv(3, 4, k, bits=3))
    bad = [torch.zeros(1, 2, 9, 9), torch.zeros(9, 9), torch.zeros(1, 3, k - 1, 9),
           torch.zeros(1, 3, 9, 9, dtype=torch.int32), torch.zeros(1, 3, 9, 9, dtype=torch.bool),
           "not a tensor", torch.zeros(1, 3, 9, 9).to_sparse(), torch.zeros(2, 1, 3, 9, 9)]
    for x in bad:
        with pytest.raises(RuntimeInputError, match=r"layer 'conv'"):
            ex(x)
    x = torch.randn(2, 3, 11, 12)
    ref = ex(x)
    _close(ex(x.double()), ref)  # floating dtypes are computed in fp32
    _close(ex(x.transpose(2, 3).contiguous().transpose(2, 3)), ref)  # non-contiguous
    ex.set_pool(4)
    with pytest.raises(RuntimeInputError, match="max-pool"):
        ex(torch.zeros(1, 3, k + 1, 20))
    assert ex(torch.zeros(0, 3, 20, 20)).shape == (0, 4, (21 - k) // 4, (21 - k) // 4)


@needs_kernel
def test_the_c_entry_point_checks_its_arguments():
    m = _conv(3, 4, 3, bits=3)
    ex = _build("sparse-os", m)
    fn = ex._fn
    x, y = torch.randn(2, 3, 8, 8), torch.full((2, 4, 6, 6), 7.0)
    good = [3, 8, 8, 3, 3, 1, 1, 0, 0, 1, 1, 6, 6, 1, 1, 0, 1, 0]

    def call(g=good, ng=18, xn=x.numel(), yn=y.numel(), n=2, addr=None, scale=None, ns=0):
        vec = torch.tensor(g, dtype=torch.int64)
        return fn(addr if addr is not None else ex._addr, vec.data_ptr(), ng, scale, ns,
                  x.data_ptr(), xn, y.data_ptr(), yn, n)

    assert call() == K.DSQ_OK
    _close(y, m(x))
    y.fill_(7.0)
    def g_with(i: int, *values: int) -> list[int]:
        return [*good[:i], *values, *good[i + len(values):]]

    cases = {
        K.DSQ_EINVAL: [dict(ng=13), dict(n=-1), dict(ns=4), dict(g=g_with(16, 0, 0)),
                       dict(g=g_with(16, 1, 2)), dict(g=g_with(16, 99, 0))],
        K.DSQ_ESIZE: [dict(xn=x.numel() - 1), dict(yn=y.numel() + 1), dict(n=3),
                      dict(scale=torch.ones(3).data_ptr(), ns=3)],
        K.DSQ_EGEOMETRY: [dict(g=g_with(0, 4)), dict(g=g_with(11, 5, 6)), dict(g=g_with(5, 0)),
                          dict(g=g_with(13, 2)), dict(g=g_with(14, 7)), dict(g=g_with(3, 5)),
                          dict(g=g_with(7, -1))],
        K.DSQ_EUNCHECKED: [dict(addr=ctypes.addressof(K.DsqLayer()))],
    }
    for rc, calls in cases.items():
        for kw in calls:
            assert call(**kw) == rc, kw
    assert bool((y == 7.0).all())  # nothing written by a refused call
    assert fn(None, None, 18, None, 0, None, 0, None, 0, 0) == K.DSQ_EINVAL
    f32 = _build("sparse-os", _conv(3, 4, 3))  # fp32 values: the codebook variant refuses
    vec = torch.tensor(g_with(17, 1), dtype=torch.int64)
    assert fn(f32._addr, vec.data_ptr(), 18, None, 0, x.data_ptr(), x.numel(), y.data_ptr(),
              y.numel(), 2) == K.DSQ_EINVAL


@needs_kernel
@pytest.mark.parametrize("name", ["sparse-os", "codebook"])
@pytest.mark.parametrize("groups", [1, 2])
def test_long_gaps_and_filler_entries_land_on_the_right_inputs(name, groups):
    """Rows whose kept weights are hundreds of columns apart (gaps of 255+ are stored with
    filler entries) read the right channel and tap: the per-call column table."""
    m = nn.Conv2d(64 * groups, 4 * groups, 3, padding=1, groups=groups)
    with torch.no_grad():
        w = torch.zeros_like(m.weight)
        cols = w[0].numel()  # 576 per output channel
        flat = w.view(w.shape[0], cols)
        for o in range(flat.shape[0]):
            for c in (o % 3, 300 + o, cols - 1 - o):  # gaps of ~300 and ~270 columns
                flat[o, c] = (-1.0) ** (o + c) * (0.5 + 0.25 * (c % 4))
        m.weight.copy_(w)
    x = torch.randn(3, 64 * groups, 6, 7, generator=torch.Generator().manual_seed(2))
    ref = F.conv2d(x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
    ex = _build(name, m)
    with torch.inference_mode():
        _close(ex(x), ref)
        _close(ex(x[:1]), ref[:1])


@needs_kernel
def test_kernel_threads_share_torchs_openmp_pool():
    """Built with OpenMP, the library runs on the libgomp torch has loaded (one pool, no second
    set of threads spinning against torch's), not on a copy of its own."""
    maps = Path("/proc/self/maps")
    if not maps.exists() or "libgomp" not in maps.read_text():
        pytest.skip("this torch build does not use libgomp")
    if K.get_kernel().function("dsq_conv_openmp", [])() == 0:
        pytest.skip("the C compiler has no OpenMP: the kernels use pthreads")
    mapped = {line.split()[-1] for line in maps.read_text().splitlines() if "libgomp" in line}
    assert len(mapped) == 1, mapped


@needs_kernel
@pytest.mark.parametrize("name", ["sparse-os", "codebook"])
def test_two_threads_give_the_one_thread_answer(name):
    m = _conv(16, 24, 3, padding=1, bits=4, density=0.4)
    x = torch.randn(37, 16, 14, 14)
    ex = _build(name, m)
    one = ex(x)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = ex(x)
        two_small = ex(x[:1])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    assert torch.equal(one[:1], two_small)
    _close(one, m(x), scale=16)


# ------------------------------------------------------------------ fusion and folding


@pytest.mark.parametrize("name", NAMES)
def test_fused_relu_pool_and_folded_batchnorm(name):
    if name in ("sparse-os", "codebook") and K.get_kernel() is None:
        pytest.skip("no C kernel")
    k = 3 if name.startswith("winograd") else 5
    m = _conv(3, 6, k, padding=1, bits=4, bias=name != "fft")
    bn = nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(-1.5, 1.5)  # negative scales too
        bn.bias.uniform_(-1, 1)
    x = torch.randn(3, 3, 15, 14)
    ex = _build(name, m)
    scale, shift = batchnorm_affine(bn)
    ex.fold_affine(scale, shift)
    _close(ex(x), bn(m(x)), scale=5)
    ex.set_relu(True)
    ex.set_pool(2)
    _close(ex(x), F.max_pool2d(F.relu(bn(m(x))), 2), scale=5)
    ex.fold_affine(torch.full((6,), 2.0), torch.zeros(6))  # folds compose
    _close(ex(x), 2 * F.max_pool2d(F.relu(bn(m(x))), 2), scale=10)
    with pytest.raises(ValueError, match="channels"):
        ex.fold_affine(torch.ones(5), torch.zeros(5))
    with pytest.raises(ValueError, match="NaN"):
        ex.fold_affine(torch.full((6,), float("nan")), torch.zeros(6))


def test_max_pool_detection():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mp = nn.MaxPool2d(3)
            self.mp_pad = nn.MaxPool2d(2, padding=1)

        def forward(self, x):
            a = F.max_pool2d(x, 2)
            b = F.max_pool2d(x, (2, 2), stride=2)
            c = F.max_pool2d(x, 2, 1)
            d = F.max_pool2d(x, 2, ceil_mode=True)
            e = torch.max_pool2d(x, [2, 2])
            return a, b, c, d, e, self.mp(x), self.mp_pad(x), F.avg_pool2d(x, 2)

    gm = trace(Net())
    sizes = [max_pool_size(n, gm) for n in gm.graph.nodes if n.op in ("call_function",
                                                                        "call_module")]
    assert sizes == [2, 2, None, None, 2, 3, None, None]


class ConvBnNet(nn.Module):
    """conv → BN → ReLU → pool, conv → pool → ReLU (no BN), a residual, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 5, padding=2)
        self.conv3 = nn.Conv2d(12, 12, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12 * 7 * 7, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = F.relu(self.bn3(self.conv3(x)) + x)
        return self.fc(torch.flatten(x, 1))


@pytest.fixture(scope="module")
def convbn_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = ConvBnNet().eval()
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, nn.Conv2d):
                mod.weight.mul_(torch.rand_like(mod.weight) < 0.4)
                mod.weight.copy_(torch.round(mod.weight * 8) / 8)  # a few values: a codebook
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.3, 0.3)
    path = tmp_path_factory.mktemp("convbn") / "convbn.dsq"
    save(net, path, example_inputs=(torch.zeros(1, 1, 28, 28),))
    return path


@pytest.mark.parametrize("impl", ["sparse-os", "codebook", "im2col", "dense", "kernel", None])
def test_runtime_folds_and_fuses(convbn_file, impl):
    if impl in ("sparse-os", "codebook", "kernel") and K.get_kernel() is None:
        pytest.skip("no C kernel")
    dense = load(convbn_file)
    probe = runtime_info(load_runtime(convbn_file, autotune=False, fuse=False))
    layers = [c.layer for c in probe.layers if c.layer.startswith("conv")
              and impl in (None, *c.held_bytes)]
    forced = {n: impl for n in layers} if impl else None
    rt = load_runtime(convbn_file, autotune=impl is None, impls=forced, rounds=3)
    x = torch.randn(5, 1, 28, 28)
    with torch.inference_mode():
        _close(rt(x), dense(x), scale=10)
        _close(rt(x[:1]), dense(x[:1]), scale=10)
    if impl in ("sparse-os", "codebook", "im2col") and K.get_kernel() is not None:
        assert layers == ["conv1", "conv2", "conv3"]
        kinds = [n.op + ":" + str(n.target) for n in rt.graph.nodes]
        assert not any("bn" in k or "pool" in k for k in kinds), kinds
        assert rt.conv1.relu and rt.conv1.pool == 2 and rt.conv2.pool == 2 and rt.conv2.relu
        assert not rt.conv3.relu  # the ReLU follows the residual add
        if impl != "im2col":
            assert rt.conv3.scale is not None


# ------------------------------------------------------------------------ sanitizers


def _asan_usable() -> bool:
    cc = K._compiler()
    if K.sanitizer_runtime() is None or cc is None:
        return False
    probe = subprocess.run([cc, "-fsanitize=address,undefined", "-x", "c", "-shared", "-fPIC",
                            "-o", os.devnull, "-"], input=b"int f(void){return 0;}",
                           capture_output=True)
    return probe.returncode == 0


_ASAN_SCRIPT = r"""
import torch, torch.nn.functional as F
from torch import nn
from deepsqueeze.errors import RuntimeInputError
from deepsqueeze.runtime.kernel import get_kernel
from deepsqueeze.runtime.forms import from_dense
from deepsqueeze.runtime.executors.conv import SparseConv2d
from deepsqueeze.runtime.layers import ConvGeometry
assert get_kernel() is not None and get_kernel().sanitized
g = torch.Generator().manual_seed(0)
runs = 0
for threads in (1, 2):
    torch.set_num_threads(threads)
    for cin, cout, k, s, p, d, grp, hw, n in [
            (3, 4, 3, 1, 1, 1, 1, 9, 1), (4, 6, 5, 2, 2, 1, 2, 13, 3),
            (2, 2, (3, 1), (1, 3), (0, 2), (2, 1), 1, 8, 9), (16, 16, 3, 1, 1, 1, 1, 12, 12),
            (6, 3, 1, 3, 0, 1, 3, 7, 17)]:
        m = nn.Conv2d(cin, cout, k, s, p, d, grp)
        w = torch.where(torch.rand(m.weight.shape, generator=g) < 0.5,
                        torch.randint(-3, 4, m.weight.shape, generator=g).float(), 0.0)
        m.weight.data.copy_(w)
        form = from_dense(m.weight)
        for cb in (False, True) if form.codebook is not None else (False,):
            ex = SparseConv2d(form, m.bias.data, ConvGeometry.of(m), codebook=cb)
            for pool in (1, 2):
                ex.set_pool(pool)
                x = torch.randn(n, cin, hw, hw + 1, generator=g)
                ref = m(x) if pool == 1 else F.max_pool2d(m(x), 2)
                try:
                    out = ex(x)
                except RuntimeInputError:
                    assert pool == 2
                    continue
                assert (out - ref).abs().max() < 1e-3
                runs += 1
                for bad in (x[:, :cin - 1], x[..., :0, :]):
                    try:
                        ex(bad)
                    except RuntimeInputError:
                        pass
                    else:
                        raise AssertionError("accepted a bad input")
print("SANITIZED-OK", runs, flush=True)
"""


@pytest.mark.skipif(not _asan_usable(), reason="the C compiler has no libasan")
def test_sanitizer_build_runs_clean(tmp_path):
    env = K.sanitizer_env()  # the user's kernel cache: the sanitizer build is verified, reused
    env["OMP_NUM_THREADS"] = "1"
    env["TMPDIR"] = str(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _ASAN_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SANITIZED-OK" in proc.stdout
    assert "AddressSanitizer" not in proc.stderr and "runtime error" not in proc.stderr


def test_geometry_of_string_padding_is_refused():
    with pytest.raises(ValueError, match="string padding"):
        ConvGeometry.of(nn.Conv2d(2, 2, 3, padding="same"))
