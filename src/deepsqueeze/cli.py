"""The ``deepsqueeze`` command line: a thin layer over the Python API.

One error path (:func:`main`): a bad input, a bad option, a usage mistake or an OS error on a
user's path ends with one line on stderr, ``error: <what is wrong>``, and exit status 2; an
interrupt with ``error: interrupted`` and status 130. Anything else is a bug and keeps its
traceback. Output is plain text styled by us: nothing from a file, a path or an option is ever
parsed as rich markup or emoji codes (the consoles have markup, emoji and highlighting off).
"""

from __future__ import annotations

import errno
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from deepsqueeze.errors import DeepSqueezeError, OptionError, OutputPathError
from deepsqueeze.options import printable

try:  # recent typer vendors click
    from typer._click.exceptions import ClickException as _ClickException
    from typer._click.exceptions import UsageError as _ClickUsageError
except ImportError:  # pragma: no cover - older typer on click
    from click.exceptions import ClickException as _ClickException
    from click.exceptions import UsageError as _ClickUsageError

app = typer.Typer(
    name="deepsqueeze",
    help="Compress trained PyTorch networks into small files, run them, measure them honestly.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
class PlainConsole(Console):
    """A console for text that is not ours: markup, emoji codes and highlighting off, control
    characters escaped in every string it renders (messages, table titles and cells)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(markup=False, emoji=False, highlight=False, **kwargs)

    def render_str(self, text: str, **kwargs: Any) -> Text:
        return super().render_str(printable(text), **kwargs)


console = PlainConsole()
err_console = PlainConsole(stderr=True, soft_wrap=True)
EXIT_ERROR = 2  # a bad input, option or path; also click's usage errors
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
MAX_ERROR_CHARS = 4000

DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Dataset folder (searched first; then $DEEPSQUEEZE_DATA, "
                 "~/.cache/deepsqueeze, /usr/share/datasets, then download)."),
]
Progress = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]


def _check_outputs(json_out: Path | None, inputs: Iterable[Path | None],
                   out: Path | None = None) -> None:
    """Before any work: ``--json`` (and ``--out``) can be written and are none of the inputs."""
    if json_out is None:
        return
    from deepsqueeze.outputs import check_output_file, same_file

    if out is not None and same_file(json_out, out):
        raise OutputPathError(f"--json {json_out} and --out {out} are the same file")
    check_output_file(json_out, inputs=inputs, option="--json")


def _write_json(path: Path | None, data: dict[str, Any], announce: bool = False) -> None:
    """Write a command's numbers to ``path`` (atomically), when the user asked for it."""
    if path is None:
        return
    from deepsqueeze.io import atomic_write

    with atomic_write(path, "w") as handle:
        json.dump(data, handle, indent=2)
    if announce:
        console.print(f"numbers written to {path}")


def show(table: Table) -> None:
    """Print ``table`` with every character of its names: name columns fold at the terminal's
    width instead of being cut with an ellipsis, number columns stay whole, and output that is
    not a terminal (a file, a pipe) gets the table's full width."""
    for column in table.columns:
        if column.justify == "right":
            column.no_wrap = True
        else:
            column.overflow = "fold"
    if not console.is_terminal:
        wide = console.options.update_width(1 << 14)
        width = console.measure(table, options=wide).maximum
        if width > console.width:
            PlainConsole(file=console.file, width=width).print(table)
            return
    console.print(table)


def _labelled(label: str, style: str, message: str) -> Text:
    """``label message`` with only our label styled (``message`` shown as plain text)."""
    return Text.assemble((label, style), " ", printable(message))


@app.command()
def train(
    model: Annotated[str, typer.Option(help="Zoo model name (see `deepsqueeze models`).")
                     ] = "lenet5",
    dataset: Annotated[str, typer.Option(help="Dataset name.")] = "mnist",
    out: Annotated[Path | None, typer.Option(help="Run folder for checkpoints, log and model.")
                   ] = None,
    epochs: Annotated[float | None, typer.Option(help="Epochs (default: the model's recipe).")
                      ] = None,
    batch_size: Annotated[int | None, typer.Option(
        help="Batch size (the global batch when distributed).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    optimizer: Annotated[str | None, typer.Option(help="sgd | adam | adamw.")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="Weight decay.")] = None,
    lr_schedule: Annotated[str | None, typer.Option(help="cosine | step | constant.")] = None,
    precision: Annotated[str | None, typer.Option(help="fp32 | bf16 | fp16 (CUDA).")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed; same seed, same run.")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda.")] = None,
    subset: Annotated[int | None, typer.Option(help="Train on this many samples only.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out.")] = False,
    data_dir: DataDir = None,
    progress: Progress = True,
    nproc: Annotated[int | None, typer.Option(
        help="Train data-parallel in N local processes (runs torchrun for you; --batch-size "
             "stays the global batch). Multi-node: see docs/training.md.")] = None,
    dist_timeout: Annotated[float | None, typer.Option(
        help="Distributed only: seconds a collective may wait for a rank before the job "
             "fails (default 300; also $DEEPSQUEEZE_DIST_TIMEOUT).")] = None,
) -> None:
    """Train a zoo model; writes checkpoint.pt every epoch, metrics.jsonl and model.pt."""
    import os

    from deepsqueeze.training import distributed

    if dist_timeout is not None:
        from deepsqueeze.options import check_float

        check_float("--dist-timeout (seconds)", dist_timeout, 1e-3, 1e7)
        os.environ[distributed.ENV_TIMEOUT] = str(dist_timeout)
    if nproc is not None:
        argv = distributed.strip_option(sys.argv[1:], "--nproc")
        raise typer.Exit(distributed.launch_torchrun(argv, nproc))

    from deepsqueeze.training import train as run_train

    result = run_train(
        model, dataset, out=out, resume=resume, epochs=epochs, batch_size=batch_size, lr=lr,
        optimizer=optimizer, weight_decay=weight_decay, lr_schedule=lr_schedule,
        precision=precision, seed=seed, device=device, data_dir=data_dir, subset=subset,
        progress=progress,
    )
    distributed.shutdown_distributed()
    if not distributed.is_main_process():
        return  # under torchrun only rank 0 reports
    fit = result.fit
    acc = f"{fit.test_accuracy:.2%}" if fit.test_accuracy is not None else "n/a"
    console.print(f"trained {result.model_name} on {result.dataset}: test accuracy {acc} in "
                  f"{fit.train_time_s:.1f} s")
    if result.model_path is not None:
        console.print(f"model written to {result.model_path}")


@app.command()
def evaluate(
    model_file: Annotated[Path, typer.Argument(help="A model.pt (from `train`) or a .dsq file.")],
    dataset: Annotated[str, typer.Option(help="Dataset name.")] = "mnist",
    split: Annotated[str, typer.Option(help="train | test.")] = "test",
    subset: Annotated[int | None, typer.Option(help="Evaluate on this many samples only.")] = None,
    runs: Annotated[int, typer.Option(help="Timed runs for the batch-1 latency median.")] = 50,
    throughput_batch: Annotated[int, typer.Option(help="Batch size for throughput.")] = 256,
    speed: Annotated[bool, typer.Option("--speed/--no-speed", help="Measure speed.")] = True,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the numbers to this JSON file.")
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Accuracy, loss, parameters, bytes, MACs, latency and throughput of a saved model."""
    from deepsqueeze.evaluation import evaluate as run_evaluate

    _check_outputs(json_out, [model_file])
    report = run_evaluate(
        model_file, dataset, split=split, data_dir=data_dir, subset=subset,
        measure_speed=speed, latency_runs=runs, throughput_batch=throughput_batch,
    )
    show(report.table())
    _write_json(json_out, report.to_dict(), announce=True)


@app.command()
def compress(
    model_file: Annotated[Path, typer.Argument(help="A trained model.pt (from `train`).")],
    recipe: Annotated[Path, typer.Option(help="Recipe YAML (see recipes/).")],
    out: Annotated[Path, typer.Option(help="The .dsq file to write.")],
    dataset: Annotated[
        str | None, typer.Option(help="Fine-tuning dataset (default: the recipe's).")
    ] = None,
    subset: Annotated[int | None, typer.Option(help="Fine-tune on this many samples only.")] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write stages and sizes to this JSON file.")
    ] = None,
    data_dir: DataDir = None,
    progress: Progress = True,
) -> None:
    """Run a recipe (prune → fine-tune → share → fine-tune → encode) and write a .dsq file."""
    from deepsqueeze.pipeline import compress as run_compress

    _check_outputs(json_out, [model_file, recipe], out=out)
    result = run_compress(model_file, recipe, dataset=dataset, out=out, data_dir=data_dir,
                          subset=subset, progress=progress)
    stages = Table(title=f"recipe {result.recipe.name}")
    for col in ("stage", "layers", "fine-tune epochs", "test accuracy", "seconds"):
        stages.add_column(col)
    stages.add_row("(baseline)", "", "", f"{result.baseline_accuracy:.2%}", "")
    for st in result.stages:
        stages.add_row(st.stage, ", ".join(st.layers) if len(st.layers) <= 4 else
                       f"{len(st.layers)} layers", f"{st.finetune_epochs:g}",
                       f"{st.test_accuracy:.2%}", f"{st.seconds:.1f}")
    show(stages)
    show(result.file_report.table())
    console.print(
        f"{out}: {result.file_report.file_bytes:,} bytes, "
        f"{result.file_report.compression:.1f}x smaller than dense fp32; accuracy of the file "
        f"{result.file_accuracy:.2%} (baseline {result.baseline_accuracy:.2%})"
    )
    _write_json(json_out, result.to_dict())


@app.command()
def inspect(
    dsq_file: Annotated[Path, typer.Argument(help="A .dsq file.")],
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the table to this JSON file.")
    ] = None,
) -> None:
    """Per-layer table of a .dsq file: weights, % kept, bits per weight and index, bytes, ratio."""
    from deepsqueeze.dsq import inspect as run_inspect

    _check_outputs(json_out, [dsq_file])
    report = run_inspect(dsq_file)
    show(report.table())
    _write_json(json_out, report.to_dict())


@app.command()
def bench(
    dsq_file: Annotated[Path, typer.Argument(help="A .dsq file.")],
    batch: Annotated[str, typer.Option(help="Batch sizes, comma separated.")] = "1,32,256",
    runs: Annotated[int, typer.Option(help="Timed calls per backend and batch size.")] = 50,
    threads: Annotated[int | None, typer.Option(help="Torch and onnxruntime threads.")] = None,
    autotune: Annotated[bool, typer.Option("--autotune/--no-autotune",
                                           help="Time the runtime's executors per layer.")] = True,
    memory: Annotated[bool, typer.Option("--memory/--no-memory",
                                         help="Measure peak RSS (a fresh process each).")] = True,
    onnx: Annotated[bool, typer.Option("--onnx/--no-onnx", help="Include onnxruntime.")] = True,
    memory_budget: Annotated[float, typer.Option(
        help="Runtime weights may hold this many times the file's bytes (0: no limit).")] = 2.0,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the numbers to this JSON file.")
    ] = None,
) -> None:
    """Latency (median, p95), throughput and memory: dense PyTorch vs our runtime vs onnxruntime."""
    from deepsqueeze.options import short_repr
    from deepsqueeze.runtime.bench import BACKENDS
    from deepsqueeze.runtime.bench import bench as run_bench

    try:
        batches = [int(b) for b in batch.split(",") if b.strip()]
    except ValueError as exc:
        raise OptionError(
            f"--batch must be comma-separated integers, got {short_repr(batch)}"
        ) from exc
    _check_outputs(json_out, [dsq_file])
    report = run_bench(
        dsq_file, batches, runs=runs, threads=threads, memory=memory,
        backends=[b for b in BACKENDS if onnx or b != "onnxruntime"],
        autotune=autotune, memory_budget=memory_budget or None,
        progress=lambda msg: err_console.print(Text(printable(msg), style="dim")),
    )
    show(report.speed_table())
    show(report.memory_table())
    for info in report.runtime_infos.values():
        show(info.table())
    for note in report.notes:
        console.print(_labelled("note:", "yellow", note))
    _write_json(json_out, report.to_dict(), announce=True)


@app.command()
def export(
    model_file: Annotated[Path, typer.Argument(help="A .dsq file (or a model.pt).")],
    out: Annotated[Path, typer.Option(help="The .onnx file to write.")],
) -> None:
    """Export a model to ONNX (opset 17, dynamic batch), its weights decoded to dense fp32."""
    from deepsqueeze.runtime.onnx_export import export_onnx

    data = export_onnx(model_file, out)
    console.print(f"{out}: {len(data):,} bytes (ONNX opset 17, input 'input', output 'logits')")


@app.command("models")
def list_models() -> None:
    """List the model zoo and the models installed packages register (``deepsqueeze.models``)."""
    from deepsqueeze import models
    from deepsqueeze.usercode import ENTRY_POINT_GROUP, registered_models

    table = Table(title="deepsqueeze model zoo")
    for col in ("name", "input (C,H,W)", "description"):
        table.add_column(col)
    for name in models.list_models():
        info = models.model_info(name)
        table.add_row(name, str(tuple(info.input_shape)), info.description)
    show(table)
    registered = registered_models()
    if registered:
        extra = Table(title=f"registered by installed packages ({ENTRY_POINT_GROUP}); "
                            "use with --model-code NAME")
        for col in ("name", "object", "package"):
            extra.add_column(col)
        for entry in registered.values():
            extra.add_row(entry.name, entry.value, entry.package)
        show(extra)


@app.command("datasets")
def list_datasets(data_dir: DataDir = None) -> None:
    """List the supported datasets and where each is found."""
    from deepsqueeze.data import DATASETS, find_dataset_dir

    table = Table(title="datasets")
    for col in ("name", "classes", "image (C,H,W)", "found at"):
        table.add_column(col)
    for name, info in DATASETS.items():
        try:
            where = str(find_dataset_dir(name, data_dir))
        except DeepSqueezeError:
            where = "not found (downloaded on first use when online)"
        table.add_row(name, str(info.num_classes), str(tuple(info.image_shape)), where)
    show(table)


def one_line(message: str) -> str:
    """``message`` as one printable line: lines joined, control characters escaped (a path or
    a field from a file can hold any character), cut at ``MAX_ERROR_CHARS``."""
    text = printable(" ".join(part.strip() for part in message.splitlines() if part.strip()))
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def _fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """Print ``error: message`` as one line on stderr and exit with ``code``."""
    err_console.print(_labelled("error:", "bold red", one_line(message) or "failed"))
    sys.exit(code)


def _os_error_message(exc: OSError) -> str:
    """``path: reason`` for an OS error on a user's path (permission denied, disk full, ...)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {reason}" if paths else reason


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point (``deepsqueeze``, ``python -m deepsqueeze``): run the command in ``argv``
    (default ``sys.argv[1:]``) and exit.

    Exit status 0 on success; 2 with one ``error: ...`` line on stderr for a deepsqueeze
    error (bad file, option, path), a usage error (unknown option, missing argument) or an
    OS error (permission denied, no space left, a folder where a file was expected); 130 with
    ``error: interrupted`` on Ctrl-C. Any other exception is a bug: it keeps its traceback.
    """
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="deepsqueeze", standalone_mode=False)
    except DeepSqueezeError as exc:
        _fail(str(exc))
    except _ClickUsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `deepsqueeze`: the help
            typer.echo(exc.ctx.get_help() if exc.ctx is not None else exc.format_message())
            sys.exit(EXIT_ERROR)
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        _fail(exc.format_message() + hint, exc.exit_code)
    except _ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        _fail("interrupted", EXIT_INTERRUPTED)
    except OSError as exc:
        if exc.errno == errno.EPIPE:  # the reader went away (`deepsqueeze models | head`)
            sys.exit(1)
        _fail(_os_error_message(exc))
    except Exception as exc:
        exc.add_note("deepsqueeze: this is a bug, not a problem with your input; please report "
                     "it with the traceback above")
        raise
    if code == EXIT_INTERRUPTED:  # typer turns Ctrl-C into Exit(130)
        _fail("interrupted", EXIT_INTERRUPTED)
    sys.exit(code if isinstance(code, int) else 0)
