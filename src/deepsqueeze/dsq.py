"""``save`` / ``load`` / ``inspect`` of .dsq files: a compressed model, its real bytes, its table.

``save`` bakes every parametrization (masks, codebooks) into plain weights, encodes each tensor in
the fewest bytes its values allow (see :mod:`deepsqueeze.codec.tensor`) and writes the container
atomically. ``load`` rebuilds the zoo model from the manifest's spec (resized when channels were
pruned) and fills it with the decoded weights. ``inspect`` reports per-layer sizes from the file.

Files are untrusted input: ``load`` and ``inspect`` check every manifest field and bound what they
allocate by the file's size before decoding; the model is built on the meta device, checked
against the stored shapes (and a shape-only forward pass) and only then given real memory, of
exactly the stored size. Every defect raises :class:`DsqFormatError`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from rich.table import Table
from torch import nn
from torch.nn.utils import parametrize

from deepsqueeze import models
from deepsqueeze.codec.container import DsqFile, read_dsq, write_dsq
from deepsqueeze.codec.tensor import ENCODINGS, decode_tensor, encode_tensor
from deepsqueeze.errors import DeepSqueezeError, DsqFormatError, ModelError
from deepsqueeze.io import load_model, model_for_shapes
from deepsqueeze.metrics.size import FP32_BYTES, parameter_count
from deepsqueeze.pipeline.recipe import EncodeOptions

FORMAT_NAME = "deepsqueeze-model"
MAX_ELEMENTS = 1 << 28
"""Most tensor elements a file may declare in all (1 GiB as float32)."""
MAX_EXPANSION = 4096
"""Most declared elements per byte of file (above a floor of ``2**22`` elements, 16 MiB)."""
MAX_RANK = 8
MAX_COUNT = (1 << 63) - 1
"""Largest count a manifest may state (``dense_parameters``): it must fit an int64."""

Source = str | Path | bytes | bytearray | memoryview
"""A .dsq file: its path, or its bytes."""


def _label(source: Source) -> str:
    return "<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)


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
            "total",
            f"{sum(r.weights for r in self.layers):,}",
            f"{sum(r.kept for r in self.layers) / max(1, sum(r.weights for r in self.layers)):.1%}",
            "",
            "",
            "",
            f"{self.file_bytes:,}",
            f"{self.compression:.1f}x",
            style="bold",  # a style, not markup: cells are plain text (names come from files)
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
        raise ModelError(f"refusing to save: NaN or Inf values in {', '.join(bad)}")
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
    """The manifest's tensor entries, structurally checked (names, shapes, totals, meta types)."""
    meta = dsq.meta
    if meta.get("format") != FORMAT_NAME:
        raise DsqFormatError(
            f"manifest format is {meta.get('format')!r:.80}, expected {FORMAT_NAME!r}"
        )
    tensors = meta.get("tensors")
    if not isinstance(tensors, list) or not all(isinstance(t, dict) for t in tensors):
        raise DsqFormatError("manifest 'tensors' must be a list of objects")
    if not isinstance(meta.get("model"), dict):
        raise DsqFormatError("manifest 'model' must be an object {name, kwargs}")
    params = meta.get("parameters", [])
    if not isinstance(params, list) or not all(isinstance(n, str) for n in params):
        raise DsqFormatError("manifest 'parameters' must be a list of strings")
    dense = meta.get("dense_parameters", 0)
    if type(dense) is not int or not 0 <= dense <= MAX_COUNT:
        raise DsqFormatError(
            f"manifest 'dense_parameters' must be an integer in 0..2**63-1, found {dense!r:.80}"
        )
    seen: set[str] = set()
    total = 0
    for i, entry in enumerate(tensors):
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise DsqFormatError(f"tensor entry {i}: 'name' must be a non-empty string")
        if name in seen:
            raise DsqFormatError(f"tensor {name!r} appears twice in the manifest")
        seen.add(name)
        shape = entry.get("shape")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_RANK
            or not all(type(d) is int and d >= 0 for d in shape)
        ):
            raise DsqFormatError(
                f"tensor {name!r}: shape must be a list of at most {MAX_RANK} non-negative "
                f"integers, found {shape!r:.80}"
            )
        encoding = entry.get("encoding")
        if not isinstance(encoding, str) or encoding not in ENCODINGS:
            raise DsqFormatError(
                f"tensor {name!r}: unknown encoding {encoding!r:.80}; known: {ENCODINGS}"
            )
        total += math.prod(shape)
    limit = min(MAX_ELEMENTS, max(1 << 22, MAX_EXPANSION * dsq.file_size))
    if total > limit:
        raise DsqFormatError(
            f"tensors declare {total} elements in all, over the limit of {limit} for a "
            f"{dsq.file_size}-byte file"
        )
    return tensors


