"""The datasets deepsqueeze knows: shapes, normalization constants, files, checksums, mirrors."""

from __future__ import annotations

import math
from dataclasses import dataclass

from deepsqueeze.errors import DataError

SPLITS = ("train", "test")


@dataclass(frozen=True)
class FileSpec:
    """One file of a dataset as its mirrors serve it.

    ``md5`` is the canonical MD5 of the file as served (e.g. the ``.gz``). ``payload_md5`` is
    the MD5 of the decompressed contents, for files that may be re-compressed or stored
    decompressed (``None`` where it is not known). ``payload_size`` is the size of the
    decompressed contents in bytes (``None`` where it is not known): reading a file never
    decompresses more than that.
    """

    filename: str
    md5: str
    payload_md5: str | None = None
    payload_size: int | None = None

    @property
    def max_size(self) -> int | None:
        """Most bytes a copy of the file can have, compressed or not: the contents' size plus
        what gzip adds to incompressible data (``None`` where the size is not known)."""
        if self.payload_size is None:
            return None
        return self.payload_size + self.payload_size // 64 + (64 << 10)

    @property
    def stem(self) -> str:
        """The file name without a ``.gz`` suffix (its decompressed name)."""
        return self.filename[:-3] if self.filename.endswith(".gz") else self.filename


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of one dataset.

    ``kind`` is ``"idx"`` (``train``/``test`` hold an images file and a labels file) or
    ``"cifar"`` (``train``/``test`` hold the one archive; ``train_members``/``test_members``
    are the pickled batches inside it, under ``extracted_dir``).
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    kind: str
    train: tuple[FileSpec, ...]
    test: tuple[FileSpec, ...]
    mirrors: tuple[str, ...]
    dir_names: tuple[str, ...]
    extracted_dir: str = ""
    train_members: tuple[FileSpec, ...] = ()
    test_members: tuple[FileSpec, ...] = ()
    label_key: str = "labels"

    def files(self, split: str) -> tuple[FileSpec, ...]:
        """The downloadable files that hold ``split``."""
        check_split(split)
        return self.train if split == "train" else self.test

    def members(self, split: str) -> tuple[FileSpec, ...]:
        """CIFAR only: the pickled batches that hold ``split``."""
        check_split(split)
        return self.train_members if split == "train" else self.test_members


def check_split(split: str) -> None:
    """Raise DataError unless ``split`` is ``"train"`` or ``"test"``."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of: {', '.join(SPLITS)}")


def _idx_bytes(*dims: int) -> int:
    """Size of an IDX file of uint8 elements with dimensions ``dims``."""
    return 4 + 4 * len(dims) + math.prod(dims)


def _idx(
    name: str,
    mean: float,
    std: float,
    mirrors: tuple[str, ...],
    dir_names: tuple[str, ...],
    sums: tuple[tuple[str, str | None], ...],
) -> DatasetInfo:
    """An MNIST-like dataset: 10 classes of 1×28×28 grey images in four IDX files.

    ``sums`` holds (gz MD5, payload MD5) for train images, train labels, test images, test
    labels, in that order.
    """
    names = ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")
    sizes = (_idx_bytes(60_000, 28, 28), _idx_bytes(60_000), _idx_bytes(10_000, 28, 28),
             _idx_bytes(10_000))
    specs = [
        FileSpec(f"{n}-ubyte.gz", *s, payload_size=size)
        for n, s, size in zip(names, sums, sizes, strict=True)
    ]
    return DatasetInfo(
        name=name,
        num_classes=10,
        image_shape=(1, 28, 28),
        mean=(mean,),
        std=(std,),
        kind="idx",
        train=(specs[0], specs[1]),
        test=(specs[2], specs[3]),
        mirrors=mirrors,
        dir_names=dir_names,
    )


_CIFAR10_BATCHES = (
    ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
    ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
    ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
    ("data_batch_4", "634d18415352ddfa80567beed471001a"),
    ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
)

DATASETS: dict[str, DatasetInfo] = {
    "mnist": _idx(
        "mnist",
        0.1307,
        0.3081,
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        ("mnist", "MNIST/raw"),
        (
            ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "6bbc9ace898e44ae57da46a324031adb"),
            ("d53e105ee54ea40749a09fcbcd1e9432", "a25bea736e30d166cdddb491f175f624"),
            ("9fb629c4189551a2d022fa330f9573f3", "2646ac647ad5339dbf082846283269ea"),
            ("ec29112dd5afa0611ce80d1b7f02629c", "27ae3e4e09519cfbb04c329615203637"),
        ),
    ),
    "fashion-mnist": _idx(
        "fashion-mnist",
        0.2860,
        0.3530,
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw"),
        (
            ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
            ("25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
            ("bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
            ("bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
        ),
    ),
    "kmnist": _idx(
        "kmnist",
        0.1918,
        0.3483,
        ("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
        ("kmnist", "KMNIST/raw"),
        (
            ("bdb82020997e1d708af4cf47b453dcf7", None),
            ("e144d726b3acfaa3e44228e80efcd344", None),
            ("5c965bf0a639b31b8f53240b1b52f4d7", None),
            ("7320c461ea6c1c855c0b718fb2a4b134", None),
        ),
    ),
    "cifar10": DatasetInfo(
        name="cifar10",
        num_classes=10,
        image_shape=(3, 32, 32),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        kind="cifar",
        train=(FileSpec("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),),
        test=(FileSpec("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),),
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        dir_names=("cifar10", "cifar-10"),
        extracted_dir="cifar-10-batches-py",
        train_members=tuple(FileSpec(n, md5) for n, md5 in _CIFAR10_BATCHES),
        test_members=(FileSpec("test_batch", "40351d587109b95175f43aff81a1287e"),),
        label_key="labels",
    ),
    "cifar100": DatasetInfo(
        name="cifar100",
        num_classes=100,
        image_shape=(3, 32, 32),
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        kind="cifar",
        train=(FileSpec("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),),
        test=(FileSpec("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),),
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        dir_names=("cifar100", "cifar-100"),
        extracted_dir="cifar-100-python",
        train_members=(FileSpec("train", "16019d7e3df5f24257cddd939b257f8d"),),
        test_members=(FileSpec("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),),
        label_key="fine_labels",
    ),
}

_ALIASES = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar-100": "cifar100"}


def get_info(name: str) -> DatasetInfo:
    """The DatasetInfo for ``name`` (case-insensitive; ``_`` and ``-`` are interchangeable)."""
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
    return DATASETS[key]
