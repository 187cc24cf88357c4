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
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
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
ModelCode = Annotated[str | None, typer.Option(
    "--model-code", help="Your own model: FILE.py:Class (or a function returning a module), "
    "module.path:Class, or a name registered by a package (`deepsqueeze models`). Runs that "
    "code; see docs/own-models.md.")]
ModelArgs = Annotated[str | None, typer.Option(
    "--model-args", help='Keyword arguments for --model-code as JSON, e.g. \'{"width": 32}\'.')]
UserDataOpt = Annotated[Path | None, typer.Option(
    "--data", help="Your own data instead of --dataset: an .npz (x, y; or x_train, y_train, "
    "x_test, y_test; inputs x0, x1, ... for several) or a folder with one sub-folder of images "
    "per class (or train/ and test/ folders of those).")]
ImageSize = Annotated[str | None, typer.Option(
    "--image-size", help="Resize the images of a --data folder to HxW (e.g. 28 or 32x48).")]


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def _note(message: str) -> None:
    """One ``note: ...`` line on stderr (our label styled, the message plain text)."""
    err_console.print(_labelled("note:", "yellow", message))


def _user_model(code: str | None, args: str | None) -> Any:
    """The model built from ``--model-code``/``--model-args`` (None without them); says on
    stderr that it runs the user's code."""
    if code is None:
        if args is not None:
            raise OptionError("--model-args needs --model-code (the class or function to call)")
        return None
    from deepsqueeze.usercode import build_model, parse_model_args

    kwargs = parse_model_args(args)  # checked before any code runs
    _note(f"running your model code {code}")
    return build_model(code, kwargs)


@contextmanager
def _code_hint(code: str | None) -> Iterator[None]:
    """A file of the user's own model stored without a graph needs the class: the API's
    message says ``load(path, model=...)``; on the command line that is ``--model-code``."""
    from deepsqueeze.errors import ModelError

    try:
        yield
    except ModelError as exc:
        if code is not None or "without a graph" not in str(exc):
            raise
        raise ModelError(f"{exc}; on the command line: --model-code FILE.py:ClassName (the file "
                         "that defines it)") from exc


