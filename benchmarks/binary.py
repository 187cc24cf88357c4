"""Binary networks on MNIST and the packed binary kernel's speed (issue 13).

Accuracy (``--part accuracy``): the BNN MLP (``bnn-mlp``) and the binary LeNet-5
(``binary-lenet5``), each with binary weights only (BinaryConnect: real activations) and with
binary weights + activations (BNN), trained from scratch here, saved as .dsq files and scored
*from the file* on the MNIST test set: error, file bytes, compression against fp32, beside the
papers' figures. The MLP's width and the epochs are options: the paper's 4096-wide MLP (37M
latent parameters, hundreds of epochs) is beyond this 2-core machine; what ran is recorded.

Speed (``--part speed``): one 4096 x 4096 binary layer and the whole BNN MLP (784-4096-4096-4096-
10, BatchNorm, binary activations) at batch 1 and 256, at 1 and 2 threads: the packed C kernel
(XNOR/popcount for binary inputs, sign-select for real inputs) against dense fp32 PyTorch and
onnxruntime on the same sizes, all timed interleaved in one run (round-robin rounds, medians).

    python benchmarks/binary.py --part all --out benchmarks/results/binary.json
"""

from __future__ import annotations

import argparse
import fcntl
import io
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from deepsqueeze import dsq
from deepsqueeze.evaluation import evaluate
from deepsqueeze.models.binary import BinaryLinear, BinaryMLP, fold_batchnorm, sign
from deepsqueeze.runtime import kernel as K
from deepsqueeze.runtime import load_runtime, runtime_info
from deepsqueeze.runtime.executors.binary import binary_product, pack_signs
from deepsqueeze.training.run import train

REPO = Path(__file__).resolve().parents[1]

PAPERS = {
    "bnn-mlp/binary-activations": {
        "error_pct": 0.96, "source": "Hubara, Courbariaux et al. 2016 (BNN), Theano MLP "
        "3x4096, binary weights and activations, 1000 epochs"},
    "bnn-mlp/weights-only": {
        "error_pct": 1.29, "source": "Courbariaux et al. 2015 (BinaryConnect, deterministic), "
        "MLP 3x1024, permutation-invariant MNIST (1.18 stochastic)"},
    "binary-lenet5/weights-only": {
        "error_pct": None, "source": "no published binary LeNet-5 figure; the dense Caffe "
        "LeNet-5 reaches 0.80 % (Han et al. 2016)"},
    "binary-lenet5/binary-activations": {
        "error_pct": None, "source": "no published binary LeNet-5 figure"},
}


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ------------------------------------------------------------------------------ accuracy


