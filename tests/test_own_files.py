"""Files that stand alone (issue 10): a user's own nn.Module saved to .dsq / model.pt and loaded
into the user's skeleton, class-free from its graph, or by the runtime; the graph section under
hostile input; the layering of the readers."""

from __future__ import annotations

import ast
import copy
import json
import subprocess
import sys
import textwrap
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

import deepsqueeze
from deepsqueeze import dsq, models
from deepsqueeze.codec.container import dsq_bytes, parse_dsq
from deepsqueeze.errors import CheckpointError, DsqFormatError, ModelError
from deepsqueeze.io import load_model, save_model
from deepsqueeze.methods.channel_pruning import prune_channels
from deepsqueeze.models import graph as G
from deepsqueeze.runtime import load_runtime
from tests.conftest import REPO

SRC = REPO / "src" / "deepsqueeze"


# ---------------------------------------------------------------- models that are not in the zoo


class FashionCNN(nn.Module):
    """A `features` Sequential with BatchNorm and Dropout, and a `head`."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Dropout(0.25), nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d((2, 2)),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class FunctionalNet(nn.Module):
    """Functional calls in forward, a view on x.size(0), dropout by self.training."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 13 * 13, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = x.view(x.size(0), -1)
        return F.log_softmax(self.fc(F.dropout(x, 0.2, training=self.training)), dim=1)


class ResidualNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        h = h + self.b(h)
        return self.out(h)


class TwoInputNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Conv1d(2, 4, 3)
        self.tab = nn.Linear(5, 4)
        self.out = nn.Linear(8, 2)

    def forward(self, seq: torch.Tensor, tab: torch.Tensor) -> torch.Tensor:
        a = self.seq(seq).mean(dim=2)
        b = F.gelu(self.tab(tab))
        return self.out(torch.cat([a, b], dim=1))


class TabularMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(12, 32), nn.BatchNorm1d(32), nn.SiLU(),
                                 nn.Linear(32, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class EmbeddingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 16)
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.emb(ids).mean(1)))


class Branchy(nn.Module):
    """Control flow on values: fx cannot trace it, so it is stored without a graph."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = -x
        return self.fc(x)


def _g() -> torch.Generator:
    return torch.Generator().manual_seed(0)


EXAMPLES: dict[type[nn.Module], Callable[[], tuple[torch.Tensor, ...]]] = {
    FashionCNN: lambda: (torch.randn(4, 1, 28, 28, generator=_g()),),
    FunctionalNet: lambda: (torch.randn(4, 1, 28, 28, generator=_g()),),
    ResidualNet: lambda: (torch.randn(4, 16, generator=_g()),),
    TwoInputNet: lambda: (torch.randn(4, 2, 9, generator=_g()), torch.randn(4, 5, generator=_g())),
    TabularMLP: lambda: (torch.randn(4, 12, generator=_g()),),
    EmbeddingNet: lambda: (torch.randint(0, 100, (4, 7), generator=_g()),),
}


def _trained(cls: type[nn.Module]) -> nn.Module:
    """An instance with non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(1)
    model = cls()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


# ---------------------------------------------------------------- graph capture and rebuild


@pytest.mark.parametrize("name", models.list_models())
def test_every_zoo_model_captures_and_rebuilds_to_the_same_outputs(name: str) -> None:
    net = models.create(name).eval()
    x = torch.randn(2, *models.input_shape_of(net), generator=_g())
    graph = G.capture(net, x)
    assert graph is not None
    json.dumps(graph)  # plain JSON
    rebuilt = G.rebuild(json.loads(json.dumps(graph)), device="cpu")
    # the same names: the effective weights (training-form parametrizations, e.g. the binary
    # zoo models' signs, baked) fill by name
    rebuilt.load_state_dict(dsq.plain_state(net)[0])
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), net(x))


