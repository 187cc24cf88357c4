"""Memory accounting: bytes of weights a model holds, and peak resident memory per backend.

``held_bytes`` counts every parameter and buffer once (shared storages once) plus what runtime
executors keep outside buffers (scipy arrays, sparse CSR tensors). Peak RSS is measured in a
fresh interpreter per backend (``python -m deepsqueeze.runtime.memory``), so the backends do not
pollute each other's numbers: the high-water mark ``VmHWM`` is read after the imports (the
baseline) and after loading the model and running it, and both are reported.

The fresh interpreter runs isolated (``python -I``): neither the working directory nor
``$PYTHONPATH`` is on its ``sys.path``, so a ``torch.py`` or ``deepsqueeze/`` lying in the folder
``bench`` is run from is never imported; deepsqueeze itself is found where this process found it.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn


def held_bytes(model: nn.Module) -> int:
    """Bytes of the tensors a model holds (parameters, buffers, executor-owned arrays)."""
    from deepsqueeze.runtime.layers import RuntimeLayer

    seen: set[tuple[int, int]] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_meta:
            continue
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    total += sum(m.extra_bytes() for m in model.modules() if isinstance(m, RuntimeLayer))
    return total


def peak_rss_kib() -> int:
    """Peak resident set size of this process in KiB (``VmHWM``; else ``ru_maxrss``)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss


def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Inside the fresh interpreter: import, baseline, load, run, peak."""
    backend, path, batch = spec["backend"], spec["path"], int(spec["batch"])
    torch.set_num_threads(int(spec["threads"]))
    from deepsqueeze.dsq import load

    if backend == "onnxruntime":
        import onnxruntime  # noqa: F401  (its import is part of the baseline)

        from deepsqueeze.runtime.onnx_export import onnx_session
    if backend == "runtime":
        from deepsqueeze.runtime.kernel import get_kernel
        from deepsqueeze.runtime.loader import load_runtime

        get_kernel()  # the kernel library is loaded before the baseline, like torch's
    shape = tuple(spec["input_shape"])
    x = torch.randn(batch, *shape)
    base = peak_rss_kib()
    weights = None
    with torch.inference_mode():
        if backend == "dense":
            model = load(path)
            weights = held_bytes(model)
            run = lambda: model(x)  # noqa: E731
        elif backend == "runtime":
            model = load_runtime(path, batch_size=batch, autotune=False, cache=False,
                                 impls=spec.get("impls"), memory_budget=None,
                                 fuse=bool(spec.get("fuse", True)))
            weights = held_bytes(model)
            run = lambda: model(x)  # noqa: E731
        elif backend == "onnxruntime":
            session = onnx_session(spec["onnx"], threads=int(spec["threads"]))
            xn = x.numpy()
            run = lambda: session.run(None, {"input": xn})  # noqa: E731
        else:
            raise ValueError(f"unknown backend {backend!r}")
        for _ in range(int(spec.get("runs", 5))):
            run()
    peak = peak_rss_kib()
    return {"backend": backend, "batch": batch, "baseline_kib": base, "peak_kib": peak,
            "delta_kib": peak - base, "weights_bytes": weights}


def measure_peak_rss(
    backend: str,
    path: str | Path,
    batch: int,
    input_shape: tuple[int, ...],
    *,
    threads: int | None = None,
    impls: dict[str, str] | None = None,
    fuse: bool = True,
    onnx: str | Path | None = None,
    runs: int = 5,
    timeout: float = 300.0,
) -> dict[str, Any]:
    """Peak RSS of loading ``path`` with ``backend`` (dense / runtime / onnxruntime) and running
    ``runs`` batches of ``batch``, measured in a fresh interpreter."""
    spec = {
        "backend": backend,
        "path": str(path),
        "batch": batch,
        "input_shape": list(input_shape),
        "threads": threads or torch.get_num_threads(),
        "impls": impls,
        "fuse": fuse,
        "onnx": str(onnx) if onnx is not None else None,
        "runs": runs,
    }
    proc = subprocess.run(
        isolated_command("deepsqueeze.runtime.memory", json.dumps(spec)),
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"peak RSS measurement of {backend} failed: {' | '.join(tail)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Run by ``isolated_command``: put this package's folder first on the path (unless the
# isolated interpreter has it already), then run the module as ``python -m`` would.
_BOOTSTRAP = (
    "import runpy, sys; pkg = sys.argv.pop(1); mod = sys.argv.pop(1)\n"
    "if pkg not in sys.path: sys.path.insert(0, pkg)\n"
    "sys.argv[0] = mod; runpy.run_module(mod, run_name='__main__', alter_sys=True)"
)


def isolated_command(module: str, *args: str) -> list[str]:
    """The command line running ``python -m module args`` in an isolated interpreter.

    ``-I``: no working directory, script folder or ``$PYTHON*`` variables on the path, no user
    site-packages; the folder holding this ``deepsqueeze`` package is added explicitly, so the
    child runs the same deepsqueeze whether it is installed or run from a source tree.
    """
    package_parent = str(Path(__file__).resolve().parents[2])
    return [sys.executable, "-I", "-c", _BOOTSTRAP, package_parent, module, *args]


if __name__ == "__main__":
    print(json.dumps(_measure(json.loads(sys.argv[1]))))
