"""Weight sharing: 1-D k-means, the SharedWeights parametrization and the ``share`` method."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from deepsqueeze.errors import ModelError, RecipeError
from deepsqueeze.methods.base import METHODS, create_method, select_layers
from deepsqueeze.methods.weight_sharing import (
    SharedWeights,
    WeightSharing,
    codebook_of,
    kmeans_1d,
    remove_sharing,
    share_layer,
    shared_layers,
)

# ------------------------------------------------------------------------------------ helpers


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3)  # 432 weights: more than 2**8
        self.fc1 = nn.Linear(16 * 6 * 6, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class ZeroMask(nn.Module):
    """A stand-in for a pruning parametrization: ``weight * mask``."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def _pruned_linear(sparsity: float = 0.9, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(100, 64)
    with torch.no_grad():
        keep = torch.rand_like(layer.weight) >= sparsity
        layer.weight.mul_(keep)
    return layer


def _distinct_nonzero(w: torch.Tensor) -> int:
    return int(torch.unique(w[w != 0]).numel())


# ------------------------------------------------------------------------------------ k-means


def test_linear_init_is_evenly_spaced_between_min_and_max():
    values = np.linspace(-1.0, 1.0, 1001)
    c, a = kmeans_1d(values, 5, init="linear", iters=0)
    np.testing.assert_allclose(c, [-1.0, -0.5, 0.0, 0.5, 1.0])
    dist = np.abs(values[:, None] - c[None, :])
    np.testing.assert_allclose(dist[np.arange(len(values)), a], dist.min(1))  # nearest; ties


def test_density_init_follows_quantiles():
    rng = np.random.default_rng(0)
    values = rng.standard_normal(4000)
    c, _ = kmeans_1d(values, 4, init="density", iters=0)
    np.testing.assert_allclose(c, np.quantile(values, [0.125, 0.375, 0.625, 0.875]))


@pytest.mark.parametrize("init", ["linear", "density", "random"])
def test_converged_centroids_are_cluster_means_and_nearest(init):
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(0, 0.05, 3000), rng.laplace(0, 0.2, 2000)])
    c, a = kmeans_1d(values, 16, init=init, iters=1000)
    assert len(c) <= 16 and a.shape == values.shape and a.dtype == np.int64
    assert np.all(np.diff(c) > 0)
    for j in range(len(c)):
        assert np.isclose(c[j], values[a == j].mean(), rtol=0, atol=1e-12)
    dist = np.abs(values[:, None] - c[None, :])
    np.testing.assert_allclose(dist[np.arange(len(values)), a], dist.min(1), atol=1e-12)


def test_kmeans_improves_on_its_linear_init():
    values = np.random.default_rng(2).standard_normal(5000) ** 3
    c0, a0 = kmeans_1d(values, 8, iters=0)
    c, a = kmeans_1d(values, 8, iters=30)
    assert ((values - c[a]) ** 2).sum() < ((values - c0[a0]) ** 2).sum()


