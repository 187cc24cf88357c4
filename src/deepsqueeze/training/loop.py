"""The training loop every run and every compression fine-tuning stage goes through.

Data lives in memory as one normalized tensor and batches are index slices (no DataLoader
workers: on a 2-core laptop they cost more than they give for MNIST-sized data). The sample order
of epoch ``e`` depends only on ``(seed, e)``, so a run resumed from its last epoch checkpoint
replays exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import gc
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset, default_collate

from deepsqueeze import models
from deepsqueeze.data import ImageDataset
from deepsqueeze.data.loaders import (
    DataLike,
    as_dataset,
    as_tuple,
    batch_len,
    iter_batches,
    move,
    split_batch,
)
from deepsqueeze.errors import CheckpointError, DataError, DeepSqueezeError, OptionError
from deepsqueeze.io import CHECKPOINT_FORMAT, FORMAT_VERSION, atomic_save, safe_load
from deepsqueeze.methods.base import LossTerm, StepHook
from deepsqueeze.metrics.accuracy import (
    AccuracyResult,
    LossFn,
    Metric,
    accuracy_and_loss,
    evaluate_batches,
    is_classification,
)
from deepsqueeze.options import describe_validation_error
from deepsqueeze.progress import progress_bar
from deepsqueeze.training.distributed import (
    DistributedContext,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    collective_failure,
    ensure_distributed,
    shard_batch,
)
from deepsqueeze.training.precision import Precision, resolve_device, resolve_precision

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"


MAX_EPOCHS = 100_000
MAX_BATCH_SIZE = 1 << 24
MAX_SEED = 2**32 - 1  # numpy's seed range; torch generators take every such seed


class TrainConfig(BaseModel):
    """Hyper-parameters of one training run or fine-tuning stage (validated).

    Every number must be finite and in range; a bad value raises :class:`OptionError` naming the
    option, what it may be, and the value given (inside a recipe, the recipe's ``RecipeError``).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    epochs: float = Field(10, ge=0, le=MAX_EPOCHS,
                          description="epochs; fractions allowed for short stages")
    batch_size: int = Field(128, ge=1, le=MAX_BATCH_SIZE)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    lr_schedule: Literal["cosine", "constant", "step"] = "cosine"
    precision: Precision = "fp32"
    seed: int = Field(0, ge=0, le=MAX_SEED)
    augment: bool | None = Field(None, description="crop+flip; default: on for colour images")
    distill: float = Field(
        0.0, ge=0, le=1,
        description="weight of the distillation loss (Hinton et al. 2015) against the teacher "
        "passed to fit; in a recipe the teacher is the model before compression",
    )
    temperature: float = Field(4.0, gt=0, description="softmax temperature of distillation")
    device: str = "auto"

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if device != "auto":
            try:
                torch.device(device)
            except (RuntimeError, ValueError) as exc:
                raise ValueError("should be auto, cpu, cuda or cuda:N (a torch device)") from exc
        return device

    def __init__(self, **options: Any) -> None:
        try:
            super().__init__(**options)
        except ValidationError as exc:
            raise OptionError(
                "invalid training option: " + describe_validation_error(exc)
            ) from exc

    # Inside a recipe, pydantic validates the nested config itself and reports the field's
    # path (stages.0.finetune.lr); this marks __init__ as not needed there (tests cover both).
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]


@dataclass
class FitResult:
    """What a run produced: per-epoch history and the final test metrics."""

    history: list[dict[str, Any]] = field(default_factory=list)
    test_accuracy: float | None = None
    test_loss: float | None = None
    train_time_s: float = 0.0
    epochs_completed: int = 0
    resumed_from_epoch: int = 0
    test_metric: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample permutation of one epoch; a pure function of ``(seed, epoch)``."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=gen)


