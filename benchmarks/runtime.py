"""Run compressed models fast: the runtime vs dense PyTorch vs onnxruntime, in one run.

For the Deep-Compressed LeNet-300-100 and LeNet-5 (MNIST) and two ResNet-20s (Fashion-MNIST,
``--models resnet20,resnet20-channels``: magnitude-pruned 70 % and channel-pruned), at batch 1,
32 and 256: latency
(median, p95) and throughput of dense fp32 PyTorch, the deepsqueeze runtime
(``load_runtime``, autotuned per batch size) and onnxruntime on the exported dense model, timed
interleaved so the ratios come from one run; peak RSS of each backend in a fresh process; the
weights held in memory vs the file; the autotuner's per-layer choice (for ResNet-20 also
Winograd F(2x2,3x3) / F(4x4,3x3) against im2col on each 3x3 layer); and the test accuracy of
the runtime model next to the dense decoding of the same file. Writes
benchmarks/results/runtime.json and prints a markdown table.

The .dsq files: ``--lenet300-dsq`` / ``--lenet5-dsq``, else runs/deep_compression/<model>-mnist.dsq
(from benchmarks/deep_compression.py), else they are compressed here from the baselines with the
shipped recipes (slow: the recipes fine-tune for several epochs; ``--baseline-epochs`` and
``--finetune-scale`` shorten both, same sparsities and codebooks, recorded in the results).
The ResNet-20 files (``--resnet20-dsq`` / ``--resnet20-channels-dsq``, else made here under
runs/conv/) come from the trained ResNet-20 ``--resnet20-dense`` (default
runs/quantization/resnet20-fashion-mnist/model.pt, from benchmarks/quantization.py) with
recipes/runtime-resnet20-pruned70.yaml and recipes/runtime-resnet20-channels.yaml, fine-tuned
on 10,000 training images.

Targets (issue 15): the compressed LeNet-5 at least 1.5x faster than dense PyTorch and faster
than onnxruntime's dense model at every batch size, with 1 and with 2 threads.

    python benchmarks/runtime.py --threads 1
    python benchmarks/runtime.py --threads 2 --out benchmarks/results/runtime-2threads.json
    python benchmarks/runtime.py --models resnet20,resnet20-channels --batch 1,256 \
        --threads 1 --out benchmarks/results/runtime-resnet20.json
    python benchmarks/runtime.py --lenet300-dsq a.dsq --lenet5-dsq b.dsq --runs 200
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import yaml
from baselines import baseline_path, ensure_baseline

import deepsqueeze
from deepsqueeze.data import load_dataset
from deepsqueeze.dsq import load
from deepsqueeze.io import atomic_write
from deepsqueeze.metrics.accuracy import accuracy_and_loss
from deepsqueeze.runtime import load_runtime
from deepsqueeze.runtime.bench import bench

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "runtime.json"
DSQ_DIR = ROOT / "runs" / "deep_compression"
MODELS = {"lenet300": "recipes/deep-compression-lenet300.yaml",
          "lenet5": "recipes/deep-compression-lenet5.yaml"}
# batch-1 speed targets of the issue: runtime median latency vs dense PyTorch
TARGETS = {"lenet300": 2.0, "lenet5": 1.0, "resnet20": 1.0, "resnet20-channels": 1.0}
# issue 15: at every batch size, vs dense PyTorch (ratio) and faster than onnxruntime
ALL_BATCH_TARGETS = {"lenet5": 1.5}
RESNET_DENSE = ROOT / "runs" / "quantization" / "resnet20-fashion-mnist" / "model.pt"
RESNET_RECIPES = {"resnet20": "recipes/runtime-resnet20-pruned70.yaml",
                  "resnet20-channels": "recipes/runtime-resnet20-channels.yaml"}
RESNET_SUBSET = 10000  # fine-tuning samples of the ResNet-20 files
DATASETS = {"lenet300": "mnist", "lenet5": "mnist", "resnet20": "fashion-mnist",
            "resnet20-channels": "fashion-mnist"}


def dsq_file(model: str, given: Path | None, baseline_epochs: float | None = None,
             finetune_scale: float = 1.0, subset: int | None = None,
             resnet_dense: Path = RESNET_DENSE) -> tuple[Path, dict[str, Any]]:
    """The compressed file of ``model``: given, found, or made now; and how it was made."""
    if given is not None:
        return given, {"given": True}
    if model in RESNET_RECIPES:
        return resnet20_file(model, resnet_dense)
    path = DSQ_DIR / f"{model}-mnist.dsq"
    how: dict[str, Any] = {"recipe": MODELS[model]}
    run_json = baseline_path(model, "mnist").parent / "run.json"
    if run_json.exists():  # the baseline's training options (epochs...)
        how["baseline_config"] = json.loads(run_json.read_text()).get("config")
    if not path.exists():
        print(f"compressing {model} with {MODELS[model]} (no {path} yet)", flush=True)
        recipe: Any = ROOT / MODELS[model]
        if finetune_scale != 1.0 or subset:
            recipe = yaml.safe_load(recipe.read_text())
            steps_per_epoch = (subset or 55000) // 128
            for stage in recipe["stages"]:
                ft = stage.get("finetune") or {}
                if "epochs" in ft:
                    ft["epochs"] = max(1, round(ft["epochs"] * finetune_scale))
                schedule = (stage.get("params") or {}).get("schedule")
                if schedule and "end_step" in schedule:  # the ramp ends within the fine-tuning
                    end = min(schedule["end_step"], ft.get("epochs", 1) * steps_per_epoch * 4 // 5)
                    schedule["end_step"] = end
                    schedule["frequency"] = max(1, min(schedule.get("frequency", 100), end // 10))
        baseline = baseline_path(model, "mnist")
        if not baseline.exists() and baseline_epochs is not None:
            deepsqueeze.train(model, "mnist", out=baseline.parent, epochs=baseline_epochs,
                              seed=0, progress=False)
        deepsqueeze.compress(ensure_baseline(model, "mnist"), recipe, out=path, progress=False,
                             subset=subset)
        how.update(made_here=True, baseline_epochs=baseline_epochs,
                   finetune_scale=finetune_scale, finetune_subset=subset)
    return path, how


def resnet20_file(model: str, dense: Path) -> tuple[Path, dict[str, Any]]:
    """runs/conv/<recipe stem>.dsq: the trained ResNet-20 compressed with the model's recipe
    (made once; see the module doc)."""
    recipe = ROOT / RESNET_RECIPES[model]
    path = ROOT / "runs" / "conv" / f"{recipe.stem}.dsq"
    how: dict[str, Any] = {"recipe": RESNET_RECIPES[model], "dense": str(dense),
                           "finetune_subset": RESNET_SUBSET}
    if not path.exists():
        if not dense.exists():
            sys.exit(f"no trained ResNet-20 at {dense}: run benchmarks/quantization.py (or "
                     "deepsqueeze train --model resnet20 --dataset fashion-mnist --epochs 5 "
                     "and pass --resnet20-dense)")
        print(f"compressing {dense} with {recipe.name} into {path}", flush=True)
        deepsqueeze.compress(dense, recipe, out=path, progress=False, subset=RESNET_SUBSET)
    return path, how


def winograd_vs_im2col(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Per 3x3 layer and batch: the autotuner's timings of Winograd and im2col (us)."""
    rows = []
    for batch, info in entry.get("runtime", {}).items():
        for layer in info.get("layers", []):
            times = layer.get("time_us") or {}
            if "im2col" not in times or not any(k.startswith("winograd") for k in times):
                continue
            row = {"batch": int(batch), "layer": layer["layer"],
                   "input_shape": layer.get("input_shape"), "im2col_us": times["im2col"],
                   "chosen": layer.get("impl")}
            for k in ("winograd2", "winograd4"):
                if k in times:
                    row[f"{k}_us"] = times[k]
                    row[f"{k}_vs_im2col"] = times["im2col"] / times[k]
            rows.append(row)
    return rows


