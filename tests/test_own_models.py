"""A user's own models (not in the zoo), data, loss, metric and training loop (issue 10).

Every model here is defined in this file, trained a little on synthetic data, and compressed
with a prune + share recipe through the user's DataLoader and loss; CPU seconds each.
"""

from __future__ import annotations

import ast
import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import deepsqueeze
from deepsqueeze.data import as_loader
from deepsqueeze.errors import DeepSqueezeError, ModelError, OptionError, RecipeError
from deepsqueeze.evaluation import evaluate
from deepsqueeze.methods import create_method, select_layers
from deepsqueeze.methods.weight_sharing import shared_layers
from deepsqueeze.metrics.macs import macs_per_sample
from deepsqueeze.metrics.timing import time_model
from deepsqueeze.pipeline import AccuracyFloorError, CompressionSession, prepare
from deepsqueeze.pipeline.session import bake
from deepsqueeze.training import TrainConfig, fit

from .conftest import needs_mnist

SRC = Path(deepsqueeze.__file__).parent

# ------------------------------------------------------------------------------------ models


class BNDropCNN(nn.Module):
    """A ``features`` Sequential with BatchNorm and Dropout, and a ``head``."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
            nn.Dropout(0.1), nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(32, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class FunctionalNet(nn.Module):
    """Functional calls in forward (F.relu, F.max_pool2d, torch.flatten)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.fc(torch.flatten(x, 1))


class ResidualNet(nn.Module):
    """A residual add around two convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(x + self.conv2(F.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


class TwoInputs(nn.Module):
    """forward(image, side): an image branch and a tabular branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.side = nn.Linear(5, 8)
        self.fc = nn.Linear(4 + 8, 3)

    def forward(self, image: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.conv(image)).mean(dim=(2, 3))
        return self.fc(torch.cat([a, F.relu(self.side(side))], dim=1))


class TabularMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 32)
        self.fc2 = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class EmbeddingNet(nn.Module):
    """Token ids (N, L) → Embedding → Conv1d → mean over positions → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens).transpose(1, 2)  # (N, 8, L)
        return self.fc(F.relu(self.conv(x)).mean(dim=2))


def _images(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes told apart by their brightness and where the bright square is."""
    y = torch.randint(0, 3, (n,), generator=gen)
    x = 0.3 * torch.randn(n, 1, 8, 8, generator=gen) + 0.8 * (y.view(n, 1, 1, 1) - 1)
    for c in range(3):
        x[y == c, :, 2 * c : 2 * c + 3, 2 * c : 2 * c + 3] += 1.5
    return x, y


def make_data(kind: str, n: int = 192, seed: int = 0) -> tuple[object, torch.Tensor]:
    """(inputs, labels); inputs a tensor or a tuple for the two-input model."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "tabular":
        x = torch.randn(n, 10, generator=gen)
        y = (x[:, 0] > 0.5).long() + (x[:, 1] > 0.5).long()
        return x, y
    if kind == "tokens":
        y = torch.randint(0, 3, (n,), generator=gen)
        tokens = torch.randint(3, 20, (n, 6), generator=gen)
        tokens[:, 0] = y  # the class is written in the first token
        return tokens, y
    x, y = _images(n, gen)
    if kind == "two":
        return (x, torch.randn(n, 5, generator=gen)), y
    return x, y


MODELS = {
    "bn-dropout-cnn": (BNDropCNN, "images"),
    "functional": (FunctionalNet, "images"),
    "residual": (ResidualNet, "images"),
    "two-inputs": (TwoInputs, "two"),
    "tabular-mlp": (TabularMLP, "tabular"),
    "embedding": (EmbeddingNet, "tokens"),
}

RECIPE = {
    "name": "prune-share",
    "stages": [
        {"method": "prune", "params": {"sparsity": 0.6},
         "finetune": {"epochs": 1, "lr": 0.02, "batch_size": 32, "device": "cpu"}},
        {"method": "share", "params": {"bits": 3},
         "finetune": {"epochs": 1, "lr": 0.002, "batch_size": 32, "device": "cpu"}},
    ],
}


class CountingLoss(nn.Module):
    """The user's loss: cross-entropy with label smoothing, counting its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return F.cross_entropy(outputs, target, label_smoothing=0.05)


