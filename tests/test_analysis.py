"""Sensitivity, planner, Pareto grid and report (tiny models, data subsets; < 60 s in all)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from deepsqueeze.analysis.pareto import GridPoint, mark_front, pareto
from deepsqueeze.analysis.planner import Finetune, TargetUnreachable, harm, plan, solve
from deepsqueeze.analysis.sensitivity import Point, sensitivity
from deepsqueeze.analysis.split import load_splits, validation_split
from deepsqueeze.analysis.sweeps import Option, available_sweeps
from deepsqueeze.errors import OptionError
from tests.conftest import needs_mnist, run_cli

pytestmark = needs_mnist


class TinyMLP(nn.Module):
    """784 -> 32 -> 10: small enough that every sweep point takes milliseconds."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


@pytest.fixture(scope="module")
def splits():
    fit, val, test = load_splits("mnist", 1000)
    return fit.subset(2000, seed=0), val.subset(400, seed=0), test.subset(500, seed=0)


@pytest.fixture(scope="module")
def tiny(splits):
    from deepsqueeze.training import TrainConfig, fit

    torch.manual_seed(0)
    net = TinyMLP()
    fit(net, splits[0], TrainConfig(epochs=2, lr=0.1, device="cpu"), progress=False)
    return net.eval()


def test_validation_split_is_the_complement_of_the_training_subset():
    from deepsqueeze.data import ImageDataset
    from deepsqueeze.data.registry import get_info

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3000, 1, 28, 28), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (3000,), generator=gen)
    train = ImageDataset("mnist", "train", images, labels, get_info("mnist"))
    fit, val = validation_split(train, 400, seed=3)
    drawn = train.subset(len(train) - 400, seed=3)  # what `train --subset N --seed 3` sees
    assert torch.equal(fit.images, drawn.images) and torch.equal(fit.labels, drawn.labels)
    assert len(val) == 400 and val.split == "validation"
    # every sample of the training split lands in exactly one part
    assert sorted(torch.cat([fit.images, val.images]).view(3000, -1).double().sum(1).tolist()) \
        == sorted(images.view(3000, -1).double().sum(1).tolist())
    assert torch.equal(val.labels.bincount(minlength=10), labels.bincount(minlength=10)
                       - drawn.labels.bincount(minlength=10))
    with pytest.raises(OptionError, match="validation size"):
        validation_split(train, len(train))


def test_sweeps_cover_the_installed_methods():
    sweeps = available_sweeps()
    assert {"prune", "share"} <= set(sweeps)
    with pytest.raises(OptionError, match="sweepable"):
        available_sweeps(["nope"])


def test_sensitivity_is_monotone_in_bytes_and_meaningful(tiny, splits):
    res = sensitivity(tiny, splits[1], ["prune", "share"], model_name="tiny")
    for layer in ("fc1", "fc2"):
        pruned = res.curve("prune", layer)
        sizes = [p.bytes for p in pruned]
        assert sizes == sorted(sizes, reverse=True), sizes  # more sparsity, never more bytes
        assert sizes[-1] < res.dense_layer_bytes[layer] / 10
        shared = res.curve("share", layer)
        assert [p.bytes for p in shared] == sorted((p.bytes for p in shared), reverse=True)
    fc1 = res.curve("prune", "fc1")
    assert fc1[0].accuracy > fc1[-1].accuracy  # 50% vs 99% sparsity: the curve says something
    assert res.table().row_count == len(res.points)
    data = json.loads(json.dumps(res.to_dict()))
    assert type(res).from_dict(data).points[0] == res.points[0]


def _pt(layer: str, nbytes: int, drop: float) -> Point:
    return Point(layer, [{"method": "prune", "setting": 0.9}], "x", 0.9, drop, nbytes, 100, 0.0)


def test_knapsack_respects_the_budget_and_minimizes_the_drop():
    cands = {"a": [_pt("a", 100, 0.0), _pt("a", 40, 0.5), _pt("a", 10, 3.0)],
             "b": [_pt("b", 100, 0.0), _pt("b", 50, 0.2), _pt("b", 20, 2.0)]}
    chosen, nbytes, drop = solve(cands, 90)
    assert nbytes <= 90 and (chosen["a"].bytes, chosen["b"].bytes) == (40, 50)
    assert drop == pytest.approx(0.7)
    assert solve(cands, 29) is None  # 10 + 20 is the least


