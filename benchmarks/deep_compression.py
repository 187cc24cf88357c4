"""Deep Compression on MNIST / Fashion-MNIST, beside what PyTorch's own tools give, in one run.

For each pipeline: the trained baseline (benchmarks/baselines.py; trained here if missing) is
compressed with the shipped recipe, the .dsq file is loaded back and evaluated, and its real size
on disk gives the ratio. Peer rows, measured in the same run on the same baseline:
torch.nn.utils.prune (global L1, same overall sparsity) + torch.save, the same gzipped, and
+ torch.ao dynamic int8 quantization + gzip. Writes benchmarks/results/deep_compression.json
(runs not asked for keep their earlier entry) and deep_compression.png (ratios and accuracy).

    python benchmarks/deep_compression.py                 # all three pipelines
    python benchmarks/deep_compression.py --only lenet300/mnist
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import ensure_baseline

import deepsqueeze
from deepsqueeze.data import load_dataset
from deepsqueeze.io import atomic_write, load_model
from deepsqueeze.metrics.accuracy import accuracy_and_loss
from deepsqueeze.metrics.size import dense_fp32_bytes

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "deep_compression.json"
PLOT = RESULTS.with_suffix(".png")
OUT = ROOT / "runs" / "deep_compression"

PIPELINES = [
    ("lenet300", "mnist", "recipes/deep-compression-lenet300.yaml"),
    ("lenet5", "mnist", "recipes/deep-compression-lenet5.yaml"),
    ("lenet5", "fashion-mnist", "recipes/deep-compression-lenet5.yaml"),
]
PAPER = {
    "lenet300": {"ratio": 40, "error_before": 1.64, "error_after": 1.58},
    "lenet5": {"ratio": 39, "error_before": 0.80, "error_after": 0.74},
}


def _saved_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def pytorch_peer_rows(model: nn.Module, sparsity: float, accuracy) -> list[dict]:
    """What torch.nn.utils.prune (+ gzip, + dynamic int8) gives for the same model."""
    dense = dense_fp32_bytes(model)
    pruned = load_model_copy(model)
    targets = [(m, "weight") for m in pruned.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    torch_prune.global_unstructured(targets, torch_prune.L1Unstructured, amount=sparsity)
    for module, name in targets:
        torch_prune.remove(module, name)
    raw = _saved_bytes(pruned.state_dict())
    zipped = gzip.compress(raw, 9)
    quantized = torch.ao.quantization.quantize_dynamic(pruned, {nn.Linear}, dtype=torch.qint8)
    q_zipped = gzip.compress(_saved_bytes(quantized.state_dict()), 9)
    acc_pruned = accuracy(pruned)
    acc_q = accuracy(quantized)
    return [
        {
            "method": "torch prune (global L1) + torch.save",
            "bytes": len(raw),
            "ratio": dense / len(raw),
            "accuracy": acc_pruned,
            "fine_tuned": False,
        },
        {
            "method": "torch prune + torch.save + gzip -9",
            "bytes": len(zipped),
            "ratio": dense / len(zipped),
            "accuracy": acc_pruned,
            "fine_tuned": False,
        },
        {
            "method": "torch prune + dynamic int8 + gzip -9",
            "bytes": len(q_zipped),
            "ratio": dense / len(q_zipped),
            "accuracy": acc_q,
            "fine_tuned": False,
        },
    ]


def load_model_copy(model: nn.Module) -> nn.Module:
    clone = deepsqueeze.models.create(
        deepsqueeze.models.spec_of(model).name, **deepsqueeze.models.spec_of(model).kwargs
    )
    clone.load_state_dict(model.state_dict())
    return clone.eval()


def run_pipeline(model_name: str, dataset: str, recipe: str) -> dict:
    baseline_path = ensure_baseline(model_name, dataset)
    test = load_dataset(dataset, "test")
    x_test = test.normalized()

    def accuracy(net: nn.Module) -> float:
        return accuracy_and_loss(net.eval(), x_test, test.labels).accuracy

    baseline = load_model(baseline_path)
    out = OUT / f"{model_name}-{dataset}.dsq"
    t0 = time.perf_counter()
    result = deepsqueeze.compress(baseline, ROOT / recipe, dataset=dataset, out=out)
    seconds = time.perf_counter() - t0
    report = result.file_report
    kept = sum(r.kept for r in report.layers) / sum(r.weights for r in report.layers)
    peers = pytorch_peer_rows(load_model(baseline_path), 1 - kept, accuracy)
    return {
        "model": model_name,
        "dataset": dataset,
        "recipe": recipe,
        "baseline_accuracy": result.baseline_accuracy,
        "file_accuracy": result.file_accuracy,
        "accuracy_drop_points": 100 * (result.baseline_accuracy - result.file_accuracy),
        "file_bytes": report.file_bytes,
        "dense_fp32_bytes": report.dense_bytes,
        "compression": report.compression,
        "pipeline_seconds": seconds,
        "stages": [s.__dict__ for s in result.stages],
        "layers": report.to_dict()["layers"],
        "header_bytes": report.header_bytes,
        "pytorch_peers": peers,
        "paper": PAPER.get(model_name),
    }


def _read_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": {}}


def plot(results: dict, path: Path) -> None:
    """Compression ratio of every pipeline beside the PyTorch peers and the paper, with the
    accuracy of each file over its baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(results["runs"])
    series = {
        "torch prune + save": lambda r: r["pytorch_peers"][0]["ratio"],
        "+ gzip -9": lambda r: r["pytorch_peers"][1]["ratio"],
        "+ dynamic int8 + gzip": lambda r: r["pytorch_peers"][2]["ratio"],
        "paper (Han et al. 2016)": lambda r: (r["paper"] or {}).get("ratio", 0)
        if r["dataset"] == "mnist" else 0,
        "deepsqueeze .dsq": lambda r: r["compression"],
    }
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(series)
    for i, (label, value) in enumerate(series.items()):
        xs = [k + i * width for k in range(len(keys))]
        ys = [value(results["runs"][k]) for k in keys]
        bars = left.bar(xs, ys, width, label=label)
        left.bar_label(bars, fmt="%.0fx", fontsize=7)
    left.set_xticks([k + 0.4 - width / 2 for k in range(len(keys))], keys)
    left.set_ylabel("dense fp32 bytes / file bytes")
    left.set_title("compression (real file size)")
    left.legend(fontsize=8)
    base = [100 * results["runs"][k]["baseline_accuracy"] for k in keys]
    comp = [100 * results["runs"][k]["file_accuracy"] for k in keys]
    xs = range(len(keys))
    right.bar([x - 0.2 for x in xs], base, 0.4, label="dense baseline")
    right.bar([x + 0.2 for x in xs], comp, 0.4, label=".dsq file")
    for x, b, c in zip(xs, base, comp, strict=True):
        right.annotate(f"{c - b:+.2f} pts", (x + 0.2, c), ha="center", va="bottom", fontsize=8)
    right.set_xticks(list(xs), keys)
    right.set_ylim(min(comp + base) - 1.5, 100)
    right.set_ylabel("test top-1 (%)")
    right.set_title("accuracy of the compressed file")
    right.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", help="model/dataset (repeatable)")
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from the JSON")
    args = parser.parse_args()
    for model_name, dataset, recipe in PIPELINES:
        if args.plot_only or (args.only and f"{model_name}/{dataset}" not in args.only):
            continue
        row = run_pipeline(model_name, dataset, recipe)
        results = _read_results()  # re-read: another run may have written meanwhile
        results["runs"][f"{model_name}/{dataset}"] = row
        with atomic_write(RESULTS, "w") as handle:
            json.dump(results, handle, indent=2)
        print(
            f"{model_name}/{dataset}: {row['compression']:.1f}x, accuracy "
            f"{row['baseline_accuracy']:.2%} -> {row['file_accuracy']:.2%} "
            f"in {row['pipeline_seconds']:.0f} s"
        )
    print(
        "\n| pipeline | baseline top-1 | .dsq top-1 | .dsq bytes | ratio | torch prune+gzip | "
        "+ int8 + gzip |"
    )
    print("|---|---|---|---|---|---|---|")
    results = _read_results()
    for key, r in results["runs"].items():
        p = r["pytorch_peers"]
        print(
            f"| {key} | {r['baseline_accuracy']:.2%} | {r['file_accuracy']:.2%} | "
            f"{r['file_bytes']:,} | {r['compression']:.1f}x | {p[1]['ratio']:.1f}x | "
            f"{p[2]['ratio']:.1f}x |"
        )
    if results["runs"]:
        plot(results, PLOT)
        print(f"plot: {PLOT}")


if __name__ == "__main__":
    main()
