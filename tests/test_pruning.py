"""Magnitude pruning: schedules, mask computation, masks under fine-tuning, validation."""

from __future__ import annotations

import itertools
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from deepsqueeze.data import DATASETS, ImageDataset
from deepsqueeze.errors import ModelError, RecipeError
from deepsqueeze.methods.base import create_method, select_layers
from deepsqueeze.methods.pruning import (
    MagnitudePruning,
    PruningMask,
    get_mask,
    global_magnitude_masks,
    layer_sparsity,
    magnitude_mask,
    masked_layers,
    remove_pruning,
    set_mask,
    threshold_mask,
)
from deepsqueeze.methods.schedules import Iterative, OneShot, Polynomial, polynomial_sparsity
from deepsqueeze.training.loop import TrainConfig, fit


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: threads only add contention (the test machines are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(
        flat=nn.Flatten(), fc1=nn.Linear(64, 32), act1=nn.ReLU(), fc2=nn.Linear(32, 16),
        act2=nn.ReLU(), fc3=nn.Linear(16, 10),
    ))


def tiny_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 6, 3), act1=nn.ReLU(), conv2=nn.Conv2d(6, 8, 3), act2=nn.ReLU(),
        flat=nn.Flatten(), fc=nn.Linear(8 * 4 * 4, 10),
    ))


def prune(model: nn.Module, **params) -> MagnitudePruning:
    method = create_method("prune", **params)
    assert isinstance(method, MagnitudePruning)
    method.apply(model, select_layers(model, method.params.layers, method.supported))
    return method


def zeros_fraction(t: torch.Tensor) -> float:
    return float((t == 0).sum()) / t.numel()


def synthetic_set(n: int = 64, seed: int = 0) -> ImageDataset:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (n,), generator=gen)
    return ImageDataset("mnist", "train", images, labels, DATASETS["mnist"])


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------


def test_polynomial_schedule_follows_the_formula():
    sched = Polynomial(initial_sparsity=0.1, begin_step=100, end_step=1000, frequency=50)
    final = 0.9
    for step in range(0, 1300):
        got = sched.sparsity_at(step, final)
        in_range = 100 <= step <= 1000
        due = in_range and ((step - 100) % 50 == 0 or step == 1000)
        if not due:
            assert got is None, step
            continue
        expect = final + (0.1 - final) * (1 - (step - 100) / 900) ** 3
        assert got == pytest.approx(expect, abs=1e-12), step
    assert sched.sparsity_at(100, final) == pytest.approx(0.1)
    assert sched.sparsity_at(1000, final) == final
    assert sched.sparsity_at(99, final) is None and sched.sparsity_at(1001, final) is None
    # clamped pure function
    assert polynomial_sparsity(0, 0.1, 0.9, 100, 1000) == 0.1
    assert polynomial_sparsity(5000, 0.1, 0.9, 100, 1000) == 0.9
    assert polynomial_sparsity(550, 0.0, 0.8, 100, 1000, power=1) == pytest.approx(0.4)


def test_polynomial_initial_sparsity_is_capped_at_the_layer_target():
    sched = Polynomial(initial_sparsity=0.5, end_step=100, frequency=10)
    assert sched.sparsity_at(0, 0.9) == 0.5
    assert all(sched.sparsity_at(t, 0.4) == 0.4 for t in range(0, 101, 10))


def test_polynomial_reaches_final_at_end_step_off_the_frequency_grid():
    sched = Polynomial(end_step=250, frequency=100)
    due = [t for t in range(400) if sched.sparsity_at(t, 0.5) is not None]
    assert due == [0, 100, 200, 250]
    assert sched.sparsity_at(250, 0.5) == 0.5


def test_iterative_rounds_are_geometric_and_evenly_spread():
    sched = Iterative(rounds=4, begin_step=10, end_step=110)
    updates = {t: sched.sparsity_at(t, 0.9) for t in range(200)}
    updates = {t: s for t, s in updates.items() if s is not None}
    assert list(updates) == [10, 35, 60, 85] == sched.round_steps()
    for r, s in enumerate(updates.values(), start=1):
        assert 1 - s == pytest.approx(0.1 ** (r / 4))
    assert updates[85] == pytest.approx(0.9)
    # uneven spans still give exactly `rounds` distinct rounds
    odd = Iterative(rounds=3, end_step=10)
    assert [t for t in range(20) if odd.due(t)] == odd.round_steps() == [0, 3, 6]