def augment_batch(
    x: torch.Tensor,
    gen: torch.Generator,
    pad: int = 4,
    *,
    positions: torch.Tensor | None = None,
    total: int | None = None,
) -> torch.Tensor:
    """Random crop (zero padding ``pad``) and horizontal flip, as for CIFAR in He et al. 2016.

    With ``positions``/``total`` (a distributed rank's shard), the random draws are made for the
    whole global batch of ``total`` samples and row ``j`` of ``x`` uses those of global position
    ``positions[j]``: every sample is augmented as in a single-process run.
    """
    n, _, h, w = x.shape
    m = n if positions is None else int(total if total is not None else n)
    flip = torch.rand(m, generator=gen) < 0.5
    dy = torch.randint(0, 2 * pad + 1, (m,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (m,), generator=gen)
    if positions is not None:
        pos = positions.cpu()
        flip, dy, dx = flip[pos], dy[pos], dx[pos]
    x = torch.where(flip.view(n, 1, 1, 1).to(x.device), x.flip(3), x)
    padded = F.pad(x, (pad, pad, pad, pad))
    offsets = zip(dy.tolist(), dx.tolist(), strict=True)
    return torch.stack([padded[i, :, a : a + h, b : b + w] for i, (a, b) in enumerate(offsets)])


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise DeepSqueezeError("the model has no trainable parameters")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(  # Nesterov needs momentum: momentum 0 is plain SGD
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
            nesterov=cfg.momentum > 0,
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _lr_lambda(schedule: str, total_steps: int) -> Callable[[int], float]:
    total = max(total_steps, 1)
    if schedule == "cosine":
        return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    if schedule == "step":
        return lambda step: 0.1 ** ((step >= total // 2) + (step >= 3 * total // 4))
    return lambda step: 1.0


def _optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, scaler: Any, sched: Any,
                    step_hooks: Sequence[StepHook], step: int, model: nn.Module) -> None:
    """Backward through the (scaled) loss, one optimizer and schedule step, then the hooks."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    sched.step()
    for hook in step_hooks:
        hook(step, model)


def _checkpoint_state(model, opt, sched, scaler, epoch, cfg, history) -> dict[str, Any]:
    try:
        spec = models.spec_of(model).to_dict()
    except DeepSqueezeError:
        spec = None
    return {
        "format": CHECKPOINT_FORMAT,
        "version": FORMAT_VERSION,
        "model_spec": spec,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "config": cfg.model_dump(),
        "history": json.dumps(history),
    }


def _add_terms(loss: torch.Tensor, terms: Sequence[LossTerm], step: int,
               model: nn.Module) -> torch.Tensor:
    """``loss`` plus each method's loss term at ``step`` (each must be a finite scalar)."""
    for term in terms:
        extra = term(step, model)
        if not isinstance(extra, torch.Tensor) or extra.dim() != 0:
            raise DeepSqueezeError(
                f"a loss term must return a scalar tensor, {term!r} returned "
                f"{type(extra).__name__} {tuple(getattr(extra, 'shape', ()))}"
            )
        loss = loss + extra.to(loss.dtype)
    return loss


def _per_sample_loss(
    logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor, teacher: nn.Module | None,
    cfg: TrainConfig,
) -> torch.Tensor:
    """Cross-entropy per sample, blended with the teacher's distillation loss when asked."""
    ce = F.cross_entropy(logits.float(), y, reduction="none")
    if cfg.distill <= 0 or teacher is None:
        return ce
    t = cfg.temperature
    with torch.no_grad():
        soft_target = F.softmax(teacher(x).float() / t, dim=1)
    kl = F.kl_div(F.log_softmax(logits.float() / t, dim=1), soft_target, reduction="none")
    return (1 - cfg.distill) * ce + cfg.distill * (t * t) * kl.sum(dim=1)


def fit(
    model: nn.Module,
    train_set: ImageDataset | DataLike,
    config: TrainConfig | None = None,
    *,
    test_set: ImageDataset | DataLike | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    step_hooks: Sequence[StepHook] = (),
    progress: bool = True,
    description: str = "train",
    teacher: nn.Module | None = None,
    loss_fn: LossFn | None = None,
    metric: Metric | None = None,
    loss_terms: Sequence[LossTerm] = (),
) -> FitResult:
    """Train ``model`` in place on ``train_set`` and return the history.

    ``train_set`` is one of our datasets (:class:`ImageDataset`) or the user's own data: a
    ``DataLoader``, a ``Dataset`` of ``(inputs, target)`` items or a pair ``(X, y)`` (see
    :mod:`deepsqueeze.data.loaders`); inputs may be a tuple for a model with several inputs
    (``model(*inputs)``). ``loss_fn(outputs, target)`` (mean over the batch; default
    cross-entropy) and ``metric`` (default top-1 accuracy; ``metric(outputs, targets)`` or
    ``metric(model)``) apply to the user's data; a DataLoader is iterated as given (its order,
    its batch size), other data in the order ``epoch_order(n, config.seed, epoch)`` with
    ``config.batch_size``. Checkpoints (``out_dir``), ``augment`` and torchrun are for our
    datasets only. An ImageDataset without ``loss_fn``/``metric`` takes the path described below.

    With ``config.distill > 0`` the loss is ``(1 - distill) * cross-entropy + distill * T² *
    KL(teacher || model)`` on softened outputs (temperature ``T``); ``teacher`` is then required
    and is only run forward, in eval mode. Each of ``loss_terms`` (``term(step, model)``, a
    method's prior such as sparse variational dropout's KL divergence) is added to every batch's
    mean loss.

    With ``out_dir``, a checkpoint is written atomically after every epoch and one JSON line per
    epoch is appended to ``metrics.jsonl``; ``resume=True`` continues from that checkpoint.

    Under ``torchrun`` (world size > 1) the run is synchronous data-parallel (see
    ``deepsqueeze.training.distributed``): the model is wrapped in ``DistributedDataParallel``,
    ``config.batch_size`` is the GLOBAL batch and each rank trains on its share of it, so the
    updates equal a single-process run's. Every rank runs ``step_hooks`` after every step on its
    own replica, so hooks must be deterministic functions of ``(step, model)`` (they then keep,
    e.g., pruning masks identical on every rank) and must not add or remove parameters. Only
    rank 0 writes files and draws the progress bar; every rank reads the checkpoint on resume
    and returns the same history.
    """
    if (_is_image_data(train_set) and loss_fn is None and metric is None
            and (test_set is None or _is_image_data(test_set))):
        return _fit_images(model, train_set, config, test_set=test_set, out_dir=out_dir,
                           resume=resume, step_hooks=step_hooks, progress=progress,
                           description=description, teacher=teacher, loss_terms=loss_terms)
    return _fit_batches(model, train_set, config, test_set=test_set, out_dir=out_dir,
                        resume=resume, step_hooks=step_hooks, progress=progress,
                        description=description, teacher=teacher, loss_fn=loss_fn,
                        metric=metric, loss_terms=loss_terms)


def _is_image_data(data: Any) -> bool:
    """One of our datasets (or an object with the same ``normalized()``/``labels``/
    ``input_shape``): the in-memory path of ``fit``."""
    return isinstance(data, ImageDataset) or (
        not isinstance(data, (DataLoader, tuple, list))
        and callable(getattr(data, "normalized", None))
        and isinstance(getattr(data, "labels", None), torch.Tensor)
        and hasattr(data, "input_shape")
    )


def _fit_images(
    model: nn.Module,
    train_set: ImageDataset,
    config: TrainConfig | None,
    *,
    test_set: ImageDataset | None,
    out_dir: str | Path | None,
    resume: bool,
    step_hooks: Sequence[StepHook],
    progress: bool,
    description: str,
    teacher: nn.Module | None,
    loss_terms: Sequence[LossTerm] = (),
) -> FitResult:
    """``fit`` on one of our datasets: in-memory tensors, index-slice batches, checkpoints."""
    cfg = config or TrainConfig()
    device = resolve_device(cfg.device)
    ctx = ensure_distributed(device)
    if ctx.is_distributed and ctx.device is not None:
        device = ctx.device  # CUDA: this rank's GPU (LOCAL_RANK)
    policy = resolve_precision(cfg.precision, device)
    if cfg.distill > 0:
        if teacher is None:
            raise DeepSqueezeError(
                "distill > 0 needs a teacher model: pass teacher= to fit (compress passes the "
                "model as it was before compression)"
            )
        teacher = teacher.to(device).eval()
    model.to(device)
    x_train = train_set.normalized().to(device)
    y_train = train_set.labels.to(device)
    x_test = test_set.normalized().to(device) if test_set is not None else None
    augment = cfg.augment if cfg.augment is not None else train_set.input_shape[0] == 3

    n = len(y_train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = math.ceil(cfg.epochs * steps_per_epoch)
    num_epochs = math.ceil(cfg.epochs)
    opt = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.lr_schedule, total_steps))
    scaler = policy.grad_scaler(device)

    out = Path(out_dir) if out_dir is not None else None
    result = FitResult()
    start_epoch = 0
    if resume:
        if out is None:
            raise DeepSqueezeError("resume needs an output folder holding a checkpoint")
        ckpt_path = out / CHECKPOINT_NAME
        if ckpt_path.exists():
            state = safe_load(ckpt_path, CHECKPOINT_FORMAT)
            try:
                model.load_state_dict(state["model"])
                opt.load_state_dict(state["optimizer"])
                sched.load_state_dict(state["scheduler"])
                scaler.load_state_dict(state["scaler"])
            except (KeyError, RuntimeError, ValueError) as exc:
                raise CheckpointError(
                    f"{ckpt_path}: does not fit this model/optimizer ({exc}); "
                    "resume with the same model and options, or start a new --out folder"
                ) from exc
            start_epoch = int(state["epoch"])
            result.history = json.loads(state["history"])
            result.resumed_from_epoch = start_epoch
    if ctx.is_distributed:
        _check_same_start(start_epoch, ctx, out)
    if out is not None and ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        metrics_path = out / METRICS_NAME
        if not resume:
            metrics_path.write_text("")

    step = start_epoch * steps_per_epoch
    t_start = time.perf_counter()
    net: nn.Module = model  # what is trained: the model, or its DDP wrapper
    try:
        if ctx.is_distributed:
            # broadcasts rank 0's parameters and buffers; averages gradients in backward.
            # Parameters the forward never uses (e.g. the original weight under a weight-sharing
            # parametrization) need DDP's unused-parameter detection.
            net = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=bool(_unused_parameters(model, x_train[:2])),
            )
        with progress_bar(enabled=progress and ctx.is_main) as bar:
            for epoch in range(start_epoch, num_epochs):
                epoch_steps = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
                task = bar.add_task(
                    f"{description} epoch {epoch + 1}/{num_epochs}", total=epoch_steps, status=""
                )
                status = ""
                order = epoch_order(n, cfg.seed, epoch).to(device)
                aug_gen = torch.Generator().manual_seed(cfg.seed * 7919 + epoch)
                net.train()
                # loss sum, correct, samples: this rank's; summed over the ranks when shown
                stats = torch.zeros(3, dtype=torch.float64, device=device)
                shown = stats.clone()
                t_epoch = time.perf_counter()
                for i in range(epoch_steps):
                    batch = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
                    shard = None
                    if ctx.is_distributed:  # this rank's share of the global batch
                        shard = shard_batch(batch, ctx.rank, ctx.world_size)
                    idx = batch if shard is None else shard.indices
                    x, y = x_train[idx], y_train[idx]
                    if augment:
                        x = augment_batch(x, aug_gen, total=len(batch),
                                          positions=None if shard is None else shard.positions)
                    with policy.autocast(device):
                        logits = net(x)
                        per_sample = _per_sample_loss(logits, y, x, teacher, cfg)
                        if shard is None:
                            loss = per_sample.mean()
                        else:
                            # sum over real samples x W / global batch: once DDP averages over
                            # the W ranks, the gradient is the mean over the global batch
                            per_sample = shard.weight * per_sample
                            loss = per_sample.sum() * (ctx.world_size / shard.global_size)
                        # a prior's term, the same on every rank: DDP's mean keeps it once
                        loss = _add_terms(loss, loss_terms, step, model)
                    if not torch.isfinite(loss):
                        where = f" on rank {ctx.rank}" if ctx.is_distributed else ""
                        raise DeepSqueezeError(
                            f"loss became {loss.item()} at epoch {epoch + 1} step {i + 1}{where}; "
                            "lower the learning rate (--lr) or use --precision fp32"
                        )
                    _optimizer_step(loss, opt, scaler, sched, step_hooks, step, model)
                    step += 1
                    hits = (logits.detach().argmax(1) == y).double()
                    if shard is None:
                        stats[0] += loss.detach().double() * len(y)
                        stats[1] += hits.sum()
                        stats[2] += len(y)
                    else:
                        stats[0] += per_sample.detach().sum().double()
                        stats[1] += (hits * shard.weight).sum()
                        stats[2] += shard.weight.sum().double()
                    if i % 20 == 0 or i == epoch_steps - 1:
                        shown = all_reduce_sum(stats.clone(), ctx)  # every rank, same steps
                        seen = max(float(shown[2]), 1.0)
                        status = (f"loss {float(shown[0]) / seen:.4f} "
                                  f"acc {float(shown[1]) / seen:.2%}")
                        bar.update(task, completed=i + 1, status=status)
                seen, elapsed = max(float(shown[2]), 1.0), time.perf_counter() - t_epoch
                record: dict[str, Any] = {
                    "epoch": epoch + 1,
                    "step": step,
                    "train_loss": float(shown[0]) / seen,
                    "train_accuracy": float(shown[1]) / seen,
                    "lr": opt.param_groups[0]["lr"],
                    "epoch_time_s": elapsed,
                    "samples_per_s": float(shown[2]) / max(elapsed, 1e-9),
                }
                if ctx.is_distributed:
                    record["world_size"] = ctx.world_size
                if x_test is not None and test_set is not None:
                    acc = _evaluate(model, x_test, test_set.labels, policy.autocast_dtype, ctx)
                    record.update(test_accuracy=acc.accuracy, test_loss=acc.loss)
                    result.test_accuracy, result.test_loss = acc.accuracy, acc.loss
                    bar.update(task, status=f"{status} | test acc {acc.accuracy:.2%}")
                result.history.append(record)
                if out is not None and ctx.is_main:
                    with (out / METRICS_NAME).open("a") as handle:
                        handle.write(json.dumps(record) + "\n")
                    atomic_save(
                        _checkpoint_state(model, opt, sched, scaler, epoch + 1, cfg,
                                          result.history),
                        out / CHECKPOINT_NAME,
                    )
                barrier(ctx)  # no rank goes on (or returns) before the checkpoint is written
    except RuntimeError as exc:
        if ctx.is_distributed and _is_collective_failure(exc):
            raise collective_failure(exc, ctx) from exc
        raise
    finally:
        if net is not model:  # the DDP wrapper must not outlive the run: its reducer's
            del net  # gradient hooks go with it, before a later stage wraps the model again
            gc.collect()
    result.train_time_s = time.perf_counter() - t_start
    result.epochs_completed = num_epochs
    if result.test_accuracy is None and result.history and "test_accuracy" in result.history[-1]:
        result.test_accuracy = result.history[-1]["test_accuracy"]
        result.test_loss = result.history[-1]["test_loss"]
    model.eval()
    return result


def _batch_loss(
    outputs: Any, y: torch.Tensor, xs: tuple[torch.Tensor, ...], teacher: nn.Module | None,
    cfg: TrainConfig, loss_fn: LossFn | None,
) -> torch.Tensor:
    """The user's loss (default cross-entropy), blended with distillation when asked."""
    if loss_fn is None:
        if not is_classification(outputs, y):
            raise DeepSqueezeError(
                "the default loss is cross-entropy, for outputs (N, classes) and integer class "
                f"targets (N,); got outputs {_shape(outputs)} and targets {_shape(y)}: pass "
                "loss_fn=(outputs, target) -> scalar tensor (e.g. torch.nn.MSELoss())"
            )
        base = F.cross_entropy(outputs.float(), y)
    else:
        base = loss_fn(outputs, y)
        if not isinstance(base, torch.Tensor) or base.numel() != 1:
            raise DeepSqueezeError(
                f"loss_fn must return a scalar tensor (the mean over the batch), got "
                f"{_shape(base)}"
            )
        base = base.reshape(()).float()
    if cfg.distill <= 0 or teacher is None:
        return base
    if not isinstance(outputs, torch.Tensor) or outputs.dim() < 2:
        raise DeepSqueezeError(
            f"distillation compares softmax outputs over dimension 1; the model gives "
            f"{_shape(outputs)}: set distill: 0 for this model"
        )
    t = cfg.temperature
    with torch.no_grad():
        soft_target = F.softmax(teacher(*xs).float() / t, dim=1)
    kl = F.kl_div(F.log_softmax(outputs.float() / t, dim=1), soft_target, reduction="none")
    kl_per_sample = kl.sum(dim=1).reshape(len(kl), -1).mean(dim=1)
    return (1 - cfg.distill) * base + cfg.distill * (t * t) * kl_per_sample.mean()


def _shape(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _epoch_batches(
    data: DataLike, cfg: TrainConfig, epoch: int
) -> tuple[Iterator[Any], int]:
    """The batches of one epoch and how many there are.

    A DataLoader is iterated as given; other data is batched in ``epoch_order`` (a pure function
    of the seed and the epoch, as for our datasets)."""
    if isinstance(data, DataLoader):
        try:
            count = len(data)
        except TypeError as exc:
            raise DataError(
                "train_data is a DataLoader over an iterable dataset without a length; training "
                "needs the number of batches per epoch: give a map-style Dataset or define "
                "__len__"
            ) from exc
        def lazy() -> Iterator[Any]:
            # the loader's iterator (which draws from its generator, or the global RNG) is
            # created when the epoch starts, as in the user's own loop (a generator expression
            # would create it at once)
            yield from data

        return lazy(), count
    dataset = as_dataset(data)
    if dataset is None:
        raise DataError("train_data: an iterable dataset needs a DataLoader with a known length")
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise DataError("train_data holds no samples")
    order = epoch_order(n, cfg.seed, epoch)
    size = cfg.batch_size

    def batches() -> Iterator[Any]:
        for start in range(0, n, size):
            idx = order[start : start + size]
            if isinstance(dataset, TensorDataset):
                yield [t[idx] for t in dataset.tensors]
            else:
                yield default_collate([dataset[i] for i in idx.tolist()])

    return batches(), math.ceil(n / size)


def _fit_batches(
    model: nn.Module,
    train_data: DataLike,
    config: TrainConfig | None,
    *,
    test_set: DataLike | None,
    out_dir: str | Path | None,
    resume: bool,
    step_hooks: Sequence[StepHook],
    progress: bool,
    description: str,
    teacher: nn.Module | None,
    loss_fn: LossFn | None,
    metric: Metric | None,
    loss_terms: Sequence[LossTerm] = (),
) -> FitResult:
    """``fit`` on the user's own data: batches of ``(inputs, target)``, the user's loss."""
    cfg = config or TrainConfig()
    if out_dir is not None or resume:
        raise OptionError(
            "checkpoints and resume (out_dir/resume) are for deepsqueeze's datasets; with your "
            "own data, save the model yourself between fit calls"
        )
    if cfg.augment:
        raise OptionError(
            "augment (crop + flip) applies to deepsqueeze's image datasets; augment your own "
            "data in your Dataset or DataLoader (e.g. torchvision transforms)"
        )
    device = resolve_device(cfg.device)
    ctx = ensure_distributed(device)
    if ctx.is_distributed:
        raise DeepSqueezeError(
            "data-parallel training under torchrun takes a deepsqueeze dataset; with your own "
            "data, wrap the model in DistributedDataParallel in your own loop and drive the "
            "compression with deepsqueeze.prepare(...) and session.step()"
        )
    policy = resolve_precision(cfg.precision, device)
    if cfg.distill > 0:
        if teacher is None:
            raise DeepSqueezeError(
                "distill > 0 needs a teacher model: pass teacher= to fit (compress passes the "
                "model as it was before compression)"
            )
        teacher = teacher.to(device).eval()
    model.to(device)
    if not isinstance(train_data, DataLoader):  # (X, y), ImageDataset: tensors built once
        train_data = as_dataset(train_data) or train_data
    _, steps_per_epoch = _epoch_batches(train_data, cfg, 0)
    if steps_per_epoch == 0:
        raise DataError("train_data holds no batches")
    total_steps = math.ceil(cfg.epochs * steps_per_epoch)
    num_epochs = math.ceil(cfg.epochs)
    opt = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.lr_schedule, total_steps))
    scaler = policy.grad_scaler(device)
    result = FitResult()
    step = 0
    t_start = time.perf_counter()
    with progress_bar(enabled=progress) as bar:
        for epoch in range(num_epochs):
            epoch_steps = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
            task = bar.add_task(
                f"{description} epoch {epoch + 1}/{num_epochs}", total=epoch_steps, status=""
            )
            batches, _ = _epoch_batches(train_data, cfg, epoch)
            model.train()
            loss_sum, hits, seen, classify = 0.0, 0.0, 0, True
            t_epoch = time.perf_counter()
            for i, batch in enumerate(batches):
                if i >= epoch_steps:  # a loader longer than its len(): the epoch ends there
                    break
                inputs, y = split_batch(batch, "train_data")
                xs = as_tuple(move(inputs, device))
                y = y.to(device, non_blocking=True)
                with policy.autocast(device):
                    outputs = model(*xs)
                    loss = _batch_loss(outputs, y, xs, teacher, cfg, loss_fn)
                    loss = _add_terms(loss, loss_terms, step, model)
                if not torch.isfinite(loss):
                    raise DeepSqueezeError(
                        f"loss became {loss.item()} at epoch {epoch + 1} step {i + 1}; lower the "
                        "learning rate (lr) or use precision fp32"
                    )
                _optimizer_step(loss, opt, scaler, sched, step_hooks, step, model)
                step += 1
                n = batch_len(xs)
                loss_sum += float(loss.detach()) * n
                seen += n
                classify = classify and is_classification(outputs, y)
                if classify:
                    hits += float((outputs.detach().argmax(1) == y).sum())
                if i % 20 == 0 or i == epoch_steps - 1:
                    acc = f" acc {hits / max(seen, 1):.2%}" if classify else ""
                    bar.update(task, completed=i + 1,
                               status=f"loss {loss_sum / max(seen, 1):.4f}{acc}")
                if i + 1 == epoch_steps < steps_per_epoch:  # a fractional last epoch ends here
                    break
                # a full epoch runs the loader to its end, as a user's `for x, y in loader`
                # does (its sampler's last draws from its generator included)
            elapsed = time.perf_counter() - t_epoch
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "step": step,
                "train_loss": loss_sum / max(seen, 1),
                "train_accuracy": hits / max(seen, 1) if classify else None,
                "lr": opt.param_groups[0]["lr"],
                "epoch_time_s": elapsed,
                "samples_per_s": seen / max(elapsed, 1e-9),
            }
            if test_set is not None:
                scored = evaluate_batches(model, iter_batches(test_set), loss_fn, metric)
                record.update(test_metric=scored.metric, test_loss=scored.loss)
                if scored.name == "accuracy" and metric is None:
                    record["test_accuracy"] = scored.metric
                result.test_metric, result.test_loss = scored.metric, scored.loss
                result.test_accuracy = record.get("test_accuracy")
            result.history.append(record)
    result.train_time_s = time.perf_counter() - t_start
    result.epochs_completed = num_epochs
    model.eval()
    return result


