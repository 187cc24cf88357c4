"""Soft weight-sharing (soft-share) and the record recipes: tiny models, fast."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from deepsqueeze import dsq
from deepsqueeze.codec.container import compact_dsq, read_dsq
from deepsqueeze.errors import ModelError, RecipeError
from deepsqueeze.methods import create_method, select_layers
from deepsqueeze.methods.soft_sharing import GaussianMixturePrior, SoftSharing
from deepsqueeze.pipeline import load_recipe

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def _train_with(method: SoftSharing, model: nn.Module, steps: int = 60) -> None:
    """A few SGD steps on a fixed random task, the method's hooks after each."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=gen)
    y = torch.randint(0, 4, (64,), generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    hooks = method.step_hooks()
    for step in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for hook in hooks:
            hook(step, model)


def test_mixture_em_finds_separated_clusters() -> None:
    gen = torch.Generator().manual_seed(0)
    centers = torch.tensor([0.0, -0.5, 0.3])
    w = (centers[torch.randint(0, 3, (3000,), generator=gen)]
         + 0.01 * torch.randn(3000, generator=gen))
    prior = GaussianMixturePrior(w, 4, zero_mixing=0.3, min_std=1e-3)
    for _ in range(30):
        prior.em_step(w)
    found = sorted(float(m) for m in prior.means[1:])
    assert min(abs(f + 0.5) for f in found) < 0.02 and min(abs(f - 0.3) for f in found) < 0.02
    snapped = prior.snap(w)
    assert snapped.unique().numel() <= 4
    assert (snapped - w).abs().max() < 0.1
    assert prior.means[0] == 0


def test_soft_share_clusters_and_prunes_a_layer() -> None:
    model = _mlp()
    method = create_method("soft-share", bits=2, zero_mixing=0.8, pull=0.3, steps=40)
    method.apply(model, select_layers(model, None, method.supported))
    assert method.pull_at(0) < method.pull_at(20) < method.pull_at(39) == pytest.approx(0.3)
    _train_with(method, model)
    method.finalize(model)
    for layer in (model[1], model[3]):
        values = layer.weight.detach().unique()
        assert values.numel() <= 4  # zero + 3 shared values
        assert (layer.weight == 0).any()
    assert 0 < method.summary()["nonzero_fraction"]["1"] < 1


def test_soft_share_keeps_pruned_weights_pruned_and_saves_small(tmp_path: Path) -> None:
    model = _mlp()
    prune = create_method("prune", sparsity=0.5)
    prune.apply(model, select_layers(model, None, prune.supported))
    pruned = (model[1].weight == 0).clone()
    method = create_method("soft-share", bits=3, pull=0.2, steps=30)
    method.apply(model, select_layers(model, None, method.supported))
    _train_with(method, model, steps=30)
    method.finalize(model)
    assert (model[1].weight[pruned] == 0).all()
    assert model[1].weight.detach().unique().numel() <= 8
    prune.finalize(model)
    path = tmp_path / "m.dsq"
    dsq.save(model, path)
    compact_dsq(path, path)
    entries = {t["name"]: t for t in read_dsq(path).meta["tensors"]}
    assert entries["1.weight"]["encoding"] in ("sparse-codebook", "codebook")
    back = dsq.load(path, model=_mlp())
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.allclose(back(x), model(x))


def test_soft_share_refuses_what_it_cannot_handle() -> None:
    model = _mlp()
    share = create_method("share", bits=2)
    share.apply(model, select_layers(model, None, share.supported))
    method = create_method("soft-share", bits=2)
    with pytest.raises(ModelError, match="apply soft-share before share"):
        method.apply(model, select_layers(model, None, method.supported))
    with pytest.raises(ModelError, match=r"use 2\.\.8"):
        create_method("soft-share", bits=9).apply(_mlp(), {"1": _mlp()[1]})
    with pytest.raises(RecipeError, match="zero_mixing"):
        create_method("soft-share", zero_mixing=1.5)
    dead = _mlp()
    with torch.no_grad():
        dead[1].weight.zero_()
    with pytest.raises(ModelError, match="all zero"):
        create_method("soft-share").apply(dead, {"1": dead[1]})


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("record-*.yaml")),
                         ids=lambda p: p.stem)
def test_record_recipes_parse_and_name_registered_methods(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.name == path.stem and recipe.model in ("lenet300", "lenet5")
    for stage in recipe.stages:
        create_method(stage.method, **stage.params)
        assert stage.finetune is not None and stage.finetune.distill > 0