def _repo_relative(value: Any) -> Any:
    """``value`` with paths inside the repository written relative to it (committed results
    hold no absolute paths of the machine that produced them)."""
    if isinstance(value, dict):
        return {k: _repo_relative(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_repo_relative(v) for v in value]
    if isinstance(value, str) and value.startswith(f"{ROOT}/"):
        return value[len(str(ROOT)) + 1:]
    return value


def accuracies(path: Path, batch: int, dataset: str = "mnist") -> dict[str, float]:
    """Test accuracy of the dense decoding and of the runtime model of ``path``."""
    data = load_dataset(dataset, "test")
    x, y = data.normalized(), data.labels
    dense = accuracy_and_loss(load(path), x, y, batch).accuracy
    runtime = accuracy_and_loss(load_runtime(path, batch_size=batch), x, y, batch).accuracy
    return {"dense_decoded": dense, "runtime": runtime, "eval_batch": batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lenet300-dsq", type=Path)
    parser.add_argument("--lenet5-dsq", type=Path)
    parser.add_argument("--resnet20-dsq", type=Path)
    parser.add_argument("--resnet20-channels-dsq", type=Path)
    parser.add_argument("--resnet20-dense", type=Path, default=RESNET_DENSE,
                        help="trained ResNet-20 the two ResNet-20 files are made from")
    parser.add_argument("--models", default="lenet300,lenet5",
                        help="comma-separated: lenet300, lenet5, resnet20, resnet20-channels")
    parser.add_argument("--baseline-epochs", type=float, default=None,
                        help="epochs of a baseline trained here (default: the recommended)")
    parser.add_argument("--finetune-scale", type=float, default=1.0,
                        help="scale the recipes' fine-tuning epochs when a file is made here")
    parser.add_argument("--finetune-subset", type=int, default=None,
                        help="fine-tune on this many training samples when a file is made here")
    parser.add_argument("--batch", default="1,32,256")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch/onnxruntime threads (default: torch's)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict = {"command": " ".join(sys.argv), "models": {},
                     "note": "shared machine: 2 cores, other agents' jobs running alongside "
                             "(see load_average); ratios come from one interleaved run"}
    given = {"lenet300": args.lenet300_dsq, "lenet5": args.lenet5_dsq,
             "resnet20": args.resnet20_dsq, "resnet20-channels": args.resnet20_channels_dsq}
    for model in args.models.split(","):
        if model not in given:
            parser.error(f"unknown model {model!r}; known: {', '.join(given)}")
        path, how = dsq_file(model, given[model], args.baseline_epochs, args.finetune_scale,
                             args.finetune_subset, args.resnet20_dense)
        t0 = time.perf_counter()
        load_before = os.getloadavg()
        report = bench(path, batches, runs=args.runs, threads=args.threads,
                       memory=not args.no_memory,
                       progress=lambda msg, m=model: print(f"[{m}] {msg}", flush=True))
        entry = report.to_dict()
        entry["seconds"] = time.perf_counter() - t0
        entry["load_average"] = {"before": load_before, "after": os.getloadavg()}
        entry["file"] = how
        entry["accuracy"] = accuracies(path, max(batches), DATASETS[model])
        if model in RESNET_RECIPES:
            entry["winograd_vs_im2col"] = winograd_vs_im2col(entry)
        b1 = report.timing("runtime", 1)
        entry["targets"] = {
            "batch1_speedup_vs_dense": b1.speedup_vs_dense if b1 else None,
            "batch1_target": TARGETS[model],
            "batch1_met": bool(b1 and b1.speedup_vs_dense >= TARGETS[model]),
            "runtime_weights_vs_file": report.weights_bytes["runtime"] / report.file_bytes,
            "memory_met": report.weights_bytes["runtime"] <= 2 * report.file_bytes,
        }
        if model in ALL_BATCH_TARGETS:
            per_batch = {}
            for b in batches:
                rt, ort = report.timing("runtime", b), report.timing("onnxruntime", b)
                per_batch[str(b)] = {
                    "speedup_vs_dense": rt.speedup_vs_dense if rt else None,
                    "speedup_vs_onnxruntime": (ort.median_ms / rt.median_ms
                                               if rt and ort else None),
                    "met": bool(rt and rt.speedup_vs_dense >= ALL_BATCH_TARGETS[model]
                                and (ort is None or rt.median_ms < ort.median_ms)),
                }
            entry["targets"]["every_batch"] = {"vs_dense": ALL_BATCH_TARGETS[model],
                                               "faster_than_onnxruntime": True,
                                               "per_batch": per_batch,
                                               "met": all(v["met"] for v in per_batch.values())}
        results["models"][model] = entry
        results["machine"] = {"cpu": report.cpu, "threads": report.threads,
                              "torch": report.torch_version,
                              "onnxruntime": report.onnxruntime_version,
                              "python": report.python}
    with atomic_write(args.out, "w") as handle:
        json.dump(_repo_relative(results), handle, indent=2)

    print(f"\nthreads: {results['machine']['threads']}, cpu: {results['machine']['cpu']}")
    print("| model | batch | dense ms (p95) | runtime ms (p95) | onnxruntime ms (p95) "
          "| runtime vs dense | ort vs dense |")
    print("|---|---|---|---|---|---|---|")
    for model, entry in results["models"].items():
        rows = {(t["backend"], t["batch"]): t for t in entry["timings"]}
        for b in batches:
            cells = []
            for backend in ("dense", "runtime", "onnxruntime"):
                t = rows.get((backend, b))
                cells.append(f"{t['median_ms']:.3f} ({t['p95_ms']:.3f})" if t else "-")
            ratios = [f"{rows[(n, b)]['speedup_vs_dense']:.2f}x" if (n, b) in rows else "-"
                      for n in ("runtime", "onnxruntime")]
            print(f"| {model} | {b} | {' | '.join(cells)} | {' | '.join(ratios)} |")
    print("\n| model | file B | runtime weights B (x file) | dense weights B | peak RSS MiB "
          "dense / runtime / ort (batch 1) | accuracy dense / runtime |")
    print("|---|---|---|---|---|---|")
    for model, entry in results["models"].items():
        rss = {m["backend"]: m["peak_kib"] / 1024 for m in entry["memory"] if m["batch"] == 1}
        acc = entry.get("accuracy", {"dense_decoded": float("nan"), "runtime": float("nan")})
        w = entry["weights_bytes"]
        peaks = " / ".join(f"{rss[b]:.0f}" if b in rss else "-"
                           for b in ("dense", "runtime", "onnxruntime"))
        print(f"| {model} | {entry['file_bytes']:,} | {w['runtime']:,} "
              f"({w['runtime'] / entry['file_bytes']:.2f}x) | {w['dense']:,} | {peaks} | "
              f"{acc['dense_decoded']:.2%} / {acc['runtime']:.2%} |")
    print("\nautotuner choices (layer: executor):")
    for model, entry in results["models"].items():
        for b, info in entry["runtime"].items():
            choice = ", ".join(f"{c['layer']}: {c['impl']}"
                               + (f" [{c['fused_into']}]" if c["fused_into"] else "")
                               for c in info["layers"])
            print(f"  {model} batch {b}: {choice}")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
