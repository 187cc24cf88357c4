"""int8 / int4 quantization: post-training (``quantize``) and quantization-aware (``qat``).

Both replace the selected ``nn.Linear`` / ``nn.Conv2d`` layers by the quantized layer kinds of
:mod:`deepsqueeze.models.quantized`:

- **weights**: per-output-channel symmetric, ``q = round(w / s)``, ``s = max|w| / qmax``
  (``qmax = 127`` at 8 bits, 7 at 4 bits); exact zeros (pruned weights) stay zero;
- **inputs** (``activations: true``): per-tensor affine uint8 (scale + zero point), ranges
  calibrated on a few batches with ``minmax``, ``percentile`` or ``mse`` (the clipping range
  that minimizes the quantization MSE of the observed values).

``quantize`` (PTQ) folds each Conv2d's following BatchNorm into the convolution first where the
graph allows (``fold_bn``), quantizes the weights once, calibrates the input ranges on
``calibration.batches`` batches of ``calibration.dataset`` (a built-in dataset; or call
:func:`calibrate` with your own data), and records a per-layer error report
(:attr:`Quantize.report`). Integer weights are frozen: a fine-tuning stage after it trains the
biases only.

``qat`` keeps latent fp32 weights behind a parametrization whose output is the integer weight
(``round(clamp(w / s))`` with a straight-through gradient); the layer multiplies by the scale,
so fine-tuning through the normal trainer sees the quantization error. Input ranges are
observed during training (running min/max for the first batch, then an exponential moving
average). ``finalize`` bakes the integers, so the file holds what the int8 runtime runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import fx, nn
from torch.nn.utils import parametrize

from deepsqueeze.errors import ModelError, RecipeError
from deepsqueeze.methods.base import Method, MethodParams, per_layer, register_method
from deepsqueeze.models.quantized import (
    QuantConv2d,
    QuantizedLayer,
    QuantLinear,
    affine_qparams,
    qmax_of,
    round_ste,
)

__all__ = [
    "QAT",
    "CalibrationParams",
    "FakeQuantWeight",
    "Quantize",
    "calibrate",
    "fold_batchnorm",
    "quantization_report",
    "quantize_weight",
    "quantized_layers",
    "to_quantized",
    "weight_scales",
]

Bits = Annotated[int, Field(ge=2, le=8)]
RangeMethod = Literal["minmax", "percentile", "mse"]
SAMPLE_PER_BATCH = 1 << 15  # values kept per batch for percentile / MSE ranges
MSE_GRID = 64  # clipping candidates searched by the MSE calibration


# --------------------------------------------------------------------------------- weights


def weight_scales(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel symmetric scale ``max|w| / qmax`` (1.0 for an all-zero channel)."""
    amax = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1)
    return torch.where(amax > 0, amax / qmax_of(bits), torch.ones_like(amax)).float()


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer weights ``clamp(round(w / scale), -qmax, qmax)`` as floats (zeros stay 0)."""
    q = qmax_of(bits)
    view = scale.view(-1, *([1] * (w.dim() - 1)))
    return torch.clamp(torch.round(w / view), -q, q)


class FakeQuantWeight(nn.Module):
    """Parametrization ``weight = where(mask, clamp(round_ste(w / s), -qmax, qmax), 0)``.

    ``s`` is the observed per-channel scale of the latent ``w`` (detached; the layer keeps it in
    ``weight_scale``). The straight-through gradient passes inside the clamp range and is
    scaled by ``1 / s``, which the layer's multiplication by ``s`` cancels: the latent weight
    receives the plain weight gradient. ``mask`` (True = kept) keeps pruned weights at zero.
    """

    def __init__(self, bits: int, mask: torch.Tensor | None) -> None:
        super().__init__()
        self.bits = bits
        self.register_buffer("mask", None if mask is None else mask.detach().clone().bool())

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        return weight_scales(w, self.bits)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        s = self.scale(w).view(-1, *([1] * (w.dim() - 1)))
        q = qmax_of(self.bits)
        out = torch.clamp(round_ste(w / s), -q, q)
        if self.mask is not None:
            out = torch.where(self.mask, out, torch.zeros((), dtype=out.dtype))
        return out


def _fake_quant_of(module: nn.Module) -> FakeQuantWeight | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations["weight"]:  # type: ignore[union-attr]
        if isinstance(p, FakeQuantWeight):
            return p
    return None


def refresh_scales(model: nn.Module) -> None:
    """Set every QAT layer's ``weight_scale`` from its current latent weight."""
    for mod in model.modules():
        fq = _fake_quant_of(mod)
        if fq is not None and isinstance(mod, QuantizedLayer):
            latent = mod.parametrizations["weight"].original  # type: ignore[union-attr]
            with torch.no_grad():
                mod.weight_scale.copy_(fq.scale(latent))


