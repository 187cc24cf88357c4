"""Recipes, the compress runner, and .dsq save → load → inspect through the API and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import deepsqueeze
from deepsqueeze import models
from deepsqueeze.cli import app
from deepsqueeze.codec.options import EncodeOptions
from deepsqueeze.dsq import inspect, load, save
from deepsqueeze.errors import ModelError, RecipeError
from deepsqueeze.io import save_model
from deepsqueeze.methods.base import create_method, select_layers
from deepsqueeze.pipeline import load_recipe, parse_recipe

from .conftest import needs_mnist

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = {
    "name": "tiny",
    "model": "lenet300",
    "dataset": "mnist",
    "stages": [
        {"method": "prune", "params": {"sparsity": {"fc1": 0.9, "fc2": 0.9, "fc3": 0.6}},
         "finetune": {"epochs": 1, "lr": 0.01, "batch_size": 100, "distill": 0.5}},
        {"method": "share", "params": {"bits": 4},
         "finetune": {"epochs": 1, "lr": 0.001, "weight_decay": 0.0, "batch_size": 100}},
    ],
}


def _compressed_lenet300() -> torch.nn.Module:
    torch.manual_seed(0)
    net = models.create("lenet300")
    prune = create_method("prune", sparsity=0.9)
    prune.apply(net, select_layers(net))
    share = create_method("share", bits=5)
    share.apply(net, select_layers(net))
    return net


def test_shipped_recipes_validate():
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        recipe = load_recipe(path)
        assert recipe.stages and recipe.model


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (None, "empty"),
        ([1, 2], "mapping"),
        ({"stages": []}, "stages"),
        ({"stages": [{"method": "nope"}]}, "stages.0.method: unknown method 'nope'"),
        ({"stages": [{"method": "prune", "params": {"sparsity": 1.5}}]}, "stages.0.params"),
        ({"stages": [{"method": "prune", "params": {"sparsity": 0.5},
                      "finetune": {"epochs": "ten"}}]}, "stages.0.finetune.epochs"),
        ({"stages": [{"method": "share", "params": {"bits": 4}}], "encode": {"huffman": 3}},
         "encode.huffman"),
        ({"stages": [{"method": "share"}], "surprise": 1}, "surprise"),
    ],
)
def test_bad_recipes_name_the_wrong_field(data, fragment):
    with pytest.raises(RecipeError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        parse_recipe(data)


def test_recipe_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_layer_selection_errors_name_what_exists():
    net = models.create("lenet5")
    assert list(select_layers(net, ["type:Conv2d"])) == ["conv1", "conv2"]
    with pytest.raises(ModelError, match="matches no layer; layers: conv1, conv2"):
        select_layers(net, ["dense*"])
    with pytest.raises(ModelError, match="cannot handle"):
        select_layers(models.create("resnet20"), ["layer1.0.bn*"])


def test_save_load_round_trip_is_exact(tmp_path):
    net = _compressed_lenet300().eval()
    report = save(net, tmp_path / "m.dsq")
    loaded = load(tmp_path / "m.dsq")
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(net(x), loaded(x))
    assert report.file_bytes == (tmp_path / "m.dsq").stat().st_size
    assert report.dense_bytes == 266_610 * 4
    assert report.compression > 20  # 10% kept, 5-bit codebook, Huffman
    fc1 = next(r for r in report.layers if r.layer == "fc1")
    # rANS codes a plain codebook's zero symbols in ~0.15 bit each: it may beat positions
    assert fc1.encoding in ("sparse-codebook", "codebook") and abs(fc1.kept_fraction - 0.1) < 0.01
    assert fc1.bits_per_weight + (fc1.bits_per_index or 0) < 14
    huffman_only = save(net, tmp_path / "h.dsq", encode=EncodeOptions(ans=False))
    fc1 = next(r for r in huffman_only.layers if r.layer == "fc1")
    assert fc1.encoding == "sparse-codebook" and fc1.bits_per_weight < 6
    assert fc1.bits_per_index < 8 and huffman_only.file_bytes > report.file_bytes


def test_save_refuses_nan_weights(tmp_path):
    net = models.create("lenet300")
    with torch.no_grad():
        net.fc2.weight[0, 0] = float("nan")
    with pytest.raises(deepsqueeze.DeepSqueezeError, match=r"fc2\.weight"):
        save(net, tmp_path / "m.dsq")
    assert not (tmp_path / "m.dsq").exists()


def test_channel_pruned_model_round_trips(tmp_path):
    net = models.create("lenet5").eval()
    method = create_method("channel-prune", ratio=0.5)
    method.apply(net, select_layers(net, method.params.layers, method.supported))
    save(net, tmp_path / "c.dsq")
    loaded = load(tmp_path / "c.dsq")
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(net(x), loaded(x))
    assert loaded.conv1.out_channels == 10


@needs_mnist
def test_compress_end_to_end_and_file_accuracy(tmp_path):
    run = deepsqueeze.train("lenet300", "mnist", epochs=1, subset=3000, progress=False,
                            out=tmp_path / "run")
    result = deepsqueeze.compress(run.model_path, TINY_RECIPE, subset=3000, progress=False,
                                  out=tmp_path / "m.dsq")
    assert [s.stage for s in result.stages] == ["prune", "share"]
    assert result.file_report.compression > 15
    assert result.file_accuracy == pytest.approx(result.stages[-1].test_accuracy, abs=1e-9)
    assert result.file_accuracy > 0.8
    report = deepsqueeze.evaluate(tmp_path / "m.dsq", "mnist", measure_speed=False)
    assert report.file_bytes == (tmp_path / "m.dsq").stat().st_size
    assert report.top1_accuracy == pytest.approx(result.file_accuracy, abs=1e-9)
    # the numbers and the recipe beside the file (what `deepsqueeze report` reads)
    numbers = json.loads((tmp_path / "m.json").read_text())
    assert numbers["path"] == "m.dsq" and numbers["file_accuracy"] == result.file_accuracy
    assert [s["stage"] for s in numbers["stages"]] == ["prune", "share"]
    again = load_recipe(tmp_path / "m.recipe.yaml")
    assert again == result.recipe
    from deepsqueeze.analysis.report import _run_section, render_markdown

    text = render_markdown("t", [_run_section(numbers, tmp_path / "m.recipe.yaml")])
    assert "Compression run" in text and "prune" in text and "m.recipe.yaml" in text


@needs_mnist
def test_compress_never_rewrites_the_users_recipe_beside_its_output(tmp_path):
    net = models.create("lenet300")
    recipe = tmp_path / "m.recipe.yaml"
    text = "# mine\n" + json.dumps({"name": "q", "stages": [
        {"method": "prune", "params": {"sparsity": 0.5}}]})
    recipe.write_text(text)
    deepsqueeze.compress(net, recipe, dataset="mnist", out=tmp_path / "m.dsq", progress=False)
    assert recipe.read_text() == text and (tmp_path / "m.json").is_file()


@needs_mnist
def test_cli_train_compress_inspect_evaluate(tmp_path):
    runner = CliRunner()
    run_dir = tmp_path / "run"
    res = runner.invoke(app, ["train", "--model", "lenet300", "--epochs", "0.5", "--subset",
                              "2000", "--out", str(run_dir), "--no-progress"])
    assert res.exit_code == 0, res.output
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(TINY_RECIPE))  # JSON is YAML
    res = runner.invoke(app, ["compress", str(run_dir / "model.pt"), "--recipe", str(recipe),
                              "--out", str(tmp_path / "m.dsq"), "--subset", "2000",
                              "--no-progress", "--json", str(tmp_path / "c.json")])
    assert res.exit_code == 0, res.output
    assert "smaller than dense fp32" in res.output and "fc1" in res.output
    assert json.loads((tmp_path / "c.json").read_text())["file"]["compression"] > 10
    res = runner.invoke(app, ["inspect", str(tmp_path / "m.dsq")])
    assert res.exit_code == 0 and "total" in res.output
    res = runner.invoke(app, ["evaluate", str(tmp_path / "m.dsq"), "--no-speed", "--json",
                              str(tmp_path / "e.json")])
    assert res.exit_code == 0, res.output
    numbers = json.loads((tmp_path / "e.json").read_text())
    assert numbers["file_bytes"] == (tmp_path / "m.dsq").stat().st_size
    assert inspect(tmp_path / "m.dsq").file_bytes == numbers["file_bytes"]


@needs_mnist
def test_cli_compress_with_a_teacher(tmp_path):
    """--teacher: the distilling stages learn from the given model file (recorded in --json);
    a teacher whose outputs do not fit is refused with a message."""
    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pt"
    save_model(models.create("lenet5"), teacher)
    student = tmp_path / "student.pt"
    save_model(models.create("lenet300"), student)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"name": "d", "dataset": "mnist", "stages": [
        {"method": "prune", "params": {"sparsity": 0.5},
         "finetune": {"epochs": 0.2, "lr": 0.05, "distill": 0.5}}]}))
    runner = CliRunner()
    res = runner.invoke(app, ["compress", str(student), "--recipe", str(recipe), "--out",
                              str(tmp_path / "m.dsq"), "--subset", "1000", "--teacher",
                              str(teacher), "--no-progress", "--json", str(tmp_path / "c.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "c.json").read_text())["teacher"] == str(teacher)
    save_model(models.create("lenet300", num_classes=5), tmp_path / "bad.pt")
    res = runner.invoke(app, ["compress", str(student), "--recipe", str(recipe), "--out",
                              str(tmp_path / "n.dsq"), "--subset", "1000", "--teacher",
                              str(tmp_path / "bad.pt"), "--no-progress"])
    assert res.exit_code != 0
    assert "teacher's outputs have shape" in res.output + str(res.exception)
    assert not (tmp_path / "n.dsq").exists()
