"""``save`` / ``load`` / ``inspect`` of .dsq files: a compressed model, its real bytes, its table.

``save`` bakes every parametrization (masks, codebooks) into plain weights, encodes each tensor in
the fewest bytes its values allow (see :mod:`deepsqueeze.codec.tensor`) and writes the container
atomically. ``load`` rebuilds the model the manifest describes and fills it with the decoded
weights: a zoo model from its spec (resized when channels were pruned), a user's own model from
its declarative graph (:mod:`deepsqueeze.models.graph`) or into the user's skeleton
(``load(path, model=MyNet())``, strict names and shapes). ``inspect`` reports per-layer sizes
from the file alone. :func:`read_model_file` is the one reader that both ``load`` and the
runtime (:mod:`deepsqueeze.runtime.loader`) use.

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
from deepsqueeze.codec.options import EncodeOptions
from deepsqueeze.codec.tensor import ENCODINGS, decode_tensor, encode_tensor
from deepsqueeze.errors import DeepSqueezeError, DsqFormatError, ModelError
from deepsqueeze.io import load_model, model_for_shapes
from deepsqueeze.metrics.size import FP32_BYTES, parameter_count
from deepsqueeze.models.graph import (
    USER_ATTR,
    UserModel,
    apply_kinds,
    build_module,
    describe,
    kind_specs,
    rebuild,
)
from deepsqueeze.models.registry import SPEC_ATTR
from deepsqueeze.models.state import fit_skeleton, meta_copy, plain_state

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

__all__ = [
    "FileReport",
    "LayerRow",
    "StoredModel",
    "inspect",
    "load",
    "load_model_or_dsq",
    "plain_state",
    "read_model_file",
    "save",
]


def _label(source: Source) -> str:
    return "<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)


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
    kind: str = "zoo"
    """``zoo`` (rebuilt by name from the registry) or ``user`` (the user's own model)."""
    class_name: str | None = None
    """A user model's class, ``module:qualname`` (informational, never imported)."""
    inputs: list[list[Any]] | None = None
    """A user model's inputs ``[shape without batch, dtype]``, None when not recorded."""
    graph: bool = False
    """Whether the file holds a user model's graph, so it loads without the Python class (a zoo
    model always does: it is rebuilt by name)."""

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
        if self.kind == "user":
            shapes = "unknown" if self.inputs is None else ", ".join(
                f"{'×'.join(map(str, shape)) or 'scalar'} {dtype}" for shape, dtype in self.inputs)
            table.caption = (
                f"user model {self.class_name}; inputs: {shapes}; graph: "
                f"{'yes (loads without the class)' if self.graph else 'no (load with model=)'}"
            )
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
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    dense_parameters: int | None = None,
) -> FileReport:
    """Write ``model`` (any ``nn.Module``, any training form) as a .dsq file; return its table.

    A zoo model is recorded by its spec. Any other model is recorded as a user model: its class
    name (informational), its inputs (from ``example_inputs``, batch dimension first; unknown
    without them unless the model was loaded from a file that records them) and, where it can
    be captured, its architecture as a graph (:func:`deepsqueeze.models.graph.capture`), so the
    file loads without the class. ``dense_parameters`` is the parameter count of the model
    *before* compression (the ratio's numerator; a compression pipeline passes it): by default
    the zoo spec's dense model, or for a user model its own parameters.
    """
    opts = encode if isinstance(encode, EncodeOptions) else EncodeOptions(**(encode or {}))
    if not isinstance(model, nn.Module):
        raise ModelError(f"save: expected a torch nn.Module, got {type(model).__name__}")
    if dense_parameters is not None and (
        type(dense_parameters) is not int or not 0 <= dense_parameters <= MAX_COUNT
    ):
        raise ModelError(
            f"save: dense_parameters must be a non-negative integer, got {dense_parameters!r:.40}"
        )
    state, param_names = plain_state(model)
    kinds = kind_specs(model)
    bad = [
        k for k, v in state.items() if torch.is_floating_point(v) and not torch.isfinite(v).all()
    ]
    if bad:
        raise ModelError(f"refusing to save: NaN or Inf values in {', '.join(bad)}")
    spec = getattr(model, SPEC_ATTR, None)
    if isinstance(spec, models.ModelSpec):
        description: dict[str, Any] = spec.to_dict()
        if dense_parameters is None:
            with torch.device("meta"):
                dense_parameters = parameter_count(models.create(spec.name, **spec.kwargs))
    else:
        description = describe(model, example_inputs).to_dict()
        if dense_parameters is None:
            dense_parameters = sum(state[k].numel() for k in param_names)
    entries, sections = [], {}
    for key, tensor in state.items():
        enc = encode_tensor(
            key,
            tensor,
            huffman=opts.huffman,
            ans=opts.ans,
            index_bits=opts.index_bits,
            codebook_dtype=opts.codebook_dtype,
            dense_dtype=opts.dense_dtype,
        )
        entries.append(enc.entry)
        sections.update(enc.sections)
    meta = {
        "format": FORMAT_NAME,
        "model": description,
        "dense_parameters": dense_parameters,
        "parameters": param_names,
        "tensors": entries,
        **({"modules": kinds} if kinds else {}),
        **(extra_meta or {}),
    }
    write_dsq(path, meta, sections, manifest=opts.manifest)
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