class _QATForward:
    """Forward pre-hook: refresh the observed weight scale before each QAT forward."""

    def __call__(self, module: nn.Module, _args: Any) -> None:
        fq = _fake_quant_of(module)
        if fq is not None:
            latent = module.parametrizations["weight"].original  # type: ignore[union-attr]
            with torch.no_grad():
                module.weight_scale.copy_(fq.scale(latent))  # type: ignore[operator]


# ------------------------------------------------------------------------------ layer swap


def _effective_weight(module: nn.Module) -> torch.Tensor:
    return module.weight.detach().clone().float()


def to_quantized(module: nn.Module, bits: int = 8, activations: bool = True,
                 name: str = "", reduce_range: bool = False) -> QuantizedLayer:
    """A quantized copy of an ``nn.Linear`` / ``nn.Conv2d`` (its effective weight quantized
    per channel; bias kept in fp32; ``reduce_range``: 7-bit inputs). Input ranges are left
    unset (scale 1, zero point 0)."""
    label = name or type(module).__name__
    w = _effective_weight(module)
    if not torch.isfinite(w).all():
        raise ModelError(f"layer {label!r}: weight has NaN or infinite values; cannot quantize")
    bias = getattr(module, "bias", None)
    new: QuantizedLayer
    if isinstance(module, nn.Linear):
        new = QuantLinear(module.in_features, module.out_features, bias is not None, bits,
                          activations, reduce_range)
    elif isinstance(module, nn.Conv2d):
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            raise ModelError(
                f"layer {label!r}: padding={module.padding!r}, padding_mode="
                f"{module.padding_mode!r}; quantized convolutions need numeric zero padding "
                "(leave the layer out of 'layers')")
        new = QuantConv2d(module.in_channels, module.out_channels, module.kernel_size,
                          module.stride, module.padding, module.dilation, module.groups,
                          bias is not None, "zeros", bits, activations, reduce_range)
    else:
        raise ModelError(f"layer {label!r} is a {type(module).__name__}; quantize handles "
                         "Linear and Conv2d")
    scale = weight_scales(w, bits)
    with torch.no_grad():
        new.weight_scale.copy_(scale)
        new.weight.copy_(quantize_weight(w, scale, bits))
        if bias is not None and new.bias is not None:
            new.bias.copy_(bias.detach().float())
    return new.to(w.device)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    """The quantized layers of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLayer)}


# ------------------------------------------------------------------------ BatchNorm folding


def _bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv, bn)`` module names where a BatchNorm2d is the only user of a Conv2d's output.

    Found on a symbolic fx trace; a model that does not trace folds nothing."""
    try:
        graph = fx.Tracer().trace(model)
    except Exception:
        return []
    mods = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0] if node.args else None
        if (isinstance(src, fx.Node) and src.op == "call_module"
                and type(mods.get(src.target)) is nn.Conv2d and len(src.users) == 1):
            pairs.append((str(src.target), str(node.target)))
    return pairs