def test_one_shot_and_schedule_union():
    assert OneShot().sparsity_at(0, 0.7) == 0.7
    assert OneShot().sparsity_at(1, 0.7) is None
    method = create_method("prune", sparsity=0.5, schedule={"kind": "iterative", "rounds": 2,
                                                            "end_step": 10})
    assert isinstance(method.params.schedule, Iterative)
    assert method.summary()["schedule"] == {"kind": "iterative", "rounds": 2, "begin_step": 0,
                                            "end_step": 10}
    assert isinstance(create_method("prune", sparsity=0.5, schedule="one-shot").params.schedule,
                      OneShot)


# --------------------------------------------------------------------------------------------
# Mask computation
# --------------------------------------------------------------------------------------------


def test_magnitude_mask_keeps_exact_count_of_largest():
    torch.manual_seed(1)
    w = torch.randn(37, 13)
    for s in (0.0, 0.1, 0.5, 0.9, 0.99):
        m = magnitude_mask(w, s)
        k = round((1 - s) * w.numel())
        assert m.dtype == torch.bool and m.shape == w.shape and int(m.sum()) == k
        if 0 < k < w.numel():
            assert w.abs()[m].min() >= w.abs()[~m].max()


def test_magnitude_mask_ties_are_deterministic():
    w = torch.tensor([1.0, -2.0, 2.0, 2.0, 0.5, -2.0])
    m = magnitude_mask(w, 0.5)  # keep 3 of the four |2|s: the first three by index
    assert m.tolist() == [False, True, True, True, False, False]
    assert torch.equal(m, magnitude_mask(w.clone(), 0.5))


def test_magnitude_mask_with_previous_never_revives():
    w = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    prev = torch.tensor([False, True, True, True, True, True])
    m = magnitude_mask(w, 0.5, prev)
    assert m.tolist() == [False, True, True, True, False, False]
    # asking for less sparsity than already exists keeps all survivors and revives nothing
    assert torch.equal(magnitude_mask(w, 0.0, prev), prev)


def test_threshold_mask_is_hans_rule():
    torch.manual_seed(2)
    w = torch.randn(1000)
    std = float(w.std(correction=0))
    m = threshold_mask(w, 0.7)
    assert torch.equal(m, w.abs() > 0.7 * std)
    # a second round uses the survivors' std and stays inside the first mask
    m2 = threshold_mask(w * m, 0.7, m)
    assert torch.equal(m2, m & (w.abs() > 0.7 * float(w[m].std(correction=0))))
    assert int(m2.sum()) < int(m.sum())


def test_global_masks_share_one_threshold_and_hit_the_target():
    torch.manual_seed(3)
    weights = {"a": torch.randn(50, 20), "b": 3 * torch.randn(30), "c": 0.1 * torch.randn(8, 4, 3)}
    masks = global_magnitude_masks(weights, 0.8)
    total = sum(w.numel() for w in weights.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.2 * total)
    kept = torch.cat([weights[n].abs()[masks[n]] for n in weights])
    pruned = torch.cat([weights[n].abs()[~masks[n]] for n in weights])
    assert kept.min() >= pruned.max()
    # the scaled layers end up with very different sparsities
    assert zeros_fraction(masks["b"].float()) < 0.5 < zeros_fraction(masks["c"].float())


# --------------------------------------------------------------------------------------------
# Parametrization and helpers
# --------------------------------------------------------------------------------------------


def test_set_get_remove_mask_helpers():
    model = tiny_mlp()
    fc = model.fc1
    mask = torch.rand(fc.weight.shape) > 0.5
    set_mask(fc, mask)
    assert isinstance(fc.parametrizations.weight[0], PruningMask)
    assert torch.equal(get_mask(fc), mask)
    assert torch.equal(fc.weight == 0, ~mask | (fc.parametrizations.weight.original == 0))
    set_mask(fc, torch.zeros_like(mask))  # updated in place, not stacked
    assert len(fc.parametrizations.weight) == 1 and int(fc.weight.abs().sum()) == 0
    assert list(masked_layers(model)) == ["fc1"] and get_mask(model.fc2) is None
    sparsity = layer_sparsity(model)
    assert sparsity["fc1"] == (64 * 32, 64 * 32) and sparsity["fc2"][1] == 0
    assert remove_pruning(model) == ["fc1.weight"]
    assert not parametrize.is_parametrized(fc) and int(fc.weight.abs().sum()) == 0
    with pytest.raises(ModelError, match="does not fit"):
        set_mask(fc, torch.ones(3, 3, dtype=torch.bool))


