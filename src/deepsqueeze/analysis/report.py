"""``report``: a run folder (``plan --out``, the folder ``compress`` wrote its file, numbers and
recipe into, or any folder holding a .dsq file) as report.md
and a self-contained report.html (images inlined as base64, no external resource).

Measured from the file itself: top-1 on the test split (and the validation split when the
folder records a plan), file bytes and ratio, parameters, nonzeros, MACs, runtime latency p50 /
p95 at batch 1 and throughput (:func:`deepsqueeze.runtime.bench.bench`, dense PyTorch against
the runtime that runs from the compressed form), peak memory (RSS of a fresh process), and an
energy estimate per inference (:mod:`.energy`, figures cited). Per-layer tables from
:func:`deepsqueeze.dsq.inspect`; plots: per-layer kept weights and bits, and the folder's
sensitivity and Pareto plots when present.
"""

from __future__ import annotations

import base64
import html
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepsqueeze.analysis.energy import SOURCE, estimate
from deepsqueeze.errors import DeepSqueezeError, OptionError

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
LAYERS_PNG = "layers.png"
MAX_JSON_BYTES = 64 << 20


@dataclass
class Section:
    """A titled block: paragraphs, tables (header + rows) and images (file names)."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[tuple[list[str], list[list[str]]]] = field(default_factory=list)
    images: list[tuple[str, str]] = field(default_factory=list)  # (file name, caption)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_JSON_BYTES:
        raise DeepSqueezeError(f"{path} is larger than {MAX_JSON_BYTES:,} bytes")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DeepSqueezeError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise DeepSqueezeError(f"{path}: expected a JSON object")
    return data


def find_model(folder: Path) -> Path:
    """The folder's ``model.dsq``, else its only .dsq file."""
    if not folder.is_dir():
        raise OptionError(f"{folder} is not a folder; give the run folder (e.g. runs/plan)")
    if (folder / "model.dsq").is_file():
        return folder / "model.dsq"
    found = sorted(folder.glob("*.dsq"))
    if len(found) != 1:
        what = "no .dsq file" if not found else f"{len(found)} .dsq files"
        raise OptionError(f"{folder} holds {what}; a run folder holds model.dsq (from `plan`) "
                          "or a single .dsq file")
    return found[0]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _as_list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def _pct(v: Any) -> str:
    """A fraction as a percentage; anything but a number (plan.json is read from the folder,
    not trusted) is shown as n/a."""
    return f"{100 * v:.2f}%" if _is_number(v) else "n/a"


def _num(v: Any, fmt: str = ",") -> str:
    return format(v, fmt) if _is_number(v) else "n/a"


