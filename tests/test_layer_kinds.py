"""Compressed layer kinds: recorded in the .dsq manifest, rebuilt on load (zoo model, user graph,
user skeleton), run by a registered runtime reader + executor; forged kind entries refused."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepsqueeze import dsq, models
from deepsqueeze.codec.container import dsq_bytes, parse_dsq
from deepsqueeze.errors import DsqFormatError, ModelError
from deepsqueeze.methods.pruning import magnitude_mask, set_mask
from deepsqueeze.models import graph as G
from deepsqueeze.runtime import load_runtime
from deepsqueeze.runtime.forms import LayerForm, register_layer_form
from deepsqueeze.runtime.layers import Impl, RuntimeLayer, register_impl


class TwoFactorLinear(nn.Module):
    """A test kind with plain Linear children (like a low-rank layer)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.second.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


class ScaledSignLinear(nn.Module):
    """A test kind with tensors of its own (±1 weight + per-row scale), read by the runtime."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.ones(out_features, in_features))
        self.weight_scale = nn.Parameter(torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.weight_scale[:, None], self.bias)


_DIM = G.int_option(1, 1 << 20)
G.register_kind("TestTwoFactorLinear", TwoFactorLinear,
                {"in_features": _DIM, "out_features": _DIM, "rank": _DIM, "bias": G.bool_option})
G.register_kind("TestScaledSignLinear", ScaledSignLinear,
                {"in_features": _DIM, "out_features": _DIM, "bias": G.bool_option})


class SignExecutor(RuntimeLayer):
    """Holds the signs as int8 and the scale: a different form than the dense module."""

    def __init__(self, form: dict[str, torch.Tensor], bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("signs", form["signs"], persistent=False)
        self.register_buffer("scale", form["scale"], persistent=False)
        self.register_buffer("b", bias, persistent=False)
        self.cols = form["signs"].shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_input(x, self.cols)
        return F.linear(x, self.signs.float(), None) * self.scale + (
            0 if self.b is None else self.b)


def _read_sign(name: str, module: nn.Module, stored: Any) -> LayerForm | None:
    w = stored.decode(f"{name}.weight")
    scale = stored.decode(f"{name}.weight_scale")
    if not bool(((w == 1) | (w == -1)).all()):
        raise DsqFormatError(f"{name}: signs must be ±1")
    bias = stored.decode(f"{name}.bias") if f"{name}.bias" in stored.entries else None
    tensors = [f"{name}.weight", f"{name}.weight_scale"] + (
        [f"{name}.bias"] if bias is not None else [])
    return LayerForm({"signs": w.to(torch.int8), "scale": scale}, bias, tensors,
                     list(w.shape), "signs", w.numel(), 1.0)


register_layer_form(ScaledSignLinear, _read_sign)
register_impl(ScaledSignLinear, Impl("test-sign", lambda f, b, m: SignExecutor(f, b),
                                     lambda f, m: True, True))


def _kinds_lenet300(rank: int = 20) -> nn.Module:
    torch.manual_seed(0)
    model = models.create("lenet300")
    old = model.fc1
    low = TwoFactorLinear(784, 300, rank)
    u, s, vh = torch.linalg.svd(old.weight.detach(), full_matrices=False)
    with torch.no_grad():
        low.first.weight.copy_(vh[:rank] * s[:rank, None])
        low.second.weight.copy_(u[:, :rank])
        low.second.bias.copy_(old.bias)
    model.fc1 = low
    sign = ScaledSignLinear(300, 100)
    with torch.no_grad():
        sign.weight.copy_(torch.sign(model.fc2.weight) + (model.fc2.weight == 0).float())
        sign.weight_scale.copy_(model.fc2.weight.abs().mean(1))
        sign.bias.copy_(model.fc2.bias)
    model.fc2 = sign
    return model.eval()


def test_kinds_are_recorded_and_rebuilt_on_the_zoo_model(tmp_path: Path) -> None:
    model = _kinds_lenet300()
    path = tmp_path / "k.dsq"
    dsq.save(model, path)
    meta = parse_dsq(path.read_bytes()).meta
    assert meta["modules"] == {
        "fc1": {"type": "TestTwoFactorLinear",
                "config": {"in_features": 784, "out_features": 300, "rank": 20, "bias": True}},
        "fc2": {"type": "TestScaledSignLinear",
                "config": {"in_features": 300, "out_features": 100, "bias": True}},
    }
    x = torch.randn(5, 1, 28, 28)
    loaded = dsq.load(path)
    assert isinstance(loaded.fc1, TwoFactorLinear) and isinstance(loaded.fc2, ScaledSignLinear)
    torch.testing.assert_close(loaded(x), model(x))
    # the ±1 weight costs ~1 bit per weight in the file (2-entry codebook, packed)
    report = dsq.inspect(path)
    row = next(r for r in report.layers if r.layer == "fc2")
    assert row.bytes <= 300 * 100 / 8 + 64 + 2 * 100 * 4  # + scale and bias
    # a kind's row stands for the dense layer it replaces: its ratio is the layer's
    low = next(r for r in report.layers if r.layer == "fc1")
    assert (low.encoding, low.weights, low.dense_bytes) == (
        "TestTwoFactorLinear", 784 * 300 + 300, (784 * 300 + 300) * 4)
    assert low.bytes == (20 * 784 + 300 * 20 + 300) * 4 and low.compression > 9
    assert {r.layer for r in report.layers} == {"fc1", "fc2", "fc3"}


def test_kinds_in_the_runtime_use_the_registered_reader_and_executor(tmp_path: Path) -> None:
    model = _kinds_lenet300()
    for factor in (model.fc1.first, model.fc1.second):  # plain Linear children: pruning composes
        set_mask(factor, magnitude_mask(factor.weight.detach(), 0.9))
    path = tmp_path / "k.dsq"
    dsq.save(model, path)
    rt = load_runtime(path, autotune=False)
    assert isinstance(rt.fc2, SignExecutor)
    info = rt.deepsqueeze_runtime
    assert {c.layer for c in info.layers} >= {"fc1.first", "fc1.second", "fc2"}
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(rt(x), dsq.load(path)(x), rtol=1e-4, atol=1e-5)


class UserNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_kinds_in_a_user_model_load_from_the_graph_and_into_the_skeleton(tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = UserNet().eval()
    net.body[1] = TwoFactorLinear(64, 32, 8)
    net.head = ScaledSignLinear(32, 4)
    x = torch.randn(6, 4, 16)
    path = tmp_path / "u.dsq"
    dsq.save(net, path, example_inputs=x)
    stored = dsq.read_model_file(path)
    assert stored.user is not None and stored.user.graph is not None
    assert stored.user.graph["modules"]["head"]["type"] == "TestScaledSignLinear"
    torch.testing.assert_close(dsq.load(path)(x), net(x))
    # into the user's own (dense) architecture: the kinds replace its layers
    filled = dsq.load(path, model=UserNet())
    assert isinstance(filled.body[1], TwoFactorLinear)
    torch.testing.assert_close(filled(x), net(x))
    torch.testing.assert_close(load_runtime(path, autotune=False)(x), net(x))


def test_kinds_of_a_user_model_without_recorded_inputs_still_get_executors(
        tmp_path: Path) -> None:
    net = nn.Sequential(nn.Linear(16, 8), ScaledSignLinear(8, 4)).eval()
    path = tmp_path / "seq.dsq"
    dsq.save(net, path)  # no example inputs: shapes come from the layers' in_features
    rt = load_runtime(path, model=nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4)),
                      autotune=False)
    assert {c.layer: c.impl for c in rt.deepsqueeze_runtime.layers}["1"] == "test-sign"
    x = torch.randn(3, 16)
    torch.testing.assert_close(rt(x), net(x), rtol=1e-4, atol=1e-5)


def _forge(path: Path, change: Any) -> bytes:
    f = parse_dsq(path.read_bytes())
    meta = copy.deepcopy(f.meta)
    change(meta)
    return dsq_bytes(meta, f.sections)


@pytest.mark.parametrize("change, message", [
    (lambda m: m["modules"]["fc1"].update(type="Linear"), "not a compressed layer kind"),
    (lambda m: m["modules"]["fc1"].update(type="os.system"), "not a compressed layer kind"),
    (lambda m: m["modules"]["fc1"]["config"].update(rank=0), "rank"),
    (lambda m: m["modules"]["fc1"]["config"].update(rank=10**12), "rank"),
    (lambda m: m["modules"]["fc1"]["config"].pop("bias"), "options must be exactly"),
    (lambda m: m["modules"]["fc1"]["config"].update(rank=19), "does not fit"),
    (lambda m: m["modules"].update({"nothere": m["modules"]["fc1"]}), "not a module"),
    (lambda m: m["modules"].update({"fc1..x": m["modules"]["fc1"]}), "module name"),
    (lambda m: m.update(modules=[1, 2]), "'modules'"),
    (lambda m: m["modules"].pop("fc2"), "tensors do not fit"),
])
def test_forged_kind_entries_are_refused(tmp_path: Path, change: Any, message: str) -> None:
    path = tmp_path / "k.dsq"
    dsq.save(_kinds_lenet300(), path)
    data = _forge(path, change)
    for load in (dsq.load, lambda d: load_runtime(d, autotune=False)):
        with pytest.raises(DsqFormatError, match=message):
            load(data)


def test_a_kind_inside_a_kind_is_refused_at_save(tmp_path: Path) -> None:
    outer = TwoFactorLinear(8, 8, 2)
    outer.first = TwoFactorLinear(8, 2, 1)  # type: ignore[assignment]
    with pytest.raises(ModelError, match="inside the layer kind"):
        dsq.save(nn.Sequential(outer), tmp_path / "n.dsq")


def test_registering_another_class_under_a_kind_name_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        G.register_kind("TestTwoFactorLinear", UserNet, {})
    with pytest.raises(ValueError, match="already registered"):
        G.register_kind("Linear", TwoFactorLinear, {})


def test_macs_count_a_kind_as_its_dense_layer_and_factors_as_themselves() -> None:
    from deepsqueeze.metrics.macs import macs_per_sample

    model = _kinds_lenet300()
    assert macs_per_sample(model, (1, 28, 28)) == 784 * 20 + 20 * 300 + 300 * 100 + 100 * 10


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 16)
        self.bn = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.bn(self.fc(torch.flatten(self.conv(x), 1))))


def test_runtime_with_a_skeleton_left_in_train_mode_still_runs_compressed(
        tmp_path: Path) -> None:
    torch.manual_seed(2)
    net = BNNet().eval()
    for layer in (net.conv, net.fc):
        set_mask(layer, magnitude_mask(layer.weight.detach(), 0.8))
    path = tmp_path / "bn.dsq"
    dsq.save(net, path, example_inputs=torch.randn(4, 1, 8, 8))  # inputs recorded: shape pass
    rt = load_runtime(path, model=BNNet().train(), autotune=False)  # BatchNorm in train mode
    assert {"conv", "fc"} <= {c.layer for c in rt.deepsqueeze_runtime.layers}
    x = torch.randn(1, 1, 8, 8)
    torch.testing.assert_close(rt(x), dsq.load(path, model=BNNet())(x), rtol=1e-4, atol=1e-5)