def _loader(inputs: object, y: torch.Tensor, shuffle: bool = True, seed: int = 0) -> DataLoader:
    xs = inputs if isinstance(inputs, tuple) else (inputs,)
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(*xs, y), batch_size=32, shuffle=shuffle, generator=gen)


def _trained(name: str) -> tuple[nn.Module, DataLoader, tuple[object, torch.Tensor]]:
    cls, kind = MODELS[name]
    torch.manual_seed(0)
    model = cls()
    inputs, y = make_data(kind)
    loader = _loader(inputs, y)
    fit(model, loader, TrainConfig(epochs=4, lr=0.05, device="cpu"), progress=False)
    return model, loader, make_data(kind, n=96, seed=1)


# ------------------------------------------------------------------------------------ compress


@pytest.mark.parametrize("name", list(MODELS))
def test_user_model_compresses_with_own_data_and_loss(name):
    model, loader, (x_eval, y_eval) = _trained(name)
    loss = CountingLoss()
    seen: list[tuple[str, int]] = []

    class Log:
        def on_stage_start(self, index, stage, net):
            seen.append(("start", index))

        def on_stage_end(self, index, record, net):
            seen.append(("end", index))

    result = deepsqueeze.compress(model, RECIPE, train_data=loader, eval_data=(x_eval, y_eval),
                                  loss_fn=loss, progress=False, callbacks=[Log()])
    # one epoch per stage through the user's loss, plus the evaluation loss (one batch) of the
    # baseline and of each stage
    assert loss.calls == 2 * len(loader) + 3
    assert seen == [("start", 0), ("end", 0), ("start", 1), ("end", 1)]
    assert result.baseline_accuracy is not None and result.baseline_accuracy > 0.5
    assert [s.stage for s in result.stages] == ["prune", "share"]
    assert all(s.metric is not None and 0 <= s.metric <= 1 for s in result.stages)
    # every Linear/Conv/Embedding was pruned to 60% and shared to at most 8 values
    layers = {n for n, m in model.named_modules()
              if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding))}
    assert set(result.stages[0].layers) == layers == set(shared_layers(model))
    for layer in layers:
        w = model.get_submodule(layer).weight.detach()
        assert (w == 0).float().mean() >= 0.55, layer  # round((1 - 0.6) n) weights kept
        assert len(torch.unique(w[w != 0])) <= 8, layer
    text = repr(result)
    assert len(text) < 300 and "Linear(" not in text and "prune" in text


def test_compress_with_a_user_metric_and_regression_loss():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 10, generator=gen)
    target = x[:, :2].sum(dim=1, keepdim=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 1))
    fit(model, (x, target), TrainConfig(epochs=10, lr=0.05), loss_fn=nn.MSELoss(), progress=False)

    def neg_mse(outputs: torch.Tensor, targets: torch.Tensor) -> float:
        return -float(F.mse_loss(outputs, targets))

    result = deepsqueeze.compress(model, RECIPE, train_data=(x, target), eval_data=(x, target),
                                  loss_fn=nn.MSELoss(), metric=neg_mse, progress=False)
    assert result.metric_name == "neg_mse" and result.baseline_accuracy is None
    assert result.stages[-1].metric is not None and result.stages[-1].metric < 0
    assert result.stages[-1].test_accuracy is None
    # without a metric, a regression model is a clear error, not a wrong accuracy
    with pytest.raises(DeepSqueezeError, match="metric="):
        deepsqueeze.compress(copy.deepcopy(model), RECIPE, train_data=(x, target),
                             eval_data=(x, target), loss_fn=nn.MSELoss(), progress=False)


