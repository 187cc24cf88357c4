"""The stage's training data reaches the methods that measure on it (Method.use_data): PTQ
calibration and SLR importance work through compress() with the user's own data, no fine-tuning
and no built-in calibration dataset."""

from __future__ import annotations

from pathlib import Path

import torch

import deepsqueeze
from deepsqueeze import models
from deepsqueeze.methods.base import create_method
from deepsqueeze.pipeline.session import CompressionSession


def _data(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_ptq_without_fine_tuning_is_calibrated_on_the_users_data(tmp_path: Path) -> None:
    x, y = _data()
    recipe = {"name": "ptq", "stages": [{"method": "quantize", "params": {"bits": 8}}]}
    out = tmp_path / "q.dsq"
    deepsqueeze.compress(models.create("lenet300"), recipe, train_data=(x, y),
                         eval_data=(x, y), out=out, progress=False)
    fc1 = deepsqueeze.load(out).fc1
    assert float(fc1.input_scale) != 1.0  # a range from the data, not the default


def test_sparse_svd_activation_importance_measures_on_the_users_data(tmp_path: Path) -> None:
    x, y = _data()
    recipe = {"name": "slr", "stages": [{"method": "sparse-svd", "params": {"layers": ["fc1"],
        "rank": 20, "sr": 0.5, "rr": 0.5, "importance": "activation"}}]}
    result = deepsqueeze.compress(models.create("lenet300"), recipe, train_data=(x, y),
                                  eval_data=(x, y), out=tmp_path / "s.dsq", progress=False)
    assert result.file_accuracy is not None


def test_a_methods_own_data_setting_wins_over_the_session_data() -> None:
    method = create_method("sparse-svd", rank=4, importance="activation")
    own = (torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))
    method.set_data(*own)
    method.use_data(_data(), None)
    assert method._data[0] is own[0]


def test_the_session_hands_its_data_to_each_stage_before_apply() -> None:
    seen = []
    session = CompressionSession(models.create("lenet300"), {"name": "p", "stages": [
        {"method": "prune", "params": {"sparsity": 0.5}}]})
    session.use_data("the data", None)
    method = session.methods[0]
    method.use_data = lambda data, loss_fn: seen.append(data)  # type: ignore[method-assign]
    session.start_stage()
    assert seen == ["the data"]
