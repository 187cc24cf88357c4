"""Binarization of a trained model: BinaryConnect, BNN activations, XNOR-Net scales.

``binarize`` replaces the selected ``nn.Linear`` / ``nn.Conv2d`` layers by binary layers
(:class:`~deepsqueeze.models.binary.BinaryLinear` / ``BinaryConv2d``) in training form: the
trained weights become the latent real weights, ``weight = sign(latent)`` with a straight-through
gradient, the latents clipped to [-1, 1] at each training forward (Courbariaux et al. 2015);
``scaled`` adds XNOR-Net's per-output-channel scale (``mean |W|``, Rastegari et al. 2016, or a
trained one); ``binary_input`` binarizes a layer's input as well (BNN, Hubara et al. 2016; only
meaningful where the previous activation can be negative, e.g. after BatchNorm). The first and
last selected layers (in module order) stay real unless ``keep_first`` / ``keep_last`` is off.
Fine-tuning through the recipe's stage then trains the latent weights; ``dsq.save`` stores the
+-1 weights at 1 bit each and the scales as float32.

Usage::

    method = create_method("binarize", keep_first=False, scaled=True)
    method.apply(model, select_layers(model, method.params.layers, method.supported))
    fit(model, train_set, cfg)
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from deepsqueeze.errors import ModelError
from deepsqueeze.methods.base import Method, MethodParams, per_layer, register_method
from deepsqueeze.models.binary import binary_layers, from_float
from deepsqueeze.models.state import replace_module

__all__ = ["Binarize", "BinarizeParams"]


class BinarizeParams(MethodParams):
    """Parameters of ``binarize``."""

    layers: list[str] | None = Field(None, description="globs or type:Linear; default all")
    keep_first: bool = Field(True, description="leave the first selected layer real")
    keep_last: bool = Field(True, description="leave the last selected layer real")
    scaled: bool | dict[str, bool] = Field(
        True, description="XNOR-Net per-output-channel scale; one value or {glob: value}")
    scale: Literal["mean", "learned"] = Field(
        "mean", description="scale = mean |latent| per channel (XNOR-Net) or a trained one")
    binary_input: bool | dict[str, bool] = Field(
        False, description="binarize the layer's input too (BNN); one value or {glob: value}")


def _base_type(module: nn.Module) -> type[nn.Module]:
    """The module's class (a parametrized module's class is a generated subclass of it)."""
    cls = type(module)
    return cls.__bases__[0] if parametrize.is_parametrized(module) else cls


@register_method
class Binarize(Method):
    """Convert trained Linear / Conv2d layers to binary weights (training form)."""

    name = "binarize"
    Params = BinarizeParams
    supported = (nn.Linear, nn.Conv2d)
    params: BinarizeParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.converted: list[str] = []

    def apply(self, model: nn.Module, layers: dict[str, nn.Module]) -> None:
        """Replace ``layers`` (minus the kept first/last) by binary layers in training form."""
        p = self.params
        order = [n for n, _ in model.named_modules() if n in layers]
        chosen = [n for n in order if _base_type(layers[n]) in (nn.Linear, nn.Conv2d)]
        skipped = [n for n in order if n not in chosen]
        if skipped:
            raise ModelError(f"binarize: {skipped} are not plain nn.Linear / nn.Conv2d layers "
                             "(subclasses and compressed layers are not converted)")
        if p.keep_first and chosen:
            chosen = chosen[1:]
        if p.keep_last and chosen:
            chosen = chosen[:-1]
        if not chosen:
            raise ModelError(
                f"binarize: no layer left to convert among {order} (keep_first/keep_last keep "
                "the first and last selected layers real; select more layers or turn them off)")
        scaled = per_layer(p.scaled, chosen, "binarize.scaled")
        binary_input = per_layer(p.binary_input, chosen, "binarize.binary_input")
        new = {n: from_float(layers[n], scaled=bool(scaled[n]),
                             binary_input=bool(binary_input[n]), scale=p.scale)
               for n in chosen}  # every conversion checked before the model changes
        for name, module in new.items():
            module.train(layers[name].training)
            replace_module(model, name, module)
        self.converted = chosen

    def finalize(self, model: nn.Module) -> None:
        """Check that the converted layers are still binary layers of ``model``."""
        present = binary_layers(model)
        missing = [n for n in self.converted if n not in present]
        if missing:
            raise ModelError(f"binarize: layers {missing} are no longer binary layers")
