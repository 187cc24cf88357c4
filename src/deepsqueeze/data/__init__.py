"""Datasets: registry, search path, checksummed download, IDX and CIFAR readers.

See docs/data.md. Typical use::

    from deepsqueeze.data import load_dataset
    train = load_dataset("mnist", "train")
    x, y = train.normalized(), train.labels
"""

from .dataset import ImageDataset, clear_cache, load_dataset
from .idx import read_idx
from .loaders import as_loader
from .registry import DATASETS, DatasetInfo, FileSpec
from .search import ENV_VAR, find_dataset_dir, search_path, user_cache_dir
from .user import UserData, UserDataset, load_user_data

__all__ = [
    "DATASETS",
    "ENV_VAR",
    "DatasetInfo",
    "FileSpec",
    "ImageDataset",
    "UserData",
    "UserDataset",
    "as_loader",
    "clear_cache",
    "find_dataset_dir",
    "load_dataset",
    "load_user_data",
    "read_idx",
    "search_path",
    "user_cache_dir",
]
