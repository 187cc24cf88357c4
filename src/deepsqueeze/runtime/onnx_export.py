"""ONNX export of a .dsq model (its decoded dense form) and an onnxruntime session for it.

onnxruntime has no sparse or codebook kernels for these layers, so the exported graph holds the
dense fp32 weights: it is the "established toolkit" baseline the runtime is measured against.
The TorchScript-based exporter (``dynamo=False``) is used: it needs only the ``onnx`` package
(the dynamo exporter also needs ``onnxscript``). Opset 17, dynamic batch axis, input ``input``,
output ``logits``.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepsqueeze.errors import DeepSqueezeError

OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DeepSqueezeError(
            f"{module} is not installed: pip install onnx onnxruntime"
        ) from exc


def _inputs_for(model: nn.Module, example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """The inputs to trace ``model`` with: ``example_inputs`` (a tensor or a tuple, batch
    first), else the zoo spec's input shape, else the inputs a loaded file records."""
    from deepsqueeze import models
    from deepsqueeze.errors import ModelError
    from deepsqueeze.models.graph import USER_ATTR

    if example_inputs is not None:
        xs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else \
            (example_inputs,)
        if not xs or not all(isinstance(x, torch.Tensor) for x in xs):
            raise ModelError("example_inputs must be a tensor or a tuple of tensors "
                             "(batch dimension first)")
        return tuple(x[:1].cpu() for x in xs)
    if isinstance(getattr(model, models.registry.SPEC_ATTR, None), models.ModelSpec):
        return (torch.randn(1, *models.input_shape_of(model)),)
    stored = getattr(model, USER_ATTR, None)
    if stored is not None and stored.inputs is not None:
        return stored.example_inputs(1, device="cpu")
    raise ModelError(
        f"cannot export {type(model).__name__}: its input shapes are unknown (the file records "
        "none); pass example_inputs= (a tensor or a tuple, batch dimension first)"
    )


def export_onnx(source: nn.Module | str | Path, out: str | Path | None = None,
                opset: int = OPSET, *, model: nn.Module | None = None,
                example_inputs: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
                int8: bool = False) -> bytes:
    """Export a model (or a .dsq / model.pt file, decoded dense) to ONNX; returns the bytes and
    writes them to ``out`` when given (checked first: :class:`OutputPathError` when ``out`` is
    a folder, cannot be written, or is the ``source`` file).

    Any ``nn.Module``: a file of the user's own model loads from its graph or into ``model``
    (an instance of its class); it is traced with ``example_inputs`` (default: the zoo input
    shape, or the inputs the file records). One input is named ``input``; several ``input0``,
    ``input1``, ...; the output ``logits``; the batch axis is dynamic.

    ``int8``: the quantized layers (``quantize`` / ``qat``) are written in QDQ form: their
    8-bit weights as initializers with per-channel scales (``DequantizeLinear``, axis 0; held as
    uint8 ``q + 128`` with zero point 128, see :func:`_int8_initializers`), their
    inputs through ``QuantizeLinear`` + ``DequantizeLinear`` (uint8, per tensor), which
    onnxruntime runs with its integer kernels. A model without quantized layers is an error.
    Without ``int8`` the quantized layers' weights are written dequantized (fp32)."""
    if out is not None:
        from deepsqueeze.outputs import check_output_file

        check_output_file(out, inputs=[source] if isinstance(source, (str, Path)) else [])
    _require("onnx")
    if isinstance(source, (str, Path)):
        from deepsqueeze.dsq import load_model_or_dsq

        net = load_model_or_dsq(source, model=model)
    else:
        net = source
    net = net.cpu().eval()
    quantized = _quantized_layers(net)
    if int8 and not quantized:
        from deepsqueeze.errors import ModelError

        raise ModelError(
            "--int8: the model has no quantized layer; compress it with a quantize or qat "
            "stage first (e.g. recipes/int8-lenet300.yaml)")
    for layer in quantized:
        layer.export_int8 = int8
    xs = _inputs_for(net, example_inputs)
    names = [INPUT_NAME] if len(xs) == 1 else [f"{INPUT_NAME}{i}" for i in range(len(xs))]
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter announces its deprecation
        torch.onnx.export(
            net, xs, buf, dynamo=False, opset_version=opset,
            input_names=names, output_names=[OUTPUT_NAME],
            dynamic_axes={**{n: {0: "batch"} for n in names}, OUTPUT_NAME: {0: "batch"}},
        )
    for layer in quantized:
        layer.export_int8 = False
    data = buf.getvalue()
    if int8:
        data = _int8_initializers(data)
    if out is not None:
        from deepsqueeze.io import atomic_write

        with atomic_write(out, "wb") as fh:
            fh.write(data)
    return data


