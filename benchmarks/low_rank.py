"""Low-rank factorization on MNIST / Fashion-MNIST: truncated SVD, sparse low rank (SLR), Tucker-2.

Parts (each writes its entry of benchmarks/results/low_rank.json; parts not run keep theirs):

- ``lenet5``: lenet5-classic / MNIST, the fully connected layers (fc1-fc3) factorized at several
  energies by plain SVD and by SLR-w, SLR-a, SLR-c (sr = rr = 0.5), scored without and with a
  short fine-tuning (the SLR masks stay on). Compression = dense FC parameters / kept FC
  parameters (factor nonzeros + biases), as in Swaminathan et al. 2020.
- ``lenet300``: lenet300 / MNIST, Deep Compression alone (the shipped recipe) against low-rank
  alone and low-rank + Deep Compression (svd -> prune -> share -> Huffman): .dsq bytes and top-1.
- ``resnet20``: resnet20 (1 channel) / Fashion-MNIST, Tucker-2 and channel SVD of the 3×3
  convolutions: top-1, parameters, MACs, latency against the dense model (batch 1 and 256).
- ``recipe``: recipes/sparse-svd-lenet5-classic.yaml through ``compress``: the file's top-1.
- ``latency``: factorized lenet300 / lenet5-classic files run by the runtime and by PyTorch
  (decoded) against the dense model, interleaved, median of many runs.

The dense models are trained once (short runs) and cached under runs/low_rank/ (gitignored).

    OMP_NUM_THREADS=1 python benchmarks/low_rank.py --part lenet5 --part lenet300
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import deepsqueeze
from deepsqueeze import dsq
from deepsqueeze.data import load_dataset
from deepsqueeze.io import atomic_write, load_model
from deepsqueeze.methods import create_method, select_layers
from deepsqueeze.methods.low_rank import activation_importance, loss_importance
from deepsqueeze.metrics.accuracy import accuracy_and_loss
from deepsqueeze.metrics.macs import macs_per_sample
from deepsqueeze.pipeline.session import bake
from deepsqueeze.runtime import load_runtime
from deepsqueeze.runtime.bench import time_interleaved
from deepsqueeze.training.loop import TrainConfig, fit

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "low_rank.json"
PLOT = RESULTS.with_suffix(".png")
RUNS = ROOT / "runs" / "low_rank"
FC = ["fc1", "fc2", "fc3"]
PAPER = {
    "source": "Swaminathan et al. 2020, Neurocomputing 398, LeNet-5 on MNIST",
    "dense_accuracy": 0.9849,
    "note": "the paper reports SLR above truncated SVD and a pruning baseline at equal "
            "accuracy; its per-point numbers are not reproduced here",
}
BASELINES = {  # model, dataset, epochs, lr, training subset (short runs: a shared CPU)
    "lenet5-classic": ("mnist", 6, 0.02, None),
    "lenet300": ("mnist", 10, 0.1, None),
    "resnet20": ("fashion-mnist", 5, 0.05, None),
    "lenet5": ("mnist", 3, 0.01, None),
}


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def baseline(model: str) -> nn.Module:
    """The dense model trained once and cached under runs/low_rank/."""
    dataset, epochs, lr, subset = BASELINES[model]
    out = RUNS / f"{model}-{dataset}"
    if not (out / "model.pt").exists():
        say(f"training {model} on {dataset} ({epochs} epochs, subset {subset})")
        deepsqueeze.train(model, dataset, out=out, epochs=epochs, lr=lr, seed=0, progress=False,
                          subset=subset)
    return load_model(out / "model.pt").eval()


def write_part(part: str, entry: dict[str, Any]) -> None:
    """Store one part's entry (re-reading the file: parts may run side by side)."""
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[part] = entry
    with atomic_write(RESULTS, "w") as f:
        f.write(json.dumps(results, indent=1) + "\n")


def fc_params(model: nn.Module) -> int:
    """Nonzero weights + biases of the FC layers (factors included)."""
    total = 0
    with torch.no_grad():  # effective weights: masks applied
        for name in FC:
            for mod in model.get_submodule(name).modules():
                if isinstance(mod, nn.Linear):
                    total += int((mod.weight != 0).sum())
                    total += 0 if mod.bias is None else int((mod.bias != 0).sum())
    return total


def params_nonzero(model: nn.Module) -> int:
    return sum(int((p != 0).sum()) for p in model.parameters())