def run_accuracy(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    """Train, save and score each binary configuration from its file."""
    configs = [
        ("bnn-mlp", "weights-only", {"hidden": args.hidden, "binary_activations": False},
         args.mlp_epochs),
        ("bnn-mlp", "binary-activations", {"hidden": args.hidden, "binary_activations": True},
         args.mlp_epochs),
        ("binary-lenet5", "weights-only", {"binary_activations": False}, args.lenet5_epochs),
        ("binary-lenet5", "binary-activations", {"binary_activations": True},
         args.lenet5_epochs),
    ]
    rows = []
    for name, variant, kwargs, epochs in configs:
        key = f"{name}/{variant}"
        if args.only and not any(o in key for o in args.only):
            continue
        t0 = time.perf_counter()
        result = train(name, "mnist", epochs=epochs, lr=args.lr, optimizer="adam",
                       weight_decay=0.0, batch_size=args.batch_size, lr_schedule="cosine",
                       seed=0, model_kwargs=kwargs, progress=False, subset=args.subset,
                       out=tmp / f"{name}-{variant}")
        train_s = time.perf_counter() - t0
        unfolded = dsq.save(result.model.eval(), tmp / f"{name}-{variant}-bn.dsq")
        path = tmp / f"{name}-{variant}.dsq"
        report = dsq.save(fold_batchnorm(result.model), path)  # BatchNorm folded in
        scored = evaluate(path, "mnist", measure_speed=False, subset=args.subset)
        rt = load_runtime(path, batch_size=256)
        rt_scored = evaluate(rt, "mnist", measure_speed=False, subset=args.subset)
        rows.append({
            "model": name, "variant": variant, "options": kwargs, "epochs": epochs,
            "train_seconds": round(train_s, 1),
            "train_accuracy_history": [h.get("test_accuracy") for h in result.fit.history],
            "error_pct_file": round(100 * (1 - scored.top1_accuracy), 2),
            "error_pct_runtime": round(100 * (1 - rt_scored.top1_accuracy), 2),
            "runtime_executors": runtime_info(rt).choices(),
            "file_bytes": report.file_bytes,
            "file_bytes_batchnorm_unfolded": unfolded.file_bytes,
            "dense_fp32_bytes": report.dense_bytes,
            "compression": round(report.compression, 1),
            "bits_per_weight": {r.layer: r.bits_per_weight for r in report.layers
                                if r.bits_per_weight is not None and r.weights > 1000},
            "paper": PAPERS[key],
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


# ------------------------------------------------------------------------------ speed


def _interleaved(fns: dict[str, Callable[[], Any]], rounds: int, min_s: float) -> dict[str, float]:
    """Median seconds per call of each fn, timed round-robin (each round: every fn, repeated
    until ``min_s`` of work, in turn) so the machine's load hits them alike."""
    for fn in fns.values():  # warm-up
        fn()
    reps = {}
    for name, fn in fns.items():
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < min_s:
            fn()
            n += 1
        reps[name] = max(1, n)
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            times[name].append((time.perf_counter() - t0) / reps[name])
    return {n: statistics.median(v) for n, v in times.items()}


def _ort_session(model: nn.Module, example: torch.Tensor, threads: int) -> Any:
    import onnxruntime as ort

    data = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example,), data, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["out"],
                          dynamic_axes={"input": {0: "b"}, "out": {0: "b"}})
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(data.getvalue(), opts, providers=["CPUExecutionProvider"])


class _DenseLayer(nn.Module):
    """The binary layer as dense fp32 PyTorch: ``scale * F.linear(x or sign(x), W) + b``."""

    def __init__(self, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                 binary_input: bool) -> None:
        super().__init__()
        self.weight, self.scale, self.bias = nn.Parameter(w), nn.Parameter(scale), nn.Parameter(
            bias)
        self.binary_input = binary_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.binary_input:
            x = torch.where(x >= 0, 1.0, -1.0)
        return F.linear(x, self.weight) * self.scale + self.bias


def speed_layer(threads: int, batch: int, rounds: int, min_s: float) -> dict[str, Any]:
    """One 4096 x 4096 binary layer: packed kernel vs dense fp32 torch vs onnxruntime."""
    g = torch.Generator().manual_seed(0)
    n = 4096
    w = sign(torch.randn(n, n, generator=g))
    scale, bias = torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g)
    bits = pack_signs(w)
    x = torch.randn(batch, n, generator=g)
    out: dict[str, Any] = {"layer": "4096x4096", "batch": batch, "threads": threads}
    torch.set_num_threads(threads)
    for mode, binary_input in (("xnor", True), ("select", False)):
        dense = _DenseLayer(w.clone(), scale, bias, binary_input).eval()
        sess = _ort_session(dense, x[:1], threads)
        xn = x.numpy()
        with torch.inference_mode():
            ref = dense(x)
            got = binary_product(mode, bits, n, n, scale, bias, x, threads=threads)
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-2)
            fns = {
                "packed": lambda m=mode: binary_product(m, bits, n, n, scale, bias, x,
                                                        threads=threads),
                "torch_fp32": lambda d=dense: d(x),
                "onnxruntime_fp32": lambda s=sess, a=xn: s.run(None, {"input": a}),
            }
            t = _interleaved(fns, rounds, min_s)
        inputs = "binary activations (XNOR/popcount)" if binary_input else "real (sign-select)"
        out[mode] = {
            "inputs": inputs,
            "us": {k: round(v * 1e6, 1) for k, v in t.items()},
            "speedup_vs_torch": round(t["torch_fp32"] / t["packed"], 2),
            "speedup_vs_onnxruntime": round(t["onnxruntime_fp32"] / t["packed"], 2),
        }
    out["weight_bytes"] = {"packed": bits.numel() * 8, "fp32": n * n * 4}
    return out


def speed_mlp(threads: int, batch: int, rounds: int, min_s: float, path: Path,
              dense: nn.Module) -> dict[str, Any]:
    """The whole BNN MLP: runtime from the .dsq file vs its dense fp32 decoding (torch) and
    onnxruntime."""
    torch.set_num_threads(threads)
    rt = load_runtime(path, batch_size=batch, cache=False, rounds=5, model=_skeleton())
    x = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    sess = _ort_session(dense, x[:1], threads)
    xn = x.numpy()
    with torch.inference_mode():
        torch.testing.assert_close(rt(x), dense(x), rtol=1e-4, atol=1e-3)
        t = _interleaved({
            "packed_runtime": lambda: rt(x),
            "torch_fp32": lambda: dense(x),
            "onnxruntime_fp32": lambda: sess.run(None, {"input": xn}),
        }, rounds, min_s)
    return {
        "model": "bnn-mlp 784-4096-4096-4096-10 (binary weights + activations, BatchNorm)",
        "batch": batch, "threads": threads,
        "executors": runtime_info(rt).choices(),
        "us": {k: round(v * 1e6, 1) for k, v in t.items()},
        "speedup_vs_torch": round(t["torch_fp32"] / t["packed_runtime"], 2),
        "speedup_vs_onnxruntime": round(t["onnxruntime_fp32"] / t["packed_runtime"], 2),
    }


