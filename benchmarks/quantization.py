"""Quantization on MNIST / Fashion-MNIST: fp32, fp16, int8 PTQ, int8 QAT, int4 QAT in one run.

For each model: the trained fp32 baseline (``runs/quantization/<model>-<dataset>/model.pt``,
trained here with a short schedule if missing) is saved as a .dsq file in fp32 and in fp16
(``encode: {dense_dtype: float16}``), and compressed through :func:`deepsqueeze.compress` with
post-training int8 (``quantize``, 16 calibration batches, percentile 99.99) and with
quantization-aware fine-tuning (``qat``, 8 and 4 bits, ``--qat-epochs`` epochs). Each file is
loaded back and scored on the test split (top-1), and its bytes on disk counted. Speed: every
variant runs in three backends -- our runtime (:func:`deepsqueeze.runtime.load_runtime`, tuned
at the batch size), onnxruntime (the file exported to ONNX; ``--int8`` QDQ for the quantized
ones) and PyTorch (the file decoded densely) -- all timed interleaved in one run per batch size
(every round calls each once, order rotating), medians; ratios are against fp32 in PyTorch
(and, per backend, against fp32 in that backend).

    python benchmarks/quantization.py --only lenet300/mnist --only lenet5/mnist
    python benchmarks/quantization.py --only resnet20/fashion-mnist --qat-epochs 0.5 \\
        --subset 6000 --runs 5

The seed's pipeline (``--pipeline resnet20/fashion-mnist``): the recipe's polynomial-decay
pruning (its schedule scaled to ``--prune-epochs`` on ``--subset`` samples), then int8 PTQ, then
our entropy coding; top-1 and bytes after each step.

Writes benchmarks/results/quantization.json (models not run keep their entry) and
quantization.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import deepsqueeze
from deepsqueeze.data import load_dataset
from deepsqueeze.io import atomic_write, load_model
from deepsqueeze.metrics.accuracy import accuracy_and_loss
from deepsqueeze.runtime import load_runtime
from deepsqueeze.runtime.bench import time_interleaved
from deepsqueeze.runtime.onnx_export import export_onnx, onnx_session

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "quantization.json"
PLOT = RESULTS.with_suffix(".png")
RUNS = ROOT / "runs" / "quantization"

MODELS = {  # model/dataset -> epochs of the short fp32 baseline trained when missing
    "lenet300/mnist": 6,
    "lenet5/mnist": 2,
    "resnet20/fashion-mnist": 5,
}
VARIANTS = ("fp32", "fp16", "int8-ptq", "int8-qat", "int4-qat")
BACKENDS = ("runtime", "onnxruntime", "pytorch")
CALIBRATION = {"batches": 16, "batch_size": 64, "method": "percentile", "percentile": 99.99}
REDUCE_RANGE = {"reduce_range": True}
"""int8 inputs in 0..127, what the runtime's int8-onednn executor (PyTorch's x86 int8 kernels)
needs to be exact on a CPU without VNNI; ``--no-reduce-range`` for 8-bit inputs."""


def baseline(model: str, dataset: str) -> Path:
    path = RUNS / f"{model}-{dataset}" / "model.pt"
    if not path.exists():
        deepsqueeze.train(model, dataset, out=path.parent, epochs=MODELS[f"{model}/{dataset}"],
                          seed=0)
    return path


def top1(model: torch.nn.Module, dataset: str) -> float:
    test = load_dataset(dataset, "test")
    return accuracy_and_loss(model, test.normalized(), test.labels).accuracy


def make_files(model: str, dataset: str, qat_epochs: float, out: Path,
               subset: int | None, variants: tuple[str, ...] = VARIANTS) -> dict[str, Any]:
    """The five files of one model: path, bytes, top-1 of the file, seconds to make."""
    out.mkdir(parents=True, exist_ok=True)
    base = baseline(model, dataset)
    rows: dict[str, Any] = {}
    for variant, dtype in (("fp32", "float32"), ("fp16", "float16")):
        t0 = time.perf_counter()
        path = out / f"{variant}.dsq"
        deepsqueeze.save(load_model(base), path,
                         encode={"dense_dtype": dtype, "codebook_dtype": dtype})
        rows[variant] = {"path": path, "seconds": time.perf_counter() - t0,
                         "top1": top1(deepsqueeze.load(path), dataset)}
    stages = {
        "int8-ptq": {"method": "quantize",
                     "params": {"bits": 8, **REDUCE_RANGE,
                                "calibration": {"dataset": dataset, **CALIBRATION}}},
        "int8-qat": {"method": "qat", "params": {
            "bits": 8, **REDUCE_RANGE, "calibration": {"dataset": dataset, **CALIBRATION}},
            "finetune": {"epochs": qat_epochs, "lr": 0.002, "weight_decay": 0.0,
                         "lr_schedule": "cosine"}},
        "int4-qat": {"method": "qat", "params": {
            "bits": 4, **REDUCE_RANGE, "calibration": {"dataset": dataset, **CALIBRATION}},
            "finetune": {"epochs": qat_epochs, "lr": 0.002, "weight_decay": 0.0,
                         "lr_schedule": "cosine"}},
    }
    for variant, stage in stages.items():
        if variant not in variants:
            continue
        t0 = time.perf_counter()
        path = out / f"{variant}.dsq"
        recipe = {"name": variant, "model": model, "dataset": dataset, "stages": [stage]}
        result = deepsqueeze.compress(load_model(base), recipe, dataset=dataset, out=path,
                                      progress=False, subset=subset)
        rows[variant] = {"path": path, "seconds": time.perf_counter() - t0,
                         "top1": result.file_accuracy}
    for row in rows.values():
        row["bytes"] = row["path"].stat().st_size
    return rows


def speed(files: dict[str, Any], dataset: str, batch: int, runs: int) -> dict[str, Any]:
    """Median seconds of every variant x backend at ``batch``, timed interleaved."""
    shape = load_dataset(dataset, "test").input_shape
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    fns: dict[str, Any] = {}
    for variant, row in files.items():
        path = row["path"]
        quantized = variant.startswith("int")
        rt = load_runtime(path, batch_size=batch, cache=False)
        dense = deepsqueeze.load(path).eval()
        sess = onnx_session(export_onnx(path, int8=quantized), torch.get_num_threads())

        def run_rt(m: Any = rt) -> None:
            with torch.inference_mode():
                m(x)

        def run_pt(m: Any = dense) -> None:
            with torch.inference_mode():
                m(x)

        fns[f"{variant}/runtime"] = run_rt
        fns[f"{variant}/onnxruntime"] = lambda s=sess: s.run(None, {"input": x.numpy()})
        fns[f"{variant}/pytorch"] = run_pt
    samples = time_interleaved(fns, runs, warmup=2, max_seconds=240)
    med = {k: statistics.median(v) for k, v in samples.items()}
    base = med["fp32/pytorch"]
    out: dict[str, Any] = {}
    for key, sec in med.items():
        variant, backend = key.split("/")
        out.setdefault(variant, {})[backend] = {
            "median_ms": sec * 1e3,
            "throughput": batch / sec,
            "speedup_vs_fp32_pytorch": base / sec,
            "speedup_vs_fp32_same_backend": med[f"fp32/{backend}"] / sec,
            "runs": len(samples[key]),
        }
    return out


def _baseline_facts(model: str, dataset: str) -> dict[str, Any]:
    """Epochs and training subset of the baseline run (from its metrics.jsonl / run.json)."""
    run = RUNS / f"{model}-{dataset}"
    facts: dict[str, Any] = {}
    metrics = run / "metrics.jsonl"
    if metrics.exists():
        last = json.loads(metrics.read_text().strip().splitlines()[-1])
        facts["baseline_epochs"] = last.get("epoch")
        facts["baseline_test_accuracy_at_training"] = last.get("test_accuracy")
    info = run / "run.json"
    if info.exists():
        facts["baseline_train_subset"] = json.loads(info.read_text()).get("subset")
    return facts


def run_model(key: str, qat_epochs: float, runs: int, subset: int | None,
              variants: tuple[str, ...] = VARIANTS) -> dict[str, Any]:
    model, dataset = key.split("/")
    out = RUNS / f"{model}-{dataset}-files"
    t0 = time.perf_counter()
    files = make_files(model, dataset, qat_epochs, out, subset, variants)
    made = time.perf_counter() - t0
    fp32 = files["fp32"]
    entry: dict[str, Any] = {
        "model": model, "dataset": dataset,
        **_baseline_facts(model, dataset),
        "qat_epochs": qat_epochs if any("qat" in v for v in variants) else None,
        "qat_train_subset": subset if any("qat" in v for v in variants) else None,
        "seconds_to_make_files": round(made, 1),
        "variants": {
            v: {"top1": r["top1"], "bytes": r["bytes"],
                "ratio_vs_fp32_file": fp32["bytes"] / r["bytes"],
                "top1_drop_points": 100 * (fp32["top1"] - r["top1"])}
            for v, r in files.items()
        },
    }
    for batch, n in ((1, runs * 4), (256, runs)):
        entry[f"speed_batch{batch}"] = speed(files, dataset, batch, n)
    return entry


PIPELINES = {  # the seed's pipeline: model/dataset -> recipe
    "resnet20/fashion-mnist": "recipes/resnet20-prune-int8.yaml",
    "resnet44/fashion-mnist": "recipes/resnet44-prune-int8.yaml",
}


class _SavePruned:
    """compress callback: saves the model after the pruning stage (its own .dsq)."""

    def __init__(self, path: Path, fresh: torch.nn.Module) -> None:
        self.path = path
        self.fresh = fresh  # a plain copy of the architecture to fill
        self.bytes: int | None = None

    def on_stage_end(self, index: int, record: Any, model: torch.nn.Module) -> None:
        if index != 0:
            return
        # the effective (masked) values, read through the parametrizations; a deepcopy of a
        # parametrized model shares its parametrized classes, so baking a copy would break it
        with torch.no_grad():
            for key, tensor in self.fresh.state_dict(keep_vars=True).items():
                owner, _, attr = key.rpartition(".")
                tensor.copy_(getattr(model.get_submodule(owner) if owner else model, attr))
        deepsqueeze.save(self.fresh, self.path)
        self.bytes = self.path.stat().st_size


def run_pipeline(key: str, subset: int | None, prune_epochs: float,
                 sparsity: float | None = None) -> dict[str, Any]:
    """Prune (polynomial decay) -> int8 -> our entropy coding: accuracy and bytes per step."""
    import yaml

    from deepsqueeze.metrics.size import dense_fp32_bytes

    model, dataset = key.split("/")
    recipe = yaml.safe_load((ROOT / PIPELINES[key]).read_text())
    stage = recipe["stages"][0]
    stage["finetune"]["epochs"] = prune_epochs
    if sparsity is not None:
        stage["params"]["sparsity"] = sparsity
    recipe["stages"][1]["params"].update(REDUCE_RANGE)
    samples = subset or len(load_dataset(dataset, "train"))
    steps = int(prune_epochs * samples / stage["finetune"]["batch_size"])
    end = max(2, int(0.6 * steps))  # the last 40 % of the steps recover at the final sparsity
    stage["params"]["schedule"].update(end_step=end, frequency=max(1, end // 8))
    out = RUNS / f"{model}-{dataset}-pipeline-{stage['params']['sparsity']:g}"
    out.mkdir(parents=True, exist_ok=True)
    base = baseline(model, dataset)
    fp32 = load_model(base)
    saver = _SavePruned(out / "pruned.dsq", load_model(base))
    t0 = time.perf_counter()
    result = deepsqueeze.compress(load_model(base), recipe, dataset=dataset,
                                  out=out / "pruned-int8.dsq", progress=False, subset=subset,
                                  callbacks=[saver])
    final = deepsqueeze.load(out / "pruned-int8.dsq")
    from deepsqueeze.methods.quantize import quantized_layers

    qweights = sum(m.weight.numel() for m in quantized_layers(final).values())
    other = sum(t.numel() for n, t in final.state_dict().items()
                if not n.endswith(".weight") or n.rsplit(".", 1)[0] not in
                quantized_layers(final))
    dense = dense_fp32_bytes(fp32)
    file_bytes = (out / "pruned-int8.dsq").stat().st_size
    steps_out = [
        {"step": "fp32", "top1": result.baseline_accuracy, "bytes": dense},
        {"step": f"pruned {stage['params']['sparsity']:.0%} (our sparse encoding)",
         "top1": result.stages[0].test_accuracy, "bytes": saver.bytes},
        {"step": "int8, 1 byte per weight + fp32 rest (no entropy coding)",
         "top1": result.stages[1].test_accuracy, "bytes": qweights + 4 * other},
        {"step": "int8 + sparse positions + Huffman (the .dsq file)",
         "top1": result.file_accuracy, "bytes": file_bytes},
    ]
    for row in steps_out:
        row["ratio_vs_fp32"] = dense / row["bytes"] if row["bytes"] else None
    return {"model": model, "dataset": dataset, "recipe": PIPELINES[key],
            "sparsity": stage["params"]["sparsity"], "int8_params": recipe["stages"][1]["params"],
            "prune_epochs": prune_epochs, "train_subset": subset,
            "schedule": stage["params"]["schedule"], **_baseline_facts(model, dataset),
            "seconds": round(time.perf_counter() - t0, 1), "steps": steps_out,
            "seed_reference": "TFLite pruning 60-70 % + int8: about 1.8x smaller files"}


def _merge_write(update: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Re-read the results file, set the entries of ``update`` and write it back (atomically):
    several runs of this script (a model here, a pipeline there) may share the file."""
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for section, entries in update.items():
        results.setdefault(section, {}).update(entries)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(RESULTS, "w") as fh:
        json.dump(results, fh, indent=1)
    return results