def _decode(entry: dict[str, Any], sections: dict[str, bytes]) -> torch.Tensor:
    tensor = decode_tensor(entry, sections)
    if torch.is_floating_point(tensor) and not torch.isfinite(tensor).all():
        raise DsqFormatError(
            f"tensor {entry['name']!r} holds NaN or Inf values (deepsqueeze never writes them)"
        )
    return tensor


def _read_checked(
    path: Source,
) -> tuple[str, DsqFile, list[dict[str, Any]], models.ModelSpec]:
    """Read a .dsq file and check its manifest: (label, file, tensor entries, model spec)."""
    where = _label(path)
    dsq = read_dsq(path)
    entries = _tensor_entries(dsq)
    try:
        spec = models.ModelSpec.from_dict(dsq.meta.get("model"))
    except DeepSqueezeError as exc:
        raise DsqFormatError(f"{where}: bad model spec in manifest: {exc}") from exc
    return where, dsq, entries, spec


def _skeleton(spec: models.ModelSpec, shapes: dict[str, tuple[int, ...]], where: str) -> nn.Module:
    """The model of ``spec`` on the meta device, sized and checked for the stored ``shapes``."""
    try:
        return model_for_shapes(spec, shapes)
    except ModelError as exc:
        raise DsqFormatError(f"{where}: {exc}") from exc


def load(path: Source, mode: Literal["dense", "runtime"] = "dense", **runtime: Any) -> nn.Module:
    """Load a .dsq file (a path or its bytes) into an eval-mode zoo model holding exactly the
    stored weights. Any defect of the file raises :class:`DsqFormatError`.

    ``mode="dense"`` (the default) decodes every tensor to a plain dense model: bit-exact, what
    accuracy evaluation and round trips use. ``mode="runtime"`` returns the inference model that
    runs from the compressed form (:func:`deepsqueeze.runtime.load_runtime`; ``runtime`` holds
    its options, e.g. ``batch_size=1``): faster on sparse layers, equal within float rounding.
    """
    if mode == "runtime":
        from deepsqueeze.runtime import load_runtime

        return load_runtime(path, **runtime)
    if mode != "dense" or runtime:
        raise DeepSqueezeError(f"load: mode must be 'dense' or 'runtime' (options only with "
                               f"'runtime'), got {mode!r} with {sorted(runtime)}")
    where, dsq, entries, spec = _read_checked(path)
    model = _skeleton(spec, {e["name"]: tuple(e["shape"]) for e in entries}, where)
    state = {entry["name"]: _decode(entry, dsq.sections) for entry in entries}
    model = model.to_empty(device="cpu")  # real memory: exactly the stored shapes
    for key, value in model.state_dict().items():
        state[key] = state[key].to(value.dtype)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise DsqFormatError(f"{where}: stored tensors do not fit {spec.name}: {exc}") from exc
    model.eval()
    return model


def load_model_or_dsq(path: str | Path) -> nn.Module:
    """A model file: a .dsq file decoded dense (:func:`load`), anything else as a model.pt."""
    path = Path(path)
    return load(path) if path.suffix == ".dsq" else load_model(path)


def inspect(path: Source) -> FileReport:
    """The per-layer size table of a .dsq file, computed from the file alone.

    The file is checked as fully as by :func:`load` (without allocating the model).
    """
    where, dsq, entries, spec = _read_checked(path)
    _skeleton(spec, {e["name"]: tuple(e["shape"]) for e in entries}, where)
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
        tensor = _decode(entry, dsq.sections)  # every tensor: the report is of a valid file
        row.bytes += nbytes
        if layer != "(buffers)":
            row.weights += numel
            row.dense_bytes += numel * FP32_BYTES
            row.kept += int(torch.count_nonzero(tensor)) if is_weight else numel
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
        path=_label(path),
        model=str(dsq.meta["model"].get("name")),
        file_bytes=dsq.file_size,
        header_bytes=dsq.manifest_size,
        dense_bytes=dense,
        layers=list(layers.values()),
    )
