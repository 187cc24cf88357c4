"""A user's own data as datasets: ``.npz`` arrays and folders of images (one folder per class).

``load_user_data(path)`` returns a :class:`UserData`: a training and a test
:class:`UserDataset` (torch Datasets of ``(inputs, target)``, ``inputs`` a Tensor or, for a
model with several inputs, a tuple of Tensors) with the metadata a model needs (number of
classes, input shapes). When the files hold no test split, one is carved from the training data
(seeded, class-stratified) and named a validation split.

Files are untrusted input and reading them is bounded: ``.npz`` members are read with
``allow_pickle=False`` (always; an object array is refused), each array's header is checked
against the member's size before anything is allocated, and declared sizes are capped; images
are decoded only by Pillow's PNG, JPEG and BMP readers, their pixel count checked from the
header before decoding. Only regular files are opened. Every defect is a :class:`DataError`
naming the file and what to do. See docs/own-models.md.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from deepsqueeze.errors import DataError
from deepsqueeze.inputs import NotReadable, open_input

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_DATA_BYTES",
    "UserData",
    "UserDataset",
    "load_image_folder",
    "load_npz",
    "load_user_data",
]

MAX_DATA_BYTES = 2 << 30
"""Most bytes the arrays of one ``.npz`` (as declared, uncompressed) or one image folder (as
decoded) may hold: 2 GiB."""
MAX_ARRAYS = 64
"""Most members an ``.npz`` may have (inputs ``x0..x31``, labels, splits)."""
MAX_IMAGE_PIXELS = 1 << 24
"""Most pixels one image may have (4096×4096)."""
MAX_IMAGE_FILE_BYTES = 64 << 20
MAX_CLASSES = 1 << 16
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
_IMAGE_FORMATS = ["PNG", "JPEG", "BMP"]
_SPLIT_DIRS = {"train": "train", "test": "test", "val": "test", "validation": "test"}
_KEY = re.compile(r"^(?P<kind>x|y)(?P<index>0|[1-9][0-9]?)?(?:_(?P<split>train|test))?$")


class UserDataset(Dataset):
    """One split of a user's data in memory: ``(inputs, target)`` pairs.

    ``inputs`` holds one tensor per model input (batch dimension first): float32 features or
    images, int64 indices (for ``nn.Embedding``). ``labels`` are int64 class indices. An item
    is ``(x, y)`` for a single input and ``((x0, x1, ...), y)`` for several.
    """

    def __init__(self, inputs: Sequence[torch.Tensor], labels: torch.Tensor, *, name: str,
                 split: str, num_classes: int, classes: Sequence[str] | None = None) -> None:
        inputs = tuple(inputs)
        if not inputs or any(len(x) != len(labels) for x in inputs):
            raise DataError(f"{name}: every input needs one row per label ({len(labels)})")
        self.inputs = inputs
        self.labels = labels
        self.name = name
        self.split = split
        self.num_classes = num_classes
        self.classes = list(classes) if classes is not None else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | tuple[torch.Tensor, ...],
                                               torch.Tensor]:
        xs = tuple(x[index] for x in self.inputs)
        return (xs[0] if len(xs) == 1 else xs), self.labels[index]

    def __repr__(self) -> str:
        shapes = ", ".join(str(s) for s in self.input_shapes)
        return (f"UserDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"inputs=[{shapes}], num_classes={self.num_classes})")

    @property
    def input_shapes(self) -> list[tuple[int, ...]]:
        """Shape of one sample of each input (no batch dimension)."""
        return [tuple(int(d) for d in x.shape[1:]) for x in self.inputs]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample of the first input."""
        return self.input_shapes[0]

    def tensors(self) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """All of it at once: ``(inputs, labels)`` (no copy)."""
        return self.inputs, self.labels

    def example_inputs(self, n: int = 1) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The first ``n`` samples' inputs, batch dimension first (for tracing and timing)."""
        xs = tuple(x[:n] for x in self.inputs)
        return xs[0] if len(xs) == 1 else xs

    def select(self, index: torch.Tensor, split: str | None = None) -> UserDataset:
        """The samples at ``index`` (in that order) as a new dataset."""
        return UserDataset([x[index] for x in self.inputs], self.labels[index], name=self.name,
                           split=split or self.split, num_classes=self.num_classes,
                           classes=self.classes)

    def subset(self, n: int, seed: int = 0) -> UserDataset:
        """``n`` samples drawn without replacement (deterministic in ``seed``), class-stratified,
        kept in dataset order."""
        if not 0 < n <= len(self):
            raise DataError(f"{self.name}: subset size must be in 1..{len(self)}, got {n}")
        picked = _stratified(self.labels, n / len(self), seed, exact=n)
        return self.select(torch.sort(picked).values)


