"""Synchronous data-parallel training on ``torch.distributed`` (launched with ``torchrun``).

deepsqueeze does not ship its own distributed engine: processes are started by ``torchrun``
(``torch.distributed.run``), they meet through its rendezvous, and ``fit`` wraps the model in
``DistributedDataParallel``, which broadcasts rank 0's weights at the start and all-reduces
(averages) gradients in every backward pass. The backend is gloo on CPU and nccl on CUDA.

Batch semantics: ``TrainConfig.batch_size`` is the GLOBAL batch. Every step, all ranks take the
same global batch from the epoch order (a pure function of ``(seed, epoch)``, so every rank
computes it without communication) and each rank keeps an equal share of it (padded by wrapping
around when the global batch does not divide evenly, as ``DistributedSampler`` pads; padded
samples carry weight 0). Each rank's loss is ``sum(per-sample loss on its real samples) *
world_size / global_batch``; after DDP averages gradients over ``world_size`` ranks the update
is exactly the mean gradient over the global batch, i.e. the update of a single-process run with
the same batch size, up to floating-point summation order. Every rank therefore runs the same
number of steps, and a run is comparable (and resumable) across process counts.

Failure handling: ``init_process_group`` gets a finite collective timeout (``timeout_s``,
default :data:`DEFAULT_TIMEOUT_S`, overridable with ``$DEEPSQUEEZE_DIST_TIMEOUT``), so a rank that
hangs makes the others fail within that bound instead of waiting forever; a rank that exits makes
its peers' next collective fail at once (connection reset), and torchrun's elastic agent then
terminates the remaining workers and exits non-zero.
"""

from __future__ import annotations

import atexit
import datetime
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from deepsqueeze.errors import DeepSqueezeError

ENV_TIMEOUT = "DEEPSQUEEZE_DIST_TIMEOUT"
"""Environment variable holding the collective timeout in seconds (``--dist-timeout`` sets it)."""
DEFAULT_TIMEOUT_S = 300.0
"""Default collective timeout: long enough for a checkpoint write, short enough to notice a hang."""
BACKENDS = ("auto", "gloo", "nccl")
_timeout_in_use: list[float] = []  # the timeout the process group was created with


class DistributedError(DeepSqueezeError):
    """A distributed run could not start, or a collective failed (a peer died or hung)."""


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the job: its rank among ``world_size`` processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes files, logs and draws the progress bar."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise DistributedError(f"${name}={value!r} is not an integer") from exc


def launched_by_torchrun() -> bool:
    """True in a worker that torchrun (or another launcher setting ``WORLD_SIZE``) started."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def env_context() -> DistributedContext:
    """The context torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) describes."""
    return DistributedContext(
        rank=_env_int("RANK", 0),
        world_size=_env_int("WORLD_SIZE", 1),
        local_rank=_env_int("LOCAL_RANK", 0),
    )


def current_context() -> DistributedContext:
    """This process's context: from the process group once initialized, else from the env."""
    if dist.is_available() and dist.is_initialized():
        env = env_context()
        return DistributedContext(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=env.local_rank,
            backend=str(dist.get_backend()),
        )
    return env_context()


def is_main_process() -> bool:
    """True on rank 0 and in any single-process run."""
    return current_context().is_main


def timeout_from_env(default: float = DEFAULT_TIMEOUT_S) -> float:
    """The collective timeout in seconds: ``$DEEPSQUEEZE_DIST_TIMEOUT`` or ``default``."""
    value = os.environ.get(ENV_TIMEOUT)
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError as exc:
        raise DistributedError(f"${ENV_TIMEOUT}={value!r} is not a number of seconds") from exc
    if seconds <= 0:
        raise DistributedError(f"${ENV_TIMEOUT} must be positive, got {seconds}")
    return seconds