def _mlp_file(tmp: Path) -> tuple[Path, nn.Module]:
    """A randomly initialised 4096-wide BNN MLP (speed does not depend on training), BatchNorm
    statistics from one batch, saved as a user model (the zoo caps latent parameters at 16M)."""
    torch.manual_seed(0)
    net = BinaryMLP(hidden=4096, binary_activations=True)
    net.train()
    with torch.no_grad():
        net(torch.randn(512, 1, 28, 28))
    net.eval()
    path = tmp / "bnn-mlp-4096.dsq"
    dsq.save(net, path, example_inputs=torch.randn(1, 1, 28, 28))
    return path, dsq.load(path, model=_skeleton())


def _skeleton() -> nn.Module:
    """A plain BinaryMLP(4096) to load the file into (the file holds no graph: the 4096-wide
    forward is not captured), its layers' parametrizations removed."""
    net = BinaryMLP(hidden=4096, binary_activations=True)
    for layer in net.layers:
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    return net.eval()  # the runtime's shape pass runs it at batch 1: BatchNorm in eval mode


def run_speed(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    path, dense = _mlp_file(tmp)
    report = dsq.inspect(path)
    results: dict[str, Any] = {"layer": [], "mlp": [],
                               "mlp_file": {"file_bytes": report.file_bytes,
                                            "dense_fp32_bytes": report.dense_bytes,
                                            "compression": round(report.compression, 1)}}
    assert all(isinstance(m, BinaryLinear) for m in dense.layers)
    for threads in args.threads:
        for batch in args.batches:
            results["layer"].append(speed_layer(threads, batch, args.rounds, args.min_s))
            print(json.dumps(results["layer"][-1]), flush=True)
            results["mlp"].append(speed_mlp(threads, batch, args.rounds, args.min_s, path,
                                            dense))
            print(json.dumps(results["mlp"][-1]), flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["accuracy", "speed", "all"], default="all")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "binary.json")
    p.add_argument("--hidden", type=int, default=1024, help="MLP width (paper: 4096)")
    p.add_argument("--mlp-epochs", type=float, default=10)
    p.add_argument("--lenet5-epochs", type=float, default=4)
    p.add_argument("--lr", type=float, default=0.005)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--subset", type=int, default=None, help="samples (smoke tests only)")
    p.add_argument("--only", nargs="*", default=None, help="configs whose key contains these")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--min-s", type=float, default=0.2, help="seconds of work per timing round")
    args = p.parse_args()
    torch.set_num_threads(1)
    result: dict[str, Any] = {
        "benchmark": "binary", "commit": _git_commit(), "machine": {
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "note": "2-core VM shared with other agents' jobs during the run (load average "
                    "above 2): absolute times are noisy, ratios come from interleaved rounds"},
        "kernel": None if K.get_kernel() is None else K.get_kernel().path.name,
    }
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        accuracy = run_accuracy(args, tmp) if args.part in ("accuracy", "all") else None
        speed = run_speed(args, tmp) if args.part in ("speed", "all") else None
    settings = {"hidden": args.hidden, "mlp_epochs": args.mlp_epochs,
                "lenet5_epochs": args.lenet5_epochs, "optimizer": "adam", "lr": args.lr,
                "batch_size": args.batch_size, "torch_threads": 1}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out.with_suffix(".lock"), "w") as lock:  # --only runs may finish together
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = json.loads(args.out.read_text()) if args.out.is_file() else {}
        result["accuracy"] = old.get("accuracy")
        if accuracy is not None:  # rows of configs not run now are kept
            ran = {(r["model"], r["variant"]) for r in accuracy}
            kept = [r for r in (old.get("accuracy") or {}).get("rows", [])
                    if (r["model"], r["variant"]) not in ran]
            result["accuracy"] = {"settings": settings, "rows": kept + accuracy}
        result["speed"] = speed if speed is not None else old.get("speed")
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".lock").unlink(missing_ok=True)
    print(f"wrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")


if __name__ == "__main__":
    main()
