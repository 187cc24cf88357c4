"""A user's own model code and data through the command line (issue 10, part 3).

``--model-code FILE.py:Class`` / ``--model-args``, the ``deepsqueeze.models`` entry-point
group, ``--data x.npz|folder`` (data/user.py), ``evaluate``'s dataset default, and the small
things seen on the way (tables that keep whole layer names, the docs' table snippet). Every
file is written by the test itself; the models are tiny.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from deepsqueeze.data.user import (
    MAX_IMAGE_PIXELS,
    UserDataset,
    load_image_folder,
    load_npz,
    load_user_data,
    parse_image_size,
)
from deepsqueeze.errors import DataError, ModelError
from deepsqueeze.usercode import build_model, load_object, parse_model_args, registered_models

from .conftest import run_cli

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------- helpers


def assert_one_error(code: int, err: str, needle: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note:")]
    assert code == 2, f"exit {code}, stderr: {err}"
    assert len(lines) == 1, f"expected one error line, got: {err}"
    assert lines[0].startswith("error: "), lines[0]
    assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def blobs(n: int, features: int = 6, classes: int = 3, seed: int = 0) -> tuple[np.ndarray,
                                                                              np.ndarray]:
    """Separable tabular data: class ``c`` centred on ``3 * e_c``."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.normal(size=(n, features)).astype(np.float32)
    x[np.arange(n), y] += 3.0
    return x, y.astype(np.int64)


# ------------------------------------------------------------------------------ data: npz


def test_npz_x_y_carves_a_seeded_stratified_validation_split(tmp_path: Path) -> None:
    x, y = blobs(200)
    data = load_npz(write_npz(tmp_path / "d.npz", x=x, y=y))
    assert data.test_is_validation and "validation" in data.test_label
    assert len(data.train) + len(data.test) == 200 and len(data.test) == 20
    assert data.num_classes == 3 and data.input_shape == (6,)
    # train and validation are disjoint and together are every row
    rows = {tuple(r) for r in data.train.inputs[0].tolist()}
    held = {tuple(r) for r in data.test.inputs[0].tolist()}
    assert not rows & held and len(rows | held) == 200
    # stratified: every class is in the validation split in its share
    counts = torch.bincount(data.test.labels, minlength=3)
    share = np.bincount(y, minlength=3) * 0.1
    assert (abs(counts.numpy() - share) <= 1).all()
    again = load_npz(tmp_path / "d.npz")
    assert torch.equal(again.test.labels, data.test.labels)
    other = load_npz(tmp_path / "d.npz", seed=1)
    assert not torch.equal(other.test.inputs[0], data.test.inputs[0])


def test_npz_train_test_and_dtypes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = write_npz(
        tmp_path / "d.npz",
        x_train=rng.integers(0, 256, (10, 1, 4, 4), dtype=np.uint8),
        y_train=np.arange(10) % 2, x_test=rng.integers(0, 256, (4, 1, 4, 4), dtype=np.uint8),
        y_test=np.array([0, 1, 1, 0], dtype=np.uint8),
    )
    data = load_npz(path)
    assert not data.test_is_validation and len(data.test) == 4
    x, y = data.train[3]
    assert x.dtype == torch.float32 and float(x.min()) >= 0 and float(x.max()) <= 1  # uint8/255
    assert y.dtype == torch.int64
    assert data.test.labels.dtype == torch.int64


