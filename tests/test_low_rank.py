"""Low-rank family: truncated SVD, sparse low rank (SLR), Tucker-2; file round trip; runtime."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deepsqueeze
from deepsqueeze import dsq, models
from deepsqueeze.codec.container import dsq_bytes, parse_dsq
from deepsqueeze.errors import DsqFormatError, ModelError, RecipeError, RuntimeInputError
from deepsqueeze.methods import create_method, select_layers
from deepsqueeze.methods import low_rank as LR
from deepsqueeze.methods.pruning import get_mask
from deepsqueeze.models.low_rank import LowRankConv2d, LowRankLinear, TuckerConv2d
from deepsqueeze.pipeline.session import bake
from deepsqueeze.runtime import load_runtime, runtime_info
from deepsqueeze.training.loop import TrainConfig, fit
from tests.conftest import needs_mnist

torch.set_num_threads(1)


def _apply(model: nn.Module, name: str, **params: Any) -> Any:
    method = create_method(name, **params)
    method.apply(model, select_layers(model, method.params.layers, method.supported))
    return method


def _matrix(singular: list[float], rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(singular), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(singular), generator=g, dtype=torch.float64))
    return (u * torch.tensor(singular, dtype=torch.float64)) @ v.t()


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(),
                         nn.Linear(8, 3))


# ------------------------------------------------------------------------------- rank rules


def test_energy_rule_picks_the_expected_rank() -> None:
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])  # squares 16, 9, 4, 1 of 30
    assert [LR.energy_rank(s, e) for e in (0.5, 16 / 30, 0.8, 0.9, 29 / 30, 0.99, 1.0)] == [
        1, 1, 2, 3, 3, 4, 4]
    lin = nn.Linear(6, 5)
    with torch.no_grad():
        lin.weight.copy_(_matrix([4.0, 3.0, 2.0, 1.0], 5, 6))
    model = nn.Sequential(lin)
    method = _apply(model, "svd", energy=0.8)
    assert isinstance(model[0], LowRankLinear) and model[0].rank == 2
    assert method.report["0"]["energy_kept"] == pytest.approx(25 / 30)


def test_ratio_and_rank_rules() -> None:
    assert LR.ratio_rank(100, 100, 5) == 10  # 10·200·5 = 10,000 weights
    assert LR.ratio_rank(10, 10, 1000) == 1  # never below 1
    model = nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 4))
    method = _apply(model, "svd", ratio=5, layers=["0"])
    assert model[0].rank == 10 and method.report["0"]["weights_after"] == 2000
    model = nn.Sequential(nn.Linear(20, 30), nn.Linear(30, 4))
    _apply(model, "svd", rank={"0": 7, "*": 50})  # capped at the full rank
    assert (model[0].rank, model[1].rank) == (7, 4)


@pytest.mark.parametrize("params, message", [
    ({}, "exactly one of 'rank'"),
    ({"rank": 3, "energy": 0.9}, "got rank, energy"),
    ({"energy": 1.5}, r"energy must be in \(0, 1\]"),
    ({"ratio": 0.5}, "ratio must be a finite number > 1"),
    ({"rank": 0}, "rank must be a positive integer"),
])
def test_bad_rank_parameters_name_the_fix(params: dict[str, Any], message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        create_method("svd", **params)


def test_bad_slr_and_tucker_parameters() -> None:
    with pytest.raises(RecipeError, match="sr"):
        create_method("sparse-svd", rank=4, sr=1.0)
    with pytest.raises(RecipeError, match="importance"):
        create_method("sparse-svd", rank=4, importance="random")
    with pytest.raises(RecipeError, match=r"rank_in, rank_out"):
        create_method("tucker", rank=[1, 2, 3])
    model = _mlp()
    method = create_method("sparse-svd", rank=4, importance="a")
    with pytest.raises(RecipeError, match="calibration"):
        method.apply(model, select_layers(model, None, method.supported))


# ------------------------------------------------------------------------------- svd


def test_reconstruction_error_falls_with_rank_as_eckart_young_says() -> None:
    singular = [5.0, 4.0, 3.0, 2.0, 1.0, 0.5]
    w = _matrix(singular, 9, 7).float()
    lin = nn.Linear(7, 9)
    with torch.no_grad():
        lin.weight.copy_(w)
    errors = []
    for k in range(1, 7):
        err = float(torch.linalg.norm(LR.factorize_linear(lin, k).dense_weight().detach() - w))
        tail = sum(s * s for s in singular[k:]) ** 0.5
        assert err == pytest.approx(tail, abs=1e-4)
        errors.append(err)
    assert all(a > b for a, b in itertools.pairwise(errors))
    conv = nn.Conv2d(4, 6, 3, padding=1)
    with torch.no_grad():
        conv_err = [float(torch.linalg.norm(LR.factorize_conv(conv, k).dense_weight()
                                            - conv.weight)) for k in range(1, 7)]
    assert all(a > b for a, b in itertools.pairwise(conv_err))
    assert conv_err[-1] < 1e-5


def test_full_rank_reproduces_every_layer() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(10, 6)
    x = torch.randn(5, 10)
    torch.testing.assert_close(LR.factorize_linear(lin, 6)(x), lin(x), atol=1e-5, rtol=1e-5)
    conv = nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))
    xi = torch.randn(2, 3, 9, 8)
    torch.testing.assert_close(LR.factorize_conv(conv, 5)(xi), conv(xi), atol=1e-5, rtol=1e-5)
    tucker = LR.tucker_conv(conv, 3, 5)
    assert isinstance(tucker, TuckerConv2d)
    torch.testing.assert_close(tucker(xi), conv(xi), atol=1e-5, rtol=1e-5)


def test_svd_method_on_lenet5_keeps_other_layers_and_refuses_grouped_convs() -> None:
    model = models.create("lenet5-classic")
    x = torch.randn(2, 1, 28, 28)
    method = _apply(model, "svd", rank=4, layers=["fc1", "conv2"])
    assert isinstance(model.fc1, LowRankLinear) and isinstance(model.conv2, LowRankConv2d)
    assert isinstance(model.fc2, nn.Linear) and model(x).shape == (2, 10)
    assert method.report["fc1"]["weights_after"] == 4 * (400 + 120)
    with pytest.raises(ModelError, match="factors of an already factorized layer"):
        _apply(model, "svd", rank=2, layers=["fc1.first"])
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ModelError, match="groups=1"):
        _apply(grouped, "svd", rank=2)


def test_skip_unprofitable_leaves_layers_dense() -> None:
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 3))
    method = _apply(model, "svd", rank=8, skip_unprofitable=True)
    assert isinstance(model[0], nn.Linear) and not method.report["0"]["factorized"]
    assert isinstance(model[1], nn.Linear)  # 8 capped to 3: 3·13 = 39 >= 30


# ------------------------------------------------------------------------------- SLR


def test_slr_masks_follow_the_rule() -> None:
    out_scores = torch.tensor([5.0, 1.0, 3.0, 0.5])
    in_scores = torch.tensor([1.0, 2.0, 3.0, 0.0, 4.0, 1.0])
    mask_a, mask_b = LR.slr_masks(4, out_scores, in_scores, sr=0.5, rr=0.5)
    # the 2 weakest outputs (3, 1) and the 3 weakest inputs (3, 0, 5: ties to the lower index)
    # keep components 0..1 only
    assert mask_a.shape == (4, 4) and mask_b.shape == (4, 6)
    assert mask_a[[1, 3]][:, 2:].sum() == 0 and mask_a[[0, 2]].all() and mask_a[:, :2].all()
    assert mask_b[2:][:, [0, 3, 5]].sum() == 0 and mask_b[:, [1, 2, 4]].all()
    assert int((~mask_a).sum()) + int((~mask_b).sum()) == 2 * 2 + 3 * 2
    full_a, full_b = LR.slr_masks(4, out_scores, in_scores, sr=0.0, rr=0.5)
    assert full_a.all() and full_b.all()


def test_refit_keeps_the_masks_and_never_raises_the_error() -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(20, 30, generator=g) @ torch.diag(torch.linspace(2, 0.1, 30))
    u, s, vh = LR.svd(w)
    a, b = LR.split_factors(u, s, vh, 8)
    mask_a, mask_b = LR.slr_masks(8, torch.rand(20, generator=g), torch.rand(30, generator=g),
                                  sr=0.5, rr=0.5)
    masked = float(torch.linalg.norm(w - (a * mask_a) @ (b * mask_b)))
    errors = [masked]
    for rounds in (1, 3, 10):
        ra, rb = LR.refit_masked(w, a * mask_a, b * mask_b, mask_a, mask_b, rounds)
        assert not ra[~mask_a].any() and not rb[~mask_b].any()  # zeros stay zeros
        errors.append(float(torch.linalg.norm(w - ra @ rb)))
    assert all(e2 <= e1 + 1e-5 for e1, e2 in itertools.pairwise(errors))
    assert errors[-1] < 0.97 * masked  # the kept components took up part of the dropped ones
    plain = float(torch.linalg.norm(w - a @ b))  # the unmasked rank-8 optimum stays a bound
    assert errors[-1] >= plain - 1e-5


def test_slr_reports_the_refit(tmp_path: Path) -> None:
    model = _mlp()
    method = _apply(model, "sparse-svd", rank=5, sr=0.5, rr=0.6)
    rep = method.report["0"]
    assert rep["relative_error_refit"] <= rep["relative_error_masked"] + 1e-6
    paper = _apply(_mlp(), "sparse-svd", rank=5, sr=0.5, rr=0.6, refit=0)
    assert paper.report["0"]["relative_error_refit"] == paper.report["0"]["relative_error_masked"]


def test_slr_with_sr_zero_equals_plain_svd() -> None:
    x = torch.randn(7, 12)
    plain, sparse = _mlp(), _mlp()
    _apply(plain, "svd", rank=5)
    method = _apply(sparse, "sparse-svd", rank=5, sr=0.0, rr=0.7)
    torch.testing.assert_close(sparse(x), plain(x), atol=0, rtol=0)
    assert method.report["0"]["weights_after"] == 5 * (12 + 16)


def test_slr_weight_importance_masks_the_weakest_neurons() -> None:
    model = nn.Sequential(nn.Linear(8, 6))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(6, 8) * 0.01)
        model[0].weight[:, :4] *= 100  # inputs 0..3 strong
        model[0].weight[:3] *= 100  # outputs 0..2 strong
    method = _apply(model, "sparse-svd", rank=4, sr=0.5, rr=0.75, importance="w")
    lr = model[0]
    mask_b, mask_a = get_mask(lr.first), get_mask(lr.second)
    assert mask_a is not None and mask_b is not None
    assert mask_a[3:, 1:].sum() == 0 and mask_a[:3].all()
    assert mask_b[1:, 4:].sum() == 0 and mask_b[:, :4].all()
    assert method.report["0"]["weights_after"] == 4 * 14 - 3 * 3 - 4 * 3


def _dead_input_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 12, generator=g)
    x[:, 5] = 0.0  # input neuron 5 of the first layer never fires
    y = torch.randint(0, 3, (64,), generator=g)
    return x, y


def test_slr_activation_and_loss_importance_see_a_dead_input() -> None:
    x, y = _dead_input_data()
    model = _mlp()
    layers = {"0": model[0], "2": model[2]}
    act = LR.activation_importance(model, layers, x, batch=20)
    assert act["0"][1][5] == 0 and (act["0"][1][torch.arange(12) != 5] > 0).all()
    torch.testing.assert_close(act["0"][0], model[0](x).abs().mean(0).double())
    loss = LR.loss_importance(model, layers, x, y, F.cross_entropy, batch=20)
    assert loss["0"][1][5] == 0 and loss["0"][1].sum() > 0 and loss["2"][0].shape == (8,)
    # the dead input is the first to lose components under both measures
    for importance in ("a", "c"):
        net = _mlp()
        method = create_method("sparse-svd", rank=4, sr=0.1, rr=1.0, importance=importance,
                               layers=["0"])
        method.set_data(x, y).apply(net, select_layers(net, ["0"], method.supported))
        mask_b = get_mask(net[0].first)
        assert mask_b is not None and not mask_b[:, 5].any() and int((~mask_b).sum()) == 4


def test_slr_masks_survive_fine_tuning() -> None:
    x, y = _dead_input_data()
    model = _mlp()
    _apply(model, "sparse-svd", rank=6, sr=0.5, rr=0.5)
    masks = {n: get_mask(m).clone() for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and get_mask(m) is not None}
    assert len(masks) == 6
    before = {n: model.get_submodule(n).weight.detach().clone() for n in masks}
    fit(model, (x, y), TrainConfig(epochs=2, batch_size=16, lr=0.1, device="cpu"),
        progress=False)
    bake(model)
    for n, mask in masks.items():
        w = model.get_submodule(n).weight.detach()
        assert (w[~mask] == 0).all()
        assert not torch.equal(w[mask], before[n][mask])  # the kept entries did train


# ------------------------------------------------------------------------------- tucker


def test_tucker_ranks_by_energy_and_default_layers() -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 1))
    method = _apply(model, "tucker", energy=1.0)
    assert isinstance(model[0], TuckerConv2d) and isinstance(model[2], nn.Conv2d)  # 1×1 kept
    assert (model[0].rank_in, model[0].rank_out) == (4, 8)
    assert method.report["0"]["weights_before"] == 8 * 4 * 9
    net = nn.Sequential(nn.Conv2d(6, 8, 3))
    _apply(net, "tucker", rank=[2, 3])
    assert (net[0].rank_in, net[0].rank_out) == (2, 3)
    w = torch.zeros(8, 6, 3, 3)
    w[:2, :3] = torch.randn(2, 3, 3, 3)
    assert LR.mode_ranks_by_energy(w, 1.0) == (3, 2)


@pytest.mark.parametrize("geometry", [dict(kernel_size=3, padding=1),
                                      dict(kernel_size=(3, 5), stride=(2, 1), padding=(1, 2)),
                                      dict(kernel_size=3, dilation=2, padding=2)])
def test_cp_recovers_an_exact_rank_r_kernel_and_runs_as_its_kernel(
        geometry: dict[str, Any]) -> None:
    from deepsqueeze.models.low_rank import CPConv2d

    g = torch.Generator().manual_seed(2)
    conv = nn.Conv2d(6, 8, **geometry)
    kh, kw = conv.kernel_size
    a, b, v, h = (torch.randn(n, 4, generator=g) for n in (8, 6, kh, kw))
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("or,cr,ir,jr->ocij", a, b, v, h))
    new = LR.cp_conv(conv, 4)
    assert isinstance(new, CPConv2d) and new.rank == 4
    w = conv.weight.detach()
    assert float(torch.linalg.norm(new.dense_weight().detach() - w) / torch.linalg.norm(w)) < 1e-4
    x = torch.randn(2, 6, 13, 11)
    with torch.no_grad():
        torch.testing.assert_close(new(x), conv(x), atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(
            new(x), F.conv2d(x, new.dense_weight(), conv.bias, conv.stride, conv.padding,
                             conv.dilation), atol=1e-4, rtol=1e-4)


def test_cp_method_rank_by_ratio_and_error_falls_with_rank() -> None:
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 8, 1))
    method = _apply(model, "cp", ratio=4)
    rep = method.report["0"]
    assert isinstance(model[2], nn.Conv2d)  # 1×1 convolutions are left alone
    assert rep["weights_after"] <= rep["weights_before"] / 4
    assert rep["rank"] == (32 * 16 * 9 // 4) // (16 + 32 + 3 + 3)
    errors = []
    for rank in (2, 8, 32):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1))
        errors.append(_apply(net, "cp", rank=rank).report["0"]["relative_error"])
    assert errors[0] > errors[1] > errors[2]
    for bad, message in (({}, "exactly one of"), ({"rank": 4, "ratio": 2}, "exactly one of"),
                         ({"ratio": 1.0}, "ratio must be > 1"), ({"rank": 0}, "positive")):
        with pytest.raises(RecipeError, match=message):
            create_method("cp", **bad)


# ------------------------------------------------------------------------------- file, runtime


def _lenet300_low_rank(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = models.create("lenet300")
    _apply(model, "sparse-svd", rank={"fc1": 12, "fc2": 10, "fc3": 6}, sr=0.5, rr=0.5)
    bake(model)
    return model


@pytest.mark.parametrize("build", ["svd", "sparse-svd", "tucker", "cp", "svd-prune-share"])
def test_dsq_round_trip_and_runtime_equal_the_model(tmp_path: Path, build: str) -> None:
    torch.manual_seed(0)
    model = models.create("lenet5-classic")
    if build == "svd":
        _apply(model, "svd", rank=5, layers=["conv2", "fc1", "fc2"])
    elif build == "sparse-svd":
        _apply(model, "sparse-svd", energy=0.8, sr=0.5, rr=0.5)
    elif build == "tucker":
        _apply(model, "tucker", rank=[3, 8])
    elif build == "cp":
        _apply(model, "cp", ratio=4)
    else:
        _apply(model, "svd", rank=20, layers=["fc1", "fc2"])
        _apply(model, "prune", sparsity=0.8, layers=["fc1.*", "fc2.*"])
        _apply(model, "share", bits=4, layers=["fc1.*", "fc2.*"])
    bake(model)
    model.eval()
    x = torch.randn(3, 1, 28, 28)
    path = tmp_path / f"{build}.dsq"
    dsq.save(model, path)
    loaded = dsq.load(path).eval()
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(loaded(x), expected, atol=0, rtol=0)
        runtime = load_runtime(path, cache=False)
        torch.testing.assert_close(runtime(x), loaded(x), atol=1e-4, rtol=1e-4)
    assert type(loaded.fc1) is type(model.fc1) and type(loaded.conv2) is type(model.conv2)
    if build == "svd-prune-share":  # the factors run from their compressed form
        ran = {c.layer for c in runtime_info(runtime).layers}
        assert {"fc1.first", "fc1.second", "fc2.first"} <= ran


def test_recipe_svd_prune_share_through_compress(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 1, 28, 28, generator=g), torch.randint(0, 10, (96,), generator=g)
    recipe = {
        "name": "t", "stages": [
            {"method": "svd", "params": {"rank": {"fc1": 30, "fc2": 20}, "layers": ["fc1", "fc2"]},
             "finetune": {"epochs": 1, "batch_size": 32, "lr": 0.01, "device": "cpu"}},
            {"method": "prune", "params": {"sparsity": 0.5, "layers": ["fc1.*", "fc2.*"]}},
            {"method": "share", "params": {"bits": 5}},
        ],
        "encode": {"huffman": True},
    }
    out = tmp_path / "r.dsq"
    result = deepsqueeze.compress(models.create("lenet300"), recipe, train_data=(x, y),
                                  eval_data=(x, y), out=out, progress=False)
    assert result.file_accuracy == result.stages[-1].test_accuracy
    assert isinstance(dsq.load(out).fc1, LowRankLinear)
    assert result.file_report.compression > 10


def _forge(path: Path, change: Any) -> bytes:
    f = parse_dsq(path.read_bytes())
    meta = copy.deepcopy(f.meta)
    change(meta)
    return dsq_bytes(meta, f.sections)


def _conv_file(tmp_path: Path) -> Path:
    model = models.create("lenet5-classic")
    _apply(model, "svd", rank=4, layers=["conv1", "fc1"])
    _apply(model, "tucker", rank=[3, 5], layers=["conv2"])
    bake(model)
    path = tmp_path / "c.dsq"
    dsq.save(model, path)
    return path


@pytest.mark.parametrize("change, message", [
    (lambda m: m["modules"]["fc1"]["config"].update(rank=0), "rank"),
    (lambda m: m["modules"]["fc1"]["config"].update(rank=1 << 40), "rank"),
    (lambda m: m["modules"]["fc1"]["config"].update(rank=5), "not fit"),
    (lambda m: m["modules"]["conv2"]["config"].update(rank_in=4), "does not fit the layer's"),
    (lambda m: m["modules"]["conv2"]["config"].update(rank_out=-1), "rank_out"),
    (lambda m: m["modules"]["conv2"]["config"].update(kernel_size=[5, 5, 5]), "kernel_size"),
    (lambda m: m["modules"]["conv2"]["config"].update(kernel_size=[3, 3]), "shape"),
    (lambda m: m["modules"]["conv1"]["config"].update(padding="same"), "padding"),
    (lambda m: m["modules"]["conv1"]["config"].update(stride=[0, 1]), "stride"),
    (lambda m: m["modules"]["conv1"]["config"].update(dilation=[1, 1 << 20]), "dilation"),
    (lambda m: m["modules"]["conv1"]["config"].update(rank=2.5), "rank"),
    (lambda m: m["modules"]["conv1"].update(type="TuckerConv2d"), "options"),
])
def test_forged_low_rank_kinds_are_refused(tmp_path: Path, change: Any, message: str) -> None:
    data = _forge(_conv_file(tmp_path), change)
    for load in (dsq.load, lambda d: load_runtime(d, autotune=False)):
        with pytest.raises(DsqFormatError, match=message):
            load(data)


def test_a_lenet300_slr_file_runs_in_the_runtime(tmp_path: Path) -> None:
    model = _lenet300_low_rank().eval()
    path = tmp_path / "s.dsq"
    report = dsq.save(model, path)
    assert report.compression > 10
    x = torch.randn(4, 784)
    with torch.no_grad():
        torch.testing.assert_close(load_runtime(path, cache=False)(x), model(x),
                                   atol=1e-4, rtol=1e-4)


def test_runtime_times_factors_against_the_multiplied_out_product(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = models.create("lenet300")
    _apply(model, "svd", rank={"fc1": 8, "fc2": 90}, layers=["fc1", "fc2"])
    model.eval()
    path = tmp_path / "f.dsq"
    dsq.save(model, path)
    x = torch.randn(5, 784)
    for impl in ("factors", "product"):
        rt = load_runtime(path, cache=False, impls={"fc1": impl, "fc2": impl})
        with torch.no_grad():
            torch.testing.assert_close(rt(x), model(x), atol=1e-4, rtol=1e-4)
            assert rt(torch.empty(0, 784)).shape == (0, 10)
        assert {c.layer: c.impl for c in runtime_info(rt).layers}["fc1"] == impl
        with pytest.raises(RuntimeInputError, match="784 features"):
            rt.fc1(torch.randn(2, 783))
    tuned = runtime_info(load_runtime(path, cache=False, memory_budget=None))
    choices = {c.layer: c for c in tuned.layers}
    assert set(choices["fc1"].time_us) == {"factors", "product"}
    # the 2x-file budget leaves room for fc1's product only if it is tiny: rank 8 keeps factors
    assert {c.layer: c.impl for c in runtime_info(load_runtime(path, cache=False)).layers}[
        "fc1"] == "factors"


@needs_mnist
def test_slr_calibration_from_a_builtin_dataset() -> None:
    model = models.create("lenet300")
    method = _apply(model, "sparse-svd", rank=8, sr=0.5, rr=0.5, importance="a",
                    layers=["fc2", "fc3"], calibration={"dataset": "mnist", "samples": 64})
    assert method.report["fc2"]["weights_after"] == 8 * 400 - (50 + 150) * 4
    with pytest.raises(RecipeError, match="calibration"):
        create_method("sparse-svd", rank=8, calibration={"samples": 64})
