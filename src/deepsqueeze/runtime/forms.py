"""Compressed weight forms the runtime executes, decoded from a .dsq file without densifying.

A :class:`CompressedMatrix` is a layer's weight as a ``rows`` x ``cols`` matrix (a Linear's
``[out, in]``; a Conv2d's ``[out, in/groups * kh * kw]``, the column order of ``F.unfold``) in the
compact layout read by :mod:`deepsqueeze.runtime.kernel`: per-row 1-byte column gaps and
codebook symbols packed at the bits the codebook needs (or fp32 values when it is not shared). It
holds about as many bytes as the file spends on the layer (1 byte of gap + 0.5 byte of symbol
per kept weight for a 4-bit shared layer), far below the dense fp32 matrix.

:data:`FORM_DECODERS` maps a file encoding to its decoder. A layer's whole runtime form (weight
form, bias, the stored tensors it stands for) is a :class:`LayerForm`, read per layer type by a
reader in :data:`LAYER_READERS`: Linear and Conv2d by :func:`read_matrix_layer` (a compressed
weight encoding → :class:`CompressedMatrix`); the compressed layer kinds of the method families
(hashed, binary, quantized...) register theirs with :func:`register_layer_form` and their
executors with :func:`deepsqueeze.runtime.layers.register_impl`
(``runtime/executors/<family>.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from deepsqueeze.codec.tensor import (
    _codebook_and_symbols,
    _field,
    _floats,
    _section,
    sparse_positions,
)
from deepsqueeze.errors import DsqFormatError
from deepsqueeze.runtime.kernel import (
    MAX_CODEBOOK,
    MODE_BITS,
    MODE_CB4,
    MODE_CB8,
    MODE_CB16,
    MODE_F32,
)

if TYPE_CHECKING:
    from deepsqueeze.dsq import StoredModel

FILL = 255
"""Gap byte of a filler entry: advance the column cursor by 255, no weight."""
MAX_GAP = 255


@dataclass
class CompressedMatrix:
    """A sparse and/or codebook-shared matrix in the runtime's compact layout (see module doc)."""

    rows: int
    cols: int
    rowptr: torch.Tensor  # int32 [rows + 1], into gaps
    symptr: torch.Tensor  # int32 [rows + 1], into weights
    gaps: torch.Tensor | None  # uint8 [entries]; None: every row is dense
    mode: int  # MODE_CB4 / MODE_CB8 / MODE_CB16 / MODE_F32 / MODE_BITS + bits
    vals: torch.Tensor  # packed symbols (uint8 / int16 holding uint16) or float32 values
    codebook: torch.Tensor | None  # float32 [K] for the codebook modes
    encoding: str  # the file encoding it came from

    @property
    def nnz(self) -> int:
        """Weights stored (the kept weights; a dense-rows matrix stores all)."""
        return int(self.symptr[-1])

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.rows * self.cols)

    def tensors(self) -> list[torch.Tensor]:
        """The tensors held (``symptr`` is ``rowptr`` itself when no row has fillers)."""
        out: list[torch.Tensor] = []
        for t in (self.rowptr, self.symptr, self.gaps, self.vals, self.codebook):
            if t is not None and not any(t is o for o in out):
                out.append(t)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held in memory by this form."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def weights(self) -> np.ndarray:
        """Each stored weight as fp32 (``nnz`` values, row by row)."""
        v = self.vals.numpy()
        if self.mode == MODE_F32:
            return v.astype(np.float32, copy=False)
        assert self.codebook is not None
        if self.mode == MODE_CB4:
            sym = np.stack([v & 15, v >> 4], axis=1).reshape(-1)[: self.nnz]
        elif self.mode > MODE_BITS:
            bits = self.mode - MODE_BITS
            stream = np.unpackbits(v, bitorder="little")[: self.nnz * bits].reshape(-1, bits)
            sym = stream.astype(np.int64) @ (1 << np.arange(bits, dtype=np.int64))
        elif self.mode == MODE_CB16:
            sym = v.view(np.uint16)
        else:
            sym = v
        return self.codebook.numpy()[sym.astype(np.int64)]

    def coords(self) -> tuple[np.ndarray, np.ndarray]:
        """Row and column (int64) of each stored weight (empty arrays for an all-zero layer)."""
        counts = np.diff(self.symptr.numpy()).astype(np.int64)
        row = np.repeat(np.arange(self.rows, dtype=np.int64), counts)
        if self.gaps is None:
            starts = np.repeat(self.symptr.numpy()[:-1].astype(np.int64), counts)
            return row, np.arange(self.nnz, dtype=np.int64) - starts
        if self.gaps.numel() == 0:
            return row, np.zeros(0, np.int64)
        g = self.gaps.numpy().astype(np.int64)
        step = np.where(g == FILL, FILL, g + 1)
        csum = np.cumsum(step)
        rp = self.rowptr.numpy().astype(np.int64)
        base = np.where(rp[:-1] > 0, csum[np.maximum(rp[:-1] - 1, 0)], 0)
        entry_row = np.repeat(np.arange(self.rows), np.diff(rp))
        col = csum - base[entry_row] - 1
        return row, col[g != FILL]

    def to_dense(self) -> torch.Tensor:
        """The dense fp32 ``rows`` x ``cols`` matrix (for dense fallbacks and checks)."""
        out = np.zeros((self.rows, self.cols), np.float32)
        row, col = self.coords()
        out[row, col] = self.weights()
        return torch.from_numpy(out)