def test_knapsack_minimizes_the_loss_increase_where_accuracy_cannot_tell():
    """Two options that both read 0.0 points of drop: the one that raised the loss less wins."""
    def pt(layer: str, nbytes: int, loss: float) -> Point:
        return Point(layer, [{"method": "share", "setting": 2}], "x", 0.9, 0.0, nbytes, 100,
                     0.0, loss_increase=loss)

    cands = {"a": [pt("a", 100, 0.0), pt("a", 30, 0.20), pt("a", 50, 0.01)],
             "b": [pt("b", 100, 0.0), pt("b", 30, 0.01), pt("b", 50, 0.30)]}
    chosen, nbytes, drop = solve(cands, 80)
    assert (chosen["a"].bytes, chosen["b"].bytes) == (50, 30) and nbytes == 80
    assert drop == 0.0
    assert harm(pt("a", 1, -0.5)) == 0.0  # noise below the baseline is no gain
    # a post-training option keeps its whole harm; a fine-tuned one is expected to recover
    ptq = Point("a", [{"method": "quantize", "setting": 2}], "q", 0.9, 0.0, 1, 100, 0.0,
                loss_increase=0.2)
    assert harm(ptq) == pytest.approx(0.2) and harm(pt("a", 1, 0.2)) == pytest.approx(0.05)


def test_plan_reuses_a_matching_sensitivity_and_refuses_another(tiny, splits, tmp_path):
    from deepsqueeze.analysis.sensitivity import SensitivityResult

    fit, val, _ = splits
    first = plan(tiny, fit, val, tmp_path / "a", target_ratio=4, max_drop=50.0,
                 methods=["prune"], finetune=Finetune(epochs=0.1), rounds=1,
                 model_name="tiny", sensitivity_samples=100)
    sens = SensitivityResult.from_dict(json.loads((tmp_path / "a" / "sensitivity.json")
                                                  .read_text()))
    again = plan(tiny, fit, val, tmp_path / "b", target_ratio=4, max_drop=50.0,
                 methods=["prune"], finetune=Finetune(epochs=0.1), rounds=1,
                 model_name="tiny", sensitivity_samples=100, sensitivity=sens)
    assert [c.label for c in again.rounds[0].choices] == [c.label for c in first.rounds[0].choices]
    with pytest.raises(OptionError, match="measure it again"):
        plan(tiny, fit, val, tmp_path / "c", target_ratio=4, methods=["prune"],
             sensitivity_samples=50, sensitivity=sens)
    other = TinyMLP()  # same layers, different weights
    with pytest.raises(OptionError, match="a different model or split"):
        plan(other, fit, val, tmp_path / "d", target_ratio=4, methods=["prune"],
             sensitivity_samples=100, sensitivity=sens)


def test_plan_meets_a_byte_budget(tiny, splits, tmp_path):
    fit, val, test = splits
    out = tmp_path / "plan"
    res = plan(tiny, fit, val, out, target_ratio=20, max_drop=10.0, test_data=test,
               methods=["prune", "share"], finetune=Finetune(epochs=0.3), rounds=2,
               model_name="tiny", dataset="mnist", sensitivity_samples=200)
    best = res.best_round
    assert best is not None and best.file_bytes is not None
    assert (out / "model.dsq").stat().st_size == best.file_bytes <= res.target_bytes
    assert res.reached and "target reached" in res.message
    assert best.test_accuracy is not None and best.val_accuracy is not None
    from deepsqueeze.pipeline import load_recipe

    recipe = load_recipe(out / "recipe.yaml")
    assert {s.method for s in recipe.stages} <= {"prune", "share"}
    saved = json.loads((out / "plan.json").read_text())
    assert saved["rounds"][saved["best"]]["file_bytes"] == best.file_bytes
    assert (out / "sensitivity.png").stat().st_size > 1000

    # the report of that folder renders every section, images inlined
    from deepsqueeze.analysis.report import build_report

    md, page = build_report(out, runs=3, memory=False)
    text = page.read_text()
    assert text.count("<table>") >= 4 and text.count("data:image/png;base64,") >= 2
    assert "Horowitz" in text and "640 pJ" in md.read_text()
    assert json.loads((out / "report.json").read_text())["file_bytes"] == best.file_bytes


