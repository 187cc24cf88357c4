"""The validation split every selection uses, carved from the training data.

``validation_split(train, size)`` returns ``(fit, val)``: ``fit`` is exactly
``train.subset(len(train) - size, seed)`` (the samples ``deepsqueeze train --subset N --seed S``
trains on) and ``val`` the samples it leaves out. Sensitivity, planning and Pareto sweeps score
on ``val`` and fine-tune on ``fit``; the test split only reports.
"""

from __future__ import annotations

import torch

from deepsqueeze.data import ImageDataset, load_dataset
from deepsqueeze.errors import OptionError

DEFAULT_VALIDATION = 5000
"""Samples held out for selection (MNIST: 60,000 - 5,000 = 55,000 left to fine-tune on)."""


def subset_indices(data: ImageDataset, n: int, seed: int) -> torch.Tensor:
    """Indices (in dataset order) of the samples ``data.subset(n, seed)`` draws.

    The draw depends only on the labels and the seed, so running it on a stand-in dataset whose
    "images" spell each sample's index gives the indices themselves."""
    total = len(data)
    index = torch.arange(total, dtype=torch.int64)
    spelled = torch.stack([(index >> s) & 0xFF for s in (0, 8, 16, 24)], 1).to(torch.uint8)
    stand_in = ImageDataset(data.name, data.split, spelled.view(total, 1, 1, 4), data.labels,
                            data.info)
    drawn = stand_in.subset(n, seed=seed).images.view(n, 4).to(torch.int64)
    return sum(drawn[:, i] << (8 * i) for i in range(4))  # type: ignore[return-value]


def validation_split(
    train: ImageDataset, size: int = DEFAULT_VALIDATION, seed: int = 0
) -> tuple[ImageDataset, ImageDataset]:
    """``(fit, val)``: ``val`` holds ``size`` samples of the training split (stratified,
    seeded), ``fit`` the rest, both in dataset order."""
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size < len(train):
        raise OptionError(
            f"validation size (--val-size) must be an integer in 1..{len(train) - 1} (samples of "
            f"the {len(train)}-sample training split held out for selection), got {size!r:.40}"
        )
    keep = torch.zeros(len(train), dtype=torch.bool)
    keep[subset_indices(train, len(train) - size, seed)] = True
    fit = ImageDataset(train.name, "train", train.images[keep], train.labels[keep], train.info)
    val = ImageDataset(train.name, "validation", train.images[~keep], train.labels[~keep],
                       train.info)
    return fit, val


def load_splits(
    dataset: str, val_size: int = DEFAULT_VALIDATION, seed: int = 0, data_dir: str | None = None,
) -> tuple[ImageDataset, ImageDataset, ImageDataset]:
    """``(fit, val, test)`` of a built-in dataset."""
    train = load_dataset(dataset, "train", data_dir=data_dir)
    fit, val = validation_split(train, val_size, seed)
    return fit, val, load_dataset(dataset, "test", data_dir=data_dir)
