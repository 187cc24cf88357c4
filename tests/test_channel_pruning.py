"""Tests of structured channel pruning: dependency analysis, surgery, loading, the method."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from deepsqueeze import models
from deepsqueeze.errors import ModelError, RecipeError
from deepsqueeze.methods.base import METHODS, create_method, select_layers
from deepsqueeze.methods.channel_pruning import (
    ChannelPruning,
    channel_groups,
    channel_scores,
    prunable_layers,
    prune_channels,
    resize_to_shapes,
    select_channels,
)
from deepsqueeze.metrics.macs import macs_per_sample

ZOO = ["lenet300", "lenet5", "lenet5-classic", "resnet20", "mobilenet-tiny"]

EXPECTED_PRUNABLE = {
    "lenet300": ["fc1", "fc2"],
    "lenet5": ["conv1", "conv2", "fc1"],
    "lenet5-classic": ["conv1", "conv2", "fc1", "fc2"],
    "resnet20": [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)],
    "mobilenet-tiny": ["conv1"] + [f"blocks.{i}.conv_pw" for i in range(5)],
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids oversubscription on busy CI machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return models.create(name)


def run(model: nn.Module, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    x = torch.randn(3, *models.input_shape_of(model))
    with torch.no_grad():
        return model.eval()(x)


def prune(model: nn.Module, **params: object) -> ChannelPruning:
    method = ChannelPruning(**params)
    method.apply(model, select_layers(model, method.params.layers, method.supported))
    return method


def randomize_bn(model: nn.Module) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so equivalence means something."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, _BatchNorm):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)


# --------------------------------------------------------------------------- analysis


@pytest.mark.parametrize("name", ZOO)
def test_prunable_layers_of_the_zoo(name: str) -> None:
    report = prunable_layers(make(name))
    assert sorted(n for n, why in report.items() if why is None) == sorted(EXPECTED_PRUNABLE[name])
    head = {"lenet300": "fc3", "lenet5": "fc2", "lenet5-classic": "fc3"}.get(name, "fc")
    assert "model output" in report[head]


def test_resnet_tied_layers_say_why() -> None:
    report = prunable_layers(make("resnet20"))
    tied = ["conv1", "layer1.0.conv2", "layer2.0.shortcut.0", "layer3.2.conv2"]
    for name in tied:
        assert "residual addition" in report[name], (name, report[name])
    assert "'layer2.0'" in report["layer2.0.shortcut.0"]


def test_mobilenet_depthwise_follows_its_producer() -> None:
    model = make("mobilenet-tiny")
    assert "follow 'blocks.0.conv_pw'" in prunable_layers(model)["blocks.1.conv_dw"]
    group = channel_groups(model)["conv1"]
    assert group.passthrough == ("bn1", "blocks.0.conv_dw", "blocks.0.bn_dw")
    assert group.consumers == ("blocks.0.conv_pw",)


def test_flatten_factor() -> None:
    assert channel_groups(make("lenet5"))["conv2"].flatten_factor == {"fc1": 16}
    assert channel_groups(make("lenet5-classic"))["conv2"].flatten_factor == {"fc1": 25}
    assert channel_groups(make("mobilenet-tiny"))["blocks.4.conv_pw"].flatten_factor == {"fc": 1}


class _Odd(nn.Module):
    """Channels that are concatenated, reshaped, used twice, or flattened the view way."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 1)
        self.shared = nn.Conv2d(4, 4, 1)
        self.d = nn.Conv2d(4, 2, 1)
        self.act = nn.ReLU()  # a stateless module used twice is fine
        self.fc = nn.Linear(2 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c(torch.cat([self.a(x), self.b(x)], 1))
        y = self.shared(self.shared(self.act(y * 2)))
        y = self.act(self.d(y))
        return self.fc(y.view(y.size(0), -1))


def test_reasons_for_cat_shared_and_view_flatten() -> None:
    report = prunable_layers(_Odd())
    assert "concatenated" in report["a"] and "concatenated" in report["b"]
    assert "called 2 times" in report["c"] and "called 2 times" in report["shared"]
    assert report["d"] is None  # view(x.size(0), -1) is a flatten
    assert channel_groups(_Odd())["d"].flatten_factor == {"fc": 64}


def _plain_net() -> nn.Sequential:
    """A model not from the zoo: nn.Flatten, BatchNorm1d, Dropout, reused shapes."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(24, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Dropout(0.1), nn.Linear(12, 4),
    )


def test_plain_sequential_model() -> None:
    net = _plain_net()
    assert [n for n, why in prunable_layers(net).items() if why is None] == ["0", "4", "8"]
    groups = channel_groups(net)
    assert groups["4"].flatten_factor == {"8": 4}
    assert groups["8"].passthrough == ("9",)
    randomize_bn(net)
    plan = {"0": torch.tensor([1, 2, 5]), "4": torch.tensor([0, 3]), "8": torch.arange(0, 12, 2)}
    _zero_dropped(net, plan)
    x = torch.randn(5, 3, 8, 8)
    before = net.eval()(x)
    prune_channels(net, plan)
    assert net[8].weight.shape == (6, 8) and net[9].running_mean.shape == (6,)
    torch.testing.assert_close(net(x), before, atol=1e-5, rtol=1e-5)
    method = ChannelPruning(ratio=0.5)
    method.apply(net, select_layers(net, None))
    assert method.report is not None and method.report.macs is None  # no zoo spec, no shape
    assert net[0].out_channels == 2 and net[12].in_features == 3


def test_untraceable_model_is_a_model_error() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(ModelError, match=r"torch\.fx"):
        prunable_layers(Branchy())


# --------------------------------------------------------------------------- scores and surgery


def test_channel_scores_and_selection() -> None:
    fc = nn.Linear(4, 6)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[1.0, -1, 0, 0], [3, 0, 0, 0], [0.1, 0, 0, 0],
                                      [2, 2, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]))
    assert torch.allclose(channel_scores(fc, "l1"), torch.tensor([2, 3, 0.1, 4, 0, 4]))
    assert torch.allclose(channel_scores(fc, "l2")[3], torch.tensor(8.0).sqrt())
    assert select_channels(fc, 0.5).tolist() == [1, 3, 5]
    assert select_channels(fc, 0.5, "l2").tolist() == [1, 3, 5]
    assert select_channels(fc, 0.99).tolist() == [3]  # at least one kept; ties keep lower index
    assert select_channels(fc, 0.5, round_to=4).tolist() == [0, 1, 3, 5]
    assert select_channels(fc, 0.0).tolist() == list(range(6))
    conv = nn.Conv2d(2, 3, 3)
    assert torch.allclose(channel_scores(conv), conv.weight.abs().sum((1, 2, 3)))


def _zero_dropped(model: nn.Module, plan: dict[str, torch.Tensor]) -> None:
    """Make the channels outside ``plan`` exactly zero at every point they travel through."""
    groups = channel_groups(model)
    with torch.no_grad():
        for name, keep in plan.items():
            mod = model.get_submodule(name)
            drop = torch.ones(mod.weight.shape[0], dtype=torch.bool)
            drop[keep] = False
            mod.weight[drop] = 0
            if mod.bias is not None:
                mod.bias[drop] = 0
            for other in groups[name].passthrough:
                sub = model.get_submodule(other)
                if isinstance(sub, _BatchNorm):  # eval BN maps 0 to bias - mean*scale
                    sub.running_mean[drop] = 0
                    sub.bias[drop] = 0


@pytest.mark.parametrize("name", ZOO)
def test_removing_zero_channels_is_exact(name: str) -> None:
    model = make(name)
    randomize_bn(model)
    gen = torch.Generator().manual_seed(3)
    plan = {}
    for layer in EXPECTED_PRUNABLE[name]:
        channels = model.get_submodule(layer).weight.shape[0]
        plan[layer] = torch.sort(torch.randperm(channels, generator=gen)[: channels // 2]).values
    _zero_dropped(model, plan)
    before = run(model)
    prune_channels(model, plan)
    for layer, keep in plan.items():
        assert model.get_submodule(layer).weight.shape[0] == len(keep)
    torch.testing.assert_close(run(model), before, atol=1e-5, rtol=1e-5)


def test_surgery_shapes_lenet5() -> None:
    model = make("lenet5")
    prune_channels(model, {"conv1": list(range(10)), "conv2": [0, 5, 7], "fc1": range(100)})
    assert model.conv1.weight.shape == (10, 1, 5, 5)
    assert model.conv2.weight.shape == (3, 10, 5, 5) and model.conv2.bias.shape == (3,)
    assert model.fc1.weight.shape == (100, 3 * 16)
    assert model.fc2.weight.shape == (10, 100)
    assert run(model).shape == (3, 10)


def test_surgery_keeps_the_right_slices() -> None:
    model = make("lenet5")
    w1, w2, fc1 = (model.get_submodule(n).weight.detach().clone()
                   for n in ("conv1", "conv2", "fc1"))
    prune_channels(model, {"conv1": [2, 4], "conv2": [1, 3]})
    assert torch.equal(model.conv1.weight, w1[[2, 4]])
    assert torch.equal(model.conv2.weight, w2[[1, 3]][:, [2, 4]])
    assert torch.equal(model.fc1.weight, torch.cat([fc1[:, 16:32], fc1[:, 48:64]], 1))


def test_prune_channels_errors() -> None:
    model = make("resnet20")
    with pytest.raises(ModelError, match="residual"):
        prune_channels(model, {"layer1.0.conv2": [0]})
    with pytest.raises(ModelError, match="non-empty"):
        prune_channels(model, {"layer1.0.conv1": []})
    with pytest.raises(ModelError, match=r"\[0, 16\)"):
        prune_channels(model, {"layer1.0.conv1": [0, 16]})
    with pytest.raises(ModelError, match="duplicates"):
        prune_channels(model, {"layer1.0.conv1": [1, 1]})


def test_parametrized_layers_are_refused() -> None:
    class Same(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w

    model = make("lenet5")
    torch.nn.utils.parametrize.register_parametrization(model.conv2, "weight", Same())
    with pytest.raises(ModelError, match="parametrized"):
        prune_channels(model, {"conv1": [0, 1]})


# --------------------------------------------------------------------------- the method


@pytest.mark.parametrize("name", ZOO)
def test_half_pruning_shrinks_the_model(name: str) -> None:
    model = make(name)
    shape = models.input_shape_of(model)
    params, macs = n_params(model), macs_per_sample(model, shape)
    widths = {n: model.get_submodule(n).weight.shape[0] for n in EXPECTED_PRUNABLE[name]}
    method = prune(model, ratio=0.5)
    for layer, width in widths.items():
        assert model.get_submodule(layer).weight.shape[0] == width - width // 2
    assert run(model).shape == (3, 10)
    assert n_params(model) < 0.6 * params
    assert macs_per_sample(model, shape) < 0.6 * macs
    report = method.report
    assert report is not None
    assert sorted(report.pruned) == sorted(EXPECTED_PRUNABLE[name])
    assert report.params == (params, n_params(model))
    assert report.macs == (macs, macs_per_sample(model, shape))
    assert report.to_dict()["params"] == [params, n_params(model)]
    assert "MACs" in str(report)


def test_expected_shapes_resnet20_and_mobilenet() -> None:
    net = make("resnet20")
    prune(net, ratio=0.5)
    block = net.layer3[1]
    assert block.conv1.weight.shape == (32, 64, 3, 3)
    assert block.bn1.weight.shape == (32,) and block.bn1.running_var.shape == (32,)
    assert block.conv2.weight.shape == (64, 32, 3, 3)
    assert net.layer2[0].shortcut[0].weight.shape == (32, 16, 1, 1)

    mob = make("mobilenet-tiny")
    method = prune(mob, ratio=0.5)
    blk = mob.blocks[1]
    assert blk.conv_dw.weight.shape == (32, 1, 3, 3) and blk.conv_dw.groups == 32
    assert blk.bn_dw.weight.shape == (32,)
    assert blk.conv_pw.weight.shape == (64, 32, 1, 1)
    assert mob.fc.weight.shape == (10, 128)
    assert method.report is not None and "blocks.1.conv_dw" in method.report.skipped


def test_ratio_dict_round_to_and_globs() -> None:
    net = make("mobilenet-tiny")
    prune(net, ratio={"*": 0.3, "conv1": 0.0}, round_to=8)
    assert net.conv1.out_channels == 32
    assert [b.conv_pw.out_channels for b in net.blocks] == [48, 96, 96, 184, 184]
    assert all(c % 8 == 0 for c in [b.conv_pw.out_channels for b in net.blocks])

    res = make("resnet20")
    method = prune(res, ratio=0.5, layers=["layer3.*"])  # glob: takes the prunable matches
    assert method.report is not None
    assert sorted(method.report.pruned) == [f"layer3.{b}.conv1" for b in range(3)]
    assert "layer3.0.shortcut.0" in method.report.skipped
    assert res.layer2[0].conv1.out_channels == 32


def test_method_errors() -> None:
    for bad in (1.0, -0.1, 1.5, {"*": 1.0}, float("nan")):
        with pytest.raises(RecipeError, match="ratio"):
            ChannelPruning(ratio=bad)
    with pytest.raises(RecipeError, match="norm"):
        ChannelPruning(ratio=0.5, norm="l3")
    with pytest.raises(RecipeError, match="round_to"):
        ChannelPruning(ratio=0.5, round_to=0)
    with pytest.raises(RecipeError, match="sparsity"):
        ChannelPruning(ratio=0.5, sparsity=0.5)
    with pytest.raises(ModelError, match=r"'fc3' cannot be channel-pruned: .*model output"):
        prune(make("lenet300"), ratio=0.5, layers=["fc1", "fc3"])
    with pytest.raises(ModelError, match=r"'layer1\.0\.conv2' cannot .*residual"):
        prune(make("resnet20"), ratio=0.5, layers=["layer1.0.conv2"])
    with pytest.raises(ModelError, match="no layer that can be channel-pruned"):
        prune(make("resnet20"), ratio=0.5, layers=["layer*.shortcut.*"])
    with pytest.raises(RecipeError, match="no value for layer"):
        prune(make("lenet300"), ratio={"fc1": 0.5})


def test_registered() -> None:
    assert METHODS["channel-prune"] is ChannelPruning
    method = create_method("channel-prune", ratio=0.25, norm="l2")
    assert method.summary() == {"method": "channel-prune", "ratio": 0.25, "norm": "l2",
                                "round_to": 1, "layers": None}


@pytest.mark.parametrize("name", ["lenet5", "resnet20", "mobilenet-tiny"])
def test_pruned_model_trains(name: str) -> None:
    model = make(name)
    prune(model, ratio=0.5)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(4, *models.input_shape_of(model))
    loss = F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, pname
    opt.step()
    assert torch.isfinite(run(model)).all()


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("name", ["lenet5", "resnet20", "mobilenet-tiny", "lenet300"])
def test_resize_to_shapes_round_trip(name: str) -> None:
    model = make(name)
    randomize_bn(model)
    prune(model, ratio=0.5)
    state = model.state_dict()
    fresh = models.create(name)
    with pytest.raises(RuntimeError):
        fresh.load_state_dict(state)
    resize_to_shapes(fresh, {k: tuple(v.shape) for k, v in state.items()})
    fresh.load_state_dict(state)
    torch.testing.assert_close(run(fresh), run(model), atol=0, rtol=0)
    assert macs_per_sample(fresh, models.input_shape_of(fresh)) == macs_per_sample(
        model, models.input_shape_of(model)
    )


def test_resize_to_shapes_rejects_wrong_kernels() -> None:
    with pytest.raises(ModelError, match="does not fit"):
        resize_to_shapes(make("lenet5"), {"conv1.weight": (10, 1, 3, 3)})
