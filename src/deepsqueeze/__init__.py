"""deepsqueeze: compress trained PyTorch networks into real small files, run them, measure them.

Public API::

    import deepsqueeze
    result = deepsqueeze.train("lenet5", "mnist", epochs=5, out="runs/lenet5")
    report = deepsqueeze.evaluate("runs/lenet5/model.pt", "mnist")
    net = deepsqueeze.models.create("lenet300")
"""

from deepsqueeze import models
from deepsqueeze.errors import DeepSqueezeError
from deepsqueeze.evaluation import EvalReport, evaluate
from deepsqueeze.io import load_model, save_model
from deepsqueeze.training import TrainConfig, fit, train

__version__ = "0.1.0"

__all__ = [
    "DeepSqueezeError", "EvalReport", "TrainConfig", "evaluate", "fit", "load_model", "models",
    "save_model", "train",
]
