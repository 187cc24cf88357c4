"""HashedNets conversion (``hash``) and circulant projections (``circulant``).

``hash`` replaces selected trained Linear / Conv2d layers by :class:`~deepsqueeze.models.hashed.
HashedLinear` / :class:`~deepsqueeze.models.hashed.HashedConv2d` with ``factor`` × as many real
parameters (buckets) as the layer has weights (Chen et al., ICML 2015). Each bucket starts from
the mean of the sign-corrected trained weights hashed into it (the least-squares fit of the
trained layer); fine-tuning then trains the buckets (the gradient of a bucket is the signed sum
of the gradients of its virtual weights). The file stores the buckets (through the codec, so a
later ``share`` or quantization applies to them like to any weight) and the seed.

``circulant`` replaces selected Linear layers by :class:`~deepsqueeze.models.hashed.
CirculantLinear` (Cheng et al., ICCV 2015), initialized by projecting the trained weight onto
the circulant-with-random-signs structure (``init="project"``) or at random; with
``structure: toeplitz`` by :class:`~deepsqueeze.models.hashed.ToeplitzLinear` (``out + in - 1``
parameters, the same random signs, the same FFT evaluation through a ``out + in`` circulant).
"""

from __future__ import annotations

import zlib
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from deepsqueeze.errors import ModelError
from deepsqueeze.methods.base import Method, MethodParams, per_layer, register_method
from deepsqueeze.models.hashed import (
    MAX_VIRTUAL,
    STRUCTURED,
    CirculantLinear,
    HashedConv2d,
    HashedLinear,
    ToeplitzLinear,
    buckets_for,
)

__all__ = ["Circulant", "CirculantParams", "Hash", "HashParams", "circulant_layer", "hash_layer"]

Factor = Annotated[float, Field(gt=0.0, le=1.0)]


def layer_seed(seed: int, name: str) -> int:
    """The per-layer hash seed: CRC-32 of ``"<seed>:<layer name>"``."""
    return zlib.crc32(f"{seed}:{name}".encode())


def _weight(name: str, module: nn.Module) -> torch.Tensor:
    w = module.weight.detach()
    if not torch.isfinite(w).all():
        raise ModelError(f"layer {name!r}: weight has NaN or infinite values; cannot convert it")
    return w


def _bias(module: nn.Module) -> torch.Tensor | None:
    b = getattr(module, "bias", None)
    return None if b is None else b.detach()


def _factory(w: torch.Tensor) -> dict[str, object]:
    return {"device": w.device, "dtype": w.dtype}


def hash_layer(module: nn.Module, factor: float, seed: int, *, init: str = "mean",
               name: str = "") -> HashedLinear | HashedConv2d:
    """A hashed twin of a Linear / Conv2d at ``factor`` (buckets = round(weights × factor)),
    buckets from the trained weight (``init="mean"``) or at random (``"random"``)."""
    label = name or type(module).__name__
    w = _weight(label, module)
    bias = _bias(module)
    new: HashedLinear | HashedConv2d
    if isinstance(module, nn.Linear):
        new = HashedLinear(module.in_features, module.out_features,
                           buckets_for(w.numel(), factor), seed, bias is not None,
                           **_factory(w))  # type: ignore[arg-type]
    elif isinstance(module, nn.Conv2d):
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            raise ModelError(f"layer {label!r}: hashing supports zero padding given as ints, "
                             f"not padding={module.padding!r} / padding_mode="
                             f"{module.padding_mode!r}")
        new = HashedConv2d(module.in_channels, module.out_channels, tuple(module.kernel_size),
                           buckets_for(w.numel(), factor), seed, tuple(module.stride),
                           tuple(module.padding), tuple(module.dilation), module.groups,
                           bias is not None, **_factory(w))  # type: ignore[arg-type]
    else:
        raise ModelError(f"layer {label!r}: hashing supports Linear and Conv2d, not "
                         f"{type(module).__name__}")
    if init == "mean":
        new.load_dense(w)
    elif init != "random":
        raise ModelError(f"unknown hash init {init!r}; known: mean, random")
    if bias is not None and new.bias is not None:
        with torch.no_grad():
            new.bias.copy_(bias)
    return new