def _pack_symbols(symbols: np.ndarray, k: int) -> tuple[int, torch.Tensor]:
    """Symbols in the narrowest width that holds ``k`` codebook entries (at most
    :data:`MAX_CODEBOOK`; symbols already checked to be below ``k``)."""
    if not 0 <= k <= MAX_CODEBOOK:
        raise ValueError(f"a packed codebook holds at most {MAX_CODEBOOK} entries, not {k}")
    s = np.ascontiguousarray(symbols).astype(np.int64)
    bits = max(1, math.ceil(math.log2(max(k, 2))))
    if bits == 4:
        if s.size % 2:
            s = np.append(s, 0)
        packed = (s[0::2] & 15) | ((s[1::2] & 15) << 4)
        return MODE_CB4, torch.from_numpy(packed.astype(np.uint8))
    if bits < 8:
        stream = ((s[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
        packed = np.append(np.packbits(stream, bitorder="little"), np.uint8(0))  # + padding
        return MODE_BITS + bits, torch.from_numpy(packed)
    if bits == 8:
        return MODE_CB8, torch.from_numpy(s.astype(np.uint8))
    return MODE_CB16, torch.from_numpy(s.astype(np.uint16).view(np.int16))


def from_coords(
    rows: int,
    cols: int,
    row: np.ndarray,
    col: np.ndarray,
    *,
    symbols: np.ndarray | None = None,
    codebook: np.ndarray | None = None,
    values: np.ndarray | None = None,
    encoding: str = "sparse",
    dense_rows: bool = False,
) -> CompressedMatrix:
    """Build the compact form from kept entries sorted by (row, col).

    Give ``symbols`` + ``codebook`` (shared weights) or ``values`` (fp32). With ``dense_rows``
    every element is an entry (row-major order) and no gaps are stored. A codebook of more than
    :data:`MAX_CODEBOOK` entries (more than 16-bit symbols) is decoded to fp32 values, the
    same weights the dense decoder gives. Entries outside the matrix, out of order, or symbols
    outside the codebook raise :class:`DsqFormatError`: the kernel never indexes past a buffer.
    """
    row = np.asarray(row, np.int64).reshape(-1)
    col = np.asarray(col, np.int64).reshape(-1)
    _check_entries(rows, cols, row, col, dense_rows)
    if symbols is not None:
        if codebook is None:
            raise ValueError("symbols need a codebook")
        sym = np.asarray(symbols, np.int64).reshape(-1)
        cb = np.asarray(codebook, np.float32).reshape(-1)
        if sym.size != row.size:
            raise DsqFormatError(f"{sym.size} codebook symbols for {row.size} entries")
        if sym.size and (int(sym.min()) < 0 or int(sym.max()) >= cb.size):
            raise DsqFormatError(f"codebook symbol out of range (codebook of {cb.size} entries)")
        if cb.size > MAX_CODEBOOK:  # wider than the kernel's 16-bit symbols: run fp32 values
            symbols, codebook, values = None, None, cb[sym]
    elif values is not None and np.asarray(values).size != row.size:
        raise DsqFormatError(f"{np.asarray(values).size} values for {row.size} entries")
    counts = np.bincount(row, minlength=rows).astype(np.int64) if row.size else np.zeros(
        rows, np.int64)
    symptr = np.zeros(rows + 1, np.int64)
    symptr[1:] = np.cumsum(counts)
    if dense_rows:
        gaps_t = None
        rowptr = symptr
    else:
        first = np.zeros(row.size, bool)
        first[symptr[:-1][counts > 0]] = True
        prev = np.empty_like(col)
        prev[1:] = col[:-1]
        prev[first] = -1
        dist = col - prev  # >= 1
        nfill = (dist - 1) // MAX_GAP
        at = np.cumsum(nfill + 1) - 1  # where each real entry lands
        gaps = np.full(int(at[-1]) + 1 if at.size else 0, FILL, np.uint8)
        gaps[at] = (dist - nfill * MAX_GAP - 1).astype(np.uint8)
        per_row = np.bincount(row, weights=nfill + 1, minlength=rows).astype(np.int64)
        rowptr = np.zeros(rows + 1, np.int64)
        rowptr[1:] = np.cumsum(per_row) if row.size else 0
        gaps_t = torch.from_numpy(gaps)
    if max(int(rowptr[-1]), int(symptr[-1])) >= 2**31:
        raise DsqFormatError("layer too large for the runtime's 32-bit row pointers")
    cb_t = None
    if symbols is not None:
        cb = np.asarray(codebook, np.float32).reshape(-1)
        mode, vals = _pack_symbols(np.asarray(symbols, np.int64), cb.size)
        cb_t = torch.from_numpy(cb.copy())
    else:
        if values is None:
            raise ValueError("give symbols + codebook or values")
        mode, vals = MODE_F32, torch.from_numpy(np.asarray(values, np.float32).copy())
    rowptr_t = torch.from_numpy(rowptr.astype(np.int32))
    same = rowptr.shape == symptr.shape and bool(np.array_equal(rowptr, symptr))
    return CompressedMatrix(
        rows=rows,
        cols=cols,
        rowptr=rowptr_t,
        symptr=rowptr_t if same else torch.from_numpy(symptr.astype(np.int32)),
        gaps=gaps_t,
        mode=mode,
        vals=vals,
        codebook=cb_t,
        encoding=encoding,
    )


def _check_entries(rows: int, cols: int, row: np.ndarray, col: np.ndarray,
                   dense_rows: bool) -> None:
    """Kept entries inside a ``rows`` x ``cols`` matrix, strictly increasing in (row, col)."""
    if rows < 1 or cols < 1:
        raise DsqFormatError(f"a {rows} x {cols} weight matrix has no elements to run")
    if row.size != col.size:
        raise DsqFormatError(f"{row.size} rows for {col.size} columns of kept entries")
    if dense_rows and row.size != rows * cols:
        raise DsqFormatError(f"dense rows need {rows * cols} entries, got {row.size}")
    if row.size == 0:
        return
    if (int(row.min()) < 0 or int(row.max()) >= rows or int(col.min()) < 0
            or int(col.max()) >= cols):
        raise DsqFormatError(f"kept entry outside the {rows} x {cols} matrix")
    flat = row * cols + col
    if flat.size > 1 and not bool(np.all(flat[1:] > flat[:-1])):
        raise DsqFormatError("kept entries are not in increasing (row, column) order")


def from_dense(weight: torch.Tensor, *, max_codebook: int = MAX_CODEBOOK) -> CompressedMatrix:
    """Compact form of a dense weight (2-D, or a conv weight flattened per output channel)."""
    w = weight.detach().cpu().float().reshape(weight.shape[0], -1).numpy()
    rows, cols = w.shape
    row, col = np.nonzero(w)
    vals = w[row, col]
    distinct, inverse = np.unique(vals, return_inverse=True)
    if distinct.size <= max_codebook and distinct.size < max(vals.size, 1):
        return from_coords(rows, cols, row, col, symbols=inverse, codebook=distinct,
                           encoding="sparse-codebook")
    return from_coords(rows, cols, row, col, values=vals, encoding="sparse")


def matrix_shape(shape: list[int]) -> tuple[int, int]:
    """(rows, cols) of a weight of ``shape``: output units x everything else."""
    if len(shape) < 2:
        raise DsqFormatError(f"weight of shape {shape} is not a matrix or conv kernel")
    return shape[0], math.prod(shape[1:])


def _check_finite(a: np.ndarray, name: str) -> None:
    if a.size and not np.isfinite(a).all():
        raise DsqFormatError(f"tensor {name!r} holds NaN or Inf values (deepsqueeze never writes "
                             "them)")


def decode_sparse(entry: dict[str, Any], sections: dict[str, bytes]) -> CompressedMatrix:
    """A ``sparse`` / ``sparse-codebook`` entry as a compact matrix (no dense allocation).

    Checks every field as :func:`deepsqueeze.codec.tensor.decode_tensor` does.
    """
    name = _field(entry, "name", str, "?")
    shape = _field(entry, "shape", list, name)
    encoding = _field(entry, "encoding", str, name)
    dtype = _field(entry, "dtype", str, name)
    rows, cols = matrix_shape(shape)
    total = rows * cols
    positions = sparse_positions(entry, sections, name, total)
    entries = _field(entry, "entries", int, name)
    if encoding == "sparse":
        values = _floats(_section(sections, f"{name}:values"), dtype, entries, name)
        values = values.astype(np.float32)
        _check_finite(values, name)
        keep = values != 0
        pos = positions[keep]
        return from_coords(rows, cols, pos // cols, pos % cols, values=values[keep],
                           encoding=encoding)
    codebook, symbols = _codebook_and_symbols(entry, sections, name, dtype, entries, True)
    size = codebook.size - 1  # the trailing 0.0 is the fillers' symbol
    codebook = codebook[:size]
    _check_finite(codebook, name)
    keep = symbols < size
    zero = np.flatnonzero(codebook == 0)
    if zero.size:  # a stored zero centroid is a zero weight too
        keep &= ~np.isin(symbols, zero)
    pos = positions[keep]
    return from_coords(rows, cols, pos // cols, pos % cols, symbols=symbols[keep],
                       codebook=codebook, encoding=encoding)


SPARSE_FROM_CODEBOOK = 0.8
"""A ``codebook`` weight whose kept (non-zero) fraction is at most this runs as sparse entries."""


def decode_codebook(entry: dict[str, Any], sections: dict[str, bytes]) -> CompressedMatrix:
    """A ``codebook`` entry as a dense-rows compact matrix (symbols only, no fp32); one whose
    codebook holds 0 and at most :data:`SPARSE_FROM_CODEBOOK` of whose weights are non-zero
    (a pruned layer) as its kept entries only."""
    name = _field(entry, "name", str, "?")
    shape = _field(entry, "shape", list, name)
    dtype = _field(entry, "dtype", str, name)
    rows, cols = matrix_shape(shape)
    codebook, symbols = _codebook_and_symbols(entry, sections, name, dtype, rows * cols, False)
    _check_finite(codebook, name)
    zero = np.flatnonzero(codebook == 0)
    if zero.size:  # a pruned layer whose zeros were cheapest as a codebook symbol (rANS): run
        keep = ~np.isin(symbols, zero)  # only its kept weights, as from sparse positions
        if keep.mean() <= SPARSE_FROM_CODEBOOK:
            flat = np.flatnonzero(keep)
            return from_coords(rows, cols, flat // cols, flat % cols, symbols=symbols[keep],
                               codebook=codebook, encoding="codebook")
    row = np.repeat(np.arange(rows, dtype=np.int64), cols)
    col = np.tile(np.arange(cols, dtype=np.int64), rows)
    return from_coords(rows, cols, row, col, symbols=symbols, codebook=codebook,
                       encoding="codebook", dense_rows=True)


FormDecoder = Callable[[dict[str, Any], dict[str, bytes]], CompressedMatrix]

FORM_DECODERS: dict[str, FormDecoder] = {
    "sparse": decode_sparse,
    "sparse-codebook": decode_sparse,
    "codebook": decode_codebook,
}
"""File encoding → decoder of its runtime form. ``dense`` is absent: a dense layer runs as the
plain torch module (its file bytes are its fp32 bytes already)."""


def register_form(encoding: str, decoder: FormDecoder) -> None:
    """Register the runtime form of a file encoding (for methods added later)."""
    FORM_DECODERS[encoding] = decoder


@dataclass
class LayerForm:
    """What the runtime needs to run one layer from the file: ``form`` (handed to the
    executors' ``build``/``accepts``), ``bias`` (decoded, or None), ``tensors`` (the stored
    tensor names this form stands for: not decoded densely unless no executor runs the layer),
    and the facts the autotuner's table shows (``weight_shape``, ``encoding``, ``kept`` weights
    or parameters, ``density`` = kept / dense weights)."""

    form: Any
    bias: torch.Tensor | None
    tensors: list[str]
    weight_shape: list[int]
    encoding: str
    kept: int
    density: float


LayerReader = Callable[[str, nn.Module, "StoredModel"], "LayerForm | None"]
"""``reader(layer_name, skeleton_module, stored_file)``: the layer's :class:`LayerForm`, or None
when it runs as the plain (dense-decoded) module. Raises :class:`DsqFormatError` on bad data."""

LAYER_READERS: dict[type[nn.Module], LayerReader] = {}
"""Layer type (exact) → reader of its runtime form."""


def register_layer_form(layer_type: type[nn.Module], reader: LayerReader) -> None:
    """Register how the runtime reads layers of ``layer_type`` from a file."""
    LAYER_READERS[layer_type] = reader


def stored_floats(stored: StoredModel, key: str, numel: int, what: str) -> torch.Tensor:
    """Stored tensor ``key`` as a flat contiguous float32 tensor of exactly ``numel`` values
    (a layer reader's check; :class:`DsqFormatError` naming ``what`` when missing or wrong)."""
    if key not in stored.entries:
        raise DsqFormatError(f"{stored.source}: {what}: tensor {key!r} is missing")
    t = stored.decode(key)
    if not t.is_floating_point() or t.numel() != numel:
        raise DsqFormatError(f"{stored.source}: {what}: tensor {key!r} holds {t.numel()} "
                             f"{t.dtype} values, expected {numel} floats")
    return t.to(torch.float32).reshape(-1).contiguous()


def read_matrix_layer(name: str, module: nn.Module, stored: StoredModel) -> LayerForm | None:
    """A Linear / Conv2d whose weight is stored compressed (sparse, codebook...) as a
    :class:`CompressedMatrix`; None for a dense weight."""
    entry = stored.entries.get(f"{name}.weight")
    if entry is None or entry["encoding"] not in FORM_DECODERS:
        return None
    form = FORM_DECODERS[entry["encoding"]](entry, stored.sections)
    bias_key = f"{name}.bias"
    bias = stored.decode(bias_key) if bias_key in stored.entries else None
    return LayerForm(form, bias, [f"{name}.weight", *([bias_key] if bias is not None else [])],
                     list(entry["shape"]), form.encoding, form.nnz, form.density)


register_layer_form(nn.Linear, read_matrix_layer)
register_layer_form(nn.Conv2d, read_matrix_layer)
