"""Distributed data-parallel training: 2 gloo processes on 127.0.0.1, launched by torchrun.

Each launch starts fresh worker interpreters (torch import, and DDP's first construction which
imports torch._dynamo: ~10 s on 2 cores), so the tests are few and each checks several things:
bit-identical replicas + equality with a single-process run; a rank that dies mid-epoch stops
the job and the run resumes from its checkpoint (``--nproc``, real CLI) to the single-process
result; a rank that hangs trips the collective timeout; the launcher propagates exit codes.
Workers are launched through ``launch_torchrun`` (torchrun's agent, in this process; c10d
rendezvous on a free localhost port) with gloo held to the loopback interface.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import textwrap
import time

import pytest
import torch

import deepsqueeze
from deepsqueeze.cli import main as cli_main
from deepsqueeze.io import load_model, safe_load
from deepsqueeze.training import distributed as ddist

from .conftest import REPO, needs_mnist

SRC = REPO / "src"

# Test workers, written as modules into a temporary folder on the workers' PYTHONPATH: an
# equivalence script (fit twice with a deterministic pruning-like hook, on synthetic data), a CLI
# wrapper that kills one rank mid-training, and a rank that hangs in a collective.
WORKER = textwrap.dedent('''
    import os
    import sys

    import torch
    import torch.distributed as dist

    from deepsqueeze import models
    from deepsqueeze.data import ImageDataset
    from deepsqueeze.data.registry import get_info
    from deepsqueeze.training import TrainConfig, fit

    # 301 samples, global batch 64: the last batch (45) splits 23 + 22 (+1 padding row)
    STAGES = [
        TrainConfig(epochs=1, batch_size=64, lr=0.05, seed=3),
        TrainConfig(epochs=1, batch_size=64, lr=0.02, lr_schedule="constant", seed=4, augment=True),
    ]


    def dataset():
        gen = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (301, 1, 28, 28), dtype=torch.uint8, generator=gen)
        labels = torch.randint(0, 10, (301,), generator=gen)
        return ImageDataset("mnist", "train", images, labels, get_info("mnist"))


    def prune_hook(step, model):
        """Deterministic in (step, model): zero the smallest 20% of fc1 every other step."""
        if step % 2 == 1:
            with torch.no_grad():
                w = model.fc1.weight
                threshold = w.abs().flatten().kthvalue(w.numel() // 5).values
                w[w.abs() <= threshold] = 0.0


    def run(init_seed):
        torch.manual_seed(init_seed)
        model = models.create("lenet300")
        data = dataset()
        history = []
        for cfg in STAGES:  # two stages through one trainer, as the compress runner does
            history.append(fit(model, data, cfg, step_hooks=[prune_hook], progress=False).history)
        return model, history


    if __name__ == "__main__":
        torch.set_num_threads(1)
        rank = int(os.environ["RANK"])
        # a different initialisation on every rank: DDP must broadcast rank 0's
        model, history = run(init_seed=1000 + rank)
        flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        torch.save({"state": model.state_dict(), "gathered": gathered, "history": history},
                   os.path.join(sys.argv[1], f"rank{rank}.pt"))
        dist.destroy_process_group()
''')

FAULTY_CLI = textwrap.dedent('''
    import os
    import sys

    import deepsqueeze.training.run as run

    FAULT = os.environ["FAULT"]
    AT_RANK, AT_STEP = int(os.environ["FAULT_RANK"]), int(os.environ["FAULT_STEP"])
    real_fit = run.fit


    def fit(*args, **kwargs):
        def fault(step, _model):
            if int(os.environ["RANK"]) == AT_RANK and step == AT_STEP:
                print(f"injected fault: rank {AT_RANK} {FAULT} at step {step}", file=sys.stderr,
                      flush=True)
                os._exit(7)
        return real_fit(*args, **kwargs, step_hooks=[fault])


    run.fit = fit
    if __name__ == "__main__":
        from deepsqueeze.cli import main

        sys.argv = ["deepsqueeze", *sys.argv[1:]]
        main()
''')


HANG_WORKER = textwrap.dedent('''
    import os
    import sys
    import time

    import torch

    from deepsqueeze.errors import DeepSqueezeError
    from deepsqueeze.training import distributed as ddist

    ctx = ddist.init_distributed("gloo")  # timeout from $DEEPSQUEEZE_DIST_TIMEOUT
    try:
        for step in range(10):
            if ctx.rank == 1 and step == 2:
                time.sleep(600)  # alive but silent: only the timeout can end the wait
            ddist.all_reduce_sum(torch.ones(4), ctx)
    except RuntimeError as exc:
        error = ddist.collective_failure(exc, ctx)
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
''')


@pytest.fixture
def workers(tmp_path, monkeypatch):
    """A folder of worker modules on the workers' PYTHONPATH; environment for 2 local ranks."""
    folder = tmp_path / "workers"
    folder.mkdir()
    for name, text in {"ds_worker": WORKER, "faulty_cli": FAULTY_CLI,
                       "hang_worker": HANG_WORKER}.items():
        (folder / f"{name}.py").write_text(text)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), str(SRC)]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # stay on 127.0.0.1
    monkeypatch.setenv(ddist.ENV_TIMEOUT, "30")  # a broken test fails in 30 s, never hangs
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    return folder


