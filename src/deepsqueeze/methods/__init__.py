"""Compression methods, one module each; importing this package registers them all.

Every module of this package is imported here (a new method family adds a module, nothing else).
"""

import importlib as _importlib
import pkgutil as _pkgutil

from deepsqueeze.methods import channel_pruning, pruning, weight_sharing
from deepsqueeze.methods.base import METHODS, Method, MethodParams, create_method, select_layers

for _info in sorted(_pkgutil.iter_modules(__path__), key=lambda m: m.name):
    _importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "METHODS", "Method", "MethodParams", "channel_pruning", "create_method", "pruning",
    "select_layers", "weight_sharing",
]
