"""deepsqueeze: compress trained PyTorch networks into real small files, run them, measure them.

Public API::

    import deepsqueeze
    result = deepsqueeze.train("lenet5", "mnist", epochs=5, out="runs/lenet5")
    report = deepsqueeze.evaluate("runs/lenet5/model.pt", "mnist")
    net = deepsqueeze.models.create("lenet300")
    result = deepsqueeze.compress("runs/lenet5/model.pt", "recipes/deep-compression-lenet5.yaml",
                                  out="lenet5.dsq")
    small = deepsqueeze.load("lenet5.dsq")        # runs from the file's weights
    print(deepsqueeze.inspect("lenet5.dsq").compression)
"""

from deepsqueeze import models
from deepsqueeze.dsq import FileReport, inspect, load, save
from deepsqueeze.errors import DeepSqueezeError
from deepsqueeze.evaluation import EvalReport, evaluate
from deepsqueeze.io import load_model, save_model
from deepsqueeze.pipeline import (
    CompressionSession,
    CompressResult,
    Recipe,
    compress,
    load_recipe,
    prepare,
)
from deepsqueeze.training import TrainConfig, fit, train

__version__ = "0.1.0"

__all__ = [
    "CompressResult", "CompressionSession", "DeepSqueezeError", "EvalReport", "FileReport",
    "Recipe", "TrainConfig",
    "compress", "evaluate", "fit", "inspect", "load", "load_model", "load_recipe", "models",
    "prepare", "save", "save_model", "train",
]
