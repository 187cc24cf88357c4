"""Tests for deepsqueeze.data: registry, search path, IDX/CIFAR readers, checksums, download."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import socket
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from deepsqueeze.data import (
    DATASETS,
    DatasetInfo,
    FileSpec,
    ImageDataset,
    clear_cache,
    find_dataset_dir,
    load_dataset,
    read_idx,
    search_path,
    user_cache_dir,
)
from deepsqueeze.data import dataset as dataset_mod
from deepsqueeze.data import download as download_mod
from deepsqueeze.data import search as search_mod
from deepsqueeze.data.cifar import load_batch
from deepsqueeze.errors import DataError, DatasetCorruptError, DatasetNotFoundError

REPO = Path(__file__).resolve().parents[1]
IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _shared_data() -> Path:
    env = os.environ.get("DEEPSQUEEZE_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


SHARED = _shared_data()
needs_mnist = pytest.mark.skipif(
    not (SHARED / "mnist" / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason=f"real MNIST not found under {SHARED} (set DEEPSQUEEZE_DATA)",
)
needs_fashion = pytest.mark.skipif(
    not (SHARED / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason=f"real Fashion-MNIST not found under {SHARED} (set DEEPSQUEEZE_DATA)",
)


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test sees the real environment: own HOME, cache, system dir; no proxy; no env var."""
    monkeypatch.delenv("DEEPSQUEEZE_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(search_mod, "SYSTEM_DIRS", (tmp_path / "system",))
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    return tmp_path


# ---------------------------------------------------------------- helpers


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    header = bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    return header + np.asarray(arr, dtype=dtype).tobytes()


def write_tiny_idx(folder: Path, n_train: int = 30, n_test: int = 20, seed: int = 0) -> dict:
    """Four small gzipped IDX files; returns {stem: (gz bytes, payload bytes)}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        for stem, arr in (
            (f"{prefix}-images-idx3-ubyte", images),
            (f"{prefix}-labels-idx1-ubyte", labels),
        ):
            payload = idx_bytes(arr)
            gz = gzip.compress(payload, mtime=0)
            (folder / f"{stem}.gz").write_bytes(gz)
            out[stem] = (gz, payload)
    return out


@pytest.fixture
def fake_kmnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, DatasetInfo]:
    """Tiny files registered as 'kmnist' (no real KMNIST is needed); mirrors point nowhere."""
    folder = tmp_path / "served"
    files = write_tiny_idx(folder)
    specs = [FileSpec(f"{s}.gz", md5(files[s][0]), md5(files[s][1])) for s in IDX_NAMES]
    info = dataclasses.replace(
        DATASETS["kmnist"],
        train=(specs[0], specs[1]),
        test=(specs[2], specs[3]),
        mirrors=(f"http://127.0.0.1:{free_port()}/",),
    )
    monkeypatch.setitem(DATASETS, "kmnist", info)
    return folder, info


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[str]:
    """Serve ``folder`` over HTTP on 127.0.0.1; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def copy_mnist_test(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for stem in IDX_NAMES[2:]:
        (dest / f"{stem}.gz").write_bytes((SHARED / "mnist" / f"{stem}.gz").read_bytes())
    return dest


def all_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------- registry


def test_registry_entries() -> None:
    assert set(DATASETS) == {"mnist", "fashion-mnist", "kmnist", "cifar10", "cifar100"}
    for name, info in DATASETS.items():
        assert info.name == name
        assert len(info.mean) == len(info.std) == info.image_shape[0]
        assert info.mirrors and info.files("train") and info.files("test")
    assert DATASETS["mnist"].mean == (0.1307,) and DATASETS["mnist"].std == (0.3081,)
    assert DATASETS["cifar100"].num_classes == 100
    assert DATASETS["cifar10"].image_shape == (3, 32, 32)
    with pytest.raises(dataclasses.FrozenInstanceError):
        DATASETS["mnist"].num_classes = 3  # type: ignore[misc]


def test_unknown_name_and_split() -> None:
    with pytest.raises(DataError, match="known datasets: cifar10, cifar100, fashion-mnist"):
        load_dataset("imagenet")
    with pytest.raises(DataError, match="unknown split 'val'"):
        load_dataset("mnist", "val")
    assert search_path("Fashion_MNIST")[0].name == "fashion-mnist"


# ---------------------------------------------------------------- real data


@needs_mnist
def test_real_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPSQUEEZE_DATA", str(SHARED))
    train = load_dataset("mnist", "train", download=False)
    test = load_dataset("mnist", "test", download=False)
    assert (len(train), len(test)) == (60000, 10000)
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64
    assert test.input_shape == (1, 28, 28) and test.num_classes == 10
    assert torch.bincount(test.labels).tolist() == [
        980,
        1135,
        1032,
        1010,
        982,
        892,
        958,
        1028,
        974,
        1009,
    ]
    x = train.normalized()
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-3


@needs_mnist
def test_real_mnist_cached_and_copied(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPSQUEEZE_DATA", str(SHARED))
    first = load_dataset("mnist", "test", download=False)
    hits = dataset_mod._load_cached.cache_info().hits
    start = time.perf_counter()
    second = load_dataset("mnist", "test", download=False)
    assert time.perf_counter() - start < 0.2
    assert dataset_mod._load_cached.cache_info().hits == hits + 1
    first.images.zero_()
    first.labels.fill_(3)
    third = load_dataset("mnist", "test", download=False)
    assert torch.equal(second.images, third.images) and int(third.images.max()) == 255
    assert torch.equal(second.labels, third.labels)


@needs_fashion
def test_real_fashion_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPSQUEEZE_DATA", str(SHARED))
    train = load_dataset("fashion-mnist", "train", download=False)
    test = load_dataset("fashion_mnist", "test", download=False)
    assert (len(train), len(test)) == (60000, 10000)
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    x = train.normalized()
    assert abs(float(x.mean())) < 2e-3 and abs(float(x.std()) - 1) < 2e-3


@needs_mnist
def test_decompressed_files_accepted(tmp_path: Path) -> None:
    folder = tmp_path / "plain"
    folder.mkdir()
    for stem in IDX_NAMES[2:]:
        (folder / stem).write_bytes(gzip.decompress((SHARED / "mnist" / f"{stem}.gz").read_bytes()))
    ds = load_dataset("mnist", "test", data_dir=folder, download=False)
    assert len(ds) == 10000


@needs_mnist
def test_other_datasets_files_are_not_a_fallback(tmp_path: Path) -> None:
    """MNIST files where Fashion-MNIST is looked for: a checksum error, never a silent load."""
    folder = copy_mnist_test(tmp_path / "mnist-copy")
    with pytest.raises(DatasetCorruptError, match="looks like mnist/t10k-images") as err:
        load_dataset("fashion-mnist", "test", data_dir=folder, download=False)
    assert str(folder) in str(err.value)


# ---------------------------------------------------------------- search path


def make_layout(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for stem in IDX_NAMES:
        (folder / f"{stem}.gz").write_bytes(b"")
    return folder


def test_search_order_precedence(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = make_layout(isolated / "explicit" / "mnist")
    env = make_layout(isolated / "env" / "mnist")
    xdg = make_layout(isolated / "xdg" / "deepsqueeze" / "mnist")
    home = make_layout(isolated / "home" / ".cache" / "deepsqueeze" / "mnist")
    system = make_layout(isolated / "system" / "mnist")
    monkeypatch.setenv("DEEPSQUEEZE_DATA", str(isolated / "env"))

    assert find_dataset_dir("mnist", data_dir=isolated / "explicit") == explicit
    assert find_dataset_dir("mnist") == env
    monkeypatch.delenv("DEEPSQUEEZE_DATA")
    assert find_dataset_dir("mnist") == xdg
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert user_cache_dir() == isolated / "home" / ".cache" / "deepsqueeze"
    assert find_dataset_dir("mnist") == home
    monkeypatch.setenv("HOME", str(isolated / "nobody"))
    assert find_dataset_dir("mnist") == system


def test_search_path_lists_roots_in_order(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPSQUEEZE_DATA", str(isolated / "env"))
    paths = search_path("fashion-mnist", data_dir=isolated / "d")
    assert paths[0] == isolated / "d" / "fashion-mnist"
    order = [
        isolated / "d",
        isolated / "env" / "fashion-mnist",
        isolated / "env",
        isolated / "xdg" / "deepsqueeze" / "fashion-mnist",
        isolated / "system" / "fashion-mnist",
    ]
    positions = [paths.index(p) for p in order]
    assert positions == sorted(positions)


def test_data_dir_may_be_the_dataset_folder(isolated: Path) -> None:
    folder = make_layout(isolated / "somewhere")
    assert find_dataset_dir("mnist", data_dir=folder) == folder


def test_partial_folder_is_skipped(isolated: Path) -> None:
    folder = make_layout(isolated / "a" / "mnist")
    (folder / "train-labels-idx1-ubyte.gz").unlink()
    assert find_dataset_dir("mnist", data_dir=isolated / "a", split="test") == folder
    with pytest.raises(DatasetNotFoundError, match="missing train-labels-idx1-ubyte"):
        find_dataset_dir("mnist", data_dir=isolated / "a")


def test_missing_dataset_names_every_place(isolated: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("mnist", "test", data_dir=isolated / "nowhere", download=False)
    msg = str(err.value)
    for place in search_path("mnist", data_dir=isolated / "nowhere"):
        assert f"{place}:" in msg
    assert "--data-dir" in msg and "DEEPSQUEEZE_DATA" in msg and "download=False" in msg
    assert str(isolated / "xdg" / "deepsqueeze" / "mnist") in msg


def test_offline_download_failure_names_mirrors(
    isolated: Path, fake_kmnist: tuple[Path, DatasetInfo]
) -> None:
    _, info = fake_kmnist
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("kmnist", "test")
    msg = str(err.value)
    assert f"{info.mirrors[0]}t10k-images-idx3-ubyte.gz" in msg
    assert "URLError" in msg and "Connection refused" in msg
    for place in search_path("kmnist"):
        assert f"{place}:" in msg
    assert not (isolated / "xdg").exists()  # no empty folders left behind either


# ---------------------------------------------------------------- IDX reader


@pytest.mark.parametrize("code", [0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E])
def test_read_idx_types(tmp_path: Path, code: int) -> None:
    arr = (np.arange(24).reshape(2, 3, 4) - 5).astype(np.float64)
    if code == 0x08:
        arr = arr + 5
    path = tmp_path / "x.idx"
    path.write_bytes(idx_bytes(arr, code))
    got = read_idx(path)
    assert got.shape == (2, 3, 4) and got.dtype.isnative
    np.testing.assert_array_equal(got, arr)


def test_read_idx_gz(tmp_path: Path) -> None:
    arr = np.arange(10, dtype=np.uint8)
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(idx_bytes(arr)))
    np.testing.assert_array_equal(read_idx(path), arr)


def test_truncated_gz(tmp_path: Path) -> None:
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    gz = gzip.compress(idx_bytes(np.arange(5000, dtype=np.uint8) % 10))
    path.write_bytes(gz[: len(gz) // 2])
    with pytest.raises(DatasetCorruptError, match="truncated or corrupt gzip") as err:
        read_idx(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x00\x01\x08\x01\x00\x00\x00\x01\x05", "bad IDX magic"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x05", "bad IDX magic"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
        (b"\x00\x00\x08\x02\x00\x00", "inside the IDX header"),
        (b"\x00\x00", "too short"),
        (idx_bytes(np.zeros((4, 3), np.uint8))[:-1], "truncated"),
        (idx_bytes(np.zeros((4, 3), np.uint8)) + b"\x00", "trailing bytes"),
        (idx_bytes(np.zeros(4, np.int32), 0x0C)[:-2], r"need 16 \(truncated\)"),
    ],
)
def test_read_idx_rejects(tmp_path: Path, data: bytes, match: str) -> None:
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(data)
    with pytest.raises(DatasetCorruptError, match=match) as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_read_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="no such file"):
        read_idx(tmp_path / "absent")


# ---------------------------------------------------------------- checksums and validation


@needs_mnist
def test_checksum_mismatch_one_pixel(tmp_path: Path) -> None:
    folder = copy_mnist_test(tmp_path / "mnist")
    images = folder / "t10k-images-idx3-ubyte.gz"
    payload = bytearray(gzip.decompress(images.read_bytes()))
    payload[16 + 28 * 14 + 14] ^= 0xFF  # one pixel of the first image
    images.write_bytes(gzip.compress(bytes(payload), compresslevel=1))
    with pytest.raises(DatasetCorruptError) as err:
        load_dataset("mnist", "test", data_dir=tmp_path, download=False)
    msg = str(err.value)
    assert str(images) in msg and "checksum mismatch" in msg
    assert "9fb629c4189551a2d022fa330f9573f3" in msg and "2646ac647ad5339dbf082846283269ea" in msg
    assert md5(bytes(payload)) in msg and "delete it and download it again" in msg


@needs_mnist
def test_truncated_gz_through_loader(tmp_path: Path) -> None:
    folder = copy_mnist_test(tmp_path / "mnist")
    labels = folder / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:2000])
    with pytest.raises(DatasetCorruptError, match="truncated or corrupt gzip") as err:
        load_dataset("mnist", "test", data_dir=tmp_path, download=False)
    assert str(labels) in str(err.value)


def _register_kmnist(monkeypatch: pytest.MonkeyPatch, folder: Path, arrays: dict) -> None:
    specs = []
    for stem in IDX_NAMES:
        payload = idx_bytes(arrays[stem])
        (folder / stem).write_bytes(payload)
        specs.append(FileSpec(f"{stem}.gz", "0" * 32, md5(payload)))
    info = dataclasses.replace(
        DATASETS["kmnist"], train=(specs[0], specs[1]), test=(specs[2], specs[3])
    )
    monkeypatch.setitem(DATASETS, "kmnist", info)


@pytest.mark.parametrize(
    ("labels", "images_shape", "match"),
    [
        (np.array([0, 1, 10], np.uint8), (3, 28, 28), r"labels span 0\.\.10, outside 0\.\.9"),
        (np.array([0, 1], np.uint8), (3, 28, 28), "3 images but 2 labels"),
        (np.array([0, 1, 2], np.uint8), (3, 28, 27), "expected uint8 images of shape N×28×28"),
    ],
)
def test_consistency_checks(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    labels: np.ndarray,
    images_shape: tuple,
    match: str,
) -> None:
    good = {
        "train-images-idx3-ubyte": np.zeros((3, 28, 28), np.uint8),
        "train-labels-idx1-ubyte": np.array([0, 1, 2], np.uint8),
        "t10k-images-idx3-ubyte": np.zeros(images_shape, np.uint8),
        "t10k-labels-idx1-ubyte": labels,
    }
    _register_kmnist(monkeypatch, tmp_path, good)
    assert len(load_dataset("kmnist", "train", data_dir=tmp_path, download=False)) == 3
    with pytest.raises(DatasetCorruptError, match=match):
        load_dataset("kmnist", "test", data_dir=tmp_path, download=False)


def test_unverifiable_decompressed_file_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arrays = {s: np.zeros((2, 28, 28) if "images" in s else 2, np.uint8) for s in IDX_NAMES}
    _register_kmnist(monkeypatch, tmp_path, arrays)
    info = DATASETS["kmnist"]
    no_payload = tuple(dataclasses.replace(s, payload_md5=None) for s in info.test)
    monkeypatch.setitem(DATASETS, "kmnist", dataclasses.replace(info, test=no_payload))
    with pytest.warns(UserWarning, match="not verified"):
        assert len(load_dataset("kmnist", "test", data_dir=tmp_path, download=False)) == 2


# ---------------------------------------------------------------- download


def test_download_from_local_server(
    isolated: Path, fake_kmnist: tuple[Path, DatasetInfo], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, info = fake_kmnist
    empty = isolated / "empty"
    empty.mkdir()
    with serve(empty) as missing_mirror, serve(folder) as mirror:
        mirrors = (missing_mirror, mirror)  # the first answers 404: the second must be used
        monkeypatch.setitem(DATASETS, "kmnist", dataclasses.replace(info, mirrors=mirrors))
        ds = load_dataset("kmnist", "train")
    cache = isolated / "xdg" / "deepsqueeze" / "kmnist"
    assert len(ds) == 30 and ds.images.shape == (30, 1, 28, 28)
    assert all_files(cache) == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    for name in all_files(cache):
        assert (cache / name).read_bytes() == (folder / name).read_bytes()
    # now found in the cache: no server needed
    assert len(load_dataset("kmnist", "train", download=False)) == 30


def test_download_corrupt_copy_leaves_nothing(
    isolated: Path, fake_kmnist: tuple[Path, DatasetInfo], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, info = fake_kmnist
    target = folder / "t10k-images-idx3-ubyte.gz"
    payload = bytearray(gzip.decompress(target.read_bytes()))
    payload[-1] ^= 0x01
    target.write_bytes(gzip.compress(bytes(payload)))
    with serve(folder) as mirror:
        monkeypatch.setitem(DATASETS, "kmnist", dataclasses.replace(info, mirrors=(mirror,)))
        with pytest.raises(DatasetNotFoundError) as err:
            load_dataset("kmnist", "test")
    assert "checksum mismatch" in str(err.value) and mirror in str(err.value)
    cache = isolated / "xdg" / "deepsqueeze"
    assert not cache.exists() or all_files(cache) == []


def test_download_interrupted_leaves_nothing(
    isolated: Path, fake_kmnist: tuple[Path, DatasetInfo], monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_then_fail(url: str, dest: Path, timeout: float = 1.0) -> None:
        dest.write_bytes(b"\x1f\x8b partial")
        raise TimeoutError("timed out")

    monkeypatch.setattr(download_mod, "_fetch", half_then_fail)
    with pytest.raises(DatasetNotFoundError, match="TimeoutError: timed out"):
        load_dataset("kmnist", "train")
    cache = isolated / "xdg" / "deepsqueeze"
    assert not cache.exists() or all_files(cache) == []


@needs_mnist
def test_download_real_mnist_copy(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The re-compressed MNIST copy is accepted on download through its payload checksum."""
    served = copy_mnist_test(isolated / "served")
    with serve(served) as mirror:
        info = dataclasses.replace(DATASETS["mnist"], mirrors=(mirror,))
        monkeypatch.setitem(DATASETS, "mnist", info)
        ds = load_dataset("mnist", "test")
    assert len(ds) == 10000
    assert all_files(isolated / "xdg" / "deepsqueeze" / "mnist") == [
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]


# ---------------------------------------------------------------- CIFAR


def cifar_batch(n: int, seed: int, label_key: str, classes: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"fake batch",
        label_key.encode(): [int(v) for v in rng.integers(0, classes, n)],
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        b"filenames": [b"img_%d.png" % i for i in range(n)],
    }


def write_cifar10(root: Path, protocol: int = 2) -> dict[str, bytes]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        raw = pickle.dumps(cifar_batch(4 if i < 5 else 6, i, "labels", 10), protocol=protocol)
        (folder / name).write_bytes(raw)
        written[name] = raw
    return written


def patch_cifar(
    monkeypatch: pytest.MonkeyPatch, name: str, raws: dict, archive: bytes = b""
) -> None:
    info = DATASETS[name]
    members = {
        split: tuple(dataclasses.replace(m, md5=md5(raws[m.filename])) for m in info.members(split))
        for split in ("train", "test")
    }
    spec = dataclasses.replace(info.train[0], md5=md5(archive))
    new = dataclasses.replace(
        info,
        train=(spec,),
        test=(spec,),
        train_members=members["train"],
        test_members=members["test"],
        mirrors=(f"http://127.0.0.1:{free_port()}/",),
    )
    monkeypatch.setitem(DATASETS, name, new)


def make_tar(src: Path, top: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src / top, arcname=top)
    return buf.getvalue()


def test_cifar10_extracted_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raws = write_cifar10(tmp_path / "c10")
    patch_cifar(monkeypatch, "cifar10", raws)
    train = load_dataset("cifar10", "train", data_dir=tmp_path / "c10", download=False)
    test = load_dataset("cifar10", "test", data_dir=tmp_path / "c10", download=False)
    assert train.images.shape == (20, 3, 32, 32) and len(test) == 6
    first = cifar_batch(4, 0, "labels", 10)
    assert train.labels[:4].tolist() == first[b"labels"]
    # row layout is R plane, G plane, B plane, each 32×32 row-major
    assert torch.equal(train.images[0, 1, 0], torch.from_numpy(first[b"data"][0, 1024:1056]))
    # pointing at the extracted folder itself works too
    inner = tmp_path / "c10" / "cifar-10-batches-py"
    assert len(load_dataset("cifar10", "test", data_dir=inner, download=False)) == 6


def test_cifar10_extracted_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raws = write_cifar10(tmp_path / "c10")
    patch_cifar(monkeypatch, "cifar10", raws)
    batch = tmp_path / "c10" / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(pickle.dumps(cifar_batch(6, 99, "labels", 10), protocol=2))
    with pytest.raises(DatasetCorruptError, match="checksum mismatch") as err:
        load_dataset("cifar10", "test", data_dir=tmp_path / "c10", download=False)
    assert str(batch) in str(err.value)


def test_cifar10_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raws = write_cifar10(tmp_path / "src")
    archive = make_tar(tmp_path / "src", "cifar-10-batches-py")
    (tmp_path / "data" / "cifar10").mkdir(parents=True)
    path = tmp_path / "data" / "cifar10" / "cifar-10-python.tar.gz"
    path.write_bytes(archive)
    patch_cifar(monkeypatch, "cifar10", raws, archive)
    train = load_dataset("cifar10", "train", data_dir=tmp_path / "data", download=False)
    assert len(train) == 20 and train.num_classes == 10
    assert all_files(tmp_path / "data") == ["cifar10/cifar-10-python.tar.gz"]  # no extraction

    patch_cifar(monkeypatch, "cifar10", raws, archive + b"x")  # archive MD5 no longer matches
    with pytest.raises(DatasetCorruptError, match="checksum mismatch") as err:
        load_dataset("cifar10", "test", data_dir=tmp_path / "data", download=False)
    assert str(path) in str(err.value)


def test_cifar10_archive_download(
    isolated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raws = write_cifar10(tmp_path / "src")
    archive = make_tar(tmp_path / "src", "cifar-10-batches-py")
    served = tmp_path / "served"
    served.mkdir()
    (served / "cifar-10-python.tar.gz").write_bytes(archive)
    patch_cifar(monkeypatch, "cifar10", raws, archive)
    with serve(served) as mirror:
        info = dataclasses.replace(DATASETS["cifar10"], mirrors=(mirror,))
        monkeypatch.setitem(DATASETS, "cifar10", info)
        assert len(load_dataset("cifar10", "test")) == 6
    cache = isolated / "xdg" / "deepsqueeze"
    assert all_files(cache) == ["cifar10/cifar-10-python.tar.gz"]


def test_cifar100_protocol5_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "src" / "cifar-100-python"
    folder.mkdir(parents=True)
    raws = {}
    for name, n in (("train", 12), ("test", 5)):
        raws[name] = pickle.dumps(cifar_batch(n, n, "fine_labels", 100), protocol=5)
        (folder / name).write_bytes(raws[name])
    archive = make_tar(tmp_path / "src", "cifar-100-python")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "cifar-100-python.tar.gz").write_bytes(archive)
    patch_cifar(monkeypatch, "cifar100", raws, archive)
    test = load_dataset("cifar100", "test", data_dir=tmp_path / "d", download=False)
    assert test.images.shape == (5, 3, 32, 32) and test.num_classes == 100
    assert test.labels.tolist() == cifar_batch(5, 5, "fine_labels", 100)[b"fine_labels"]
    assert test.normalized().shape == (5, 3, 32, 32)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "pwned"
    raws = write_cifar10(tmp_path / "c10")
    evil = {b"data": _Evil(marker), b"labels": [0]}
    raws["test_batch"] = pickle.dumps(evil, protocol=2)
    (tmp_path / "c10" / "cifar-10-batches-py" / "test_batch").write_bytes(raws["test_batch"])
    patch_cifar(monkeypatch, "cifar10", raws)  # even with a "matching" checksum
    with pytest.raises(DatasetCorruptError, match=r"refusing to load .*test_batch.*system"):
        load_dataset("cifar10", "test", data_dir=tmp_path / "c10", download=False)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (pickle.dumps(eval, protocol=2), r"object (__builtin__|builtins)\.eval"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}), "uint8"),
        (pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}), "not 3072"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), "but 1 labels"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}), "no 'labels'"),
        (pickle.dumps([1, 2]), "expected a dict"),
        (b"\x80\x02}q\x00(", "not a readable CIFAR batch"),
        (
            pickle.dumps(np.array([object()], dtype=object), protocol=2),
            r"(__builtin__|builtins)\.object",
        ),
    ],
)
def test_load_batch_rejects(payload: bytes, match: str) -> None:
    with pytest.raises(DatasetCorruptError, match=match):
        load_batch(payload, "some/batch", "labels")


# ---------------------------------------------------------------- ImageDataset


def make_dataset(n: int = 100, classes: int = 10) -> ImageDataset:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=gen)
    labels = torch.arange(n) % classes
    return ImageDataset("mnist", "train", images, labels, DATASETS["mnist"])


def test_subset_deterministic_and_stratified() -> None:
    ds = make_dataset(100)
    a, b, c = ds.subset(30, seed=1), ds.subset(30, seed=1), ds.subset(30, seed=2)
    assert len(a) == 30 and torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert torch.bincount(a.labels).tolist() == [3] * 10
    assert torch.bincount(ds.subset(25, seed=3).labels).tolist().count(3) == 5  # 5×3 + 5×2
    assert len(ds.subset(100)) == 100
    with pytest.raises(DataError, match="subset size"):
        ds.subset(101)
    with pytest.raises(DataError, match="subset size"):
        ds.subset(0)


def test_normalized_values() -> None:
    images = torch.tensor([0, 255, 51], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 1, 2, 2)
    ds = ImageDataset(
        "mnist", "test", images.contiguous(), torch.tensor([0, 1, 2]), DATASETS["mnist"]
    )
    x = ds.normalized()
    assert x.dtype == torch.float32 and x.shape == (3, 1, 2, 2)
    expected = (torch.tensor([0.0, 1.0, 0.2]) - 0.1307) / 0.3081
    assert torch.allclose(x[:, 0, 0, 0], expected)

    rgb = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    c10 = ImageDataset("cifar10", "test", rgb, torch.tensor([0]), DATASETS["cifar10"])
    assert torch.allclose(
        c10.normalized()[0, :, 0, 0],
        (1 - torch.tensor([0.4914, 0.4822, 0.4465])) / torch.tensor([0.2470, 0.2435, 0.2616]),
    )


def test_image_dataset_validation() -> None:
    with pytest.raises(DataError, match="uint8"):
        ImageDataset(
            "mnist",
            "x",
            torch.zeros(2, 1, 28, 28),
            torch.zeros(2, dtype=torch.int64),
            DATASETS["mnist"],
        )
    with pytest.raises(DataError, match="2 images but 3 labels"):
        ImageDataset(
            "mnist",
            "x",
            torch.zeros(2, 1, 28, 28, dtype=torch.uint8),
            torch.zeros(3, dtype=torch.int64),
            DATASETS["mnist"],
        )
    assert "n=100" in repr(make_dataset())


def test_clear_cache() -> None:
    dataset_mod._load_cached.cache_clear()
    clear_cache()
    assert dataset_mod._load_cached.cache_info().currsize == 0