def layers_plot(rows: list[Any], path: Path, title: str) -> Path:
    """Per-layer kept weights (%) and bits per kept weight (incl. index bits), bars (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.layer != "(buffers)" and r.weights]
    names = [r.layer for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    axes[0].bar(names, [100 * r.kept_fraction for r in rows], color="tab:blue")
    axes[0].set_ylabel("weights kept (%)")
    axes[1].bar(names, [8 * r.bytes / max(r.kept, 1) for r in rows], color="tab:orange")
    axes[1].set_ylabel("file bits per kept weight\n(values + index + codebook)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=45)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_report(
    folder: str | Path,
    *,
    dataset: str | None = None,
    runs: int = 50,
    memory: bool = True,
    extra_images: Sequence[str | Path] = (),
    progress: Callable[[str], None] | None = None,
) -> tuple[Path, Path]:
    """Measure the run folder's model and write ``report.md`` and ``report.html`` into it;
    returns their paths. ``extra_images``: more PNG files to include (copied into the folder's
    report as they are, e.g. a Pareto plot made elsewhere)."""
    from deepsqueeze.dsq import inspect, load
    from deepsqueeze.evaluation import evaluate, resolve_dataset
    from deepsqueeze.metrics.size import parameter_count
    from deepsqueeze.runtime.bench import bench

    say = progress or (lambda _m: None)
    folder = Path(folder)
    path = find_model(folder)
    extra = [Path(p) for p in extra_images]
    for img in extra:
        if not img.is_file() or img.suffix.lower() != ".png":
            raise OptionError(f"--image {img}: not a PNG file")
    t0 = time.perf_counter()
    plan = _read_json(folder / "plan.json")
    run = _read_json(path.with_suffix(".json")) if plan is None else None
    name = resolve_dataset(path, dataset)
    info = inspect(path)
    say("evaluating the file on the test split")
    ev = evaluate(path, name, measure_speed=False)
    model = load(path)
    from deepsqueeze.data import load_dataset

    example = load_dataset(name, "test").subset(1).normalized()
    energy = estimate(model, example, info.file_bytes)
    from deepsqueeze import models

    dense = models.create(info.model) if info.kind == "zoo" and info.model in \
        models.list_models() else None
    say("timing dense PyTorch and the runtime (batch 1 and 256)")
    bench_report = bench(path, [1, 256], runs=runs, backends=("dense", "runtime"),
                         memory=memory)
    sections: list[Section] = []

    summary = Section("Summary")
    rows = [
        ["file", path.name],
        ["model", info.model],
        ["top-1, test split", _pct(ev.top1_accuracy) + f" ({ev.samples:,} samples of {name})"],
        ["file bytes", f"{info.file_bytes:,}"],
        ["compression (dense fp32 / file)", f"{info.compression:.1f}x"],
        ["parameters", f"{ev.parameters:,}"],
        ["nonzero parameters", f"{ev.nonzero_parameters:,}"],
        ["MACs per sample (dense count)", f"{ev.macs_per_sample:,}"],
        ["MACs per sample with nonzero weights", f"{energy.effective_macs:,}"],
    ]
    if dense is not None:
        rows.insert(5, ["parameters before compression", f"{parameter_count(dense):,}"])
    for backend in ("dense", "runtime"):
        t1 = bench_report.timing(backend, 1)
        t256 = bench_report.timing(backend, 256)
        if t1 is not None:
            rows.append([f"latency batch 1, {backend} (p50 / p95)",
                         f"{t1.median_ms:.3f} ms / {t1.p95_ms:.3f} ms ({t1.runs} runs)"])
        if t256 is not None:
            rows.append([f"throughput batch 256, {backend}", f"{t256.throughput:,.0f} samples/s"])
    for mem in bench_report.memory:
        rows.append([f"peak RSS, {mem['backend']} batch {mem['batch']}",
                     f"{mem['peak_kib'] / 1024:.1f} MiB (model and run: "
                     f"{mem['delta_kib'] / 1024:.1f} MiB above the interpreter)"])
    rows += [
        ["energy per inference, weights in SRAM", f"{energy.total_sram_pj / 1e6:.3f} µJ"],
        ["energy per inference, weights in DRAM", f"{energy.total_dram_pj / 1e6:.3f} µJ"],
        ["torch threads", str(bench_report.threads)],
        ["CPU", bench_report.cpu],
    ]
    summary.tables.append((["metric", "value"], rows))
    summary.paragraphs.append(
        "Latency and throughput: dense PyTorch (the file decoded to fp32) and the deepsqueeze "
        "runtime (running from the compressed form), timed interleaved in one run, median of "
        f"the runs; {len(bench_report.notes)} note(s): " + "; ".join(bench_report.notes)
        if bench_report.notes else
        "Latency and throughput: dense PyTorch (the file decoded to fp32) and the deepsqueeze "
        "runtime (running from the compressed form), timed interleaved in one run.")
    sections.append(summary)

    if plan is not None:
        sections.append(_plan_section(plan))
    elif run is not None and isinstance(run.get("stages"), list):
        sections.append(_run_section(run, path.with_name(path.stem + ".recipe.yaml")))

    energy_sec = Section("Energy estimate per inference")
    energy_sec.tables.append((["part", "count", "energy"], [
        ["multiply-accumulates with nonzero weights (fp32 mult 3.7 pJ + add 0.9 pJ)",
         f"{energy.effective_macs:,}", f"{energy.compute_pj / 1e6:.3f} µJ"],
        ["weight words read from SRAM (5 pJ / 32 bit)", f"{-(-energy.weight_bytes // 4):,}",
         f"{energy.weights_sram_pj / 1e6:.3f} µJ"],
        ["weight words read from DRAM (640 pJ / 32 bit)", f"{-(-energy.weight_bytes // 4):,}",
         f"{energy.weights_dram_pj / 1e6:.3f} µJ"],
    ]))
    energy_sec.paragraphs.append(
        f"Figures: {SOURCE}. Counts one fp32 multiply and add per MAC with a nonzero weight and "
        "one read of the file's weight bytes per inference; activations and decoding are not "
        "counted (an order-of-magnitude estimate).")
    sections.append(energy_sec)

    layer_sec = Section("Per-layer table (from the file)")
    layer_sec.tables.append((
        ["layer", "weights", "kept", "encoding", "bits/weight", "bits/index", "bytes",
         "compression"],
        [[r.layer, f"{r.weights:,}", f"{100 * r.kept_fraction:.1f}%", r.encoding or "-",
          "-" if r.bits_per_weight is None else f"{r.bits_per_weight:.2f}",
          "-" if r.bits_per_index is None else f"{r.bits_per_index:.2f}",
          f"{r.bytes:,}", f"{r.compression:.1f}x"] for r in info.layers]
        + [["(header + manifest)", "", "", "", "", "", f"{info.header_bytes:,}", ""],
           ["total", "", "", "", "", "", f"{info.file_bytes:,}", f"{info.compression:.1f}x"]],
    ))
    layers_plot(info.layers, folder / LAYERS_PNG, f"{info.model}: per layer")
    layer_sec.images.append((LAYERS_PNG, "Per-layer kept weights and file bits per kept weight"))
    sections.append(layer_sec)

    plots = Section("Plots")
    for fname, caption in (("sensitivity.png", "Sensitivity of each layer alone "
                            "(validation split, no fine-tuning)"),
                           ("pareto.png", "Pareto grid: accuracy against file bytes and "
                            "latency")):
        if (folder / fname).is_file():
            plots.images.append((fname, caption))
    for img in extra:
        plots.images.append((str(img.resolve()), img.stem))
    if plots.images:
        sections.append(plots)

    title = f"deepsqueeze report: {info.model}, {path.name}"
    say(f"measured in {time.perf_counter() - t0:.0f} s")
    md_path, html_path = folder / REPORT_MD, folder / REPORT_HTML
    _write_text(md_path, render_markdown(title, sections))
    _write_text(html_path, render_html(title, sections, folder))
    data = {
        "file": path.name, "model": info.model, "dataset": name,
        "test_top1": ev.top1_accuracy, "file_bytes": info.file_bytes,
        "compression": info.compression, "parameters": ev.parameters,
        "nonzero_parameters": ev.nonzero_parameters, "macs_per_sample": ev.macs_per_sample,
        "energy": energy.to_dict(),
        "bench": {**bench_report.to_dict(), "path": path.name},  # no machine paths
        "layers": info.to_dict()["layers"],
    }
    _write_text(folder / "report.json", json.dumps(data, indent=2, default=str))
    return md_path, html_path


def _plan_section(plan: dict[str, Any]) -> Section:
    sec = Section("Plan")
    best = None
    rounds = [r for r in _as_list(plan.get("rounds")) if isinstance(r, dict)]
    if isinstance(plan.get("best"), int) and 0 <= plan["best"] < len(rounds):
        best = rounds[plan["best"]]
    sec.paragraphs.append(str(plan.get("message", ""))[:2000])
    sec.tables.append((["", "value"], [
        ["target", f"{_num(plan.get('target_bytes'))} bytes "
                   f"({_num(plan.get('target_ratio'), '.1f')}x), at most "
                   f"{_num(plan.get('max_drop_points'), 'g')} points of validation drop"],
        ["baseline top-1 (validation / test)", f"{_pct(plan.get('baseline_val_accuracy'))} / "
                                               f"{_pct(plan.get('baseline_test_accuracy'))}"],
        ["validation split", f"{_num(plan.get('val_samples'))} samples carved from the "
                             f"training split; fine-tuning on {_num(plan.get('fit_samples'))}"],
        ["methods swept", ", ".join(map(str, _as_list(plan.get("methods"))))[:500]],
        ["seconds (sensitivity / all)", f"{_num(plan.get('sensitivity_seconds'), '.0f')} / "
                                        f"{_num(plan.get('seconds'), '.0f')}"],
    ]))
    sec.tables.append((
        ["round", "budget bytes", "one-shot file bytes", "fine-tune epochs", "file bytes",
         "ratio", "val top-1", "val drop", "test top-1", "test drop", "met"],
        [[str(r.get("round")), _num(r.get("budget_bytes")), _num(r.get("oneshot_file_bytes")),
          _num(r.get("finetune_epochs"), "g"), _num(r.get("file_bytes")),
          _num(r.get("compression"), ".1f"), _pct(r.get("val_accuracy")),
          _num(r.get("val_drop_points"), "+.2f"), _pct(r.get("test_accuracy")),
          _num(r.get("test_drop_points"), "+.2f"), "yes" if r.get("met") else "no"]
         for r in rounds],
    ))
    if best is not None:
        sec.tables.append((["layer", "option", "one-shot drop (points)", "layer bytes"],
                           [[str(c.get("layer")), str(c.get("label")),
                             _num(c.get("drop_points"), "+.2f"), _num(c.get("bytes"))]
                            for c in _as_list(best.get("choices")) if isinstance(c, dict)]))
    return sec


def _run_section(run: dict[str, Any], recipe: Path) -> Section:
    """The ``compress`` run written beside the file: baseline and every stage's accuracy."""
    sec = Section("Compression run")
    name = run.get("recipe", {}).get("name") if isinstance(run.get("recipe"), dict) else None
    sec.paragraphs.append(
        f"Recipe {str(name)[:200]!s}" + (f" ({recipe.name} beside the file)" if recipe.is_file()
                                         else "") + "; accuracy on the evaluation data after "
        "each stage, as `compress` measured it, then the file itself loaded back.")
    rows = [["(baseline)", "", "", _pct(run.get("baseline_accuracy")), ""]]
    for st in _as_list(run.get("stages")):
        if not isinstance(st, dict):
            continue
        layers = [str(v) for v in _as_list(st.get("layers"))]
        rows.append([str(st.get("stage"))[:200],
                     ", ".join(layers) if len(layers) <= 4 else f"{len(layers)} layers",
                     _num(st.get("finetune_epochs"), "g"), _pct(st.get("test_accuracy")),
                     _num(st.get("seconds"), ".1f")])
    rows.append(["(the .dsq file)", "", "", _pct(run.get("file_accuracy")), ""])
    sec.tables.append((["stage", "layers", "fine-tune epochs", "top-1", "seconds"], rows))
    return sec


