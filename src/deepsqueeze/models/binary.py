"""Binary layers: BinaryConnect, BNN and XNOR-Net, and the binary zoo models.

:class:`BinaryLinear` and :class:`BinaryConv2d` hold a ``weight`` of +-1 values, an optional
per-output-channel scale ``weight_scale`` (XNOR-Net's alpha, shape ``(out,)``) and an optional
bias; with ``binary_input`` they binarize their input first (BNN activations). The output is
``scale * (W_b x_b) + bias``.

Training form (:func:`train_binary`): ``weight`` is parametrized (``torch.nn.utils.parametrize``)
as ``sign(latent)``, the latent real weights clipped to [-1, 1] at every training forward
(Courbariaux et al. 2015), with a straight-through gradient that is cancelled where
``|latent| > 1`` (Hubara et al. 2016). With ``scale="mean"`` the scale is parametrized too, as
``mean |clip(latent)|`` per output channel (Rastegari et al. 2016), so it follows the latent
weights; with ``scale="learned"`` it is a plain trained parameter. ``dsq.save`` bakes both into
their values: the file holds exactly +-1 (the codec stores them at 1 bit per weight, a 2-entry
codebook, fixed-width) and the scales as float32.

Binarized activations use the same sign with the hardtanh straight-through estimator: the
gradient passes where ``|x| <= 1``. Zero binarizes to +1 (``sign(0) = +1``), and so does the
runtime's packed kernel.

The layers are registered layer kinds (:func:`deepsqueeze.models.graph.register_kind`): a file
records them and rebuilds them on load. Zoo models: ``bnn-mlp`` (the BNN paper's MNIST MLP, three
hidden layers of binary units, width an option) and ``binary-lenet5`` (Caffe LeNet-5 with binary
weights, optionally binary activations), both with BatchNorm after every layer.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from deepsqueeze.errors import ModelError
from deepsqueeze.models.graph import (
    bool_option,
    choice_option,
    conv_options,
    int_option,
    register_kind,
)
from deepsqueeze.models.registry import register_model, require_positive

__all__ = [
    "BinaryConv2d",
    "BinaryLeNet5",
    "BinaryLinear",
    "BinaryMLP",
    "MeanAbsScale",
    "SignWeight",
    "binarize_input",
    "binary_layers",
    "fold_batchnorm",
    "from_float",
    "is_training_form",
    "sign",
    "sign_ste",
    "train_binary",
]

ScaleMode = Literal["mean", "learned"]
MAX_FEATURES = 1 << 24


def sign(x: torch.Tensor) -> torch.Tensor:
    """+1 where ``x >= 0``, else -1 (zero is +1; NaN is -1), in ``x``'s dtype."""
    one = torch.ones((), dtype=x.dtype, device=x.device)
    return torch.where(x >= 0, one, -one)


class _SignSTE(torch.autograd.Function):
    """``sign`` forward; backward passes the gradient where ``|x| <= 1`` (hardtanh STE)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return sign(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """Binarize ``x`` to exactly +-1 with the straight-through estimator of Hubara et al.:
    forward ``sign(x)``, backward ``grad * 1{|x| <= 1}``."""
    return _SignSTE.apply(x)


def binarize_input(x: torch.Tensor) -> torch.Tensor:
    """A binary layer's input binarized (BNN activations): :func:`sign_ste`."""
    return sign_ste(x)


class SignWeight(nn.Module):
    """Parametrization ``weight = sign(latent)`` with the straight-through estimator."""

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return sign_ste(latent)