def test_unreachable_target_is_a_clear_message(tiny, splits, tmp_path):
    fit, val, _ = splits
    from deepsqueeze.dsq import save

    header = save(tiny, tmp_path / "dense.dsq").header_bytes
    # past the header, below what the most pruned layers take: found by the sweep
    with pytest.raises(TargetUnreachable, match=r"target out of reach: .* smallest file the "
                       r"swept options can make, about [\d,]+ bytes"):
        plan(tiny, fit, val, tmp_path / "p", target_bytes=header + 50, methods=["prune"],
             finetune=Finetune(epochs=0.1), model_name="tiny", sensitivity_samples=100)
    assert json.loads((tmp_path / "p" / "plan.json").read_text())["rounds"] == []
    # below the header: said before any sweep
    with pytest.raises(TargetUnreachable, match="header and manifest"):
        plan(tiny, fit, val, tmp_path / "h", target_bytes=header - 1, methods=["prune"])
    with pytest.raises(OptionError, match="give a target"):
        plan(tiny, fit, val, tmp_path / "q", methods=["prune"])


def test_knapsack_meets_a_latency_budget_alone_and_with_bytes():
    def pt(layer: str, nbytes: int, us: float, loss: float) -> Point:
        return Point(layer, [{"method": "prune", "setting": 0.9}], "x", 0.9, 0.0, nbytes, 100,
                     0.0, latency_us=us, loss_increase=loss)

    from deepsqueeze.analysis.planner import _latency

    cands = {"a": [pt("a", 100, 50.0, 0.0), pt("a", 10, 45.0, 0.1), pt("a", 60, 20.0, 0.2)],
             "b": [pt("b", 100, 50.0, 0.0), pt("b", 20, 30.0, 0.05)]}
    chosen, us, _ = solve(cands, 80.0, cost=_latency)  # latency only: 50 + 30 us, least harm
    assert us == 80 and chosen["a"].latency_us == 50.0 and chosen["b"].latency_us == 30.0
    chosen, us, _ = solve(cands, 70.0, cost=_latency)  # tighter: a must take its fast option
    assert us == 70 and chosen["a"].latency_us == 20.0 and chosen["b"].latency_us == 50.0
    chosen, nbytes, _ = solve(cands, 90, limit=(_latency, 80.0))  # both: 10 + 20 bytes, 75 us
    assert nbytes == 30 and sum(p.latency_us for p in chosen.values()) == 75
    assert solve(cands, 1000, limit=(_latency, 49.0)) is None  # 20 + 30 is the fastest


def test_sensitivity_times_every_family_in_the_runtime(tiny, splits):
    """Each option's layer is timed from a real file; parametrized kinds (binary, pruned,
    shared) included: a deep copy of a parametrized model cannot be baked, the sweep bakes its
    own disposable copy."""
    from deepsqueeze.analysis.latency import example_batch
    from deepsqueeze.analysis.sensitivity import measure

    opts = [Option((("binarize", "on"),)), Option((("prune", 0.9),)), Option((("share", 4),)),
            Option((("prune", 0.9), ("share", 4)))]
    _, _, points = measure(tiny, splits[1].subset(100, seed=0), ["fc1"], opts,
                           latency_input=example_batch(splits[1], 4))
    assert all(p.error is None and p.latency_us is not None and p.latency_us > 0
               for p in points)


def test_plan_with_a_latency_target_times_the_runtime(tiny, splits, tmp_path):
    fit, val, _ = splits
    with pytest.raises(TargetUnreachable, match=r"below the fastest the swept options run"):
        plan(tiny, fit, val, tmp_path / "fast", target_latency_ms=1e-6, methods=["prune"],
             finetune=Finetune(epochs=0.1), model_name="tiny", sensitivity_samples=100)
    # a byte target and a (loose) latency target: the round is timed and checked against it
    res = plan(tiny, fit, val, tmp_path / "slow", target_latency_ms=1e3, latency_batch=8,
               target_ratio=4, max_drop=50.0, methods=["prune"],
               finetune=Finetune(epochs=0.1), rounds=1, model_name="tiny",
               sensitivity_samples=100)
    best = res.best_round
    assert best is not None and best.latency_ms is not None and 0 < best.latency_ms < 1e3
    assert res.reached and res.dense_latency_ms and "ms at batch 8" in res.message
    assert all(c.latency_us is not None and c.latency_us > 0 for c in best.choices)
    saved = json.loads((tmp_path / "slow" / "plan.json").read_text())
    assert saved["target_latency_ms"] == 1e3 and saved["rounds"][0]["latency_ok"]