# ------------------------------------------------------------------------------- lenet5 part


def run_lenet5(args: argparse.Namespace) -> dict[str, Any]:
    dense = baseline("lenet5-classic")
    train = load_dataset("mnist", "train")
    test = load_dataset("mnist", "test")
    x_test, y_test = test.normalized(), test.labels

    def accuracy(net: nn.Module) -> float:
        return accuracy_and_loss(net.eval(), x_test, y_test).accuracy

    base_acc = accuracy(dense)
    dense_fc = fc_params(dense)
    say(f"lenet5-classic dense {base_acc:.4f}, FC params {dense_fc}")
    cal = train.subset(args.calibration, seed=0)
    x_cal = cal.normalized()
    layers = {n: dense.get_submodule(n) for n in FC}
    cache = RUNS / f"slr-scores-{args.calibration}-{args.loss_samples}.pt"
    if cache.exists():  # measured by an earlier run on the same cached dense model
        saved = torch.load(cache, weights_only=True)
        scores_a, scores_c, t_a, t_c = (saved["a"], saved["c"], saved["t_a"], saved["t_c"])
    else:
        t0 = time.perf_counter()
        scores_a = activation_importance(dense, layers, x_cal)
        t_a = time.perf_counter() - t0
        small = cal.subset(args.loss_samples, seed=1)
        t0 = time.perf_counter()
        scores_c = loss_importance(dense, layers, small.normalized(), small.labels.long(),
                                   F.cross_entropy)
        t_c = time.perf_counter() - t0
        torch.save({"a": scores_a, "c": scores_c, "t_a": t_a, "t_c": t_c}, cache)
    say(f"importance: activation {t_a:.1f} s, loss {t_c:.1f} s")
    ft = TrainConfig(epochs=args.finetune_epochs, lr=args.finetune_lr, batch_size=128,
                     weight_decay=0.0, device="cpu")
    variants = [("svd", "svd", {}, args.svd_energies)]
    for imp in ("w", "a", "c"):
        for sr, rr in args.slr_rates:
            for refit in args.slr_refits:
                variants.append((f"slr-{imp} sr={sr} rr={rr} refit={refit}", "sparse-svd",
                                 {"sr": sr, "rr": rr, "importance": imp, "refit": refit},
                                 args.slr_energies))
    points: list[dict[str, Any]] = []
    head = {
        "model": "lenet5-classic", "dataset": "mnist", "dense_accuracy": base_acc,
        "dense_fc_params": dense_fc, "calibration_samples": args.calibration,
        "loss_importance_samples": args.loss_samples,
        "importance_seconds": {"activation": t_a, "loss": t_c},
        "finetune": ft.model_dump(include={"epochs", "lr", "batch_size", "weight_decay"}),
        "points": points, "paper": PAPER,
    }
    for label, method_name, extra, energies in variants:
        for energy in energies:
            net = copy.deepcopy(dense)
            method = create_method(method_name, energy=energy, layers=FC, **extra)
            if method_name == "sparse-svd" and extra["importance"] != "w":
                # the scores of the dense model, measured once (the method measures the same)
                method.set_scores(scores_a if extra["importance"] == "a" else scores_c)
            method.apply(net, select_layers(net, FC, method.supported))
            ranks = {n: method.report[n]["rank"] for n in FC}
            kept = fc_params(net)
            acc0 = accuracy(net)
            t0 = time.perf_counter()
            fit(net, train, ft, progress=False)
            ft_s = time.perf_counter() - t0
            bake(net)
            kept_ft = fc_params(net)
            acc1 = accuracy(net)
            point = {"variant": label, "method": method_name, "energy": energy, **extra,
                     "ranks": ranks, "fc_params": kept, "fc_params_after_finetune": kept_ft,
                     "fc_compression": dense_fc / kept, "accuracy": acc0,
                     "accuracy_finetuned": acc1, "finetune_seconds": ft_s}
            points.append(point)
            say(f"{label} e={energy}: ranks {ranks} FC x{dense_fc / kept:.2f} "
                f"acc {acc0:.4f} -> ft {acc1:.4f}")
            write_part("lenet5", {**head, "complete": False})  # partial results survive a stop
    best = {}
    for key in ("accuracy", "accuracy_finetuned"):
        ok = [p for p in points if p[key] >= 0.984]
        if ok:
            b = max(ok, key=lambda p: p["fc_compression"])
            best[key] = {"variant": b["variant"], "energy": b["energy"],
                         "fc_compression": b["fc_compression"], key: b[key]}
    return {**head, "best_at_98_4": best, "complete": True}