def init_distributed(
    backend: str = "auto", timeout_s: float | None = None
) -> DistributedContext:
    """Join the process group that torchrun set up (idempotent; returns this rank's context).

    ``backend="auto"`` picks nccl when CUDA is available, else gloo. With nccl each process
    binds GPU ``LOCAL_RANK`` (``torch.cuda.set_device``) before joining. ``timeout_s`` bounds
    every collective (default: ``$DEEPSQUEEZE_DIST_TIMEOUT`` or 300 s).
    """
    if backend not in BACKENDS:
        raise DistributedError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed support")
    if dist.is_initialized():
        return _context_with_device(current_context())
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
               if v not in os.environ]
    if missing:
        raise DistributedError(
            f"not started by torchrun (missing ${', $'.join(missing)}); launch with "
            "`torchrun --nproc-per-node N -m deepsqueeze train ...` or `deepsqueeze train "
            "--nproc N`"
        )
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not dist.is_nccl_available():
        raise DistributedError("backend nccl asked for but this torch build has no NCCL")
    ctx = env_context()
    if backend == "nccl":
        if ctx.local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"local rank {ctx.local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                "use --nproc-per-node <= the number of GPUs per node"
            )
        torch.cuda.set_device(ctx.local_rank)
    seconds = timeout_s if timeout_s is not None else timeout_from_env()
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(f"could not join the process group ({backend}): {exc}") from exc
    _timeout_in_use[:] = [seconds]
    atexit.register(shutdown_distributed)
    return _context_with_device(current_context())


def _context_with_device(ctx: DistributedContext) -> DistributedContext:
    device = (
        torch.device("cuda", ctx.local_rank) if ctx.backend == "nccl" else torch.device("cpu")
    )
    return DistributedContext(ctx.rank, ctx.world_size, ctx.local_rank, device, ctx.backend)


def ensure_distributed(device: torch.device) -> DistributedContext:
    """The context ``fit`` trains in: joins torchrun's group on first use (world size > 1).

    Single process (no torchrun, or ``WORLD_SIZE=1``): a rank-0 context, nothing initialized.
    The backend follows the training device: nccl for CUDA, gloo for CPU.
    """
    if dist.is_available() and dist.is_initialized():
        ctx = _context_with_device(current_context())
    elif launched_by_torchrun() and env_context().world_size > 1:
        ctx = init_distributed("nccl" if device.type == "cuda" else "gloo")
    else:
        return DistributedContext(device=device)
    if device.type == "cuda" and ctx.backend != "nccl":
        raise DistributedError(
            f"training on CUDA needs the nccl backend, but the process group uses {ctx.backend}"
        )
    if device.type == "cpu" and ctx.backend == "nccl":
        raise DistributedError(
            "the process group uses nccl (CUDA tensors only) but training is on the CPU; "
            "use --device cuda, or gloo for CPU training"
        )
    return ctx


def shutdown_distributed() -> None:
    """Leave the process group if this process is in one (safe to call twice)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class Shard(NamedTuple):
    """One rank's share of one global batch.

    ``indices``: sample indices into the dataset; ``positions``: where each sits in the global
    batch (for augmentation draws); ``weight``: 1.0 for real samples, 0.0 for wrap-around padding;
    ``global_size``: the number of real samples in the whole global batch.
    """

    indices: torch.Tensor
    positions: torch.Tensor
    weight: torch.Tensor
    global_size: int


def shard_batch(batch: torch.Tensor, rank: int, world_size: int) -> Shard:
    """Rank ``rank``'s contiguous, equal-sized share of the global batch ``batch`` (indices).

    The batch is padded by wrapping around to ``ceil(len/world_size) * world_size`` entries so
    every rank gets the same number of rows (padding rows have weight 0).
    """
    if not 0 <= rank < world_size:
        raise DistributedError(f"rank {rank} outside world of size {world_size}")
    size = len(batch)
    if size == 0:
        raise DistributedError("empty global batch")
    per_rank = -(-size // world_size)
    padded = torch.arange(rank * per_rank, (rank + 1) * per_rank, device=batch.device)
    positions = padded % size
    weight = (padded < size).to(torch.float32)
    return Shard(batch[positions], positions, weight, size)


def shard_indices(
    order: torch.Tensor, rank: int, world_size: int, batch_size: int
) -> list[Shard]:
    """Every step's shard for ``rank`` of one epoch ordered by ``order`` (GLOBAL ``batch_size``).

    There are ``ceil(len(order) / batch_size)`` steps on every rank, as in a single-process run;
    the union of the ranks' real samples in step ``i`` is exactly the single-process batch ``i``.
    """
    return [
        shard_batch(order[start : start + batch_size], rank, world_size)
        for start in range(0, len(order), batch_size)
    ]


def all_reduce_sum(tensor: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (no-op in a single process); returns it."""
    if ctx.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    """Element-wise maximum of ``tensor`` over all ranks, in place; returns it."""
    if ctx.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def barrier(ctx: DistributedContext) -> None:
    """Wait for every rank (no-op in a single process); bounded by the collective timeout."""
    if ctx.is_distributed:
        if ctx.backend == "nccl" and ctx.device is not None:
            dist.barrier(device_ids=[ctx.device.index or 0])
        else:
            dist.barrier()


