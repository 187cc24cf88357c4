"""Compression methods, one module each; importing this package registers them all."""

from deepsqueeze.methods import channel_pruning, pruning, weight_sharing
from deepsqueeze.methods.base import METHODS, Method, MethodParams, create_method, select_layers

__all__ = [
    "METHODS", "Method", "MethodParams", "channel_pruning", "create_method", "pruning",
    "select_layers", "weight_sharing",
]