# ------------------------------------------------------------------------------- lenet300 part


def lenet300_recipes() -> dict[str, dict[str, Any]]:
    dc = ROOT / "recipes" / "deep-compression-lenet300.yaml"
    out: dict[str, Any] = {"deep-compression": str(dc.relative_to(ROOT))}
    out["svd + deep compression (rank 64/32)"] = {
        "name": "svd-dc-64", "model": "lenet300", "dataset": "mnist", "seed": 0,
        "stages": [
            {"method": "svd", "params": {"rank": {"fc1": 64, "fc2": 32}, "layers": ["fc1", "fc2"]},
             "finetune": {"epochs": 4, "lr": 0.01, "weight_decay": 0.0, "distill": 0.7}},
            {"method": "prune",
             "params": {"sparsity": {"fc1.*": 0.88, "fc2.*": 0.8, "fc3": 0.8},
                        "schedule": {"kind": "polynomial", "initial_sparsity": 0.4,
                                     "begin_step": 0, "end_step": 4690, "frequency": 100}},
             "finetune": {"epochs": 24, "lr": 0.02, "weight_decay": 1e-4, "distill": 0.7}},
            {"method": "share", "params": {"bits": 4, "init": "linear"},
             "finetune": {"epochs": 4, "lr": 0.002, "weight_decay": 0.0, "distill": 0.7}},
        ],
        "encode": {"huffman": True, "index_bits": "auto"},
    }
    out["svd + deep compression (rank 40/24) = svd-lenet300.yaml"] = {
        "name": "svd-dc-40", "model": "lenet300", "dataset": "mnist", "seed": 0,
        "stages": [
            {"method": "svd", "params": {"rank": {"fc1": 40, "fc2": 24}, "layers": ["fc1", "fc2"]},
             "finetune": {"epochs": 4, "lr": 0.01, "weight_decay": 0.0, "distill": 0.7}},
            {"method": "prune",
             "params": {"sparsity": {"fc1.*": 0.8, "fc2.*": 0.7, "fc3": 0.8},
                        "schedule": {"kind": "polynomial", "initial_sparsity": 0.4,
                                     "begin_step": 0, "end_step": 4690, "frequency": 100}},
             "finetune": {"epochs": 24, "lr": 0.02, "weight_decay": 1e-4, "distill": 0.7}},
            {"method": "share", "params": {"bits": 4, "init": "linear"},
             "finetune": {"epochs": 4, "lr": 0.002, "weight_decay": 0.0, "distill": 0.7}},
        ],
        "encode": {"huffman": True, "index_bits": "auto"},
    }
    out["svd alone (energy 0.9)"] = {
        "name": "svd-only", "model": "lenet300", "dataset": "mnist", "seed": 0,
        "stages": [{"method": "svd", "params": {"energy": 0.9},
                    "finetune": {"epochs": 4, "lr": 0.01, "weight_decay": 0.0, "distill": 0.7}}],
    }
    out["svd alone (rank 32/32/10)"] = {
        "name": "svd-only-32", "model": "lenet300", "dataset": "mnist", "seed": 0,
        "stages": [{"method": "svd", "params": {"rank": {"fc1": 32, "fc2": 32, "fc3": 10}},
                    "finetune": {"epochs": 4, "lr": 0.01, "weight_decay": 0.0, "distill": 0.7}}],
        "encode": {"huffman": True},
    }
    return out


def run_lenet300(args: argparse.Namespace) -> dict[str, Any]:
    dense = baseline("lenet300")
    rows = []
    for label, recipe in lenet300_recipes().items():
        if args.only_recipe and label not in args.only_recipe:
            continue
        net = copy.deepcopy(dense)
        t0 = time.perf_counter()
        res = deepsqueeze.compress(net, ROOT / recipe if isinstance(recipe, str) else recipe,
                                   out=RUNS / f"lenet300-{len(rows)}.dsq", progress=False)
        secs = time.perf_counter() - t0
        rep = res.file_report
        rows.append({"pipeline": label, "recipe": recipe,
                     "baseline_accuracy": res.baseline_accuracy,
                     "file_accuracy": res.file_accuracy, "file_bytes": rep.file_bytes,
                     "compression": rep.compression, "seconds": secs,
                     "stages": [{"stage": s.stage, "accuracy": s.test_accuracy}
                                for s in res.stages]})
        say(f"lenet300 {label}: {rep.file_bytes} B x{rep.compression:.1f} "
            f"acc {res.file_accuracy:.4f} ({secs:.0f} s)")
    return {"model": "lenet300", "dataset": "mnist", "rows": rows}


