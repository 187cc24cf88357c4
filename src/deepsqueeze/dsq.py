"""``save`` / ``load`` / ``inspect`` of .dsq files: a compressed model, its real bytes, its table.

``save`` bakes every parametrization (masks, codebooks) into plain weights, encodes each tensor in
the fewest bytes its values allow (see :mod:`deepsqueeze.codec.tensor`) and writes the container
atomically. ``load`` rebuilds the zoo model from the manifest's spec (resized when channels were
pruned) and fills it with the decoded weights. ``inspect`` reports per-layer sizes from the file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from torch import nn
from torch.nn.utils import parametrize

from deepsqueeze import models
from deepsqueeze.codec.container import DsqFile, read_dsq, write_dsq
from deepsqueeze.codec.tensor import decode_tensor, encode_tensor
from deepsqueeze.errors import DeepSqueezeError, DsqFormatError
from deepsqueeze.metrics.size import FP32_BYTES, parameter_count
from deepsqueeze.pipeline.recipe import EncodeOptions

FORMAT_NAME = "deepsqueeze-model"


def plain_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``model``'s state dict with every parametrization replaced by its effective value.

    Returns the tensors (keys as in the unparametrized model) and the names that are parameters.
    The model itself is not touched (removing parametrizations from a deep copy would not do:
    the copy shares the parametrized class whose properties removal deletes).
    """
    state: dict[str, torch.Tensor] = {}
    params: list[str] = []
    for mname, module in model.named_modules():
        if mname.startswith("parametrizations") or ".parametrizations" in mname:
            continue
        prefix = f"{mname}." if mname else ""
        for pname, p in module.named_parameters(recurse=False):
            state[prefix + pname] = p.detach().cpu()
            params.append(prefix + pname)
        if parametrize.is_parametrized(module):
            for pname in module.parametrizations:
                state[prefix + pname] = getattr(module, pname).detach().cpu()
                params.append(prefix + pname)
        skip = getattr(module, "_non_persistent_buffers_set", set())
        for bname, b in module.named_buffers(recurse=False):
            if bname not in skip:
                state[prefix + bname] = b.detach().cpu()
    return state, params


@dataclass
class LayerRow:
    """One layer of the size table (Deep Compression's per-layer table shape)."""

    layer: str
    weights: int
    kept: int
    encoding: str
    bits_per_weight: float | None
    bits_per_index: float | None
    bytes: int
    dense_bytes: int

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.weights if self.weights else 0.0

    @property
    def compression(self) -> float:
        return self.dense_bytes / self.bytes if self.bytes else float("inf")


@dataclass
class FileReport:
    """Per-layer and total sizes of a .dsq file, all from the file itself."""

    path: str
    model: str
    file_bytes: int
    header_bytes: int
    dense_bytes: int
    layers: list[LayerRow] = field(default_factory=list)

    @property
    def compression(self) -> float:
        """Dense fp32 bytes of the original model's parameters / bytes of the file on disk."""
        return self.dense_bytes / self.file_bytes

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["compression"] = self.compression
        for row, obj in zip(d["layers"], self.layers, strict=False):
            row["kept_fraction"] = obj.kept_fraction
            row["compression"] = obj.compression
        return d

    def table(self) -> Table:
        table = Table(title=f"{self.path} ({self.model})")
        for col in (
            "layer",
            "weights",
            "kept",
            "encoding",
            "bits/weight",
            "bits/index",
            "bytes",
            "compression",
        ):
            table.add_column(col, justify="left" if col in ("layer", "encoding") else "right")
        for r in self.layers:
            table.add_row(
                r.layer,
                f"{r.weights:,}",
                f"{r.kept_fraction:.1%}",
                r.encoding,
                "-" if r.bits_per_weight is None else f"{r.bits_per_weight:.2f}",
                "-" if r.bits_per_index is None else f"{r.bits_per_index:.2f}",
                f"{r.bytes:,}",
                f"{r.compression:.1f}x",
            )
        table.add_row("(header+manifest)", "", "", "", "", "", f"{self.header_bytes:,}", "")
        table.add_row(
            "[bold]total",
            f"{sum(r.weights for r in self.layers):,}",
            f"{sum(r.kept for r in self.layers) / max(1, sum(r.weights for r in self.layers)):.1%}",
            "",
            "",
            "",
            f"[bold]{self.file_bytes:,}",
            f"[bold]{self.compression:.1f}x",
        )
        return table


