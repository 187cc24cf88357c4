"""Tests of the model zoo: registry, specs, shapes, parameter counts, errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from deepsqueeze import models
from deepsqueeze.errors import ModelError
from deepsqueeze.models import ModelInfo, ModelSpec

ALL = models.list_models()
CONV = [n for n in ALL if "in_channels" in models.model_info(n).default_kwargs]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_the_zoo() -> None:
    assert sorted(ALL) == ALL
    expected = {"lenet300", "lenet5", "lenet5-classic", "mobilenet-tiny"}
    expected |= {f"resnet{d}" for d in (20, 32, 44, 56)}
    assert expected <= set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_forward_default_shape(name: str) -> None:
    info = models.model_info(name)
    model = models.create(name).eval()
    assert models.input_shape_of(model) == info.input_shape
    with torch.no_grad():
        out = model(torch.randn(2, *info.input_shape))
    assert out.shape == (2, 10)


@pytest.mark.parametrize("name", CONV)
def test_forward_mnist_shape(name: str) -> None:
    model = models.create(name, in_channels=1, num_classes=7, input_size=28).eval()
    assert models.input_shape_of(model) == (1, 28, 28)
    with torch.no_grad():
        out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 7)


@pytest.mark.parametrize("name", ["lenet5", "lenet5-classic"])
def test_lenet_input_size_32(name: str) -> None:
    model = models.create(name, in_channels=3, input_size=32)
    assert models.input_shape_of(model) == (3, 32, 32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_lenet300_flattens_any_input() -> None:
    model = models.create("lenet300", in_features=3 * 32 * 32)
    assert models.input_shape_of(model) == (3, 32, 32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert models.create("lenet300")(torch.randn(2, 784)).shape == (2, 10)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # 784*300+300 + 300*100+100 + 100*10+10
        ("lenet300", 266_610),
        # conv1 520 + conv2 25,050 + fc1 800*500+500 + fc2 5,010
        ("lenet5", 431_080),
        # conv1 156 + conv2 2,416 + fc1 400*120+120 + fc2 10,164 + fc3 850
        ("lenet5-classic", 61_706),
    ],
)
def test_exact_param_counts(name: str, expected: int) -> None:
    assert n_params(models.create(name)) == expected


def test_lenet_layer_shapes() -> None:
    m300 = models.create("lenet300")
    assert [m300.fc1.in_features, m300.fc2.in_features, m300.fc3.in_features] == [784, 300, 100]
    m5 = models.create("lenet5")
    assert m5.conv1.out_channels == 20 and m5.conv2.out_channels == 50
    assert (m5.fc1.in_features, m5.fc1.out_features) == (800, 500)
    classic = models.create("lenet5-classic")
    assert classic.conv1.padding == (2, 2)
    assert (classic.fc1.in_features, classic.fc1.out_features) == (400, 120)
    assert models.create("lenet5-classic", input_size=32).conv1.padding == (0, 0)


def test_resnet_sizes_and_structure() -> None:
    r20 = models.create("resnet20")
    assert 260_000 < n_params(r20) < 280_000
    counts = [n_params(models.create(f"resnet{d}")) for d in (20, 32, 44, 56)]
    assert counts == sorted(counts) and counts[-1] < 900_000
    for d, n in ((20, 3), (32, 5), (44, 7), (56, 9)):
        model = models.create(f"resnet{d}")
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
        assert len(convs) == 6 * n + 1  # + fc = 6n + 2 weighted layers
    assert [len(r20.layer1), len(r20.layer2), len(r20.layer3)] == [3, 3, 3]
    block = r20.layer2[0]
    assert {"conv1", "bn1", "conv2", "bn2", "shortcut"} <= dict(block.named_children()).keys()
    assert isinstance(block.shortcut, nn.Sequential)  # option B projection
    assert isinstance(r20.layer2[1].shortcut, nn.Identity)
    assert isinstance(r20.layer1[0].shortcut, nn.Identity)


@pytest.mark.parametrize("name", ["resnet20", "mobilenet-tiny"])
def test_input_size_only_records_shape(name: str) -> None:
    a = models.create(name, input_size=28)
    b = models.create(name)
    assert models.input_shape_of(a) == (3, 28, 28)
    assert models.input_shape_of(b) == (3, 32, 32)
    assert {k: v.shape for k, v in a.state_dict().items()} == {
        k: v.shape for k, v in b.state_dict().items()
    }


def test_mobilenet_small_and_width_mult() -> None:
    full = n_params(models.create("mobilenet-tiny"))
    half = models.create("mobilenet-tiny", width_mult=0.5)
    assert full < 1_000_000
    assert n_params(half) < full / 2
    assert half(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", ALL)
def test_spec_round_trip(name: str) -> None:
    kwargs = {"num_classes": 5}
    if name in CONV:
        kwargs["in_channels"] = 1
    model = models.create(name, **kwargs)
    spec = models.spec_of(model)
    assert spec.name == name
    assert spec.kwargs == {**models.model_info(name).default_kwargs, **kwargs}
    rebuilt = models.create(spec.name, **spec.kwargs)
    a, b = model.state_dict(), rebuilt.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    rebuilt.load_state_dict(a)
    assert models.input_shape_of(rebuilt) == models.input_shape_of(model)
    assert models.spec_of(copy.deepcopy(model)) == spec


def test_model_spec_json_round_trip() -> None:
    spec = models.spec_of(models.create("mobilenet-tiny", width_mult=0.5, num_classes=100))
    text = json.dumps(spec.to_dict())
    back = ModelSpec.from_dict(json.loads(text))
    assert back == spec and hash(back) == hash(spec)
    assert back.kwargs == {
        "num_classes": 100,
        "in_channels": 3,
        "width_mult": 0.5,
        "input_size": 32,
    }
    assert ModelSpec.from_dict({"name": "lenet5"}) == ModelSpec("lenet5", {})


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        ([], "must be a dict"),
        ({"kwargs": {}}, "no 'name'"),
        ({"name": "lenet5", "extra": 1}, "unknown keys"),
        ({"name": "lenet5", "kwargs": [1]}, "kwargs"),
        ({"name": "lenet5", "kwargs": {"x": {1, 2}}}, "not JSON-able"),
    ],
)
def test_model_spec_from_bad_dict(bad: object, fragment: str) -> None:
    with pytest.raises(ModelError, match=fragment):
        ModelSpec.from_dict(bad)


def test_model_info() -> None:
    info = models.model_info("lenet5")
    assert isinstance(info, ModelInfo)
    assert info.input_shape == (1, 28, 28)
    assert info.default_kwargs == {"num_classes": 10, "in_channels": 1, "input_size": 28}
    assert info.description


def test_unknown_model_message() -> None:
    with pytest.raises(ModelError) as exc:
        models.create("resnet21")
    msg = str(exc.value)
    assert "resnet21" in msg and "Did you mean" in msg
    assert all(name in msg for name in ALL)
    with pytest.raises(ModelError, match="'lenet5-classic'"):
        models.model_info("lenet5_classic")


def test_bad_kwargs_messages() -> None:
    with pytest.raises(ModelError) as exc:
        models.create("lenet5", num_class=3)
    msg = str(exc.value)
    assert "num_class" in msg and "num_classes" in msg
    assert "in_channels" in msg and "input_size" in msg
    with pytest.raises(ModelError, match=r"num_classes.*int"):
        models.create("resnet20", num_classes=2.5)
    with pytest.raises(ModelError, match=r"num_classes.*int"):
        models.create("resnet20", num_classes=True)
    with pytest.raises(ModelError, match=r"num_classes.*> 0"):
        models.create("resnet20", num_classes=0)
    with pytest.raises(ModelError, match="input_size"):
        models.create("lenet5", input_size=8)
    with pytest.raises(ModelError, match="JSON"):
        models.create("mobilenet-tiny", width_mult=torch.tensor(0.5))
    with pytest.raises(ModelError, match="finite"):
        models.create("mobilenet-tiny", width_mult=float("inf"))


def test_spec_of_foreign_module() -> None:
    with pytest.raises(ModelError, match="not built by"):
        models.spec_of(nn.Linear(3, 4))
    with pytest.raises(ModelError, match="not built by"):
        models.input_shape_of(nn.Linear(3, 4))


def test_register_model_rules() -> None:
    with pytest.raises(ModelError, match="needs a default"):
        models.register_model("t-nodefault", input_shape=(1, 2, 2), description="x")(
            lambda num_classes: nn.Linear(4, num_classes)
        )
    with pytest.raises(ModelError, match="already registered"):
        models.register_model("lenet5", input_shape=(1, 28, 28), description="x")(
            lambda num_classes=10: nn.Linear(4, num_classes)
        )
    with pytest.raises(ModelError, match="input_shape"):
        models.register_model("t-shape", input_shape=(1, 2), description="x")  # type: ignore[arg-type]
    assert "t-nodefault" not in models.list_models()


@pytest.mark.parametrize("name", ["lenet5", "resnet20", "mobilenet-tiny"])
def test_deterministic_init(name: str) -> None:
    torch.manual_seed(0)
    a = models.create(name).state_dict()
    torch.manual_seed(0)
    b = models.create(name).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["lenet5", "resnet20"])
def test_gradients_flow(name: str) -> None:
    torch.manual_seed(0)
    model = models.create(name)
    x = torch.randn(4, *models.input_shape_of(model))
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert model.conv1.weight.grad.abs().sum() > 0