def test_few_distinct_values_are_exact():
    values = np.array([[3.0, 1.0], [3.0, 2.0]])
    c, a = kmeans_1d(values, 4)
    np.testing.assert_array_equal(c, [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(c[a], values)
    c, a = kmeans_1d(values, 3)
    np.testing.assert_array_equal(c[a], values)
    c, a = kmeans_1d(np.full(10, 0.5), 1)
    np.testing.assert_array_equal(c, [0.5])


def test_kmeans_is_deterministic_and_seeded():
    values = torch.randn(3000, generator=torch.Generator().manual_seed(3))
    for init in ("linear", "density", "random"):
        c1, a1 = kmeans_1d(values, 32, init=init, seed=7)
        c2, a2 = kmeans_1d(values.clone(), 32, init=init, seed=7)
        np.testing.assert_array_equal(c1, c2)
        np.testing.assert_array_equal(a1, a2)
    c3, _ = kmeans_1d(values, 32, init="random", seed=8, iters=0)
    c4, _ = kmeans_1d(values, 32, init="random", seed=7, iters=0)
    assert not np.array_equal(c3, c4)


def test_empty_clusters_are_dropped():
    rng = np.random.default_rng(4)
    # Two tight groups far apart: linear init puts most centroids in the empty gap.
    values = np.concatenate([rng.uniform(-0.01, 0.01, 500), rng.uniform(9.99, 10.01, 500)])
    for init in ("linear", "density", "random"):
        c, a = kmeans_1d(values, 8, init=init)
        assert 2 <= len(c) <= 8
        assert np.all(np.bincount(a, minlength=len(c)) > 0)
        assert np.abs(values - c[a]).max() < 0.02


def test_kmeans_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        kmeans_1d(np.array([]), 4)
    with pytest.raises(ValueError, match="NaN"):
        kmeans_1d(np.array([1.0, np.nan]), 4)
    with pytest.raises(ValueError, match="k must"):
        kmeans_1d(np.array([1.0]), 0)


# ------------------------------------------------------------------------------------ layer


def test_shared_layer_keeps_pruned_zeros_and_few_values():
    layer = _pruned_linear(0.9)
    before = layer.weight.detach().clone()
    shared = share_layer(layer, bits=4)
    w = layer.weight.detach()
    assert torch.equal(w == 0, before == 0)
    assert not torch.signbit(w[w == 0]).any()  # +0.0, never -0.0
    assert _distinct_nonzero(w) <= 16 and shared.num_clusters <= 16
    assert torch.equal(shared.mask, before != 0)
    assert (shared.centroids != 0).all()
    assert (w - before).abs().max() < (before.max() - before.min()) / 16


def test_sharing_reads_the_effective_weight_of_a_pruning_parametrization():
    torch.manual_seed(0)
    layer = nn.Linear(50, 40)
    mask = (torch.rand_like(layer.weight) > 0.8).float()
    parametrize.register_parametrization(layer, "weight", ZeroMask(mask))
    share_layer(layer, bits=3)
    assert len(layer.parametrizations["weight"]) == 1  # the mask was baked in and replaced
    assert torch.equal(layer.weight.detach() != 0, mask.bool())
    assert _distinct_nonzero(layer.weight.detach()) <= 8


def test_sharing_after_real_pruning():
    pytest.importorskip("deepsqueeze.methods.pruning")
    if "prune" not in METHODS:
        pytest.skip("pruning method not registered")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    try:
        prune = create_method("prune", sparsity=0.9)
    except RecipeError as exc:  # its parameters are not settled yet
        pytest.skip(f"prune parameters differ: {exc}")
    prune.apply(model, select_layers(model, prune.params.layers))
    prune.finalize(model)
    assert all(parametrize.is_parametrized(m, "weight") for m in select_layers(model).values())
    zeros = {n: (m.weight.detach() == 0) for n, m in select_layers(model).items()}
    assert any(z.float().mean() > 0.5 for z in zeros.values())
    share = WeightSharing(bits=4)
    share.apply(model, select_layers(model, share.params.layers))
    for name, module in select_layers(model).items():
        w = module.weight.detach()
        assert torch.equal(w == 0, zeros[name])
        assert _distinct_nonzero(w) <= 16
        assert len(module.parametrizations["weight"]) == 1


def test_centroid_gradient_is_the_per_cluster_sum_of_weight_gradients():
    layer = _pruned_linear(0.7, seed=5)
    shared = share_layer(layer, bits=3)
    x = torch.randn(8, 100, generator=torch.Generator().manual_seed(1))
    r = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    (layer(x) * r).sum().backward()
    # Hand computation: dL/dW for a plain weight equal to the effective one is r^T x.
    dense_grad = r.T @ x
    expected = torch.zeros(shared.num_clusters)
    for j in range(shared.num_clusters):
        expected[j] = dense_grad[(shared.assignments == j) & shared.mask].sum()
    assert torch.allclose(shared.centroids.grad, expected, rtol=1e-5, atol=1e-5)
    assert layer.parametrizations["weight"].original.grad is None


def test_sgd_fine_tuning_moves_centroids_only():
    layer = _pruned_linear(0.9, seed=6)
    shared = share_layer(layer, bits=4)
    c0 = shared.centroids.detach().clone()
    a0, m0 = shared.assignments.clone(), shared.mask.clone()
    original0 = layer.parametrizations["weight"].original.detach().clone()
    opt = torch.optim.SGD(layer.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)
    target = nn.Linear(100, 64)
    for _ in range(20):
        x = torch.randn(32, 100, generator=gen)
        loss = ((layer(x) - target(x).detach()) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.allclose(shared.centroids.detach(), c0)
    assert torch.equal(shared.assignments, a0) and torch.equal(shared.mask, m0)
    assert torch.equal(layer.parametrizations["weight"].original.detach(), original0)
    w = layer.weight.detach()
    assert torch.equal(w == 0, ~m0)
    assert _distinct_nonzero(w) <= 16


def test_fit_trains_the_centroids():
    from deepsqueeze.training.loop import TrainConfig, fit

    @dataclass
    class Synthetic:  # what fit reads from an ImageDataset
        images: torch.Tensor
        labels: torch.Tensor

        @property
        def input_shape(self) -> tuple[int, int, int]:
            return tuple(self.images.shape[1:])

        def normalized(self) -> torch.Tensor:
            return self.images

    gen = torch.Generator().manual_seed(0)
    data = Synthetic(torch.randn(256, 3, 8, 8, generator=gen), torch.randint(0, 10, (256,)))
    torch.manual_seed(0)
    model = TinyCNN()
    share = WeightSharing(bits={"conv*": 6, "fc*": 4})
    share.apply(model, select_layers(model, share.params.layers))
    before = {n: codebook_of(m)[0].clone() for n, m in shared_layers(model).items()}
    fit(model, data, TrainConfig(epochs=1, batch_size=64, lr=0.01, device="cpu"), progress=False)
    share.finalize(model)
    for name, module in shared_layers(model).items():
        c, _, mask = codebook_of(module)
        assert not torch.equal(c, before[name])
        assert _distinct_nonzero(module.weight.detach()) <= c.numel()
        assert (module.weight.detach()[mask] != 0).all()


# ------------------------------------------------------------------------------------ method


def test_method_is_registered_with_defaults():
    method = create_method("share")
    assert isinstance(method, WeightSharing) and METHODS["share"] is WeightSharing
    assert method.summary() == {
        "method": "share",
        "bits": 5,
        "init": "linear",
        "layers": None,
        "iters": 30,
        "seed": 0,
    }


def test_per_layer_bits_by_glob():
    torch.manual_seed(0)
    model = TinyCNN()
    method = WeightSharing(bits={"conv*": 8, "fc*": 5})
    method.apply(model, select_layers(model, method.params.layers))
    layers = shared_layers(model)
    assert set(layers) == {"conv1", "fc1", "fc2"}
    assert 32 < codebook_of(model.conv1)[0].numel() <= 256
    for name in ("fc1", "fc2"):
        assert codebook_of(layers[name])[0].numel() <= 32
        assert _distinct_nonzero(layers[name].weight.detach()) <= 32


def test_layer_selection_and_unmatched_glob():
    torch.manual_seed(0)
    model = TinyCNN()
    method = WeightSharing(bits=4, layers=["fc*"])
    method.apply(model, select_layers(model, method.params.layers))
    assert set(shared_layers(model)) == {"fc1", "fc2"}
    model = TinyCNN()
    method = WeightSharing(bits={"fc*": 4, "conv9": 8, "conv*": 6})
    with pytest.raises(RecipeError, match="conv9"):
        method.apply(model, select_layers(model))
    method = WeightSharing(bits={"fc*": 4})
    with pytest.raises(RecipeError, match="conv1"):
        method.apply(model, select_layers(model))


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"bits": 0}, "bits"),
        ({"bits": 17}, "bits"),
        ({"bits": {"fc*": 0}}, "bits"),
        ({"bits": {"fc*": 17}}, "bits"),
        ({"bits": "many"}, "bits"),
        ({"init": "kmeans++"}, "init"),
        ({"iters": -1}, "iters"),
        ({"bitz": 4}, "bitz"),
    ],
)
def test_bad_params_name_the_field(params, field):
    with pytest.raises(RecipeError, match=field):
        WeightSharing(**params)