def _user_data(path: Path | None, image_size: str | None, dataset: str | None,
               seed: int = 0) -> Any:
    """The user's ``--data`` (None without it); ``--data`` and ``--dataset`` are exclusive.
    Every command carves the validation split with seed 0, so train, compress and evaluate
    hold out the same samples."""
    if path is None:
        if image_size is not None:
            raise OptionError("--image-size applies to a --data folder of images")
        return None
    if dataset is not None:
        raise OptionError(f"--data and --dataset both given ({path}, {dataset}); pass one: "
                          "--data for your own files, --dataset for a built-in dataset")
    from deepsqueeze.data.user import load_user_data, parse_image_size

    size = parse_image_size(image_size) if image_size is not None else None
    data = load_user_data(path, image_size=size, seed=seed)
    if data.test_is_validation:
        _note(f"{path} has no test split: scoring on a {len(data.test)}-sample validation split "
              f"carved from it (seed {seed}, class-stratified)")
    return data


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
    model: Annotated[str | None, typer.Option(
        help="Zoo model name (see `deepsqueeze models`; default lenet5).")] = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset name (default mnist).")] = None,
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
    model_code: ModelCode = None,
    model_args: ModelArgs = None,
    data: UserDataOpt = None,
    image_size: ImageSize = None,
) -> None:
    """Train a zoo model or your own (--model-code); writes checkpoint.pt every epoch,
    metrics.jsonl and model.pt."""
    import os

    from deepsqueeze.training import distributed

    if dist_timeout is not None:
        from deepsqueeze.options import check_float

        check_float("--dist-timeout (seconds)", dist_timeout, 1e-3, 1e7)
        os.environ[distributed.ENV_TIMEOUT] = str(dist_timeout)
    if nproc is not None:
        argv = distributed.strip_option(sys.argv[1:], "--nproc")
        raise typer.Exit(distributed.launch_torchrun(argv, nproc))

    if model_code is not None:
        if model is not None:
            raise OptionError("--model and --model-code both given; pass one: --model for a zoo "
                              "model, --model-code for your own")
        options = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "optimizer": optimizer,
                   "weight_decay": weight_decay, "lr_schedule": lr_schedule,
                   "precision": precision, "seed": seed, "device": device}
        _train_user(model_code, model_args, data, image_size, dataset, out, resume, options,
                    data_dir, subset, progress)
        return
    if model_args is not None:
        raise OptionError("--model-args needs --model-code (zoo models take their options "
                          "from the dataset)")
    if data is not None:
        raise OptionError("train --data needs --model-code: zoo models are built for a "
                          "built-in --dataset; bring your model for your data")
    from deepsqueeze.training import train as run_train

    result = run_train(
        model or "lenet5", dataset or "mnist", out=out, resume=resume, epochs=epochs,
        batch_size=batch_size, lr=lr, optimizer=optimizer, weight_decay=weight_decay,
        lr_schedule=lr_schedule,
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


def _train_user(code: str, args: str | None, data_path: Path | None, image_size: str | None,
                dataset: str | None, out: Path | None, resume: bool, options: dict[str, Any],
                data_dir: Path | None, subset: int | None, progress: bool) -> None:
    """``train --model-code``: the user's model on the user's data (or a built-in dataset)
    through the one training loop; ``model.pt`` records the model's description and data."""
    import random

    import numpy as np
    import torch

    from deepsqueeze.data import load_dataset
    from deepsqueeze.data.loaders import first_inputs
    from deepsqueeze.errors import DeepSqueezeError
    from deepsqueeze.io import save_model
    from deepsqueeze.options import check_int
    from deepsqueeze.outputs import check_output_dir
    from deepsqueeze.training.loop import CHECKPOINT_NAME, TrainConfig, fit
    from deepsqueeze.training.run import MODEL_NAME, check_forward

    if out is not None:
        check_output_dir(out)
        if not resume and (out / CHECKPOINT_NAME).exists():
            raise DeepSqueezeError(f"{out} already holds a run; pass --resume to continue it or "
                                   "choose another --out")
    if resume and out is None:
        raise OptionError("--resume needs --out, the run folder to continue")
    cfg = TrainConfig(**{k: v for k, v in options.items() if v is not None})
    if resume and data_path is not None:
        raise OptionError("--resume continues runs on built-in datasets (their epoch order is "
                          "replayed); with --data, train again")
    if subset is not None:
        check_int("subset (--subset)", subset, 1, 1 << 31)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)  # the model's initial weights too
    user = _user_data(data_path, image_size, dataset)  # seed 0: the split compress sees
    if user is not None:
        train_set, test_set, label = user.train, user.test, user.source
        record = {"data": user.source}
    else:
        label = dataset or "mnist"
        train_set = load_dataset(label, "train", data_dir=data_dir)
        test_set = load_dataset(label, "test", data_dir=data_dir)
        record = {"dataset": label}
    if subset is not None:
        train_set = train_set.subset(min(subset, len(train_set)), seed=cfg.seed)
    net = _user_model(code, args)
    example = first_inputs(train_set)
    check_forward(net, example, f"{label} (its first sample)")
    name = type(net).__name__
    run_dir = out if user is None else None  # epoch checkpoints: built-in datasets only
    result = fit(net, train_set, cfg, test_set=test_set, out_dir=run_dir, resume=resume,
                 progress=progress, description=f"{name}/{label}")
    acc = f"{result.test_accuracy:.2%}" if result.test_accuracy is not None else "n/a"
    where = user.test_label if user is not None else f"{label} test split"
    console.print(f"trained {name} on {label}: accuracy {acc} on the {where} in "
                  f"{result.train_time_s:.1f} s")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        path = save_model(
            net.cpu(), out / MODEL_NAME, example_inputs=example, **record,
            metrics=json.dumps({"test_accuracy": result.test_accuracy,
                                "test_loss": result.test_loss,
                                "epochs": result.epochs_completed}),
        )
        console.print(f"model written to {path}")