def lenet5_recipes() -> dict[str, Any]:
    """Deep Compression alone against SVD of fc1 (400k of the 431k weights) → prune → share,
    with the same 10-epoch fine-tuning budget."""
    dc = ROOT / "recipes" / "deep-compression-lenet5.yaml"
    out: dict[str, Any] = {"deep-compression": str(dc.relative_to(ROOT))}
    for rank in (32, 20):
        out[f"svd fc1 rank {rank} + deep compression"] = {
            "name": f"svd-dc-lenet5-{rank}", "model": "lenet5", "dataset": "mnist", "seed": 0,
            "stages": [
                {"method": "svd", "params": {"rank": {"fc1": rank}, "layers": ["fc1"]},
                 "finetune": {"epochs": 1, "lr": 0.01, "weight_decay": 0.0,
                              "batch_size": 128}},
                {"method": "prune",
                 "params": {"sparsity": {"conv1": 0.4, "conv2": 0.9, "fc1.*": 0.75,
                                         "fc2": 0.85},
                            "schedule": {"kind": "polynomial", "initial_sparsity": 0.5,
                                         "begin_step": 0, "end_step": 2345,
                                         "frequency": 100}},
                 "finetune": {"epochs": 7, "lr": 0.01, "weight_decay": 1e-4,
                              "batch_size": 128}},
                {"method": "share", "params": {"bits": {"conv*": 6, "fc*": 4},
                                               "init": "linear"},
                 "finetune": {"epochs": 2, "lr": 0.001, "weight_decay": 0.0,
                              "batch_size": 128}},
            ],
            "encode": {"huffman": True, "index_bits": "auto"},
        }
    return out


def run_lenet5_dc(args: argparse.Namespace) -> dict[str, Any]:
    """lenet5 (431k): low rank + Deep Compression against Deep Compression alone."""
    dense = baseline("lenet5")
    rows = []
    for label, recipe in lenet5_recipes().items():
        if args.only_recipe and label not in args.only_recipe:
            continue
        t0 = time.perf_counter()
        res = deepsqueeze.compress(copy.deepcopy(dense),
                                   ROOT / recipe if isinstance(recipe, str) else recipe,
                                   out=RUNS / f"lenet5-dc-{len(rows)}.dsq", progress=False)
        rep = res.file_report
        rows.append({"pipeline": label, "recipe": recipe,
                     "baseline_accuracy": res.baseline_accuracy,
                     "file_accuracy": res.file_accuracy, "file_bytes": rep.file_bytes,
                     "compression": rep.compression, "seconds": time.perf_counter() - t0,
                     "stages": [{"stage": s.stage, "accuracy": s.test_accuracy}
                                for s in res.stages]})
        say(f"lenet5 {label}: {rep.file_bytes} B x{rep.compression:.1f} "
            f"acc {res.file_accuracy:.4f}")
    return {"model": "lenet5", "dataset": "mnist", "rows": rows}


def run_recipe(args: argparse.Namespace) -> dict[str, Any]:
    """The shipped SLR recipe on lenet5-classic through compress: top-1 of the file itself."""
    recipe = ROOT / "recipes" / "sparse-svd-lenet5-classic.yaml"
    dense = baseline("lenet5-classic")
    dense_fc = fc_params(dense)
    t0 = time.perf_counter()
    res = deepsqueeze.compress(copy.deepcopy(dense), recipe, out=RUNS / "slr-lenet5.dsq",
                               progress=False)
    secs = time.perf_counter() - t0
    net = dsq.load(RUNS / "slr-lenet5.dsq")
    kept = fc_params(net)
    rep = res.file_report
    say(f"recipe: FC x{dense_fc / kept:.2f}, file {rep.file_bytes} B, acc {res.file_accuracy}")
    return {"recipe": str(recipe.relative_to(ROOT)), "baseline_accuracy": res.baseline_accuracy,
            "file_accuracy": res.file_accuracy, "fc_params": kept,
            "fc_compression": dense_fc / kept, "file_bytes": rep.file_bytes,
            "compression": rep.compression, "seconds": secs}


