"""Sparse variational dropout (sparse-vd) on LeNet-300-100 and LeNet-5 beside Molchanov et al.

Runs ``recipes/sparse-vd-<model>.yaml`` from the trained dense model and measures what the
paper's Table 1 reports (test error and ``|W| / |W != 0|``, the weights' nonzero-count ratio,
with the per-layer kept fractions) plus what the paper does not: the real ``.dsq`` file's bytes
after 4-5-bit sharing, its ratio to the dense fp32 bytes and its own top-1. Writes
benchmarks/results/sparse_vd.json (runs not asked for keep their entry).

    python benchmarks/sparse_vd.py [--only lenet300] [--seed 0]

``--dense`` names the dense model (default runs/rec-<model>/model.pt, trained with the zoo's
settings: ``deepsqueeze train --model lenet300 --dataset mnist --seed 0 --out runs/rec-lenet300``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

import deepsqueeze
from deepsqueeze import dsq
from deepsqueeze.data import load_dataset
from deepsqueeze.io import atomic_write, load_model
from deepsqueeze.metrics.accuracy import accuracy_and_loss
from deepsqueeze.metrics.size import dense_fp32_bytes
from deepsqueeze.pipeline import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "sparse_vd.json"
OUT = ROOT / "runs" / "sparse-vd"
MODELS = ("lenet300", "lenet5")

# Molchanov, Ashukha & Vetrov 2017, Table 1 (MNIST): error %, |W| / |W != 0|, per-layer kept %.
PAPER = [
    {"model": "lenet300", "method": "Original", "error": 1.64, "nonzero_ratio": 1},
    {"model": "lenet300", "method": "Pruning (Han et al. 2015)", "error": 1.59,
     "nonzero_ratio": 12},
    {"model": "lenet300", "method": "DNS (Guo et al. 2016)", "error": 2.28, "nonzero_ratio": 56},
    {"model": "lenet300", "method": "SWS (Ullrich et al. 2017)", "error": 1.94,
     "nonzero_ratio": 23},
    {"model": "lenet300", "method": "Sparse VD (paper)", "error": 1.92, "nonzero_ratio": 68,
     "kept_pct": [1.1, 2.7, 38]},
    {"model": "lenet5", "method": "Original", "error": 0.80, "nonzero_ratio": 1},
    {"model": "lenet5", "method": "Pruning (Han et al. 2015)", "error": 0.77,
     "nonzero_ratio": 12},
    {"model": "lenet5", "method": "DNS (Guo et al. 2016)", "error": 0.91, "nonzero_ratio": 111},
    {"model": "lenet5", "method": "SWS (Ullrich et al. 2017)", "error": 0.97,
     "nonzero_ratio": 200},
    {"model": "lenet5", "method": "Sparse VD (paper)", "error": 0.75, "nonzero_ratio": 280,
     "kept_pct": [33, 2, 0.2, 5]},
]


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach() for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))}


def run(model_name: str, seed: int, dense_path: Path) -> dict:
    """Compress the dense model with the model's sparse-vd recipe and measure the file."""
    recipe_path = ROOT / "recipes" / f"sparse-vd-{model_name}.yaml"
    recipe = load_recipe(recipe_path).model_copy(update={"seed": seed})
    test = load_dataset(recipe.dataset, "test")
    x_test = test.normalized()
    dense = load_model(dense_path)
    dense_acc = accuracy_and_loss(dense.eval(), x_test, test.labels).accuracy
    dense_bytes = dense_fp32_bytes(dense)
    total = sum(w.numel() for w in _weights(dense).values())
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{model_name}-s{seed}.dsq"
    t0 = time.perf_counter()
    result = deepsqueeze.compress(dense, recipe, dataset=recipe.dataset, out=path, progress=True)
    seconds = time.perf_counter() - t0
    loaded = dsq.load(path)
    acc = accuracy_and_loss(loaded.eval(), x_test, test.labels).accuracy
    kept = {n: int((w != 0).sum()) for n, w in _weights(loaded).items()}
    vd_stage = result.stages[0]
    return {
        "recipe": f"recipes/{recipe_path.name}",
        "model": model_name,
        "seed": seed,
        "dense_error_pct": 100 * (1 - dense_acc),
        "error_after_vd_pct": 100 * (1 - vd_stage.test_accuracy),
        "file_error_pct": 100 * (1 - acc),
        "weights": total,
        "nonzero_weights": sum(kept.values()),
        "nonzero_ratio": total / max(1, sum(kept.values())),
        "kept_pct": {n: 100 * kept[n] / w.numel() for n, w in _weights(loaded).items()},
        "file_bytes": path.stat().st_size,
        "dense_fp32_bytes": dense_bytes,
        "file_ratio": dense_bytes / path.stat().st_size,
        "pipeline_seconds": seconds,
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "stages": [s.__dict__ for s in result.stages],
    }


def table(results: dict) -> str:
    """Markdown: the paper's Table 1 beside our runs."""
    lines = ["| network | method | error % | \\|W\\|/\\|W≠0\\| | kept per layer % | file ratio |",
             "| --- | --- | --- | --- | --- | --- |"]
    for model in MODELS:
        for p in (p for p in PAPER if p["model"] == model):
            kept = " / ".join(f"{k:g}" for k in p.get("kept_pct", []))
            lines.append(f"| {model} | {p['method']} | {p['error']:.2f} | "
                         f"{p['nonzero_ratio']}x | {kept} | |")
        for r in (r for r in results["runs"].values() if r["model"] == model):
            kept = " / ".join(f"{k:.1f}" for k in r["kept_pct"].values())
            lines.append(
                f"| {model} | **deepsqueeze sparse-vd** (seed {r['seed']}; dense "
                f"{r['dense_error_pct']:.2f} %; after VD {r['error_after_vd_pct']:.2f} %) | "
                f"{r['file_error_pct']:.2f} | {r['nonzero_ratio']:.0f}x | {kept} | "
                f"{r['file_ratio']:.0f}x ({r['file_bytes']:,} B) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=MODELS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dense", type=Path, help="dense model.pt (default runs/rec-<model>)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": {}}
    for model_name in args.only or MODELS:
        dense = args.dense or ROOT / "runs" / f"rec-{model_name}" / "model.pt"
        if not dense.exists():
            sys.exit(f"no dense model at {dense}: train it first (see the docstring)")
        row = run(model_name, args.seed, dense)
        results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": {}}
        results["runs"][f"{model_name}/s{args.seed}"] = row
        results["paper"] = PAPER
        with atomic_write(RESULTS, "w") as handle:
            json.dump(results, handle, indent=2)
            handle.write("\n")
    print(table(results))


if __name__ == "__main__":
    main()
