"""Sparse variational dropout (sparse-vd) and the loss-term seam of the training loops."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

import deepsqueeze
from deepsqueeze import dsq, models
from deepsqueeze.cli import app
from deepsqueeze.codec.container import read_dsq
from deepsqueeze.data.loaders import sample_count
from deepsqueeze.errors import DeepSqueezeError, ModelError, RecipeError
from deepsqueeze.io import save_model
from deepsqueeze.methods import create_method, select_layers
from deepsqueeze.methods.pruning import PruningMask
from deepsqueeze.methods.variational_dropout import kl_divergence, log_alpha
from deepsqueeze.pipeline import CompressionSession
from deepsqueeze.runtime import load_runtime
from deepsqueeze.training import fit
from deepsqueeze.training.loop import TrainConfig

from .conftest import needs_mnist

torch.set_num_threads(1)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def _task(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels decided by the first 4 of 16 inputs: the other 12 are noise a sparse net drops."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 16, generator=gen)
    return x, x[:, :4].argmax(1)


def test_kl_approximation_matches_the_paper() -> None:
    la = torch.tensor([-10.0, 0.0, 3.0, 10.0])
    k1, k2, k3 = 0.63576, 1.87320, 1.48695
    expected = [-(k1 * torch.sigmoid(torch.tensor(k2 + k3 * a)) - 0.5 * math.log1p(math.exp(-a))
                  - k1) for a in la.tolist()]
    got = [float(kl_divergence(a.reshape(1))) for a in la]
    assert got == pytest.approx([float(e) for e in expected], rel=1e-5)
    assert got[0] > got[1] > got[2] > got[3] > 0  # more dropout, closer to the prior
    w = torch.tensor([1.0, 0.1]).reshape(2)
    assert log_alpha(w, torch.log(w * w) + 2).tolist() == pytest.approx([2.0, 2.0], abs=1e-4)
    assert log_alpha(torch.zeros(1), torch.zeros(1)).item() == 10  # clamped


def test_training_form_noise_and_evaluation_mask() -> None:
    model = _mlp()
    method = create_method("sparse-vd", train_size=100, init_log_sigma2=-14.0)
    method.apply(model, select_layers(model, None, method.supported))
    layer = model[1]
    assert isinstance(layer, nn.Linear) and layer.log_sigma2.shape == layer.weight.shape
    assert any(p is layer.log_sigma2 for p in model.parameters())  # the optimizer trains it
    with torch.no_grad():  # half of the weights: log α = 5 > 3, dropped at evaluation
        layer.log_sigma2[:, :8] = torch.log(layer.weight[:, :8] ** 2) + 5
    x = torch.randn(8, 16)
    model.eval()
    with torch.no_grad():
        kept = layer.weight.clone()
        kept[:, :8] = 0
        assert torch.allclose(layer(x), F.linear(x, kept, layer.bias), atol=1e-6)
        model.train()
        draws = torch.stack([layer(x) for _ in range(2000)])
        mean = F.linear(x, layer.weight, layer.bias)
        var = F.linear(x * x, torch.exp(layer.log_sigma2))  # local reparameterization
    assert torch.allclose(draws.mean(0), mean, atol=4 * float(var.sqrt().max()) / math.sqrt(2000))
    assert torch.allclose(draws.var(0), var, rtol=0.15)


def test_conv_layers_use_their_own_convolution() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, groups=1)
    model = nn.Sequential(conv)
    method = create_method("sparse-vd", train_size=10, init_log_sigma2=-14.0)
    method.apply(model, {"0": conv})
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        conv.log_sigma2[0] = 5.0 + torch.log(conv.weight[0] ** 2)
        model.eval()
        expected = F.conv2d(x, conv.weight * (torch.arange(4) != 0).view(4, 1, 1, 1),
                            conv.bias, stride=2, padding=1)
        assert torch.allclose(conv(x), expected, atol=1e-6)
        model.train()
        draws = torch.stack([conv(x) for _ in range(1500)])
    var = F.conv2d(x * x, torch.exp(conv.log_sigma2), stride=2, padding=1)
    assert torch.allclose(draws.var(0), var, rtol=0.2)


def test_fit_with_the_kl_term_prunes_and_finalize_leaves_a_plain_masked_layer(
        tmp_path: Path) -> None:
    x, y = _task()
    model = _mlp()
    fit(model, (x, y), TrainConfig(epochs=20, lr=0.05, batch_size=64), progress=False)
    method = create_method("sparse-vd", kl_weight=1.0, warmup_steps=20)
    method.use_data((x, y))  # the KL is divided by the 256 samples
    assert method.train_size == 256
    method.apply(model, select_layers(model, None, method.supported))
    assert method.kl_weight_at(0) == pytest.approx(1 / 20) and method.kl_weight_at(40) == 1.0
    fit(model, (x, y), TrainConfig(epochs=60, optimizer="adam", lr=0.01, weight_decay=0.0,
                                   batch_size=64), loss_terms=method.loss_terms(), progress=False)
    method.finalize(model)
    first = model[1]
    assert not hasattr(first, "log_sigma2") and not first._forward_hooks
    assert isinstance(first.parametrizations.weight[0], PruningMask)
    kept = method.summary()["kept_fraction"]
    assert kept["1"] < 0.6, kept  # the 12 noise inputs' weights go first
    noise_inputs_kept = float((first.weight[:, 4:] != 0).float().mean())
    signal_inputs_kept = float((first.weight[:, :4] != 0).float().mean())
    assert noise_inputs_kept < signal_inputs_kept
    with torch.no_grad():
        acc = float((model.eval()(x).argmax(1) == y).float().mean())
    assert acc > 0.8
    path = tmp_path / "vd.dsq"
    dsq.save(model, path)
    entries = {t["name"]: t for t in read_dsq(path).meta["tensors"]}
    assert entries["1.weight"]["encoding"].startswith("sparse")
    back = dsq.load(path, model=_mlp())
    runtime = load_runtime(path, model=_mlp())  # the sparse executors run the pruned layers
    with torch.no_grad():
        assert torch.allclose(back(x), model(x), atol=1e-6)
        assert torch.allclose(runtime(x), model(x), atol=1e-5)


def test_composes_after_prune_and_refuses_what_it_cannot_handle() -> None:
    model = _mlp()
    prune = create_method("prune", sparsity=0.5)
    prune.apply(model, select_layers(model, None, prune.supported))
    pruned = (model[1].weight == 0).clone()
    method = create_method("sparse-vd", train_size=64, threshold=-9.0)  # drops nearly all
    method.apply(model, select_layers(model, None, method.supported))
    method.finalize(model)
    chain = list(model[1].parametrizations.weight)
    assert len(chain) == 1 and isinstance(chain[0], PruningMask)  # the mask narrowed, not stacked
    assert (model[1].weight[pruned] == 0).all()
    assert int((model[1].weight != 0).sum()) < int((~pruned).sum())

    shared = _mlp()
    share = create_method("share", bits=2)
    share.apply(shared, select_layers(shared, None, share.supported))
    with pytest.raises(ModelError, match="apply sparse-vd before share"):
        create_method("sparse-vd", train_size=1).apply(shared, {"1": shared[1]})
    with pytest.raises(ModelError, match=r"set params\.train_size"):
        create_method("sparse-vd").apply(_mlp(), {"1": _mlp()[1]})
    with pytest.raises(RecipeError, match="kl_weight"):
        create_method("sparse-vd", kl_weight=-1)
    twice = _mlp()
    create_method("sparse-vd", train_size=1).apply(twice, {"1": twice[1]})
    with pytest.raises(ModelError, match="sparse-vd twice"):
        create_method("sparse-vd", train_size=1).apply(twice, {"1": twice[1]})


def test_compress_gives_the_full_training_size_and_a_users_loop_gets_the_term() -> None:
    x, y = _task(512)
    recipe = {"name": "vd", "stages": [
        {"method": "sparse-vd", "params": {"warmup_steps": 4},
         "finetune": {"epochs": 1, "optimizer": "adam", "lr": 0.01, "weight_decay": 0.0,
                      "batch_size": 64, "device": "cpu"}},
        {"method": "share", "params": {"bits": 3}}]}
    result = deepsqueeze.compress(_mlp(), recipe, train_data=(x, y), eval_data=(x, y),
                                  progress=False)
    assert [s.stage for s in result.stages] == ["sparse-vd", "share"]
    assert 0 < result.stages[0].method["kept_fraction"]["1"] <= 1

    assert deepsqueeze.prepare(_mlp(), recipe, train_data=(x, y)).method.train_size == 512
    model = _mlp()
    session = CompressionSession(model, recipe, example_inputs=x[:1])
    session.use_data((x[:100], y[:100]), train_size=512)
    with pytest.raises(DeepSqueezeError, match="outside a stage"):
        session.loss_term()
    session.start_stage()
    method = session.method
    assert method.train_size == 512  # the full set, not the sample methods measure on
    term = session.loss_term()
    assert term.dim() == 0 and term.requires_grad
    kl = float(method.kl().detach())
    assert float(term.detach()) == pytest.approx(kl * (1 / 4) / 512, rel=1e-5)
    session.step()
    assert float(session.loss_term().detach()) == pytest.approx(kl * (2 / 4) / 512, rel=1e-5)
    session.next_stage()  # share: no loss term
    assert float(session.loss_term()) == 0.0


def test_fit_refuses_a_loss_term_that_is_not_a_scalar() -> None:
    x, y = _task(64)
    with pytest.raises(DeepSqueezeError, match="scalar tensor"):
        fit(_mlp(), (x, y), TrainConfig(epochs=1, batch_size=32), progress=False,
            loss_terms=[lambda step, model: torch.ones(2)])


def test_sample_count_of_a_pair_counts_rows() -> None:
    assert sample_count((torch.zeros(7, 3), torch.zeros(7))) == 7
    assert sample_count(torch.utils.data.TensorDataset(torch.zeros(5, 2))) == 5


@needs_mnist
def test_cli_compress_with_sparse_vd(tmp_path: Path) -> None:
    """`deepsqueeze compress` runs a sparse-vd recipe: the KL is divided by the fine-tuning set's
    size (the 5,000-sample subset), the file holds the sparse weights and scores as the model."""
    net = models.create("lenet300")
    save_model(net, tmp_path / "dense.pt")
    recipe = tmp_path / "vd.yaml"
    recipe.write_text(json.dumps({"name": "vd", "model": "lenet300", "dataset": "mnist",
                                  "stages": [
        {"method": "sparse-vd", "params": {"kl_weight": 1.0},
         "finetune": {"epochs": 2, "optimizer": "adam", "lr": 0.0005, "weight_decay": 0.0}},
        {"method": "share", "params": {"bits": 4}}]}))
    res = CliRunner().invoke(app, ["compress", str(tmp_path / "dense.pt"), "--recipe",
                                   str(recipe), "--out", str(tmp_path / "m.dsq"), "--subset",
                                   "5000", "--no-progress", "--json", str(tmp_path / "c.json")])
    assert res.exit_code == 0, res.output
    numbers = json.loads((tmp_path / "c.json").read_text())
    method = numbers["stages"][0]["method"]
    assert method["kl_divisor"] == 5000  # the subset fine-tuned on, not the 4,096-sample probe
    assert method["kept_fraction"]["fc1"] < 0.9, method
    loaded = dsq.load(tmp_path / "m.dsq")
    assert float((loaded.fc1.weight == 0).float().mean()) > 0.1