@dataclass
class StoredModel:
    """A .dsq file read and checked: its manifest, its tensors (decoded on demand) and the
    description of its model (a zoo spec or a :class:`UserModel`)."""

    source: str
    file: DsqFile
    entries: dict[str, dict[str, Any]]
    """Tensor name → manifest entry (checked: name, shape, encoding)."""
    spec: models.ModelSpec | None
    user: UserModel | None
    kinds: dict[str, Any] = field(default_factory=dict)
    """Module name → ``{"type", "config"}``: the compressed layer kinds (low-rank, hashed,
    binary, quantized...) put in place of the model's modules of those names
    (:func:`~deepsqueeze.models.graph.apply_kinds`; checked when applied)."""

    @property
    def sections(self) -> dict[str, bytes]:
        return self.file.sections

    @property
    def file_size(self) -> int:
        return self.file.file_size

    @property
    def dense_parameters(self) -> int:
        return int(self.file.meta.get("dense_parameters", 0))

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(e["shape"]) for name, e in self.entries.items()}

    @property
    def kind(self) -> str:
        return "zoo" if self.spec is not None else "user"

    @property
    def name(self) -> str:
        """The zoo model's name, or the user model's class name without its module."""
        return self.spec.name if self.spec is not None else self.user.short_name  # type: ignore[union-attr]

    def decode(self, name: str) -> torch.Tensor:
        """Tensor ``name`` decoded (checked; NaN or Inf is a :class:`DsqFormatError`)."""
        return _decode(self.entries[name], self.file.sections)

    def skeleton(self, model: nn.Module | None = None) -> nn.Module:
        """The stored model on the meta device, sized and checked for the stored shapes.

        ``model`` (a user's instance of the architecture) is copied to meta, checked against
        the stored names and shapes and resized where a channel-pruned layer is smaller
        (:func:`~deepsqueeze.models.state.fit_skeleton`; a mismatch is a :class:`ModelError`).
        Without it: a zoo model from the registry, a user model from its graph; a user model
        stored without a graph is a :class:`ModelError` saying how to load it.
        """
        if model is not None:  # the user's own code: checked by names and shapes only
            skeleton = meta_copy(model)
            if any(parametrize.is_parametrized(m) for m in skeleton.modules()):
                return fit_skeleton(skeleton, self.shapes, self.source)  # its error message
            return fit_skeleton(apply_kinds(skeleton, self.kinds, self.source), self.shapes,
                                self.source)
        if self.spec is not None:
            try:
                return model_for_shapes(
                    self.spec, self.shapes,
                    kinds=lambda m: apply_kinds(m, self.kinds, self.source))
            except ModelError as exc:
                raise DsqFormatError(f"{self.source}: {exc}") from exc
        user = self.user
        assert user is not None
        if user.graph is None:
            short = user.short_name
            raise ModelError(
                f"{self.source} holds a {short} ({user.class_name}) stored without a graph "
                f"(its forward could not be captured from allowlisted operations): load it with "
                f"deepsqueeze.load(path, model={short}()), passing an instance of the class"
            )
        try:
            built = rebuild(user.graph)
        except DsqFormatError as exc:
            raise DsqFormatError(f"{self.source}: {exc}") from exc
        have = {k: tuple(v.shape) for k, v in built.state_dict().items()}
        if have != self.shapes:
            wrong = sorted(set(have) ^ set(self.shapes)) or sorted(
                k for k in have if have[k] != self.shapes[k])
            raise DsqFormatError(
                f"{self.source}: the stored tensors do not fit the stored graph "
                f"({len(wrong)} names or shapes differ, e.g. {wrong[0]!r:.80})"
            )
        self._check_forward(built)
        return built

    def meta_inputs(self, model: nn.Module, batch: int = 1) -> tuple[torch.Tensor, ...] | None:
        """Inputs on the meta device for a shape-only pass of ``model`` (None: unknown)."""
        if self.spec is not None:
            return (torch.empty((batch, *models.input_shape_of(model)), device="meta"),)
        if self.user is not None and self.user.inputs is not None:
            return self.user.example_inputs(batch)
        return None

    def mark(self, model: nn.Module) -> nn.Module:
        """Record this file's model description on ``model`` (kept by a later save)."""
        if self.user is not None:
            setattr(model, USER_ATTR, self.user)
        return model

    def _check_forward(self, model: nn.Module) -> None:
        inputs = self.meta_inputs(model)
        if inputs is None:
            return
        try:
            with torch.no_grad():
                model.eval()(*inputs)
        except Exception as exc:
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DsqFormatError(
                f"{self.source}: the model does not run on the recorded inputs "
                f"{[list(s) for s, _ in self.user.inputs]}: {text:.300}"  # type: ignore[union-attr]
            ) from exc


