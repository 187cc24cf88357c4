"""The model zoo: ``models.create("lenet5")``, ``models.list_models()``, ``models.spec_of(m)``.

Importing this package registers every model below; see ``docs/models.md``.
"""

from deepsqueeze.models import lenet, mobilenet, resnet  # noqa: F401  (registers the models)
from deepsqueeze.models.registry import (
    ModelInfo,
    ModelSpec,
    create,
    input_shape_of,
    list_models,
    model_info,
    register_model,
    spec_of,
)

__all__ = [
    "ModelInfo",
    "ModelSpec",
    "create",
    "input_shape_of",
    "list_models",
    "model_info",
    "register_model",
    "spec_of",
]
