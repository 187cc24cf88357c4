"""Executors of the method families' layer kinds, one module per family.

Each module registers its layer readers (:func:`deepsqueeze.runtime.forms.register_layer_form`)
and executors (:func:`deepsqueeze.runtime.layers.register_impl`) when imported; the runtime
imports every module of this package before it loads a file (:func:`load_all`).
"""

from __future__ import annotations

import importlib
import pkgutil


def load_all() -> None:
    """Import (and so register) every executor module of this package."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{info.name}")
