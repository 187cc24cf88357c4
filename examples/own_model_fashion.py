"""Your own CNN on Fashion-MNIST, end to end, the way a PyTorch user already works.

1. A model class of your own (BatchNorm, Dropout, a ``features`` and a ``head``), trained with a
   plain PyTorch loop on a plain ``DataLoader``.
2. Compressed through the API with *your* DataLoader and *your* loss:
   ``deepsqueeze.compress(model, recipe, train_data=loader, eval_data=..., loss_fn=...)``
   (prune → fine-tune → weight sharing → fine-tune → Huffman-coded file).
3. The ``.dsq`` file loaded in fresh processes three ways — into your class (skeleton), without
   your class (the architecture rebuilt from the file's declarative graph), and as the
   compressed-form runtime — all giving the same predictions.

Run::

    export DEEPSQUEEZE_DATA=/path/to/data      # holding fashion-mnist/ (or it is downloaded)
    python examples/own_model_fashion.py            # 20,000 training images, 3 epochs
    python examples/own_model_fashion.py --quick    # a subset, seconds (what the test runs)

The full run writes its numbers to ``benchmarks/results/own_model_fashion.json``.
See docs/own-models.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import deepsqueeze
from deepsqueeze.data import load_dataset

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "own_model_fashion.json"


class FashionCNN(nn.Module):
    """A small CNN of the user's own: not in deepsqueeze's model zoo."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.25), nn.Linear(2 * width * 7 * 7, 128), nn.ReLU(),
            nn.Linear(128, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def fashion_tensors(split: str, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST as float tensors in [0, 1] (what a torchvision ToTensor gives)."""
    data = load_dataset("fashion-mnist", split)
    if n is not None:
        data = data.subset(n, seed=0)
    return data.images.float() / 255.0, data.labels


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train(model: nn.Module, loader: DataLoader, epochs: int, loss_fn: nn.Module) -> None:
    """A plain PyTorch training loop: nothing from deepsqueeze."""
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * len(loader))
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for x, y in loader:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(y)
        print(f"  epoch {epoch + 1}/{epochs}: train loss {total / len(loader.dataset):.4f}")


def recipe(quick: bool) -> dict:
    """Prune (per-layer sparsities, the first conv gently) → fine-tune → 5-bit weight sharing →
    fine-tune the centroids → Huffman-coded sparse file."""
    tune = 0.25 if quick else 1.0
    return {
        "name": "own-fashion-cnn",
        "seed": 0,
        "stages": [
            {"name": "prune", "method": "prune",
             "params": {"sparsity": {"features.0": 0.5, "features.4": 0.8, "head.2": 0.95,
                                     "head.4": 0.8}},
             "finetune": {"epochs": tune, "lr": 1e-3, "optimizer": "adam", "weight_decay": 0.0}},
            {"name": "share", "method": "share", "params": {"bits": 5},
             "finetune": {"epochs": tune / 2, "lr": 1e-4, "optimizer": "adam",
                          "weight_decay": 0.0}},
        ],
        "encode": {"huffman": True, "index_bits": "auto"},
    }


# --- the fresh-process loads: run as `python own_model_fashion.py --predict MODE FILE X OUT` ---

CLASS_FREE = """
import sys, numpy as np, torch, deepsqueeze
path, xs, out = sys.argv[1:4]
x = torch.from_numpy(np.load(xs))
assert "FashionCNN" not in repr(sys.modules.get("__main__"))
dense = deepsqueeze.load(path)                      # no class: rebuilt from the file's graph
runtime = deepsqueeze.load(path, mode="runtime")    # no class: the compressed-form runtime
with torch.no_grad():
    np.savez(out, classfree=dense(x).numpy(), runtime=runtime(x).numpy())
print(type(dense).__name__, type(runtime).__name__)
"""


def predict_skeleton(path: str, xs: str, out: str) -> None:
    """In a fresh process that has the user's class: fill its skeleton from the file."""
    model = deepsqueeze.load(path, model=FashionCNN())
    x = torch.from_numpy(np.load(xs))
    with torch.no_grad():
        np.save(out, model(x).numpy())


def fresh_loads(path: Path, x: torch.Tensor, workdir: Path) -> dict[str, np.ndarray]:
    """The three loads, each in a new Python process."""
    xs = workdir / "x.npy"
    np.save(xs, x.numpy())
    env_cmd = [sys.executable]
    skeleton_out = workdir / "skeleton.npy"
    subprocess.run([*env_cmd, __file__, "--predict", str(path), str(xs), str(skeleton_out)],
                   check=True)
    other = workdir / "other.npz"
    subprocess.run([*env_cmd, "-c", CLASS_FREE, str(path), str(xs), str(other)], check=True)
    both = np.load(other)
    return {"skeleton": np.load(skeleton_out), "class-free": both["classfree"],
            "runtime": both["runtime"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small subset, seconds")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 3)")
    parser.add_argument("--train-samples", type=int, default=20000,
                        help="training images (a class-stratified subset; 60000 is all)")
    parser.add_argument("--out", type=Path, default=None, help="the .dsq file to write")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here "
                        "(default: benchmarks/results/own_model_fashion.json for a full run)")
    parser.add_argument("--predict", nargs=3, metavar=("FILE", "X", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.predict:
        predict_skeleton(*args.predict)
        return
    torch.manual_seed(0)
    t_start = time.perf_counter()
    n_train, n_test = (1000, 300) if args.quick else (args.train_samples, None)
    if n_train is not None and n_train >= 60000:
        n_train = None
    epochs = args.epochs or (1 if args.quick else 3)
    x_train, y_train = fashion_tensors("train", n_train)
    x_test, y_test = fashion_tensors("test", n_test)
    train_loader = DataLoader(TensorDataset(x_train, y_train), batch_size=128, shuffle=True)
    test_loader = DataLoader(TensorDataset(x_test, y_test), batch_size=1000)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)  # the user's loss, used for fine-tuning

    model = FashionCNN()
    dense_parameters = sum(p.numel() for p in model.parameters())  # before compression
    print(f"training FashionCNN ({dense_parameters:,} parameters) "
          f"on {len(x_train):,} Fashion-MNIST images, {epochs} epochs")
    t0 = time.perf_counter()
    train(model, train_loader, epochs, loss_fn)
    train_s = time.perf_counter() - t0
    dense_acc = accuracy(model, x_test, y_test)
    print(f"dense accuracy {dense_acc:.2%} ({train_s:.0f} s)")

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        out = args.out or workdir / "fashion_cnn.dsq"
        t0 = time.perf_counter()
        result = deepsqueeze.compress(
            model, recipe(args.quick), train_data=train_loader, eval_data=test_loader,
            loss_fn=loss_fn, example_inputs=x_test[:1], out=out, progress=False,
        )
        compress_s = time.perf_counter() - t0
        report = result.file_report
        print(f"{out.name}: {report.file_bytes:,} bytes, {report.compression:.1f}x smaller than "
              f"dense fp32, accuracy of the file {result.file_accuracy:.2%} "
              f"({compress_s:.0f} s)")

        x_check = x_test[:256]
        outputs = fresh_loads(out, x_check, workdir)
        preds = {name: logits.argmax(1) for name, logits in outputs.items()}
        same = all(np.array_equal(preds["skeleton"], p) for p in preds.values())
        exact = np.array_equal(outputs["skeleton"], outputs["class-free"])
        runtime_diff = float(np.abs(outputs["skeleton"] - outputs["runtime"]).max())
        print(f"fresh processes: skeleton, class-free and runtime predictions "
              f"{'identical' if same else 'DIFFER'} on {len(x_check)} images; class-free logits "
              f"{'bit-exact' if exact else 'differ'}; runtime max |diff| {runtime_diff:.2e}")
        if not (same and exact and runtime_diff < 1e-3):
            raise SystemExit("the three loads disagree")

    numbers = {
        "benchmark": "own_model_fashion",
        "quick": args.quick,
        "model": "FashionCNN (examples/own_model_fashion.py)",
        "dataset": "fashion-mnist",
        "train_samples": len(x_train),
        "test_samples": len(x_test),
        "train_epochs": epochs,
        "dense_parameters": dense_parameters,
        "dense_accuracy": dense_acc,
        "baseline_accuracy": result.baseline_accuracy,
        "stages": [{"stage": s.stage, "accuracy": s.test_accuracy,
                    "finetune_epochs": s.finetune_epochs} for s in result.stages],
        "file_bytes": report.file_bytes,
        "dense_fp32_bytes": report.dense_bytes,
        "compression": report.compression,
        "file_accuracy": result.file_accuracy,
        "three_loads_same_predictions": same,
        "classfree_bit_exact": exact,
        "runtime_max_abs_diff": runtime_diff,
        "train_seconds": round(train_s, 1),
        "compress_seconds": round(compress_s, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "torch_threads": torch.get_num_threads(),
    }
    target = args.json or (None if args.quick else RESULT)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(numbers, indent=2) + "\n")
        print(f"numbers written to {target}")


if __name__ == "__main__":
    main()