def fold_batchnorm(model: nn.Module, convs: Iterable[str] | None = None) -> list[str]:
    """Fold each BatchNorm2d into the Conv2d before it (in place, eval-mode statistics).

    The convolution gets ``w * g / sqrt(var + eps)`` and a bias; the BatchNorm is kept but set
    to the identity (weight 1, bias 0, mean 0, var 1 - eps), so the model's structure (and a
    zoo model's rebuild from its spec) is unchanged. ``convs`` limits folding to those layers.
    Returns the names of the folded convolutions.
    """
    allowed = None if convs is None else set(convs)
    folded = []
    for conv_name, bn_name in _bn_pairs(model):
        if allowed is not None and conv_name not in allowed:
            continue
        conv = model.get_submodule(conv_name)
        bn = model.get_submodule(bn_name)
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
            continue
        if parametrize.is_parametrized(conv):
            parametrize.remove_parametrizations(conv, "weight", leave_parametrized=True)
        with torch.no_grad():
            std = torch.sqrt(bn.running_var + bn.eps)
            gamma = bn.weight if bn.affine else torch.ones_like(std)
            beta = bn.bias if bn.affine else torch.zeros_like(std)
            factor = gamma / std
            old_bias = conv.bias if conv.bias is not None else torch.zeros_like(std)
            conv.weight.mul_(factor.view(-1, 1, 1, 1))
            new_bias = beta + (old_bias - bn.running_mean) * factor
            if conv.bias is None:
                conv.bias = nn.Parameter(new_bias.clone())
            else:
                conv.bias.copy_(new_bias)
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
            if bn.affine:
                bn.weight.fill_(1.0)
                bn.bias.zero_()
        folded.append(conv_name)
    return folded


# ------------------------------------------------------------------------------ calibration


class _Collector:
    """Exact min/max plus a deterministic strided sample of a layer's inputs."""

    def __init__(self) -> None:
        self.lo = math.inf
        self.hi = -math.inf
        self.samples: list[np.ndarray] = []

    def __call__(self, _module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach().float().reshape(-1)
        if not x.numel():
            return
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))
        step = max(1, x.numel() // SAMPLE_PER_BATCH)
        self.samples.append(x[::step].cpu().numpy().copy())

    def range(self, method: RangeMethod, percentile: float, qmax: int = 255
              ) -> tuple[float, float]:
        if not self.samples:
            raise ModelError("no calibration batch reached this layer")
        if method == "minmax":
            return self.lo, self.hi
        v = np.concatenate(self.samples)
        if method == "percentile":
            return (float(np.percentile(v, 100 - percentile)), float(np.percentile(v, percentile)))
        return _mse_range(v, self.lo, self.hi, qmax)


def _fake_quant_np(v: np.ndarray, lo: float, hi: float, qmax: int = 255) -> np.ndarray:
    scale, zp = affine_qparams(lo, hi, qmax)
    q = np.clip(np.rint(v / scale) + zp, 0, qmax)
    return (q - zp) * scale


def _mse_range(v: np.ndarray, lo: float, hi: float, qmax: int = 255) -> tuple[float, float]:
    """The range ``alpha * [lo, hi]`` (alpha on a grid in (0, 1]) of least quantization MSE."""
    best, best_err = (lo, hi), math.inf
    for alpha in np.linspace(1.0 / MSE_GRID, 1.0, MSE_GRID):
        cand = (lo * alpha, hi * alpha)
        err = float(np.mean((_fake_quant_np(v, *cand, qmax) - v) ** 2))
        if err < best_err - 1e-12 * max(best_err, 1e-30):
            best, best_err = cand, err
    return best


def calibrate(model: nn.Module, data: Any, *, batches: int = 8, batch_size: int = 64,
              method: RangeMethod = "minmax", percentile: float = 99.99,
              layers: Iterable[str] | None = None) -> dict[str, tuple[float, float]]:
    """Set the input ranges of the quantized layers of ``model`` from ``batches`` batches of
    ``data`` (any data the trainer takes: a Dataset, DataLoader, ``(X, y)``, a built-in split).

    Runs in eval mode under ``no_grad`` (BatchNorm statistics untouched); deterministic for the
    same data. Returns ``{layer: (lo, hi)}``, the real range each layer's uint8 input covers.
    """
    from deepsqueeze.data.loaders import iter_batches, split_batch

    if batches < 1:
        raise RecipeError(f"calibration batches must be >= 1, got {batches}")
    chosen = quantized_layers(model)
    if layers is not None:
        chosen = {n: chosen[n] for n in layers if n in chosen}
    if not chosen:
        raise ModelError("calibrate: the model has no quantized layer (apply quantize first)")
    collectors = {name: _Collector() for name in chosen}
    handles = [mod.register_forward_pre_hook(collectors[name]) for name, mod in chosen.items()]
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    try:
        with torch.no_grad():
            for i, batch in enumerate(iter_batches(data, batch_size)):
                if i >= batches:
                    break
                inputs, _ = split_batch(batch, "calibration data")
                if isinstance(inputs, tuple):
                    model(*(t.to(device) for t in inputs))
                else:
                    model(inputs.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    ranges = {}
    for name, mod in chosen.items():
        try:
            lo, hi = collectors[name].range(method, percentile, mod.input_qmax)
        except ModelError as exc:
            raise ModelError(f"calibrate: layer {name!r}: {exc}") from exc
        with torch.no_grad():
            mod.set_input_range(lo, hi)
        ranges[name] = (lo, hi)
    return ranges


# ---------------------------------------------------------------------------------- report


def _sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    noise = float(((ref - approx) ** 2).sum())
    signal = float((ref ** 2).sum())
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-30) / noise)