@app.command()
def evaluate(
    model_file: Annotated[Path, typer.Argument(help="A model.pt (from `train`) or a .dsq file.")],
    dataset: Annotated[str | None, typer.Option(
        help="Dataset name (default: the one the file records, else mnist).")] = None,
    split: Annotated[str, typer.Option(help="train | test.")] = "test",
    subset: Annotated[int | None, typer.Option(help="Evaluate on this many samples only.")] = None,
    runs: Annotated[int, typer.Option(help="Timed runs for the batch-1 latency median.")] = 50,
    throughput_batch: Annotated[int, typer.Option(help="Batch size for throughput.")] = 256,
    speed: Annotated[bool, typer.Option("--speed/--no-speed", help="Measure speed.")] = True,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the numbers to this JSON file.")
    ] = None,
    data_dir: DataDir = None,
    model_code: ModelCode = None,
    model_args: ModelArgs = None,
    data: UserDataOpt = None,
    image_size: ImageSize = None,
) -> None:
    """Accuracy, loss, parameters, bytes, MACs, latency and throughput of a saved model.

    Without --dataset or --data, a file is evaluated on the dataset it records."""
    import warnings

    from deepsqueeze.evaluation import DatasetMismatchWarning, recorded_data
    from deepsqueeze.evaluation import evaluate as run_evaluate

    _check_outputs(json_out, [model_file])
    user = _user_data(data, image_size, dataset)
    if user is not None:
        if subset is not None:
            raise OptionError("--subset applies to built-in datasets; pass a smaller --data")
        if split not in ("train", "test"):
            raise OptionError(f"--split must be train or test, got {split!r:.40}")
        eval_data = user.train if split == "train" else user.test
    else:
        eval_data = None
        recorded = recorded_data(model_file) if dataset is None else {}
        if "dataset" in recorded:
            _note(f"evaluating on {recorded['dataset']}, the dataset {model_file} records")
    skeleton = _user_model(model_code, model_args)
    with warnings.catch_warnings(record=True) as caught, _code_hint(model_code):
        warnings.simplefilter("always", DatasetMismatchWarning)
        report = run_evaluate(
            model_file, dataset, data=eval_data, skeleton=skeleton, split=split,
            data_dir=data_dir, subset=subset, measure_speed=speed, latency_runs=runs,
            throughput_batch=throughput_batch,
        )
    for warning in caught:
        if issubclass(warning.category, DatasetMismatchWarning):
            err_console.print(_labelled("warning:", "yellow", str(warning.message)))
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename,
                                 warning.lineno)
    if user is not None:
        report.dataset, report.split = (user.test_label if split == "test" else
                                        f"training split of {user.source}"), split
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
    model_code: ModelCode = None,
    model_args: ModelArgs = None,
    data: UserDataOpt = None,
    image_size: ImageSize = None,
    teacher: Annotated[
        Path | None, typer.Option(help="Distillation teacher for stages with finetune.distill: "
                                       "a zoo model.pt or a .dsq giving the same outputs "
                                       "(default: the recipe's teacher, else the model before "
                                       "compression).")
    ] = None,
) -> None:
    """Run a recipe (prune → fine-tune → share → fine-tune → encode) and write a .dsq file,
    with its numbers and recipe beside it (<stem>.json, <stem>.recipe.yaml) for `report`.

    Your own model: --model-code builds its skeleton, which model.pt's weights fill; your own
    data: --data (fine-tuning on its training split, scores on its test or validation split)."""
    from deepsqueeze.outputs import check_output_file
    from deepsqueeze.pipeline import compress as run_compress
    from deepsqueeze.pipeline.runner import run_record_paths

    _check_outputs(json_out, [model_file, recipe, teacher], out=out)
    check_output_file(out, inputs=[model_file, recipe, data, teacher])  # before any work
    user = _user_data(data, image_size, dataset)
    from deepsqueeze.io import load_model

    skeleton = _user_model(model_code, model_args)
    with _code_hint(model_code):
        source = load_model(model_file, model=skeleton)
    own: dict[str, Any] = {}
    if user is not None:
        train_set = user.train
        if subset is not None:
            train_set = train_set.subset(min(subset, len(train_set)), seed=0)
        own = {"train_data": train_set, "eval_data": user.test,
               "extra_meta": {"data": user.source}}
    result = run_compress(source, recipe, dataset=dataset, out=out, data_dir=data_dir,
                          subset=subset if user is None else None, progress=progress,
                          teacher=teacher, **own)
    scored_on = f" on the {user.test_label}" if user is not None else ""
    stages = Table(title=f"recipe {result.recipe.name}")
    for col in ("stage", "layers", "fine-tune epochs", f"accuracy{scored_on}", "seconds"):
        stages.add_column(col)
    stages.add_row("(baseline)", "", "", _pct(result.baseline_accuracy), "")
    for st in result.stages:
        stages.add_row(st.stage, ", ".join(st.layers) if len(st.layers) <= 4 else
                       f"{len(st.layers)} layers", f"{st.finetune_epochs:g}",
                       _pct(st.test_accuracy), f"{st.seconds:.1f}")
    show(stages)
    show(result.file_report.table())
    console.print(
        f"{out}: {result.file_report.file_bytes:,} bytes, "
        f"{result.file_report.compression:.1f}x smaller than dense fp32; accuracy of the file "
        f"{_pct(result.file_accuracy)} (baseline {_pct(result.baseline_accuracy)}){scored_on}"
    )
    numbers, recipe_copy = run_record_paths(out)
    beside = f"{numbers.name}" + (f", {recipe_copy.name}" if recipe_copy.is_file() else "")
    console.print(f"numbers and recipe beside it: {beside} (`deepsqueeze report "
                  f"{out.parent}` turns the folder into a report)")
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
    model_code: ModelCode = None,
    model_args: ModelArgs = None,
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
    skeleton = _user_model(model_code, model_args)
    with _code_hint(model_code):
        report = run_bench(
            dsq_file, batches, runs=runs, threads=threads, memory=memory,
            backends=[b for b in BACKENDS if onnx or b != "onnxruntime"],
            autotune=autotune, memory_budget=memory_budget or None,
            progress=lambda msg: err_console.print(Text(printable(msg), style="dim")),
            model=skeleton,
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
    out: Annotated[Path | None, typer.Option(
        help="The .onnx file to write (default: the model file's name with .onnx, "
             "-int8.onnx with --int8).")] = None,
    format: Annotated[str, typer.Option(
        "--format", help="Output format: onnx.")] = "onnx",
    int8: Annotated[bool, typer.Option(
        "--int8", help="Write the quantized layers as int8 QDQ (int8 weights + per-channel "
                       "scales, uint8 inputs) that onnxruntime runs in integers.")] = False,
    model_code: ModelCode = None,
    model_args: ModelArgs = None,
) -> None:
    """Export a model to ONNX (opset 17, dynamic batch): weights decoded to dense fp32, or with
    --int8 the quantized layers as int8 QDQ."""
    from deepsqueeze.outputs import check_output_file
    from deepsqueeze.runtime.onnx_export import export_onnx

    if format.lower() != "onnx":
        raise OptionError(f"--format {format!r} is not supported; the only format is onnx")
    if out is None:
        out = model_file.with_name(model_file.stem + ("-int8.onnx" if int8 else ".onnx"))
    check_output_file(out, inputs=[model_file])  # before the user's code runs
    skeleton = _user_model(model_code, model_args)
    with _code_hint(model_code):
        data = export_onnx(model_file, out, model=skeleton, int8=int8)
    import onnx

    graph = onnx.load_from_string(data).graph
    inputs = ", ".join(f"'{i.name}'" for i in graph.input if i.name.startswith("input"))
    kind = ", int8 QDQ" if int8 else ""
    console.print(f"{out}: {len(data):,} bytes (ONNX opset 17{kind}, input {inputs}, "
                  "output 'logits')")


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