def circulant_layer(module: nn.Module, seed: int, *, init: str = "project",
                    structure: str = "circulant", name: str = ""
                    ) -> CirculantLinear | ToeplitzLinear:
    """A :class:`CirculantLinear` (``structure="circulant"``) or :class:`ToeplitzLinear`
    (``"toeplitz"``) twin of a Linear layer."""
    label = name or type(module).__name__
    if not isinstance(module, nn.Linear):
        raise ModelError(f"layer {label!r}: circulant supports Linear, not "
                         f"{type(module).__name__}")
    if structure not in STRUCTURED:
        raise ModelError(f"unknown circulant structure {structure!r}; known: "
                         f"{', '.join(STRUCTURED)}")
    w = _weight(label, module)
    bias = _bias(module)
    new = STRUCTURED[structure](module.in_features, module.out_features, seed, bias is not None,
                                **_factory(w))  # type: ignore[arg-type]
    if init == "project":
        new.load_dense(w)
    elif init != "random":
        raise ModelError(f"unknown circulant init {init!r}; known: project, random")
    if bias is not None and new.bias is not None:
        with torch.no_grad():
            new.bias.copy_(bias)
    return new


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _check_size(name: str, module: nn.Module) -> None:
    if module.weight.numel() > MAX_VIRTUAL:
        raise ModelError(f"layer {name!r}: {module.weight.numel():,} weights, over the "
                         f"{MAX_VIRTUAL:,} a hashed or circulant layer may stand for")


class HashParams(MethodParams):
    """Parameters of ``hash``."""

    factor: Factor | dict[str, Factor] = Field(
        0.125, description="real parameters per virtual weight (1/8, 1/64); one or {glob: f}")
    layers: list[str] | None = None
    seed: int = Field(0, ge=0, description="base seed; each layer hashes with crc32(seed:name)")
    init: Literal["mean", "random"] = Field(
        "mean", description="buckets from the trained weights (mean) or at random")


@register_method
class Hash(Method):
    """HashedNets: selected layers become hashed layers of ``factor`` × their weights."""

    name = "hash"
    Params = HashParams
    supported = (nn.Linear, nn.Conv2d)
    params: HashParams

    def apply(self, model: nn.Module, layers: dict[str, nn.Module]) -> None:
        factors = per_layer(self.params.factor, layers, "hash.factor")
        for name, module in layers.items():  # validate everything before changing anything
            _weight(name, module)
            _check_size(name, module)
        new = {name: hash_layer(module, factors[name], layer_seed(self.params.seed, name),
                                init=self.params.init, name=name)
               for name, module in layers.items()}
        for name, module in new.items():
            _replace(model, name, module)

    def finalize(self, model: nn.Module) -> None:
        """Check that fine-tuning left every bucket finite."""
        for name, mod in model.named_modules():
            if isinstance(mod, (HashedLinear, HashedConv2d)) and not torch.isfinite(
                    mod.weight_buckets).all():
                raise ModelError(f"layer {name!r}: buckets became NaN/inf during fine-tuning")


class CirculantParams(MethodParams):
    """Parameters of ``circulant``."""

    layers: list[str] | None = None
    seed: int = Field(0, ge=0, description="base seed of the random sign flips")
    init: Literal["project", "random"] = Field(
        "project", description="nearest structured matrix to the trained weight, or random")
    structure: Literal["circulant", "toeplitz"] = Field(
        "circulant", description="circulant (ceil(out/in)·in parameters) or Toeplitz "
                                 "(out + in - 1 parameters), both by FFT")


@register_method
class Circulant(Method):
    """Circulant projections: selected Linear layers become ``CirculantLinear`` or, with
    ``structure: toeplitz``, ``ToeplitzLinear`` (both by FFT)."""

    name = "circulant"
    Params = CirculantParams
    supported = (nn.Linear,)
    params: CirculantParams

    def apply(self, model: nn.Module, layers: dict[str, nn.Module]) -> None:
        for name, module in layers.items():
            _weight(name, module)
            _check_size(name, module)
        new = {name: circulant_layer(module, layer_seed(self.params.seed, name),
                                     init=self.params.init, structure=self.params.structure,
                                     name=name)
               for name, module in layers.items()}
        for name, module in new.items():
            _replace(model, name, module)

    def finalize(self, model: nn.Module) -> None:
        """Check that fine-tuning left every circulant / Toeplitz vector finite."""
        for name, mod in model.named_modules():
            if isinstance(mod, (CirculantLinear, ToeplitzLinear)) and not torch.isfinite(
                    mod.weight).all():
                raise ModelError(f"layer {name!r}: weights became NaN/inf during fine-tuning")