def save(
    model: nn.Module,
    path: str | Path,
    *,
    encode: EncodeOptions | dict[str, Any] | None = None,
    extra_meta: dict[str, Any] | None = None,
) -> FileReport:
    """Write ``model`` (a zoo model, any training form) as a .dsq file; return its size table."""
    opts = encode if isinstance(encode, EncodeOptions) else EncodeOptions(**(encode or {}))
    spec = models.spec_of(model)
    state, param_names = plain_state(model)
    bad = [
        k for k, v in state.items() if torch.is_floating_point(v) and not torch.isfinite(v).all()
    ]
    if bad:
        raise DeepSqueezeError(f"refusing to save: NaN or Inf values in {', '.join(bad)}")
    original = models.create(spec.name, **spec.kwargs)
    entries, sections = [], {}
    for key, tensor in state.items():
        enc = encode_tensor(
            key,
            tensor,
            huffman=opts.huffman,
            index_bits=opts.index_bits,
            codebook_dtype=opts.codebook_dtype,
            dense_dtype=opts.dense_dtype,
        )
        entries.append(enc.entry)
        sections.update(enc.sections)
    meta = {
        "format": FORMAT_NAME,
        "model": spec.to_dict(),
        "dense_parameters": parameter_count(original),
        "parameters": param_names,
        "tensors": entries,
        **(extra_meta or {}),
    }
    write_dsq(path, meta, sections)
    return inspect(path)


def _tensor_entries(dsq: DsqFile) -> list[dict[str, Any]]:
    meta = dsq.meta
    if meta.get("format") != FORMAT_NAME:
        raise DsqFormatError(f"manifest format is {meta.get('format')!r}, expected {FORMAT_NAME!r}")
    tensors = meta.get("tensors")
    if not isinstance(tensors, list) or not all(isinstance(t, dict) for t in tensors):
        raise DsqFormatError("manifest 'tensors' must be a list of objects")
    return tensors


def load(path: str | Path) -> nn.Module:
    """Load a .dsq file into an eval-mode zoo model holding exactly the stored weights."""
    dsq = read_dsq(path)
    entries = _tensor_entries(dsq)
    try:
        spec = models.ModelSpec.from_dict(dsq.meta.get("model"))
    except DeepSqueezeError as exc:
        raise DsqFormatError(f"{path}: bad model spec in manifest: {exc}") from exc
    state = {}
    for entry in entries:
        tensor = decode_tensor(entry, dsq.sections)
        state[entry["name"]] = tensor
    model = models.create(spec.name, **spec.kwargs)
    expected = model.state_dict()
    if set(state) != set(expected):
        missing, extra = set(expected) - set(state), set(state) - set(expected)
        raise DsqFormatError(
            f"{path}: tensors do not fit model {spec.name}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(extra)[:5]}"
        )
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if any(shapes[k] != tuple(v.shape) for k, v in expected.items()):
        from deepsqueeze.methods.channel_pruning import resize_to_shapes

        try:
            model = resize_to_shapes(model, shapes)
        except DeepSqueezeError as exc:
            raise DsqFormatError(f"{path}: stored shapes do not fit {spec.name}: {exc}") from exc
    for key, value in expected.items():
        state[key] = state[key].to(value.dtype)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise DsqFormatError(f"{path}: stored tensors do not fit {spec.name}: {exc}") from exc
    model.eval()
    return model


def inspect(path: str | Path) -> FileReport:
    """The per-layer size table of a .dsq file, computed from the file alone."""
    dsq = read_dsq(path)
    entries = _tensor_entries(dsq)
    param_names = set(dsq.meta.get("parameters") or [])
    layers: dict[str, LayerRow] = {}
    for entry in entries:
        name = entry["name"]
        if param_names and name not in param_names:
            layer = "(buffers)"
        else:
            layer = name.rsplit(".", 1)[0] if "." in name else name
        numel = 1
        for d in entry.get("shape", []):
            numel *= int(d)
        nbytes = sum(len(v) for k, v in dsq.sections.items() if k.startswith(f"{name}:"))
        row = layers.setdefault(layer, LayerRow(layer, 0, 0, "", None, None, 0, 0))
        is_weight = name.endswith(".weight") and layer != "(buffers)"
        tensor = decode_tensor(entry, dsq.sections) if is_weight else None
        row.bytes += nbytes
        if layer != "(buffers)":
            row.weights += numel
            row.dense_bytes += numel * FP32_BYTES
            row.kept += int(torch.count_nonzero(tensor)) if tensor is not None else numel
        if is_weight:
            row.encoding = entry["encoding"]
            kept = max(int(torch.count_nonzero(tensor)), 1)
            secs = dsq.sections
            if entry["encoding"] in ("codebook", "sparse-codebook", "sparse"):
                vbytes = len(secs.get(f"{name}:values", b"")) + len(
                    secs.get(f"{name}:codebook", b"")
                )
                row.bits_per_weight = 8 * vbytes / kept
            else:
                row.bits_per_weight = 8 * nbytes / kept
            if entry["encoding"].startswith("sparse"):
                row.bits_per_index = 8 * len(secs.get(f"{name}:index", b"")) / kept
    dense = int(dsq.meta.get("dense_parameters", 0)) * FP32_BYTES
    return FileReport(
        path=str(path),
        model=str(dsq.meta.get("model", {}).get("name")),
        file_bytes=dsq.file_size,
        header_bytes=dsq.manifest_size,
        dense_bytes=dense,
        layers=list(layers.values()),
    )