# ------------------------------------------------------------------------------- resnet20 part


def _latency(fns: dict[str, Any], x: torch.Tensor, runs: int) -> dict[str, float]:
    with torch.no_grad():
        samples = time_interleaved({k: (lambda f=f: f(x)) for k, f in fns.items()}, runs,
                                   max_seconds=60.0)
    return {k: statistics.median(v) * 1e3 for k, v in samples.items()}


def run_resnet20(args: argparse.Namespace) -> dict[str, Any]:
    dense = baseline("resnet20")
    test = load_dataset("fashion-mnist", "test").subset(2000, seed=0)  # CPU time: a subset
    train = load_dataset("fashion-mnist", "train").subset(10_000, seed=1)
    x_test, y_test = test.normalized(), test.labels
    convs = [n for n, m in dense.named_modules()
             if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.in_channels > 1]
    shape = (1, 28, 28)
    rows = []
    variants: list[tuple[str, str, dict[str, Any]]] = [("dense", "", {})]
    for e in args.conv_energies:
        variants.append((f"tucker energy {e}", "tucker", {"energy": e, "layers": convs}))
        variants.append((f"channel svd energy {e}", "svd", {"energy": e, "layers": convs,
                                                             "skip_unprofitable": True}))
    ft = TrainConfig(epochs=args.resnet_finetune_epochs, lr=0.01, batch_size=128,
                     weight_decay=5e-4, device="cpu")
    x1, x256 = torch.randn(1, *shape), torch.randn(256, *shape)
    for label, method_name, params in variants:
        net = copy.deepcopy(dense)
        acc_ft = None
        if method_name:
            method = create_method(method_name, **params)
            method.apply(net, select_layers(net, convs, method.supported))
        acc = accuracy_and_loss(net.eval(), x_test, y_test).accuracy
        if method_name and args.resnet_finetune_epochs > 0:
            fit(net, train, ft, progress=False)
            acc_ft = accuracy_and_loss(net.eval(), x_test, y_test).accuracy
        net.eval()
        lat = {b: _latency({"dense": dense, "model": net}, x, args.runs)
               for b, x in ((1, x1), (256, x256))}
        rows.append({
            "variant": label, "accuracy": acc, "accuracy_finetuned": acc_ft,
            "parameters": sum(p.numel() for p in net.parameters()),
            "macs": macs_per_sample(net, shape),
            "latency_ms": {str(b): v["model"] for b, v in lat.items()},
            "dense_latency_ms": {str(b): v["dense"] for b, v in lat.items()},
            "speedup": {str(b): v["dense"] / v["model"] for b, v in lat.items()},
        })
        say(f"resnet20 {label}: acc {acc:.4f} ft {acc_ft} params {rows[-1]['parameters']} "
            f"speedup {rows[-1]['speedup']}")
    return {"model": "resnet20", "dataset": "fashion-mnist", "layers": convs,
            "note": "short runs on a shared CPU: dense model trained "
                    f"{BASELINES['resnet20'][1]} epochs on the full training split, top-1 on "
                    "2,000 test images (a stratified subset); "
                    + (f"fine-tuning {args.resnet_finetune_epochs} epoch on the same 10,000"
                       if args.resnet_finetune_epochs > 0 else "no fine-tuning"),
            "finetune_epochs": args.resnet_finetune_epochs, "rows": rows,
            "latency_note": "one interleaved run per batch size, median; torch threads "
                            f"{torch.get_num_threads()}"}


# ------------------------------------------------------------------------------- latency part