def collective_failure(exc: BaseException, ctx: DistributedContext) -> DistributedError:
    """A clear error for a collective that failed because a peer died or hung."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    timeout = _timeout_in_use[0] if _timeout_in_use else timeout_from_env()
    return DistributedError(
        f"rank {ctx.rank}/{ctx.world_size}: a collective operation failed: another rank died, "
        f"hung for more than the {timeout:g} s timeout (--dist-timeout / ${ENV_TIMEOUT}), or "
        f"lost its connection; see that rank's log. Detail: {detail}"
    )


# ------------------------------------------------------------------------------------------------
# Launching: `deepsqueeze train --nproc N` runs torchrun for the user.


def strip_option(argv: Sequence[str], name: str) -> list[str]:
    """``argv`` without option ``name`` and its value (``--name V`` or ``--name=V``)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == name:
            skip = True
            continue
        if arg.startswith(name + "="):
            continue
        out.append(arg)
    return out


def torchrun_args(argv: Sequence[str], nproc: int, module: str = "deepsqueeze") -> list[str]:
    """torchrun's command line for ``nproc`` local workers running ``python -m module <argv>``."""
    if nproc < 1:
        raise DistributedError(f"--nproc must be at least 1, got {nproc}")
    return ["--standalone", "--nproc-per-node", str(nproc), "-m", module, *argv]


def launch_torchrun(argv: Sequence[str], nproc: int, module: str = "deepsqueeze") -> int:
    """Run ``torchrun --standalone --nproc-per-node N -m deepsqueeze <argv>``; its exit code.

    The elastic agent runs in this process (as the ``torchrun`` console script does: it is the
    same ``torch.distributed.run`` entry point), which saves a second interpreter start-up. The
    workers are fresh ``python -m deepsqueeze`` processes, each with ``cores // nproc`` intra-op
    threads unless ``$OMP_NUM_THREADS`` says otherwise. When a worker fails, the agent stops the
    others; the first failure's exit code is returned (1 if it died from a signal).
    """
    if launched_by_torchrun():
        raise DistributedError(
            "--nproc launches torchrun itself; under torchrun leave --nproc out"
        )
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from deepsqueeze.options import check_int

    check_int("--nproc (processes)", nproc, 1, 1024)
    if "OMP_NUM_THREADS" not in os.environ:  # share this node's cores between the workers
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    # workers run `python -m`, which puts the working directory first on sys.path: with
    # PYTHONSAFEPATH (Python 3.11+) a torch.py lying there is not imported in their place
    safe_path = os.environ.get("PYTHONSAFEPATH")
    os.environ["PYTHONSAFEPATH"] = "1"
    args = parse_args(torchrun_args(argv, nproc, module))
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 1
        print(
            f"error: distributed training failed: rank {rank} exited with code "
            f"{failure.exitcode} first (see its output above); the other ranks were stopped",
            file=sys.stderr,
        )
        return code
    finally:
        if safe_path is None:
            os.environ.pop("PYTHONSAFEPATH", None)
        else:
            os.environ["PYTHONSAFEPATH"] = safe_path
    return 0


__all__ = [
    "DEFAULT_TIMEOUT_S", "ENV_TIMEOUT", "DistributedContext", "DistributedError", "Shard",
    "all_reduce_max", "all_reduce_sum", "barrier", "collective_failure", "current_context",
    "ensure_distributed", "env_context", "init_distributed", "is_main_process", "launch_torchrun",
    "launched_by_torchrun", "shard_batch", "shard_indices", "shutdown_distributed",
    "strip_option", "timeout_from_env", "torchrun_args",
]