def read_model_file(source: Source) -> StoredModel:
    """Read a .dsq file (a path or its bytes) and check its manifest: the public reader that
    :func:`load`, :func:`inspect` and the runtime share. Any defect raises DsqFormatError."""
    where = _label(source)
    dsq = read_dsq(source)
    entries = _tensor_entries(dsq)
    desc = dsq.meta.get("model")
    spec = user = None
    if isinstance(desc, dict) and desc.get("kind") == "user":
        try:
            user = UserModel.from_dict(desc)
        except DsqFormatError as exc:
            raise DsqFormatError(f"{where}: bad user model description in manifest: {exc}") from exc
    else:
        try:
            spec = models.ModelSpec.from_dict(desc)
        except DeepSqueezeError as exc:
            raise DsqFormatError(f"{where}: bad model spec in manifest: {exc}") from exc
    kinds = dsq.meta.get("modules", {})
    if not isinstance(kinds, dict) or not all(isinstance(k, str) for k in kinds):
        raise DsqFormatError(f"{where}: manifest 'modules' must be an object of layer kinds")
    return StoredModel(where, dsq, {e["name"]: e for e in entries}, spec, user, kinds)


def load(
    path: Source,
    mode: Literal["dense", "runtime"] = "dense",
    *,
    model: nn.Module | None = None,
    **runtime: Any,
) -> nn.Module:
    """Load a .dsq file (a path or its bytes) into an eval-mode model holding exactly the
    stored weights. Any defect of the file raises :class:`DsqFormatError`.

    ``model``: an instance of the saved architecture to fill (a user's own model; optional when
    the file holds a zoo spec or a graph). Its layers that the file stores as compressed layer
    kinds (low-rank, hashed, binary, quantized...) are replaced by those. Names must match
    exactly and shapes too, except that layers stored smaller (channel pruning) are resized; a
    mismatch raises :class:`ModelError` listing the missing, unexpected and mis-shaped tensors.
    The dense load fills ``model`` in place and returns it. Without ``model`` a user model is
    rebuilt from its graph; a file without a graph needs ``model``.

    ``mode="dense"`` (the default) decodes every tensor to a plain dense model: bit-exact, what
    accuracy evaluation and round trips use. ``mode="runtime"`` returns the inference model that
    runs from the compressed form (:func:`deepsqueeze.runtime.load_runtime`; ``runtime`` holds
    its options, e.g. ``batch_size=1``): faster on sparse layers, equal within float rounding.
    """
    if mode == "runtime":
        from deepsqueeze.runtime import load_runtime

        return load_runtime(path, model=model, **runtime)
    if mode != "dense" or runtime:
        raise DeepSqueezeError(f"load: mode must be 'dense' or 'runtime' (options only with "
                               f"'runtime'), got {mode!r} with {sorted(runtime)}")
    if model is not None and not isinstance(model, nn.Module):
        raise ModelError(f"load: model= must be an nn.Module instance, got {type(model).__name__}")
    stored = read_model_file(path)
    if model is None:
        skeleton = stored.skeleton()  # meta: checks everything before any memory is taken
        state = {name: stored.decode(name) for name in stored.entries}
        model = skeleton.to_empty(device="cpu")  # real memory: exactly the stored shapes
    else:
        state = {name: stored.decode(name) for name in stored.entries}  # the file first
        if stored.kinds:
            stored.skeleton(model)  # checked on a meta copy before the model is changed
            apply_kinds(model, stored.kinds, stored.source)
        fit_skeleton(model, stored.shapes, stored.source)
    for key, value in model.state_dict().items():
        state[key] = state[key].to(value.dtype)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise DsqFormatError(
            f"{stored.source}: stored tensors do not fit {stored.name}: {exc}") from exc
    model.eval()
    return stored.mark(model)


