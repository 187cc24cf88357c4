"""HashedNets (Chen et al., ICML 2015) on MNIST: 3-layer (784-1000-10) and 5-layer
(784-1000-1000-1000-10) nets at 1/8 and 1/64.

Rows, all trained here from scratch with the same optimizer, epochs and data, at the same
number of real weights (``factor`` × the 794,000 weights of 784-1000-10; biases not counted,
as in the paper):

- NN: an equal-size dense net (784-h-10, h = round(factor·1000)).
- RER: random edge removal (a fixed random mask keeping ``factor`` of each layer's weights).
- LRD: low-rank factors ``W = U V`` per layer, rank matched to the budget, trained from scratch
  (our own plain baseline, not Denil et al.'s; the low-rank family was not in the tree).
- HashNet: the zoo's ``hashed-mlp`` (every layer a HashedLinear at ``factor``).
- HashNet_DK: the same, trained with knowledge distillation from the dense 784-1000-10 net
  (loss 0.3·CE + 0.7·T²·KL at T = 4).

The HashNet rows are also saved as .dsq and reloaded (file bytes and the file's accuracy).
55,000 training images (5,000 carved out as validation, reported, nothing selected on them),
the 10,000 test images report. Writes benchmarks/results/hashednets.json.

    python benchmarks/hashednets.py --epochs 10
    python benchmarks/hashednets.py --layers 5 --epochs 1 --train-images 20000   # 5-layer
    python benchmarks/hashednets.py --recipe [--baseline model.pt]   # recipes/hashed-lenet300
    python benchmarks/hashednets.py --runtime    # executors of a hashed 1000x784 layer

``--recipe`` runs the shipped recipe on a trained lenet300 (benchmarks/baselines.py's, or
``--baseline``), then loads the file in the runtime (every executor of every compressed layer
checked against the dense decoding) and writes benchmarks/results/hashednets_recipe.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deepsqueeze import dsq, models
from deepsqueeze.data.dataset import load_dataset
from deepsqueeze.io import atomic_write

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "hashednets.json"
RECIPE = ROOT / "recipes" / "hashed-lenet300.yaml"
IN, HID, OUT = 784, 1000, 10
VIRTUAL = IN * HID + HID * OUT

PAPER = {
    "source": "the authors' code README (HashedNets Lua/Torch release, main.lua): 'test error "
              "around 1.5%' for the standard 784-1000-10 net and 'around 1.5% with 1/8 "
              "compression' for HashedNets",
    "readme_test_error_percent": {"NN (full size)": 1.5, "HashNet 1/8": 1.5},
    "table_1_and_2": "not found: the paper's Table 1/2 values were not in the searchable corpus "
                     "(only its abstract and the code README were); no paper row is quoted",
}


def mnist() -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_val, y_val, x_test, y_test): normalized float tensors."""
    def prep(ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x = ds.images.float().div_(255).sub_(0.1307).div_(0.3081).flatten(1)
        return x, ds.labels

    xt, yt = prep(load_dataset("mnist", "train"))
    xs, ys = prep(load_dataset("mnist", "test"))
    perm = torch.randperm(len(yt), generator=torch.Generator().manual_seed(0))
    val, train = perm[:5000], perm[5000:]
    return xt[train], yt[train], xt[val], yt[val], xs, ys


class MaskedLinear(nn.Linear):
    """Linear with a fixed random mask keeping ``keep`` of the weights (RER)."""

    def __init__(self, a: int, b: int, keep: float, seed: int) -> None:
        super().__init__(a, b)
        g = torch.Generator().manual_seed(seed)
        mask = torch.zeros(b * a)
        mask[torch.randperm(b * a, generator=g)[: max(1, round(keep * a * b))]] = 1
        self.register_buffer("mask", mask.view(b, a))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


def low_rank(a: int, b: int, factor: float) -> nn.Module:
    r = max(1, round(factor * a * b / (a + b)))
    return nn.Sequential(nn.Linear(a, r, bias=False), nn.Linear(r, b))


def deep(layers: list[nn.Module]) -> nn.Module:
    """Flatten, then ``layers`` with a ReLU between consecutive ones."""
    mods: list[nn.Module] = [nn.Flatten()]
    for k, layer in enumerate(layers):
        mods += [layer] + ([nn.ReLU()] if k < len(layers) - 1 else [])
    return nn.Sequential(*mods)


def equal_width(sizes: list[int], budget: float) -> int:
    """Hidden width ``h`` of an ``IN-h-...-h-OUT`` net (as many hidden layers as ``sizes``)
    whose weight count is closest to ``budget``."""
    depth = len(sizes) - 2
    best = min(range(1, 4097), key=lambda h: abs(IN * h + (depth - 1) * h * h + h * OUT - budget))
    return best


def real_weights(model: nn.Module) -> int:
    total = 0
    for mod in model.modules():
        if isinstance(mod, MaskedLinear):
            total += int(mod.mask.sum())
        elif isinstance(mod, nn.Linear):
            total += mod.weight.numel()
        elif hasattr(mod, "weight_buckets"):
            total += mod.weight_buckets.numel()
    return total


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x[i:i + 2000]).argmax(1) == y[i:i + 2000]).sum())
                      for i in range(0, len(y), 2000))
    return correct / len(y)