def run_latency(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    cases = [
        ("lenet300", "svd", {"rank": {"fc1": 32, "fc2": 32, "fc3": 10}}, (784,)),
        ("lenet5-classic", "svd", {"rank": {"fc1": 16, "fc2": 16, "fc3": 8}, "layers": FC},
         (1, 28, 28)),
        ("lenet5-classic", "sparse-svd", {"energy": 0.8, "sr": 0.5, "rr": 0.5, "layers": FC},
         (1, 28, 28)),
    ]
    for model_name, method_name, params, shape in cases:
        dense = baseline(model_name)
        net = copy.deepcopy(dense)
        method = create_method(method_name, **params)
        method.apply(net, select_layers(net, method.params.layers, method.supported))
        bake(net)
        path = RUNS / f"latency-{model_name}-{method_name}.dsq"
        report = dsq.save(net, path)
        decoded = dsq.load(path).eval()
        for batch in (1, 256):
            runtime = load_runtime(path, batch_size=batch, cache=False)
            x = torch.randn(batch, *shape)
            lat = _latency({"dense": dense, "factorized torch": decoded, "runtime": runtime}, x,
                           args.runs)
            rows.append({"model": model_name, "method": method_name, "params": params,
                         "batch": batch, "file_bytes": report.file_bytes,
                         "median_ms": lat,
                         "speedup_vs_dense": {k: lat["dense"] / v for k, v in lat.items()}})
            say(f"latency {model_name} {method_name} b{batch}: {lat}")
    return {"rows": rows, "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------- plot, main


def plot(results: dict[str, Any]) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    part = results.get("lenet5")
    if not part:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "accuracy", "no fine-tuning"),
                           (axes[1], "accuracy_finetuned", "fine-tuned")):
        variants = sorted({p["variant"] for p in part["points"]})
        for v in variants:
            pts = sorted((p for p in part["points"] if p["variant"] == v),
                         key=lambda p: p["fc_compression"])
            ax.plot([p["fc_compression"] for p in pts], [100 * p[key] for p in pts],
                    marker="o" if v == "svd" else ".", label=v)
        ax.axhline(98.4, color="grey", ls="--", lw=0.8)
        ax.axhline(100 * part["dense_accuracy"], color="black", ls=":", lw=0.8)
        ax.set_xscale("log")
        ax.set_xticks([1, 1.5, 2, 3, 4, 5], ["1", "1.5", "2", "3", "4", "5"])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("compression of the FC layers (parameters)")
        ax.set_title(f"lenet5-classic / MNIST, {title}")
        lows = [100 * p[key] for p in part["points"] if p[key] is not None]
        # one-shot: the wide view; fine-tuned: the points are within a point of each other
        ax.set_ylim(90, 100) if key == "accuracy" else ax.set_ylim(
            max(90.0, min(lows) - 0.2), 100 * part["dense_accuracy"] + 0.2)
    axes[0].set_ylabel("top-1 (%)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


def replot() -> None:
    """Redraw the plot from the committed JSON (``--plot-only``)."""
    plot(json.loads(RESULTS.read_text()))


PARTS = {"lenet5": run_lenet5, "lenet300": run_lenet300, "resnet20": run_resnet20,
         "lenet5-dc": run_lenet5_dc,
         "latency": run_latency, "recipe": run_recipe}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", action="append", choices=sorted(PARTS), required=True)
    parser.add_argument("--svd-energies", type=float, nargs="+",
                        default=[0.5, 0.6, 0.7, 0.8, 0.9])
    parser.add_argument("--slr-energies", type=float, nargs="+",
                        default=[0.8, 0.9, 0.95])
    parser.add_argument("--slr-rates", type=lambda s: tuple(float(v) for v in s.split(",")),
                        nargs="+", default=[(0.5, 0.5), (0.25, 0.5)], help="sr,rr pairs")
    parser.add_argument("--slr-refits", type=int, nargs="+", default=[10],
                        help="sparse-svd refit rounds to compare (0: the paper's plain masking)")
    parser.add_argument("--finetune-epochs", type=float, default=0.5)
    parser.add_argument("--finetune-lr", type=float, default=0.005)
    parser.add_argument("--calibration", type=int, default=1000)
    parser.add_argument("--loss-samples", type=int, default=500)
    parser.add_argument("--conv-energies", type=float, nargs="+", default=[0.9, 0.7])
    parser.add_argument("--resnet-finetune-epochs", type=float, default=0.5)
    parser.add_argument("--only-recipe", action="append")
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    RUNS.mkdir(parents=True, exist_ok=True)
    for part in args.part:
        t0 = time.perf_counter()
        entry = PARTS[part](args)
        results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        if part == "lenet300" and args.only_recipe and part in results:
            keep = [r for r in results[part]["rows"] if r["pipeline"] not in args.only_recipe]
            entry["rows"] = keep + entry["rows"]
        entry["seconds"] = time.perf_counter() - t0
        entry["machine"] = {"python": platform.python_version(), "torch": torch.__version__,
                            "threads": torch.get_num_threads(), "cpu": platform.processor()}
        entry["command"] = " ".join(["python", "benchmarks/low_rank.py", *sys.argv[1:]])
        write_part(part, entry)
    plot(json.loads(RESULTS.read_text()))


if __name__ == "__main__":
    main()
