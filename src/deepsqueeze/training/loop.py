"""The training loop every run and every compression fine-tuning stage goes through.

Data lives in memory as one normalized tensor and batches are index slices (no DataLoader
workers: on a 2-core laptop they cost more than they give for MNIST-sized data). The sample order
of epoch ``e`` depends only on ``(seed, e)``, so a run resumed from its last epoch checkpoint
replays exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from deepsqueeze import models
from deepsqueeze.data import ImageDataset
from deepsqueeze.errors import CheckpointError, DeepSqueezeError
from deepsqueeze.io import CHECKPOINT_FORMAT, FORMAT_VERSION, atomic_save, safe_load
from deepsqueeze.metrics.accuracy import accuracy_and_loss
from deepsqueeze.progress import progress_bar
from deepsqueeze.training.precision import Precision, resolve_device, resolve_precision

StepHook = Callable[[int, nn.Module], None]
"""Called after every optimizer step with the global step index (0-based) and the model."""

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"


class TrainConfig(BaseModel):
    """Hyper-parameters of one training run or fine-tuning stage (validated)."""

    model_config = ConfigDict(extra="forbid")

    epochs: float = Field(10, ge=0, description="epochs; fractions allowed for short stages")
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    lr_schedule: Literal["cosine", "constant", "step"] = "cosine"
    precision: Precision = "fp32"
    seed: int = 0
    augment: bool | None = Field(None, description="crop+flip; default: on for colour images")
    device: str = "auto"


@dataclass
class FitResult:
    """What a run produced: per-epoch history and the final test metrics."""

    history: list[dict[str, Any]] = field(default_factory=list)
    test_accuracy: float | None = None
    test_loss: float | None = None
    train_time_s: float = 0.0
    epochs_completed: int = 0
    resumed_from_epoch: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample permutation of one epoch; a pure function of ``(seed, epoch)``."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=gen)


def augment_batch(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding ``pad``) and horizontal flip, as for CIFAR in He et al. 2016."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1).to(x.device), x.flip(3), x)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
    return torch.stack([padded[i, :, a : a + h, b : b + w] for i, (a, b) in enumerate(zip(dy, dx))])


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise DeepSqueezeError("the model has no trainable parameters")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True
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


def fit(
    model: nn.Module,
    train_set: ImageDataset,
    config: TrainConfig | None = None,
    *,
    test_set: ImageDataset | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    step_hooks: Sequence[StepHook] = (),
    progress: bool = True,
    description: str = "train",
) -> FitResult:
    """Train ``model`` in place on ``train_set`` and return the history.

    With ``out_dir``, a checkpoint is written atomically after every epoch and one JSON line per
    epoch is appended to ``metrics.jsonl``; ``resume=True`` continues from that checkpoint.
    """
    cfg = config or TrainConfig()
    device = resolve_device(cfg.device)
    policy = resolve_precision(cfg.precision, device)
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
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        metrics_path = out / METRICS_NAME
        if not resume:
            metrics_path.write_text("")

    step = start_epoch * steps_per_epoch
    t_start = time.perf_counter()
    with progress_bar(enabled=progress) as bar:
        for epoch in range(start_epoch, num_epochs):
            epoch_steps = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
            task = bar.add_task(
                f"{description} epoch {epoch + 1}/{num_epochs}", total=epoch_steps, status=""
            )
            status = ""
            order = epoch_order(n, cfg.seed, epoch).to(device)
            aug_gen = torch.Generator().manual_seed(cfg.seed * 7919 + epoch)
            model.train()
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            seen = 0
            t_epoch = time.perf_counter()
            for i in range(epoch_steps):
                idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
                x, y = x_train[idx], y_train[idx]
                if augment:
                    x = augment_batch(x, aug_gen)
                with policy.autocast(device):
                    logits = model(x)
                    loss = F.cross_entropy(logits.float(), y)
                if not torch.isfinite(loss):
                    raise DeepSqueezeError(
                        f"loss became {loss.item()} at epoch {epoch + 1} step {i + 1}; "
                        "lower the learning rate (--lr) or use --precision fp32"
                    )
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                for hook in step_hooks:
                    hook(step, model)
                step += 1
                loss_sum += loss.detach() * len(y)
                correct += (logits.argmax(1) == y).sum()
                seen += len(y)
                if i % 20 == 0 or i == epoch_steps - 1:
                    status = f"loss {loss_sum.item() / seen:.4f} acc {correct.item() / seen:.2%}"
                    bar.update(task, completed=i + 1, status=status)
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "step": step,
                "train_loss": loss_sum.item() / max(seen, 1),
                "train_accuracy": correct.item() / max(seen, 1),
                "lr": opt.param_groups[0]["lr"],
                "epoch_time_s": time.perf_counter() - t_epoch,
                "samples_per_s": seen / max(time.perf_counter() - t_epoch, 1e-9),
            }
            if x_test is not None and test_set is not None:
                acc = accuracy_and_loss(model, x_test, test_set.labels, 1000, policy.autocast_dtype)
                record.update(test_accuracy=acc.accuracy, test_loss=acc.loss)
                result.test_accuracy, result.test_loss = acc.accuracy, acc.loss
                bar.update(task, status=f"{status} | test acc {acc.accuracy:.2%}")
            result.history.append(record)
            if out is not None:
                with (out / METRICS_NAME).open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
                atomic_save(
                    _checkpoint_state(model, opt, sched, scaler, epoch + 1, cfg, result.history),
                    out / CHECKPOINT_NAME,
                )
    result.train_time_s = time.perf_counter() - t_start
    result.epochs_completed = num_epochs
    if result.test_accuracy is None and result.history and "test_accuracy" in result.history[-1]:
        result.test_accuracy = result.history[-1]["test_accuracy"]
        result.test_loss = result.history[-1]["test_loss"]
    model.eval()
    return result