_COLLECTIVE_MARKERS = ("gloo", "nccl", "timed out", "connection", "broken pipe", "peer",
                       "process group", "processgroup", "watchdog")


def _is_collective_failure(exc: BaseException) -> bool:
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    text = str(exc).lower()
    return any(marker in text for marker in _COLLECTIVE_MARKERS)


def _unused_parameters(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Names of trainable parameters that get no gradient from a forward pass on ``x``.

    A dry run in eval mode; buffers (batch-norm statistics, observers) are restored after it.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            out = model(x)
            grads = torch.autograd.grad(out.float().sum(), [p for _, p in named],
                                        allow_unused=True)
    finally:
        model.train(was_training)
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
    return [name for (name, _), g in zip(named, grads, strict=True) if g is None]


def _check_same_start(start_epoch: int, ctx: DistributedContext, out: Path | None) -> None:
    """Every rank must resume from the same epoch (a checkpoint missing on one node would not)."""
    bounds = torch.tensor([start_epoch, -start_epoch], dtype=torch.float64, device=ctx.device)
    all_reduce_max(bounds, ctx)
    high, low = int(bounds[0]), -int(bounds[1])
    if high != low:
        raise DeepSqueezeError(
            f"rank {ctx.rank} would resume from epoch {start_epoch} but the ranks disagree "
            f"(epochs {low}..{high}): every node must see the same {out}/{CHECKPOINT_NAME} "
            "(put --out on a shared filesystem)"
        )


def _evaluate(
    model: nn.Module,
    x_test: torch.Tensor,
    labels: torch.Tensor,
    autocast_dtype: torch.dtype | None,
    ctx: DistributedContext,
) -> AccuracyResult:
    """Test accuracy and loss; distributed: each rank scores an equal slice, sums all-reduced."""
    if not ctx.is_distributed:
        return accuracy_and_loss(model, x_test, labels, 1000, autocast_dtype)
    part = torch.tensor_split(torch.arange(len(labels)), ctx.world_size)[ctx.rank]
    local = accuracy_and_loss(model, x_test[part.to(x_test.device)], labels[part], 1000,
                              autocast_dtype)
    sums = torch.tensor(
        [round(local.accuracy * local.samples), local.loss * local.samples, local.samples],
        dtype=torch.float64, device=ctx.device,
    )
    all_reduce_sum(sums, ctx)
    total = max(int(sums[2]), 1)
    return AccuracyResult(float(sums[0]) / total, float(sums[1]) / total, int(sums[2]))
