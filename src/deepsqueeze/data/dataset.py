"""ImageDataset and load_dataset: find (or download), verify, parse, validate, cache."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deepsqueeze.errors import DataError, DatasetCorruptError, DatasetNotFoundError

from . import cifar
from .checksum import forget_verified, is_verified, mark_verified, md5_file, verify, verify_file
from .download import DownloadError, download_files
from .idx import MAX_PAYLOAD, decompress, parse_idx, read_bytes
from .registry import DatasetInfo, FileSpec, check_split, get_info
from .search import Located, find_split, locate, not_found_message, user_cache_dir


@dataclass(eq=False, repr=False)
class ImageDataset:
    """One split of a dataset in memory: uint8 images N×C×H×W and int64 labels N."""

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    info: DatasetInfo

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(
                f"{self.name}: images must be uint8 N×C×H×W, got "
                f"{self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise DataError(f"{self.name}: labels must be a 1-D int64 tensor")
        if len(self.images) != len(self.labels):
            raise DataError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes})"
        )

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.images.shape[1:]
        return (int(c), int(h), int(w))

    def subset(self, n: int, seed: int = 0) -> ImageDataset:
        """``n`` samples drawn without replacement, deterministic in ``seed``, stratified by
        class (each class keeps its share, rounded by largest remainder), in dataset order."""
        total = len(self)
        if not 0 < n <= total:
            raise DataError(f"subset size must be in 1..{total}, got {n}")
        perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
        labels = self.labels[perm]
        counts = torch.bincount(labels, minlength=self.num_classes)
        quota, rest = counts * n // total, counts * n % total
        short = n - int(quota.sum())
        quota[torch.argsort(-rest, stable=True)[:short]] += 1
        # rank of each permuted sample among the permuted samples of its class
        sorted_labels, order = torch.sort(labels, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(order)
        rank[order] = torch.arange(total) - starts[sorted_labels]
        idx = torch.sort(perm[rank < quota[labels]]).values
        return ImageDataset(self.name, self.split, self.images[idx], self.labels[idx], self.info)

    def normalized(self) -> torch.Tensor:
        """float32 N×C×H×W: ``(x / 255 - mean) / std`` per channel."""
        mean = torch.tensor(self.info.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.info.std, dtype=torch.float32).view(1, -1, 1, 1)
        return (self.images.to(torch.float32) / 255.0 - mean) / std


def _read_idx_file(path: Path, spec: FileSpec) -> np.ndarray:
    """Read, verify (before decompressing, see ``verify_file``) and parse one IDX file; what
    is read and decompressed is capped by the known size of the real contents."""
    limit = spec.payload_size or MAX_PAYLOAD
    raw = read_bytes(path, spec.max_size or MAX_PAYLOAD)
    verify_file(path, spec, raw)
    return parse_idx(decompress(raw, path, limit), path)


def _load_idx(info: DatasetInfo, where: Located) -> tuple[np.ndarray, np.ndarray]:
    (img_spec, img_path), (lbl_spec, lbl_path) = where.files
    images = _read_idx_file(img_path, img_spec)
    labels = _read_idx_file(lbl_path, lbl_spec)
    if images.dtype != np.uint8 or images.shape[1:] != info.image_shape[1:]:
        raise DatasetCorruptError(
            f"{img_path}: expected uint8 images of shape N×{info.image_shape[1]}×"
            f"{info.image_shape[2]}, found {images.dtype} {images.shape}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DatasetCorruptError(
            f"{lbl_path}: expected a 1-D uint8 label array, found {labels.dtype} {labels.shape}"
        )
    return images[:, None], labels.astype(np.int64)


def _load_cifar(info: DatasetInfo, split: str, where: Located) -> tuple[np.ndarray, np.ndarray]:
    if where.archive:
        ((spec, archive),) = where.files
        if not is_verified(archive, spec):
            got = md5_file(archive)
            if got != spec.md5:
                raise DatasetCorruptError(
                    f"checksum mismatch for {archive}: expected MD5 {spec.md5}, got {got}. "
                    "The archive is corrupt or not the expected one; delete it and download "
                    "it again."
                )
            mark_verified(archive, spec)
        names = [f"{info.extracted_dir}/{m.filename}" for m in info.members(split)]
        return cifar.read_archive(archive, names, info.label_key)
    parts = []
    for spec, path in where.files:
        raw = read_bytes(path)
        verify(path, spec, raw)
        parts.append(cifar.load_batch(raw, str(path), info.label_key))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


@functools.lru_cache(maxsize=8)
def _load_cached(
    info: DatasetInfo, split: str, where: Located, stamp: tuple[tuple[int, int], ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Parse + validate one located split; ``stamp`` (size, mtime per file) keys the cache so
    a changed file is read again."""
    del stamp
    if info.kind == "cifar":
        images, labels = _load_cifar(info, split, where)
    else:
        images, labels = _load_idx(info, where)
    source = ", ".join(str(p) for _, p in where.files)
    if len(images) != len(labels):
        raise DatasetCorruptError(f"{source}: {len(images)} images but {len(labels)} labels")
    if len(labels) == 0:
        raise DatasetCorruptError(f"{source}: the {split} split is empty")
    if tuple(images.shape[1:]) != info.image_shape:
        raise DatasetCorruptError(
            f"{source}: images are {tuple(images.shape[1:])}, expected {info.image_shape}"
        )
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= info.num_classes:
        raise DatasetCorruptError(
            f"{source}: labels span {low}..{high}, outside 0..{info.num_classes - 1}"
        )
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)


def _stamp(where: Located) -> tuple[tuple[int, int], ...]:
    stats = [p.stat() for _, p in where.files]
    return tuple((s.st_size, s.st_mtime_ns) for s in stats)


def clear_cache() -> None:
    """Forget parsed datasets and verified checksums (e.g. after replacing files)."""
    _load_cached.cache_clear()
    forget_verified()


def load_dataset(
    name: str,
    split: str = "train",
    data_dir: str | Path | None = None,
    download: bool = True,
) -> ImageDataset:
    """Load ``split`` ("train" or "test") of dataset ``name``.

    The first folder on ``search_path(name, data_dir)`` holding the split is used; if none
    does and ``download`` is true, the split's files are downloaded into the user cache.
    Files are checksum-verified and parsed once per process (cached by path, size and mtime).
    The returned tensors are fresh copies: mutating them does not affect the cache.
    """
    info = get_info(name)
    check_split(split)
    where, looked = find_split(info, split, data_dir)
    if where is None:
        if not download:
            note = "Download disabled (download=False)."
            raise DatasetNotFoundError(not_found_message(info, (split,), looked, note))
        dest = user_cache_dir() / info.name
        try:
            download_files(info.files(split), info.mirrors, dest)
        except DownloadError as exc:
            msg = not_found_message(info, (split,), looked, exc.describe())
            raise DatasetNotFoundError(msg) from exc
        found = locate(info, dest, split)
        if isinstance(found, str):  # pragma: no cover - download_files guarantees the files
            raise DatasetNotFoundError(f"{dest}: {found} after download")
        where = found
    images, labels = _load_cached(info, split, where, _stamp(where))
    return ImageDataset(info.name, split, images.clone(), labels.clone(), info)
