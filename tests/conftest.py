"""Shared test setup: find the real datasets and keep tests on one thread-light CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from deepsqueeze.cli import main

# One thread per test process: the CI machine has 2 cores, and oversubscribed BLAS threads make
# small-model tests many times slower.
torch.set_num_threads(1)

# Property tests draw the same examples on every run (`make test` must not pass or fail by
# chance); HYPOTHESIS_PROFILE=random explores new ones, as the long fuzz runs do.
settings.register_profile("deterministic", derandomize=True)
settings.register_profile("random", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

REPO = Path(__file__).resolve().parents[1]
_default = REPO.parent / "shared" / "data"
if "DEEPSQUEEZE_DATA" not in os.environ and _default.is_dir():
    os.environ["DEEPSQUEEZE_DATA"] = str(_default)
DATA_DIR = Path(os.environ["DEEPSQUEEZE_DATA"]) if "DEEPSQUEEZE_DATA" in os.environ else None


def have_mnist() -> bool:
    return DATA_DIR is not None and (DATA_DIR / "mnist").is_dir()


needs_mnist = pytest.mark.skipif(
    not have_mnist(), reason="MNIST not found: set DEEPSQUEEZE_DATA to a folder holding mnist/"
)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the command line in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    code = stop.value.code
    return (code if isinstance(code, int) else (0 if code is None else 1)), out, err