def _stratified(labels: torch.Tensor, fraction: float, seed: int,
                exact: int | None = None) -> torch.Tensor:
    """Indices of a seeded, class-stratified sample of ``fraction`` of ``labels`` (``exact``
    samples when given: per-class quotas rounded by largest remainder)."""
    total = len(labels)
    n = exact if exact is not None else round(fraction * total)
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    shuffled = labels[perm]
    counts = torch.bincount(shuffled, minlength=int(labels.max()) + 1 if total else 0)
    quota, rest = counts * n // total, counts * n % total
    quota[torch.argsort(-rest, stable=True)[: n - int(quota.sum())]] += 1
    sorted_labels, order = torch.sort(shuffled, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(total) - starts[sorted_labels]
    return perm[rank < quota[shuffled]]


@dataclass
class UserData:
    """A user's data: training and test splits, and what a model needs to know about them.

    ``test_is_validation`` is true when the files held no test split and ``test`` was carved
    from the training data (``validation_fraction`` of it, stratified, seeded); ``test`` then
    holds samples ``train`` does not.
    """

    source: str
    train: UserDataset
    test: UserDataset
    test_is_validation: bool
    num_classes: int
    classes: list[str] | None = None

    @property
    def input_shapes(self) -> list[tuple[int, ...]]:
        return self.train.input_shapes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.train.input_shape

    @property
    def test_label(self) -> str:
        """What the test split is, in words (for reports)."""
        if self.test_is_validation:
            return f"validation split carved from {self.source} ({len(self.test)} samples)"
        return f"test split of {self.source}"

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (recorded with results; no absolute paths)."""
        return {"data": self.source, "train_samples": len(self.train),
                "test_samples": len(self.test), "test_is_validation": self.test_is_validation,
                "num_classes": self.num_classes,
                "input_shapes": [list(s) for s in self.input_shapes]}


# ------------------------------------------------------------------------------------ npz


def _x_tensor(name: str, key: str, arr: np.ndarray) -> torch.Tensor:
    """One input array as a tensor: floats as float32 (finite), uint8 as float32 / 255 (the
    image convention), other integers as int64 (indices)."""
    if arr.ndim < 2:
        raise DataError(
            f"{name}: array {key!r} has shape {arr.shape}; inputs need a batch dimension and at "
            "least one more (one feature per sample: reshape to (N, 1))"
        )
    kind = arr.dtype.kind
    if kind == "f":
        out = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        bad = int((~torch.isfinite(out)).sum())
        if bad:
            raise DataError(f"{name}: array {key!r} holds {bad:,} NaN or infinite values")
        return out
    if arr.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(arr)).to(torch.float32).div_(255.0)
    if kind in "iu":
        if kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
            raise DataError(f"{name}: array {key!r} holds values beyond int64")
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64))
    raise DataError(
        f"{name}: array {key!r} has dtype {arr.dtype}; inputs must be floating point (features, "
        "images), uint8 (images, scaled to 0..1) or integers (indices for nn.Embedding)"
    )


def _y_tensor(name: str, key: str, arr: np.ndarray, rows: int) -> torch.Tensor:
    """Labels as int64 class indices, one per row."""
    if arr.dtype.kind not in "iu":
        hint = " (convert with y.astype('int64'))" if arr.dtype.kind == "f" else ""
        raise DataError(
            f"{name}: labels {key!r} have dtype {arr.dtype}; they must be integer class "
            f"indices 0..K-1{hint}"
        )
    if arr.ndim != 1 or len(arr) != rows:
        raise DataError(
            f"{name}: labels {key!r} have shape {arr.shape}; expected ({rows},), one class "
            "index per input row"
        )
    if len(arr) and (int(arr.min()) < 0 or int(arr.max()) >= MAX_CLASSES):
        raise DataError(
            f"{name}: labels {key!r} span {int(arr.min())}..{int(arr.max())}; class indices "
            f"must be in 0..{MAX_CLASSES - 1}"
        )
    return torch.from_numpy(arr.astype(np.int64))


def _read_npz_arrays(path: Path, max_bytes: int) -> dict[str, np.ndarray]:
    """The arrays of the ``.npz`` at ``path``, bounded: member count, declared sizes, each
    ``.npy`` header against its member's size, no object arrays (``allow_pickle=False``)."""
    name = path.name
    try:
        handle = open_input(path)
    except NotReadable as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    arrays: dict[str, np.ndarray] = {}
    with handle:
        try:
            archive = zipfile.ZipFile(handle)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise DataError(
                f"{path}: not an .npz file ({exc}); write one with numpy.savez(path, x=..., y=...)"
            ) from None
        with archive:
            members = archive.infolist()
            if len(members) > MAX_ARRAYS:
                raise DataError(f"{path}: {len(members)} arrays, more than {MAX_ARRAYS}")
            declared = sum(m.file_size for m in members)
            if declared > max_bytes:
                raise DataError(
                    f"{path}: its arrays hold {declared:,} bytes, over the {max_bytes:,}-byte "
                    "limit; use a subset of the data"
                )
            for member in members:
                key = member.filename.removesuffix(".npy")
                if key in arrays or not member.filename.endswith(".npy"):
                    raise DataError(f"{path}: member {member.filename!r} is not one numpy array "
                                    "of a numpy.savez file")
                arrays[key] = _read_member(archive, member, f"{name}:{key}")
    return arrays


def _read_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, label: str) -> np.ndarray:
    fmt = np.lib.format
    try:
        with archive.open(member) as fp:
            version = fmt.read_magic(fp)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(fp)
            elif version == (2, 0):
                shape, fortran, dtype = fmt.read_array_header_2_0(fp)
            else:
                raise ValueError(f"unsupported .npy version {version}")
            if dtype.hasobject:
                raise DataError(
                    f"{label}: an array of Python objects (dtype {dtype}); it would need pickle, "
                    "which deepsqueeze never loads: save numeric arrays"
                )
            count = 1
            for dim in shape:
                count *= dim
            if count * dtype.itemsize > member.file_size:
                raise DataError(
                    f"{label}: its header declares {count:,} elements of {dtype}, more than the "
                    f"member's {member.file_size:,} bytes hold; the file is damaged"
                )
            nbytes = count * dtype.itemsize
            data = bytearray(nbytes)  # writable: the tensors made from it may be changed
            got = fp.readinto(data) if nbytes else 0
            while 0 < got < nbytes:
                more = fp.readinto(memoryview(data)[got:])
                if not more:
                    break
                got += more
            if got != nbytes or fp.read(1):
                raise DataError(f"{label}: its data bytes differ from the {nbytes:,} its header "
                                "declares; the file is damaged")
    except DataError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, RuntimeError) as exc:
        raise DataError(f"{label}: cannot read this array ({exc}); the file is damaged") from None
    arr = np.frombuffer(data, dtype=dtype)
    order = "F" if fortran else "C"
    return arr.reshape(shape, order=order)


