"""Pareto grid of every installed method on a trained model: accuracy against file bytes and
runtime latency. Writes benchmarks/results/pareto-<name>.json and docs/pareto-<name>.png.

The dense model is a ``deepsqueeze train --subset N --seed 0`` run (trained on the training
part only); the grid is scored on the validation split the planner uses (the samples that
subset leaves out), never on the test split.

    python benchmarks/pareto.py runs/lenet300/model.pt --name lenet300 --epochs 1 \
        --finetune-samples 5000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from deepsqueeze.analysis.pareto import pareto
from deepsqueeze.analysis.split import load_splits
from deepsqueeze.io import atomic_write, load_model
from deepsqueeze.pipeline.session import spec_or_none

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="a trained model.pt")
    ap.add_argument("--name", required=True, help="result name (pareto-<name>.json/png)")
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--val-size", type=int, default=5000)
    ap.add_argument("--epochs", type=float, default=0.0, help="fine-tuning per grid point")
    ap.add_argument("--finetune-samples", type=int, default=None)
    ap.add_argument("--methods", default=None, help="comma separated (default: all installed)")
    ap.add_argument("--replot", action="store_true",
                    help="only redraw the PNG from the committed JSON")
    args = ap.parse_args()
    if args.replot:
        from deepsqueeze.analysis.pareto import ParetoResult

        saved = json.loads((ROOT / "benchmarks" / "results" / f"pareto-{args.name}.json")
                           .read_text())
        ParetoResult.from_dict(saved).plot(ROOT / "docs" / f"pareto-{args.name}.png")
        return
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    model = load_model(args.model)
    fit, val, _ = load_splits(args.dataset, args.val_size)
    if args.finetune_samples is not None and args.finetune_samples < len(fit):
        fit = fit.subset(args.finetune_samples, seed=0)
    spec = spec_or_none(model)
    res = pareto(model, val, fit_data=fit if args.epochs > 0 else None,
                 methods=args.methods.split(",") if args.methods else None,
                 finetune_epochs=args.epochs, model_name=spec.name if spec else args.name,
                 dataset=args.dataset, progress=print)
    png = ROOT / "docs" / f"pareto-{args.name}.png"
    res.plot(png)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    data = {
        **res.to_dict(),
        "finetune_samples": len(fit) if args.epochs > 0 else 0,
        "plot": str(png.relative_to(ROOT)),
        "environment": {"torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                        "python": platform.python_version(), "commit": commit,
                        "load_average_at_start": load_before,
                        "wall_seconds": time.perf_counter() - t0},
    }
    out = ROOT / "benchmarks" / "results" / f"pareto-{args.name}.json"
    with atomic_write(out, "w") as handle:
        json.dump(data, handle, indent=2)
    front = [p for p in res.points if p.on_bytes_front]
    print(f"{len(res.points)} points in {res.seconds:.0f} s; bytes frontier: "
          + ", ".join(f"{p.label} ({p.file_bytes:,} B, {p.val_accuracy:.2%})" for p in front))
    print(f"written {out.relative_to(ROOT)} and {png.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
