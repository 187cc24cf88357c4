"""Executors of the quantized layer kinds (QuantLinear, QuantConv2d).

A quantized layer's runtime form (:class:`QuantForm`) is read from the file and checked: integer
weights within ``±qmax``, finite positive scales, a zero point in 0..255, shapes that fit the
layer. Two executors run it, the autotuner keeps the faster:

``int8-ort``
    integer arithmetic in onnxruntime: ``QuantizeLinear`` of the input (uint8), ``MatMulInteger``
    (Linear) or ``ConvInteger`` (Conv2d) against the weights (held as uint8 ``q + 128`` with
    zero point 128: onnxruntime's uint8 x int8 AVX2 kernels saturate pairs of products in int16),
    int32 accumulation, then one fp32 multiply by ``input_scale * weight_scale[c]`` and the
    bias. Holds 1 byte per weight.
    Only for layers whose inputs are quantized.
``int8-onednn``
    integer arithmetic in PyTorch's x86 int8 kernels (oneDNN, the ops ``torch.compile``'s x86
    quantization lowers to): the input quantized to NHWC uint8 in one pass by our C kernel
    (``csrc/quant.c``), ``onednn::qconv2d_pointwise`` / ``qlinear_pointwise`` against the
    prepacked int8 weights with int32 accumulation and fp32 output (scales and bias applied
    inside). Convolutions return channels-last fp32, which the next int8 convolution reads as
    is. Only for layers whose u8 x s8 products cannot saturate the kernels' int16 pair sums on
    CPUs without VNNI: 7-bit inputs (``reduce_range``) or weights within +-64; otherwise it is
    not offered (it would differ from the model on rare outputs).
``dequant``
    the weights dequantized to fp32 once (``q * weight_scale``), the input fake-quantized, then
    ``F.linear`` / ``F.conv2d``: the dense decoding's arithmetic. Holds 4 bytes per weight.

All compute the layer's forward (:mod:`deepsqueeze.models.quantized`) up to fp32 rounding.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deepsqueeze.errors import DsqFormatError
from deepsqueeze.models.quantized import (
    ACT_QMAX,
    REDUCED_QMAX,
    QuantConv2d,
    QuantizedLayer,
    QuantLinear,
    fake_quantize_input,
    qmax_of,
)
from deepsqueeze.runtime.forms import LayerForm, register_layer_form
from deepsqueeze.runtime.kernel import check_rc, get_kernel
from deepsqueeze.runtime.layers import ConvGeometry, Impl, RuntimeLayer, _ConvBase, register_impl

__all__ = ["QuantForm", "read_quantized"]

OPSET = 17


@dataclass
class QuantForm:
    """A quantized layer as the executors take it (checked when read)."""

    weight: np.ndarray  # int8, the layer's weight shape
    weight_scale: np.ndarray  # float32 [out]
    input_scale: float
    input_zero_point: int
    activations: bool
    bits: int
    input_qmax: int = ACT_QMAX  # 127 for reduce_range layers

    def dequantized(self) -> torch.Tensor:
        """``q * weight_scale`` as fp32 (the weight shape)."""
        w = torch.from_numpy(self.weight.astype(np.float32))
        return w * torch.from_numpy(self.weight_scale).view(-1, *([1] * (w.dim() - 1)))


def _decode(stored: Any, key: str) -> torch.Tensor:
    if key not in stored.entries:
        raise DsqFormatError(f"quantized layer: tensor {key!r} is missing")
    return stored.decode(key)


def read_quantized(name: str, module: nn.Module, stored: Any) -> LayerForm | None:
    """The :class:`QuantForm` of a stored quantized layer, every value checked."""
    assert isinstance(module, QuantizedLayer)
    where = f"quantized layer {name!r}"
    w = _decode(stored, f"{name}.weight")
    shape = tuple(module.weight.shape)
    if tuple(w.shape) != shape:
        raise DsqFormatError(f"{where}: weight of shape {list(w.shape)}, expected {list(shape)}")
    qmax = qmax_of(module.bits)
    if w.numel() and (not bool(torch.isfinite(w).all()) or not torch.equal(w, torch.round(w))
                      or float(w.abs().max()) > qmax):
        raise DsqFormatError(f"{where}: weights are not {module.bits}-bit integers "
                             f"(-{qmax}..{qmax})")
    scale = _decode(stored, f"{name}.weight_scale")
    if tuple(scale.shape) != (shape[0],) or not bool(torch.isfinite(scale).all()) or (
            scale.numel() and float(scale.min()) <= 0):
        raise DsqFormatError(f"{where}: weight_scale must be {shape[0]} finite positive values")
    s_in = _decode(stored, f"{name}.input_scale")
    zp_in = _decode(stored, f"{name}.input_zero_point")
    if tuple(s_in.shape) != (1,) or tuple(zp_in.shape) != (1,):
        raise DsqFormatError(f"{where}: input_scale and input_zero_point must hold one value")
    s, zp = float(s_in[0]), float(zp_in[0])
    qmax_in = module.input_qmax
    if not (math.isfinite(s) and s > 0) or not (zp == round(zp) and 0 <= zp <= qmax_in):
        raise DsqFormatError(f"{where}: input scale {s} must be finite and positive and the "
                             f"zero point {zp} an integer in 0..{qmax_in}")
    tensors = [f"{name}.{t}" for t in ("weight", "weight_scale", "input_scale",
                                        "input_zero_point")]
    bias = None
    if module.bias is not None:
        bias = _decode(stored, f"{name}.bias").float()
        if tuple(bias.shape) != (shape[0],):
            raise DsqFormatError(f"{where}: bias of shape {list(bias.shape)}, expected "
                                 f"[{shape[0]}]")
        tensors.append(f"{name}.bias")
    form = QuantForm(w.numpy().astype(np.int8), scale.numpy().astype(np.float32), s, int(zp),
                     bool(module.activations), int(module.bits), int(qmax_in))
    kept = int(np.count_nonzero(form.weight))
    return LayerForm(form, bias, tensors, list(shape), f"int{module.bits}", kept,
                     kept / max(1, w.numel()))


def _session(model: Any) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), sess_options=opts,
                                providers=["CPUExecutionProvider"])


def _integer_graph(form: QuantForm, bias: torch.Tensor | None, conv: ConvGeometry | None
                   ) -> Any:
    """ONNX model: QuantizeLinear -> MatMulInteger / ConvInteger -> Cast -> Mul (-> Add)."""
    from onnx import TensorProto, helper, numpy_helper

    out = form.weight.shape[0]
    mul = (np.float32(form.input_scale) * form.weight_scale).astype(np.float32)
    # weights as uint8 with zero point 128: onnxruntime's uint8 x int8 kernels on AVX2 (without
    # VNNI) add pairs of products in int16 and saturate; its uint8 x uint8 path does not
    w_u8 = (form.weight.astype(np.int16) + 128).astype(np.uint8)
    inits = [numpy_helper.from_array(np.array(form.input_scale, np.float32), "sx"),
             numpy_helper.from_array(np.array(form.input_zero_point, np.uint8), "zp"),
             numpy_helper.from_array(np.array(128, np.uint8), "wzp")]
    if conv is None:
        inits += [numpy_helper.from_array(np.ascontiguousarray(w_u8.T), "w"),
                  numpy_helper.from_array(mul, "mul")]
        core = helper.make_node("MatMulInteger", ["xq", "w", "zp", "wzp"], ["yi"])
        x_shape: list[Any] = ["n", form.weight.shape[1]]
        bshape: tuple[int, ...] = (out,)
    else:
        inits += [numpy_helper.from_array(w_u8, "w"),
                  numpy_helper.from_array(mul.reshape(1, out, 1, 1), "mul")]
        ph, pw = conv.padding
        core = helper.make_node("ConvInteger", ["xq", "w", "zp", "wzp"], ["yi"],
                                pads=[ph, pw, ph, pw], strides=list(conv.stride),
                                dilations=list(conv.dilation), group=conv.groups,
                                kernel_shape=list(conv.kernel_size))
        x_shape = ["n", conv.in_channels, "h", "w"]
        bshape = (1, out, 1, 1)
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zp"], ["xq"]), core,
             helper.make_node("Cast", ["yi"], ["yf"], to=TensorProto.FLOAT)]
    if form.input_qmax < ACT_QMAX:  # 7-bit inputs: clip the uint8 values to 0..input_qmax
        inits += [numpy_helper.from_array(np.array(0, np.uint8), "q_lo"),
                  numpy_helper.from_array(np.array(form.input_qmax, np.uint8), "q_hi")]
        nodes[0] = helper.make_node("QuantizeLinear", ["x", "sx", "zp"], ["xq_full"])
        nodes.insert(1, helper.make_node("Clip", ["xq_full", "q_lo", "q_hi"], ["xq"]))
    if bias is None:
        nodes.append(helper.make_node("Mul", ["yf", "mul"], ["y"]))
    else:
        inits.append(numpy_helper.from_array(bias.numpy().astype(np.float32).reshape(bshape),
                                             "b"))
        nodes += [helper.make_node("Mul", ["yf", "mul"], ["ym"]),
                  helper.make_node("Add", ["ym", "b"], ["y"])]
    graph = helper.make_graph(
        nodes, "quantized_layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


class OrtQuantLinear(RuntimeLayer):
    """Linear in integers through onnxruntime (MatMulInteger, int32 accumulation)."""

    impl = "int8-ort"

    def __init__(self, form: QuantForm, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.rows, self.cols = form.weight.shape
        self._bytes = form.weight.nbytes + form.weight_scale.nbytes
        self._sess = _session(_integer_graph(form, bias, None))
        self.register_buffer("bias", bias, persistent=False)

    def extra_bytes(self) -> int:
        return self._bytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_input(x, self.cols)
        lead = x.shape[:-1]
        if x.numel() == 0:
            return torch.empty(*lead, self.rows)
        y = self._sess.run(None, {"x": x.detach().reshape(-1, self.cols).numpy()})[0]
        return torch.from_numpy(y).reshape(*lead, self.rows)


class OrtQuantConv2d(_ConvBase):
    """Conv2d in integers through onnxruntime (ConvInteger, int32 accumulation)."""

    impl = "int8-ort"

    def __init__(self, form: QuantForm, bias: torch.Tensor | None,
                 geometry: ConvGeometry) -> None:
        super().__init__(geometry, bias)
        self._bytes = form.weight.nbytes + form.weight_scale.nbytes
        self._sess = _session(_integer_graph(form, bias, geometry))

    def extra_bytes(self) -> int:
        return self._bytes

    def run(self, x: torch.Tensor, oh: int, ow: int) -> torch.Tensor:
        return torch.from_numpy(self._sess.run(None, {"x": x.detach().numpy()})[0])


# ------------------------------------------------------------------- oneDNN int8 (x86)

SAFE_WEIGHT = 64
"""Largest |integer weight| with which 8-bit inputs cannot saturate a u8 x s8 pair sum
(2 * 255 * 64 = 32,640 < 32,767)."""

_QUANT_ARGS = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
               ctypes.c_int64, ctypes.c_float, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
               ctypes.c_int64]


def _onednn_ok(form: Any, module: nn.Module) -> bool:
    if not isinstance(form, QuantForm) or not form.activations or form.weight.size == 0:
        return False
    if not (hasattr(torch.ops.onednn, "qconv_prepack") and torch.backends.mkldnn.is_available()):
        return False
    return form.input_qmax <= REDUCED_QMAX or int(np.abs(form.weight).max()) <= SAFE_WEIGHT


class _OnednnInput:
    """The NHWC uint8 input of the int8 kernels: our C kernel in one pass, else torch ops."""

    def __init__(self, form: QuantForm) -> None:
        self.scale, self.zp, self.qmax = form.input_scale, form.input_zero_point, form.input_qmax
        kernel = get_kernel()
        self._fn = None if kernel is None else kernel.function("dsq_quant_u8_nhwc", _QUANT_ARGS)

    def __call__(self, x: torch.Tensor, who: str) -> torch.Tensor:
        """``x`` ([N, C, H, W] contiguous or channels-last, or [N, C]) as uint8, NHWC memory,
        returned in ``x``'s logical shape."""
        n, c = x.shape[0], x.shape[1]
        hw = x.numel() // max(n * c, 1)
        if self._fn is None:
            q = torch.clamp(torch.round(x / self.scale) + self.zp, 0, self.qmax).to(torch.uint8)
            return q.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else q
        layout = 0 if x.is_contiguous() else 1
        out = torch.empty((n, *x.shape[2:], c), dtype=torch.uint8)
        check_rc(self._fn(x.data_ptr(), x.numel(), n, c, hw, layout, self.scale, self.zp,
                          self.qmax, out.data_ptr(), out.numel()), who)
        return out.permute(0, 3, 1, 2) if x.dim() == 4 else out