def _npz_layout(path: Path, keys: Sequence[str]) -> tuple[dict[str, list[str]],
                                                          dict[str, str]]:
    """Input keys and label key per split found in the file's ``keys`` (checked)."""
    expected = ("expected x and y (one set, a validation split is carved from it), or x_train, "
                "y_train, x_test, y_test; several inputs as x0, x1, ... (x0_train, ...)")
    found = ", ".join(sorted(keys)) or "none"
    inputs: dict[str, dict[int, str]] = {}
    labels: dict[str, str] = {}
    plain_x: dict[str, set[str]] = {}
    for key in keys:
        m = _KEY.match(key)
        if m is None:
            raise DataError(f"{path}: unexpected array {key!r} (arrays found: {found}); {expected}")
        split = m["split"] or "all"
        if m["kind"] == "y":
            if m["index"] is not None:
                raise DataError(f"{path}: unexpected array {key!r} (arrays found: {found}); "
                                f"{expected}")
            labels[split] = key
        else:
            plain_x.setdefault(split, set()).add("indexed" if m["index"] is not None else "x")
            inputs.setdefault(split, {})[int(m["index"] or 0)] = key
    splits = set(inputs) | set(labels)
    if not splits or ("all" in splits and splits != {"all"}) or \
            (splits != {"all"} and splits != {"train", "test"}):
        raise DataError(f"{path}: arrays found: {found}; {expected}")
    for split in splits:
        if split not in inputs or split not in labels:
            missing = "inputs x" if split not in inputs else "labels y"
            raise DataError(f"{path}: no {missing} for the {split} split (arrays found: "
                            f"{found}); {expected}")
        if plain_x[split] == {"x", "indexed"}:
            raise DataError(f"{path}: both x and x0.. given for the {split} split (arrays "
                            f"found: {found}); use x for one input or x0, x1, ... for several")
        idx = sorted(inputs[split])
        if idx != list(range(len(idx))):
            given = ", ".join(inputs[split][i] for i in idx)
            raise DataError(f"{path}: inputs of the {split} split are {given}; number them "
                            "x0, x1, ... without gaps")
    counts = {len(inputs[s]) for s in splits}
    if len(counts) != 1:
        raise DataError(f"{path}: the train and test splits have different numbers of inputs "
                        f"(arrays found: {found})")
    ordered = {s: [inputs[s][i] for i in sorted(inputs[s])] for s in splits}
    return ordered, labels