def test_metric_of_the_model_is_called_with_the_model():
    model, loader, data = _trained("tabular-mlp")
    calls = []

    def my_eval(net: nn.Module) -> float:
        calls.append(type(net).__name__)
        return 0.5

    result = deepsqueeze.compress(model, RECIPE, train_data=loader, eval_data=data,
                                  metric=my_eval, progress=False)
    assert calls == ["TabularMLP"] * 3 and result.stages[-1].metric == 0.5


def test_dataset_takes_a_name_only():
    model, loader, _ = _trained("tabular-mlp")
    with pytest.raises(OptionError, match="train_data=") as err:
        deepsqueeze.compress(model, RECIPE, dataset=loader, progress=False)
    assert "DataLoader" in str(err.value) and "strip" not in str(err.value)
    with pytest.raises(OptionError, match="not both"):
        deepsqueeze.compress(model, RECIPE, dataset="mnist", train_data=loader, progress=False)
    with pytest.raises(OptionError, match="train_data"):
        deepsqueeze.compress(model, RECIPE, train_data=42, progress=False)


def test_a_model_and_data_that_do_not_fit_fail_clearly():
    two = TwoInputs()
    x, y = make_data("images", n=64)  # one input for a model that takes two
    with pytest.raises(ModelError, match=r"TwoInputs cannot run on .*1 input\(s\)"):
        deepsqueeze.compress(two, RECIPE, train_data=(x, y), progress=False)
    with pytest.raises(ModelError, match="TabularMLP cannot run"):
        deepsqueeze.compress(TabularMLP(), RECIPE, train_data=(x, y), progress=False)


def test_recipe_model_is_only_checked_for_zoo_models():
    model, loader, data = _trained("tabular-mlp")
    recipe = {**RECIPE, "model": "lenet300"}  # written for a zoo model: not checked here
    result = deepsqueeze.compress(model, recipe, train_data=loader, eval_data=data,
                                  progress=False)
    assert len(result.stages) == 2


def test_accuracy_floor_stops_the_recipe_before_saving(tmp_path):
    model, loader, data = _trained("tabular-mlp")
    out = tmp_path / "m.dsq"
    with pytest.raises(AccuracyFloorError, match=r"below accuracy_floor 1\.01") as err:
        deepsqueeze.compress(model, RECIPE, train_data=loader, eval_data=data, out=out,
                             accuracy_floor=1.01, progress=False)
    assert [s.stage for s in err.value.result.stages] == ["prune"]  # share never ran
    assert "share" in str(err.value) and not out.exists()
    assert not shared_layers(model)
    with pytest.raises(OptionError, match="eval_data"):
        deepsqueeze.compress(model, RECIPE, train_data=loader, accuracy_floor=0.5,
                             progress=False)
    low = deepsqueeze.compress(_trained("tabular-mlp")[0], RECIPE, train_data=loader,
                               eval_data=data, accuracy_floor=0.0, progress=False)
    assert len(low.stages) == 2


def test_distillation_works_for_user_models():
    model, loader, data = _trained("bn-dropout-cnn")
    recipe = copy.deepcopy(RECIPE)
    recipe["stages"][0]["finetune"]["distill"] = 0.5
    result = deepsqueeze.compress(model, recipe, train_data=loader, eval_data=data,
                                  loss_fn=CountingLoss(), progress=False)
    assert result.stages[0].metric is not None


def test_channel_pruning_a_user_conv_chain_and_refusing_conv1d():
    model, loader, data = _trained("bn-dropout-cnn")
    recipe = {"stages": [{"method": "channel-prune", "params": {"ratio": 0.5},
                          "finetune": {"epochs": 1, "lr": 0.01, "batch_size": 32}}]}
    result = deepsqueeze.compress(model, recipe, train_data=loader, eval_data=data,
                                  progress=False)
    assert model.features[0].out_channels == 3 and model.features[1].num_features == 3
    assert result.stages[0].metric is not None
    emb = EmbeddingNet()
    method = create_method("channel-prune", ratio=0.5, layers=["type:Conv1d"])
    with pytest.raises(ModelError, match="cannot handle Conv1d"):
        select_layers(emb, method.params.layers, method.supported)


