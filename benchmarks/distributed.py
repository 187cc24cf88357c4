"""Data-parallel and mixed-precision training speed; writes benchmarks/results/distributed.json.

Trains LeNet-5 on a 10k-sample MNIST subset for one epoch per configuration, each in fresh
processes: 1 process fp32, 2 processes fp32 (torchrun, gloo, global batch unchanged), 1 process
bf16 autocast, 2 processes bf16. Reports training samples/s and step time (from the trainer's
epoch timer: start-up, data loading and evaluation excluded; the launch wall time is reported
separately), and test accuracy. Rerun:

    python benchmarks/distributed.py                 # all configurations (a few minutes)
    python benchmarks/distributed.py --subset 2000   # quicker

The numbers depend on the machine: on a 2-core CPU, two processes have one core each, so data
parallelism can at best match one process using both cores for its intra-op threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "distributed.json"

# (name, processes, intra-op threads per process, precision)
CONFIGS = [
    ("1 proc x 2 threads fp32", 1, 2, "fp32"),
    ("1 proc x 1 thread fp32", 1, 1, "fp32"),
    ("2 procs x 1 thread fp32", 2, 1, "fp32"),
    ("1 proc x 2 threads bf16", 1, 2, "bf16"),
    ("2 procs x 1 thread bf16", 2, 1, "bf16"),
]


def worker(args: argparse.Namespace) -> None:
    """One configuration (run directly, or by torchrun on every rank); rank 0 writes JSON."""
    import torch

    from deepsqueeze import models
    from deepsqueeze.data import load_dataset
    from deepsqueeze.training import TrainConfig, fit
    from deepsqueeze.training.distributed import current_context, shutdown_distributed

    torch.set_num_threads(args.threads)
    train_set = load_dataset("mnist", "train").subset(args.subset, seed=0)
    test_set = load_dataset("mnist", "test")
    torch.manual_seed(0)
    model = models.create("lenet5")
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, lr=0.05, weight_decay=5e-4,
                      precision=args.precision, seed=0, device="cpu")
    result = fit(model, train_set, cfg, test_set=test_set, progress=True,
                 description=f"{args.name}")
    ctx = current_context()
    if ctx.is_main:
        record = result.history[-1]
        steps = record["step"]
        Path(args.result).write_text(json.dumps({
            "processes": ctx.world_size,
            "precision": args.precision,
            "threads_per_process": torch.get_num_threads(),
            "samples_per_s": record["samples_per_s"],
            "epoch_time_s": record["epoch_time_s"],
            "steps": steps,
            "step_time_ms": 1000 * record["epoch_time_s"] / steps,
            "train_loss": record["train_loss"],
            "test_accuracy": record["test_accuracy"],
        }))
    shutdown_distributed()


def run_config(
    name: str, nproc: int, threads: int, precision: str, args: argparse.Namespace
) -> dict:
    """Run one configuration in fresh processes; its numbers plus the launch wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        worker_args = [str(Path(__file__).resolve()), "--worker", "--name", name,
                       "--precision", precision, "--subset", str(args.subset),
                       "--threads", str(threads),
                       "--batch-size", str(args.batch_size), "--result", str(result)]
        if nproc == 1:
            cmd = [sys.executable, *worker_args]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node", str(nproc), *worker_args]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p
        )
        env["OMP_NUM_THREADS"] = str(threads)
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True)
        wall = time.perf_counter() - t0
        numbers = json.loads(result.read_text())
    return {"name": name, **numbers, "launch_wall_s": wall}


