"""Train the zoo's MNIST and Fashion-MNIST baselines; write benchmarks/results/baselines.json.

Every compression benchmark starts from these models (saved under runs/baselines/). Rerun:

    python benchmarks/baselines.py            # all four baselines
    python benchmarks/baselines.py --only lenet300/mnist
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch

import deepsqueeze
from deepsqueeze.io import atomic_write
from deepsqueeze.training import RECOMMENDED

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "baselines"
RESULTS = ROOT / "benchmarks" / "results" / "baselines.json"

# (model, dataset, target top-1 accuracy from the issue)
BASELINES = [
    ("lenet300", "mnist", 0.982),
    ("lenet5", "mnist", 0.991),
    ("lenet5-classic", "mnist", 0.989),
    ("lenet5", "fashion-mnist", 0.905),
]


def baseline_path(model: str, dataset: str) -> Path:
    """Where the trained baseline model of ``model``/``dataset`` is kept."""
    return RUNS / f"{model}-{dataset}" / "model.pt"


def ensure_baseline(model: str, dataset: str, seed: int = 0) -> Path:
    """Train the baseline if it is not there yet; return its model.pt path."""
    path = baseline_path(model, dataset)
    if not path.exists():
        run_dir = path.parent
        if run_dir.exists():
            shutil.rmtree(run_dir)
        deepsqueeze.train(model, dataset, out=run_dir, seed=seed)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", help="model/dataset to run (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    chosen = [b for b in BASELINES if not args.only or f"{b[0]}/{b[1]}" in args.only]
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": {}}
    for model, dataset, target in chosen:
        run_dir = RUNS / f"{model}-{dataset}"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        t0 = time.perf_counter()
        run = deepsqueeze.train(model, dataset, out=run_dir, seed=args.seed)
        seconds = time.perf_counter() - t0
        acc = run.fit.test_accuracy
        results["runs"][f"{model}/{dataset}"] = {
            "model": model,
            "dataset": dataset,
            "test_accuracy": acc,
            "target": target,
            "meets_target": acc >= target,
            "epochs": run.fit.epochs_completed,
            "train_seconds": seconds,
            "seconds_per_epoch": seconds / run.fit.epochs_completed,
            "config": {**RECOMMENDED.get(model, {}), "seed": args.seed},
            "parameters": sum(p.numel() for p in run.model.parameters()),
        }
        print(f"{model}/{dataset}: {acc:.2%} (target {target:.1%}) in {seconds:.0f} s")
    results["machine"] = {
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    with atomic_write(RESULTS, "w") as handle:
        json.dump(results, handle, indent=2)
    print("| model | dataset | top-1 | target | epochs | s/epoch |")
    print("|---|---|---|---|---|---|")
    for r in results["runs"].values():
        print(
            f"| {r['model']} | {r['dataset']} | {r['test_accuracy']:.2%} | {r['target']:.1%} "
            f"| {r['epochs']} | {r['seconds_per_epoch']:.1f} |"
        )


if __name__ == "__main__":
    main()
