"""The runtime's differential fuzz target (``benchmarks/fuzz_runtime.py``), CI-sized.

The full run (``make fuzz-runtime``: 100,000+ executions under AddressSanitizer) is recorded in
``benchmarks/results/fuzz_runtime.json`` and docs/reliability.md; here a few hundred executions
run through the same harness, plain and under the sanitizers, and the oracle itself is checked
against executors that are wrong on purpose.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepsqueeze.runtime.layers import IMPLS, Impl, RuntimeLayer, register_impl

REPO = Path(__file__).resolve().parents[1]
HARNESS = REPO / "benchmarks" / "fuzz_runtime.py"
SEED = 4  # its first files are LeNet-300-100s: cheap, and every executor applies


def _harness() -> ModuleType:
    name = "deepsqueeze_fuzz_runtime"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HARNESS)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_short_run_is_clean() -> None:
    """A few hundred executions in worker processes: every output equal or a clean error."""
    fr = _harness()
    results = fr.fuzz(300, SEED, sanitize=False, files_per_worker=1, log=lambda _: None)
    assert results["crashes"] == 0, results["failure_examples"]
    assert results["failures"] == 0, results["failure_examples"]
    assert results["executions"] >= 300
    assert results["inputs"]["right"] > 100 and results["inputs"]["wrong"] > 100
    assert results["outcomes"]["equal"] >= results["inputs"]["right"]
    executors = set(results["executions_per_executor"])
    assert {"dense", "densify", "torch-csr", "scipy-csr"} <= executors
    from deepsqueeze.runtime.kernel import get_kernel

    if get_kernel() is not None:
        assert {"kernel", "kernel-f32", "fused chain"} <= executors


def test_short_user_model_run_is_clean() -> None:
    """User models (harness-defined nn.Modules saved with example_inputs, loaded class-free):
    one two-input file through every runtime variant and the skeleton loads, clean."""
    fr = _harness()
    results = fr.fuzz(300, 3, sanitize=False, files_per_worker=1, log=lambda _: None,
                      user_share=1.0)
    assert results["crashes"] == 0, results["failure_examples"]
    assert results["failures"] == 0, results["failure_examples"]
    assert results["models"] == {"user:two-input": 1}
    assert results["user_model_executions"] == results["executions"] >= 300
    assert results["user_model_outcomes"]["equal"] >= results["user_model_inputs"]["right"] > 100
    assert results["user_model_inputs"]["wrong"] > 100
    executors = set(results["executions_per_executor"])
    assert {"skeleton dense load", "skeleton runtime load", "dense"} <= executors


def test_fused_class_free_runtime_refuses_extra_inputs(tmp_path: Path) -> None:
    """Found by the user-model fuzz run: ``--replay 500007 --input 37`` (every fuse=True
    variant): fx tracing kept GraphModel's optional inputs as placeholders, so the fused model
    ignored an extra input. The dense load and the unfused runtime raise TypeError; so does the
    fused one now (runtime.fuse.raise_plainly)."""
    from deepsqueeze import dsq

    fr = _harness()
    model = fr.UserTwoInput(2, 5, 4, 3).eval()
    x, y = torch.randn(2, 2, 6), torch.randn(2, 5)
    path = tmp_path / "two.dsq"
    dsq.save(model, path, example_inputs=(x, y))
    with pytest.raises(TypeError):
        dsq.load(path)(x, y, y)
    with pytest.raises(TypeError):
        dsq.load(path, mode="runtime", autotune=False, fuse=False)(x, y, y)
    with pytest.raises(TypeError):
        dsq.load(path, mode="runtime", autotune=False, fuse=True)(x, y, y)


class FaultyLinear(RuntimeLayer):
    """A Linear executor with three bugs: it accepts inputs of any width (zeros out), raises
    KeyError at batch 2, and is off by 1 % in one output otherwise."""

    impl = "faulty"

    def __init__(self, form: Any, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", form.to_dense(), persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.weight.shape[1]:
            return torch.zeros(*x.shape[:-1], self.weight.shape[0])
        if x.dim() == 2 and x.shape[0] == 2:
            raise KeyError("batch 2")
        y = F.linear(x.float(), self.weight, self.bias)
        if y.numel():
            y.view(-1)[0] += 0.01 * (1 + y.view(-1)[0].abs())
        return y


def test_oracle_catches_a_faulty_executor() -> None:
    """Registered as one more executor, a wrong one is reported: wrong values, a wrong input
    accepted, an unclean exception; each with its reproducer."""
    fr = _harness()
    saved = list(IMPLS[nn.Linear])
    register_impl(nn.Linear, Impl("faulty", lambda f, b, m: FaultyLinear(f, b),
                                  lambda f, m: True, compact=False))
    try:
        tally = fr.Tally()
        fr.run_file(SEED * 1_000_000, tally)
    finally:
        IMPLS[nn.Linear][:] = saved
    assert {"mismatch", "accepted a wrong input", "unclean KeyError"} <= set(tally.failure_kinds)
    first = tally.failures[0]
    assert first["replay"] == (f"python benchmarks/fuzz_runtime.py --replay {SEED * 1_000_000} "
                               f"--variant {first['variant']} --input {first['input']}")


def test_worker_crash_and_hang_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker killed by a signal (or a sanitizer abort) or one that hangs is a finding that
    names the execution it was in, from the progress lines."""
    fr = _harness()
    asan = "==12==ERROR: AddressSanitizer: heap-buffer-overflow on address 0x6020"

    def crashed(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, -6, "", f"@@ 0 3 load\n@@ 0 3 17\n{asan}\n")

    monkeypatch.setattr(fr.subprocess, "run", crashed)
    res = fr.fuzz(1, 0, sanitize=False, files_per_worker=1, log=lambda _: None)
    assert res["crashes"] == 1 and res["failures"] == 1
    crash = res["failure_examples"][0]
    assert (crash["kind"], crash["file_seed"], crash["variant"], crash["input"]) == (
        "crash", 0, 3, 17)
    assert crash["returncode"] == -6 and "AddressSanitizer" in crash["message"]
    assert crash["replay"].endswith("--replay 0 --variant 3 --input 17")
    assert res["sanitizer_reports"]["asan"] == 1

    def hung(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        raise subprocess.TimeoutExpired(cmd, 1, stderr=b"@@ 0 2 load\n")

    monkeypatch.setattr(fr.subprocess, "run", hung)
    res = fr.fuzz(1, 0, sanitize=False, files_per_worker=1, log=lambda _: None)
    hang = res["failure_examples"][0]
    assert (hang["kind"], hang["file_seed"], hang["variant"], hang["input"]) == ("hang", 0, 2,
                                                                                 None)


def _sanitizer_env_or_skip() -> dict[str, str]:
    from deepsqueeze.runtime import kernel

    if not hasattr(kernel, "sanitizer_env"):
        pytest.skip("no sanitizer build in this deepsqueeze")
    try:
        return kernel.sanitizer_env()
    except Exception as exc:  # KernelUnavailable: no compiler or no libasan
        pytest.skip(f"no sanitizer runtime: {exc}")


@pytest.mark.slow
def test_short_run_under_address_sanitizer(tmp_path: Path) -> None:
    """The same harness with the kernel built with -fsanitize=address,undefined: no report."""
    _sanitizer_env_or_skip()
    out = tmp_path / "fuzz.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(HARNESS), "--executions", "300", "--seed", str(SEED), "--sanitize",
         "--files-per-worker", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    if not res["kernel_available"]:
        pytest.skip("the C kernel could not be built here")
    assert res["kernel_sanitized"] is True
    assert res["sanitizer_reports"] == {"asan": 0, "ubsan": 0, "lsan": 0}
    assert res["crashes"] == 0 and res["failures"] == 0
    assert res["executions"] >= 300
