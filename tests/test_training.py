"""Training loop, checkpoints, resume, precision, evaluation and metrics."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

import deepsqueeze
from deepsqueeze import models
from deepsqueeze.errors import CheckpointError, DeepSqueezeError, ModelError
from deepsqueeze.io import load_model, safe_load
from deepsqueeze.metrics.macs import macs_per_sample
from deepsqueeze.training import epoch_order, resolve_precision

from .conftest import needs_mnist


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    a = epoch_order(100, seed=3, epoch=2)
    assert torch.equal(a, epoch_order(100, seed=3, epoch=2))
    assert not torch.equal(a, epoch_order(100, seed=3, epoch=1))
    assert sorted(a.tolist()) == list(range(100))


def test_macs_match_hand_counts():
    assert macs_per_sample(models.create("lenet300"), (1, 28, 28)) == 784 * 300 + 300 * 100 + 1000
    conv1 = 24 * 24 * 20 * 25
    conv2 = 8 * 8 * 50 * 20 * 25
    assert macs_per_sample(models.create("lenet5"), (1, 28, 28)) == conv1 + conv2 + 800 * 500 + 5000


def test_fp16_on_cpu_is_refused_with_advice():
    with pytest.raises(DeepSqueezeError, match="bf16"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(DeepSqueezeError, match="unknown precision"):
        resolve_precision("fp8", torch.device("cpu"))


@needs_mnist
def test_one_epoch_on_a_subset_beats_chance_clearly(tmp_path):
    result = deepsqueeze.train(
        "lenet300", "mnist", epochs=1, subset=4000, out=tmp_path / "run", progress=False
    )
    assert result.fit.test_accuracy > 0.85  # chance is 0.10
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["epoch"] == 1
    reloaded = load_model(result.model_path)
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(reloaded(x), result.model.eval()(x))


@needs_mnist
def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, monkeypatch):
    common = dict(epochs=3, subset=1500, seed=7, progress=False, batch_size=100)
    full = deepsqueeze.train("lenet300", "mnist", out=tmp_path / "full", **common)

    import deepsqueeze.training.loop as loop

    real_fit = loop.fit

    def interrupted_fit(*args, **kwargs):
        def boom(step, _model):
            if step == 2 * 15 + 4:  # mid third epoch (15 steps per epoch)
                raise KeyboardInterrupt

        return real_fit(*args, **kwargs, step_hooks=[boom])

    monkeypatch.setattr("deepsqueeze.training.run.fit", interrupted_fit)
    with pytest.raises(KeyboardInterrupt):
        deepsqueeze.train("lenet300", "mnist", out=tmp_path / "cut", **common)
    monkeypatch.setattr("deepsqueeze.training.run.fit", real_fit)
    ckpt = safe_load(tmp_path / "cut" / "checkpoint.pt")
    assert ckpt["epoch"] == 2
    resumed = deepsqueeze.train(
        "lenet300", "mnist", out=tmp_path / "cut", resume=True, progress=False
    )
    assert resumed.fit.resumed_from_epoch == 2
    for (name, a), (_, b) in zip(
        full.model.state_dict().items(), resumed.model.state_dict().items(), strict=False
    ):
        assert torch.equal(a, b), name


@needs_mnist
def test_existing_run_is_not_overwritten_without_resume(tmp_path):
    deepsqueeze.train("lenet300", "mnist", epochs=0.1, subset=500, out=tmp_path, progress=False)
    with pytest.raises(DeepSqueezeError, match="--resume"):
        deepsqueeze.train("lenet300", "mnist", epochs=0.1, subset=500, out=tmp_path, progress=False)


@needs_mnist
def test_bf16_training_runs_and_learns():
    result = deepsqueeze.train(
        "lenet5", "mnist", epochs=1, subset=1000, precision="bf16", progress=False, batch_size=50
    )
    assert result.fit.test_accuracy > 0.5


@needs_mnist
def test_evaluate_reports_every_number(tmp_path):
    run = deepsqueeze.train(
        "lenet300", "mnist", epochs=0.5, subset=2000, out=tmp_path, progress=False
    )
    report = deepsqueeze.evaluate(
        run.model_path, "mnist", subset=500, latency_runs=5, throughput_runs=2
    )
    d = report.to_dict()
    assert d["samples"] == 500 and 0.5 < d["top1_accuracy"] <= 1
    assert d["parameters"] == 266_610 and d["weights_bytes_fp32"] == 4 * 266_610
    assert d["macs_per_sample"] == 266_200
    assert d["latency_ms_median"] > 0 and d["throughput_samples_per_s"] > 0
    assert d["file_bytes"] == run.model_path.stat().st_size


@needs_mnist
def test_dataset_that_does_not_fit_the_model_is_refused(tmp_path):
    net = models.create("lenet5", in_channels=3, input_size=32)
    with pytest.raises(ModelError, match="expects inputs of shape"):
        deepsqueeze.evaluate(net, "mnist", subset=10, measure_speed=False)


def test_pickle_payload_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"format": "deepsqueeze-model", "x": Payload()}))
    with pytest.raises(CheckpointError, match="refused"):
        load_model(path)


def test_missing_and_foreign_files_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "nope.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a deepsqueeze file"):
        load_model(tmp_path / "foreign.pt")


def test_distillation_needs_a_teacher():
    from deepsqueeze.data import load_dataset
    from deepsqueeze.training import TrainConfig, fit

    net = models.create("lenet300")
    data = load_dataset("mnist", "test").subset(64, seed=0)
    with pytest.raises(DeepSqueezeError, match="teacher"):
        fit(net, data, TrainConfig(epochs=1, distill=0.5), progress=False)


@needs_mnist
def test_distillation_makes_the_student_follow_the_teacher():
    """With distill=1 the labels are ignored: the student learns the teacher's (arbitrary)
    answers; with distill=0 it learns the labels instead."""
    from deepsqueeze.data import load_dataset
    from deepsqueeze.training import TrainConfig, fit

    train = load_dataset("mnist", "train").subset(3000, seed=0)
    x_test = load_dataset("mnist", "test").subset(1000, seed=0).normalized()
    torch.manual_seed(1)
    teacher = models.create("lenet300").eval()
    with torch.no_grad():
        teacher.fc3.weight.mul_(20)  # confident, arbitrary answers
    teacher_says = teacher(x_test).argmax(1)

    def agreement(distill: float) -> float:
        torch.manual_seed(0)
        student = models.create("lenet300")
        cfg = TrainConfig(epochs=2, lr=0.05, distill=distill, temperature=1.0)
        fit(student, train, cfg, teacher=teacher, progress=False)
        with torch.no_grad():
            return (student.eval()(x_test).argmax(1) == teacher_says).float().mean().item()

    assert agreement(1.0) > 0.6
    assert agreement(0.0) < 0.4