class MeanAbsScale(nn.Module):
    """Parametrization of ``weight_scale`` as ``mean |clip(latent, -1, 1)|`` per output channel
    (XNOR-Net's alpha), ignoring its own stored value; the gradient reaches the latent weights.

    It reads the owner's latent weights through a plain (unregistered) reference, so the latent
    tensor is neither a second parameter nor a second state-dict entry.
    """

    def __init__(self, owner: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_owner", owner)

    def forward(self, _stored: torch.Tensor) -> torch.Tensor:
        latent = self._owner.parametrizations.weight.original  # type: ignore[attr-defined]
        return latent.clamp(-1.0, 1.0).abs().flatten(1).mean(dim=1)


class _BinaryLayer(nn.Module):
    """What :class:`BinaryLinear` and :class:`BinaryConv2d` share."""

    weight: torch.Tensor
    weight_scale: torch.Tensor | None
    bias: torch.Tensor | None
    scaled: bool
    binary_input: bool

    def _init_binary(self, weight_shape: tuple[int, ...], bias: bool, scaled: bool,
                     binary_input: bool, device: Any, dtype: Any) -> None:
        kw = {"device": device, "dtype": dtype}
        self.scaled = bool(scaled)
        self.binary_input = bool(binary_input)
        self.weight = nn.Parameter(torch.empty(weight_shape, **kw))
        out = weight_shape[0]
        self.weight_scale = nn.Parameter(torch.empty(out, **kw)) if scaled else None
        self.bias = nn.Parameter(torch.empty(out, **kw)) if bias else None
        if self.weight.device.type != "meta":
            with torch.no_grad():
                self.weight.copy_(sign(torch.randn(weight_shape, dtype=self.weight.dtype)))
                if self.weight_scale is not None:
                    self.weight_scale.fill_(1.0)
                if self.bias is not None:
                    self.bias.zero_()

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Clip the latent weights (training form, training mode) and binarize the input."""
        if self.training and parametrize.is_parametrized(self, "weight"):
            with torch.no_grad():
                self.parametrizations.weight.original.clamp_(-1.0, 1.0)  # type: ignore[union-attr]
        return sign_ste(x) if self.binary_input else x

    def _finish(self, y: torch.Tensor, view: tuple[int, ...]) -> torch.Tensor:
        if self.weight_scale is not None:
            y = y * self.weight_scale.view(view)
        if self.bias is not None:
            y = y + self.bias.view(view)
        return y

    def _load_from_state_dict(self, state_dict: Any, prefix: str, local_metadata: Any,
                              strict: bool, missing: list[str], unexpected: list[str],
                              errors: list[str]) -> None:
        key = prefix + "weight"
        w = state_dict.get(key)
        if (not parametrize.is_parametrized(self, "weight") and isinstance(w, torch.Tensor)
                and w.device.type != "meta" and w.is_floating_point()
                and not bool(((w == 1) | (w == -1)).all())):
            errors.append(f"{key}: a binary layer's weight must hold only -1 and +1 "
                          f"({int(((w != 1) & (w != -1)).sum())} other values)")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing,
                                      unexpected, errors)


class BinaryLinear(_BinaryLayer):
    """``y = scale * (sign(x) if binary_input else x) @ W_b.T + bias`` with ``W_b`` in {-1, +1}.

    Built plain (``weight`` holds +-1 values: the stored, inference form); :func:`train_binary`
    puts it in training form. ``scaled``: a per-output scale ``weight_scale`` (XNOR-Net).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 scaled: bool = True, binary_input: bool = False, device: Any = None,
                 dtype: Any = None) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._init_binary((self.out_features, self.in_features), bias, scaled, binary_input,
                          device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._prepare(x)
        return self._finish(F.linear(x, self.weight), (-1,))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, scaled={self.scaled}, "
                f"binary_input={self.binary_input}")


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class BinaryConv2d(_BinaryLayer):
    """A 2-D convolution with +-1 weights, ``y = scale * conv(x or sign(x), W_b) + bias``
    (zero padding; with ``binary_input`` the padding is applied after binarizing, as zeros)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", scaled: bool = True, binary_input: bool = False,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        if padding_mode != "zeros":
            raise ModelError(f"BinaryConv2d supports zero padding only, got {padding_mode!r}")
        if isinstance(padding, str):
            raise ModelError("BinaryConv2d needs explicit padding sizes, not 'same'/'valid'")
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ModelError(f"BinaryConv2d: {in_channels} -> {out_channels} channels are not "
                             f"divisible by groups={groups}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.groups, self.padding_mode = int(groups), padding_mode
        shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        self._init_binary(shape, bias, scaled, binary_input, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._prepare(x)
        y = F.conv2d(x, self.weight, None, self.stride, self.padding, self.dilation, self.groups)
        return self._finish(y, (-1, 1, 1))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}, "
                f"scaled={self.scaled}, binary_input={self.binary_input}")


BINARY_LAYERS: tuple[type[nn.Module], ...] = (BinaryLinear, BinaryConv2d)

_SCALED = {"scaled": bool_option, "binary_input": bool_option}
register_kind("BinaryLinear", BinaryLinear, {
    "in_features": int_option(1, MAX_FEATURES), "out_features": int_option(1, MAX_FEATURES),
    "bias": bool_option, **_SCALED,
})
register_kind("BinaryConv2d", BinaryConv2d, {
    **conv_options(2), "padding_mode": choice_option("zeros"), **_SCALED,
})


# ------------------------------------------------------------------------------ training form


def is_training_form(module: nn.Module) -> bool:
    """Whether a binary layer holds latent weights (:func:`train_binary` was applied)."""
    return parametrize.is_parametrized(module, "weight")


def train_binary(module: _BinaryLayer, latent: torch.Tensor | None = None,
                 scale: ScaleMode = "mean") -> _BinaryLayer:
    """Put a binary layer in training form (in place): latent weights (``latent``, default the
    current weight), ``weight = sign(latent)``; with ``scale="mean"`` and a scaled layer,
    ``weight_scale = mean |clip(latent)|`` per channel, with ``"learned"`` a trained parameter
    started at that value. Returns ``module``."""
    if not isinstance(module, BINARY_LAYERS):
        raise ModelError(f"train_binary: expected a binary layer, got {type(module).__name__}")
    if scale not in ("mean", "learned"):
        raise ModelError(f"train_binary: scale must be 'mean' or 'learned', got {scale!r}")
    if is_training_form(module):
        raise ModelError("train_binary: the layer is already in training form")
    with torch.no_grad():
        if latent is not None:
            if tuple(latent.shape) != tuple(module.weight.shape):
                raise ModelError(f"train_binary: latent weights of shape {tuple(latent.shape)} "
                                 f"do not fit a weight of shape {tuple(module.weight.shape)}")
            module.weight.copy_(latent.detach())
        if module.weight_scale is not None and module.weight.device.type != "meta":
            module.weight_scale.copy_(module.weight.clamp(-1, 1).abs().flatten(1).mean(dim=1))
    parametrize.register_parametrization(module, "weight", SignWeight())
    if module.weight_scale is not None and scale == "mean":
        parametrize.register_parametrization(module, "weight_scale", MeanAbsScale(module))
    return module


def from_float(layer: nn.Module, *, scaled: bool = True, binary_input: bool = False,
               scale: ScaleMode = "mean") -> _BinaryLayer:
    """A binary layer in training form converted from a trained ``nn.Linear`` / ``nn.Conv2d``:
    latent weights = its weights, same bias, scales = mean |W| per output channel."""
    if parametrize.is_parametrized(layer):
        raise ModelError(
            f"cannot binarize a parametrized {type(layer).__name__} (pruned, shared or already "
            "compressed): binarize the trained dense layer, before other methods")
    w = layer.weight.detach()
    if not bool(torch.isfinite(w).all()):
        raise ModelError("cannot binarize a layer whose weights hold NaN or Inf values")
    kw = {"device": w.device, "dtype": w.dtype}
    new: _BinaryLayer
    if type(layer) is nn.Linear:
        new = BinaryLinear(layer.in_features, layer.out_features, layer.bias is not None,
                           scaled, binary_input, **kw)
    elif type(layer) is nn.Conv2d:
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ModelError("binarize: only zero-padded convolutions with explicit padding "
                             f"sizes are supported, got padding={layer.padding!r}, "
                             f"padding_mode={layer.padding_mode!r}")
        new = BinaryConv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                           layer.stride, layer.padding, layer.dilation, layer.groups,
                           layer.bias is not None, "zeros", scaled, binary_input, **kw)
    else:
        raise ModelError(f"binarize handles nn.Linear and nn.Conv2d, not {type(layer).__name__}")
    if new.bias is not None and layer.bias is not None:
        with torch.no_grad():
            new.bias.copy_(layer.bias.detach())
    return train_binary(new, w, scale)


def binary_layers(model: nn.Module) -> dict[str, _BinaryLayer]:
    """The binary layers of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, BINARY_LAYERS)}


