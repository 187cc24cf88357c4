"""The model zoo: ``models.create("lenet5")``, ``models.list_models()``, ``models.spec_of(m)``.

Importing this package registers every model below and the compressed layer kinds of the method
families (every module of this package is imported); see ``docs/models.md``.
"""

import importlib as _importlib
import pkgutil as _pkgutil

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

for _info in sorted(_pkgutil.iter_modules(__path__), key=lambda m: m.name):
    _importlib.import_module(f"{__name__}.{_info.name}")

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