def _split_list(value: str | None) -> list[str] | None:
    """``"prune,share"`` -> ``["prune", "share"]``; None stays None."""
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise OptionError(f"expected a comma-separated list, got {value!r:.80}")
    return items


def _analysis_inputs(model_file: Path, dataset: str | None, val_size: int,
                     data_dir: Path | None) -> tuple[Any, str, Any, Any, Any]:
    """The model, its dataset's name and its (fit, validation, test) splits."""
    from deepsqueeze.analysis.split import load_splits
    from deepsqueeze.evaluation import resolve_dataset
    from deepsqueeze.io import load_model

    name = resolve_dataset(model_file, dataset)
    model = load_model(model_file)
    fit_set, val_set, test_set = load_splits(name, val_size,
                                             data_dir=str(data_dir) if data_dir else None)
    from deepsqueeze.training.run import check_fits

    check_fits(model, val_set)
    return model, name, fit_set, val_set, test_set


def _model_label(model: Any, model_file: Path) -> str:
    from deepsqueeze.pipeline.session import spec_or_none

    spec = spec_or_none(model)
    return spec.name if spec is not None else model_file.stem


def _progress_printer(enabled: bool) -> Any:
    if not enabled:
        return None
    return lambda msg: err_console.print(Text(printable(msg), style="dim"))