# ------------------------------------------------------------------------------------ own loop


def _own_loop(model: nn.Module, recipe: dict, loader: DataLoader) -> CompressionSession:
    session = prepare(model, recipe)
    for stage in session:
        cfg = stage.finetune
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay, nesterov=True)
        model.train()
        for _ in range(int(cfg.epochs)):
            for x, y in loader:
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                session.step()
    session.finalize()
    return session


def test_own_loop_equals_builtin_finetuning():
    recipe = {
        "stages": [
            {"method": "prune",
             "params": {"sparsity": 0.75, "schedule": {"kind": "polynomial", "end_step": 8,
                                                       "frequency": 2}},
             "finetune": {"epochs": 2, "lr": 0.05, "lr_schedule": "constant",
                          "weight_decay": 1e-4, "device": "cpu"}},
            {"method": "share", "params": {"bits": 3},
             "finetune": {"epochs": 1, "lr": 0.01, "lr_schedule": "constant", "device": "cpu"}},
        ],
    }
    base, _, _ = _trained("tabular-mlp")
    x, y = make_data("tabular")
    builtin, own = copy.deepcopy(base), copy.deepcopy(base)
    deepsqueeze.compress(builtin, recipe, train_data=_loader(x, y, seed=3), progress=False)
    session = _own_loop(own, recipe, _loader(x, y, seed=3))
    assert session.done and session.steps == len(_loader(x, y))
    bake(builtin)
    a, b = builtin.state_dict(), own.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (own.fc1.weight == 0).float().mean() >= 0.75
    # and the loop really trained: a different order gives different weights
    other = copy.deepcopy(base)
    _own_loop(other, recipe, _loader(x, y, seed=4))
    assert not torch.equal(other.fc1.weight, own.fc1.weight)


def test_session_misuse_is_explained():
    model = TabularMLP()
    session = CompressionSession(model, RECIPE)
    with pytest.raises(DeepSqueezeError, match="outside a stage"):
        session.step()
    session.start_stage()
    with pytest.raises(DeepSqueezeError, match="still running"):
        session.start_stage()
    with pytest.raises(DeepSqueezeError, match=r"\['share'\] .* have not run"):
        session.finalize()
    assert session.next_stage() is not None and session.next_stage() is None
    session.finalize()
    assert not shared_layers(model) and session.done  # baked into plain weights
    with pytest.raises(ModelError, match=r"nn\.Module"):
        prepare("model.pt", RECIPE)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ fit


def test_fit_on_every_kind_of_data():
    x, y = make_data("tabular")

    class Pairs(Dataset):
        def __len__(self) -> int:
            return len(y)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return x[i], y[i]

    results = []
    for data in ((x, y), (x.numpy(), y.numpy()), Pairs(), TensorDataset(x, y),
                 as_loader((x, y), batch_size=128)):
        torch.manual_seed(0)
        model = TabularMLP()
        results.append(fit(model, data, TrainConfig(epochs=2), test_set=(x, y), progress=False))
    # (X, y), arrays, Dataset and TensorDataset are batched the same way: same history
    losses = [r.history[-1]["train_loss"] for r in results]
    assert losses[0] == pytest.approx(losses[1]) == pytest.approx(losses[2])
    assert losses[0] == pytest.approx(losses[3])
    assert all(r.test_accuracy is not None for r in results)
    # momentum 0 is plain SGD (was a raw ValueError: Nesterov needs momentum)
    fit(TabularMLP(), (x, y), TrainConfig(epochs=1, momentum=0), progress=False)
    with pytest.raises(OptionError, match="augment"):
        fit(TabularMLP(), (x, y), TrainConfig(augment=True), progress=False)
    with pytest.raises(OptionError, match="out_dir"):
        fit(TabularMLP(), (x, y), TrainConfig(epochs=1), out_dir="runs/x", progress=False)
    with pytest.raises(DeepSqueezeError, match="a batch must be"):
        fit(TabularMLP(), DataLoader(x, batch_size=8), TrainConfig(epochs=1), progress=False)