def test_one_shot_per_layer_globs_and_bias():
    model = tiny_cnn()
    method = prune(model, sparsity={"*": 0.5, "conv1": 0.2, "fc": 0.9}, include_bias=True)
    expect = {"conv1": 0.2, "conv2": 0.5, "fc": 0.9}
    for name, s in expect.items():
        layer = model.get_submodule(name)
        w, b = layer.weight, layer.bias
        assert int((w == 0).sum()) == w.numel() - round((1 - s) * w.numel())
        assert int((b == 0).sum()) == b.numel() - round((1 - s) * b.numel())
    keys = {f"{n}.{t}" for n in expect for t in ("weight", "bias")}
    assert set(method.current_sparsity()) == keys


def test_selected_layers_only_and_global_scope():
    model = tiny_mlp()
    prune(model, sparsity=0.75, scope="global", layers=["fc1", "fc2"])
    assert set(masked_layers(model)) == {"fc1", "fc2"}
    zeros = sum(int((m.weight == 0).sum()) for m in (model.fc1, model.fc2))
    assert zeros == 64 * 32 + 32 * 16 - round(0.25 * (64 * 32 + 32 * 16))
    assert get_mask(model.fc3) is None


def test_quality_one_shot_prunes_by_std():
    model = tiny_mlp()
    w = model.fc1.weight.detach().clone()
    prune(model, quality=1.0)
    assert torch.equal(get_mask(model.fc1), w.abs() > w.std(correction=0))


# --------------------------------------------------------------------------------------------
# Masks under fine-tuning
# --------------------------------------------------------------------------------------------