ValSize = Annotated[int, typer.Option(
    help="Training samples held out as the validation split every selection scores on (the "
         "rest is what `train --subset N` trains on and fine-tuning uses; the test split only "
         "reports).")]


@app.command()
def sensitivity(
    model_file: Annotated[Path, typer.Argument(help="A trained model.pt (from `train`).")],
    dataset: Annotated[str | None, typer.Option(
        help="Dataset (default: the one the file records, else mnist).")] = None,
    method: Annotated[str | None, typer.Option(
        help="Methods to sweep, comma separated (default: every installed one; see "
             "docs/analysis.md).")] = None,
    layers: Annotated[str | None, typer.Option(
        help="Layers to sweep, comma separated (default: every Linear/Conv2d).")] = None,
    chains: Annotated[bool, typer.Option(
        "--chains/--no-chains", help="Also sweep prune+share and prune+quantize.")] = False,
    val_size: ValSize = 5000,
    samples: Annotated[int | None, typer.Option(
        help="Score on this many validation samples only (stratified).")] = None,
    out: Annotated[Path | None, typer.Option(
        help="Folder for sensitivity.json and sensitivity.png.")] = None,
    data_dir: DataDir = None,
    progress: Progress = True,
) -> None:
    """Each layer alone at each setting of each method: validation accuracy and real bytes."""
    from deepsqueeze.analysis.sensitivity import sensitivity as run_sensitivity
    from deepsqueeze.options import check_int
    from deepsqueeze.outputs import check_output_dir

    if out is not None:
        check_output_dir(out)
    methods = _split_list(method)
    model, _name, _, val_set, _ = _analysis_inputs(model_file, dataset, val_size, data_dir)
    if samples is not None:
        check_int("--samples", samples, 1, 1 << 31)
        if samples < len(val_set):
            val_set = val_set.subset(samples, seed=0)
    result = run_sensitivity(model, val_set, methods, layers=_split_list(layers), chains=chains,
                             model_name=_model_label(model, model_file),
                             progress=_progress_printer(progress))
    show(result.table())
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "sensitivity.json", result.to_dict())
        result.plot(out / "sensitivity.png")
        console.print(f"written to {out}/sensitivity.json and {out}/sensitivity.png")


