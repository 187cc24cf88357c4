"""Circulant projections (Cheng et al., ICCV 2015): FFT against dense time, accuracy against bytes.

``--timing``: the runtime's two executors of a square ``CirculantLinear`` (n = 256 ... 8192),
``fft`` (``irfft(rfft(r) · rfft(D x))``, O(n log n), holds ~n floats) against ``dense`` (the
explicit n × n matrix, ``F.linear``), at batch 1 and 64, one thread: calls interleaved
(fft, dense, fft, dense, ...), median of the per-call times, ratio = dense / fft.

``--accuracy``: recipes/circulant-lenet300.yaml (fc1 and fc2 circulant) and the same recipe
with fc1 only, on a trained lenet300 (``--baseline``, else benchmarks/baselines.py's): top-1
of the file against its bytes, beside the dense baseline's.

``--wide``: the wider MLP 784-2048-2048-10 trained from scratch on MNIST (hashednets.py's
data split, optimizer and schedule; ``--epochs``, short), dense against its two hidden layers
(784→2048, 2048→2048) as ``CirculantLinear`` and as ``ToeplitzLinear`` (method ``circulant``,
``init: random``, ``structure`` circulant / toeplitz); each saved as .dsq and reloaded: test
error of the file against its bytes (a user graph model: the runtime executors are checked by
``--accuracy`` on the lenet300 files and by the tests). Added to
circulant_accuracy.json as ``"wide_mlp"`` (the other keys kept).

Writes benchmarks/results/circulant_timing.json and circulant_accuracy.json.

    python benchmarks/circulant.py --timing
    python benchmarks/circulant.py --accuracy [--baseline model.pt]
    python benchmarks/circulant.py --wide --epochs 2
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hashednets import accuracy as top1
from hashednets import deep, mnist, run_recipe, train

from deepsqueeze import dsq, models
from deepsqueeze.io import atomic_write
from deepsqueeze.methods import create_method, select_layers
from deepsqueeze.pipeline import load_recipe
from deepsqueeze.runtime.executors.hashed import CirculantDense, CirculantFFT, CirculantForm

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RECIPE = ROOT / "recipes" / "circulant-lenet300.yaml"
WIDTHS = (256, 512, 1024, 2048, 4096, 8192)


def _median_us(fn: Any, x: torch.Tensor, calls: list[float]) -> None:
    t0 = time.perf_counter()
    fn(x)
    calls.append((time.perf_counter() - t0) * 1e6)


def timing(rounds: int) -> dict[str, Any]:
    rows = []
    for n in WIDTHS:
        g = torch.Generator().manual_seed(n)
        form = CirculantForm(n, n, torch.randn(1, n, generator=g) / n**0.5, 7)
        fft, dense = CirculantFFT(form, None).eval(), CirculantDense(form, None).eval()
        for batch in (1, 64):
            x = torch.randn(batch, n, generator=g)
            with torch.inference_mode():
                torch.testing.assert_close(fft(x), dense(x), atol=1e-3, rtol=1e-3)
                for _ in range(3):  # warm-up
                    fft(x), dense(x)
                t_fft: list[float] = []
                t_dense: list[float] = []
                reps = rounds if n <= 2048 else max(5, rounds // 4)
                for _ in range(reps):
                    _median_us(fft, x, t_fft)
                    _median_us(dense, x, t_dense)
            row = {"width": n, "batch": batch,
                   "fft_us": round(statistics.median(t_fft), 1),
                   "dense_us": round(statistics.median(t_dense), 1),
                   "fft_held_bytes": fft.held_bytes(), "dense_held_bytes": dense.held_bytes(),
                   "calls_each": reps}
            row["speedup_fft_over_dense"] = round(row["dense_us"] / row["fft_us"], 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return {"threads": torch.get_num_threads(), "machine": platform.machine(),
            "torch": torch.__version__, "rows": rows}


def accuracy(baseline: Path | None) -> dict[str, Any]:
    shipped = load_recipe(RECIPE)
    fc1_only = copy.deepcopy(shipped)
    fc1_only.name = "circulant-lenet300-fc1"
    fc1_only.stages[0].params["layers"] = ["fc1"]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in (shipped, fc1_only):
            path = Path(tmp) / f"{recipe.name}.yaml"
            path.write_text(json.dumps(recipe.model_dump(mode="json")))
            out = Path(tmp) / f"{recipe.name}.json"
            rec = run_recipe(path, baseline, out, label=str(RECIPE.relative_to(ROOT))
                             if recipe is shipped else f"{RECIPE.relative_to(ROOT)} with "
                             "layers [fc1]")
            runs.append(rec)
    dense_params = sum(p.numel() for p in models.create("lenet300").parameters())
    return {"dense_fp32_bytes": 4 * dense_params, "runs": runs}


WIDE = (784, 2048, 2048, 10)


def wide(epochs: int, seed: int) -> dict[str, Any]:
    """Dense, circulant and Toeplitz 784-2048-2048-10 from scratch: error against bytes."""
    data = mnist()
    rows = []
    t_start = time.perf_counter()
    for structure in ("dense", "circulant", "toeplitz"):
        torch.manual_seed(seed)
        model = deep([torch.nn.Linear(a, b) for a, b in itertools.pairwise(WIDE)])
        if structure != "dense":  # Sequential children 1 and 3: the two hidden layers
            create_method("circulant", structure=structure, init="random", seed=seed).apply(
                model, select_layers(model, ["1", "3"]))
        params = sum(p.numel() for p in model.parameters())
        secs = train(model, data, epochs, seed)
        model.eval()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "wide.dsq"
            dsq.save(model, path)
            size = path.stat().st_size
            loaded = dsq.load(path)
        row = {"structure": structure, "network": "784-2048-2048-10",
               "hidden_layers": "dense" if structure == "dense" else f"{structure} (fc1, fc2)",
               "parameters": params, "file_bytes": size,
               "test_error_percent": round(100 * (1 - top1(model, data[4], data[5])), 2),
               "val_error_percent": round(100 * (1 - top1(model, data[2], data[3])), 2),
               "file_test_error_percent": round(100 * (1 - top1(loaded, data[4], data[5])), 2),
               "train_seconds": round(secs, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    dense_bytes = rows[0]["file_bytes"]
    for r in rows:
        r["compression_vs_dense_file"] = round(dense_bytes / r["file_bytes"], 1)
    return {"setting": {"epochs": epochs, "batch_size": 128, "seed": seed,
                        "optimizer": "SGD nesterov 0.9, lr 0.05 cosine, grad-norm clip 5 "
                                     "(benchmarks/hashednets.py train)",
                        "init": "random (trained from scratch)", "train_images": len(data[1]),
                        "val_images": len(data[3]), "test_images": len(data[5]),
                        "threads": torch.get_num_threads(), "machine": platform.machine(),
                        "torch": torch.__version__,
                        "seconds": round(time.perf_counter() - t_start, 1)},
            "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--timing", action="store_true")
    ap.add_argument("--accuracy", action="store_true")
    ap.add_argument("--rounds", type=int, default=41)
    ap.add_argument("--baseline", type=Path, default=None)
    ap.add_argument("--wide", action="store_true", help="784-2048-2048-10 from scratch")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.timing:
        with atomic_write(RESULTS / "circulant_timing.json", "w") as fh:
            json.dump(timing(args.rounds), fh, indent=2)
    if args.accuracy:
        with atomic_write(RESULTS / "circulant_accuracy.json", "w") as fh:
            json.dump(accuracy(args.baseline), fh, indent=2)
    if args.wide:
        out = RESULTS / "circulant_accuracy.json"
        result = json.loads(out.read_text()) if out.exists() else {}
        result["wide_mlp"] = wide(args.epochs, args.seed)
        with atomic_write(out, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