def test_npz_several_inputs_and_integer_indices(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = write_npz(tmp_path / "d.npz", x0=rng.normal(size=(30, 5)),
                     x1=rng.integers(0, 100, (30, 7)), y=np.arange(30) % 3)
    data = load_npz(path)
    assert data.input_shapes == [(5,), (7,)]
    (a, b), y = data.train[0]
    assert a.dtype == torch.float32 and b.dtype == torch.int64 and y.dtype == torch.int64
    batch = torch.utils.data.default_collate([data.train[i] for i in range(4)])
    (xa, xb), yb = batch
    assert xa.shape == (4, 5) and xb.shape == (4, 7) and yb.shape == (4,)


@pytest.mark.parametrize(
    ("arrays", "needle"),
    [
        ({"x": np.zeros((4, 2)), "z": np.zeros(4)}, "unexpected array 'z' (arrays found: x, z)"),
        ({"x": np.zeros((4, 2))}, "no labels y"),
        ({"features": np.zeros((4, 2)), "labels": np.zeros(4)}, "arrays found: features"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(4)}, "must be integer class indices"),
        ({"x": np.zeros((4, 2)), "y": np.zeros((4, 1), int)}, "expected (4,)"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(5, int)}, "expected (4,)"),
        ({"x": np.zeros(4), "y": np.zeros(4, int)}, "reshape to (N, 1)"),
        ({"x": np.full((4, 2), np.nan), "y": np.zeros(4, int)}, "8 NaN or infinite"),
        ({"x": np.zeros((4, 2), bool), "y": np.zeros(4, int)}, "dtype bool"),
        ({"x": np.zeros((4, 2)), "y": -np.ones(4, int)}, "span -1..-1"),
        ({"x_train": np.zeros((4, 2)), "y_train": np.zeros(4, int)}, "arrays found"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(4, int), "x_test": np.zeros((2, 2)),
          "y_test": np.zeros(2, int)}, "arrays found"),
        ({"x0": np.zeros((4, 2)), "x2": np.zeros((4, 2)), "y": np.zeros(4, int)}, "without gaps"),
        ({"x": np.zeros((4, 2)), "x0": np.zeros((4, 2)), "y": np.zeros(4, int)},
         "both x and x0"),
        ({"x_train": np.zeros((4, 2)), "y_train": np.zeros(4, int),
          "x_test": np.zeros((2, 3)), "y_test": np.zeros(2, int)}, "same kind of inputs"),
        ({"x": np.zeros((3, 2)), "y": np.zeros(3, int)}, "too few to carve"),
    ],
)
def test_npz_bad_arrays_name_what_is_wrong(tmp_path: Path, arrays: dict[str, np.ndarray],
                                           needle: str) -> None:
    path = write_npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError) as info:
        load_npz(path)
    assert needle in str(info.value)


def test_npz_object_arrays_are_never_unpickled(tmp_path: Path) -> None:
    """An object array would run pickle: refused from its header, before anything is read."""

    class Boom:
        def __reduce__(self):  # what a hostile file would carry
            return (os.system, ("echo pwned",))

    arr = np.empty(2, dtype=object)
    arr[:] = [Boom(), Boom()]
    path = tmp_path / "d.npz"
    np.savez(path, x=arr, y=np.zeros(2, int))
    seen: list[str] = []

    def hook(event: str, args: tuple) -> None:
        if event in ("pickle.find_class", "os.system"):
            seen.append(event)

    sys.addaudithook(hook)
    with pytest.raises(DataError, match="never loads"):
        load_npz(path)
    assert seen == []


def test_npz_header_larger_than_its_member_is_refused_before_allocating(tmp_path: Path) -> None:
    """A 200-byte member whose header declares 10**12 float64s: refused, nothing allocated."""
    header = {"descr": "<f8", "fortran_order": False, "shape": (10**6, 10**6)}
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    path = tmp_path / "d.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", buf.getvalue() + b"\0" * 64)
        zf.writestr("y.npy", buf.getvalue())
    with pytest.raises(DataError, match="more than the member"):
        load_npz(path)


def test_npz_declared_size_over_the_limit_and_damage(tmp_path: Path) -> None:
    x, y = blobs(100)
    path = write_npz(tmp_path / "d.npz", x=x, y=y)
    with pytest.raises(DataError, match="over the 1,000-byte limit"):
        load_npz(path, max_bytes=1000)
    (tmp_path / "not.npz").write_bytes(b"hello")
    with pytest.raises(DataError, match=r"not an \.npz file"):
        load_npz(tmp_path / "not.npz")
    data = path.read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError):
        load_npz(cut)
    fifo = tmp_path / "fifo.npz"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="FIFO"):
        load_npz(fifo)  # refused, not a hang


# ------------------------------------------------------------------------- data: images


def _png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def image_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 10,
                 size: tuple[int, int] = (6, 5), rgb: bool = True) -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        for i in range(per_class):
            shape = (*size, 3) if rgb else size
            _png(root / c / f"{i}.png", rng.integers(0, 256, shape, dtype=np.uint8))
    return root