@app.command()
def plan(
    model_file: Annotated[Path, typer.Argument(help="A trained model.pt (from `train`).")],
    out: Annotated[Path, typer.Option(
        help="Folder for recipe.yaml, model.dsq, plan.json and the sensitivity files.")],
    target_ratio: Annotated[float | None, typer.Option(
        help="Target: the file this many times smaller than the dense fp32 parameters.")
    ] = None,
    target_bytes: Annotated[int | None, typer.Option(help="Target: file bytes at most.")
                            ] = None,
    target_latency: Annotated[float | None, typer.Option(
        help="Target: milliseconds per call in the deepsqueeze runtime at --latency-batch "
             "(alone or with a byte target).")] = None,
    latency_batch: Annotated[int, typer.Option(
        help="Batch size --target-latency is measured at.")] = 1,
    max_drop: Annotated[float, typer.Option(
        help="Most validation top-1 lost, in points.")] = 0.3,
    dataset: Annotated[str | None, typer.Option(
        help="Dataset (default: the one the file records, else mnist).")] = None,
    method: Annotated[str | None, typer.Option(
        help="Methods the plan may use, comma separated (default: every installed one).")
    ] = None,
    epochs: Annotated[float, typer.Option(
        help="Fine-tuning epochs of each pruning / module-replacing stage (half for "
             "codebook stages); doubled on a round that misses the accuracy.")] = 3.0,
    rounds: Annotated[int, typer.Option(help="Most plan -> fine-tune -> check rounds.")] = 3,
    val_size: ValSize = 5000,
    sensitivity_samples: Annotated[int | None, typer.Option(
        help="Score the sensitivity sweep on this many validation samples.")] = None,
    finetune_samples: Annotated[int | None, typer.Option(
        help="Fine-tune on this many training samples (shorter epochs).")] = None,
    reuse_sensitivity: Annotated[Path | None, typer.Option(
        help="sensitivity.json of an earlier plan of the same model and split (skips the "
             "sweep; checked to match).")] = None,
    data_dir: DataDir = None,
    progress: Progress = True,
) -> None:
    """Pick per-layer methods and settings for a byte and/or latency target, fine-tune, check,
    iterate."""
    from deepsqueeze.analysis.planner import Finetune, TargetUnreachable
    from deepsqueeze.analysis.planner import plan as run_plan
    from deepsqueeze.outputs import check_output_dir

    check_output_dir(out)
    methods = _split_list(method)
    reused = None
    if reuse_sensitivity is not None:
        from deepsqueeze.analysis.report import _read_json
        from deepsqueeze.analysis.sensitivity import SensitivityResult

        raw = _read_json(reuse_sensitivity)
        if raw is None:
            raise OptionError(f"--reuse-sensitivity {reuse_sensitivity}: no such file")
        try:
            reused = SensitivityResult.from_dict(raw)
        except (TypeError, ValueError) as exc:
            raise OptionError(f"--reuse-sensitivity {reuse_sensitivity}: not a sensitivity.json "
                              f"({exc})") from exc
    model, name, fit_set, val_set, test_set = _analysis_inputs(model_file, dataset, val_size,
                                                               data_dir)
    try:
        result = run_plan(
            model, fit_set, val_set, out, target_ratio=target_ratio, target_bytes=target_bytes,
            target_latency_ms=target_latency, latency_batch=latency_batch,
            max_drop=max_drop, test_data=test_set, methods=methods,
            finetune=Finetune(epochs=epochs), rounds=rounds,
            model_name=_model_label(model, model_file), dataset=name,
            sensitivity_samples=sensitivity_samples, finetune_samples=finetune_samples,
            progress=_progress_printer(progress), sensitivity=reused,
        )
    except TargetUnreachable as exc:
        err_console.print(_labelled("out of reach:", "bold red", str(exc)))
        console.print(f"numbers written to {out / 'plan.json'}")
        raise typer.Exit(1) from exc
    timed = result.target_latency_ms is not None
    table = Table(title=f"plan for {result.model}: target {result.target_bytes:,} bytes "
                        f"({result.target_ratio:.1f}x)"
                        + (f", {result.target_latency_ms:g} ms at batch {result.latency_batch}"
                           if timed else "")
                        + f", at most {result.max_drop_points:g} points")
    cols = ["round", "file bytes", "ratio", "val drop", "test drop", "met"]
    if timed:
        cols.insert(3, "runtime ms")
    for col in cols:
        table.add_column(col, justify="right")
    for r in result.rounds:
        row = [str(r.round), f"{r.file_bytes:,}", f"{r.compression:.1f}x",
               f"{r.val_drop_points:+.2f}",
               "n/a" if r.test_drop_points is None else f"{r.test_drop_points:+.2f}",
               "yes" if r.met else "no"]
        if timed:
            row.insert(3, "n/a" if r.latency_ms is None else f"{r.latency_ms:.4g}")
        table.add_row(*row)
    show(table)
    best = result.best_round
    if best is not None:
        layers_table = Table(title=f"round {best.round}: per-layer choices")
        for col in ("layer", "option", "one-shot drop", "layer bytes"):
            layers_table.add_column(col, justify="left" if col in ("layer", "option")
                                    else "right")
        for c in best.choices:
            layers_table.add_row(c.layer, c.label, f"{c.drop_points:+.2f}", f"{c.bytes:,}")
        show(layers_table)
    label = "reached:" if result.reached else "out of reach:"
    (console if result.reached else err_console).print(
        _labelled(label, "bold green" if result.reached else "bold red", result.message))
    console.print(f"written to {out}: recipe.yaml, model.dsq, plan.json, sensitivity.json/png")
    if not result.reached:
        raise typer.Exit(1)