def load_model_or_dsq(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """A model file: a .dsq file decoded dense (:func:`load`), anything else as a model.pt."""
    path = Path(path)
    return load(path, model=model) if path.suffix == ".dsq" else load_model(path, model=model)


def _kind_row(name: str, spec: Any, source: str) -> LayerRow:
    """The size-table row of a compressed layer kind: its weights and dense bytes are those of
    the dense layer it stands for (from its checked options), so its ratio is the layer's."""
    try:
        module = build_module(name, spec, "meta")
    except DsqFormatError as exc:
        raise DsqFormatError(f"{source}: {exc}") from exc
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        weights = int(module.in_features) * int(module.out_features)
        outputs = int(module.out_features)
    elif hasattr(module, "in_channels") and hasattr(module, "out_channels"):
        k = module.kernel_size
        window = math.prod(k) if isinstance(k, (tuple, list)) else int(k)
        groups = int(getattr(module, "groups", 1))
        weights = int(module.out_channels) * int(module.in_channels) // groups * window
        outputs = int(module.out_channels)
    else:  # a kind of another geometry: its own parameters
        weights, outputs = sum(p.numel() for p in module.parameters()), 0
    bias = outputs if getattr(module, "bias", None) is not None else 0
    return LayerRow(name, weights + bias, 0, str(spec["type"]), None, None, 0,
                    (weights + bias) * FP32_BYTES)


def inspect(path: Source) -> FileReport:
    """The per-layer size table of a .dsq file, computed from the file alone.

    The file is checked as fully as by :func:`load` (without allocating the model); a user
    model stored without a graph is reported from its tensors (its class is not needed).
    """
    stored = read_model_file(path)
    dsq, entries = stored.file, list(stored.entries.values())
    if stored.spec is not None or (stored.user is not None and stored.user.graph is not None):
        stored.skeleton()
    param_names = set(dsq.meta.get("parameters") or [])
    layers: dict[str, LayerRow] = {}
    kinds = {name: _kind_row(name, spec, stored.source) for name, spec in stored.kinds.items()}
    for entry in entries:
        name = entry["name"]
        kind = next((k for k in kinds if name.startswith(f"{k}.")), None)
        if kind is not None:  # a layer kind's tensors make one row, against the dense layer
            row = layers.setdefault(kind, kinds[kind])
            row.bytes += sum(len(v) for k, v in dsq.sections.items() if k.startswith(f"{name}:"))
            row.kept += int(torch.count_nonzero(_decode(entry, dsq.sections)))
            row.bits_per_weight = 8 * row.bytes / max(row.weights, 1)
            continue
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
    user = stored.user
    return FileReport(
        path=stored.source,
        model=stored.name,
        file_bytes=dsq.file_size,
        header_bytes=dsq.manifest_size,
        dense_bytes=stored.dense_parameters * FP32_BYTES,
        layers=list(layers.values()),
        kind=stored.kind,
        class_name=None if user is None else user.class_name,
        inputs=None if user is None or user.inputs is None
        else [[list(shape), dtype] for shape, dtype in user.inputs],
        graph=user is not None and user.graph is not None,
    )