def load_npz(path: str | Path, *, validation_fraction: float = 0.1, seed: int = 0,
             max_bytes: int = MAX_DATA_BYTES) -> UserData:
    """A user's ``.npz`` (written by ``numpy.savez``/``savez_compressed``) as :class:`UserData`.

    Arrays: ``x``/``y`` (a ``validation_fraction`` validation split is carved from them,
    stratified, seeded) or ``x_train``/``y_train``/``x_test``/``y_test``; a model with several
    inputs takes ``x0``, ``x1``, ... (``x0_train``, ...). Inputs have a batch dimension first:
    float arrays are used as float32, uint8 arrays as float32 / 255 (images), other integer
    arrays as int64 (indices for ``nn.Embedding``). Labels are integer class indices.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    arrays = _read_npz_arrays(path, max_bytes)
    layout, label_keys = _npz_layout(path, list(arrays))
    name = path.name
    splits: dict[str, UserDataset] = {}
    tensors: dict[str, tuple[list[torch.Tensor], torch.Tensor]] = {}
    for split, keys in layout.items():
        xs = [_x_tensor(name, k, arrays[k]) for k in keys]
        rows = {len(x) for x in xs}
        if len(rows) != 1:
            sizes = ", ".join(f"{k}: {len(x)}" for k, x in zip(keys, xs, strict=True))
            raise DataError(f"{name}: inputs of the {split} split have different numbers of "
                            f"rows ({sizes})")
        ykey = label_keys[split]
        tensors[split] = (xs, _y_tensor(name, ykey, arrays[ykey], len(xs[0])))
        if len(xs[0]) == 0:
            raise DataError(f"{name}: the {split} split is empty")
    if len(tensors) == 2:
        for i, (a, b) in enumerate(zip(tensors["train"][0], tensors["test"][0], strict=True)):
            if a.shape[1:] != b.shape[1:] or a.dtype != b.dtype:
                raise DataError(
                    f"{name}: {layout['train'][i]} is {a.dtype} {tuple(a.shape[1:])} per sample "
                    f"but {layout['test'][i]} is {b.dtype} {tuple(b.shape[1:])}; both splits "
                    "must hold the same kind of inputs"
                )
    num_classes = max(int(y.max()) + 1 for _, y in tensors.values())
    for split, (xs, y) in tensors.items():
        splits[split] = UserDataset(xs, y, name=name, split=split if split != "all" else "train",
                                    num_classes=num_classes)
    if "all" in splits:
        return _carve(name, splits["all"], validation_fraction, seed)
    return UserData(name, splits["train"], splits["test"], False, num_classes)


def _carve(source: str, data: UserDataset, fraction: float, seed: int,
           classes: list[str] | None = None) -> UserData:
    """Split ``data`` into training and a stratified, seeded validation split."""
    if not 0 < fraction < 1:
        raise DataError(f"validation fraction must be in (0, 1), got {fraction}")
    held = _stratified(data.labels, fraction, seed)
    if len(held) == 0 or len(held) == len(data):
        raise DataError(
            f"{source}: {len(data)} samples are too few to carve a {fraction:.0%} validation "
            "split; give a test split (x_test/y_test, or a test/ folder) or more samples"
        )
    keep = torch.ones(len(data), dtype=torch.bool)
    keep[held] = False
    train = data.select(torch.nonzero(keep).flatten(), "train")
    test = data.select(torch.sort(held).values, "validation")
    return UserData(source, train, test, True, data.num_classes, classes)


# ----------------------------------------------------------------------------- image folders


def _class_dirs(root: Path) -> list[Path]:
    try:
        entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    except OSError as exc:
        raise DataError(f"cannot list {root}: {exc.strerror or exc}") from None
    dirs = [p for p in entries if p.is_dir()]
    if not dirs:
        raise DataError(
            f"{root}: no class folders; an image dataset is a folder with one sub-folder per "
            "class (e.g. data/cat/1.png, data/dog/2.png)"
        )
    if len(dirs) > MAX_CLASSES:
        raise DataError(f"{root}: {len(dirs)} class folders, more than {MAX_CLASSES}")
    return dirs


def _read_image(path: Path, image_size: tuple[int, int] | None) -> Any:
    """One decoded image (PIL), format, pixel count and file size checked before decoding."""
    from PIL import Image, UnidentifiedImageError

    try:
        handle = open_input(path)
    except NotReadable as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    with handle:
        size = os.fstat(handle.fileno()).st_size
        if size > MAX_IMAGE_FILE_BYTES:
            raise DataError(f"{path}: {size:,} bytes, over the {MAX_IMAGE_FILE_BYTES:,}-byte "
                            "limit for one image")
        try:
            img = Image.open(handle, formats=_IMAGE_FORMATS)
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise DataError(f"{path}: {h}×{w} pixels, more than {MAX_IMAGE_PIXELS:,}; "
                                "resize the images first")
            img.load()
        except DataError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError,
                Image.DecompressionBombError) as exc:
            raise DataError(f"{path}: not a readable PNG, JPEG or BMP image ({exc})") from None
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA").convert("RGB")
    if image_size is not None and img.size != (image_size[1], image_size[0]):
        img = img.resize((image_size[1], image_size[0]), Image.Resampling.BILINEAR)
    return img


def _load_split_folder(root: Path, classes: list[str] | None,
                       image_size: tuple[int, int] | None, max_bytes: int,
                       split: str) -> UserDataset:
    from PIL import Image

    dirs = _class_dirs(root)
    names = [d.name for d in dirs]
    if classes is not None and names != classes:
        raise DataError(f"{root}: class folders {names} differ from the training split's "
                        f"{classes}; both splits need the same class folders")
    files: list[tuple[Path, int]] = []
    for label, folder in enumerate(dirs):
        found = sorted(p for p in folder.iterdir()
                       if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
        if not found:
            raise DataError(f"{folder}: no images (PNG, JPEG or BMP files named "
                            f"{', '.join('*' + e for e in IMAGE_EXTENSIONS)})")
        files += [(p, label) for p in found]
    images: list[Image.Image] = []
    for path, _ in files:
        images.append(_read_image(path, image_size))
        first = images[0]
        if images[-1].size != first.size:
            raise DataError(
                f"images differ in size: {files[0][0]} is {first.size[1]}×{first.size[0]} (H×W) "
                f"but {path} is {images[-1].size[1]}×{images[-1].size[0]}; resize them, or pass "
                "--image-size HxW (image_size=) to resize while loading"
            )
        w, h = first.size
        if len(images) * w * h * 3 * 4 > max_bytes:
            raise DataError(f"{root}: the images hold more than {max_bytes:,} bytes as float32; "
                            "use fewer or smaller images")
    gray = all(img.mode in ("L", "1", "I", "I;16", "F") for img in images)
    mode = "L" if gray else "RGB"
    arrays = [np.asarray(img.convert(mode) if img.mode != mode else img, dtype=np.uint8)
              for img in images]
    stacked = np.stack(arrays)
    stacked = stacked[:, None] if gray else stacked.transpose(0, 3, 1, 2)
    x = torch.from_numpy(np.ascontiguousarray(stacked)).to(torch.float32).div_(255.0)
    y = torch.tensor([label for _, label in files], dtype=torch.int64)
    return UserDataset([x], y, name=root.name, split=split, num_classes=len(dirs),
                       classes=names)


def load_image_folder(path: str | Path, *, image_size: tuple[int, int] | None = None,
                      validation_fraction: float = 0.1, seed: int = 0,
                      max_bytes: int = MAX_DATA_BYTES) -> UserData:
    """A folder of images, one sub-folder per class (sorted names are classes 0..K-1), as
    :class:`UserData`; or a folder holding ``train/`` and ``test/`` (or ``val/``) folders of
    that form. Images are float32 C×H×W in 0..1: one channel when every image is grayscale,
    else RGB (alpha dropped). All images must have one size, or pass ``image_size=(H, W)``.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder" if not root.exists() else
                        f"{root}: not a folder of class folders or an .npz file")
    subdirs = {p.name: p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    split_dirs = {name: _SPLIT_DIRS[name] for name in subdirs if name in _SPLIT_DIRS}
    source = root.name or str(root)
    if "train" in split_dirs and len(split_dirs) == 2 and set(split_dirs.values()) == {
            "train", "test"} and len(subdirs) == 2:
        test_name = next(n for n, s in split_dirs.items() if s == "test")
        train = _load_split_folder(subdirs["train"], None, image_size, max_bytes, "train")
        if image_size is None:
            image_size = (train.input_shape[1], train.input_shape[2])
        test = _load_split_folder(subdirs[test_name], train.classes, image_size, max_bytes,
                                  "test")
        if test.input_shape != train.input_shape:
            raise DataError(f"{source}: test images are {test.input_shape} (C,H,W), training "
                            f"images {train.input_shape}; both splits need one kind of image")
        return UserData(source, train, test, False, train.num_classes, train.classes)
    data = _load_split_folder(root, None, image_size, max_bytes, "train")
    return _carve(source, data, validation_fraction, seed, data.classes)


def parse_image_size(text: str) -> tuple[int, int]:
    """``"28"`` or ``"32x48"`` (H×W) as ``(H, W)``; :class:`DataError` otherwise."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        dims = []
    if len(dims) == 1:
        dims = dims * 2
    if len(dims) != 2 or not all(1 <= d <= 4096 for d in dims):
        raise DataError(f"image size must be N or HxW with sides in 1..4096, got {text!r:.40}")
    return dims[0], dims[1]


def load_user_data(path: str | Path, *, image_size: tuple[int, int] | None = None,
                   validation_fraction: float = 0.1, seed: int = 0,
                   max_bytes: int = MAX_DATA_BYTES) -> UserData:
    """A user's data at ``path``: an ``.npz`` file (:func:`load_npz`) or a folder of class
    folders of images (:func:`load_image_folder`)."""
    p = Path(path)
    if p.is_dir():
        return load_image_folder(p, image_size=image_size,
                                 validation_fraction=validation_fraction, seed=seed,
                                 max_bytes=max_bytes)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder; --data takes an .npz file or a folder of "
                        "class folders of images")
    if p.suffix.lower() != ".npz":
        raise DataError(f"{p}: not an .npz file or a folder; --data takes arrays saved with "
                        "numpy.savez (x, y) or a folder with one sub-folder of images per class")
    if image_size is not None:
        raise DataError("--image-size applies to folders of images, not to .npz arrays")
    return load_npz(p, validation_fraction=validation_fraction, seed=seed, max_bytes=max_bytes)