def cpu_info() -> dict:
    """CPU model and whether it has native bf16 arithmetic (Linux /proc/cpuinfo; else empty)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                  if line.startswith("model name")), None)
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines()
                      if line.startswith("flags")), []))
    return {"cpu_model": model,
            "cpu_native_bf16": bool(flags & {"avx512_bf16", "amx_bf16"})}


def markdown(rows: list[dict]) -> str:
    lines = [
        "| config | procs x threads | samples/s | step time (ms) | test acc | launch wall (s) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['processes']} x {r['threads_per_process']} | "
            f"{r['samples_per_s']:.0f} | {r['step_time_ms']:.1f} | {r['test_accuracy']:.2%} | "
            f"{r['launch_wall_s']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", type=int, default=10_000, help="MNIST training samples")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch")
    parser.add_argument("--only", action="append", help="configuration name (repeatable)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--name", default="", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--result", default="", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import torch

    chosen = [c for c in CONFIGS if not args.only or c[0] in args.only]
    load_before = os.getloadavg()
    rows = []
    for i, (name, nproc, threads, precision) in enumerate(chosen):
        print(f"[{i + 1}/{len(chosen)}] {name}: lenet5, MNIST subset {args.subset}, 1 epoch, "
              f"global batch {args.batch_size}", flush=True)
        rows.append(run_config(name, nproc, threads, precision, args))
        print(f"    {rows[-1]['samples_per_s']:.0f} samples/s, "
              f"test accuracy {rows[-1]['test_accuracy']:.2%}", flush=True)
    by_name = {r["name"]: r for r in rows}

    def ratio(a: str, b: str, key: str) -> float | None:
        if a in by_name and b in by_name:
            return by_name[a][key] / by_name[b][key]
        return None

    def diff(a: str, b: str, key: str) -> float | None:
        if a in by_name and b in by_name:
            return by_name[a][key] - by_name[b][key]
        return None

    one2, one1, two = "1 proc x 2 threads fp32", "1 proc x 1 thread fp32", "2 procs x 1 thread fp32"
    one2_bf, two_bf = "1 proc x 2 threads bf16", "2 procs x 1 thread bf16"
    summary = {
        "samples_per_s_2procs_over_1proc_same_cores_fp32": ratio(two, one2, "samples_per_s"),
        "samples_per_s_2procs_over_1proc_1thread_fp32": ratio(two, one1, "samples_per_s"),
        "samples_per_s_2procs_over_1proc_same_cores_bf16": ratio(two_bf, one2_bf,
                                                                 "samples_per_s"),
        "step_time_bf16_over_fp32_1proc": ratio(one2_bf, one2, "step_time_ms"),
        "step_time_bf16_over_fp32_2procs": ratio(two_bf, two, "step_time_ms"),
        "test_accuracy_bf16_minus_fp32_1proc": diff(one2_bf, one2, "test_accuracy"),
        "test_accuracy_2procs_minus_1proc_fp32": diff(two, one2, "test_accuracy"),
    }
    report = {
        "benchmark": "distributed",
        "setup": {
            "model": "lenet5", "dataset": "mnist", "train_subset": args.subset, "epochs": 1,
            "global_batch": args.batch_size, "optimizer": "sgd lr 0.05 cosine", "backend": "gloo",
            "launcher": "torchrun --standalone",
        },
        "machine": {
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(), **cpu_info(),
            "load_average_before": load_before, "load_average_after": os.getloadavg(),
        },
        "results": rows,
        "summary": summary,
        "notes": (
            "samples/s and step time come from the trainer's epoch timer (training steps only, "
            "first step included); launch_wall_s is the whole launch (interpreter and torch "
            "start-up, DDP set-up, data loading, evaluation). Threads per process are set "
            "explicitly (OMP_NUM_THREADS and torch.set_num_threads). On a 2-core machine, 2 "
            "processes x 1 thread use the same cores as 1 process x 2 threads: the ratio shows "
            "the cost or benefit of splitting the batch plus the gloo gradient all-reduce, not a "
            "scale-out gain. Accuracy differences between 1 and 2 processes are float rounding "
            "only (same global batches). The load average shows whether other work shared the "
            "machine during the run."
        ),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(markdown(rows))
    print()
    for key, value in summary.items():
        if value is not None:
            print(f"{key}: {value:.4g}")
    print(f"written to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