# ------------------------------------------------------------------------------ zoo models


def _fresh(layer: _BinaryLayer) -> _BinaryLayer:
    """``layer`` in training form with Glorot-uniform latent weights (as the BNN paper)."""
    w = layer.weight
    fan_in, fan_out = w[0].numel(), w.shape[0] * w[0][0].numel() if w.dim() > 2 else w.shape[0]
    latent = None
    if w.device.type != "meta":
        bound = (6.0 / (fan_in + fan_out)) ** 0.5
        latent = torch.empty_like(w).uniform_(-bound, bound)
    return train_binary(layer, latent)


class BinaryMLP(nn.Module):
    """The BNN paper's MNIST MLP (Hubara, Courbariaux et al. 2016): ``depth`` hidden layers of
    ``hidden`` units with binary weights, each followed by BatchNorm; with
    ``binary_activations`` every hidden layer's output is binarized (sign, hardtanh STE) as the
    next layer's input, else ReLU (BinaryConnect). The output layer is followed by BatchNorm as
    in the paper. ``binary_first`` / ``binary_last``: binary weights in the first / last layer
    (real otherwise). ``scaled``: XNOR-Net's per-channel scales. Built in training form;
    ``folded``: the inference form :func:`fold_batchnorm` makes (BatchNorm folded into each
    layer's scale and bias, the norms identities)."""

    def __init__(self, num_classes: int = 10, in_features: int = 784, hidden: int = 2048,
                 depth: int = 3, binary_activations: bool = True, scaled: bool = False,
                 binary_first: bool = True, binary_last: bool = True,
                 dropout: float = 0.0, folded: bool = False) -> None:
        super().__init__()
        self.binary_activations = binary_activations
        widths = [in_features] + [hidden] * depth + [num_classes]
        layers: list[nn.Module] = []
        norms: list[nn.Module] = []
        for i in range(depth + 1):
            binary = (binary_first or i > 0) and (binary_last or i < depth)
            if binary and folded:
                layer: nn.Module = BinaryLinear(widths[i], widths[i + 1], bias=True, scaled=True,
                                                binary_input=binary_activations and i > 0)
            elif binary:
                layer = _fresh(BinaryLinear(
                    widths[i], widths[i + 1], bias=False, scaled=scaled,
                    binary_input=binary_activations and i > 0))
            else:
                layer = nn.Linear(widths[i], widths[i + 1], bias=folded)
            layers.append(layer)
            norms.append(nn.Identity() if folded else nn.BatchNorm1d(widths[i + 1]))
        self.layers = nn.ModuleList(layers)
        self.norms = nn.ModuleList(norms)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        last = len(self.layers) - 1
        for i, (layer, norm) in enumerate(zip(self.layers, self.norms, strict=True)):
            x = norm(layer(x))
            if i < last:
                if not self.binary_activations:
                    x = F.relu(x)
                elif not isinstance(self.layers[i + 1], BinaryLinear):
                    x = sign_ste(x)  # a real next layer still sees binary activations
                x = self.drop(x)
        return x


