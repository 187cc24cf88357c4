"""Differential fuzzing of the runtime: every executor against the dense decoding, right and wrong
inputs, optionally with the C kernel under AddressSanitizer + UBSan.

Usage::

    python benchmarks/fuzz_runtime.py --executions 2000                  # quick, no sanitizer
    python benchmarks/fuzz_runtime.py --executions 100000 --sanitize      # make fuzz-runtime
    python benchmarks/fuzz_runtime.py --replay 1000042                   # one file, verbose

Each *file* is a random small zoo model (LeNet-300-100, the two LeNet-5s, MobileNet-tiny,
ResNet-20; random widths of input, classes and channels) put through a random valid recipe
(channel pruning, magnitude pruning at 0-99.99 %, k-means sharing at 1-16 bits, random encode
options), then edited the ways real models end up (an all-zero layer, zero rows and columns,
255-65,536-value codebooks, tiny or huge weights, random BatchNorm statistics) and written by our
own ``dsq.save``. Four in ten files with a layer of over 70,000 weights also get it filled with
random values and re-encoded as a ``codebook`` of more than 65,536 entries: valid by the
reader's rules, though ``save`` never writes one.

With ``--user-share S`` a share S of the files are *user* models instead (not the zoo:
nn.Modules defined here -- a CNN with BatchNorm, dropout and a head, a residual-add net, a
tabular MLP with BatchNorm1d, a two-input model, an Embedding + Conv1d model fed token ids),
through the same random recipes (prune/share on Linear, Conv1d, Conv2d, Embedding) and edits,
saved with ``example_inputs`` (so with their fx graph) and loaded class-free; their runtime
variants also include a skeleton load (``model=`` a fresh instance), dense and runtime, which
must equal the class-free dense load. Their wrong inputs: wrong feature/channel counts, wrong
dtypes, float, out-of-range (vocab, -1, 2**31, 2**62...), int32/uint8/bool token ids, too many,
too few, swapped or no inputs. User files have seeds ``seed * 10**6 + 500,000 + j``.

Each file is loaded densely (``dsq.load``: the oracle) and as runtime *variants*
(``load_runtime``): untimed with fuse on/off at every memory budget (0.5, 1, 1.5, 2, none), every
executor the registry offers forced on every layer that offers it (the kernel ones fused and
unfused), random per-layer mixes, and an autotuned load (1 timing round, a private cache)
followed by a load from that cache and one from the cache damaged in one of 20 ways (NaN,
negative, string or 10**400 times, wrong types, truncation, garbage, 100,000-deep nesting...).
Every variant is called on every input, and each (file, variant, input) call is one
*execution*:

- **right** inputs (float32 CPU tensors of the model's input shape; batch 0-65; magnitudes from
  1e-30 to 1e12; zeros, sparse, negative; contiguous, strided, transposed, channels-last,
  expanded, requiring grad) must give the dense output: same shape, and
  ``|runtime - dense| <= 2e-5 * bound + 2e-5 * |dense|`` elementwise, where ``bound`` is the
  output of the model with every weight, bias and BatchNorm term made non-negative, applied to
  ``|x|`` (it bounds the sums whose rounding may differ);
- **wrong** inputs (wrong channel count, height or width, too small, 1-D to 5-D, unbatched,
  wrong flattened length, empty dimensions, int / bool / float16 / bfloat16 / float64, the meta
  device, NaN/Inf, a numpy array, a list) are judged by the dense model: where it raises, the
  runtime must raise a *clean* exception (``DeepSqueezeError``, ``RuntimeError`` but not
  ``RecursionError``, ``ValueError``, ``TypeError``, or the very type the dense model raised:
  torch itself raises ``IndexError`` for a dimension out of range); an input differing only in
  dtype may instead give the dense output of ``x.float()``; where the dense model accepts the
  input, the runtime must give the same output or a clean exception. NaN/Inf inputs only need a
  result of the right shape (skipping a pruned weight legitimately skips ``0 * NaN``).

Never allowed: a crash (signal, abort, sanitizer report), a hang (a load over 120 s or a call
over 60 s), any other exception type, a changed input tensor, a runtime load failing on a file
the dense loader reads (a clean refusal is accepted for the re-encoded >65,536-entry codebooks
only), a load failing on a damaged autotune cache (bad entries must be dropped).

Files are generated and executed in worker subprocesses (a batch of files each), so a crash is
caught and reported with its reproducer: ``--replay FILE_SEED`` reruns one file in this process
and prints every failing execution. With ``--sanitize`` the workers run with the kernel built with
``-fsanitize=address,undefined`` (``DEEPSQUEEZE_KERNEL_SANITIZE=1``) and the sanitizer runtimes
preloaded (:func:`deepsqueeze.runtime.kernel.sanitizer_env`). Results go to
``benchmarks/results/fuzz_runtime.json`` (``--json``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

import torch  # noqa: E402
from torch import nn  # noqa: E402

DEFAULT_JSON = REPO / "benchmarks" / "results" / "fuzz_runtime.json"
RTOL = 2e-5
"""Allowed |runtime - dense| per unit of |dense| and per unit of the magnitude bound (float32
rounding of sums taken in another order stays below ~3e-7 of the bound in practice)."""
BUDGETS = (0.5, 1.0, 1.5, 2.0, None)
FILES_PER_WORKER = 8
WORKER_TIMEOUT_S = 1800
LOAD_DEADLINE_S = 120
CALL_DEADLINE_S = 60
MAX_FAILURES_KEPT = 60
PROGRESS = "@@"  # worker stderr line before each execution: "@@ file variant input"
EXCLUDED: set[str] = set()
"""Input labels left out (``--exclude``, for triage while a known crash is being fixed)."""
SANITIZER_PATTERNS = {
    "asan": re.compile(r"ERROR: AddressSanitizer"),
    "ubsan": re.compile(r"runtime error: |UndefinedBehaviorSanitizer"),
    "lsan": re.compile(r"ERROR: LeakSanitizer"),
}


# ------------------------------------------------------------------------ random valid files


@dataclass
class FileCase:
    """One generated .dsq file and what went into it."""

    seed: int
    model: str
    kwargs: dict[str, Any]
    recipe: dict[str, Any]
    edits: list[str]
    reencoded: bool
    input_shape: tuple[int, ...]
    flattening: bool
    data: bytes
    encodings: dict[str, str] = field(default_factory=dict)
    recipes_refused: int = 0
    user_inputs: list[tuple[tuple[int, ...], str]] = field(default_factory=list)
    """A user model's inputs (shape without the batch dimension, "float" or "tokens");
    empty for a zoo model."""

    @property
    def user(self) -> bool:
        return self.model.startswith("user:")


def _model_options(rng: np.random.Generator) -> tuple[str, dict[str, Any]]:
    """A zoo model name and small random options."""
    classes = int(rng.choice([1, 2, 3, 10, 12]))
    pick = rng.random()
    if pick < 0.42:
        feats = int(rng.choice([1, 4, 12, 48, 49, 50, 64, 196, 300, 784]))
        return "lenet300", {"num_classes": classes, "in_features": feats}
    if pick < 0.66:
        return "lenet5", {"num_classes": classes, "in_channels": int(rng.integers(1, 4)),
                          "input_size": int(rng.integers(16, 23))}
    if pick < 0.86:
        return "lenet5-classic", {"num_classes": classes, "in_channels": int(rng.integers(1, 4)),
                                  "input_size": int(rng.choice([12, 13, 16, 20, 32, 33]))}
    if pick < 0.975:
        return "mobilenet-tiny", {"num_classes": classes, "in_channels": int(rng.integers(1, 4)),
                                  "width_mult": float(rng.choice([0.125, 0.25])),
                                  "input_size": int(rng.integers(3, 11))}
    return "resnet20", {"num_classes": classes, "in_channels": int(rng.integers(1, 4)),
                        "input_size": int(rng.integers(3, 7))}


def _layer_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _subset(rng: np.random.Generator, names: list[str]) -> list[str] | None:
    """None (every layer) or a random non-empty subset."""
    if rng.random() < 0.5:
        return None
    k = int(rng.integers(1, len(names) + 1))
    return sorted(rng.choice(names, size=k, replace=False).tolist())


def _random_recipe(rng: np.random.Generator, model: str, names: list[str]) -> dict[str, Any]:
    """A valid recipe (no fine-tuning: the fuzzer needs the file, not the accuracy)."""
    stages: list[dict[str, Any]] = []
    if model in ("lenet300", "lenet5", "lenet5-classic", "mobilenet-tiny") and rng.random() < 0.2:
        stages.append({"method": "channel-prune",
                       "params": {"ratio": float(rng.choice([0.1, 0.25, 0.5, 0.75]))}})
    if rng.random() < 0.85:
        layers = _subset(rng, names)
        chosen = layers or names
        levels = [0.0, 0.3, 0.5, 0.8, 0.9, 0.95, 0.99, 0.995, 0.9999]
        if rng.random() < 0.25:
            params: dict[str, Any] = {"sparsity": float(rng.choice(levels[1:])),
                                      "scope": "global"}
        elif rng.random() < 0.15:
            params = {"quality": float(rng.choice([0.1, 0.5, 1.0, 2.5]))}
        else:
            params = {"sparsity": {n: float(rng.choice(levels)) for n in chosen}}
        if layers is not None:
            params["layers"] = layers
        if rng.random() < 0.2:
            params["include_bias"] = True
        stages.append({"method": "prune", "params": params})
    if rng.random() < 0.7:
        layers = _subset(rng, names)
        chosen = layers or names
        def bits() -> int:
            return int(rng.integers(9, 17)) if rng.random() < 0.1 else int(rng.integers(1, 9))
        params = {"bits": {n: bits() for n in chosen}, "iters": int(rng.integers(0, 4)),
                  "init": str(rng.choice(["linear", "density", "random"])),
                  "seed": int(rng.integers(0, 1000))}
        if layers is not None:
            params["layers"] = layers
        stages.append({"method": "share", "params": params})
    if not stages:
        stages.append({"method": "prune", "params": {"sparsity": 0.0}})
    encode = {
        "huffman": bool(rng.random() < 0.7),
        "index_bits": "auto" if rng.random() < 0.6 else int(rng.integers(1, 17)),
        "codebook_dtype": "float16" if rng.random() < 0.15 else "float32",
        "dense_dtype": "float16" if rng.random() < 0.15 else "float32",
    }
    return {"name": "fuzz", "model": model, "seed": int(rng.integers(0, 2**31)),
            "stages": stages, "encode": encode}


def _edit(rng: np.random.Generator, model: nn.Module) -> list[str]:
    """Edits of the baked weights that real models end up with; returns what was done."""
    edits: list[str] = []
    layers = {n: m for n, m in model.named_modules() if isinstance(m, USER_LAYERS)}
    names = list(layers)
    with torch.no_grad():
        for name in names:
            w = layers[name].weight
            r = rng.random()
            if r < 0.08:
                w.zero_()
                edits.append(f"{name}: all zero")
                if layers[name].bias is not None and rng.random() < 0.5:
                    layers[name].bias.zero_()
            elif r < 0.16:
                rows = rng.random(w.shape[0]) < 0.4
                w[torch.from_numpy(rows)] = 0
                edits.append(f"{name}: {int(rows.sum())} zero rows")
            elif r < 0.22 and w.dim() == 2:
                cols = rng.random(w.shape[1]) < 0.6
                w[:, torch.from_numpy(cols)] = 0
                edits.append(f"{name}: {int(cols.sum())} zero columns")
            elif r < 0.32:
                levels = int(rng.choice([255, 256, 257, 4096, 65535, 65536, 70000]))
                flat = w.view(-1)
                nz = torch.nonzero(flat).view(-1)
                if nz.numel():
                    q = torch.linspace(-1.0, 1.0, levels)
                    pick = torch.from_numpy(rng.integers(0, levels, nz.numel()))
                    vals = q[pick]
                    vals[vals == 0] = 1e-3
                    flat[nz] = vals * float(flat[nz].abs().max())
                    edits.append(f"{name}: {levels} levels")
            elif r < 0.36:
                scale = float(rng.choice([1e-20, 1e-6, 1e3, 1e8]))
                w.mul_(scale)
                edits.append(f"{name}: weights x{scale:g}")
        for name, mod in model.named_modules():
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)) and rng.random() < 0.7:
                mod.running_mean.copy_(torch.randn(mod.num_features) * 0.5)
                mod.running_var.copy_(torch.rand(mod.num_features) * 2 + 0.05)
                mod.weight.copy_(torch.randn(mod.num_features))
                mod.bias.copy_(torch.randn(mod.num_features) * 0.1)
                edits.append(f"{name}: random statistics")
    return edits


def _reencode_wide_codebook(data: bytes) -> tuple[bytes, str] | None:
    """Re-encode one weight with > 65,536 distinct values as a ``codebook`` entry (17+ bits).

    ``save`` never writes such an entry (it caps codebooks at 65,536 values) but the reader
    accepts it, so it is a valid file whose decoding both loaders must agree on (or refuse).
    """
    from deepsqueeze.codec.bits import pack_bits
    from deepsqueeze.codec.container import parse_dsq, write_dsq
    from deepsqueeze.codec.tensor import decode_tensor

    dsq = parse_dsq(data)
    meta = copy.deepcopy(dsq.meta)
    sections = dict(dsq.sections)
    for entry in meta["tensors"]:
        name, shape = entry["name"], list(entry["shape"])
        if not name.endswith(".weight") or len(shape) < 2:
            continue
        w = decode_tensor(entry, sections).numpy().reshape(-1)
        distinct, inverse = np.unique(w, return_inverse=True)
        if distinct.size <= 65536:
            continue
        bits = max(17, math.ceil(math.log2(distinct.size)))
        for key in [k for k in sections if k.startswith(f"{name}:")]:
            del sections[key]
        sections[f"{name}:codebook"] = distinct.astype("<f4").tobytes()
        sections[f"{name}:values"] = pack_bits(inverse.astype(np.int64), bits)
        entry.clear()
        entry.update({"name": name, "shape": shape, "encoding": "codebook",
                      "codebook_size": int(distinct.size), "value_bits": bits,
                      "value_coding": "fixed", "dtype": "float32"})
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "wide.dsq"
            write_dsq(path, meta, sections)
            return path.read_bytes(), name
    return None


def _apply_recipe(model: nn.Module, recipe: dict[str, Any]) -> Any:
    """Run a recipe's stages on ``model`` (no fine-tuning); returns its encode options."""
    from deepsqueeze.methods.base import select_layers
    from deepsqueeze.pipeline.recipe import parse_recipe

    parsed = parse_recipe(recipe, "fuzz recipe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "schedule cut short": there is no fine-tuning
        for method in parsed.methods():
            method.apply(model, select_layers(model, method.params.layers, method.supported))
            method.finalize(model)
    return parsed.encode


def _save(model: nn.Module, encode: Any, example: Any = None) -> bytes:
    from deepsqueeze import dsq

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.dsq"
        dsq.save(model, path, encode=encode, example_inputs=example)
        return path.read_bytes()


def make_file(seed: int, attempts: int = 4) -> FileCase | None:
    """The random file of ``seed``. A random recipe may be refused (a ``RecipeError`` or
    ``ModelError``, e.g. sharing a layer that pruning emptied: a valid answer, not a finding);
    then another recipe is drawn, up to ``attempts`` times (None if all are refused)."""
    from deepsqueeze import dsq, models
    from deepsqueeze.codec.container import parse_dsq
    from deepsqueeze.errors import DeepSqueezeError
    from deepsqueeze.methods.pruning import remove_pruning
    from deepsqueeze.methods.weight_sharing import remove_sharing

    if seed % 1_000_000 >= USER_BASE:
        return make_user_file(seed, attempts)
    rng = np.random.default_rng(seed)
    name, kwargs = _model_options(rng)
    refused = 0
    for _ in range(attempts):
        torch.manual_seed(seed)
        model = models.create(name, **kwargs)
        recipe = _random_recipe(rng, name, _layer_names(model))
        try:
            encode = _apply_recipe(model, recipe)
            break
        except DeepSqueezeError:
            refused += 1
    else:
        return None
    remove_sharing(model)
    remove_pruning(model)
    edits = _edit(rng, model)
    model.eval()
    data = _save(model, encode)
    reencoded = False
    big = [n for n, m in model.named_modules()
           if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.numel() > 70000]
    if big and rng.random() < 0.4:
        # a layer with > 65,536 distinct values, re-encoded as one codebook
        with torch.no_grad():
            w = model.get_submodule(big[0]).weight
            w.copy_(torch.randn(w.shape) * 0.05)
        out = _reencode_wide_codebook(_save(model, encode))
        if out is not None:
            data, layer = out
            edits.append(f"{layer}: re-encoded as a codebook of > 65,536 entries")
            reencoded = True
    encodings = {e["name"]: e["encoding"] for e in parse_dsq(data).meta["tensors"]
                 if e["name"].endswith(".weight") and len(e["shape"]) >= 2}
    shape = models.input_shape_of(dsq.load(data))
    return FileCase(seed, name, kwargs, recipe, edits, reencoded, shape, name == "lenet300",
                    data, encodings, refused)


# --------------------------------------------------------------------------------- inputs


@dataclass
class Input:
    """One input and how it is judged: ``right`` (must equal dense) or ``wrong``."""

    label: str
    kind: str  # "right" | "wrong" | "dtype" (wrong dtype only) | "nonfinite"
    value: Any
    grad: bool = False


def _values(rng: np.random.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    style = rng.random()
    base = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    if style < 0.45:
        return base
    if style < 0.6:
        return base * float(rng.choice([1e-30, 1e-6, 1e3, 1e6, 1e12]))
    if style < 0.68:
        return torch.zeros(shape)
    if style < 0.78:
        return base * torch.from_numpy((rng.random(shape) < 0.1).astype(np.float32))
    if style < 0.86:
        return -base.abs()
    return torch.from_numpy(rng.integers(-3, 4, shape).astype(np.float32))


def make_inputs(case: FileCase, rng: np.random.Generator) -> list[Input]:
    """Right and wrong inputs for ``case``'s model."""
    if case.user:
        return make_user_inputs(case, rng)
    c, h, w = case.input_shape
    feats = c * h * w
    small = case.model in ("resnet20", "mobilenet-tiny")
    batches = [0, 1, 2, 7, 33] if small else [0, 1, 2, 7, 33, 65]
    out: list[Input] = []

    def batch() -> int:
        return int(rng.choice(batches))

    for n in batches:
        for _ in range(1 if n == 0 else 3):
            out.append(Input(f"right n={n}", "right", _values(rng, (n, c, h, w))))
    if case.flattening:
        for n in (1, 5, 64):
            out.append(Input(f"right flat n={n}", "right", _values(rng, (n, feats))))
        if feats % 2 == 0:
            out.append(Input("right (n 2 f/2)", "right", _values(rng, (3, 2, feats // 2))))
    for _ in range(2):
        n = max(1, batch())
        out.append(Input("right transposed view", "right",
                         _values(rng, (n, c, w, h)).transpose(2, 3)))
        out.append(Input("right batch stride 2", "right", _values(rng, (2 * n, c, h, w))[::2]))
        out.append(Input("right channel slice", "right",
                         _values(rng, (n, c + 2, h, w))[:, 1:1 + c]))
        out.append(Input("right channels_last", "right", _values(rng, (n, c, h, w)).contiguous(
            memory_format=torch.channels_last)))
    out.append(Input("right expanded", "right", _values(rng, (1, c, h, w)).expand(4, c, h, w)))
    out.append(Input("right requires_grad", "right", _values(rng, (2, c, h, w)), grad=True))
    # wrong inputs; the dense model decides whether each is really wrong
    n = max(1, batch())
    out.append(Input("channels +1", "wrong", _values(rng, (n, c + 1, h, w))))
    if c > 1:
        out.append(Input("channels -1", "wrong", _values(rng, (n, c - 1, h, w))))
    out.append(Input("height -1", "wrong", _values(rng, (n, c, max(1, h - 1), w))))
    out.append(Input("width -1", "wrong", _values(rng, (n, c, h, max(1, w - 1)))))
    out.append(Input("height+width +3", "wrong", _values(rng, (n, c, h + 3, w + 3))))
    out.append(Input("1x1 image", "wrong", _values(rng, (n, c, 1, 1))))
    out.append(Input("unbatched CHW", "wrong", _values(rng, (c, h, w))))
    out.append(Input("5-D", "wrong", _values(rng, (1, n, c, h, w))))
    out.append(Input("2-D n x (features+1)", "wrong", _values(rng, (n, feats + 1))))
    out.append(Input("2-D n x (features-1)", "wrong", _values(rng, (n, max(1, feats - 1)))))
    out.append(Input("1-D", "wrong", _values(rng, (feats,))))
    out.append(Input("0-D", "wrong", torch.tensor(1.5)))
    out.append(Input("empty H", "wrong", torch.zeros(n, c, 0, w)))
    out.append(Input("empty 1-D", "wrong", torch.zeros(0)))
    out.append(Input("huge image", "wrong", _values(rng, (1, c, 4 * h + 7, 3 * w + 5))))
    base = _values(rng, (n, c, h, w))
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        out.append(Input(f"{dtype}", "dtype", base.to(dtype)))
    ints = torch.from_numpy(rng.integers(-5, 6, (n, c, h, w)))
    out.append(Input("int64", "dtype", ints))
    out.append(Input("uint8", "dtype", ints.abs().to(torch.uint8)))
    out.append(Input("bool", "dtype", ints > 0))
    out.append(Input("meta device", "wrong", torch.empty(n, c, h, w, device="meta")))
    out.append(Input("numpy array", "wrong", base.numpy()))
    out.append(Input("list", "wrong", base[0].tolist()))
    bad = base.clone()
    bad.view(-1)[:: max(1, bad.numel() // 3)] = float("nan")
    bad.view(-1)[1] = float("inf")
    out.append(Input("NaN/Inf values", "nonfinite", bad))
    return out


# ------------------------------------------------------------------ user models (not the zoo)

USER_BASE = 500_000
"""File seeds ``s`` with ``s % 1_000_000 >= USER_BASE`` are user models (``--user-share``);
below it, zoo models (so the zoo files of a seed are the same with or without user models)."""
USER_FAMILIES = ("user:cnn-bn", "user:residual", "user:tabular", "user:two-input",
                 "user:embed-conv1d")
USER_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)


class UserCNN(nn.Module):
    """Conv-BatchNorm-ReLU-pool, conv, dropout, a linear head."""

    def __init__(self, c: int, size: int, width: int, classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU())
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(2 * width * (size // 2) ** 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.flatten(self.features(x), 1)))


class UserResidual(nn.Module):
    """A stem, two residual additions (conv and BatchNorm), global average pooling, a head."""

    def __init__(self, c: int, width: int, classes: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(c, width, 3, padding=1)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.bn1(self.conv1(x)))
        x = x + torch.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


class UserTabular(nn.Module):
    """BatchNorm1d on the features, an MLP with dropout."""

    def __init__(self, features: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(features)
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Dropout(0.2),
                                 nn.Linear(hidden, hidden // 2), nn.ReLU(),
                                 nn.Linear(hidden // 2, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.norm(x))


class UserTwoInput(nn.Module):
    """A sequence branch (Conv1d, mean over time) and a tabular branch, concatenated."""

    def __init__(self, c: int, features: int, width: int, classes: int) -> None:
        super().__init__()
        self.seq = nn.Conv1d(c, width, 3, padding=1)
        self.tab = nn.Linear(features, width)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, seq: torch.Tensor, tab: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.seq(seq)).mean(dim=2)
        b = torch.relu(self.tab(tab))
        return self.head(torch.cat([a, b], dim=1))


class UserEmbedConv(nn.Module):
    """Token ids through an Embedding, a Conv1d over time, mean pooling, a head."""

    def __init__(self, vocab: int, dim: int, width: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.conv = nn.Conv1d(dim, width, 3)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens).transpose(1, 2)
        return self.head(torch.relu(self.conv(x)).mean(dim=2))


def _user_options(rng: np.random.Generator) -> tuple[str, dict[str, Any]]:
    """A user family and small random options."""
    family = USER_FAMILIES[int(rng.integers(len(USER_FAMILIES)))]
    classes = int(rng.choice([1, 2, 3, 10]))
    if family == "user:cnn-bn":
        return family, {"c": int(rng.integers(1, 4)), "size": int(rng.choice([4, 6, 8, 12])),
                        "width": int(rng.choice([2, 4, 8])), "classes": classes}
    if family == "user:residual":
        return family, {"c": int(rng.integers(1, 4)), "width": int(rng.choice([4, 8, 16])),
                        "classes": classes}
    if family == "user:tabular":
        return family, {"features": int(rng.choice([1, 3, 8, 20, 64])),
                        "hidden": int(rng.choice([4, 16, 64])), "classes": classes}
    if family == "user:two-input":
        return family, {"c": int(rng.integers(1, 5)), "features": int(rng.choice([1, 5, 16])),
                        "width": int(rng.choice([2, 8, 16])), "classes": classes}
    return family, {"vocab": int(rng.choice([5, 50, 1000])), "dim": int(rng.choice([2, 8, 16])),
                    "width": int(rng.choice([4, 8])), "classes": classes}


def build_user(family: str, kwargs: dict[str, Any]) -> nn.Module:
    """A fresh instance of a user family (also the skeleton for ``load(..., model=)``)."""
    k = kwargs
    if family == "user:cnn-bn":
        return UserCNN(k["c"], k["size"], k["width"], k["classes"])
    if family == "user:residual":
        return UserResidual(k["c"], k["width"], k["classes"])
    if family == "user:tabular":
        return UserTabular(k["features"], k["hidden"], k["classes"])
    if family == "user:two-input":
        return UserTwoInput(k["c"], k["features"], k["width"], k["classes"])
    return UserEmbedConv(k["vocab"], k["dim"], k["width"], k["classes"])


def user_input_specs(family: str, kwargs: dict[str, Any], rng: np.random.Generator
                     ) -> list[tuple[tuple[int, ...], str]]:
    """The model's inputs (shape without the batch dimension, "float" or "tokens")."""
    k = kwargs
    if family == "user:cnn-bn":
        return [((k["c"], k["size"], k["size"]), "float")]
    if family == "user:residual":
        s = int(rng.integers(1, 9))
        return [((k["c"], s, s + int(rng.integers(0, 3))), "float")]
    if family == "user:tabular":
        return [((k["features"],), "float")]
    if family == "user:two-input":
        return [((k["c"], int(rng.integers(1, 12))), "float"), ((k["features"],), "float")]
    return [((int(rng.integers(3, 20)),), "tokens")]


def make_user_file(seed: int, attempts: int = 4) -> FileCase | None:
    """The random user-model file of ``seed``: a harness-defined model through a random recipe
    and the edits, saved with ``example_inputs`` (so with its fx graph)."""
    from deepsqueeze.codec.container import parse_dsq
    from deepsqueeze.errors import DeepSqueezeError
    from deepsqueeze.methods.pruning import remove_pruning
    from deepsqueeze.methods.weight_sharing import remove_sharing

    rng = np.random.default_rng(seed)
    family, kwargs = _user_options(rng)
    specs = user_input_specs(family, kwargs, rng)
    refused = 0
    for _ in range(attempts):
        torch.manual_seed(seed)
        model = build_user(family, kwargs)
        names = [n for n, m in model.named_modules() if isinstance(m, USER_LAYERS)]
        recipe = _random_recipe(rng, family, names)
        recipe.pop("model")  # the recipe's model field names zoo models only
        try:
            encode = _apply_recipe(model, recipe)
            break
        except DeepSqueezeError:
            refused += 1
    else:
        return None
    remove_sharing(model)
    remove_pruning(model)
    edits = _edit(rng, model)
    model.eval()
    example = tuple(_user_batch(rng, specs, 2, kwargs))
    data = _save(model, encode, example if len(example) > 1 else example[0])
    encodings = {e["name"]: e["encoding"] for e in parse_dsq(data).meta["tensors"]
                 if e["name"].endswith(".weight") and len(e["shape"]) >= 2}
    return FileCase(seed, family, kwargs, recipe, edits, False, (), False, data, encodings,
                    refused, user_inputs=specs)


def _user_batch(rng: np.random.Generator, specs: list[tuple[tuple[int, ...], str]], n: int,
                kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """One right batch of ``n`` for every input of a user model."""
    out = []
    for shape, kind in specs:
        if kind == "tokens":
            out.append(torch.from_numpy(rng.integers(0, kwargs["vocab"], (n, *shape))))
        else:
            out.append(_values(rng, (n, *shape)))
    return out


def make_user_inputs(case: FileCase, rng: np.random.Generator) -> list[Input]:
    """Right and wrong inputs for a user model (a tuple value is called as ``model(*value)``)."""
    specs, kw = case.user_inputs, case.kwargs
    out: list[Input] = []

    def pack(xs: list[Any]) -> Any:
        return xs[0] if len(xs) == 1 else tuple(xs)

    for n in (0, 1, 2, 7, 33, 65):
        for _ in range(1 if n == 0 else 3):
            out.append(Input(f"right n={n}", "right", pack(_user_batch(rng, specs, n, kw))))
    for _ in range(2):
        n = int(rng.choice([1, 3, 9]))
        strided = [x[::2] for x in _user_batch(rng, specs, 2 * n, kw)]
        out.append(Input("right batch stride 2", "right", pack(strided)))
        out.append(Input("right expanded", "right",
                         pack([x.expand(n, *x.shape[1:])
                               for x in _user_batch(rng, specs, 1, kw)])))
        wide = []
        for (_, kind), x in zip(specs, _user_batch(rng, specs, n, kw), strict=True):
            if kind == "float" and x.dim() >= 2:  # a last-dimension slice: not contiguous
                x = torch.cat([x, x[..., :1]], dim=-1)[..., 1:]
            wide.append(x)
        out.append(Input("right sliced", "right", pack(wide)))
    if all(kind == "float" for _, kind in specs):
        out.append(Input("right requires_grad", "right", pack(_user_batch(rng, specs, 2, kw)),
                         grad=True))
    # wrong inputs, judged by the dense model
    n = int(rng.choice([1, 2, 7]))
    base = _user_batch(rng, specs, n, kw)
    for i, (shape, kind) in enumerate(specs):
        def swap(x: Any, i: int = i) -> Any:
            xs = list(base)
            xs[i] = x
            return pack(xs)

        tag = f"input {i}" if len(specs) > 1 else "input"
        if kind == "float":
            for d in (-1, 1):
                grown = (*shape[:-1], max(1, shape[-1] + d))
                out.append(Input(f"{tag}: last dim {d:+d}", "wrong",
                                 swap(_values(rng, (n, *grown)))))
            if len(shape) > 1:
                out.append(Input(f"{tag}: channels +1", "wrong",
                                 swap(_values(rng, (n, shape[0] + 1, *shape[1:])))))
            out.append(Input(f"{tag}: unbatched", "wrong", swap(base[i][0])))
            out.append(Input(f"{tag}: extra dim", "wrong", swap(base[i].unsqueeze(1))))
            flat = base[i].reshape(n, -1) if len(shape) > 1 else base[i].reshape(-1)
            out.append(Input(f"{tag}: flattened", "wrong", swap(flat)))
            out.append(Input(f"{tag}: empty last dim", "wrong",
                             swap(torch.zeros(n, *shape[:-1], 0))))
            for dtype in (torch.float64, torch.float16, torch.bfloat16):
                out.append(Input(f"{tag}: {dtype}", "dtype", swap(base[i].to(dtype))))
            ints = torch.from_numpy(rng.integers(-5, 6, (n, *shape)))
            out.append(Input(f"{tag}: int64", "dtype", swap(ints)))
            out.append(Input(f"{tag}: bool", "dtype", swap(ints > 0)))
            out.append(Input(f"{tag}: meta device", "wrong",
                             swap(torch.empty(n, *shape, device="meta"))))
            out.append(Input(f"{tag}: numpy array", "wrong", swap(base[i].numpy())))
            bad = base[i].clone()
            bad.view(-1)[:: max(1, bad.numel() // 3)] = float("nan")
            out.append(Input(f"{tag}: NaN/Inf values", "nonfinite", swap(bad)))
        else:
            vocab = kw["vocab"]
            out.append(Input(f"{tag}: float tokens", "wrong", swap(base[i].float())))
            out.append(Input(f"{tag}: float64 tokens", "wrong", swap(base[i].double())))
            for bad_id in (vocab, vocab + 1000, -1, -vocab - 1, 2**31, 2**62):
                t = base[i].clone()
                t.view(-1)[int(rng.integers(t.numel()))] = bad_id
                out.append(Input(f"{tag}: token id {'vocab' if bad_id == vocab else bad_id}",
                                 "wrong", swap(t)))
            out.append(Input(f"{tag}: int32 tokens", "wrong", swap(base[i].int())))
            out.append(Input(f"{tag}: uint8 tokens", "wrong", swap(base[i].to(torch.uint8))))
            out.append(Input(f"{tag}: bool tokens", "wrong", swap(base[i] > 0)))
            out.append(Input(f"{tag}: unbatched", "wrong", swap(base[i][0])))
            out.append(Input(f"{tag}: 3-D tokens", "wrong", swap(base[i].unsqueeze(2))))
            out.append(Input(f"{tag}: longer sequence", "wrong",
                             swap(torch.from_numpy(rng.integers(0, vocab, (n, shape[0] + 9))))))
            out.append(Input(f"{tag}: too short for the conv", "wrong",
                             swap(torch.from_numpy(rng.integers(0, vocab, (n, 2))))))
            out.append(Input(f"{tag}: meta device", "wrong",
                             swap(torch.empty(n, *shape, dtype=torch.long, device="meta"))))
            out.append(Input(f"{tag}: list", "wrong", swap(base[i].tolist())))
    out.append(Input("one input too many", "wrong", (*base, base[-1])))
    if len(specs) > 1:
        out.append(Input("one input too few", "wrong", base[0]))
        out.append(Input("inputs swapped", "wrong", (base[1], base[0])))
    out.append(Input("no input", "wrong", ()))
    return out


# ------------------------------------------------------------------------------ the oracle


def abs_model(model: nn.Module) -> nn.Module:
    """A copy computing an upper bound of every |partial sum| when fed ``|x|``: weights,
    biases and BatchNorm terms made non-negative (ReLU, pooling and additions keep the bound)."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for mod in twin.modules():
            if isinstance(mod, USER_LAYERS):
                mod.weight.abs_()
                if getattr(mod, "bias", None) is not None:
                    mod.bias.abs_()
            elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                mod.weight.abs_()
                mod.bias.abs_()
                mod.running_mean.copy_(-mod.running_mean.abs())
    return twin


CLEAN_TYPES: tuple[type[BaseException], ...] = (RuntimeError, ValueError, TypeError)


def is_clean(exc: BaseException, dense_error: str | None = None) -> bool:
    """An exception a caller can expect from a bad input (not a bug's symptom): one of the
    clean types, or the very type the dense model raised on the same input (torch raises
    ``IndexError`` for a dimension out of range, for example)."""
    from deepsqueeze.errors import DeepSqueezeError

    if isinstance(exc, RecursionError):
        return False
    return isinstance(exc, (DeepSqueezeError, *CLEAN_TYPES)) or type(exc).__name__ == dense_error


@dataclass
class Reference:
    """The dense model's answer to one input (and, for a dtype-only input, to ``x.float()``)."""

    out: torch.Tensor | None
    error: str | None
    bound: torch.Tensor | None
    coerced: torch.Tensor | None = None
    coerced_bound: torch.Tensor | None = None


def _run(model: nn.Module, x: Any, grad: bool = False) -> torch.Tensor:
    """``model(x)``, or ``model(*x)`` for a tuple (a user model's several inputs)."""
    args = x if isinstance(x, tuple) else (x,)
    if grad:
        args = tuple(a.detach().clone().requires_grad_(True) if isinstance(a, torch.Tensor)
                     else a for a in args)
        return model(*args).detach()
    with torch.no_grad():
        return model(*args)


def _cpu_tensors(x: Any) -> list[torch.Tensor] | None:
    """The CPU tensors of an input (a tensor or a tuple of them), None if any is not one."""
    xs = x if isinstance(x, tuple) else (x,)
    if all(isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in xs):
        return list(xs)
    return None


def reference(dense: nn.Module, absolute: nn.Module, inp: Input) -> Reference:
    x = inp.value
    try:
        out = _run(dense, x, inp.grad)
    except Exception as exc:
        ref = Reference(None, type(exc).__name__, None)
        if inp.kind == "dtype":
            with contextlib.suppress(Exception):
                xf = tuple(a.float() for a in x) if isinstance(x, tuple) else x.float()
                ref.coerced = _run(dense, xf)
                ref.coerced_bound = _run(absolute, tuple(a.abs() for a in xf)
                                         if isinstance(xf, tuple) else xf.abs())
        return ref
    bound = None
    xs = _cpu_tensors(x)
    if xs is not None and isinstance(out, torch.Tensor) and out.device.type == "cpu":
        mags = [a.abs() if not torch.is_floating_point(a) else a.abs().to(out.dtype) for a in xs]
        bound = _run(absolute, mags[0] if not isinstance(x, tuple) else tuple(mags))
    return Reference(out, None, bound)


COMPARED: dict[str, Any] = {"outputs": 0, "unchecked": 0, "worst": 0.0}
"""Outputs compared, outputs left unchecked (bound not finite or >= 1e30) and the largest
error seen as a fraction of its tolerance (this process)."""


def close(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor | None) -> str | None:
    """None when ``got`` matches ``want`` within the tolerance, else what differs."""
    if not isinstance(got, torch.Tensor):
        return f"returned {type(got).__name__}, not a tensor"
    if tuple(got.shape) != tuple(want.shape):
        return f"shape {tuple(got.shape)} != dense {tuple(want.shape)}"
    if got.device.type == "meta" or want.device.type == "meta":
        return None if got.device == want.device else f"device {got.device} != {want.device}"
    if got.dtype != want.dtype:
        return f"dtype {got.dtype} != dense {want.dtype}"
    g, d = got.detach().double(), want.detach().double()
    b = bound.detach().double() if bound is not None else d.abs()
    checked = torch.isfinite(d) & torch.isfinite(b) & (b < 1e30)
    if bool((torch.isfinite(g) != torch.isfinite(d))[torch.isfinite(b) & (b < 1e30)].any()):
        return "finite/non-finite pattern differs"
    err = (g - d).abs()
    allowed = RTOL * b + RTOL * d.abs() + 1e-38
    bad = checked & (err > allowed)
    n_checked = int(checked.sum())
    COMPARED["outputs"] += n_checked
    COMPARED["unchecked"] += checked.numel() - n_checked
    if n_checked:
        used = float((err[checked] / allowed[checked]).max())
        COMPARED["worst"] = max(COMPARED["worst"], used)
    if bool(bad.any()):
        i = int(torch.nonzero(bad.view(-1))[0])
        return (f"{int(bad.sum())} of {bad.numel()} outputs differ; first: runtime "
                f"{g.view(-1)[i].item():.7g} vs dense {d.view(-1)[i].item():.7g} "
                f"(bound {b.view(-1)[i].item():.3g})")
    return None


def judge(model: nn.Module, inp: Input, ref: Reference) -> tuple[str, str | None, bool]:
    """(outcome, failure message or None, whether it printed to stderr) of one execution."""
    printed = io.StringIO()
    outcome, problem = _judge(model, inp, ref, printed)
    return outcome, problem, bool(printed.getvalue())


def _judge(model: nn.Module, inp: Input, ref: Reference, printed: io.StringIO
           ) -> tuple[str, str | None]:
    x = inp.value
    xs = _cpu_tensors(x)
    before = [a.detach().clone() for a in xs] if xs is not None else None
    try:
        with contextlib.redirect_stderr(printed):
            got = _run(model, x, inp.grad)
    except Exception as exc:
        name = type(exc).__name__
        where = traceback.extract_tb(exc.__traceback__)[-1]
        detail = f"{name}: {str(exc)[:160]} (at {Path(where.filename).name}:{where.lineno})"
        if not is_clean(exc, ref.error):
            return f"unclean {name}", f"unclean exception {detail}"
        if inp.kind == "right":
            return f"error on right input: {name}", f"raised on a right input: {detail}"
        return f"clean {name}", None
    if before is not None and xs is not None and not all(
            torch.equal(torch.nan_to_num(b), torch.nan_to_num(a.detach()))
            for b, a in zip(before, xs, strict=True)):
        return "input modified", "the runtime changed its input tensor"
    if inp.kind == "nonfinite":
        if ref.out is not None and isinstance(got, torch.Tensor) and got.shape == ref.out.shape:
            return "shape only (NaN/Inf input)", None
        if ref.out is None:
            return "accepted (dense raised on NaN/Inf input)", None
        return "bad shape", f"NaN/Inf input: shape {getattr(got, 'shape', None)}"
    if ref.out is not None:
        problem = close(got, ref.out, ref.bound)
        return ("equal", None) if problem is None else ("mismatch", problem)
    if ref.coerced is not None:
        problem = close(got, ref.coerced, ref.coerced_bound)
        if problem is None:
            return "equal to dense(x.float())", None
        return "mismatch (coerced)", f"dense raised {ref.error}; vs dense(x.float()): {problem}"
    return "accepted a wrong input", (
        f"dense raised {ref.error} but the runtime returned "
        f"{tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}")


# ------------------------------------------------------------------------------ variants


def make_variants(layer_impls: dict[str, list[str]], rng: np.random.Generator
                  ) -> list[dict[str, Any]]:
    """Runtime load options covering fuse x budget and every executor of every layer."""
    variants: list[dict[str, Any]] = []
    for fuse in (True, False):
        for budget in BUDGETS:
            variants.append({"autotune": False, "fuse": fuse, "memory_budget": budget,
                             "batch_size": int(rng.choice([1, 7, 64]))})
    names = sorted({i for impls in layer_impls.values() for i in impls})
    for impl in names:
        forced = {layer: impl for layer, impls in layer_impls.items() if impl in impls}
        fuses = (True, False) if impl.startswith("kernel") else (bool(rng.random() < 0.5),)
        for fuse in fuses:
            variants.append({"autotune": False, "fuse": fuse, "impls": forced,
                             "memory_budget": BUDGETS[int(rng.integers(len(BUDGETS)))]})
    if layer_impls:
        for _ in range(2):
            mix = {layer: str(rng.choice(impls)) for layer, impls in layer_impls.items()}
            variants.append({"autotune": False, "fuse": bool(rng.random() < 0.5), "impls": mix,
                             "memory_budget": BUDGETS[int(rng.integers(len(BUDGETS)))],
                             "batch_size": int(rng.choice([1, 2, 33]))})
    tuned = {"autotune": True, "rounds": 1, "fuse": True,
             "memory_budget": BUDGETS[int(rng.integers(len(BUDGETS)))],
             "batch_size": int(rng.choice([1, 33]))}
    variants.append(tuned)
    variants.append(dict(tuned))  # the same load again: from the autotune cache
    how = CACHE_CORRUPTIONS[int(rng.integers(len(CACHE_CORRUPTIONS)))]
    variants.append({**tuned, "cache_corruption": how})  # again, from a damaged cache
    return variants


CACHE_CORRUPTIONS = (
    "NaN time", "Infinity time", "negative time", "zero time", "string time", "huge int time",
    "time_us a list", "time_us nested", "time_us empty", "extra executor", "missing executor",
    "entry null", "entry a number", "entries a list", "version a string", "truncated",
    "garbage bytes", "deeply nested", "empty file", "not UTF-8",
)
"""Ways the autotune cache is damaged before the third tuned load of each file: the loader
must discard what is bad (retiming) and give the same outputs."""


def corrupt_cache(path: Path, how: str, rng: np.random.Generator) -> None:
    """Damage the autotune cache file at ``path`` in the way ``how`` names."""
    raw = path.read_bytes() if path.exists() else b""
    if how == "truncated":
        path.write_bytes(raw[: max(1, len(raw) // 2)])
        return
    if how == "garbage bytes":
        path.write_bytes(rng.integers(0, 256, 512, dtype=np.uint8).tobytes())
        return
    if how == "deeply nested":
        path.write_text("[" * 100_000 + "]" * 100_000)
        return
    if how == "empty file":
        path.write_bytes(b"")
        return
    if how == "not UTF-8":
        path.write_bytes(b'{"version": "\xff\xfe' + bytes([0xFF, 0xFE]) + b'"}')
        return
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = {}
    if not isinstance(doc, dict):
        doc = {}
    entries = doc.get("entries")
    if not isinstance(entries, dict):
        entries = {}
    if how == "entries a list":
        doc["entries"] = list(entries.values())
    elif how == "version a string":
        doc["version"] = str(doc.get("version", "2"))
    else:
        for key, entry in list(entries.items()):
            times = entry.get("time_us") if isinstance(entry, dict) else None
            name = next(iter(times)) if isinstance(times, dict) and times else "kernel"
            damage: dict[str, Any] = {
                "NaN time": {name: float("nan")}, "Infinity time": {name: float("inf")},
                "negative time": {name: -1.0}, "zero time": {name: 0.0},
                "string time": {name: "fast"}, "huge int time": {name: 10**400},
                "extra executor": {"no-such-executor": 1.0},
            }
            if how in damage and isinstance(times, dict):
                times.update(damage[how])
            elif how == "missing executor" and isinstance(times, dict) and times:
                times.pop(name)
            elif how == "time_us a list" and isinstance(entry, dict):
                entry["time_us"] = [1.0, 2.0]
            elif how == "time_us nested" and isinstance(entry, dict):
                entry["time_us"] = {name: {"median": [1.0]}}
            elif how == "time_us empty" and isinstance(entry, dict):
                entry["time_us"] = {}
            elif how == "entry null":
                entries[key] = None
            elif how == "entry a number":
                entries[key] = 7
        doc["entries"] = entries
    path.write_text(json.dumps(doc))


# -------------------------------------------------------------------------------- a worker


class _Hang(BaseException):
    """Raised by :func:`_deadline` (a BaseException: no ``except Exception`` swallows it)."""


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`_Hang` in this (main) thread if the block runs longer than ``seconds``
    (catches loops in Python code; a hang inside C ends at the worker's timeout)."""

    def fire(signum: int, frame: Any) -> None:
        raise _Hang

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass
class Tally:
    """Counts of one run (mergeable)."""

    executions: int = 0
    files: int = 0
    files_refused: int = 0
    recipes_refused: int = 0
    variants: int = 0
    loads_refused: int = 0
    outcomes: Counter = field(default_factory=Counter)
    by_kind: Counter = field(default_factory=Counter)
    impls: Counter = field(default_factory=Counter)
    models: Counter = field(default_factory=Counter)
    encodings: Counter = field(default_factory=Counter)
    edits: Counter = field(default_factory=Counter)
    failures: list[dict[str, Any]] = field(default_factory=list)
    failure_count: int = 0
    failure_kinds: Counter = field(default_factory=Counter)
    printed_to_stderr: int = 0
    printed_by: Counter = field(default_factory=Counter)
    outputs_compared: int = 0
    outputs_unchecked: int = 0
    worst_error_vs_tolerance: list[float] = field(default_factory=list)
    corrupt_caches: Counter = field(default_factory=Counter)
    corrupt_cache_warned: int = 0
    seconds_by_model: Counter = field(default_factory=Counter)
    executions_by_model: Counter = field(default_factory=Counter)
    user_outcomes: Counter = field(default_factory=Counter)
    user_inputs: Counter = field(default_factory=Counter)
    user_failures: int = 0

    signatures: Counter = field(default_factory=Counter)
    first_of: dict[str, dict[str, Any]] = field(default_factory=dict)

    def fail(self, record: dict[str, Any]) -> None:
        """Count a failure; keep the first ``MAX_FAILURES_KEPT`` and the first of each kind of
        failure (its signature: kind, input, executors) with its reproducer."""
        self.failure_count += 1
        self.failure_kinds[record["kind"]] += 1
        sig = " | ".join(str(x) for x in (record["kind"], record.get("input_label"),
                                          record.get("family")))
        self.signatures[sig] += 1
        self.first_of.setdefault(sig, record)
        if len(self.failures) < MAX_FAILURES_KEPT:
            self.failures.append(record)

    def to_dict(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, Counter) else v) for k, v in vars(self).items()}

    def merge(self, d: dict[str, Any]) -> None:
        for k, v in d.items():
            mine = getattr(self, k)
            if isinstance(mine, Counter):
                mine.update(v)
            elif isinstance(mine, dict):
                for key, value in v.items():
                    mine.setdefault(key, value)
            elif k == "worst_error_vs_tolerance":
                mine[:] = [max([*mine, *v], default=0.0)]
            elif isinstance(mine, list):
                mine.extend(v[: max(0, MAX_FAILURES_KEPT - len(mine))])
            else:
                setattr(self, k, mine + v)


def _layer_impls(model: nn.Module) -> dict[str, list[str]]:
    from deepsqueeze.runtime import runtime_info

    return {c.layer: sorted(c.held_bytes) for c in runtime_info(model).layers}


def _family(variant: dict[str, Any]) -> str:
    """The executors a variant runs, in a word (for failure signatures)."""
    if "skeleton" in variant:
        return f"skeleton {variant['skeleton']}"
    if "impls" in variant:
        kinds = sorted(set(variant["impls"].values()))
        forced = kinds[0] if len(kinds) == 1 else "mix"
        return f"impls={forced} fuse={variant.get('fuse')}"
    if variant.get("autotune"):
        return "autotuned" + (" (damaged cache)" if "cache_corruption" in variant else "")
    return f"untimed fuse={variant.get('fuse')}"


def _describe(opts: dict[str, Any]) -> str:
    """A variant's options in one line (forced executors summarised)."""
    parts = []
    for k, v in opts.items():
        if k == "impls":
            kinds = sorted(set(v.values()))
            parts.append(f"impls={kinds[0] if len(kinds) == 1 else 'mix'}")
        else:
            parts.append(f"{k}={v}")
    return " ".join(parts)


def run_file(seed: int, tally: Tally, verbose: bool = False, progress: bool = False,
             only_variant: int | None = None, only_input: int | None = None) -> None:
    """Generate file ``seed`` and run every variant on every input into ``tally`` (or only
    variant ``only_variant`` / input ``only_input``, to replay one execution)."""
    t0, done = time.perf_counter(), tally.executions
    case = make_file(seed)
    if case is None:
        tally.files_refused += 1
        return
    COMPARED.update(outputs=0, unchecked=0, worst=0.0)
    try:
        _run_case(case, tally, verbose, progress, only_variant, only_input)
    finally:
        tally.outputs_compared += COMPARED["outputs"]
        tally.outputs_unchecked += COMPARED["unchecked"]
        tally.worst_error_vs_tolerance.append(COMPARED["worst"])
        tally.seconds_by_model[case.model] += time.perf_counter() - t0
        tally.executions_by_model[case.model] += tally.executions - done


def _run_case(case: FileCase, tally: Tally, verbose: bool, progress: bool,
              only_variant: int | None, only_input: int | None) -> None:
    from deepsqueeze import dsq
    from deepsqueeze.errors import DeepSqueezeError

    seed = case.seed
    tally.files += 1
    tally.recipes_refused += case.recipes_refused
    tally.models[case.model] += 1
    tally.encodings.update(case.encodings.values())
    for e in case.edits:
        tally.edits[re.sub(r"^\d+ zero", "zero", e.split(": ", 1)[1])] += 1
    rng = np.random.default_rng(seed + 7)
    dense = dsq.load(case.data)
    absolute = abs_model(dense)
    inputs = [i for i in make_inputs(case, rng) if i.label not in EXCLUDED]
    refs = [reference(dense, absolute, inp) for inp in inputs]

    def record(kind: str, variant: int, inp: int | None, message: str, opts: dict) -> None:
        rec = {"kind": kind, "file_seed": seed, "variant": variant, "input": inp,
               "options": _describe(opts), "family": _family(opts) if opts else "load",
               "model": case.model,
               "input_label": None if inp is None else inputs[inp].label, "message": message,
               "edits": case.edits, "replay": _replay(seed, variant, inp)}
        tally.fail(rec)
        if verbose:
            print(json.dumps(rec))

    try:
        first = dsq.load(case.data, mode="runtime", autotune=False, fuse=False)
        layer_impls = _layer_impls(first)
        del first
    except Exception as exc:
        if case.reencoded and isinstance(exc, DeepSqueezeError):
            tally.loads_refused += 1
            return
        record("load failed", -1, None, f"{type(exc).__name__}: {str(exc)[:200]}", {})
        return
    variants = make_variants(layer_impls, rng)
    if case.user:
        # the skeleton loads (model=a fresh instance of the class) must equal the class-free one
        variants.append({"skeleton": "dense"})
        variants.append({"skeleton": "runtime", "autotune": False, "fuse": bool(rng.random() < 0.5),
                         "memory_budget": BUDGETS[int(rng.integers(len(BUDGETS)))]})
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "autotune.json"
        os.environ["DEEPSQUEEZE_AUTOTUNE_CACHE"] = str(cache)
        for vi, variant in enumerate(variants):
            opts = {k: v for k, v in variant.items() if k not in ("cache_corruption", "skeleton")}
            if only_variant is not None and vi != only_variant:
                if vi < only_variant and opts.get("autotune"):
                    with warnings.catch_warnings():  # replay: fill the cache as the run did
                        warnings.simplefilter("ignore")
                        dsq.load(case.data, mode="runtime", **opts)
                continue
            if "cache_corruption" in variant:
                corrupt_cache(cache, variant["cache_corruption"], rng)
            if verbose:
                print(f"variant {vi}: {_describe(variant)}", flush=True)
            if progress:
                print(f"{PROGRESS} {seed} {vi} load", file=sys.stderr, flush=True)
            try:
                with warnings.catch_warnings(record=True) as caught, _deadline(LOAD_DEADLINE_S):
                    warnings.simplefilter("always")
                    if variant.get("skeleton") == "dense":
                        model = dsq.load(case.data, model=build_user(case.model, case.kwargs))
                    elif variant.get("skeleton") == "runtime":
                        model = dsq.load(case.data, mode="runtime",
                                         model=build_user(case.model, case.kwargs), **opts)
                    else:
                        model = dsq.load(case.data, mode="runtime", **opts)
            except _Hang:
                record("hang", vi, None, f"load did not finish in {LOAD_DEADLINE_S} s", variant)
                continue
            except Exception as exc:
                if case.reencoded and isinstance(exc, DeepSqueezeError):
                    tally.loads_refused += 1
                    continue
                record("load failed", vi, None, f"{type(exc).__name__}: {str(exc)[:200]}",
                       variant)
                continue
            if "cache_corruption" in variant:
                tally.corrupt_caches[variant["cache_corruption"]] += 1
                tally.corrupt_cache_warned += any(issubclass(w.category, RuntimeWarning)
                                                  for w in caught)
            tally.variants += 1
            from deepsqueeze.runtime import runtime_info

            if variant.get("skeleton") == "dense":
                used = {"skeleton dense load"}
            else:
                info = runtime_info(model)
                used = {c.impl for c in info.layers}
                if any(f["kept"] for f in info.fused):
                    used.add("fused chain")
                if not info.layers:
                    used.add("(no compressed layer)")
                if variant.get("skeleton"):
                    used.add("skeleton runtime load")
            for ii, (inp, ref) in enumerate(zip(inputs, refs, strict=True)):
                if only_input is not None and ii != only_input:
                    continue
                if verbose:
                    print(f"  input {ii}: {inp.label}", flush=True)
                if progress:
                    print(f"{PROGRESS} {seed} {vi} {ii}", file=sys.stderr, flush=True)
                try:
                    with _deadline(CALL_DEADLINE_S):
                        outcome, problem, printed = judge(model, inp, ref)
                except _Hang:
                    outcome, printed = "hang", False
                    problem = f"the call did not return in {CALL_DEADLINE_S} s"
                tally.executions += 1
                tally.printed_to_stderr += printed
                if printed:
                    tally.printed_by[f"{inp.label} | {_family(variant)}"] += 1
                tally.by_kind[inp.kind] += 1
                tally.outcomes[outcome] += 1
                if case.user:
                    tally.user_outcomes[outcome] += 1
                    tally.user_inputs[inp.kind] += 1
                    tally.user_failures += problem is not None
                tally.impls.update(used)
                if problem is not None:
                    record(outcome, vi, ii, problem, variant)
            del model
        os.environ.pop("DEEPSQUEEZE_AUTOTUNE_CACHE", None)


def worker(seeds: list[int], out: Path) -> None:
    """Run files ``seeds``, appending one JSON tally line per file to ``out``."""
    torch.set_num_threads(1)
    from deepsqueeze.runtime.kernel import get_kernel

    kernel = get_kernel()
    head = {"kernel": None if kernel is None else kernel.path.name,
            "kernel_sanitized": bool(kernel and b"__asan_report" in kernel.path.read_bytes())}
    with out.open("a") as fh:
        fh.write(json.dumps({"head": head}) + "\n")
        fh.flush()
        for seed in seeds:
            tally = Tally()
            t0 = time.perf_counter()
            run_file(seed, tally, progress=True)
            fh.write(json.dumps({"seed": seed, "seconds": time.perf_counter() - t0,
                                 "tally": tally.to_dict()}) + "\n")
            fh.flush()


# ---------------------------------------------------------------------------- supervisor


def _env(sanitize: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"})
    if sanitize:
        from deepsqueeze.runtime import kernel

        getter: Callable[[], dict[str, str]] | None = getattr(kernel, "sanitizer_env", None)
        if getter is None:
            raise SystemExit("this deepsqueeze has no sanitizer build "
                             "(deepsqueeze.runtime.kernel.sanitizer_env)")
        env.update(getter())
        env["DEEPSQUEEZE_KERNEL_SANITIZE"] = "1"
    return env


def _file_seeds(seed: int, user_share: float = 0.0) -> Iterator[int]:
    """File seeds of run ``seed``: zoo files ``seed * 10**6 + i``, and with ``user_share`` > 0
    that share of user-model files ``seed * 10**6 + USER_BASE + j`` interleaved."""
    i = j = 0
    pick = np.random.default_rng(seed + 99)
    while True:
        if user_share > 0 and pick.random() < user_share:
            yield seed * 1_000_000 + USER_BASE + j
            j += 1
        else:
            yield seed * 1_000_000 + i
            i += 1


def _replay(seed: int, variant: int | None, inp: int | None) -> str:
    """The command rerunning one file (and variant, input) in one process."""
    cmd = f"python benchmarks/fuzz_runtime.py --replay {seed}"
    if variant is not None and variant >= 0:
        cmd += f" --variant {variant}"
    if inp is not None:
        cmd += f" --input {inp}"
    return cmd


def _input_label(seed: int, index: int) -> str | None:
    """The label of input ``index`` of file ``seed`` (generated again; no runtime involved)."""
    try:
        case = make_file(seed)
        if case is None:
            return None
        inputs = [i for i in make_inputs(case, np.random.default_rng(seed + 7))
                  if i.label not in EXCLUDED]
        return inputs[index].label
    except Exception:
        return None


def _crash_record(seeds: list[int], lines: list[dict[str, Any]], proc_rc: int | None,
                  stderr: str) -> dict[str, Any]:
    last = [ln for ln in stderr.splitlines() if ln.startswith(PROGRESS)]
    where = last[-1].split()[1:] if last else []
    reports = [ln for ln in stderr.splitlines() if any(p.search(ln)
                                                       for p in SANITIZER_PATTERNS.values())]
    summary = [ln for ln in stderr.splitlines() if ln.startswith("SUMMARY:")]
    seed = int(where[0]) if where else seeds[len([x for x in lines if "seed" in x])]
    message = (summary or reports or stderr.strip().splitlines()[-1:] or ["?"])[0][:300]
    inp = None if len(where) < 3 or where[2] == "load" else int(where[2])
    return {
        "kind": "crash" if proc_rc is not None else "hang",
        "file_seed": seed,
        "variant": None if len(where) < 2 else int(where[1]),
        "input": inp,
        "input_label": None if inp is None else _input_label(seed, inp),
        "returncode": proc_rc,
        "message": message,
        "family": re.sub(r"0x[0-9a-f]+|==\d+==|\d+:\d+:", "", message)[:120],
        "stderr_tail": stderr[-3000:],
        "replay": _replay(seed, None if len(where) < 2 else int(where[1]),
                          None if len(where) < 3 or where[2] == "load" else int(where[2])),
    }


def _source_version() -> str | None:
    """The checkout's commit, with ``+changes`` when ``src`` differs from it (None: no git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                              capture_output=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=REPO,
                               text=True, capture_output=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + (" +changes in src" if dirty else "")) if head else None


def fuzz(executions: int, seed: int, sanitize: bool, files_per_worker: int = FILES_PER_WORKER,
         log: Callable[[str], None] = print, user_share: float = 0.0,
         max_seconds: float | None = None) -> dict[str, Any]:
    """Run files until ``executions`` executions are done (or no new batch of files is started
    after ``max_seconds``); return the results dict."""
    env = _env(sanitize)
    version = _source_version()
    tally = Tally()
    crashes: list[dict[str, Any]] = []
    reports = Counter()
    heads: list[dict[str, Any]] = []
    seeds = _file_seeds(seed, user_share)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        while tally.executions < executions and (
                max_seconds is None or time.perf_counter() - t0 < max_seconds):
            per_file = tally.executions / tally.files if tally.files else 500.0
            wanted = math.ceil((executions - tally.executions) / max(per_file, 1.0))
            batch = [next(seeds) for _ in range(max(1, min(files_per_worker, wanted)))]
            out = Path(tmp) / f"w{batch[0]}.jsonl"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker",
                   ",".join(map(str, batch)), "--worker-out", str(out),
                   "--exclude", ",".join(sorted(EXCLUDED))]
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                      timeout=WORKER_TIMEOUT_S, cwd=REPO)
                rc: int | None = proc.returncode
                stderr = proc.stderr
            except subprocess.TimeoutExpired as exc:
                rc = None
                err = exc.stderr or b""
                stderr = err.decode(errors="replace") if isinstance(err, bytes) else err
            for name, pattern in SANITIZER_PATTERNS.items():
                reports[name] += sum(1 for ln in stderr.splitlines() if pattern.search(ln))
            lines = [json.loads(ln) for ln in out.read_text().splitlines()] if out.exists() else []
            for ln in lines:
                if "head" in ln:
                    heads.append(ln["head"])
                else:
                    tally.merge(ln["tally"])
            done = len([ln for ln in lines if "seed" in ln])
            if rc != 0 or done < len(batch):
                crash = _crash_record(batch, lines, rc, stderr)
                crashes.append(crash)
                tally.executions += 1
                tally.fail(crash)
                log(f"CRASH {json.dumps({k: v for k, v in crash.items() if k != 'stderr_tail'})}")
                # continue after the file that crashed
                rest = batch[batch.index(crash["file_seed"]) + 1:] if crash["file_seed"] in \
                    batch else []
                if rest:
                    seeds = _chain(rest, seeds)
            log(f"{tally.executions:,} executions, {tally.files} files, "
                f"{tally.failure_count} failures, {time.perf_counter() - t0:.0f} s")
    wall = time.perf_counter() - t0
    results = _results(tally, crashes, reports, heads, wall, seed, sanitize, executions,
                       user_share)
    if max_seconds is not None:
        results["command"] += f" --max-seconds {max_seconds:g}"
    results["source"] = version
    return results


def _chain(first: list[int], rest: Iterator[int]) -> Iterator[int]:
    yield from first
    yield from rest


def _results(tally: Tally, crashes: list[dict[str, Any]], reports: Counter,
             heads: list[dict[str, Any]], wall: float, seed: int, sanitize: bool,
             asked: int, user_share: float = 0.0) -> dict[str, Any]:
    d = tally.to_dict()
    user = {k: v for k, v in d["executions_by_model"].items() if k.startswith("user:")}
    clean = {k[len("clean "):]: v for k, v in d["outcomes"].items() if k.startswith("clean ")}
    return {
        "harness": "benchmarks/fuzz_runtime.py",
        "command": f"python benchmarks/fuzz_runtime.py --executions {asked} --seed {seed}"
                   + (f" --user-share {user_share:g}" if user_share else "")
                   + (" --sanitize" if sanitize else "")
                   + (f" --exclude '{','.join(sorted(EXCLUDED))}'" if EXCLUDED else ""),
        "seed": seed,
        "sanitize": sanitize,
        "excluded_inputs": sorted(EXCLUDED),
        "kernel_sanitized": bool(heads) and all(h["kernel_sanitized"] for h in heads),
        "kernel_available": bool(heads) and all(h["kernel"] for h in heads),
        "executions": d["executions"],
        "user_share": user_share,
        "user_model_executions": sum(user.values()),
        "user_model_files": sum(v for k, v in d["models"].items() if k.startswith("user:")),
        "user_model_inputs": d["user_inputs"],
        "user_model_outcomes": d["user_outcomes"],
        "user_model_failures": d["user_failures"],
        "files": d["files"],
        "files_given_up": d["files_refused"],
        "random_recipes_refused": d["recipes_refused"],
        "variants_loaded": d["variants"],
        "runtime_loads_refused": d["loads_refused"],
        "corrupt_autotune_caches": d["corrupt_caches"],
        "corrupt_cache_loads_warned": d["corrupt_cache_warned"],
        "inputs": d["by_kind"],
        "outcomes": d["outcomes"],
        "clean_errors_by_type": clean,
        "executions_per_executor": d["impls"],
        "models": d["models"],
        "executions_by_model": d["executions_by_model"],
        "seconds_by_model": {k: round(v, 1) for k, v in d["seconds_by_model"].items()},
        "outputs_compared": d["outputs_compared"],
        "outputs_unchecked_bound_overflow": d["outputs_unchecked"],
        "worst_error_as_fraction_of_tolerance": max(d["worst_error_vs_tolerance"], default=0.0),
        "tolerance": f"|runtime - dense| <= {RTOL:g} * bound + {RTOL:g} * |dense|",
        "executions_printing_to_stderr": d["printed_to_stderr"],
        "printing_to_stderr_by_input": d["printed_by"],
        "weight_encodings": d["encodings"],
        "edits": d["edits"],
        "failures": d["failure_count"],
        "failure_kinds": d["failure_kinds"],
        "failure_signatures": [
            {"signature": sig, "count": n, "first": d["first_of"][sig]}
            for sig, n in sorted(d["signatures"].items(), key=lambda kv: -kv[1])],
        "failure_examples": d["failures"],
        "crashes": len(crashes),
        "sanitizer_reports": dict(reports),
        "wall_s": round(wall, 1),
        "executions_per_s": round(d["executions"] / wall, 1) if wall else None,
        "workers": len(heads),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, 1 thread per worker",
    }


def relative_paths(value: Any) -> Any:
    """``value`` with this checkout's path written ``.`` and the home folder ``~`` in every
    string (results files carry no absolute paths of the machine they ran on)."""
    if isinstance(value, str):
        return value.replace(str(REPO), ".").replace(str(Path.home()), "~")
    if isinstance(value, list):
        return [relative_paths(v) for v in value]
    if isinstance(value, dict):
        return {k: relative_paths(v) for k, v in value.items()}
    return value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--executions", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--user-share", type=float, default=0.0,
                    help="share of files that are user models (harness-defined nn.Modules "
                    "saved with example_inputs, loaded class-free), 0-1")
    ap.add_argument("--max-seconds", type=float, help="start no new batch of files after this")
    ap.add_argument("--sanitize", action="store_true",
                    help="kernel built with -fsanitize=address,undefined, runtimes preloaded")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help="results file")
    ap.add_argument("--no-json", action="store_true", help="write no results file")
    ap.add_argument("--files-per-worker", type=int, default=FILES_PER_WORKER)
    ap.add_argument("--replay", type=int, help="run one file seed here, print its failures")
    ap.add_argument("--variant", type=int, help="with --replay: only this variant")
    ap.add_argument("--input", type=int, help="with --replay: only this input")
    ap.add_argument("--exclude", default="", help="comma-separated input labels to leave out "
                    "(triage of a known crash; recorded in the results)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    EXCLUDED.update(x.strip() for x in args.exclude.split(",") if x.strip())
    if args.worker:
        worker([int(s) for s in args.worker.split(",")], args.worker_out)
        return 0
    if args.replay is not None:
        torch.set_num_threads(1)
        tally = Tally()
        run_file(args.replay, tally, verbose=True, only_variant=args.variant,
                 only_input=args.input)
        case = make_file(args.replay)
        if case is not None:
            print(json.dumps({"model": case.model, "kwargs": case.kwargs, "recipe": case.recipe,
                              "edits": case.edits, "encodings": case.encodings}))
        print(json.dumps({k: v for k, v in tally.to_dict().items() if k != "failures"}))
        return 1 if tally.failure_count else 0
    results = fuzz(args.executions, args.seed, args.sanitize, args.files_per_worker,
                   user_share=args.user_share, max_seconds=args.max_seconds)
    if not args.no_json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(relative_paths(results), indent=1) + "\n")
    summary = {k: results[k] for k in ("executions", "user_model_executions", "files",
                                       "variants_loaded", "failures",
                                       "crashes", "sanitizer_reports", "wall_s")}
    print(json.dumps(summary))
    return 1 if results["failures"] or results["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())
