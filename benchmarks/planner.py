"""The planner's must-show run: a trained dense model and only a target (ratio, max drop).

``plan`` sweeps every installed method per layer on the validation split, picks per-layer
options by a knapsack over real encoded bytes, fine-tunes the recipe on the training part,
checks the file (bytes on disk, validation accuracy; test accuracy reported only) and iterates.
Writes benchmarks/results/planner-<name>.json, recipes/plan-<name>.yaml (the recipe it found)
and the run folder (gitignored) with model.dsq, plan.json, sensitivity and a report.

    deepsqueeze train --model lenet5 --dataset mnist --out runs/lenet5 --epochs 3 \
        --subset 55000 --seed 0
    python benchmarks/planner.py runs/lenet5/model.pt --name lenet5 --target-ratio 100 \
        --max-drop 0.3
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

from deepsqueeze.analysis.planner import Finetune, TargetUnreachable, plan
from deepsqueeze.analysis.sensitivity import SensitivityResult
from deepsqueeze.analysis.split import load_splits
from deepsqueeze.io import atomic_write, load_model
from deepsqueeze.pipeline.session import spec_or_none

ROOT = Path(__file__).resolve().parents[1]


def _shown(path: Path) -> str:
    """A path as results record it: relative to the repository, else its name only (no
    machine paths in committed results)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return path.name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="a trained model.pt (train --subset N --seed 0)")
    ap.add_argument("--name", required=True)
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--target-ratio", type=float, default=None,
                    help="default 100 unless --target-latency is given")
    ap.add_argument("--target-latency", type=float, default=None,
                    help="milliseconds in the runtime at --latency-batch")
    ap.add_argument("--latency-batch", type=int, default=1)
    ap.add_argument("--max-drop", type=float, default=0.3)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--val-size", type=int, default=5000)
    ap.add_argument("--sensitivity-samples", type=int, default=None)
    ap.add_argument("--finetune-samples", type=int, default=None)
    ap.add_argument("--reuse-sensitivity", type=Path, default=None,
                    help="sensitivity.json of an earlier plan of the same model and split")
    ap.add_argument("--methods", default=None)
    ap.add_argument("--report", action="store_true", help="also write report.md/html")
    args = ap.parse_args()
    if args.target_ratio is None and args.target_latency is None:
        args.target_ratio = 100.0
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    out = ROOT / "runs" / f"plan-{args.name}"
    model = load_model(args.model)
    fit, val, test = load_splits(args.dataset, args.val_size)
    spec = spec_or_none(model)
    record: dict = {"command": {k: (_shown(v) if isinstance(v, Path) else v)
                                for k, v in vars(args).items()}}
    try:
        res = plan(model, fit, val, out, target_ratio=args.target_ratio,
                   target_latency_ms=args.target_latency, latency_batch=args.latency_batch,
                   max_drop=args.max_drop, test_data=test,
                   methods=args.methods.split(",") if args.methods else None,
                   finetune=Finetune(epochs=args.epochs), rounds=args.rounds,
                   model_name=spec.name if spec else args.name, dataset=args.dataset,
                   sensitivity_samples=args.sensitivity_samples,
                   finetune_samples=args.finetune_samples, progress=print,
                   sensitivity=None if args.reuse_sensitivity is None else
                   SensitivityResult.from_dict(json.loads(args.reuse_sensitivity.read_text())))
        record.update(res.to_dict())
        if res.best_round is not None:
            best = res.best_round
            head = (f"# Found by benchmarks/planner.py (deepsqueeze plan) for {args.name}: "
                    f"{best.compression:.1f}x ({best.file_bytes:,} B), validation drop "
                    f"{best.val_drop_points:+.2f} points, round {best.round}; target "
                    f"{'reached' if res.reached else 'NOT reached'}.\n"
                    f"# Numbers: benchmarks/results/planner-{args.name}.json\n")
            (ROOT / "recipes" / f"plan-{args.name}.yaml").write_text(
                head + (out / "recipe.yaml").read_text())
    except TargetUnreachable as exc:
        record.update({"reached": False, "message": str(exc)})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    record["environment"] = {
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "commit": commit,
        "load_average_at_start": load_before, "wall_seconds": time.perf_counter() - t0,
        "run_folder": str(out.relative_to(ROOT)),
    }
    result = ROOT / "benchmarks" / "results" / f"planner-{args.name}.json"
    with atomic_write(result, "w") as handle:
        json.dump(record, handle, indent=2)
    print(record.get("message"))
    print(f"written {result.relative_to(ROOT)}")
    if args.report and (out / "model.dsq").is_file():
        from deepsqueeze.analysis.report import build_report

        build_report(out, progress=print)


if __name__ == "__main__":
    main()
