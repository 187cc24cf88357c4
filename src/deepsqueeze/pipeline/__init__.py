"""Recipes and the stage runner."""

from deepsqueeze.pipeline.recipe import EncodeOptions, Recipe, Stage, load_recipe, parse_recipe
from deepsqueeze.pipeline.runner import CompressResult, StageRecord, compress

__all__ = [
    "CompressResult",
    "EncodeOptions",
    "Recipe",
    "Stage",
    "StageRecord",
    "compress",
    "load_recipe",
    "parse_recipe",
]