def _write_text(path: Path, text: str) -> None:
    from deepsqueeze.io import atomic_write

    with atomic_write(path, "w") as handle:
        handle.write(text)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, sections: list[Section]) -> str:
    lines = [f"# {title}", ""]
    for sec in sections:
        lines += [f"## {sec.title}", ""]
        for p in sec.paragraphs:
            lines += [p, ""]
        for header, rows in sec.tables:
            lines.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            lines.append("")
        for img, caption in sec.images:
            lines += [f"![{caption}]({img})", ""]
    return "\n".join(lines)


_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
        "padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
        "img{max-width:100%;border:1px solid #eee}figcaption{font-size:90%;color:#555}")


def render_html(title: str, sections: list[Section], folder: Path) -> str:
    """One HTML file: tables as <table>, images as data: URIs (nothing fetched)."""
    esc = html.escape
    out = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
           f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
           f"<h1>{esc(title)}</h1>"]
    for sec in sections:
        out.append(f"<h2>{esc(sec.title)}</h2>")
        out += [f"<p>{esc(p)}</p>" for p in sec.paragraphs]
        for header, rows in sec.tables:
            out.append("<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header)
                       + "</tr></thead><tbody>")
            out += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
                    for row in rows]
            out.append("</tbody></table>")
        for img, caption in sec.images:
            src = Path(img) if Path(img).is_absolute() else folder / img
            data = base64.b64encode(src.read_bytes()).decode("ascii")
            alt = re.sub(r"[^\w .,:()-]", "", caption)
            out.append(f"<figure><img alt=\"{esc(alt)}\" src=\"data:image/png;base64,{data}\">"
                       f"<figcaption>{esc(caption)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out)
