"""The autotuner: time each executor of a compressed layer at a batch size, keep the fastest that
fits the memory budget, cache the timings.

Timings are medians over interleaved rounds (every candidate once per round, so a burst of load
on a shared machine hits all of them alike). They are cached in
``<user cache>/autotune.json`` (``$DEEPSQUEEZE_AUTOTUNE_CACHE`` overrides the path) under a key of
the layer's type, shape, geometry, input shape (batch included), kept weights and form, and of
the machine: torch version, CPU model, torch threads and the kernel build. Set
``DEEPSQUEEZE_AUTOTUNE=0`` (or pass ``autotune=False``) to skip timing: a fixed preference order
by batch size and density is used instead.

The cache is only a hint: a file over :data:`MAX_CACHE_BYTES`, nested deeper than JSON of its
shape needs, or not valid JSON is ignored, and each entry whose fields are not of the expected
types (times: finite, non-negative numbers) is dropped, with one warning per read.

The choice under a memory budget is a small knapsack, solved greedily: every layer starts on its
most compact executor; then the upgrade with the most time saved per extra byte held is applied
while the model's weights stay within the budget (by default 2x the file's bytes). A time that
is not a finite, non-negative number counts as unmeasured (never faster than a measured one).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepsqueeze.codec.container import json_shape
from deepsqueeze.inputs import NotReadable, read_input

ENV_AUTOTUNE = "DEEPSQUEEZE_AUTOTUNE"
"""``0`` / ``false`` / ``off``: choose executors without timing them."""
ENV_CACHE = "DEEPSQUEEZE_AUTOTUNE_CACHE"
"""Path of the autotuner's cache file (default ``<user cache>/autotune.json``)."""
CACHE_VERSION = 1
MAX_CACHE_BYTES = 16 << 20
"""A larger cache file is ignored (and replaced by the next save)."""
MAX_CACHE_ENTRIES = 4096
"""Entries kept in the cache file; the oldest are dropped beyond this."""
_MAX_CACHE_DEPTH = 6  # {"entries": {key: {"time_us": {...}}}} is 4 levels; "layers" lists 5
_MAX_TIMES = 64  # executors timed in one entry
_MAX_NAME = 256


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` says."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8",
                                            errors="replace") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def autotune_enabled() -> bool:
    """False when ``$DEEPSQUEEZE_AUTOTUNE`` says off."""
    return os.environ.get(ENV_AUTOTUNE, "1").strip().lower() not in ("0", "false", "off", "no")


def cache_path() -> Path:
    """The cache file: ``$DEEPSQUEEZE_AUTOTUNE_CACHE``, else ``<user cache>/autotune.json``."""
    env = os.environ.get(ENV_CACHE, "").strip()
    if env:
        return Path(env).expanduser()
    from deepsqueeze.data.search import user_cache_dir

    return user_cache_dir() / "autotune.json"


@dataclass
class LayerChoice:
    """One compressed layer: its form, every candidate's time and bytes, and the choice."""

    layer: str
    layer_type: str
    weight_shape: list[int]
    encoding: str
    kept: int
    density: float
    input_shape: list[int]
    file_bytes: int
    held_bytes: dict[str, int] = field(default_factory=dict)
    time_us: dict[str, float] = field(default_factory=dict)
    source: str = "heuristic"  # "timed", "cache" or "heuristic"
    impl: str = ""
    fused_into: str | None = None
    key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def machine_key() -> dict[str, Any]:
    """What makes timings comparable: torch version, CPU, threads, kernel build."""
    from deepsqueeze.runtime.kernel import get_kernel

    kernel = get_kernel()
    return {
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "kernel": kernel.path.name if kernel is not None else None,
    }


def layer_key(choice: LayerChoice, geometry: Any, candidates: list[str]) -> str:
    """Cache key of a layer's timings (a hash of everything that affects them)."""
    desc = {
        "v": CACHE_VERSION,
        "type": choice.layer_type,
        "shape": choice.weight_shape,
        "geometry": repr(geometry),
        "input": choice.input_shape,
        "kept": choice.kept,
        "encoding": choice.encoding,
        "candidates": sorted(candidates),
        **machine_key(),
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:32]


def fused_key(layer_keys: list[str | None], relus: list[bool], flatten: bool) -> str:
    """Cache key of a fused chain's timings (from its layers' keys)."""
    desc = {"v": CACHE_VERSION, "fused": layer_keys, "relus": relus, "flatten": flatten}
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:32]


def _time(value: Any) -> bool:
    """A finite, non-negative time (a JSON integer too large for a float is not one)."""
    if type(value) is int:
        return 0 <= value < 2**53
    return type(value) is float and math.isfinite(value) and value >= 0


def valid_entry(key: Any, entry: Any) -> bool:
    """Whether a cache entry has the shape :func:`save_cache` writes: a ``time_us`` object of
    executor name → finite non-negative time, and optional ``layer`` (str), ``batch`` (int)
    and ``layers`` (list of str)."""
    if not isinstance(key, str) or not 0 < len(key) <= _MAX_NAME or not isinstance(entry, dict):
        return False
    times = entry.get("time_us")
    if not isinstance(times, dict) or not 0 < len(times) <= _MAX_TIMES or not all(
            isinstance(k, str) and len(k) <= _MAX_NAME and _time(v) for k, v in times.items()):
        return False
    if "layer" in entry and not (isinstance(entry["layer"], str)
                                 and len(entry["layer"]) <= _MAX_NAME):
        return False
    if "batch" in entry and not (type(entry["batch"]) is int and entry["batch"] >= 1):
        return False
    layers = entry.get("layers", [])
    return isinstance(layers, list) and len(layers) <= _MAX_TIMES and all(
        isinstance(n, str) and len(n) <= _MAX_NAME for n in layers)


def _warn(path: Path, why: str) -> None:
    warnings.warn(f"autotune cache {path}: {why}", RuntimeWarning, stacklevel=3)


def load_cache(path: Path | None = None) -> dict[str, Any]:
    """The cache's valid entries (empty when missing, unreadable, too large, too deeply nested
    or of another version; entries of the wrong shape are dropped with one warning)."""
    path = path or cache_path()
    try:
        raw = read_input(path, limit=MAX_CACHE_BYTES)  # a regular file only: a FIFO never blocks
    except NotReadable as exc:
        if not exc.missing:
            _warn(path, f"{exc}, ignored")
        return {}
    try:
        # json.loads recurses once per level: the depth is measured first, in linear time
        if json_shape(raw).depth > _MAX_CACHE_DEPTH:
            raise ValueError(f"nested deeper than {_MAX_CACHE_DEPTH} levels")
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        _warn(path, f"not a valid cache ({str(exc)[:200]}), ignored")
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return {}
    entries = data.get("entries")
    if not isinstance(entries, dict):
        _warn(path, "no 'entries' object, ignored")
        return {}
    good = {k: v for k, v in entries.items() if valid_entry(k, v)}
    if len(good) < len(entries):
        _warn(path, f"{len(entries) - len(good)} malformed entries dropped")
    return good


def save_cache(updates: dict[str, Any], path: Path | None = None) -> None:
    """Merge ``updates`` into the cache file (atomic replace; failures are ignored)."""
    if not updates:
        return
    path = path or cache_path()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # load_cache warned already when the cache was read
        entries = load_cache(path)
    for key, value in updates.items():
        if valid_entry(key, value):
            entries.pop(key, None)
            entries[key] = value  # newest last
    entries = dict(list(entries.items())[-MAX_CACHE_ENTRIES:])
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".autotune-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump({"version": CACHE_VERSION, "entries": entries}, fh, indent=1)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def time_modules(
    modules: dict[str, Callable[[torch.Tensor], Any] | nn.Module],
    x: torch.Tensor,
    rounds: int = 15,
    min_sample_s: float = 2e-4,
    max_seconds: float = 3.0,
) -> dict[str, float]:
    """Median seconds per call of each module on ``x``, from interleaved rounds.

    A sample repeats the call enough times to last about ``min_sample_s`` (calls of a few
    microseconds are otherwise dominated by the timer).
    """
    reps: dict[str, int] = {}
    with torch.inference_mode():
        for name, mod in modules.items():
            mod(x)
            t0 = time.perf_counter()
            mod(x)
            one = max(time.perf_counter() - t0, 1e-7)
            reps[name] = max(1, min(1000, int(min_sample_s / one)))
        samples: dict[str, list[float]] = {name: [] for name in modules}
        deadline = time.perf_counter() + max_seconds
        for r in range(rounds):
            for name, mod in modules.items():
                n = reps[name]
                t0 = time.perf_counter()
                for _ in range(n):
                    mod(x)
                samples[name].append((time.perf_counter() - t0) / n)
            if r >= 2 and time.perf_counter() > deadline:
                break
    return {name: statistics.median(s) for name, s in samples.items()}


HEURISTIC_ORDER = {
    "small": ["kernel", "scipy-csr", "torch-csr", "densify", "dense"],
    "large": ["dense", "densify", "kernel", "torch-csr", "scipy-csr"],
}


def heuristic_times(choice: LayerChoice, batch_size: int) -> dict[str, float]:
    """Pseudo-times giving the untimed preference order (sparse kernels for sparse layers at
    small batches, dense GEMMs otherwise); only their order matters."""
    sparse = choice.density <= 0.3 and (batch_size <= 64 or choice.density <= 0.1)
    order = HEURISTIC_ORDER["small" if sparse else "large"]
    ranked = [n for n in order if n in choice.held_bytes]
    ranked += [n for n in choice.held_bytes if n not in ranked]
    return {name: float(i + 1) for i, name in enumerate(ranked)}


def choose(choices: list[LayerChoice], budget_bytes: int | None, fixed_bytes: int) -> int:
    """Set ``impl`` of each layer: fastest overall with weights within ``budget_bytes``.

    ``fixed_bytes`` is what the rest of the model holds. Returns the chosen total bytes. When
    even the most compact executors exceed the budget they are kept (the budget is reported as
    missed by the caller). A missing, NaN, infinite or negative time counts as unmeasured
    (+inf): every upgrade strictly lowers one layer's time, so this ends after at most as many
    steps as there are candidates.
    """

    def seconds(c: LayerChoice, name: str) -> float:
        t = c.time_us.get(name)
        return float(t) if _time(t) else math.inf

    for c in choices:
        c.impl = min(c.held_bytes, key=lambda n: (c.held_bytes[n], seconds(c, n)))
    total = fixed_bytes + sum(c.held_bytes[c.impl] for c in choices)
    for _ in range(sum(len(c.held_bytes) for c in choices) + 1):
        best: tuple[float, float, LayerChoice, str] | None = None
        for c in choices:
            cur_t, cur_b = seconds(c, c.impl), c.held_bytes[c.impl]
            for name in c.held_bytes:
                t = seconds(c, name)
                if not t < cur_t:  # no gain (an unmeasured time gains nothing)
                    continue
                gain, extra = cur_t - t, c.held_bytes[name] - cur_b
                if budget_bytes is not None and total + extra > budget_bytes:
                    continue
                score = float("inf") if extra <= 0 else gain / extra
                if best is None or (score, gain) > best[:2]:
                    best = (score, gain, c, name)
        if best is None:
            break
        _, _, c, name = best
        total += c.held_bytes[name] - c.held_bytes[c.impl]
        c.impl = name
    return total