def test_fit_multi_input_fractional_epochs():
    (image, side), y = make_data("two")
    torch.manual_seed(0)
    model = TwoInputs()
    result = fit(model, ((image, side), y), TrainConfig(epochs=1.5, batch_size=64),
                 test_set=TensorDataset(image, side, y), progress=False)
    assert [h["step"] for h in result.history] == [3, 5]


# ------------------------------------------------------------------------------------ metrics


def test_macs_and_latency_follow_example_inputs():
    emb = EmbeddingNet()
    tokens = torch.randint(0, 20, (4, 6))
    # Conv1d: 6 positions × 8 out × 8 in × 3; Linear 8 × 3; the lookup is not counted
    assert macs_per_sample(emb, example_inputs=tokens) == 6 * 8 * 8 * 3 + 8 * 3
    two = TwoInputs()
    (image, side), _ = make_data("two", n=4)
    assert macs_per_sample(two, example_inputs=(image, side)) == (
        64 * 4 * 9 + 5 * 8 + 12 * 3
    )
    assert macs_per_sample(TabularMLP(), (10,)) == 10 * 32 + 32 * 3
    timing = time_model(emb, None, 16, runs=3, warmup=1, example_inputs=tokens)
    assert timing.batch_size == 16 and timing.runs == 3


def test_evaluate_user_model_on_user_data():
    model, _, (x, y) = _trained("embedding")
    report = evaluate(model, data=(x, y), latency_runs=3, throughput_runs=2,
                      throughput_batch=8)
    assert report.model == "EmbeddingNet" and report.dataset == "user data"
    assert report.top1_accuracy is not None and report.samples == len(y)
    assert report.macs_per_sample == 6 * 8 * 8 * 3 + 8 * 3
    assert report.loss is not None
    (image, side), y2 = make_data("two", n=32)
    two = TwoInputs()
    rep2 = evaluate(two, data=((image, side), y2), metric=lambda o, t: 0.25,
                    measure_speed=False)
    assert rep2.metric == 0.25 and rep2.top1_accuracy is None
    assert "0.25" in str([row for row in rep2.table().columns[1]._cells])


# ------------------------------------------------------------------------------------ methods


def test_per_layer_typo_names_the_unknown_key():
    model = TabularMLP()
    method = create_method("prune", sparsity={"fc1": 0.5, "fcc2": 0.5})
    with pytest.raises(RecipeError, match="'fcc2'") as err:
        method.apply(model, select_layers(model, None, method.supported))
    assert "misspelled" in str(err.value) and "fc2" in str(err.value)


def test_prune_and_share_target_conv1d_and_embedding():
    model = EmbeddingNet()
    prune = create_method("prune", sparsity=0.5, layers=["type:Embedding", "type:Conv1d"])
    layers = select_layers(model, prune.params.layers, prune.supported)
    assert set(layers) == {"embed", "conv"}
    prune.apply(model, layers)
    assert (model.embed.weight == 0).float().mean() == 0.5
    share = create_method("share", bits=2)
    share.apply(model, select_layers(model, None, share.supported))
    assert len(torch.unique(model.embed.weight[model.embed.weight != 0])) <= 4


