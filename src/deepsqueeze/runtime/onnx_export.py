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
                example_inputs: torch.Tensor | tuple[torch.Tensor, ...] | None = None) -> bytes:
    """Export a model (or a .dsq / model.pt file, decoded dense) to ONNX; returns the bytes and
    writes them to ``out`` when given (checked first: :class:`OutputPathError` when ``out`` is
    a folder, cannot be written, or is the ``source`` file).

    Any ``nn.Module``: a file of the user's own model loads from its graph or into ``model``
    (an instance of its class); it is traced with ``example_inputs`` (default: the zoo input
    shape, or the inputs the file records). One input is named ``input``; several ``input0``,
    ``input1``, ...; the output ``logits``; the batch axis is dynamic."""
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
    data = buf.getvalue()
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
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])