def test_masks_survive_sgd_with_momentum_and_weight_decay():
    model = tiny_mlp()
    prune(model, sparsity=0.8)
    masks = {n: get_mask(m).clone() for n, m in masked_layers(model).items()}
    before = layer_sparsity(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randn(16, 1, 8, 8, generator=gen)
        y = torch.randint(0, 10, (16,), generator=gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, module in masked_layers(model).items():
        assert torch.equal(get_mask(module), masks[name])
        w = module.weight.detach()
        assert bool((w[~masks[name]] == 0).all())
        assert int((w[masks[name]] == 0).sum()) == 0  # survivors did train
    assert layer_sparsity(model) == before


def test_polynomial_schedule_through_fit_is_monotone_and_hits_target():
    model = tiny_mlp()
    data = synthetic_set(64)
    # 4 steps per epoch x 8 epochs = 32 steps; updates every 3 steps, end at 30
    method = prune(model, sparsity={"*": 0.9, "fc3": 0.5},
                   schedule={"kind": "polynomial", "end_step": 30, "frequency": 3})
    assert all(s == 0 for s in method.current_sparsity().values())  # initial_sparsity 0 at step 0
    history: list[dict[str, torch.Tensor]] = []
    watcher_steps: list[int] = []

    def watch(step: int, net: nn.Module) -> None:
        watcher_steps.append(step)
        history.append({n: get_mask(m).clone() for n, m in masked_layers(net).items()})

    cfg = TrainConfig(epochs=8, batch_size=16, lr=0.05, momentum=0.9, weight_decay=1e-3,
                      augment=False, device="cpu")
    fit(model, data, cfg, step_hooks=[*method.step_hooks(), watch], progress=False)
    assert watcher_steps == list(range(32))
    for prev, cur in itertools.pairwise(history):
        for name in cur:
            assert not bool((cur[name] & ~prev[name]).any()), "a pruned weight came back"
    kept = [int(h["fc1"].sum()) for h in history]
    assert kept[0] > kept[10] > kept[-1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        method.finalize(model)
    sp = method.current_sparsity()
    for name, target in {"fc1": 0.9, "fc2": 0.9, "fc3": 0.5}.items():
        n = model.get_submodule(name).weight.numel()
        assert sp[f"{name}.weight"] == pytest.approx(1 - round((1 - target) * n) / n)
        assert zeros_fraction(model.get_submodule(name).weight.detach()) >= sp[f"{name}.weight"]


def test_iterative_rounds_via_hooks_and_cut_short_warning():
    model = tiny_mlp()
    method = prune(model, sparsity=0.875, schedule={"kind": "iterative", "rounds": 3,
                                                    "end_step": 30})
    (hook,) = method.step_hooks()
    # round 1 prunes at step 0
    assert method.current_sparsity()["fc1.weight"] == pytest.approx(0.5, abs=1e-3)
    for step in range(12):  # rounds at 0, 10, 20; stop after 12 steps
        hook(step, model)
    assert method.current_sparsity()["fc1.weight"] == pytest.approx(0.75, abs=1e-3)
    with pytest.warns(UserWarning, match="stopped after 12 steps"):
        method.finalize(model)
    assert method.current_sparsity()["fc1.weight"] == pytest.approx(0.875, abs=1e-3)


def test_quality_iterative_reapplies_threshold_per_round():
    model = tiny_mlp()
    method = prune(model, quality=0.5, schedule={"kind": "iterative", "rounds": 2, "end_step": 4})
    after_one = get_mask(model.fc1).clone()
    (hook,) = method.step_hooks()
    for step in range(4):
        hook(step, model)
    after_two = get_mask(model.fc1)
    assert not bool((after_two & ~after_one).any())
    assert int(after_two.sum()) < int(after_one.sum())
    method.finalize(model)  # all rounds done: no warning needed, nothing changes
    assert torch.equal(get_mask(model.fc1), after_two)


def test_polynomial_with_late_begin_prunes_nothing_at_apply():
    model = tiny_mlp()
    method = prune(model, sparsity=0.5, schedule={"kind": "polynomial", "begin_step": 5,
                                                  "end_step": 10, "frequency": 1})
    assert all(s == 0 for s in method.current_sparsity().values())
    (hook,) = method.step_hooks()
    for step in range(10):
        hook(step, model)
    assert method.current_sparsity()["fc1.weight"] == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "exactly one of 'sparsity'"),
        ({"sparsity": 0.5, "quality": 1.0}, "both were given"),
        ({"sparsity": 1.0}, r"must be in \[0, 1\)"),
        ({"sparsity": {"fc*": 1.0}}, r"'fc\*': must be in \[0, 1\)"),
        ({"sparsity": -0.1}, r"must be in \[0, 1\)"),
        ({"sparsity": {"fc1": 0.5}, "scope": "global"}, "one scalar 'sparsity'"),
        ({"quality": 1.0, "scope": "global"}, "one scalar 'sparsity'"),
        ({"quality": 0.0}, "positive"),
        ({"quality": 1.0, "schedule": {"kind": "polynomial", "end_step": 9}}, "polynomial"),
        ({"sparsity": 0.5, "schedule": "sometimes"}, "unknown schedule"),
        ({"sparsity": 0.5, "schedule": {"kind": "iterative", "rounds": 5, "end_step": 3}},
         "5 rounds"),
        ({"sparsity": 0.5, "sparsty": 0.5}, "sparsty"),
    ],
)
def test_bad_params_are_recipe_errors(params, message):
    with pytest.raises(RecipeError, match=message):
        create_method("prune", **params)


def test_per_layer_glob_without_match_is_a_recipe_error():
    with pytest.raises(RecipeError, match="no value for layer"):
        prune(tiny_mlp(), sparsity={"fc1": 0.5})


def test_nan_weights_name_the_layer():
    model = tiny_mlp()
    with torch.no_grad():
        model.fc2.weight[2, 5] = float("nan")
    with pytest.raises(ModelError, match=r"'fc2\.weight'.*NaN"):
        prune(model, sparsity=0.5)
    assert not masked_layers(model)  # nothing was changed


# --------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------


def test_state_dict_round_trip_reproduces_outputs():
    model = tiny_cnn(seed=0)
    method = prune(model, sparsity=0.7)
    method.finalize(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(k.endswith("parametrizations.weight.0.mask") for k in state)
    fresh = tiny_cnn(seed=1)
    prune(fresh, sparsity=0.3)  # same structure, different masks and weights
    fresh.load_state_dict(state)
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    fresh.eval()
    assert torch.equal(model(x), fresh(x))
    for name, module in masked_layers(model).items():
        assert torch.equal(get_mask(module), get_mask(fresh.get_submodule(name)))
    remove_pruning(fresh)
    assert torch.equal(model(x), fresh(x))