def plot(results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(results.get("models", {}))
    if not keys:
        return
    fig, axes = plt.subplots(len(keys), 3, figsize=(13, 3.2 * len(keys)), squeeze=False)
    for row, key in enumerate(keys):
        e = results["models"][key]
        vs = list(e["variants"])
        axes[row][0].bar(vs, [e["variants"][v]["ratio_vs_fp32_file"] for v in vs])
        axes[row][0].set_title(f"{key}: file size ratio vs fp32")
        axes[row][1].bar(vs, [100 * e["variants"][v]["top1"] for v in vs])
        lo = min(100 * e["variants"][v]["top1"] for v in vs)
        axes[row][1].set_ylim(lo - 1, 100)
        axes[row][1].set_title("top-1 (%) of the file")
        width = 0.27
        for i, b in enumerate(BACKENDS):
            vals = [e["speed_batch256"][v][b]["speedup_vs_fp32_pytorch"] for v in vs
                    if v in e["speed_batch256"]]
            axes[row][2].bar([j + (i - 1) * width for j in range(len(vs))], vals, width,
                             label=b)
        axes[row][2].set_xticks(range(len(vs)), vs)
        axes[row][2].axhline(1.0, color="k", lw=0.5)
        axes[row][2].set_title("batch 256 throughput vs fp32 PyTorch")
        axes[row][2].legend(fontsize=7)
        for ax in axes[row]:
            ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", help="model/dataset (repeatable)")
    parser.add_argument("--qat-epochs", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=10, help="timed rounds at batch 256 "
                        "(4x at batch 1)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--subset", type=int, default=None,
                        help="QAT fine-tunes on this many training samples (default: all)")
    parser.add_argument("--pipeline", action="append", choices=list(PIPELINES),
                        help="run the seed's prune -> int8 -> entropy coding pipeline instead")
    parser.add_argument("--prune-epochs", type=float, default=2.0)
    parser.add_argument("--sparsity", type=float, action="append",
                        help="pipeline sparsity (repeatable; default: the recipe's)")
    parser.add_argument("--no-reduce-range", action="store_true",
                        help="8-bit int8 inputs (0..255) instead of 7-bit")
    parser.add_argument("--variants", action="append", choices=[v for v in VARIANTS
                                                                if v not in ("fp32", "fp16")],
                        help="quantized variants to make (repeatable; default all; fp32 and "
                             "fp16 always)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.no_reduce_range:
        REDUCE_RANGE.clear()
    # subnormals flushed to zero for every backend alike (this thread's FTZ/DAZ flags, which
    # onnxruntime and PyTorch both compute under): without it, onnxruntime's int8 graphs ran 1.5
    # to 9.6 ms at batch 256 on LeNet-300-100 depending on which values turned subnormal
    torch.set_flush_denormal(True)
    if args.pipeline:
        for key, sparsity in [(k, sp) for k in args.pipeline for sp in args.sparsity or [None]]:
            entry = run_pipeline(key, args.subset, args.prune_epochs, sparsity)
            entry["threads"] = args.threads
            _merge_write({"pipelines": {f"{key}@{entry['sparsity']:g}": entry}})
            print(json.dumps(entry, indent=1))
        return
    chosen = [k for k in MODELS if not args.only or k in args.only]
    unknown = [k for k in args.only or [] if k not in MODELS]
    if unknown:
        sys.exit(f"unknown --only {unknown}; known: {list(MODELS)}")
    results: dict[str, Any] = {}
    for key in chosen:
        t0 = time.perf_counter()
        entry = run_model(key, args.qat_epochs, args.runs, args.subset,
                          tuple(args.variants or VARIANTS))
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        entry["threads"] = args.threads
        entry["machine"] = {"cpu": platform.processor() or platform.machine(),
                            "torch": torch.__version__}
        results = _merge_write({"models": {key: entry}})
        print(json.dumps({k: v for k, v in entry.items() if k != "speed_batch1"}, indent=1)[:3000])
    if results:
        plot(results)


if __name__ == "__main__":
    main()