def quantization_report(original: dict[str, torch.Tensor], model: nn.Module
                        ) -> dict[str, dict[str, Any]]:
    """Per layer: bits, weight SQNR (dB) and max abs error against the ``original`` fp32
    weights (``{layer: weight}``), and the input range when calibrated."""
    out: dict[str, dict[str, Any]] = {}
    for name, mod in quantized_layers(model).items():
        row: dict[str, Any] = {"bits": mod.bits, "activations": mod.activations}
        if name in original:
            ref = original[name].float()
            approx = mod.dequantized_weight().detach()
            row["weight_sqnr_db"] = round(_sqnr_db(ref, approx), 2)
            row["weight_max_abs_error"] = float((ref - approx).abs().max())
        if mod.activations:
            s, zp = mod.input_qparams()
            row["input_range"] = [round(-zp * s, 6), round((255 - zp) * s, 6)]
        out[name] = row
    return out


# ------------------------------------------------------------------------------- methods


class CalibrationParams(BaseModel):
    """Where the input ranges come from."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    dataset: str | None = Field(
        None, description="built-in dataset whose training split calibrates (None: call "
        "deepsqueeze.methods.quantize.calibrate with your data, or fine-tune)")
    batches: int = Field(8, ge=1, le=10_000)
    batch_size: int = Field(64, ge=1, le=65_536)
    method: RangeMethod = "minmax"
    percentile: float = Field(99.99, gt=50.0, le=100.0)
    seed: int = Field(0, ge=0)


class QuantizeParams(MethodParams):
    """Parameters of ``quantize`` (post-training quantization)."""

    bits: Bits | dict[str, Bits] = Field(8, description="weight bits (8 or 4; 2..8)")
    activations: bool = Field(True, description="quantize layer inputs to uint8")
    reduce_range: bool = Field(False, description=(
        "7-bit inputs (0..127): the int8-onednn executor's u8 x s8 kernels are then exact on "
        "CPUs without VNNI (as PyTorch's x86 quantization does)"))
    calibration: CalibrationParams = Field(default_factory=CalibrationParams)
    fold_bn: bool = Field(True, description="fold BatchNorm2d into the Conv2d before it")
    layers: list[str] | None = None


def _calibration_data(params: CalibrationParams, model: nn.Module) -> Any:
    from deepsqueeze.data import load_dataset

    assert params.dataset is not None
    data = load_dataset(params.dataset, "train")
    n = min(len(data), params.batches * params.batch_size)
    return data.subset(n, seed=params.seed)


def _check_layers(layers: dict[str, nn.Module]) -> None:
    for name, mod in layers.items():
        if isinstance(mod, QuantizedLayer):
            raise ModelError(f"layer {name!r} is already quantized")
        if isinstance(mod, nn.Conv2d) and (isinstance(mod.padding, str)
                                           or mod.padding_mode != "zeros"):
            raise ModelError(
                f"layer {name!r}: padding={mod.padding!r}, padding_mode={mod.padding_mode!r}; "
                "quantized convolutions need numeric zero padding (leave the layer out of "
                "'layers')")
        if not torch.isfinite(mod.weight.detach()).all():
            raise ModelError(f"layer {name!r}: weight has NaN or infinite values")


@register_method
class Quantize(Method):
    """Post-training int8 (or int4) quantization with calibrated uint8 inputs."""

    name = "quantize"
    Params = QuantizeParams
    params: QuantizeParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.report: dict[str, Any] = {}
        self._original: dict[str, torch.Tensor] = {}
        self._calibrated = False
        self._data: Any = None

    def use_data(self, data: Any, loss_fn: Any = None) -> None:
        """Calibrate on the stage's training data when ``calibration.dataset`` is not set."""
        self._data = data

    def apply(self, model: nn.Module, layers: dict[str, nn.Module]) -> None:
        _check_layers(layers)
        bits = per_layer(self.params.bits, layers, "quantize.bits")
        folded = fold_batchnorm(model, layers) if self.params.fold_bn else []
        self._original = {}
        for name in layers:
            module = model.get_submodule(name)  # re-read: folding may have changed it
            self._original[name] = _effective_weight(module)
            new = to_quantized(module, bits[name], self.params.activations, name,
                               self.params.reduce_range)
            new.weight.requires_grad_(False)  # the integers are final; biases may fine-tune
            _replace(model, name, new)
        self.report = {"folded_bn": folded}
        cal = self.params.calibration
        if self.params.activations and cal.dataset is not None:
            self.calibrate(model, _calibration_data(cal, model))
        elif self.params.activations and self._data is not None:
            self.calibrate(model, self._data)
        elif self.params.activations:
            for name in layers:  # observe the first batches the model sees (fine-tuning)
                mod = model.get_submodule(name)
                assert isinstance(mod, QuantizedLayer)
                mod.observing, mod.ema, mod.observed = True, None, None
        self._update_report(model)

    def calibrate(self, model: nn.Module, data: Any) -> dict[str, tuple[float, float]]:
        """Calibrate the input ranges on ``data`` (see :func:`calibrate`)."""
        cal = self.params.calibration
        ranges = calibrate(model, data, batches=cal.batches, batch_size=cal.batch_size,
                           method=cal.method, percentile=cal.percentile,
                           layers=list(self._original))
        for name in self._original:
            mod = model.get_submodule(name)
            if isinstance(mod, QuantizedLayer):
                mod.observing = False
        self._calibrated = True
        self._update_report(model)
        return ranges

    def _update_report(self, model: nn.Module) -> None:
        self.report["layers"] = quantization_report(self._original, model)

    def finalize(self, model: nn.Module) -> None:
        """Stop observing; refuse to finish with inputs never calibrated."""
        missing = []
        for name in self._original:
            mod = model.get_submodule(name)
            if not isinstance(mod, QuantizedLayer):
                continue
            if mod.observing:
                mod.observing = False
                if mod.observed is None:
                    missing.append(name)
        if missing:
            raise ModelError(
                f"quantize: the inputs of {missing} were never calibrated: set "
                "calibration.dataset (e.g. mnist), add a finetune to the stage, or call "
                "Quantize.calibrate(model, data) before saving; or set activations: false")
        self._update_report(model)