def test_8_bit_sharing_keeps_the_output_close():
    torch.manual_seed(0)
    model = TinyCNN()
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    method = WeightSharing(bits=8)
    method.apply(model, select_layers(model))
    with torch.no_grad():
        out = model(x)
    assert (out - ref).norm() / ref.norm() < 0.01


def test_invalid_weights_raise_model_error_naming_the_layer_before_any_change():
    model = TinyCNN()
    with torch.no_grad():
        model.fc2.weight[0, 0] = float("nan")
    with pytest.raises(ModelError, match=r"'fc2'.*NaN"):
        WeightSharing(bits=4).apply(model, select_layers(model))
    assert not shared_layers(model)  # validated first: conv1, fc1 untouched
    model = TinyCNN()
    with torch.no_grad():
        model.fc1.weight[1, 1] = float("inf")
    with pytest.raises(ModelError, match="'fc1'"):
        WeightSharing(bits=4).apply(model, select_layers(model))
    model = TinyCNN()
    with torch.no_grad():
        model.fc1.weight.zero_()
    with pytest.raises(ModelError, match=r"'fc1'.*zero"):
        WeightSharing(bits=4).apply(model, select_layers(model))


def test_zero_centroid_is_nudged():
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():  # symmetric pair whose cluster mean is exactly 0
        layer.weight.copy_(torch.tensor([[-1.0, -0.001, 0.001, 1.0]]))
    shared = share_layer(layer, bits=1, init="linear", iters=0)
    assert shared.num_clusters == 2
    layer2 = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        layer2.weight.copy_(torch.tensor([[-0.5, 0.5, 2.0]]))
    shared2 = share_layer(layer2, bits=1)  # clusters {-0.5, 0.5} -> mean 0 -> nudged
    assert (shared2.centroids != 0).all() and (layer2.weight != 0).all()
    model = nn.Sequential(layer2)
    with torch.no_grad():
        shared2.centroids[0] = 0.0  # as if fine-tuning landed exactly on zero
    WeightSharing(bits=1).finalize(model)
    assert (shared2.centroids != 0).all() and (layer2.weight != 0).all()


