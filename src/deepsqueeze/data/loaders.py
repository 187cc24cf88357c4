"""A user's own data as batches of ``(inputs, target)``.

Every function that takes data (``compress(train_data=, eval_data=)``, ``fit``, ``evaluate``)
accepts the same kinds, normalized here:

- a ``torch.utils.data.DataLoader`` (used as it is: its batch size, order and workers);
- a map-style ``Dataset`` whose items are ``(inputs, target)`` (or ``(x1, x2, ..., target)``);
- a pair ``(X, y)`` of tensors or NumPy arrays, ``X`` possibly a tuple ``(X1, X2, ...)`` for a
  model with several inputs;
- one of our :class:`~deepsqueeze.data.ImageDataset` splits (normalized images, int labels).

A *batch* is ``(inputs, target)`` where ``inputs`` is a Tensor (``model(inputs)``) or a tuple of
Tensors (``model(*inputs)``). A loader batch of more than two items, ``(x1, x2, ..., y)``,
means the inputs ``(x1, x2, ...)`` and the target ``y`` (as ``TensorDataset(X1, X2, y)`` yields).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, default_collate

from deepsqueeze.errors import DataError

from .dataset import ImageDataset

Inputs = Union[torch.Tensor, tuple[torch.Tensor, ...]]  # noqa: UP007 (a runtime alias)
"""What a model is called with: ``model(x)`` or ``model(*xs)``."""

DataLike = Any
"""Dataset | DataLoader | (X, y) | ImageDataset (see the module docstring)."""

MAX_BATCH_ITEMS = 64  # inputs per sample; more is a sign the batch is not (inputs, target)


def _tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise DataError(f"{what}: a NumPy array of Python objects; give numbers")
        return torch.from_numpy(np.ascontiguousarray(value))
    raise DataError(
        f"{what}: expected a Tensor or a NumPy array, got {type(value).__name__}"
    )


def _pair_dataset(data: tuple[Any, Any] | list[Any]) -> TensorDataset:
    """``(X, y)`` (``X`` a tensor/array or a tuple of them) as a TensorDataset."""
    x, y = data
    xs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    if not xs:
        raise DataError("(X, y): X is an empty tuple; give at least one input tensor")
    tensors = [_tensor(t, f"(X, y): X[{i}]" if len(xs) > 1 else "(X, y): X")
               for i, t in enumerate(xs)]
    target = _tensor(y, "(X, y): y")
    n = len(target)
    for i, t in enumerate(tensors):
        if t.dim() == 0 or len(t) != n:
            rows = "a scalar" if t.dim() == 0 else f"{len(t)} rows"
            raise DataError(
                f"(X, y): input {i} has {rows} but y has {n}; every input needs one row per "
                "target (batch dimension first)"
            )
    if n == 0:
        raise DataError("(X, y): no samples (y is empty)")
    return TensorDataset(*tensors, target)


def is_data(value: Any) -> bool:
    """Whether ``value`` is one of the kinds of data :func:`as_loader` takes."""
    return isinstance(value, (DataLoader, Dataset, ImageDataset)) or (
        isinstance(value, (tuple, list)) and len(value) == 2
    )


def as_dataset(data: DataLike) -> Dataset | None:
    """The map-style Dataset behind ``data`` (None for a DataLoader or an iterable dataset)."""
    if isinstance(data, ImageDataset):
        return TensorDataset(data.normalized(), data.labels)
    if isinstance(data, DataLoader):
        return None
    if isinstance(data, IterableDataset):
        return None
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return _pair_dataset(data)
    raise DataError(
        f"data of type {type(data).__name__} is not supported: give a torch Dataset of "
        "(inputs, target) items, a DataLoader, a pair (X, y) of tensors or arrays, or a "
        "deepsqueeze dataset (load_dataset)"
    )


def as_loader(
    data: DataLike, batch_size: int = 128, shuffle: bool = False, seed: int = 0
) -> DataLoader:
    """``data`` as a DataLoader of batches (a DataLoader is returned as it is).

    ``shuffle`` draws the order from a generator seeded with ``seed`` (the same seed, the same
    order). ``batch_size``, ``shuffle`` and ``seed`` do not apply to a DataLoader.
    """
    if isinstance(data, DataLoader):
        return data
    dataset = as_dataset(data)
    if dataset is None:  # an IterableDataset: batch it as it streams
        return DataLoader(data, batch_size=batch_size)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def split_batch(batch: Any, where: str = "data") -> tuple[Inputs, torch.Tensor]:
    """A loader's batch as ``(inputs, target)``; a clear DataError for anything else."""
    if isinstance(batch, dict):
        raise DataError(
            f"{where}: batches are dicts (keys {sorted(map(str, batch))[:6]}); give batches of "
            "(inputs, target), e.g. a Dataset whose items are (x, y), or wrap your loader"
        )
    if not isinstance(batch, Sequence) or isinstance(batch, (str, bytes, torch.Tensor)):
        raise DataError(
            f"{where}: a batch must be (inputs, target), got a {type(batch).__name__}; "
            "the items of a Dataset must be (x, y) pairs (or (x1, x2, ..., y))"
        )
    if len(batch) < 2 or len(batch) > MAX_BATCH_ITEMS:
        raise DataError(
            f"{where}: a batch must be (inputs, target), got {len(batch)} item(s)"
        )
    *xs, target = batch
    if len(xs) == 1:
        inputs = xs[0]
        if isinstance(inputs, (tuple, list)):
            inputs = tuple(inputs)
    else:
        inputs = tuple(xs)
    parts = inputs if isinstance(inputs, tuple) else (inputs,)
    if not parts or not all(isinstance(p, torch.Tensor) for p in parts):
        kinds = sorted({type(p).__name__ for p in parts}) or ["nothing"]
        raise DataError(f"{where}: inputs must be tensors, got {', '.join(kinds)}")
    if not isinstance(target, torch.Tensor):
        raise DataError(f"{where}: the target must be a tensor, got {type(target).__name__}")
    return inputs, target