class QATParams(MethodParams):
    """Parameters of ``qat`` (quantization-aware training)."""

    bits: Bits | dict[str, Bits] = Field(8, description="weight bits (8 or 4; 2..8)")
    activations: bool = Field(True, description="fake-quantize layer inputs to uint8")
    reduce_range: bool = Field(False, description="7-bit inputs (see quantize)")
    ema: float = Field(0.01, gt=0.0, le=1.0,
                       description="momentum of the observed input ranges while training")
    calibration: CalibrationParams = Field(default_factory=CalibrationParams)
    layers: list[str] | None = None


@register_method
class QAT(Method):
    """Quantization-aware training: fake-quantized weights (STE) and inputs during fine-tuning.

    Use it with a ``finetune``; ``finalize`` bakes the integer weights and the last observed
    input ranges."""

    name = "qat"
    Params = QATParams
    params: QATParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.report: dict[str, Any] = {}
        self._original: dict[str, torch.Tensor] = {}
        self._hooks: list[Any] = []

    def apply(self, model: nn.Module, layers: dict[str, nn.Module]) -> None:
        _check_layers(layers)
        bits = per_layer(self.params.bits, layers, "qat.bits")
        self._original = {}
        for name, module in layers.items():
            w = _effective_weight(module)
            self._original[name] = w
            new = to_quantized(module, bits[name], self.params.activations, name,
                               self.params.reduce_range)
            mask = (w != 0) if bool((w == 0).any()) else None
            with torch.no_grad():
                new.weight.copy_(w)  # the latent fp32 weight
            parametrize.register_parametrization(new, "weight", FakeQuantWeight(bits[name], mask))
            self._hooks.append(new.register_forward_pre_hook(_QATForward()))
            _replace(model, name, new)
        cal = self.params.calibration
        if self.params.activations and cal.dataset is not None:
            calibrate(model, _calibration_data(cal, model), batches=cal.batches,
                      batch_size=cal.batch_size, method=cal.method, percentile=cal.percentile,
                      layers=list(layers))
            seen = True
        else:
            seen = False
        for name in layers:
            mod = model.get_submodule(name)
            assert isinstance(mod, QuantizedLayer)
            mod.observing, mod.ema = self.params.activations, self.params.ema
            if seen:
                s, zp = mod.input_qparams()
                mod.observed = (-zp * s, (mod.input_qmax - zp) * s)

    def finalize(self, model: nn.Module) -> None:
        """Bake the integer weights and their scales; stop observing."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        refresh_scales(model)
        for name in self._original:
            mod = model.get_submodule(name)
            if not isinstance(mod, QuantizedLayer):
                continue
            if parametrize.is_parametrized(mod, "weight"):
                parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
            mod.weight.requires_grad_(False)
            if mod.observing and mod.activations and mod.observed is None:
                raise ModelError(
                    f"qat: layer {name!r}: its inputs were never observed: fine-tune the stage "
                    "or set calibration.dataset")
            mod.observing = False
        self.report = {"layers": quantization_report(self._original, model)}


def check_integer_weights(model: nn.Module) -> None:
    """Raise :class:`ModelError` if a quantized layer's weight is not integer-valued in range."""
    for name, mod in quantized_layers(model).items():
        w = mod.weight.detach()
        if parametrize.is_parametrized(mod, "weight"):
            continue
        top = float(w.abs().max()) if w.numel() else 0.0
        if not bool(torch.equal(w, torch.round(w))) or top > mod.qmax:
            raise ModelError(f"layer {name!r}: weights are not {mod.bits}-bit integers")
