"""Which convolution algorithm wins where: every Conv2d executor across kernel sizes and widths.

For kernels 3, 5, 7 and 11 (stride 1, "same" zero padding), widths (in = out channels) 4, 16
and 48 and batches 1 and 16 on 24 x 24 inputs, a layer pruned to 30 % density with a 5-bit
codebook (the shape of a Deep-Compressed conv) is run by every executor that accepts it:
``sparse-os`` / ``codebook`` (C, output-stationary over the kept weights), ``kernel`` /
``kernel-f32`` (the older C direct conv), ``winograd2`` / ``winograd4`` (3x3), ``fft`` (>= 5x5),
``im2col``, ``torch-csr``, ``densify`` and ``dense`` (``F.conv2d`` with the dense weight).

Two independent measurements per layer: the autotuner's own (``time_modules``, 15 interleaved
rounds, as ``load_runtime`` does; its pick is the fastest, no memory budget), then a second
interleaved measurement of every executor (``--rounds``), in which the autotuner's pick is
compared with the fastest: ``within_10pct`` says whether it is at most 10 % slower. Writes
benchmarks/results/conv_algorithms.json (``--out``) and prints a markdown table.

    python benchmarks/conv_algorithms.py --threads 1
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
from torch import nn

import deepsqueeze.runtime.executors.conv  # noqa: F401  (registers the conv executors)
from deepsqueeze.io import atomic_write
from deepsqueeze.runtime import autotune as at
from deepsqueeze.runtime.forms import from_dense
from deepsqueeze.runtime.kernel import get_kernel
from deepsqueeze.runtime.layers import candidates

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "conv_algorithms.json"


def layer(width: int, k: int, density: float, bits: int, seed: int) -> nn.Conv2d:
    """A k x k conv, ``width`` -> ``width`` channels, pruned to ``density``, ``bits`` codebook."""
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(width, width, k, padding=k // 2)
    w = torch.randn(conv.weight.shape, generator=g)
    keep = w.abs() >= w.abs().flatten().quantile(1 - density)
    centroids = torch.linspace(-2, 2, 2 ** bits)
    q = centroids[torch.bucketize(w.clamp(-2, 2), centroids).clamp(max=2 ** bits - 1)]
    with torch.no_grad():
        conv.weight.copy_(torch.where(keep & (q != 0), q, 0.0))
    return conv.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", default="3,5,7,11")
    parser.add_argument("--widths", default="4,16,48")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--size", type=int, default=24)
    parser.add_argument("--density", type=float, default=0.3)
    parser.add_argument("--bits", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    for k in (int(v) for v in args.kernels.split(",")):
        for width in (int(v) for v in args.widths.split(",")):
            conv = layer(width, k, args.density, args.bits, seed=k * 100 + width)
            form = from_dense(conv.weight)
            mods = {}
            for impl in candidates(form, conv):
                mod = impl.build(form, conv.bias.detach().clone(), conv).eval()
                mod.impl = impl.name
                mods[impl.name] = mod
            for n in (int(v) for v in args.batches.split(",")):
                x = torch.randn(n, width, args.size, args.size,
                                generator=torch.Generator().manual_seed(n))
                with torch.inference_mode():
                    ref = conv(x)
                    errors = {name: float((m(x) - ref).abs().max()) for name, m in mods.items()}
                tuned = {name: s * 1e6 for name, s in at.time_modules(mods, x, rounds=15).items()}
                pick = min(tuned, key=tuned.__getitem__)
                timed = {name: s * 1e6
                         for name, s in at.time_modules(mods, x, rounds=args.rounds).items()}
                best = min(timed, key=timed.__getitem__)
                row = {"kernel": k, "width": width, "batch": n, "kept": form.nnz,
                       "density": form.density, "time_us": timed, "autotune_time_us": tuned,
                       "fastest": best, "autotuner_pick": pick,
                       "pick_vs_fastest": timed[pick] / timed[best],
                       "within_10pct": timed[pick] <= 1.1 * timed[best],
                       "dense_vs_fastest": timed["dense"] / timed[best],
                       "max_abs_error": errors}
                rows.append(row)
                print(f"k={k:2d} width={width:2d} batch={n:3d}: fastest {best} "
                      f"({timed[best]:.0f} us, dense {timed['dense']:.0f} us), autotuner "
                      f"{pick} ({row['pick_vs_fastest']:.2f}x)", flush=True)
    kernel = get_kernel()
    results = {
        "command": " ".join(sys.argv),
        "threads": args.threads,
        "input": [args.size, args.size],
        "density": args.density,
        "codebook_bits": args.bits,
        "cpu": at.cpu_model(),
        "torch": torch.__version__,
        "kernel": kernel.path.name if kernel is not None else None,
        "seconds": time.perf_counter() - t_start,
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "note": "shared 2-core machine with other agents' jobs running alongside; times are "
                "medians of interleaved rounds, so load hits every executor of a layer alike",
        "rows": rows,
        "summary": {
            "layers": len(rows),
            "autotuner_within_10pct": sum(r["within_10pct"] for r in rows),
            "wins": {name: sum(r["fastest"] == name for r in rows)
                     for name in sorted({r["fastest"] for r in rows})},
        },
    }
    with atomic_write(args.out, "w") as handle:
        json.dump(results, handle, indent=2)

    names = sorted({n for r in rows for n in r["time_us"]})
    print("\n| k | width | batch | " + " | ".join(names) + " | fastest | autotuner (x fastest) |")
    print("|" + "---|" * (len(names) + 5))
    for r in rows:
        cells = [f"{r['time_us'][n]:.0f}" if n in r["time_us"] else "-" for n in names]
        print(f"| {r['kernel']} | {r['width']} | {r['batch']} | " + " | ".join(cells)
              + f" | {r['fastest']} | {r['autotuner_pick']} ({r['pick_vs_fastest']:.2f}x) |")
    s = results["summary"]
    print(f"\nautotuner within 10 % of the fastest on {s['autotuner_within_10pct']}/{s['layers']} "
          f"layers; wins: {s['wins']}\nwritten to {args.out}")


if __name__ == "__main__":
    main()