@pytest.mark.parametrize("cls", list(EXAMPLES), ids=lambda c: c.__name__)
def test_user_models_capture_and_rebuild_to_the_same_outputs(cls: type[nn.Module]) -> None:
    net, inputs = _trained(cls), EXAMPLES[cls]()
    graph = G.capture(net, inputs)
    assert graph is not None
    rebuilt = G.rebuild(graph)
    assert all(t.is_meta for t in rebuilt.state_dict().values())  # nothing allocated
    rebuilt = rebuilt.to_empty(device="cpu")
    rebuilt.load_state_dict(net.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(*inputs), net(*inputs))
        again = G.capture(rebuilt, inputs)  # a rebuilt model captures again (re-saving it)
        assert again is not None
        twice = G.rebuild(again, device="cpu")
        twice.load_state_dict(net.state_dict())
        assert torch.equal(twice(*inputs), net(*inputs))


def test_what_is_outside_the_allowlists_is_not_captured() -> None:
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))  # a tensor outside any leaf module
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * self.scale

    class Unlisted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.rnn(x)[0]

    class Exp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.exp(self.fc(x))  # not an allowlisted function

    for net in (Custom(), Unlisted(), Exp(), Branchy()):
        assert G.capture(net) is None, type(net).__name__


def test_a_subclass_of_an_allowed_layer_is_not_taken_for_it() -> None:
    class Doubling(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    net = nn.Sequential(Doubling(3, 3)).eval()
    x = torch.randn(2, 3)
    graph = G.capture(net, x)
    if graph is not None:  # traced through its forward: the rebuilt model must agree
        rebuilt = G.rebuild(graph, device="cpu")
        rebuilt.load_state_dict(net.state_dict())
        assert torch.equal(rebuilt(x), net(x))


# ---------------------------------------------------------------- save / load three ways


@pytest.mark.parametrize("cls", list(EXAMPLES), ids=lambda c: c.__name__)
def test_any_module_saves_and_loads_three_ways(cls: type[nn.Module], tmp_path: Path) -> None:
    net, inputs = _trained(cls), EXAMPLES[cls]()
    path = tmp_path / "m.dsq"
    report = deepsqueeze.save(net, path, example_inputs=inputs)
    assert report.kind == "user" and report.graph and report.model == cls.__name__
    assert report.class_name == f"{cls.__module__}:{cls.__qualname__}"
    assert report.inputs == [[list(x.shape[1:]), str(x.dtype).removeprefix("torch.")]
                             for x in inputs]
    own = sum(p.numel() for p in net.parameters())
    assert report.dense_bytes == 4 * own
    with torch.no_grad():
        want = net(*inputs)
        skeleton = cls()
        filled = deepsqueeze.load(path, model=skeleton)
        assert filled is skeleton and not filled.training
        classfree = deepsqueeze.load(path)
        assert not isinstance(classfree, cls)
        fast = deepsqueeze.load(path, mode="runtime", autotune=False)
        fast_skeleton = load_runtime(path, model=cls(), autotune=False)
        assert torch.equal(filled(*inputs), want)
        assert torch.equal(classfree(*inputs), want)  # class-free load equals skeleton load
        for run in (fast, fast_skeleton):
            assert torch.allclose(run(*inputs), want, rtol=1e-4, atol=1e-5)
    again = deepsqueeze.save(classfree, tmp_path / "again.dsq")  # inputs known from the file
    assert again.inputs == report.inputs and again.graph
    assert again.class_name == report.class_name


def test_example_inputs_that_do_not_run_the_model_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"example_inputs \[\(2, 5\)\] do not run ResidualNet"):
        dsq.save(_trained(ResidualNet), tmp_path / "a.dsq", example_inputs=torch.randn(2, 5))
    assert not (tmp_path / "a.dsq").exists()