def test_image_folder_classes_channels_and_split(tmp_path: Path) -> None:
    data = load_user_data(image_folder(tmp_path / "rgb"))
    assert data.classes == ["cat", "dog"] and data.num_classes == 2
    assert data.input_shape == (3, 6, 5) and data.test_is_validation
    assert len(data.train) + len(data.test) == 20
    x, _ = data.train[0]
    assert x.dtype == torch.float32 and float(x.max()) <= 1.0
    gray = load_user_data(image_folder(tmp_path / "gray", rgb=False))
    assert gray.input_shape == (1, 6, 5)
    # train/ and test/ folders
    image_folder(tmp_path / "split" / "train")
    image_folder(tmp_path / "split" / "test", per_class=3)
    split = load_user_data(tmp_path / "split")
    assert not split.test_is_validation and len(split.test) == 6 and len(split.train) == 20
    # sizes: one size or --image-size
    _png(tmp_path / "rgb" / "dog" / "big.png", np.zeros((7, 5, 3), np.uint8))
    with pytest.raises(DataError, match=r"is 6×5 \(H×W\).*is 7×5.*--image-size"):
        load_user_data(tmp_path / "rgb")
    resized = load_image_folder(tmp_path / "rgb", image_size=(4, 3))
    assert resized.input_shape == (3, 4, 3)
    assert parse_image_size("32") == (32, 32) and parse_image_size("24x32") == (24, 32)
    with pytest.raises(DataError):
        parse_image_size("0x5")