def as_tuple(inputs: Inputs) -> tuple[torch.Tensor, ...]:
    """``inputs`` as a tuple, so that a model is always called ``model(*as_tuple(inputs))``."""
    return inputs if isinstance(inputs, tuple) else (inputs,)


def move(inputs: Inputs, device: torch.device) -> Inputs:
    """``inputs`` on ``device`` (each tensor of a tuple)."""
    if isinstance(inputs, tuple):
        return tuple(t.to(device, non_blocking=True) for t in inputs)
    return inputs.to(device, non_blocking=True)


def batch_len(inputs: Inputs) -> int:
    """Samples in a batch: the first dimension of its first input."""
    first = as_tuple(inputs)[0]
    return int(first.shape[0]) if first.dim() else 1


def iter_batches(data: DataLike, batch_size: int = 1000) -> Iterator[tuple[Inputs, torch.Tensor]]:
    """``(inputs, target)`` batches of ``data`` in order (no shuffling)."""
    for batch in as_loader(data, batch_size=batch_size):
        yield split_batch(batch)


def first_inputs(data: DataLike) -> Inputs:
    """The inputs of the first batch of ``data``: the default ``example_inputs``."""
    if isinstance(data, ImageDataset):
        if len(data) == 0:
            raise DataError("the data holds no samples")
        one = ImageDataset(data.name, data.split, data.images[:1], data.labels[:1], data.info)
        return one.normalized()
    source = data.dataset if isinstance(data, DataLoader) else as_dataset(data)
    if source is not None and not isinstance(source, IterableDataset):
        # one item, collated: the loader is not iterated, so its sampler and generator (and
        # the global RNG it would draw a seed from) are left as they are
        try:
            count = len(source)  # type: ignore[arg-type]
        except TypeError:
            count = None
        if count == 0:
            raise DataError("the data holds no samples")
        if count is not None:
            collate = data.collate_fn if isinstance(data, DataLoader) else default_collate
            inputs, _ = split_batch(collate([source[0]]), "data")
            return inputs
    generator = data.generator if isinstance(data, DataLoader) else None
    saved = generator.get_state() if generator is not None else None
    with torch.random.fork_rng(devices=[]):
        try:
            for inputs, _ in iter_batches(data, batch_size=1):
                return inputs
        finally:
            if generator is not None and saved is not None:
                generator.set_state(saved)
    raise DataError("the data holds no samples")


def sample_count(data: Iterable[Any]) -> int | None:
    """Number of samples of ``data`` (a DataLoader, a Dataset, a pair ``(X, y)``, one of our
    datasets) when it can be told without iterating, else None."""
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return len(_pair_dataset(data))  # type: ignore[arg-type]
    dataset = data.dataset if isinstance(data, DataLoader) else data
    try:
        return len(dataset)  # type: ignore[arg-type]
    except TypeError:
        return None


__all__ = [
    "DataLike", "Inputs", "as_dataset", "as_loader", "as_tuple", "batch_len", "first_inputs",
    "is_data", "iter_batches", "move", "sample_count", "split_batch",
]