def test_methods_do_not_import_training_or_above():
    """Layering: data, models → methods → ...: no method imports training or the pipeline."""
    for path in sorted((SRC / "methods").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                assert not name.startswith(("deepsqueeze.training", "deepsqueeze.pipeline")), (
                    f"{path.name} imports {name}"
                )


# ------------------------------------------------------------------------------------ files


@pytest.mark.parametrize("name", list(MODELS))
def test_user_model_file_holds_the_compressed_model(name, tmp_path):
    model, loader, (x_eval, y_eval) = _trained(name)
    out = tmp_path / f"{name}.dsq"
    result = deepsqueeze.compress(model, RECIPE, train_data=loader, eval_data=(x_eval, y_eval),
                                  loss_fn=CountingLoss(), out=out, progress=False)
    assert result.file_metric == result.stages[-1].metric  # the file's own score
    assert result.file_report is not None and result.path == out
    xs = x_eval if isinstance(x_eval, tuple) else (x_eval,)
    with torch.no_grad():
        expected = model.eval()(*xs)
        skeleton = deepsqueeze.load(out, model=MODELS[name][0]())  # the user's class
        rebuilt = deepsqueeze.load(out)  # class-free: from the file's graph
        assert torch.equal(skeleton(*xs), expected)
        assert torch.equal(rebuilt(*xs), expected)


def test_own_loop_file_equals_builtin_file(tmp_path):
    """The recipe's default cosine schedule and weight decay, one shuffled loader for both
    stages: a plain loop with session.step() writes the very bytes compress writes."""
    base, _, _ = _trained("embedding")
    tokens, y = make_data("tokens")
    builtin, own = copy.deepcopy(base), copy.deepcopy(base)
    deepsqueeze.compress(builtin, RECIPE, train_data=_loader(tokens, y, seed=5),
                         example_inputs=tokens[:1], out=tmp_path / "builtin.dsq", progress=False)
    loader = _loader(tokens, y, seed=5)
    session = prepare(own, RECIPE, example_inputs=tokens[:1])
    for stage in session:
        cfg = stage.finetune
        steps = math.ceil(cfg.epochs * len(loader))
        opt = torch.optim.SGD(own.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay, nesterov=True)
        schedule = torch.optim.lr_scheduler.LambdaLR(  # cosine per step, as the built-in one
            opt, lambda step, steps=steps: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
        )
        own.train()
        for _ in range(math.ceil(cfg.epochs)):
            for x, target in loader:
                loss = F.cross_entropy(own(x), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
                session.step()
    session.save(tmp_path / "own.dsq")
    assert (tmp_path / "own.dsq").read_bytes() == (tmp_path / "builtin.dsq").read_bytes()


# ------------------------------------------------------------------------------------ built-in data


class SmallMnistNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 5, stride=2)
        self.fc = nn.Linear(4 * 12 * 12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.relu(self.conv(x)), 1))


@needs_mnist
def test_user_model_on_a_builtin_dataset():
    """check_fits runs a user model on the dataset's first image instead of asking its spec."""
    recipe = {"stages": [{"method": "prune", "params": {"sparsity": 0.5},
                          "finetune": {"epochs": 1, "lr": 0.05, "batch_size": 64}}]}
    torch.manual_seed(0)
    result = deepsqueeze.compress(SmallMnistNet(), recipe, dataset="mnist", subset=640,
                                  progress=False)
    assert result.stages[0].test_accuracy is not None and result.stages[0].test_accuracy > 0.5
    with pytest.raises(ModelError, match=r"TabularMLP cannot run on .*\(1, 1, 28, 28\)"):
        deepsqueeze.compress(TabularMLP(), recipe, dataset="mnist", subset=640, progress=False)
    from deepsqueeze.data import load_dataset
    from deepsqueeze.training import check_fits

    check_fits(SmallMnistNet(), load_dataset("mnist", "test"))
    with pytest.raises(ModelError, match="TabularMLP cannot run on mnist images"):
        check_fits(TabularMLP(), load_dataset("mnist", "test"))