def test_pareto_marks_the_frontier(tiny, splits, tmp_path):
    opts = [Option((("prune", 0.9),)), Option((("share", 4),)),
            Option((("prune", 0.9), ("share", 4)))]
    res = pareto(tiny, splits[1], options=opts, model_name="tiny")
    assert all(p.error is None for p in res.points)
    chain = res.points[2]
    assert chain.file_bytes < res.points[0].file_bytes  # prune + share beats prune alone
    assert any(p.on_bytes_front for p in res.points)
    assert chain.on_bytes_front  # the smallest file is always on the bytes frontier
    assert res.plot(tmp_path / "p.png").stat().st_size > 1000
    pts = [GridPoint("a", "m", [], [], file_bytes=10, val_accuracy=0.5),
           GridPoint("b", "m", [], [], file_bytes=20, val_accuracy=0.4),
           GridPoint("c", "m", [], [], file_bytes=30, val_accuracy=0.9)]
    mark_front(pts, "file_bytes", "on_bytes_front")
    assert [p.on_bytes_front for p in pts] == [True, False, True]


def test_cli_plan_out_of_reach_and_bad_options(tmp_path: Path, capsys, tiny):
    from deepsqueeze import models
    from deepsqueeze.io import save_model

    net = models.create("lenet300")
    model_pt = save_model(net, tmp_path / "model.pt")
    code, out, err = run_cli(["plan", model_pt, "--out", tmp_path / "p", "--target-bytes",
                              "100", "--method", "prune", "--no-progress"], capsys)
    assert code == 1 and "out of reach" in err and "header and manifest" in err
    assert "Traceback" not in err
    code, _, err = run_cli(["plan", model_pt, "--out", tmp_path / "q", "--method", "prune",
                            "--no-progress"], capsys)
    assert code == 2 and "give a target" in err and "--target-latency" in err
    code, _, err = run_cli(["plan", model_pt, "--out", tmp_path / "r", "--method", "prune",
                            "--target-latency", "-1", "--no-progress"], capsys)
    assert code == 2 and "target latency" in err
    code, _, err = run_cli(["sensitivity", model_pt, "--method", "bogus"], capsys)
    assert code == 2 and "cannot sweep method 'bogus'" in err
    code, out, _ = run_cli(["sensitivity", model_pt, "--method", "prune", "--layers", "fc3",
                            "--samples", "100", "--val-size", "500", "--out", tmp_path / "s",
                            "--no-progress"], capsys)
    assert code == 0 and (tmp_path / "s" / "sensitivity.png").is_file() and "fc3" in out
    assert len(json.loads((tmp_path / "s" / "sensitivity.json").read_text())["points"]) == 8
    code, _, err = run_cli(["report", tmp_path / "nothing-here"], capsys)
    assert code == 2 and "not a folder" in err


def test_report_survives_a_forged_plan_json(tmp_path: Path):
    from deepsqueeze.analysis.report import _plan_section, _read_json, render_html
    from deepsqueeze.errors import DeepSqueezeError

    forged = {"target_bytes": "lots", "target_ratio": [1], "max_drop_points": None,
              "rounds": [{"round": "<script>x</script>", "file_bytes": {"a": 1}}, 7],
              "best": 0, "methods": 5, "message": "<img src=x onerror=alert(1)>"}
    sec = _plan_section(forged)
    page = render_html("t", [sec], tmp_path)
    assert "<script>x" not in page and "<img src=x" not in page  # escaped, not markup
    assert "n/a" in page
    (tmp_path / "plan.json").write_text("{not json")
    with pytest.raises(DeepSqueezeError, match="not valid JSON"):
        _read_json(tmp_path / "plan.json")
    (tmp_path / "plan.json").write_text("[1, 2]")
    with pytest.raises(DeepSqueezeError, match="JSON object"):
        _read_json(tmp_path / "plan.json")


def test_energy_counts_compressed_kinds_and_nonzero_weights():
    from deepsqueeze import models
    from deepsqueeze.analysis.energy import PJ_DRAM_32, estimate, layer_macs
    from deepsqueeze.analysis.sweeps import apply_option

    net = models.create("lenet5")
    x = torch.zeros(1, 1, 28, 28)
    dense = layer_macs(net, x)
    assert sum(m for m, _ in dense.values()) == 2_293_000  # 288k + 1.6M + 400k + 5k
    apply_option(net, "conv1", Option((("quantize", 8),)))  # conv1 becomes a QuantConv2d kind
    apply_option(net, "fc1", Option((("prune", 0.9),)))
    after = layer_macs(net, x)
    assert after["conv1"][0] == 288_000 and after["fc1"][1] == pytest.approx(0.1, abs=1e-3)
    e = estimate(net, x, weight_bytes=4000)
    assert e.macs == 2_293_000 and e.effective_macs < e.macs - 350_000
    assert e.weights_dram_pj == 1000 * PJ_DRAM_32 and e.total_dram_pj > e.total_sram_pj