def train(model: nn.Module, data: tuple[torch.Tensor, ...], epochs: int, seed: int,
          teacher: nn.Module | None = None) -> float:
    """SGD (Nesterov 0.9, lr 0.05 cosine, batch 128, gradient norm clipped at 5); seconds."""
    x, y = data[0], data[1]
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    steps = epochs * math.ceil(len(y) / 128)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + epoch))
        for i in range(0, len(y), 128):
            idx = order[i:i + 128]
            out = model(x[idx])
            loss = F.cross_entropy(out, y[idx])
            if teacher is not None:
                with torch.no_grad():
                    soft = F.log_softmax(teacher(x[idx]) / 4.0, 1)
                kd = F.kl_div(F.log_softmax(out / 4.0, 1), soft, log_target=True,
                              reduction="batchmean")
                loss = 0.3 * loss + 0.7 * 16.0 * kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
    return time.perf_counter() - t0


def row(name: str, factor: float | None, model: nn.Module, data: tuple[torch.Tensor, ...],
        seconds: float, file_info: dict[str, Any] | None = None) -> dict[str, Any]:
    r = {
        "method": name,
        "factor": factor,
        "real_weights": real_weights(model),
        "test_error_percent": round(100 * (1 - accuracy(model, data[4], data[5])), 2),
        "val_error_percent": round(100 * (1 - accuracy(model, data[2], data[3])), 2),
        "train_seconds": round(seconds, 1),
    }
    if file_info:
        r.update(file_info)
    print(json.dumps(r), flush=True)
    return r