def test_session_saves_a_zoo_model_by_its_spec(tmp_path):
    net = deepsqueeze.models.create("lenet300")
    recipe = {"model": "lenet300", "stages": [{"method": "prune", "params": {"sparsity": 0.9}}]}
    session = prepare(net, recipe, example_inputs=torch.zeros(2, 1, 28, 28))
    assert list(session) == [session.recipe.stages[0]]  # no training: the stage just ends
    report = session.save(tmp_path / "z.dsq")
    assert report.compression > 5
    loaded = deepsqueeze.load(tmp_path / "z.dsq")
    assert torch.equal(loaded.fc1.weight, net.fc1.weight)
    with pytest.raises(RecipeError, match="written for model 'lenet5'"):
        prepare(deepsqueeze.models.create("lenet300"), {**recipe, "model": "lenet5"})


# ------------------------------------------------------------------------------------ teacher


def _tabular() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(256, 10, generator=gen)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


DISTIL = {"name": "distil", "stages": [
    {"method": "prune", "params": {"sparsity": 0.5},
     "finetune": {"epochs": 3, "lr": 0.05, "batch_size": 32, "device": "cpu", "distill": 1.0}}]}


class ConstantTeacher(nn.Module):
    """Another architecture with the same outputs: always very sure of class 2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([0.0, 0.0, 20.0]).expand(len(x), 3)


def test_a_given_teacher_is_the_one_distilled_from(tmp_path: Path) -> None:
    x, y = _tabular()
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    result = deepsqueeze.compress(student, DISTIL, train_data=(x, y), eval_data=(x, y),
                                  teacher=ConstantTeacher(), progress=False)
    assert result.teacher == "ConstantTeacher module" and result.to_dict()["teacher"]
    with torch.no_grad():  # pure distillation (distill 1.0) from a teacher that says "2"
        assert float((student(x).argmax(1) == 2).float().mean()) > 0.9
    torch.manual_seed(0)
    own = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    assert deepsqueeze.compress(own, DISTIL, train_data=(x, y),
                                progress=False).teacher == "the model before compression"


def test_a_teacher_from_a_file_or_the_recipe_and_its_refusals(tmp_path: Path) -> None:
    import deepsqueeze.models as zoo
    from deepsqueeze.io import save_model

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (64,), generator=gen)
    teacher_file = tmp_path / "teacher.pt"
    save_model(zoo.create("lenet5"), teacher_file)
    recipe = {**DISTIL, "teacher": str(teacher_file)}
    result = deepsqueeze.compress(zoo.create("lenet300"), recipe, train_data=(x, y),
                                  progress=False, out=tmp_path / "m.dsq")
    assert result.teacher == str(teacher_file)
    as_dsq = deepsqueeze.compress(zoo.create("lenet300"), DISTIL, train_data=(x, y),
                                  progress=False, teacher=tmp_path / "m.dsq")
    assert as_dsq.teacher.endswith("m.dsq")  # a compressed file teaches too
    with pytest.raises(ModelError, match="teacher's outputs have shape"):
        deepsqueeze.compress(zoo.create("lenet300"), DISTIL, train_data=(x, y), progress=False,
                             teacher=zoo.create("lenet300", num_classes=7))
    with pytest.raises(OptionError, match="is not a file"):
        deepsqueeze.compress(zoo.create("lenet300"), DISTIL, train_data=(x, y), progress=False,
                             teacher=tmp_path / "missing.pt")
    plain = {"name": "p", "stages": [{"method": "prune", "params": {"sparsity": 0.5}}]}
    with pytest.raises(OptionError, match="no stage distils"):
        deepsqueeze.compress(zoo.create("lenet300"), plain, train_data=(x, y), progress=False,
                             teacher=teacher_file)
    with pytest.raises(RecipeError, match="teacher"):
        deepsqueeze.compress(zoo.create("lenet300"), {**DISTIL, "teacher": ""},
                             train_data=(x, y), progress=False)
