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


def export_onnx(source: nn.Module | str | Path, out: str | Path | None = None,
                opset: int = OPSET) -> bytes:
    """Export a model (or a .dsq / model.pt file, decoded dense) to ONNX; returns the bytes and
    writes them to ``out`` when given (checked first: :class:`OutputPathError` when ``out`` is
    a folder, cannot be written, or is the ``source`` file)."""
    if out is not None:
        from deepsqueeze.outputs import check_output_file

        check_output_file(out, inputs=[source] if isinstance(source, (str, Path)) else [])
    _require("onnx")
    from deepsqueeze import models

    if isinstance(source, (str, Path)):
        from deepsqueeze.dsq import load_model_or_dsq

        model = load_model_or_dsq(source)
    else:
        model = source
    model = model.cpu().eval()
    x = torch.randn(1, *models.input_shape_of(model))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter announces its deprecation
        torch.onnx.export(
            model, (x,), buf, dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
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