@app.command()
def pareto(
    model_file: Annotated[Path, typer.Argument(help="A trained model.pt (from `train`).")],
    out: Annotated[Path, typer.Option(help="Folder for pareto.json and pareto.png.")],
    dataset: Annotated[str | None, typer.Option(
        help="Dataset (default: the one the file records, else mnist).")] = None,
    method: Annotated[str | None, typer.Option(
        help="Methods of the grid, comma separated (default: every installed one).")] = None,
    epochs: Annotated[float, typer.Option(
        help="Fine-tuning epochs per grid point (0: one-shot).")] = 0.0,
    val_size: ValSize = 5000,
    finetune_samples: Annotated[int | None, typer.Option(
        help="Fine-tune on this many training samples.")] = None,
    data_dir: DataDir = None,
    progress: Progress = True,
) -> None:
    """A grid across methods: validation accuracy against file bytes and runtime latency."""
    from deepsqueeze.analysis.pareto import pareto as run_pareto
    from deepsqueeze.options import check_float, check_int
    from deepsqueeze.outputs import check_output_dir

    check_output_dir(out)
    check_float("--epochs", epochs, 0.0, 1000.0)
    methods = _split_list(method)
    model, name, fit_set, val_set, _ = _analysis_inputs(model_file, dataset, val_size, data_dir)
    if finetune_samples is not None:
        check_int("--finetune-samples", finetune_samples, 1, 1 << 31)
        if finetune_samples < len(fit_set):
            fit_set = fit_set.subset(finetune_samples, seed=0)
    result = run_pareto(model, val_set, fit_data=fit_set if epochs > 0 else None,
                        methods=methods, finetune_epochs=epochs,
                        model_name=_model_label(model, model_file), dataset=name,
                        progress=_progress_printer(progress))
    table = Table(title=f"Pareto grid of {result.model} (validation split, "
                        f"dense {result.dense_val_accuracy:.2%}, {result.dense_file_bytes:,} B)")
    for col in ("option", "file bytes", "ratio", "val top-1", "latency p50 ms", "front"):
        table.add_column(col, justify="left" if col == "option" else "right")
    for p in result.points:
        if p.error is not None:
            table.add_row(p.label, "-", "-", "-", "-", f"skipped: {p.error}"[:60])
            continue
        front = ",".join(n for n, f in (("bytes", p.on_bytes_front),
                                        ("latency", p.on_latency_front)) if f)
        table.add_row(p.label, f"{p.file_bytes:,}", f"{p.compression:.1f}x",
                      f"{p.val_accuracy:.2%}", f"{p.latency_ms_p50:.3f}", front)
    show(table)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "pareto.json", result.to_dict())
    result.plot(out / "pareto.png")
    console.print(f"written to {out}/pareto.json and {out}/pareto.png")


@app.command()
def report(
    folder: Annotated[Path, typer.Argument(
        help="A run folder: `plan --out`, or any folder holding one .dsq file.")],
    dataset: Annotated[str | None, typer.Option(
        help="Dataset (default: the one the file records, else mnist).")] = None,
    runs: Annotated[int, typer.Option(help="Timed calls per backend and batch size.")] = 50,
    memory: Annotated[bool, typer.Option("--memory/--no-memory",
                                         help="Measure peak RSS (a fresh process each).")
                      ] = True,
    image: Annotated[list[Path] | None, typer.Option(
        help="More PNG plots to include (repeatable).")] = None,
    progress: Progress = True,
) -> None:
    """Write report.md and a self-contained report.html (metrics, per-layer tables, plots)."""
    from deepsqueeze.analysis.report import build_report

    md, page = build_report(folder, dataset=dataset, runs=runs, memory=memory,
                            extra_images=image or (), progress=_progress_printer(progress))
    console.print(f"written {md} and {page}")


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