def onnx_session(model: bytes | str | Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU ``InferenceSession`` with ``threads`` intra-op threads (default: the
    torch thread count) and one inter-op thread."""
    ort = _require("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    # not "session.set_denormal_as_zero": it sets the calling thread's FTZ/DAZ flags, which then
    # leak into every later numpy / torch computation of the process
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])


def _quantized_layers(net: nn.Module) -> list[Any]:
    from deepsqueeze.models.quantized import QuantizedLayer

    return [m for m in net.modules() if isinstance(m, QuantizedLayer)]


def _int8_initializers(data: bytes) -> bytes:
    """Replace every ``QuantizeLinear`` of a constant weight by its int8 initializer (the
    exporter writes the weight in fp32 followed by QuantizeLinear; the result feeds the
    DequantizeLinear straight from int8 values), and check the model."""
    import numpy as np

    onnx = _require("onnx")
    from onnx import numpy_helper

    model = onnx.load_from_string(data)
    graph = model.graph
    consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    const_nodes = {}
    for node in graph.node:
        if node.op_type == "Constant" and len(node.output) == 1:
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(attr.t)
                    const_nodes[node.output[0]] = node
        elif node.op_type == "Identity" and node.input[0] in consts:  # deduplicated constants
            consts[node.output[0]] = consts[node.input[0]]
    drop = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in consts:
            continue
        w = consts[node.input[0]].astype(np.float32)
        scale = consts[node.input[1]].astype(np.float32)
        zp = consts[node.input[2]] if len(node.input) > 2 else np.zeros((), np.uint8)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and w.ndim > 1:
            shape = [1] * w.ndim
            shape[axis] = -1
            scale_b, zp_b = scale.reshape(shape), zp.astype(np.int32).reshape(shape)
        else:
            scale_b, zp_b = scale, zp.astype(np.int32)
        info = np.iinfo(zp.dtype)
        q = np.clip(np.rint(w / scale_b) + zp_b, info.min, info.max).astype(zp.dtype)
        name = node.output[0]
        if zp.dtype == np.int8 and not zp.any():
            # symmetric int8 weights written as uint8 q + 128 with zero point 128: the same
            # 8-bit values, but onnxruntime's uint8 x int8 AVX2 kernels (no VNNI) add pairs of
            # products in int16 and saturate, its uint8 x uint8 kernels do not
            q = (q.astype(np.int16) + 128).astype(np.uint8)
            zp_name = f"{name}_zero_point"
            graph.initializer.append(
                numpy_helper.from_array(np.full(zp.shape, 128, np.uint8), zp_name))
            for user in graph.node:
                if user.op_type == "DequantizeLinear" and user.input[0] == name:
                    user.input[2] = zp_name
        graph.initializer.append(numpy_helper.from_array(q, name))
        drop.append(node)
    for node in drop:
        graph.node.remove(node)
    _drop_identity_batchnorms(graph, consts)
    used = {i for n in graph.node for i in n.input}
    for name, node in const_nodes.items():
        if name not in used:
            graph.node.remove(node)
    keep = [i for i in graph.initializer if i.name in used or i.name in
            {o.name for o in graph.output}]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _drop_identity_batchnorms(graph: Any, consts: dict[str, Any]) -> None:
    """Remove BatchNormalization nodes that compute the identity (the BatchNorms ``quantize``
    folded into their convolutions): they would sit between a convolution and the next
    QuantizeLinear and keep onnxruntime from fusing the pair into an integer QLinearConv."""
    import numpy as np

    outputs = {o.name for o in graph.output}
    for node in list(graph.node):
        if node.op_type != "BatchNormalization" or len(node.input) != 5:
            continue
        if node.output[0] in outputs or not all(n in consts for n in node.input[1:]):
            continue
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        scale, bias, mean, var = (np.asarray(consts[n], np.float64) for n in node.input[1:])
        if not (np.all(scale == 1) and np.all(bias == 0) and np.all(mean == 0)
                and np.allclose(var + eps, 1.0, rtol=0, atol=1e-6)):
            continue
        src, dst = node.input[0], node.output[0]
        graph.node.remove(node)
        for user in graph.node:
            for i, name in enumerate(user.input):
                if name == dst:
                    user.input[i] = src