class BinaryLeNet5(nn.Module):
    """Caffe's LeNet-5 (20-50-500) with binary weights: conv -> BatchNorm -> maxpool -> act,
    fc1 -> BatchNorm -> act, fc2 -> BatchNorm. ``binary_activations``: every layer after the
    first gets binarized inputs (BNN), else ReLU (BinaryConnect). ``binary_first`` /
    ``binary_last``: binary weights in conv1 / fc2. Built in training form; ``folded``: the
    inference form of :func:`fold_batchnorm`. (BatchNorm before the pooling, so that it folds
    into the convolution whatever the sign of its scale.)"""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28,
                 binary_activations: bool = False, scaled: bool = True,
                 binary_first: bool = True, binary_last: bool = True,
                 folded: bool = False) -> None:
        super().__init__()
        size = (input_size - 4) // 2
        size = (size - 4) // 2
        if size < 1:
            raise ModelError(f"model 'binary-lenet5' option 'input_size' is too small: "
                             f"{input_size}")
        b = binary_activations
        self.binary_activations = b

        def conv(i: int, o: int, binary: bool, bin_in: bool) -> nn.Module:
            if not binary:
                return nn.Conv2d(i, o, 5, bias=folded)
            if folded:
                return BinaryConv2d(i, o, 5, bias=True, scaled=True, binary_input=bin_in)
            return _fresh(BinaryConv2d(i, o, 5, bias=False, scaled=scaled, binary_input=bin_in))

        def fc(i: int, o: int, binary: bool, bin_in: bool) -> nn.Module:
            if not binary:
                return nn.Linear(i, o, bias=folded)
            if folded:
                return BinaryLinear(i, o, bias=True, scaled=True, binary_input=bin_in)
            return _fresh(BinaryLinear(i, o, bias=False, scaled=scaled, binary_input=bin_in))

        def norm(kind: type[nn.Module], c: int) -> nn.Module:
            return nn.Identity() if folded else kind(c)

        self.conv1 = conv(in_channels, 20, binary_first, False)
        self.bn1 = norm(nn.BatchNorm2d, 20)
        self.conv2 = conv(20, 50, True, b)
        self.bn2 = norm(nn.BatchNorm2d, 50)
        self.fc1 = fc(50 * size * size, 500, True, b)
        self.bn3 = norm(nn.BatchNorm1d, 500)
        self.fc2 = fc(500, num_classes, binary_last, b)
        self.bn4 = norm(nn.BatchNorm1d, num_classes)

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.binary_activations else F.relu(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._act(F.max_pool2d(self.bn1(self.conv1(x)), 2))
        x = self._act(F.max_pool2d(self.bn2(self.conv2(x)), 2))
        x = self._act(self.bn3(self.fc1(torch.flatten(x, 1))))
        if self.binary_activations and not isinstance(self.fc2, BinaryLinear):
            x = sign_ste(x)
        return self.bn4(self.fc2(x))


@register_model(
    "bnn-mlp",
    input_shape=(1, 28, 28),
    description="BNN MNIST MLP: binary weights (+ activations), BatchNorm (Hubara et al. 2016)",
    limits={"hidden": 8192, "depth": 8},
)
def bnn_mlp(num_classes: int = 10, in_features: int = 784, hidden: int = 2048, depth: int = 3,
            binary_activations: bool = True, scaled: bool = False, binary_first: bool = True,
            binary_last: bool = True, folded: bool = False) -> BinaryMLP:
    """The BNN paper's MLP (no dropout, as in the paper's MNIST run); the paper's width is 4096
    (over the zoo's parameter limit as latent fp32 weights: 37M), the default here 2048."""
    require_positive("bnn-mlp", num_classes=num_classes, in_features=in_features,
                     hidden=hidden, depth=depth)
    return BinaryMLP(num_classes, in_features, hidden, depth, binary_activations, scaled,
                     binary_first, binary_last, 0.0, folded)


@register_model(
    "binary-lenet5",
    input_shape=(1, 28, 28),
    description="Caffe LeNet-5 with binary weights (BinaryConnect/XNOR), BatchNorm",
)
def binary_lenet5(num_classes: int = 10, in_channels: int = 1, input_size: int = 28,
                  binary_activations: bool = False, scaled: bool = True,
                  binary_first: bool = True, binary_last: bool = True,
                  folded: bool = False) -> BinaryLeNet5:
    """Binary LeNet-5; ``binary_activations`` binarizes the inputs of every layer after conv1."""
    require_positive("binary-lenet5", num_classes=num_classes, in_channels=in_channels,
                     input_size=input_size)
    return BinaryLeNet5(num_classes, in_channels, input_size, binary_activations, scaled,
                        binary_first, binary_last, folded)


# ------------------------------------------------------------------------------ BatchNorm folding


def _bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, c) with ``bn(y) = a * y + c`` per channel in eval mode."""
    assert isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_var is not None
    a = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        a = a * bn.weight
    c = -bn.running_mean * a
    if bn.bias is not None:
        c = c + bn.bias
    return a.detach(), c.detach()


def _folded_layer(layer: nn.Module, bn: nn.Module, into: nn.Module) -> None:
    """Fill ``into`` (the folded layer of the same geometry) with ``bn(layer(x))``."""
    a, c = _bn_affine(bn)
    bias = layer.bias.detach() if getattr(layer, "bias", None) is not None else torch.zeros_like(a)
    with torch.no_grad():
        if isinstance(layer, BINARY_LAYERS):
            assert isinstance(into, BINARY_LAYERS)
            scale = layer.weight_scale if layer.weight_scale is not None else torch.ones_like(a)
            into.weight.copy_(layer.weight.detach())
            into.weight_scale.copy_(scale.detach() * a)  # type: ignore[union-attr]
        else:
            w = layer.weight.detach()
            into.weight.copy_(w * a.view(-1, *[1] * (w.dim() - 1)))
        into.bias.copy_(bias * a + c)  # type: ignore[union-attr]


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """The inference form of a trained ``bnn-mlp`` / ``binary-lenet5`` (a new model, eval mode):
    every BatchNorm folded into the layer before it (a binary layer's per-channel scale and
    bias; a real layer's weight and bias), the norms identities; its spec says ``folded``.
    Exact up to float rounding; the latent weights are dropped (the +-1 values are kept)."""
    from deepsqueeze.models.registry import SPEC_ATTR, ModelSpec, create, spec_of

    spec = spec_of(model)
    if spec.name not in ("bnn-mlp", "binary-lenet5") or spec.kwargs.get("folded"):
        raise ModelError(f"fold_batchnorm folds an unfolded bnn-mlp or binary-lenet5, not "
                         f"{spec.name} {spec.kwargs}")
    kwargs = {**spec.kwargs, "folded": True}
    folded = create(spec.name, **kwargs)
    if isinstance(model, BinaryMLP):
        pairs = [(f"layers.{i}", f"norms.{i}") for i in range(len(model.layers))]
    else:
        pairs = [("conv1", "bn1"), ("conv2", "bn2"), ("fc1", "bn3"), ("fc2", "bn4")]
    for layer, bn in pairs:
        _folded_layer(model.get_submodule(layer), model.get_submodule(bn),
                      folded.get_submodule(layer))
    setattr(folded, SPEC_ATTR, ModelSpec(spec.name, kwargs))
    return folded.eval()