def _launch(module: str, *argv: str) -> tuple[int, float]:
    t0 = time.perf_counter()
    code = ddist.launch_torchrun(list(argv), 2, module=module)
    return code, time.perf_counter() - t0


# ------------------------------------------------------------------------------------ unit tests


def test_shards_partition_each_global_batch_into_equal_padded_shares():
    order = torch.randperm(301, generator=torch.Generator().manual_seed(0))
    per_rank = [ddist.shard_indices(order, r, 2, 64) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 5  # ceil(301 / 64) steps on every rank
    for step, (a, b) in enumerate(zip(*per_rank, strict=True)):
        batch = order[step * 64 : (step + 1) * 64]
        assert len(a.indices) == len(b.indices)  # equal shards
        real = torch.cat([a.indices[a.weight > 0], b.indices[b.weight > 0]])
        assert torch.equal(real, batch)  # the real rows are exactly the global batch
        assert a.global_size == b.global_size == len(batch)
    last = per_rank[1][-1]  # 45 = 23 + 22 real + 1 padding row of weight 0
    assert last.weight.tolist().count(0.0) == 1 and len(last.indices) == 23
    tiny = [ddist.shard_batch(torch.tensor([5]), r, 3) for r in range(3)]  # fewer rows than ranks
    assert [t.indices.tolist() for t in tiny] == [[5], [5], [5]]
    assert [t.weight.tolist() for t in tiny] == [[1.0], [0.0], [0.0]]


def test_launcher_argument_handling(monkeypatch):
    argv = ["train", "--nproc", "2", "--model", "lenet300", "--nproc=3", "--epochs", "1"]
    assert ddist.strip_option(argv, "--nproc") == ["train", "--model", "lenet300", "--epochs", "1"]
    assert ddist.torchrun_args(["train"], 2)[:4] == ["--standalone", "--nproc-per-node", "2", "-m"]
    with pytest.raises(ddist.DistributedError, match="at least 1"):
        ddist.torchrun_args([], 0)
    monkeypatch.setenv(ddist.ENV_TIMEOUT, "7.5")
    assert ddist.timeout_from_env() == 7.5
    monkeypatch.setenv(ddist.ENV_TIMEOUT, "soon")
    with pytest.raises(ddist.DistributedError, match="seconds"):
        ddist.timeout_from_env()
    monkeypatch.delenv(ddist.ENV_TIMEOUT)
    assert ddist.timeout_from_env() == ddist.DEFAULT_TIMEOUT_S
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    ctx = ddist.ensure_distributed(torch.device("cpu"))  # no torchrun: a single process
    assert ctx.world_size == 1 and ctx.is_main and not ctx.is_distributed
    with pytest.raises(ddist.DistributedError, match="torchrun"):
        ddist.init_distributed("gloo")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ddist.DistributedError, match="leave --nproc out"):
        ddist.launch_torchrun(["train"], 2)


def test_launcher_propagates_the_first_failing_exit_code(workers):
    """The agent stops the surviving rank; the launcher returns the failed rank's exit code."""
    (workers / "fail_one.py").write_text(
        "import os, sys, time\n"
        "if os.environ['RANK'] == '1':\n    sys.exit(3)\n"
        "time.sleep(60)\n"
    )
    code, seconds = _launch("fail_one")
    assert code == 3
    assert seconds < 30


# ---------------------------------------------------------------------------- 2-process tests