def test_image_folder_bad_inputs(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_user_data(tmp_path / "empty")
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "a" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no images"):
        load_user_data(tmp_path / "noimg")
    image_folder(tmp_path / "bad")
    (tmp_path / "bad" / "cat" / "zz.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"zz\.png: not a readable PNG"):
        load_user_data(tmp_path / "bad")
    # a GIF renamed .png: only the PNG, JPEG and BMP decoders run
    from PIL import Image

    image_folder(tmp_path / "gif")
    Image.new("L", (5, 6)).save(tmp_path / "gif" / "cat" / "g.png", format="GIF")
    with pytest.raises(DataError, match="not a readable PNG"):
        load_user_data(tmp_path / "gif")
    # pixel bound from the header, before decoding
    side = int(MAX_IMAGE_PIXELS**0.5) + 1
    image_folder(tmp_path / "huge")
    Image.new("L", (side, side)).save(tmp_path / "huge" / "dog" / "h.png")
    with pytest.raises(DataError, match="pixels, more than"):
        load_user_data(tmp_path / "huge")
    with pytest.raises(DataError, match="no such file or folder"):
        load_user_data(tmp_path / "nope")
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(DataError, match=r"not an \.npz file or a folder"):
        load_user_data(tmp_path / "x.csv")


def test_user_dataset_subset_and_select() -> None:
    ds = UserDataset([torch.arange(20.0).view(10, 2)], torch.arange(10) % 2, name="t",
                     split="train", num_classes=2)
    sub = ds.subset(4, seed=0)
    assert len(sub) == 4 and torch.bincount(sub.labels).tolist() == [2, 2]
    assert ds.example_inputs(3).shape == (3, 2)
    with pytest.raises(DataError):
        ds.subset(11)


# ------------------------------------------------------------------------------ user code

MODELS_PY = '''
import torch
from torch import nn
import torch.nn.functional as F


class TinyMLP(nn.Module):
    """A tabular model: BatchNorm + Dropout, a functional call."""

    def __init__(self, in_features: int = 6, hidden: int = 16, classes: int = 3):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden),
                                      nn.ReLU(), nn.Dropout(0.1))
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(F.relu(self.features(x)))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 8)
        self.emb = nn.Embedding(100, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x, tokens):
        return self.head(torch.relu(self.a(x) + self.emb(tokens).mean(1)))


def make_mlp(width: int):
    return TinyMLP(hidden=width)


class NotAModel:
    pass


def broken():
    return {}[1]
'''


@pytest.fixture()
def code_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "own_models.py").write_text(MODELS_PY)
    monkeypatch.chdir(tmp_path)
    for name in ("own_models", "deepsqueeze_user.own_models"):
        sys.modules.pop(name, None)
    return folder


def test_build_model_from_a_file_a_module_and_args(code_dir: Path) -> None:
    net = build_model(f"{code_dir}/own_models.py:TinyMLP")
    assert type(net).__name__ == "TinyMLP" and type(net).__module__ == "own_models"
    net = build_model(f"{code_dir}/own_models.py:make_mlp", {"width": 4})
    assert net.head.in_features == 4
    assert build_model("torch.nn:Linear", {"in_features": 2, "out_features": 1}).out_features == 1
    assert load_object(f"{code_dir}/own_models.py:TwoInputs") is load_object(
        f"{code_dir}/own_models.py:TwoInputs")  # the file runs once per process


@pytest.mark.parametrize(
    ("ref", "args", "needle"),
    [
        ("{d}/missing.py:X", None, "missing.py: no such file"),
        ("{d}/own_models.py:Nope", None, "no attribute 'Nope'; it defines TinyMLP, TwoInputs"),
        ("{d}/own_models.py:NotAModel", None, "not a torch.nn.Module subclass"),
        ("{d}/own_models.py:make_mlp", None, "--model-args '{{\"width\": \"...\"}}'"),
        ("{d}/own_models.py:TinyMLP", {"depth": 3}, "unexpected keyword argument 'depth'"),
        ("{d}/own_models.py:broken", None, "own_models.py:40: KeyError"),
        ("{d}/own_models.py", None, "own_models.py:ClassName"),
        ("no_such_module_xyz:Net", None, "no module named 'no_such_module_xyz'"),
        ("not-a-registered-name", None, "not a registered model"),
        ("{d}/own_models.py:1abc", None, "is not a Python name"),
    ],
)
def test_build_model_errors(code_dir: Path, ref: str, args: dict | None, needle: str) -> None:
    with pytest.raises(ModelError) as info:
        build_model(ref.format(d=code_dir), args)
    assert needle.format() in str(info.value)


def test_model_args_json() -> None:
    assert parse_model_args('{"width": 32}') == {"width": 32}
    assert parse_model_args(None) == {}
    for bad, needle in (("[1]", "JSON object"), ("{width: 3}", "JSON object such as"),
                        ("x" * 200_000, "characters")):
        with pytest.raises(ModelError, match=needle):
            parse_model_args(bad)


def test_a_syntax_error_in_the_users_file_is_one_line(code_dir: Path) -> None:
    (code_dir / "bad_syntax.py").write_text("x = (\n")
    with pytest.raises(ModelError, match=r"bad_syntax.py:1: SyntaxError"):
        load_object(f"{code_dir}/bad_syntax.py:x")
    assert "bad_syntax" not in sys.modules


def test_entry_point_group_lists_and_creates(tmp_path: Path) -> None:
    """A package registering ``deepsqueeze.models`` shows in ``deepsqueeze models`` and is
    created by name; listing imports nothing (a fresh process with a dist-info on its path)."""
    site = tmp_path / "site"
    (site / "acme_nets").mkdir(parents=True)
    (site / "acme_nets" / "__init__.py").write_text(
        "import torch\nIMPORTED = True\n"
        "def small(classes: int = 3):\n    return torch.nn.Linear(4, classes)\n")
    dist = site / "acme_nets-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-nets\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[deepsqueeze.models]\nacme-small = acme_nets:small\n")
    script = textwrap.dedent("""
        import sys
        from deepsqueeze.cli import main
        from deepsqueeze.usercode import build_model, registered_models
        found = registered_models()
        assert found["acme-small"].value == "acme_nets:small", found
        assert "acme_nets" not in sys.modules  # listing imports nothing
        net = build_model("acme-small", {"classes": 5})
        assert net.out_features == 5
        main(["models"])
    """)
    env = {**os.environ, "PYTHONPATH": str(site), "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "acme-small" in proc.stdout and "acme_nets:small" in proc.stdout
    assert "acme-nets 1.0" in proc.stdout
    assert registered_models() == {} or "acme-small" not in registered_models()


# ------------------------------------------------------------------------------ small things


def test_tables_keep_whole_layer_names(capsys: pytest.CaptureFixture[str]) -> None:
    """Layer names were cut with an ellipsis at 80 columns; now a pipe gets the whole table and
    a narrow terminal folds names, keeping every character."""
    from rich.table import Table

    from deepsqueeze import cli

    name = "encoder.blocks.11.attention.output_projection.parametrizations.weight.original"

    def table() -> Table:
        t = Table(title="layers")
        for col in ("layer", "weights", "kept", "encoding", "bits/weight", "bytes"):
            t.add_column(col, justify="left" if col in ("layer", "encoding") else "right")
        t.add_row(name, "1,234,567", "10.0%", "sparse-codebook", "4.00", "123,456")
        return t

    capsys.readouterr()
    cli.show(table())
    out = capsys.readouterr().out
    assert name in out and "sparse-codebook" in out and "1,234,567" in out and "…" not in out
    narrow = cli.PlainConsole(width=60, force_terminal=True, color_system=None,
                              file=open(os.devnull, "w"))  # noqa: SIM115
    saved = cli.console
    try:
        cli.console = narrow
        with narrow.capture() as captured:
            cli.show(table())
    finally:
        cli.console = saved
        narrow.file.close()
    text = captured.get()
    assert max(len(line) for line in text.splitlines()) <= 60
    assert "…" not in text and "1,234,567" in text
    cells = "".join(line.split("│")[1].strip() for line in text.splitlines() if "│" in line)
    assert name in cells  # folded over lines, every character kept


def test_docs_never_print_a_table_object() -> None:
    """``print(x.table())`` prints ``<rich.table.Table object at ...>``: the docs' snippets
    print tables with rich."""
    import re

    pattern = re.compile(r"(?<![\w.])print\([^\n]*\.(table|speed_table|memory_table)\(\)\)")
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            assert not pattern.search(line), f"{doc.name}:{number}: {line.strip()}"


# --------------------------------------------------------------- the command line, end to end

TINY_RECIPE = """
name: tiny
seed: 0
stages:
  - name: prune
    method: prune
    params: {sparsity: 0.5}
    finetune: {epochs: 1, lr: 0.01, batch_size: 32}
  - name: share
    method: share
    params: {bits: 4}
encode: {huffman: true}
"""

NO_GRAPH_PY = '''
import torch
from torch import nn


class Scale(nn.Module):
    """A layer type of the user's own: outside the graph allowlist."""

    def __init__(self, n: int):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return x * self.gain


class ScaledMLP(nn.Module):
    def __init__(self, hidden: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(6, hidden)
        self.scale = Scale(hidden)
        self.fc2 = nn.Linear(hidden, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.scale(self.fc1(x))))
'''


@pytest.fixture()
def own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A folder with the user's model code, an .npz of tabular data and a tiny recipe."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "own_models.py").write_text(MODELS_PY)
    (tmp_path / "no_graph.py").write_text(NO_GRAPH_PY)
    for name in ("own_models", "no_graph", "deepsqueeze_user.own_models",
                 "deepsqueeze_user.no_graph"):
        sys.modules.pop(name, None)
    x, y = blobs(300)
    write_npz(tmp_path / "tab.npz", x=x, y=y)
    (tmp_path / "recipe.yaml").write_text(TINY_RECIPE)
    return {"dir": tmp_path, "npz": tmp_path / "tab.npz", "recipe": tmp_path / "recipe.yaml",
            "code": tmp_path / "own_models.py", "nograph": tmp_path / "no_graph.py"}


def test_cli_train_compress_evaluate_own_model_on_npz(
        own: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """`train --model-code FILE:Class --data x.npz`, then `compress` (with and without the
    code: the model.pt holds a graph), `evaluate --data`, `inspect` — the issue's CLI path."""
    from deepsqueeze import dsq

    code = f"{own['code']}:TinyMLP"
    status, out, err = run_cli(
        ["train", "--model-code", code, "--model-args", '{"hidden": 24}', "--data", own["npz"],
         "--epochs", "4", "--lr", "0.05", "--batch-size", "32", "--out", "run",
         "--no-progress"], capsys)
    assert status == 0, err
    assert f"note: running your model code {code}" in err
    assert "validation split" in err and "trained TinyMLP on tab.npz" in out
    assert Path("run/model.pt").is_file()
    # the trained model learned the separable blobs
    acc = float(out.split("accuracy ")[1].split("%")[0]) / 100
    assert acc > 0.8, out

    status, out, err = run_cli(
        ["compress", "run/model.pt", "--recipe", own["recipe"], "--out", "tab.dsq", "--data",
         own["npz"], "--json", "c.json", "--no-progress"], capsys)
    assert status == 0, err
    assert "tab.dsq:" in out and "validation split carved from tab.npz" in out
    stored = dsq.read_model_file("tab.dsq")
    assert stored.file.meta["data"] == "tab.npz" and "dataset" not in stored.file.meta
    assert stored.user is not None and stored.user.class_name == "own_models:TinyMLP"
    file_acc = json.loads(Path("c.json").read_text())["file_accuracy"]
    assert file_acc > 0.6

    status, out, err = run_cli(
        ["compress", "run/model.pt", "--model-code", code, "--model-args", '{"hidden": 24}',
         "--recipe", own["recipe"], "--out", "tab2.dsq", "--data", own["npz"],
         "--no-progress"], capsys)
    assert status == 0, err
    first, second = dsq.load("tab.dsq").state_dict(), dsq.load("tab2.dsq").state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)  # same model, same weights

    status, out, err = run_cli(["evaluate", "tab.dsq", "--data", own["npz"], "--no-speed",
                                "--json", "e.json"], capsys)
    assert status == 0, err
    report = json.loads(Path("e.json").read_text())
    assert report["model"] == "TinyMLP" and "validation split" in report["dataset"]
    assert report["top1_accuracy"] == pytest.approx(file_acc)
    status, out, err = run_cli(["evaluate", "tab.dsq", "--data", own["npz"], "--split", "train",
                                "--no-speed", "--json", "t.json"], capsys)
    assert status == 0, err
    assert json.loads(Path("t.json").read_text())["samples"] == 270

    # made on the user's data: evaluate without --data says so (it used to run on MNIST)
    status, _, err = run_cli(["evaluate", "tab.dsq", "--no-speed"], capsys)
    assert_one_error(status, err, "was made on your own data (tab.npz)")
    status, out, err = run_cli(["inspect", "tab.dsq"], capsys)
    assert status == 0 and "features.0" in out and "TinyMLP" in out


def test_cli_own_model_without_a_graph_needs_its_code(
        own: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """A model outside the graph allowlist: compress and evaluate take --model-code to load
    the file into the user's skeleton; without it, one error line saying how."""
    from deepsqueeze.io import save_model

    net = build_model(f"{own['nograph']}:ScaledMLP")
    save_model(net, "scaled.pt", example_inputs=torch.zeros(1, 6))
    status, _, err = run_cli(["compress", "scaled.pt", "--recipe", own["recipe"], "--out",
                              "s.dsq", "--data", own["npz"], "--no-progress"], capsys)
    assert_one_error(status, err, "--model-code FILE.py:ClassName")
    assert not Path("s.dsq").exists()
    code = f"{own['nograph']}:ScaledMLP"
    status, out, err = run_cli(["compress", "scaled.pt", "--model-code", code, "--recipe",
                                own["recipe"], "--out", "s.dsq", "--data", own["npz"],
                                "--no-progress"], capsys)
    assert status == 0, err
    status, _, err = run_cli(["evaluate", "s.dsq", "--data", own["npz"], "--no-speed"], capsys)
    assert_one_error(status, err, "--model-code")
    status, out, err = run_cli(["evaluate", "s.dsq", "--model-code", code, "--data", own["npz"],
                                "--no-speed"], capsys)
    assert status == 0, err
    assert "ScaledMLP" in out
    status, out, err = run_cli(["inspect", "s.dsq"], capsys)  # the file alone: no code needed
    assert status == 0 and "scale" in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["train", "--model-code", "{code}:TinyMLP", "--data", "{npz}", "--dataset", "mnist"],
         "--data and --dataset both given"),
        (["train", "--model-args", '{{"hidden": 3}}'], "--model-args needs --model-code"),
        (["train", "--data", "{npz}"], "train --data needs --model-code"),
        (["train", "--model", "lenet5", "--model-code", "{code}:TinyMLP"],
         "--model and --model-code both given"),
        (["train", "--model-code", "{code}:TinyMLP", "--model-args", "[1]", "--data", "{npz}"],
         "JSON object"),
        (["train", "--model-code", "{code}:Missing", "--data", "{npz}"], "no attribute 'Missing'"),
        (["train", "--model-code", "{dir}/nope.py:Net", "--data", "{npz}"], "no such file"),
        (["train", "--model-code", "{code}:TwoInputs", "--data", "{npz}", "--epochs", "1"],
         "cannot run on tab.npz"),
        (["train", "--model-code", "{code}:TinyMLP", "--data", "{npz}", "--image-size", "8"],
         "--image-size applies to folders"),
        (["train", "--model-code", "{code}:TinyMLP", "--data", "{dir}/none.npz"], "no such file"),
        (["train", "--model-code", "{code}:TinyMLP", "--data", "{npz}", "--resume", "--out",
          "r"], "--resume continues runs on built-in datasets"),
        (["evaluate", "{npz}", "--image-size", "8"], "--image-size applies to a --data folder"),
        (["compress", "m.pt", "--recipe", "{recipe}", "--out", "{npz}", "--data", "{npz}"],
         "is the input file"),
    ],
)
def test_cli_own_bad_inputs_one_error_line(own: dict[str, Path], argv: list[str], needle: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    paths = {k: str(v) for k, v in own.items()}
    status, _, err = run_cli([a.format(**paths) for a in argv], capsys)
    assert_one_error(status, err, needle)


FASHION = REPO.parent / "shared" / "data" / "fashion-mnist"
needs_fashion = pytest.mark.skipif(
    not (Path(os.environ.get("DEEPSQUEEZE_DATA", "")) / "fashion-mnist").is_dir(),
    reason="Fashion-MNIST not found under DEEPSQUEEZE_DATA")


@needs_fashion
def test_evaluate_defaults_to_the_dataset_the_file_records(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file compressed on Fashion-MNIST is evaluated on Fashion-MNIST (it silently used MNIST
    and reported 7.85 %); another --dataset is honoured with a warning line."""
    from deepsqueeze import dsq, models
    from deepsqueeze.evaluation import DatasetMismatchWarning, resolve_dataset

    torch.manual_seed(0)
    path = tmp_path / "f.dsq"
    dsq.save(models.create("lenet300"), path, extra_meta={"dataset": "fashion-mnist"})
    status, _, err = run_cli(["evaluate", path, "--subset", "50", "--no-speed", "--json",
                                tmp_path / "r.json"], capsys)
    assert status == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["dataset"] == "fashion-mnist"
    assert "evaluating on fashion-mnist, the dataset" in err
    if (Path(os.environ["DEEPSQUEEZE_DATA"]) / "mnist").is_dir():
        status, _, err = run_cli(["evaluate", path, "--dataset", "MNIST", "--subset", "50",
                                    "--no-speed"], capsys)
        assert status == 0, err
        warning = [line for line in err.splitlines() if line.startswith("warning:")]
        assert len(warning) == 1 and "records dataset fashion-mnist, evaluating on mnist" in \
            warning[0]
    with pytest.warns(DatasetMismatchWarning):
        assert resolve_dataset(path, "kmnist") == "kmnist"
    assert resolve_dataset(path, None) == "fashion-mnist"
    plain = tmp_path / "plain.dsq"
    dsq.save(models.create("lenet300"), plain)
    assert resolve_dataset(plain, None) == "mnist"  # nothing recorded: the old default
    forged = tmp_path / "forged.dsq"
    dsq.save(models.create("lenet300"), forged, extra_meta={"dataset": "\x1b[31mevil"})
    status, _, err = run_cli(["evaluate", forged, "--no-speed"], capsys)
    line = assert_one_error(status, err, "records an unknown dataset")
    assert "\x1b" not in line


@needs_fashion
def test_example_own_model_fashion_quick(tmp_path: Path) -> None:
    """examples/own_model_fashion.py --quick: a user's CNN trained with a plain loop, compressed
    with the user's DataLoader and loss, loaded in fresh processes three ways (skeleton,
    class-free, runtime) with the same predictions."""
    numbers = tmp_path / "n.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "own_model_fashion.py"),
                           "--quick", "--json", str(numbers)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(numbers.read_text())
    assert result["three_loads_same_predictions"] and result["classfree_bit_exact"]
    assert result["runtime_max_abs_diff"] < 1e-3
    assert result["compression"] > 10 and 0 < result["file_accuracy"] <= 1
    assert str(tmp_path) not in numbers.read_text()


def test_export_own_models_cli_and_two_inputs(
        own: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """`export` takes a user's model (it refused: 'has no model spec'): from the graph, into the
    skeleton with --model-code, and a model with two inputs (input0, input1) in Python."""
    import onnxruntime

    from deepsqueeze import dsq
    from deepsqueeze.runtime.onnx_export import export_onnx

    torch.manual_seed(0)
    net = build_model(f"{own['code']}:TinyMLP").eval()
    dsq.save(net, "mlp.dsq", example_inputs=torch.zeros(1, 6))
    status, out, err = run_cli(["export", "mlp.dsq", "--out", "mlp.onnx"], capsys)
    assert status == 0, err
    assert "input 'input'" in out
    x = torch.randn(5, 6)
    sess = onnxruntime.InferenceSession("mlp.onnx", providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = dsq.load("mlp.dsq")(x).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)

    scaled = build_model(f"{own['nograph']}:ScaledMLP").eval()
    dsq.save(scaled, "scaled.dsq", example_inputs=torch.zeros(1, 6))
    status, _, err = run_cli(["export", "scaled.dsq", "--out", "s.onnx"], capsys)
    assert_one_error(status, err, "--model-code")
    assert not Path("s.onnx").exists()
    status, out, err = run_cli(["export", "scaled.dsq", "--out", "s.onnx", "--model-code",
                                f"{own['nograph']}:ScaledMLP"], capsys)
    assert status == 0, err

    two = build_model(f"{own['code']}:TwoInputs").eval()
    xs = (torch.randn(3, 5), torch.randint(0, 100, (3, 7)))
    data = export_onnx(two, example_inputs=xs)
    sess = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input0", "input1"]
    got = sess.run(None, {"input0": xs[0].numpy(), "input1": xs[1].numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, two(*xs).numpy(), atol=1e-5)
    with pytest.raises(ModelError, match="pass example_inputs"):
        export_onnx(two)


def test_bench_own_models(own: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """`bench` takes a user's model file (it refused: 'has no model spec'): from its graph, or
    into the skeleton with --model-code; a two-input model in Python; outputs agree."""
    from deepsqueeze import dsq
    from deepsqueeze.runtime.bench import bench

    torch.manual_seed(0)
    scaled = build_model(f"{own['nograph']}:ScaledMLP").eval()
    dsq.save(scaled, "scaled.dsq", example_inputs=torch.zeros(1, 6))
    argv = ["bench", "scaled.dsq", "--batch", "1,4", "--runs", "2", "--no-autotune",
            "--json", "b.json"]
    status, _, err = run_cli(argv, capsys)
    assert_one_error(status, err, "--model-code")
    status, out, err = run_cli([*argv, "--model-code", f"{own['nograph']}:ScaledMLP"], capsys)
    assert status == 0, err
    report = json.loads(Path("b.json").read_text())
    assert report["model"] == "ScaledMLP"
    backends = {(t["backend"], t["batch"]) for t in report["timings"]}
    assert {("dense", 1), ("runtime", 4), ("onnxruntime", 4)} <= backends
    assert all(t["max_abs_diff"] < 1e-4 for t in report["timings"])
    assert "peak RSS not measured" in out

    two = build_model(f"{own['code']}:TwoInputs").eval()
    tokens = torch.zeros(1, 7, dtype=torch.int64)
    dsq.save(two, "two.dsq", example_inputs=(torch.zeros(1, 5), tokens))
    result = bench("two.dsq", [2], runs=2, memory=False, autotune=False)
    assert {t.backend for t in result.timings} == {"dense", "runtime", "onnxruntime"}
    assert all(t.max_abs_diff < 1e-4 for t in result.timings)


CNN_PY = '''
from torch import nn


def tiny_cnn(classes: int = 2):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(16, classes))
'''


def test_cli_train_and_evaluate_on_an_image_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`--data folder/` (one sub-folder per class) with `--image-size`, a factory function from
    the user's file, and `evaluate` of the model.pt on the same folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cnn_code.py").write_text(CNN_PY)
    sys.modules.pop("cnn_code", None)
    root = image_folder(tmp_path / "imgs", per_class=8, size=(9, 7))
    _png(root / "dog" / "odd.png", np.zeros((12, 10, 3), np.uint8))  # another size: resized
    argv = ["train", "--model-code", "cnn_code.py:tiny_cnn", "--data", root, "--epochs", "1",
            "--batch-size", "4", "--out", "run", "--no-progress"]
    status, _, err = run_cli(argv, capsys)
    assert_one_error(status, err, "--image-size")
    status, out, err = run_cli([*argv, "--image-size", "8x6"], capsys)
    assert status == 0, err
    assert "trained Sequential on imgs" in out
    status, out, err = run_cli(["evaluate", "run/model.pt", "--data", root, "--image-size",
                                "8x6", "--no-speed", "--json", "e.json"], capsys)
    assert status == 0, err
    report = json.loads(Path("e.json").read_text())
    assert report["samples"] == 2 and "validation split carved from imgs" in report["dataset"]


def test_train_compress_evaluate_hold_out_the_same_validation_split(
        own: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """`train --seed 7 --data x.npz` carves the validation split compress and evaluate use
    (seed 0): the samples a model is scored on are never trained on, whatever --seed is."""
    seen: list[torch.Tensor] = []
    import deepsqueeze.data.user as user_mod

    original = user_mod.load_user_data

    def spy(*args: object, **kwargs: object) -> user_mod.UserData:
        data = original(*args, **kwargs)  # type: ignore[arg-type]
        seen.append(data.test.labels.clone())
        seen.append(data.test.inputs[0].clone())
        return data

    mp = pytest.MonkeyPatch()
    mp.setattr(user_mod, "load_user_data", spy)
    try:
        status, _, err = run_cli(["train", "--model-code", f"{own['code']}:TinyMLP", "--data",
                                  own["npz"], "--epochs", "1", "--seed", "7", "--out", "run",
                                  "--no-progress"], capsys)
        assert status == 0, err
        status, _, err = run_cli(["evaluate", "run/model.pt", "--data", own["npz"],
                                  "--no-speed"], capsys)
        assert status == 0, err
    finally:
        mp.undo()
    assert len(seen) == 4 and torch.equal(seen[1], seen[3]) and torch.equal(seen[0], seen[2])
