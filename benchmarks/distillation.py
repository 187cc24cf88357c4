"""Ablation: the shipped LeNet-300-100 Deep Compression recipe with and without distillation.

Same baseline, same recipe and seed; the only change is ``distill: 0`` in both fine-tuning
stages. Writes benchmarks/results/distillation.json.

    python benchmarks/distillation.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import ensure_baseline

import deepsqueeze
from deepsqueeze.io import atomic_write
from deepsqueeze.pipeline import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "deep-compression-lenet300.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "distillation.json"
OUT = ROOT / "runs" / "distillation"


def main() -> None:
    baseline = ensure_baseline("lenet300", "mnist")
    shipped = load_recipe(RECIPE)
    plain = shipped.model_copy(deep=True)
    for stage in plain.stages:
        if stage.finetune is not None:
            stage.finetune.distill = 0.0
    rows = []
    for label, recipe in (("distilled (shipped)", shipped), ("no distillation", plain)):
        t0 = time.perf_counter()
        result = deepsqueeze.compress(baseline, recipe, out=OUT / f"{label.split()[0]}.dsq")
        rows.append({
            "variant": label,
            "distill": [s.finetune.distill if s.finetune else None for s in recipe.stages],
            "baseline_accuracy": result.baseline_accuracy,
            "file_accuracy": result.file_accuracy,
            "accuracy_change_points": 100 * (result.file_accuracy - result.baseline_accuracy),
            "file_bytes": result.file_report.file_bytes,
            "compression": result.file_report.compression,
            "stage_accuracy": {s.stage: s.test_accuracy for s in result.stages},
            "seconds": time.perf_counter() - t0,
        })
    with atomic_write(RESULTS, "w") as handle:
        json.dump({"recipe": str(RECIPE.relative_to(ROOT)), "runs": rows}, handle, indent=2)
    print("| variant | top-1 (baseline) | change (points) | bytes | ratio |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['file_accuracy']:.2%} ({r['baseline_accuracy']:.2%}) | "
              f"{r['accuracy_change_points']:+.2f} | {r['file_bytes']:,} | "
              f"{r['compression']:.1f}x |")


if __name__ == "__main__":
    main()
