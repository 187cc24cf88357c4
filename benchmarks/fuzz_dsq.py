"""Coverage-guided fuzzing of the .dsq readers: ``dsq.load``, ``inspect``, the runtime loader.

Usage::

    python benchmarks/fuzz_dsq.py -atheris_runs=100000      # or: make fuzz FUZZ_RUNS=100000
    python benchmarks/fuzz_dsq.py -max_total_time=300 CORPUS_DIR

Every input is handed to ``load`` and ``inspect`` as bytes; ``DsqFormatError`` is the expected
answer to a bad file, any other exception is a finding (atheris stops, prints the traceback and
writes the input as ``crash-<sha1>``). Seeds are real small .dsq files written at start-up.

Random byte mutations almost never get past the CRC-32 checks, so a custom mutator decodes a
parseable input, mutates its manifest (a JSON value anywhere in it, or the JSON text) or one of
its sections, and re-writes the container with valid checksums; 1 mutation in 8 stays a plain
byte mutation so the container parser is fuzzed too. Needs ``pip install atheris`` (not a
dependency of deepsqueeze); without it the harness says so and exits with status 0.
"""

from __future__ import annotations

import contextlib
import copy
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

try:
    import atheris
except ImportError:  # pragma: no cover - depends on the environment
    atheris = None

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

_INTERESTING = [0, 1, -1, 2, 7, 8, 16, 17, 24, 32, 33, 255, 256, 65535, 65536, 2**31 - 1, 2**31,
                2**32, 2**62, 2**63 - 1, 2**64 - 1, 10**12, -(2**63), 0.5, 1e300, "", "dense",
                "codebook", "sparse", "sparse-codebook", "huffman", "fixed", "float16",
                "float32", "int64", "lenet5", "resnet20", "mobilenet-tiny", None, True, [], {},
                [1], [0, 0], [10**12, 1]]


def _setup_reader() -> tuple[Any, Any, Any, Any]:
    """Import the reader (instrumented for coverage when atheris is present)."""
    if atheris is not None:
        with atheris.instrument_imports(include=["deepsqueeze"]):
            import deepsqueeze.runtime  # noqa: F401  (instrumented too)
            from deepsqueeze import dsq
            from deepsqueeze.codec.container import dsq_bytes, parse_dsq
            from deepsqueeze.errors import DsqFormatError
    else:
        from deepsqueeze import dsq
        from deepsqueeze.codec.container import dsq_bytes, parse_dsq
        from deepsqueeze.errors import DsqFormatError
    return dsq, dsq_bytes, parse_dsq, DsqFormatError


def write_seeds(folder: Path) -> list[Path]:
    """Small real .dsq files covering every tensor encoding and a channel-pruned conv model."""
    import torch

    from deepsqueeze import dsq, models
    from deepsqueeze.methods.base import create_method, select_layers

    def compressed(name: str, kwargs: dict, stages: list[tuple[str, dict]]) -> Any:
        torch.manual_seed(0)
        model = models.create(name, **kwargs)
        for method_name, params in stages:
            method = create_method(method_name, **params)
            method.apply(model, select_layers(model, method.params.layers, method.supported))
            method.finalize(model)
        return model

    small = {"in_features": 16}
    seeds = {
        "lenet300-pruned-shared": compressed("lenet300", small, [
            ("prune", {"sparsity": 0.9}), ("share", {"bits": 4})]),
        "lenet300-mixed": compressed("lenet300", small, [
            ("prune", {"sparsity": 0.9, "layers": ["fc1"]}),
            ("share", {"bits": 3, "layers": ["fc2"]})]),
        "lenet5-classic-channel-pruned": compressed("lenet5-classic", {"num_classes": 4}, [
            ("channel-prune", {"ratio": 0.5}), ("prune", {"sparsity": 0.8})]),
    }
    paths = []
    for name, model in seeds.items():
        path = folder / f"{name}.dsq"
        dsq.save(model, path)
        paths.append(path)
    return paths