def test_resharing_and_removal():
    torch.manual_seed(0)
    model = TinyCNN()
    method = WeightSharing(bits=6)
    method.apply(model, select_layers(model))
    WeightSharing(bits=2).apply(model, {"fc1": model.fc1})
    assert codebook_of(model.fc1)[0].numel() <= 4
    assert len(model.fc1.parametrizations["weight"]) == 1
    effective = {n: m.weight.detach().clone() for n, m in select_layers(model).items()}
    clone = copy.deepcopy(model)
    assert set(shared_layers(clone)) == {"conv1", "fc1", "fc2"}
    assert sorted(remove_sharing(model)) == ["conv1", "fc1", "fc2"]
    assert not shared_layers(model)
    for name, module in select_layers(model).items():
        assert not parametrize.is_parametrized(module)
        assert isinstance(module.weight, nn.Parameter) and module.weight.requires_grad
        assert torch.equal(module.weight.detach(), effective[name])
    with pytest.raises(ModelError, match="no shared weights"):
        codebook_of(model.fc1)


def test_shared_weights_validates_shapes():
    with pytest.raises(ValueError, match="shape"):
        SharedWeights(torch.ones(2), torch.zeros(3, 2, dtype=torch.long), torch.ones(2, 3))
    with pytest.raises(ValueError, match="1-D"):
        SharedWeights(torch.ones(0), torch.zeros(2, dtype=torch.long), torch.ones(2))
