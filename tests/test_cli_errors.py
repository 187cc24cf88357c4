"""One error path: every bad input, through the real command line, ends in one line.

Each case runs ``deepsqueeze.cli.main`` (what the ``deepsqueeze`` script runs) and expects exit
status 2, exactly one non-empty line on stderr starting with ``error:`` and naming the problem,
and no traceback. The cases are those of issue 18 (findings 10 and 11: rich markup in names,
paths and fields; bad and huge option values; damaged recipes and run.json; output paths) plus
usage errors, interrupts and OS errors. A few run in a fresh ``python -I`` process, under a
memory limit and a timeout, because before their fix they hung or tried to allocate 40 GB.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from deepsqueeze import dsq, models
from deepsqueeze.cli import main
from deepsqueeze.errors import OptionError, OutputPathError, RecipeError
from deepsqueeze.io import atomic_write, save_model
from deepsqueeze.methods.base import create_method, select_layers

from .conftest import needs_mnist, run_cli
from .dsq_forge import manifest_text

# ---------------------------------------------------------------------------------- helpers


def assert_one_error(code: int, err: str, needle: str | None = None, status: int = 2) -> str:
    """Exit ``status``, one non-empty stderr line ``error: ...`` holding ``needle``."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == status, f"exit {code}, stderr: {err}"
    assert len(lines) == 1, f"expected one line on stderr, got: {err}"
    assert lines[0].startswith("error: "), lines[0]
    if needle is not None:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def repack(data: bytes, edit: Callable[[str], str]) -> bytes:
    """A .dsq file with its manifest JSON text edited and every checksum valid again.

    Written by hand (not with the container's writer, which refuses what a forger would not)."""
    _, major, minor, _, stored_len, _, _ = struct.unpack_from("<8sHHIIII", data)
    text = edit(manifest_text(data).decode("utf-8")).encode("utf-8")
    head = struct.pack("<8sHHIII", data[:8], major, minor, 0, len(text), len(text))
    crc = zlib.crc32(text, zlib.crc32(head))
    return head + struct.pack("<I", crc) + text + data[28 + stored_len :]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small real and forged inputs."""
    folder = tmp_path_factory.mktemp("cli-inputs")
    torch.manual_seed(0)
    net = models.create("lenet300")
    for name, params in (("prune", {"sparsity": 0.9}), ("share", {"bits": 4})):
        method = create_method(name, **params)
        method.apply(net, select_layers(net, None, method.supported))
        method.finalize(net)
    out = {"model": save_model(models.create("lenet300"), folder / "model.pt")}
    dsq.save(net, folder / "small.dsq")
    out["dsq"] = folder / "small.dsq"
    data = out["dsq"].read_bytes()
    forged = {
        "name-markup": repack(data, lambda t: t.replace('"name":"lenet300"',
                                                        '"name":"[/x]lenet300"', 1)),
        "format-markup": repack(data, lambda t: t.replace('"format":"deepsqueeze-model"',
                                                          '"format":"[/x] :smile:"', 1)),
        "huge-int": repack(data, lambda t: t.replace('"dense_parameters":',
                                                     '"dense_parameters":' + "1" + "0" * 400
                                                     + ',"_was":', 1)),
        "digits-4300": repack(data, lambda t: t.replace('"dense_parameters":',
                                                        '"dense_parameters":' + "9" * 4400
                                                        + ',"_was":', 1)),
    }
    for name, blob in forged.items():
        out[name] = folder / f"{name}.dsq"
        out[name].write_bytes(blob)
    # a model.pt whose version is a string
    obj = torch.load(out["model"], weights_only=True)
    obj["version"] = "2"
    torch.save(obj, folder / "version-str.pt")
    out["version-str"] = folder / "version-str.pt"
    # recipes
    recipes = {
        "inf": "stages: [{method: prune, params: {sparsity: 0.5}, finetune: {epochs: .inf}}]\n",
        "seed": "seed: 1180591620717411303424\n"
                "stages: [{method: prune, params: {sparsity: 0.5}}]\n",
        "nan-lr": "stages: [{method: prune, params: {sparsity: 0.5}, finetune: {lr: .nan}}]\n",
        "layer": "stages: [{method: prune, params: {sparsity: 0.5, layers: ['[/x]:smile:']}}]\n",
        "ok": "name: r\nstages: [{method: prune, params: {sparsity: 0.5}}]\n",
    }
    for name, text in recipes.items():
        out[f"recipe-{name}"] = folder / f"{name}.yaml"
        out[f"recipe-{name}"].write_text(text)
    out["recipe-utf8"] = folder / "latin1.yaml"
    out["recipe-utf8"].write_bytes(b"name: caf\xe9\nstages: [{method: prune}]\n")
    return out


def _run_folder(tmp_path: Path, content: str | bytes) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    raw = content if isinstance(content, bytes) else content.encode()
    (run / "run.json").write_bytes(raw)
    return run


# ------------------------------------------------------------- bad input: one line, exit 2

GOOD_RUN = {"model": "lenet300", "dataset": "mnist", "subset": 100, "model_kwargs": None,
            "config": {"epochs": 1, "lr": 0.1}}

# (argv with {model}/{dsq}/... placeholders, needle in the error line)
CASES: dict[str, tuple[list[str], str]] = {
    # finding 10: markup from files, paths and options
    "dsq model name with markup": (["inspect", "{name-markup}"], "'[/x]lenet300'"),
    "dsq format field with markup": (["inspect", "{format-markup}"], "[/x] :smile:"),
    "path with markup": (["inspect", "{tmp}/[/x] [bold]:smile:.dsq"], "[/x] [bold]:smile:.dsq"),
    "dataset with markup": (["train", "--dataset", "[/x]", "--out", "{tmp}/r"], "'[/x]'"),
    "model with markup": (["train", "--model", "[bold]x[/x]"], "[bold]x[/x]"),
    "recipe path with markup": (["compress", "{model}", "--recipe", "{tmp}/[/x].yaml",
                                 "--out", "{tmp}/o.dsq"], "[/x].yaml"),
    "evaluate split with markup": (["evaluate", "{dsq}", "--split", "[/x]", "--no-speed"],
                                   "[/x]"),
    # finding 10: huge integers and wrong types in files (the readers' checks)
    "dsq dense_parameters 10**400": (["inspect", "{huge-int}"], "integer"),
    "dsq 4,400-digit integer": (["inspect", "{digits-4300}"], "integer"),
    "bench dsq dense_parameters 10**400": (["bench", "{huge-int}", "--no-memory",
                                            "--no-onnx", "--runs", "1"], "integer"),
    "model.pt version '2'": (["evaluate", "{version-str}", "--no-speed"], "version"),
    # finding 10: training options
    "train --lr -1": (["train", "--lr", "-1"], "--lr"),
    "train --lr nan": (["train", "--lr", "nan"], "--lr"),
    "train --batch-size 0": (["train", "--batch-size", "0"], "--batch-size"),
    "train --batch-size 10**23": (["train", "--batch-size", str(10**23)], "--batch-size"),
    "train --epochs -1": (["train", "--epochs", "-1"], "--epochs"),
    "train --epochs 1e400": (["train", "--epochs", "1e400"], "finite"),
    "train --optimizer foo": (["train", "--optimizer", "foo"], "'sgd', 'adam' or 'adamw'"),
    "train --precision fp8": (["train", "--precision", "fp8"], "'fp32', 'bf16' or 'fp16'"),
    "train --lr-schedule x": (["train", "--lr-schedule", "x"], "'cosine', 'constant' or 'step'"),
    "train --seed 10**23": (["train", "--seed", str(10**23)], "--seed"),
    "train --seed -1": (["train", "--seed", "-1"], "--seed"),
    "train --device foo": (["train", "--device", "foo"], "--device"),
    "train --subset 10**30": (["train", "--subset", str(10**30)], "--subset"),
    "train --subset 0": (["train", "--subset", "0"], "--subset"),
    "train --subset 5000 digits": (["train", "--subset", "9" * 5000], "--subset"),
    "train --dist-timeout nan": (["train", "--dist-timeout", "nan"], "--dist-timeout"),
    "train --nproc 0": (["train", "--nproc", "0"], "--nproc"),
    # finding 10: recipes
    "recipe epochs .inf": (["compress", "{model}", "--recipe", "{recipe-inf}", "--out",
                            "{tmp}/o.dsq"], "stages.0.finetune.epochs"),
    "recipe lr .nan": (["compress", "{model}", "--recipe", "{recipe-nan-lr}", "--out",
                        "{tmp}/o.dsq"], "stages.0.finetune.lr"),
    "recipe seed 2**70": (["compress", "{model}", "--recipe", "{recipe-seed}", "--out",
                           "{tmp}/o.dsq"], "seed"),
    "recipe not UTF-8": (["compress", "{model}", "--recipe", "{recipe-utf8}", "--out",
                          "{tmp}/o.dsq"], "not UTF-8"),
    "recipe is a folder": (["compress", "{model}", "--recipe", "{tmp}", "--out",
                            "{tmp}/o.dsq"], "is a folder"),
    "compress --subset -1": (["compress", "{model}", "--recipe", "{recipe-ok}", "--out",
                              "{tmp}/o.dsq", "--subset", "-1"], "--subset"),
    # finding 10: bench and evaluate counts
    "bench --threads 0": (["bench", "{dsq}", "--threads", "0"], "--threads"),
    "bench --threads 10**20": (["bench", "{dsq}", "--threads", str(10**20)], "--threads"),
    "bench --batch 0": (["bench", "{dsq}", "--batch", "0"], "--batch"),
    "bench --batch 10**9": (["bench", "{dsq}", "--batch", str(10**9)], "--batch"),
    "bench --batch x": (["bench", "{dsq}", "--batch", "1,x"], "--batch"),
    "bench --runs 0": (["bench", "{dsq}", "--runs", "0"], "--runs"),
    "bench --memory-budget -1": (["bench", "{dsq}", "--memory-budget", "-1"],
                                 "--memory-budget"),
    "bench --memory-budget nan": (["bench", "{dsq}", "--memory-budget", "nan"],
                                  "--memory-budget"),
    "evaluate --runs 0": (["evaluate", "{dsq}", "--runs", "0"], "--runs"),
    "evaluate --throughput-batch 0": (["evaluate", "{dsq}", "--throughput-batch", "0"],
                                      "--throughput-batch"),
    "evaluate --subset 0": (["evaluate", "{dsq}", "--subset", "0"], "--subset"),
    # finding 11: output paths, checked before any work
    "compress --out a folder": (["compress", "{model}", "--recipe", "{recipe-ok}", "--out",
                                 "{tmp}"], "is a folder"),
    "compress --out under a file": (["compress", "{model}", "--recipe", "{recipe-ok}", "--out",
                                     "{model}/x.dsq"], "is a file, not a folder"),
    "compress --out = the model": (["compress", "{model}", "--recipe", "{recipe-ok}", "--out",
                                    "{model}"], "is the input file"),
    "compress --out = the recipe": (["compress", "{model}", "--recipe", "{recipe-ok}", "--out",
                                     "{recipe-ok}"], "is the input file"),
    "compress --out = a hard link of the model": (
        ["compress", "{hardlink}", "--recipe", "{recipe-ok}", "--out", "{model}"],
        "is the input file"),
    "compress --out = a symlink to the model": (
        ["compress", "{model}", "--recipe", "{recipe-ok}", "--out", "{symlink}"],
        "is the input file"),
    "compress --out a FIFO": (["compress", "{model}", "--recipe", "{recipe-ok}", "--out",
                               "{fifo}"], "not a regular file"),
    "compress --json = --out": (["compress", "{model}", "--recipe", "{recipe-ok}", "--out",
                                 "{tmp}/o.dsq", "--json", "{tmp}/o.dsq"], "same file"),
    "compress --json = the model": (["compress", "{model}", "--recipe", "{recipe-ok}", "--out",
                                     "{tmp}/o.dsq", "--json", "{model}"], "is the input file"),
    "export --out = the input": (["export", "{dsq}", "--out", "{dsq}"], "is the input file"),
    "export --out a folder": (["export", "{dsq}", "--out", "{tmp}"], "is a folder"),
    "export --out under a file": (["export", "{dsq}", "--out", "{dsq}/m.onnx"],
                                  "is a file, not a folder"),
    "train --out a file": (["train", "--out", "{model}"], "is a file, not a folder"),
    "train --out under a file": (["train", "--out", "{model}/run"], "is a file, not a folder"),
    "inspect --json = the input": (["inspect", "{dsq}", "--json", "{dsq}"], "is the input file"),
    "inspect --json a folder": (["inspect", "{dsq}", "--json", "{tmp}"], "is a folder"),
    "evaluate --json = the input": (["evaluate", "{model}", "--json", "{model}"],
                                    "is the input file"),
    "bench --json = the input": (["bench", "{dsq}", "--json", "{dsq}"], "is the input file"),
    # usage errors (click's): one line too
    "unknown command": (["squeeze"], "No such command 'squeeze'"),
    "unknown option": (["inspect", "{dsq}", "--colour"], "--colour"),
    "missing argument": (["inspect"], "Missing argument"),
    "not an integer": (["train", "--batch-size", "many"], "--batch-size"),
}
# cases whose error comes from the dataset loader (all others are refused before it runs)
REACHES_LOADER = {"dataset with markup", "evaluate split with markup"}
# cases fixed by other parts of issue 18's work (the readers), run here through the CLI
OTHERS = {"dsq dense_parameters 10**400", "dsq 4,400-digit integer",
          "bench dsq dense_parameters 10**400", "model.pt version '2'"}


@pytest.fixture()
def paths(files: dict[str, Path], tmp_path: Path) -> dict[str, str]:
    links = tmp_path / "links"
    links.mkdir()
    os.link(files["model"], links / "hard.pt")
    (links / "sym.pt").symlink_to(files["model"])
    os.mkfifo(links / "fifo")
    return {**{k: str(v) for k, v in files.items()}, "tmp": str(tmp_path),
            "hardlink": str(links / "hard.pt"), "symlink": str(links / "sym.pt"),
            "fifo": str(links / "fifo")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_ends_in_one_error_line(case: str, paths: dict[str, str], files,
                                          capsys, monkeypatch) -> None:
    argv, needle = CASES[case]
    before = {p: p.stat().st_mtime_ns for p in files.values()}
    # nothing may reach the data: output paths and options are checked first
    for module in ("deepsqueeze.training.run", "deepsqueeze.pipeline.runner"):
        if case not in REACHES_LOADER:
            monkeypatch.setattr(f"{module}.load_dataset", _no_data)
    code, _, err = run_cli([a.format_map(paths) for a in argv], capsys)
    assert_one_error(code, err, needle)
    assert {p: p.stat().st_mtime_ns for p in files.values()} == before, "an input was changed"


def _no_data(*_args, **_kwargs):
    raise AssertionError("the dataset was loaded before the bad input was refused")


def test_resume_from_a_tampered_run_json(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr("deepsqueeze.training.run.load_dataset", _no_data)
    cases: dict[str, tuple[str | bytes, str]] = {
        "not JSON": ("{", "run.json: damaged"),
        "not UTF-8": (b'{"model": "lenet300\xff"}', "run.json: damaged"),
        "a list": ("[]", "must hold a JSON object"),
        "config missing": (json.dumps({k: v for k, v in GOOD_RUN.items() if k != "config"}),
                           "'config' is missing"),
        "model a number": (json.dumps({**GOOD_RUN, "model": 5}), "'model' must be str"),
        "config a string": (json.dumps({**GOOD_RUN, "config": "x"}), "'config' must be dict"),
        "subset a string": (json.dumps({**GOOD_RUN, "subset": "all"}), "'subset' must be int"),
        "model with markup": (json.dumps({**GOOD_RUN, "model": "[/x]:smile:"}),
                              "'[/x]:smile:'"),
        "lr -1 recorded": (json.dumps({**GOOD_RUN, "config": {"lr": -1}}), "--lr"),
        "unknown option recorded": (json.dumps({**GOOD_RUN, "config": {"zz": 1}}), "zz"),
        "seed 10**30 recorded": (json.dumps({**GOOD_RUN, "config": {"seed": 10**30}}),
                                 "--seed"),
        "5000-digit integer": ('{"model": "lenet300", "subset": ' + "9" * 5000 + "}",
                               "run.json: damaged"),
    }
    for name, (content, needle) in cases.items():
        folder = tmp_path / name.replace(" ", "-")
        folder.mkdir()
        run = _run_folder(folder, content)
        code, _, err = run_cli(["train", "--resume", "--out", run], capsys)
        line = assert_one_error(code, err, needle)
        assert "run.json" in line or "[/x]" in line, (name, line)


# --------------------------------------------------------------- markup never parsed


def test_markup_in_a_path_is_printed_as_it_is(files, tmp_path: Path, capsys) -> None:
    odd = tmp_path / "[bold]a[" / "x] :smile: [red]b\x1b[2J.dsq"  # reads ...a[/x] :smile:...
    odd.parent.mkdir()
    odd.write_bytes(files["dsq"].read_bytes())
    code, out, err = run_cli(["inspect", odd, "--json", tmp_path / "[/y].json"], capsys)
    assert code == 0, err
    flat = " ".join(out.split())
    assert "[bold]a[/x] :smile: [red]b\\x1b[2J.dsq" in flat and "😄" not in out
    assert "\x1b" not in out  # a terminal escape in a name is shown, not sent
    assert json.loads((tmp_path / "[/y].json").read_text())["path"] == str(odd)


@needs_mnist
def test_markup_in_recipe_and_stage_names_is_printed_as_it_is(files, tmp_path: Path,
                                                              capsys) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: '[/x] :smile: [bold]r'\ndataset: mnist\n"
        "stages: [{method: prune, name: \"[/y]s\\x1b[2J\", params: {sparsity: 0.5},\n"
        "          finetune: {epochs: 0.05, batch_size: 100}}]\n"
    )
    code, out, err = run_cli(["compress", files["model"], "--recipe", recipe, "--out",
                              tmp_path / "o.dsq", "--subset", "200", "--progress"], capsys)
    assert code == 0, err
    assert "[/x] :smile: [bold]r" in out and "😄" not in out
    # the stage name, in the stages table and the progress bar: shown, never sent to the terminal
    assert out.count("[/y]s\\x1b[2J") >= 2 and "\x1b" not in out


# ------------------------------------------------------------ interrupts, OS errors, bugs


def test_ctrl_c_is_one_line_and_status_130(files, capsys, monkeypatch) -> None:
    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("deepsqueeze.dsq.inspect", interrupted)
    code, _, err = run_cli(["inspect", files["dsq"]], capsys)
    assert_one_error(code, err, "interrupted", status=130)


def test_an_os_error_while_writing_is_one_line(files, tmp_path: Path, capsys,
                                               monkeypatch) -> None:
    def disk_full(_fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("deepsqueeze.io.os.fsync", disk_full)
    code, _, err = run_cli(["inspect", files["dsq"], "--json", tmp_path / "o.json"], capsys)
    assert_one_error(code, err, os.strerror(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []  # no partial file, no temp file


def test_a_bug_keeps_its_traceback(files, monkeypatch) -> None:
    def bug(*_args, **_kwargs):
        return 1 / 0

    monkeypatch.setattr("deepsqueeze.dsq.inspect", bug)
    with pytest.raises(ZeroDivisionError) as info:
        main(["inspect", str(files["dsq"])])
    assert any("this is a bug" in note for note in getattr(info.value, "__notes__", []))


def test_usage_without_a_command_shows_the_help(capsys) -> None:
    code, out, _ = run_cli([], capsys)
    assert code == 2 and "Usage" in out and "compress" in out
    code, out, err = run_cli(["--help"], capsys)
    assert code == 0 and "Usage" in out and not err


# ---------------------------------------------------------- checked before work, at the API


def test_output_checks_come_before_the_work(files, tmp_path: Path) -> None:
    from deepsqueeze.pipeline import compress
    from deepsqueeze.runtime.onnx_export import export_onnx
    from deepsqueeze.training import train

    t0 = time.perf_counter()
    with pytest.raises(OutputPathError, match="is the input file"):
        compress(files["model"], files["recipe-ok"], out=files["model"], dataset="no-such")
    with pytest.raises(OutputPathError, match="is a folder"):
        compress(files["model"], files["recipe-ok"], out=tmp_path, dataset="no-such")
    with pytest.raises(OutputPathError, match="is the input file"):
        export_onnx(files["dsq"], files["dsq"])
    with pytest.raises(OutputPathError, match="is a file, not a folder"):
        train("lenet300", "no-such", out=files["model"])
    assert time.perf_counter() - t0 < 5
    assert list(tmp_path.iterdir()) == []  # the probes left nothing behind


def test_output_check_creates_nothing_it_does_not_keep(tmp_path: Path) -> None:
    from deepsqueeze.outputs import check_output_dir, check_output_file

    check_output_file(tmp_path / "a" / "b" / "c.dsq")
    check_output_dir(tmp_path / "run" / "x")
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_folder_is_refused_up_front(files, tmp_path: Path, capsys) -> None:
    if os.geteuid() == 0:  # root writes anywhere a mode allows: use a read-only filesystem
        folder = Path("/sys")
        if not folder.is_dir() or _can_create(folder):
            pytest.skip("no unwritable folder for root here")
    else:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o500)
    try:
        code, _, err = run_cli(["compress", files["model"], "--recipe", files["recipe-ok"],
                                "--out", folder / "sub" / "o.dsq"], capsys)
        assert_one_error(code, err, "cannot write in")
    finally:
        if folder != Path("/sys"):
            folder.chmod(0o700)


def _can_create(folder: Path) -> bool:
    try:
        (folder / ".dsq-test").mkdir()
    except OSError:
        return False
    (folder / ".dsq-test").rmdir()
    return True


def test_train_config_errors_at_the_api() -> None:
    from deepsqueeze.pipeline import parse_recipe
    from deepsqueeze.training import TrainConfig, train

    with pytest.raises(OptionError, match=r"lr \(--lr\): Input should be greater than 0"):
        TrainConfig(lr=-1)
    with pytest.raises(OptionError, match=r"--epochs.*finite"):
        train("lenet300", "no-such", epochs=float("inf"))
    with pytest.raises(OptionError, match="--seed"):
        train("lenet300", "no-such", seed=10**23)
    # inside a recipe the same rules report the field's path
    with pytest.raises(RecipeError, match=r"stages\.0\.finetune\.epochs: .*finite"):
        parse_recipe({"stages": [{"method": "prune", "finetune": {"epochs": float("inf")}}]})


# ------------------------------------------------------------------ atomic write permissions


def test_replacing_a_file_keeps_its_permissions(tmp_path: Path) -> None:
    private = tmp_path / "private.json"
    private.write_text("{}")
    private.chmod(0o600)
    with atomic_write(private, "w") as handle:
        handle.write("[]")
    assert private.stat().st_mode & 0o777 == 0o600 and private.read_text() == "[]"
    fresh = tmp_path / "fresh.json"
    umask = os.umask(0o022)
    try:
        with atomic_write(fresh, "w") as handle:
            handle.write("[]")
    finally:
        os.umask(umask)
    assert fresh.stat().st_mode & 0o777 == 0o644


# ----------------------------------------------- subprocesses never import from the cwd


PLANT = "import pathlib; pathlib.Path({marker!r}).write_text('ran'); raise SystemExit(3)\n"


def test_bench_memory_never_imports_from_the_working_directory(files, tmp_path: Path, capsys,
                                                               monkeypatch) -> None:
    """A torch.py, deepsqueeze/ or sitecustomize.py in the folder bench runs from is never
    imported by its peak-RSS subprocess (issue 18, finding 2)."""
    marker = tmp_path / "PLANTED-CODE-RAN"
    cwd = tmp_path / "cwd"
    (cwd / "deepsqueeze").mkdir(parents=True)
    for name in ("torch.py", "deepsqueeze/__init__.py", "sitecustomize.py", "numpy.py"):
        (cwd / name).write_text(PLANT.format(marker=str(marker)))
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("PYTHONPATH", str(cwd))  # an isolated child ignores this too
    code, out, err = run_cli(["bench", files["dsq"], "--batch", "1", "--runs", "2",
                              "--no-onnx", "--no-autotune", "--memory"], capsys)
    assert code == 0, err
    assert not marker.exists()
    assert "peak RSS" in out or "RSS" in out
    assert "failed" not in out  # the memory rows were measured, not skipped with a note


# ------------------------------------------ fresh processes: hangs and huge allocations


def _limited() -> None:  # pragma: no cover - runs in the child
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))


def run_isolated(argv: list[str], cwd: Path, timeout: float = 120) -> tuple[int, str]:
    """``python -I -m deepsqueeze argv`` (deepsqueeze found where this process found it) under
    a 6 GiB address-space limit: (status, stderr)."""
    from deepsqueeze.runtime.memory import isolated_command

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(isolated_command("deepsqueeze", *map(str, argv)),
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, preexec_fn=_limited)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("command", ["inspect", "evaluate"])
def test_a_fifo_as_input_does_not_hang(command: str, tmp_path: Path) -> None:
    fifo = tmp_path / "model.dsq"
    os.mkfifo(fifo)
    extra = ["--no-speed"] if command == "evaluate" else []
    code, err = run_isolated([command, fifo, *extra], tmp_path, timeout=30)
    assert_one_error(code, err)


def test_a_huge_input_size_in_a_spec_is_refused(tmp_path: Path) -> None:
    net = models.create("resnet20")
    dsq.save(net, tmp_path / "r.dsq")
    data = (tmp_path / "r.dsq").read_bytes()
    forged = repack(data, lambda t: t.replace('"input_size":32', '"input_size":100000', 1))
    assert forged != data
    (tmp_path / "big.dsq").write_bytes(forged)
    for argv in (["export", "big.dsq", "--out", "big.onnx"],
                 ["bench", "big.dsq", "--no-memory", "--no-onnx", "--runs", "1"]):
        code, err = run_isolated(argv, tmp_path)
        assert_one_error(code, err, "input_size")


def test_the_command_line_script_reports_in_one_line(files, tmp_path: Path) -> None:
    """The installed entry point (python -I -m deepsqueeze) goes through the same path."""
    code, err = run_isolated(["train", "--lr", "-1", "--out", tmp_path / "run"], tmp_path)
    assert_one_error(code, err, "--lr")
    assert not (tmp_path / "run").exists()


def test_torchrun_workers_never_import_from_the_working_directory(tmp_path: Path,
                                                                  monkeypatch) -> None:
    """``train --nproc`` workers are ``python -m deepsqueeze`` processes started in the user's
    folder: a torch.py there must not run in them."""
    from deepsqueeze.training import distributed

    if sys.version_info < (3, 11):
        pytest.skip("PYTHONSAFEPATH needs Python 3.11")
    marker = tmp_path / "PLANTED-CODE-RAN"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "torch.py").write_text(PLANT.format(marker=str(marker)))
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("PYTHONSAFEPATH", raising=False)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.launch_torchrun(["models"], 1) == 0
    assert not marker.exists()
    assert "PYTHONSAFEPATH" not in os.environ  # only the workers got it