def _mutate_value(value: Any, rng: random.Random) -> Any:
    """A nearby or hostile replacement for one JSON value."""
    if isinstance(value, int) and not isinstance(value, bool) and rng.random() < 0.5:
        return rng.choice([value + 1, value - 1, value * 2, value // 2, -value, value + 2**32])
    if isinstance(value, list) and value and rng.random() < 0.5:
        out = list(value)
        op = rng.randrange(3)
        if op == 0:
            out.pop(rng.randrange(len(out)))
        elif op == 1:
            out.insert(rng.randrange(len(out) + 1), copy.deepcopy(rng.choice(out)))
        else:
            rng.shuffle(out)
        return out
    return copy.deepcopy(rng.choice(_INTERESTING))


def _mutate_meta(meta: dict, rng: random.Random) -> dict:
    """Replace one value (or delete one key) somewhere in ``meta``."""
    meta = copy.deepcopy(meta)
    node: Any = meta
    target: tuple[Any, Any] | None = None
    for _ in range(rng.randrange(1, 6)):
        if isinstance(node, dict) and node:
            key: Any = rng.choice(sorted(node))
        elif isinstance(node, list) and node:
            key = rng.randrange(len(node))
        else:
            break
        target = (node, key)
        if rng.random() < 0.3 or not isinstance(node[key], (dict, list)):
            break
        node = node[key]
    if target is None:
        return meta
    parent, key = target
    if isinstance(parent, dict) and rng.random() < 0.15:
        del parent[key]
    else:
        parent[key] = _mutate_value(parent[key], rng)
    return meta


def make_mutator(dsq_bytes: Any, parse_dsq: Any, error: type[Exception]) -> Any:
    def mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        try:
            f = parse_dsq(data)
        except error:
            return atheris.Mutate(data, max_size)
        if rng.random() < 0.125:
            return atheris.Mutate(data, max_size)
        meta, sections = f.meta, dict(f.sections)
        choice = rng.random()
        if choice < 0.55:
            meta = _mutate_meta(meta, rng)
        elif choice < 0.7:
            text = json.dumps(meta, separators=(",", ":")).encode()
            try:
                new = json.loads(atheris.Mutate(text, 2 * len(text) + 64))
            except (ValueError, RecursionError):
                new = None
            meta = new if isinstance(new, dict) else _mutate_meta(meta, rng)
        elif sections:
            name = rng.choice(sorted(sections))
            if rng.random() < 0.2:  # bytes of another tensor's section
                sections[name] = sections[rng.choice(sorted(sections))]
            else:
                sections[name] = atheris.Mutate(sections[name], 2 * len(sections[name]) + 16)
        try:
            out = dsq_bytes(meta, sections)  # valid header and section checksums
        except (ValueError, TypeError):
            return atheris.Mutate(data, max_size)
        return out if len(out) <= max_size else atheris.Mutate(data, max_size)

    return mutator


def main(argv: list[str]) -> None:
    if atheris is None:
        print("fuzz_dsq: atheris is not installed, so there is nothing to run (skipped).\n"
              "Install it with `pip install atheris` (Linux/macOS, CPython 3.8-3.12; not a "
              "dependency of deepsqueeze) and run again.")
        return
    dsq, dsq_bytes, parse_dsq, DsqFormatError = _setup_reader()

    def load_runtime(data: bytes) -> None:
        # the runtime's own decoders (no timing, no fx code generation)
        dsq.load(data, mode="runtime", autotune=False, fuse=False)

    def test_one_input(data: bytes) -> None:
        for reader in (dsq.load, dsq.inspect, load_runtime):
            with contextlib.suppress(DsqFormatError):
                reader(data)

    args = list(argv)
    if not any(a.startswith("-max_len=") for a in args):
        args.append("-max_len=262144")
    if not any(a.startswith("-timeout=") for a in args):
        args.append("-timeout=20")  # one input taking this long is a finding (a hang)
    if not any(a.startswith("-rss_limit_mb=") for a in args):
        args.append("-rss_limit_mb=3072")  # so is memory far beyond what a small file justifies
    if not any(not a.startswith("-") for a in args[1:]):  # no corpus folder given
        corpus = Path(tempfile.mkdtemp(prefix="dsq-corpus-"))
        write_seeds(corpus)
        args.append(str(corpus))
        print(f"fuzz_dsq: seed corpus in {corpus}", flush=True)
    else:
        for folder in (Path(a) for a in args[1:] if not a.startswith("-")):
            folder.mkdir(parents=True, exist_ok=True)
            if not any(folder.iterdir()):
                write_seeds(folder)
    atheris.Setup(args, test_one_input,
                  custom_mutator=make_mutator(dsq_bytes, parse_dsq, DsqFormatError))
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