def test_dense_parameters_of_a_user_model(tmp_path: Path) -> None:
    net = _trained(ResidualNet)
    report = dsq.save(net, tmp_path / "a.dsq", dense_parameters=10_000)
    assert report.dense_bytes == 40_000
    assert report.inputs is None and report.graph  # traced without inputs: inputs unknown
    with pytest.raises(ModelError, match="dense_parameters"):
        dsq.save(net, tmp_path / "b.dsq", dense_parameters=-1)
    loaded = dsq.load(tmp_path / "a.dsq")
    x = EXAMPLES[ResidualNet]()[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


def test_parametrized_masks_are_saved_as_their_base_layers(tmp_path: Path) -> None:
    class Mask(nn.Module):
        def __init__(self, mask: torch.Tensor) -> None:
            super().__init__()
            self.register_buffer("mask", mask)

        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w * self.mask

    net = _trained(FashionCNN)
    lin = net.head[1]
    parametrize.register_parametrization(lin, "weight", Mask(torch.rand(32, 64) > 0.7))
    x = EXAMPLES[FashionCNN]()
    report = dsq.save(net, tmp_path / "p.dsq", example_inputs=x)
    assert report.graph
    with torch.no_grad():
        want = net(*x)
        assert torch.equal(dsq.load(tmp_path / "p.dsq")(*x), want)
        assert torch.equal(dsq.load(tmp_path / "p.dsq", model=FashionCNN())(*x), want)


def test_a_channel_pruned_user_model_fills_the_full_size_skeleton(tmp_path: Path) -> None:
    net = _trained(FashionCNN)
    prune_channels(net, {"features.0": [0, 2, 3, 5, 7], "head.1": list(range(0, 32, 2))})
    x = EXAMPLES[FashionCNN]()
    path = tmp_path / "pruned.dsq"
    dsq.save(net, path, example_inputs=x, dense_parameters=12_345)
    with torch.no_grad():
        want = net(*x)
        filled = dsq.load(path, model=FashionCNN())  # bigger layers: resized to the file
        assert filled.features[0].out_channels == 5 and filled.head[1].out_features == 16
        assert torch.equal(filled(*x), want)
        assert torch.equal(dsq.load(path)(*x), want)  # the graph records the pruned sizes
        fast = dsq.load(path, mode="runtime", model=FashionCNN(), autotune=False)
        assert torch.allclose(fast(*x), want, rtol=1e-4, atol=1e-5)


def test_a_skeleton_that_does_not_fit_is_refused_with_the_names(tmp_path: Path) -> None:
    path = tmp_path / "m.dsq"
    dsq.save(_trained(FashionCNN), path)
    with pytest.raises(ModelError) as info:
        dsq.load(path, model=ResidualNet())
    text = str(info.value)
    assert "missing in the file: a.bias, a.weight" in text
    assert "unexpected in the file: features.0.bias" in text

    class Wider(FashionCNN):
        def __init__(self) -> None:
            super().__init__()
            self.features[0] = nn.Conv2d(1, 8, 5, padding=2)  # kernels differ: no resize

    class Narrower(FashionCNN):
        def __init__(self) -> None:
            super().__init__()
            self.head[1] = nn.Linear(64, 8)
            self.head[4] = nn.Linear(8, 10)

    for wrong in (Wider(), Narrower()):
        with pytest.raises(ModelError, match=r"mis-shaped tensors: (features|head)"):
            dsq.load(path, model=wrong)
    with pytest.raises(ModelError, match=r"nn\.Module instance"):
        dsq.load(path, model=FashionCNN)  # the class, not an instance


def test_a_model_without_a_graph_needs_its_class(tmp_path: Path) -> None:
    net = Branchy().eval()
    x = torch.randn(3, 6)
    path = tmp_path / "branchy.dsq"
    report = dsq.save(net, path, example_inputs=x)
    assert report.kind == "user" and not report.graph
    assert dsq.inspect(path).layers[0].layer == "fc"
    with pytest.raises(ModelError) as info:
        dsq.load(path)
    assert not isinstance(info.value, DsqFormatError)
    assert (f"{path} holds a Branchy ({Branchy.__module__}:Branchy) stored without a graph"
            in str(info.value))
    assert "deepsqueeze.load(path, model=Branchy())" in str(info.value)
    with pytest.raises(ModelError, match="stored without a graph"):
        dsq.load(path, mode="runtime", autotune=False)
    with torch.no_grad():
        assert torch.equal(dsq.load(path, model=Branchy())(x), net(x))


def test_model_pt_files_of_user_models(tmp_path: Path) -> None:
    net, x = _trained(FashionCNN), EXAMPLES[FashionCNN]()
    path = save_model(net, tmp_path / "model.pt", example_inputs=x)
    with torch.no_grad():
        want = net(*x)
        assert torch.equal(load_model(path)(*x), want)
        assert torch.equal(load_model(path, model=FashionCNN())(*x), want)
        assert torch.equal(dsq.load_model_or_dsq(path)(*x), want)
    b = save_model(Branchy(), tmp_path / "b.pt")
    with pytest.raises(ModelError, match=r"load_model\(path, model=Branchy\(\)\)"):
        load_model(b)
    assert isinstance(load_model(b, model=Branchy()), Branchy)
    with pytest.raises(ModelError, match="missing in the file"):
        load_model(path, model=ResidualNet())
    ckpt = tmp_path / "ckpt.pt"  # a training checkpoint of a user model: weights only
    torch.save({"format": "deepsqueeze-model", "version": 1, "model_spec": None,
                "state_dict": net.state_dict()}, ckpt)
    with pytest.raises(ModelError, match=r"load_model\(path, model=MyNet\(\)\)"):
        load_model(ckpt)
    with torch.no_grad():
        assert torch.equal(load_model(ckpt, model=FashionCNN())(*x), want)
    zoo = save_model(models.create("lenet300"), tmp_path / "zoo.pt")
    assert models.spec_of(load_model(zoo)).name == "lenet300"


# ---------------------------------------------------------------- a fresh process


def test_a_user_cnn_loads_in_a_fresh_process_three_ways(tmp_path: Path) -> None:
    net, (x,) = _trained(FashionCNN), EXAMPLES[FashionCNN]()
    dsq.save(net, tmp_path / "cnn.dsq", example_inputs=x)
    dsq.save(Branchy(), tmp_path / "branchy.dsq")
    with torch.no_grad():
        torch.save({"x": x, "y": net(x)}, tmp_path / "io.pt")
    code = textwrap.dedent('''
        import sys, torch
        from torch import nn
        import deepsqueeze
        from deepsqueeze.errors import ModelError
        from deepsqueeze.runtime import load_runtime

        class FashionCNN(nn.Module):  # the user's class, defined here and nowhere else
            def __init__(self):
                super().__init__()
                self.features = nn.Sequential(
                    nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                    nn.MaxPool2d(2), nn.Dropout(0.25), nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16),
                    nn.ReLU(), nn.AdaptiveAvgPool2d((2, 2)))
                self.head = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(),
                                          nn.Dropout(0.5), nn.Linear(32, 10))
            def forward(self, x):
                return self.head(self.features(x))

        folder = sys.argv[1]
        io = torch.load(folder + "/io.pt", weights_only=True)
        x, y = io["x"], io["y"]
        print(deepsqueeze.inspect(folder + "/cnn.dsq").to_dict()["kind"])
        with torch.no_grad():
            a = deepsqueeze.load(folder + "/cnn.dsq", model=FashionCNN())(x)
            b = deepsqueeze.load(folder + "/cnn.dsq")(x)
            c = load_runtime(folder + "/cnn.dsq", autotune=False, cache=False)(x)
        print(torch.equal(a, y), torch.equal(b, y), torch.allclose(c, y, rtol=1e-4, atol=1e-5))
        print(bool((a.argmax(1) == y.argmax(1)).all() and (c.argmax(1) == y.argmax(1)).all()))
        print(deepsqueeze.inspect(folder + "/branchy.dsq").graph)
        try:
            deepsqueeze.load(folder + "/branchy.dsq")
        except ModelError as exc:
            print(exc)
    ''')
    done = subprocess.run(
        [sys.executable, "-I", "-c", code, str(tmp_path)], capture_output=True, text=True,
        timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "user"
    assert lines[1] == "True True True"
    assert lines[2] == "True"
    assert lines[3] == "False"
    assert "holds a Branchy (tests.test_own_files:Branchy) stored without a graph" in lines[4]
    assert "deepsqueeze.load(path, model=Branchy())" in lines[4]


# ---------------------------------------------------------------- hostile graphs

_CODE_EVENTS = ("import", "exec", "compile", "pickle.find_class", "marshal.load", "os.system",
                "subprocess.Popen", "os.posix_spawn", "os.exec", "os.spawn", "os.fork",
                "ctypes.dlopen", "code.__new__", "builtins.input")
_AUDIT: dict[str, Any] = {"on": False, "seen": []}


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _AUDIT["on"] and event.startswith(_CODE_EVENTS):
        _AUDIT["seen"].append((event, str(args)[:80]))


sys.addaudithook(_audit)


def _guarded(fn: Callable[[], Any]) -> tuple[Any, float, int]:
    """Run ``fn`` with the audit hook on: (DsqFormatError or result, seconds, traced peak)."""
    _AUDIT["seen"].clear()
    _AUDIT["on"] = True
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        try:
            out: Any = fn()
        except DsqFormatError as exc:
            out = exc
    finally:
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        _AUDIT["on"] = False
    assert not _AUDIT["seen"], f"code ran or was imported while reading: {_AUDIT['seen'][:5]}"
    return out, elapsed, peak


@pytest.fixture(scope="module")
def cnn_file(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("own") / "cnn.dsq"
    dsq.save(_trained(FashionCNN), path, example_inputs=EXAMPLES[FashionCNN]())
    return path.read_bytes()


def _forge(data: bytes, edit: Callable[[dict[str, Any]], Any]) -> bytes:
    """The file with its manifest edited and every CRC made valid again."""
    f = parse_dsq(data)
    meta = copy.deepcopy(f.meta)
    edit(meta)
    return dsq_bytes(meta, f.sections)


def _graph(m: dict[str, Any]) -> dict[str, Any]:
    return m["model"]["graph"]


def _node(m: dict[str, Any], op: str) -> dict[str, Any]:
    return next(n for n in _graph(m)["nodes"] if n["op"] == op)


def _set(d: dict[str, Any], **kw: Any) -> None:
    d.update(kw)


def _chain(n: int) -> dict[str, Any]:
    nodes = [{"name": "x", "op": "placeholder", "target": "x"}]
    for i in range(n):
        nodes.append({"name": f"n{i}", "op": "call_function", "target": "F.relu",
                      "args": [{"node": nodes[-1]["name"]}]})
    nodes.append({"name": "output", "op": "output", "args": [{"node": nodes[-1]["name"]}]})
    return {"version": 1, "modules": {}, "nodes": nodes}


def _nest(depth: int) -> Any:
    v: Any = 1
    for _ in range(depth):
        v = [v]
    return v


HOSTILE: dict[str, Callable[[dict[str, Any]], Any]] = {
    "unknown module type": lambda m: _set(_graph(m)["modules"]["head.1"], type="GRU"),
    "module type os.system": lambda m: _set(_graph(m)["modules"]["head.1"], type="os.system"),
    "module type builtins.eval": lambda m: _set(_graph(m)["modules"]["head.1"],
                                                type="builtins.eval"),
    "function __import__": lambda m: _set(_node(m, "call_module"), op="call_function",
                                          target="__import__"),
    "function os.system": lambda m: _set(_node(m, "call_module"), op="call_function",
                                         target="os.system"),
    "function builtins.eval": lambda m: _set(_node(m, "call_module"), op="call_function",
                                             target="builtins.eval"),
    "method __class__": lambda m: _set(_node(m, "call_module"), op="call_method",
                                       target="__class__"),
    "method __reduce__": lambda m: _set(_node(m, "call_module"), op="call_method",
                                        target="__reduce__"),
    "op get_attr": lambda m: _set(_node(m, "call_module"), op="get_attr", target="forward"),
    "getattr of __globals__": lambda m: _set(_node(m, "call_module"), op="call_function",
                                             target="getattr", args=[{"node": "x"}, "__globals__"]),
    "huge out_features": lambda m: _graph(m)["modules"]["head.1"]["config"].update(
        out_features=10**12),
    "huge kernel": lambda m: _graph(m)["modules"]["features.0"]["config"].update(
        kernel_size=[10**6, 10**6]),
    "parameters over the limit": lambda m: _graph(m)["modules"].update(
        {f"big{i}": {"type": "Linear", "config": {"in_features": 1 << 13, "out_features": 1 << 13,
                                                   "bias": False}} for i in range(2)}),
    "float for int": lambda m: _graph(m)["modules"]["head.1"]["config"].update(in_features=64.0),
    "bool for int": lambda m: _graph(m)["modules"]["head.1"]["config"].update(in_features=True),
    "string option": lambda m: _graph(m)["modules"]["head.1"]["config"].update(bias="yes"),
    "unknown option": lambda m: _graph(m)["modules"]["head.1"]["config"].update(
        device="cuda"),
    "missing option": lambda m: _graph(m)["modules"]["head.1"]["config"].pop("bias"),
    "bad padding_mode": lambda m: _graph(m)["modules"]["features.0"]["config"].update(
        padding_mode="os.system"),
    "inconsistent groups": lambda m: _graph(m)["modules"]["features.0"]["config"].update(
        groups=3),
    "module name dunder path": lambda m: (
        _graph(m)["modules"].update({"__class__.__init__": _graph(m)["modules"].pop("head.1")}),
        _set(next(n for n in _graph(m)["nodes"] if n.get("target") == "head.1"),
             target="__class__.__init__")),
    "module name with slash": lambda m: _graph(m)["modules"].update(
        {"a/b": {"type": "Identity", "config": {}}}),
    "module name shadowing forward": lambda m: (
        _graph(m)["modules"].update({"forward": _graph(m)["modules"].pop("head.1")}),
        _set(next(n for n in _graph(m)["nodes"] if n.get("target") == "head.1"),
             target="forward")),
    "unused module": lambda m: _graph(m)["modules"].update(
        {"extra": {"type": "Identity", "config": {}}}),
    "dangling node reference": lambda m: _set(_node(m, "output"), args=[{"node": "nowhere"}]),
    "forward reference (a cycle)": lambda m: _set(_node(m, "call_module"),
                                                  args=[{"node": "output"}]),
    "self reference": lambda m: _set(_node(m, "call_module"),
                                     args=[{"node": _node(m, "call_module")["name"]}]),
    "duplicate node name": lambda m: _graph(m)["nodes"].insert(
        2, copy.deepcopy(_graph(m)["nodes"][1])),
    "output not last": lambda m: _graph(m)["nodes"].append(
        copy.deepcopy(_graph(m)["nodes"][1])),
    "no output": lambda m: _graph(m)["nodes"].pop(),
    "huge graph": lambda m: _set(m["model"], graph=_chain(G.MAX_NODES + 10)),
    "deep args": lambda m: _set(_node(m, "output"), args=[_nest(40)]),
    "many args": lambda m: _set(_node(m, "output"), args=[list(range(10_000))]),
    "huge int constant": lambda m: _set(_node(m, "output"), args=[10**18]),
    "long string constant": lambda m: _set(_node(m, "output"), args=["x" * 100_000]),
    "unknown value object": lambda m: _set(_node(m, "output"), args=[{"__class__": "os"}]),
    "getitem with a string": lambda m: _set(_node(m, "call_module"), op="call_function",
                                            target="getitem", args=[{"node": "x"}, "a"]),
    "args not a list": lambda m: _set(_node(m, "call_module"), args={"node": "x"}),
    "kwargs with a dunder-free bad name": lambda m: _set(_node(m, "call_module"),
                                                        kwargs={"a-b": 1}),
    "unknown node key": lambda m: _set(_node(m, "call_module"), code="import os"),
    "unknown op": lambda m: _set(_node(m, "call_module"), op="call_python"),
    "graph version": lambda m: _set(_graph(m), version=99),
    "graph extra member": lambda m: _set(_graph(m), code="print(1)"),
    "graph not an object": lambda m: _set(m["model"], graph=[1, 2]),
    "no inputs": lambda m: _set(m["model"], graph={"version": 1, "modules": {}, "nodes": [
        {"name": "a", "op": "call_function", "target": "torch.relu", "args": [1]},
        {"name": "output", "op": "output", "args": [{"node": "a"}]}]}),
    "a constant placeholder default": lambda m: _set(_node(m, "placeholder"), args=[1]),
    "wrong kwargs (runs on the recorded inputs)": lambda m: _set(
        next(n for n in _graph(m)["nodes"] if n.get("target") == "head.1"), kwargs={"bogus": 1}),
    "wrong arg types (runs on the recorded inputs)": lambda m: _set(
        next(n for n in _graph(m)["nodes"] if n.get("target") == "head.1"),
        args=[{"node": "head_0"}, "a"]),
    "recorded inputs too small for the graph": lambda m: _set(
        m["model"], inputs=[[[1, 5, 5], "float32"]]),
    "shapes that do not chain": lambda m: _graph(m)["modules"]["head.1"]["config"].update(
        in_features=65),
    "inputs not a list": lambda m: _set(m["model"], inputs="1x28x28"),
    "input dtype": lambda m: _set(m["model"], inputs=[[[1, 28, 28], "object"]]),
    "huge input": lambda m: _set(m["model"], inputs=[[[1 << 20, 1 << 20], "float32"]]),
    "class not a string": lambda m: _set(m["model"], **{"class": {"module": "os"}}),
    "class too long": lambda m: _set(m["model"], **{"class": "a" * 10_000}),
    "extra description member": lambda m: _set(m["model"], code="import os"),
    "kind without members": lambda m: _set(m, model={"kind": "user"}),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_forged_graph_is_a_format_error_and_runs_nothing(case: str, cnn_file: bytes,
                                                           tmp_path: Path) -> None:
    data = _forge(cnn_file, HOSTILE[case])
    path = tmp_path / "forged.dsq"
    path.write_bytes(data)
    readers = {
        "load": lambda: dsq.load(path),
        "inspect": lambda: dsq.inspect(path),
        "runtime": lambda: load_runtime(path, autotune=False, cache=False),
        "bytes": lambda: dsq.load(data),
    }
    for name, read in readers.items():
        out, elapsed, peak = _guarded(read)
        assert isinstance(out, DsqFormatError), f"{case} via {name}: loaded"
        assert str(out).strip() and len(str(out)) < 2000
        assert elapsed < 2.0, f"{case} via {name}: {elapsed:.2f} s"
        assert peak < 64 << 20, f"{case} via {name}: {peak} bytes"


def test_graph_limits_hold_below_the_manifest_budget() -> None:
    for graph, needle in (
        (_chain(G.MAX_NODES), "2..4096 nodes"),
        ({"version": 1, "modules": {f"m{i}": {"type": "Identity", "config": {}}
                                    for i in range(G.MAX_MODULES + 1)},
          "nodes": _chain(1)["nodes"]}, "at most 2048"),
        ({**_chain(1), "nodes": [_chain(1)["nodes"][0]] * 17 + _chain(1)["nodes"][1:]},
         "appears twice"),
    ):
        t0 = time.perf_counter()
        with pytest.raises(DsqFormatError, match=needle):
            G.rebuild(graph)
        assert time.perf_counter() - t0 < 1.0
    many = {"version": 1, "modules": {}, "nodes": [
        {"name": f"x{i}", "op": "placeholder", "target": f"x{i}"} for i in range(17)
    ] + [{"name": "output", "op": "output", "args": [{"node": "x0"}]}]}
    with pytest.raises(DsqFormatError, match="at most 16"):
        G.rebuild(many)
    assert isinstance(G.rebuild(_chain(G.MAX_NODES - 2)), G.GraphModel)  # the limit itself


def test_valid_graph_files_load_with_nothing_imported_or_executed(cnn_file: bytes,
                                                                  tmp_path: Path) -> None:
    path = tmp_path / "cnn.dsq"
    path.write_bytes(cnn_file)
    dsq.load(path), load_runtime(path, autotune=False, cache=False)  # warm: imports, kernel
    x = EXAMPLES[FashionCNN]()[0]
    for read in (lambda: dsq.load(path), lambda: dsq.inspect(path),
                 lambda: load_runtime(path, autotune=False, cache=False, fuse=False)):
        model, _, _ = _guarded(read)
        assert not isinstance(model, DsqFormatError)
    out, _, _ = _guarded(lambda: dsq.load(path)(x))  # running the rebuilt model: no exec
    assert isinstance(out, torch.Tensor)


def test_a_forged_model_pt_description_is_refused(tmp_path: Path) -> None:
    net = _trained(ResidualNet)
    path = save_model(net, tmp_path / "m.pt")
    obj = torch.load(path, weights_only=True)
    desc = json.loads(obj["model_user"])
    for change in (
        lambda d: d["graph"]["modules"]["a"].update(type="os.system"),
        lambda d: d["graph"]["nodes"][1].update(op="call_function", target="__import__"),
        lambda d: d.update(inputs="?"),
    ):
        bad = copy.deepcopy(desc)
        change(bad)
        torch.save({**obj, "model_user": json.dumps(bad)}, tmp_path / "bad.pt")
        with pytest.raises(CheckpointError):
            load_model(tmp_path / "bad.pt")
    torch.save({**obj, "model_user": "[" * 100_000}, tmp_path / "deep.pt")
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "deep.pt")


# ---------------------------------------------------------------- layering


def _imports(path: Path) -> list[tuple[str, list[str], bool]]:
    """(module, names, at module level) of every ``from deepsqueeze... import`` in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("deepsqueeze"):
            out.append((node.module or "", [a.name for a in node.names], id(node) in top))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], id(node) in top) for a in node.names
                    if a.name.startswith("deepsqueeze")]
    return out


def test_the_readers_only_look_down() -> None:
    for module, names, _ in _imports(SRC / "runtime" / "loader.py"):
        assert not any(n.startswith("_") for n in names), (module, names)
    above_models = ("deepsqueeze.methods", "deepsqueeze.pipeline", "deepsqueeze.training",
                    "deepsqueeze.runtime", "deepsqueeze.dsq", "deepsqueeze.io",
                    "deepsqueeze.codec", "deepsqueeze.evaluation", "deepsqueeze.cli")
    for path in (SRC / "models").glob("*.py"):
        for module, _, _ in _imports(path):
            assert not module.startswith(above_models), (path.name, module)
    for module, _, _ in _imports(SRC / "io.py"):
        assert not module.startswith(("deepsqueeze.methods", "deepsqueeze.pipeline",
                                      "deepsqueeze.runtime", "deepsqueeze.dsq")), module
    for module, _, top in _imports(SRC / "dsq.py"):
        assert not (top and module.startswith(("deepsqueeze.pipeline", "deepsqueeze.runtime",
                                               "deepsqueeze.methods"))), module
    from deepsqueeze.methods import channel_pruning
    from deepsqueeze.models.state import resize_to_shapes

    assert channel_pruning.resize_to_shapes is resize_to_shapes  # kept for old imports


# integers the manifest can hold (wider ones are refused by the writer and the reader alike)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False,
                                                                         allow_infinity=False)
    | st.sampled_from(["x", "os.system", "__import__", "shape", "head.1", "Linear", "add",
                       "view", "node", "tuple", "slice", "ellipsis", "same", ""]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["node", "tuple", "slice", "ellipsis", "type", "config", "name", "op",
                         "target", "args", "kwargs", "x"]), inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(where=st.integers(0, 10_000), key=st.integers(0, 10), value=_JSON)
def test_any_changed_graph_field_loads_or_is_a_format_error(cnn_file: bytes, where: int,
                                                            key: int, value: Any) -> None:
    def change(m: dict[str, Any]) -> None:
        graph = _graph(m)
        if where % 2:
            node = graph["nodes"][where % len(graph["nodes"])]
            node[sorted([*node, "args", "kwargs"])[key % (len(node) + 2)]] = value
        else:
            mod = graph["modules"][sorted(graph["modules"])[where % len(graph["modules"])]]
            config = mod["config"]
            if config and key % 3:
                config[sorted(config)[key % len(config)]] = value
            else:
                mod["type" if key % 2 else "config"] = value

    data = _forge(cnn_file, change)
    for read in (lambda: dsq.load(data), lambda: dsq.inspect(data)):
        _, elapsed, _ = _guarded(read)  # a DsqFormatError or a valid result, nothing else
        assert elapsed < 2.0
