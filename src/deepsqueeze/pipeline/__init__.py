"""Recipes and the stage runner."""

from deepsqueeze.pipeline.recipe import EncodeOptions, Recipe, Stage, load_recipe, parse_recipe
from deepsqueeze.pipeline.runner import (
    AccuracyFloorError,
    CompressResult,
    StageCallback,
    StageRecord,
    compress,
)
from deepsqueeze.pipeline.session import CompressionSession, prepare

__all__ = [
    "AccuracyFloorError",
    "CompressResult",
    "CompressionSession",
    "EncodeOptions",
    "Recipe",
    "Stage",
    "StageCallback",
    "StageRecord",
    "compress",
    "load_recipe",
    "parse_recipe",
    "prepare",
]