class OnednnQuantLinear(RuntimeLayer):
    """Linear in integers through oneDNN (``onednn::qlinear_pointwise``, fp32 output)."""

    impl = "int8-onednn"

    def __init__(self, form: QuantForm, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.rows, self.cols = form.weight.shape
        self._bytes = form.weight.nbytes + form.weight_scale.nbytes
        self._input = _OnednnInput(form)
        self._packed = torch.ops.onednn.qlinear_prepack(torch.from_numpy(form.weight.copy()),
                                                        None)
        self.register_buffer("w_scale", torch.from_numpy(form.weight_scale.copy()),
                             persistent=False)
        self.register_buffer("w_zp", torch.zeros(self.rows, dtype=torch.int32),
                             persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def extra_bytes(self) -> int:
        return self._bytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_input(x, self.cols)
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.cols)
        if flat.shape[0] == 0:
            return torch.empty(*lead, self.rows)
        q = self._input(flat, self.who())
        i = self._input
        y = torch.ops.onednn.qlinear_pointwise(q, i.scale, i.zp, self._packed, self.w_scale,
                                               self.w_zp, self.bias, 1.0, 0, torch.float32,
                                               "none", [], "")
        return y.reshape(*lead, self.rows)


class OnednnQuantConv2d(_ConvBase):
    """Conv2d in integers through oneDNN (``onednn::qconv2d_pointwise``, fp32 channels-last
    output)."""

    impl = "int8-onednn"
    accepts_channels_last = True

    def __init__(self, form: QuantForm, bias: torch.Tensor | None,
                 geometry: ConvGeometry) -> None:
        super().__init__(geometry, bias)
        g = geometry
        self._bytes = form.weight.nbytes + form.weight_scale.nbytes
        self._input = _OnednnInput(form)
        self._args = ([*g.stride], [*g.padding], [*g.dilation], g.groups)
        self._packed = torch.ops.onednn.qconv_prepack(
            torch.from_numpy(form.weight.copy()), torch.from_numpy(form.weight_scale.copy()),
            form.input_scale, form.input_zero_point, *self._args, None)
        self.register_buffer("w_scale", torch.from_numpy(form.weight_scale.copy()),
                             persistent=False)
        self.register_buffer("w_zp", torch.zeros(g.out_channels, dtype=torch.int32),
                             persistent=False)

    def extra_bytes(self) -> int:
        return self._bytes

    def run(self, x: torch.Tensor, oh: int, ow: int) -> torch.Tensor:
        q = self._input(x, self.who())
        i = self._input
        return torch.ops.onednn.qconv2d_pointwise(
            q, i.scale, i.zp, self._packed, self.w_scale, self.w_zp, self.bias, *self._args,
            1.0, 0, torch.float32, "none", [], "")


class DequantLinear(RuntimeLayer):
    """Linear with the weights dequantized to fp32 once and the input fake-quantized."""

    impl = "dequant"

    def __init__(self, form: QuantForm, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.rows, self.cols = form.weight.shape
        self.activations, self.qmax = form.activations, form.input_qmax
        self.register_buffer("weight", form.dequantized(), persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.register_buffer("sx", torch.tensor([form.input_scale]), persistent=False)
        self.register_buffer("zp", torch.tensor([float(form.input_zero_point)]),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_input(x, self.cols)
        if self.activations:
            x = fake_quantize_input(x, self.sx, self.zp, self.qmax)
        return F.linear(x, self.weight, self.bias)


class DequantConv2d(_ConvBase):
    """Conv2d with the weights dequantized to fp32 once and the input fake-quantized."""

    impl = "dequant"

    def __init__(self, form: QuantForm, bias: torch.Tensor | None,
                 geometry: ConvGeometry) -> None:
        super().__init__(geometry, bias)
        self.activations, self.qmax = form.activations, form.input_qmax
        self.register_buffer("weight", form.dequantized(), persistent=False)
        self.register_buffer("sx", torch.tensor([form.input_scale]), persistent=False)
        self.register_buffer("zp", torch.tensor([float(form.input_zero_point)]),
                             persistent=False)

    def run(self, x: torch.Tensor, oh: int, ow: int) -> torch.Tensor:
        if self.activations:
            x = fake_quantize_input(x, self.sx, self.zp, self.qmax)
        return self._conv(x, self.weight)


def _geometry(module: nn.Module) -> ConvGeometry:
    assert isinstance(module, QuantConv2d)
    return ConvGeometry(module.in_channels, module.out_channels, tuple(module.kernel_size),
                        tuple(module.stride), tuple(module.padding), tuple(module.dilation),
                        module.groups)


def _ort_ok(form: Any, module: nn.Module) -> bool:
    if not isinstance(form, QuantForm) or not form.activations:
        return False
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _is_form(form: Any, module: nn.Module) -> bool:
    return isinstance(form, QuantForm)


register_layer_form(QuantLinear, read_quantized)
register_layer_form(QuantConv2d, read_quantized)
register_impl(QuantLinear, Impl("int8-ort", lambda f, b, m: OrtQuantLinear(f, b), _ort_ok,
                                True))
register_impl(QuantLinear, Impl("int8-onednn", lambda f, b, m: OnednnQuantLinear(f, b),
                                _onednn_ok, True))
register_impl(QuantLinear, Impl("dequant", lambda f, b, m: DequantLinear(f, b), _is_form, False))
register_impl(QuantConv2d, Impl("int8-ort", lambda f, b, m: OrtQuantConv2d(f, b, _geometry(m)),
                                _ort_ok, True))
register_impl(QuantConv2d, Impl("int8-onednn",
                                lambda f, b, m: OnednnQuantConv2d(f, b, _geometry(m)),
                                _onednn_ok, True))
register_impl(QuantConv2d, Impl("dequant", lambda f, b, m: DequantConv2d(f, b, _geometry(m)),
                                _is_form, False))