def test_two_gloo_ranks_stay_bit_identical_and_match_a_single_process_run(workers, tmp_path):
    code, _ = _launch("ds_worker", str(tmp_path))
    assert code == 0
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # gathered over the process group, and saved by each rank: bit-identical replicas
    assert torch.equal(ranks[0]["gathered"][0], ranks[0]["gathered"][1])
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name

    # the same two stages in this process, with rank 0's initialisation: same global batches
    worker = runpy.run_path(str(workers / "ds_worker.py"), run_name="ds_worker")
    single, single_history = worker["run"](init_seed=1000)
    for name, value in single.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][name], value, atol=1e-5, rtol=0)
    for dist_stage, single_stage in zip(ranks[0]["history"], single_history, strict=True):
        for d, s in zip(dist_stage, single_stage, strict=True):
            assert d["world_size"] == 2 and d["step"] == s["step"]
            assert d["train_accuracy"] == pytest.approx(s["train_accuracy"], abs=1e-9)
            assert d["train_loss"] == pytest.approx(s["train_loss"], abs=1e-5)
    for stage in range(2):  # both ranks report the same (all-reduced) metrics
        for a, b in zip(ranks[0]["history"][stage], ranks[1]["history"][stage], strict=True):
            assert a["train_loss"] == b["train_loss"]
            assert a["train_accuracy"] == b["train_accuracy"]


@needs_mnist
def test_a_dead_rank_stops_the_job_and_the_run_resumes_with_nproc(
    workers, tmp_path, monkeypatch, capfd
):
    run_dir = tmp_path / "run"
    common = ["--model", "lenet300", "--subset", "512", "--epochs", "2", "--seed", "5"]
    # 512 samples / global batch 128 = 4 steps per epoch; rank 1 dies at step 5 (epoch 2)
    monkeypatch.setenv("FAULT", "exit")
    monkeypatch.setenv("FAULT_RANK", "1")
    monkeypatch.setenv("FAULT_STEP", "5")
    code, seconds = _launch("faulty_cli", "train", *common, "--out", str(run_dir), "--no-progress")
    err = capfd.readouterr().err
    assert code == 7  # rank 1's exit code, propagated
    assert seconds < 60
    assert "injected fault: rank 1" in err
    assert "distributed training failed: rank 1 exited with code 7" in err
    ckpt = safe_load(run_dir / "checkpoint.pt")
    assert ckpt["epoch"] == 1
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1
    assert not (run_dir / "model.pt").exists()

    # `deepsqueeze train --nproc 2 --resume`: the CLI runs torchrun for the user (called here in
    # this interpreter, as the console script would, to spare one ~5 s start-up)
    monkeypatch.setattr(sys, "argv", ["deepsqueeze", "train", "--nproc", "2", "--out",
                                      str(run_dir), "--resume", "--no-progress"])
    with pytest.raises(SystemExit) as exit_info:
        cli_main()
    out, err = capfd.readouterr()
    assert exit_info.value.code == 0, err[-3000:]
    assert out.count("trained lenet300 on mnist") == 1  # rank 0 reports, once
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [rec["epoch"] for rec in lines] == [1, 2]  # rank 0 alone appends
    assert all(rec["world_size"] == 2 for rec in lines)
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoint.pt", "metrics.jsonl", "model.pt", "run.json"]

    # equals an uninterrupted single-process run with the same global batch
    single = deepsqueeze.train("lenet300", "mnist", subset=512, epochs=2, seed=5, progress=False)
    distributed = load_model(run_dir / "model.pt")
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(distributed.state_dict()[name], value, atol=1e-5, rtol=0)
    assert lines[-1]["test_accuracy"] == pytest.approx(single.fit.test_accuracy, abs=2e-4)


def test_a_hung_rank_trips_the_collective_timeout(workers, monkeypatch, capfd):
    """Rank 1 stops answering (alive, not exiting): rank 0 fails after the timeout, not never."""
    monkeypatch.setenv(ddist.ENV_TIMEOUT, "3")
    code, seconds = _launch("hang_worker")
    err = capfd.readouterr().err
    assert code == 2  # rank 0's error exit; the agent then stopped the silent rank 1
    assert seconds < 60
    assert "rank 0/2: a collective operation failed" in err
    assert "3 s timeout" in err
    assert "Timed out" in err or "timed out" in err