def file_round_trip(model: nn.Module, data: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "hashed.dsq"
        dsq.save(model, path)
        loaded = dsq.load(path)
        return {"file_bytes": path.stat().st_size,
                "file_test_error_percent":
                    round(100 * (1 - accuracy(loaded, data[4], data[5])), 2)}


def run_recipe(recipe: Path, baseline: Path | None, out: Path,
               label: str | None = None) -> dict[str, Any]:
    """Compress a trained lenet300 with ``recipe``; runtime executors checked; JSON to ``out``."""
    import deepsqueeze
    from deepsqueeze.runtime import load_runtime, runtime_info

    if baseline is None:
        import sys

        sys.path.insert(0, str(ROOT / "benchmarks"))
        from baselines import ensure_baseline

        baseline = ensure_baseline("lenet300", "mnist")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.dsq"
        result = deepsqueeze.compress(baseline, recipe, out=path, progress=False)
        seconds = time.perf_counter() - t0
        dense = dsq.load(path)
        x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        layers = runtime_info(load_runtime(path, autotune=False)).layers
        executors = {}
        for c in layers:
            for impl in c.held_bytes:
                rt = load_runtime(path, autotune=False, impls={c.layer: impl})
                with torch.inference_mode():
                    err = float((rt(x) - dense(x)).abs().max())
                executors[f"{c.layer}:{impl}"] = {"max_abs_diff_vs_dense_decoding": err,
                                                  "held_bytes": c.held_bytes[impl]}
        tuned = runtime_info(load_runtime(path, autotune=True, cache=False))
    report = result.file_report.to_dict()
    record = {
        "recipe": label or str(recipe.relative_to(ROOT)),
        "baseline": baseline.name,
        "baseline_accuracy": result.baseline_accuracy,
        "file_accuracy": result.file_accuracy,
        "file_bytes": report.get("file_bytes"),
        "compression": report.get("compression"),
        "stage_accuracy": {s.stage: s.test_accuracy for s in result.stages},
        "runtime_executors": executors,
        "autotuned": {"held_bytes": tuned.held_bytes, "file_bytes": tuned.file_bytes,
                      "choice": {c.layer: c.impl for c in tuned.layers}},
        "threads": torch.get_num_threads(),
        "seconds": round(seconds, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "w") as fh:
        json.dump(record, fh, indent=2)
    print(json.dumps({k: v for k, v in record.items() if k != "runtime_executors"}, indent=1))
    return record


def runtime_timing(rounds: int) -> dict[str, Any]:
    """Each executor of a hashed 1000 × 784 layer at 1/8 and 1/64, batch 1 and 64: calls
    interleaved, median per-call time, held bytes; ratios against ``dense``."""
    from deepsqueeze.models.hashed import HashedLinear
    from deepsqueeze.runtime.executors.hashed import HashedForm
    from deepsqueeze.runtime.layers import IMPLS

    rows = []
    for factor in (1 / 8, 1 / 64):
        k = round(HID * IN * factor)
        g = torch.Generator().manual_seed(k)
        form = HashedForm(HID, IN, torch.randn(k, generator=g) * 0.03, 12345)
        bias = torch.randn(HID, generator=g)
        module = HashedLinear(IN, HID, k, 12345, device="meta")
        execs = {i.name: i.build(form, bias, module).eval() for i in IMPLS[HashedLinear]
                 if i.accepts(form, module) or i.name == "tiles"}  # tiles: the no-C path
        for batch in (1, 64):
            x = torch.randn(batch, IN, generator=g)
            times: dict[str, list[float]] = {n: [] for n in execs}
            with torch.inference_mode():
                ref = execs["dense"](x)
                for ex in execs.values():
                    torch.testing.assert_close(ex(x), ref, atol=1e-4, rtol=1e-4)
                for _ in range(rounds):
                    for name, ex in execs.items():
                        t0 = time.perf_counter()
                        ex(x)
                        times[name].append((time.perf_counter() - t0) * 1e6)
            med = {n: sorted(t)[len(t) // 2] for n, t in times.items()}
            row = {"layer": f"{HID}x{IN}", "factor": factor, "buckets": k, "batch": batch,
                   "median_us": {n: round(v, 1) for n, v in med.items()},
                   "time_vs_dense": {n: round(v / med["dense"], 2) for n, v in med.items()},
                   "held_bytes": {n: ex.held_bytes() for n, ex in execs.items()}}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return {"rounds": rounds, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "torch": torch.__version__, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", action="store_true", help="run recipes/hashed-lenet300.yaml")
    ap.add_argument("--baseline", type=Path, default=None, help="trained lenet300 model.pt")
    ap.add_argument("--runtime", action="store_true", help="time the hashed executors")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--factors", type=float, nargs="+", default=[1 / 8, 1 / 64])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--layers", type=int, choices=(3, 5), default=3,
                    help="3: 784-1000-10; 5: 784-1000-1000-1000-10 (added to --out as "
                         "'layers_5', the 3-layer rows kept)")
    ap.add_argument("--train-images", type=int, default=0,
                    help="train on the first N of the 55,000 training images (0: all)")
    args = ap.parse_args()
    if args.runtime:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        with atomic_write(RESULTS.with_name("hashednets_runtime.json"), "w") as fh:
            json.dump(runtime_timing(101), fh, indent=2)
        return
    if args.recipe:
        run_recipe(RECIPE, args.baseline, RESULTS.with_name("hashednets_recipe.json"))
        return
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    data = mnist()
    if args.train_images:
        data = (data[0][: args.train_images], data[1][: args.train_images], *data[2:])
    e, s = args.epochs, args.seed
    hidden = [HID] * (args.layers - 2)
    sizes = [IN, *hidden, OUT]
    virtual = sum(a * b for a, b in itertools.pairwise(sizes))
    arch = "-".join(map(str, sizes))
    rows = []
    t_start = time.perf_counter()
    torch.manual_seed(s)
    teacher = deep([nn.Linear(a, b) for a, b in itertools.pairwise(sizes)])
    rows.append(row(f"NN full size ({arch}, DK teacher)", 1.0, teacher, data,
                    train(teacher, data, e, s)))
    teacher.eval().requires_grad_(False)
    for factor in args.factors:
        h = equal_width(sizes, factor * virtual)
        small = [IN, *[h] * len(hidden), OUT]
        pairs = list(itertools.pairwise(sizes))
        torch.manual_seed(s)
        nn_small = deep([nn.Linear(a, b) for a, b in itertools.pairwise(small)])
        rows.append(row(f"NN ({'-'.join(map(str, small))})", factor, nn_small, data,
                        train(nn_small, data, e, s)))
        torch.manual_seed(s)
        rer = deep([MaskedLinear(a, b, factor, s + k) for k, (a, b) in enumerate(pairs)])
        rows.append(row("RER", factor, rer, data, train(rer, data, e, s)))
        torch.manual_seed(s)
        lrd = deep([low_rank(a, b, factor) for a, b in pairs])
        rows.append(row("LRD", factor, lrd, data, train(lrd, data, e, s)))
        plain: torch.Tensor | None = None
        for name, teach in (("HashNet", None), ("HashNet_DK", teacher)):
            torch.manual_seed(s)
            hashed = models.create("hashed-mlp", hidden=hidden, factor=factor, seed=s + 1)
            secs = train(hashed, data, e, s, teacher=teach)
            info = file_round_trip(hashed, data)
            with torch.no_grad():
                pred = hashed.eval()(data[4]).argmax(1)
            if plain is None:
                plain = pred
            else:  # distillation changes the trained net, not only its error count
                info["test_predictions_differing_from_HashNet"] = int((pred != plain).sum())
            rows.append(row(name, factor, hashed, data, secs, info))
    setting = {"network": f"{arch} ({args.layers} layers)", "epochs": e, "batch_size": 128,
               "optimizer": "SGD nesterov 0.9, lr 0.05 cosine, no weight decay, "
                            "grad-norm clip 5",
               "train_images": len(data[1]), "val_images": len(data[3]),
               "test_images": len(data[5]), "seed": s,
               "threads": torch.get_num_threads(), "machine": platform.machine(),
               "torch": torch.__version__,
               "seconds": round(time.perf_counter() - t_start, 1)}
    if args.layers == 3:
        result = {"setting": setting, "paper": PAPER, "rows": rows}
    else:  # kept beside the 3-layer run (top-level "setting"/"rows") in the same file
        result = json.loads(args.out.read_text()) if args.out.exists() else {}
        result[f"layers_{args.layers}"] = {"setting": setting, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print("| method | factor | real weights | test error % |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['factor']:.4g} | {r['real_weights']:,} | "
              f"{r['test_error_percent']:.2f} |")


if __name__ == "__main__":
    main()
