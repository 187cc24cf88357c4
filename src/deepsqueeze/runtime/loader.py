"""``load_runtime``: a .dsq file as an inference model that runs from the compressed form.

The model is built on the meta device by the file's public reader
(:func:`deepsqueeze.dsq.read_model_file`): a zoo model from its spec (resized when channels were
pruned), a user model from its graph or from the user's skeleton (``model=``, copied to meta),
so nothing dense is allocated. Each Linear / Conv2d whose weight the file stores
compressed (``sparse``, ``sparse-codebook``, ``codebook``) is decoded straight into its compact
runtime form (:mod:`deepsqueeze.runtime.forms`) and replaced by the executor the autotuner picks
(:mod:`deepsqueeze.runtime.autotune`); every other tensor (dense layers, biases, BatchNorm) is
decoded as usual. The decisions are kept on the model as ``model.deepsqueeze_runtime``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from torch import nn

from deepsqueeze.dsq import read_model_file
from deepsqueeze.errors import DeepSqueezeError, DsqFormatError
from deepsqueeze.metrics.size import FP32_BYTES
from deepsqueeze.models.graph import USER_ATTR
from deepsqueeze.models.registry import SPEC_ATTR
from deepsqueeze.runtime import autotune as at
from deepsqueeze.runtime import executors
from deepsqueeze.runtime.forms import LAYER_READERS, LayerForm
from deepsqueeze.runtime.kernel import get_kernel
from deepsqueeze.runtime.layers import IMPLS, KernelLinear, RuntimeLayer, candidates
from deepsqueeze.runtime.memory import held_bytes

INFO_ATTR = "deepsqueeze_runtime"
"""Attribute of a runtime model holding its :class:`RuntimeInfo`."""

Source = str | Path | bytes | bytearray | memoryview


@dataclass
class RuntimeInfo:
    """How a runtime model runs: per-layer executors, their timings and the bytes held."""

    source: str
    model: str
    batch_size: int
    autotuned: bool
    file_bytes: int
    dense_bytes: int
    held_bytes: int
    budget_bytes: int | None
    threads: int
    kernel: str | None
    layers: list[at.LayerChoice] = field(default_factory=list)
    fused: list[dict[str, Any]] = field(default_factory=list)

    @property
    def held_vs_file(self) -> float:
        return self.held_bytes / self.file_bytes

    def choices(self) -> dict[str, str]:
        """Layer name → chosen executor (``kernel`` for layers run inside a fused chain)."""
        return {c.layer: c.impl for c in self.layers}

    def to_dict(self) -> dict[str, Any]:
        """As JSON; ``source`` is the file's name only (records hold no machine paths)."""
        d = asdict(self)
        d["source"] = Path(self.source).name if self.source else self.source
        d["held_vs_file"] = self.held_vs_file
        return d

    def table(self) -> Table:
        names = sorted({n for c in self.layers for n in c.time_us})
        table = Table(title=f"runtime of {self.source} at batch {self.batch_size} "
                      f"({'timed' if self.autotuned else 'untimed'}, {self.threads} threads)")
        for col in ("layer", "form", "kept", *[f"{n} µs" for n in names], "chosen", "held B",
                    "file B"):
            table.add_column(col, justify="left" if col in ("layer", "form", "chosen")
                             else "right", style="bold" if col == "chosen" else None)
        for c in self.layers:
            times = [
                ("-" if n not in c.time_us else
                 f"{c.time_us[n]:.1f}" if c.source != "heuristic" else "n/t")
                for n in names
            ]
            chosen = c.impl + (f" in {c.fused_into}" if c.fused_into else "")
            table.add_row(c.layer, c.encoding, f"{c.density:.1%}", *times, chosen,
                          f"{c.held_bytes[c.impl]:,}", f"{c.file_bytes:,}")
        for f in self.fused:
            times = ", ".join(f"{k} {v:.1f} µs" for k, v in f["time_us"].items())
            what = (f"{len(f['layers'])} layers on {', '.join(f['impls'])}, whole model timed"
                    if "impls" in f else f"{' → '.join(f['layers'])} as one kernel call")
            table.caption = (table.caption or "") + (
                f"{f['name']}: {what} ({'kept' if f['kept'] else 'not kept'}; "
                f"{f.get('reason') or times or 'untimed'})\n"
            )
        return table


def _input_shapes(
    model: nn.Module,
    names: list[str],
    inputs: tuple[torch.Tensor, ...] | None,
    batch_size: int,
    *,
    trusted: bool = False,
) -> dict[str, list[int]]:
    """Input shape of each named layer at ``batch_size`` (a shape-only pass on meta of
    ``inputs``). Without inputs (a user model that records none), or when the user's own
    (``trusted``) skeleton cannot run on meta, only Linear layers (and layer kinds with
    ``in_features``) get one."""
    seen: dict[str, list[int]] = {}

    def record(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            seen.setdefault(name, list(args[0].shape))

        return hook

    if inputs is not None:
        hooks = [model.get_submodule(n).register_forward_pre_hook(record(n)) for n in names]
        try:
            with torch.no_grad():
                model.eval()(*inputs)  # a skeleton in train mode: BatchNorm refuses batch 1
        except Exception as exc:
            if not trusted:
                raise DsqFormatError(f"stored shapes do not form a working model: {exc}") from exc
            seen.clear()
            inputs = None
        finally:
            for h in hooks:
                h.remove()
    if inputs is None:  # a Linear, or a layer kind standing for one, takes [batch, in_features]
        for n in names:
            features = getattr(model.get_submodule(n), "in_features", None)
            if type(features) is int and features > 0:
                seen[n] = [batch_size, features]
    return seen


def _section_bytes(sections: dict[str, bytes], name: str) -> int:
    return sum(len(v) for k, v in sections.items() if k.startswith(f"{name}:"))


def load_runtime(
    source: Source,
    *,
    batch_size: int = 1,
    autotune: bool | None = None,
    memory_budget: float | None = 2.0,
    cache: bool = True,
    impls: dict[str, str] | None = None,
    fuse: bool = True,
    rounds: int = 15,
    model: nn.Module | None = None,
) -> nn.Module:
    """Load a .dsq file as an eval-mode inference model running from the compressed weights.

    ``batch_size`` is the batch the executors are tuned for (any batch runs). ``autotune``:
    time the executors (default: unless ``$DEEPSQUEEZE_AUTOTUNE=0``); ``cache``: reuse and store
    timings in the autotune cache. ``memory_budget``: the weights held may take at most this
    many times the file's bytes (None: no limit, fastest executors). ``impls`` forces the
    executor of named layers (``{"fc1": "kernel"}``). ``fuse``: run chains of kernel Linear
    layers as one call where that is faster (:mod:`deepsqueeze.runtime.fuse`). ``model``: an
    instance of the saved architecture (a user model stored without a graph needs it); it is
    copied to the meta device and not changed.
    """
    if batch_size < 1:
        raise DeepSqueezeError(f"batch_size must be positive, got {batch_size}")
    executors.load_all()
    stored = read_model_file(source)
    where, dsq, by_name = stored.source, stored.file, stored.entries
    skeleton = model
    model = stored.mark(stored.skeleton(skeleton))
    forms: dict[str, LayerForm] = {}
    for name, mod in model.named_modules():
        reader = LAYER_READERS.get(type(mod))
        if reader is None or type(mod) not in IMPLS or any(
                name.startswith(f"{t}.") for t in forms):
            continue
        layer_form = reader(name, mod, stored)
        if layer_form is not None:
            forms[name] = layer_form
    targets = list(forms)
    in_shapes = _input_shapes(model, targets, stored.meta_inputs(model, batch_size), batch_size,
                              trusted=skeleton is not None)
    tune = at.autotune_enabled() if autotune is None else autotune
    cached = at.load_cache() if tune and cache else {}
    updates: dict[str, Any] = {}
    forced = dict(impls or {})

    consumed = {t for f in forms.values() for t in f.tensors}
    state = {name: stored.decode(name) for name in by_name if name not in consumed}
    dense_bytes = stored.dense_parameters * FP32_BYTES

    layers: list[at.LayerChoice] = []
    built: dict[str, dict[str, RuntimeLayer]] = {}
    for name in targets:
        module = model.get_submodule(name)
        layer_form = forms[name]
        form, bias = layer_form.form, layer_form.bias
        impl_list = candidates(form, module)
        if name in forced:
            impl_list = [i for i in impl_list if i.name == forced[name]]
            if not impl_list:
                raise DeepSqueezeError(f"layer {name}: executor {forced[name]!r} not available")
        if not impl_list or name not in in_shapes:  # nothing can run it: plain dense module
            state.update({t: stored.decode(t) for t in layer_form.tensors})
            continue
        mods = {impl.name: impl.build(form, bias, module).eval() for impl in impl_list}
        for impl_name, mod in mods.items():
            mod.impl = impl_name  # the registry's name (one class may serve several)
            mod.layer = name  # named in its input errors
        choice = at.LayerChoice(
            layer=name,
            layer_type=type(module).__name__,
            weight_shape=layer_form.weight_shape,
            encoding=layer_form.encoding,
            kept=layer_form.kept,
            density=layer_form.density,
            input_shape=in_shapes[name],
            file_bytes=sum(_section_bytes(dsq.sections, t) for t in layer_form.tensors),
            held_bytes={n: m.held_bytes() for n, m in mods.items()},
        )
        geometry = getattr(next(iter(mods.values())), "geometry", None)
        if tune and len(mods) > 1:
            key = at.layer_key(choice, geometry, list(mods))
            choice.key = key
            hit = cached.get(key)
            if isinstance(hit, dict) and set(hit.get("time_us", {})) == set(mods):
                choice.time_us = {k: float(v) for k, v in hit["time_us"].items()}
                choice.source = "cache"
            else:
                x = torch.randn(*in_shapes[name], generator=torch.Generator().manual_seed(0))
                secs = at.time_modules(mods, x, rounds=rounds)
                choice.time_us = {k: v * 1e6 for k, v in secs.items()}
                choice.source = "timed"
                updates[key] = {"layer": f"{stored.name}.{name}", "batch": batch_size,
                                "time_us": choice.time_us}
        else:
            choice.time_us = at.heuristic_times(choice, batch_size)
        layers.append(choice)
        built[name] = mods

    fixed = sum(t.numel() * t.element_size() for t in state.values())
    budget = None if memory_budget is None else int(memory_budget * dsq.file_size)
    at.choose(layers, budget, fixed)
    if cache and updates:
        at.save_cache(updates)
    for choice in layers:
        model.set_submodule(choice.layer, built[choice.layer][choice.impl])

    expected = model.state_dict(keep_vars=True)
    try:
        for key, value in expected.items():
            state[key] = state[key].to(value.dtype)
        model.load_state_dict(state, strict=True, assign=True)
    except (KeyError, RuntimeError) as exc:
        raise DsqFormatError(
            f"{where}: stored tensors do not fit {stored.name}: {exc}") from exc
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise DsqFormatError(f"{where}: no stored value for {leftover[:5]}")
    model.eval().requires_grad_(False)
    chains: list[dict[str, Any]] = []
    if tune:
        chain = _chain_channels_last(model, layers, built, stored.meta_inputs(model, batch_size),
                                     cache=cache, cached=cached, budget=budget, rounds=rounds)
        if chain is not None:
            chains.append(chain)
    chosen = {c.layer: c.impl for c in layers}
    kernel_linear: dict[str, KernelLinear] = {}  # what a fused chain would run for each layer
    for name, mods in built.items():
        pick = chosen[name] if chosen[name].startswith("kernel") else "kernel"
        if isinstance(mods.get(pick), KernelLinear) and forced.get(name, pick) == pick:
            kernel_linear[name] = mods[pick]  # type: ignore[assignment]
    fused: list[dict[str, Any]] = []
    if fuse and get_kernel() is not None:
        model, fused = _fuse(model, kernel_linear, layers, tune=bool(tune), cache=cache,
                             cached=cached, batch_size=batch_size, budget=budget,
                             rounds=rounds)
    del built, kernel_linear

    kernel = get_kernel()
    info = RuntimeInfo(
        source=where,
        model=stored.name,
        batch_size=batch_size,
        autotuned=bool(tune),
        file_bytes=dsq.file_size,
        dense_bytes=dense_bytes,
        held_bytes=held_bytes(model),
        budget_bytes=budget,
        threads=torch.get_num_threads(),
        kernel=kernel.path.name if kernel is not None else None,  # no machine paths
        layers=layers,
        fused=fused + chains,
    )
    setattr(model, INFO_ATTR, info)
    model.register_forward_pre_hook(_floating_inputs_as_fp32)
    return model


def _floating_inputs_as_fp32(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The runtime computes in fp32: floating inputs of other dtypes are converted on entry, so
    layers before the first compressed one (a BatchNorm, say) do not run in bfloat16 while the
    rest runs in fp32 (the answer is the dense model's on ``x.float()``)."""
    return tuple(
        a.float() if isinstance(a, torch.Tensor) and a.is_floating_point()
        and a.dtype != torch.float32 else a
        for a in args
    )


def runtime_info(model: nn.Module) -> RuntimeInfo:
    """The :class:`RuntimeInfo` of a model from :func:`load_runtime`."""
    info = getattr(model, INFO_ATTR, None)
    if not isinstance(info, RuntimeInfo):
        raise DeepSqueezeError("not a runtime model (load it with load_runtime)")
    return info


CHANNELS_LAST_IMPLS = ("int8-onednn",)
"""Executors whose output is channels-last and which read channels-last input without a copy:
a chain of them saves layout copies that per-layer timing (contiguous inputs) cannot see."""


def _chain_channels_last(
    model: nn.Module,
    layers: list[at.LayerChoice],
    built: dict[str, dict[str, RuntimeLayer]],
    meta_inputs: tuple[torch.Tensor, ...] | None,
    *,
    cache: bool,
    cached: dict[str, Any],
    budget: int | None,
    rounds: int,
) -> dict[str, Any] | None:
    """Time the whole model with its per-layer choices against with every layer that has a
    channels-last executor on it; keep the faster (in place). Returns the record, or None when
    there is nothing to decide (fewer than two such layers, all already on it, no example
    input)."""
    able = [c for c in layers if any(i in built[c.layer] for i in CHANNELS_LAST_IMPLS)]
    if len(able) < 2 or meta_inputs is None or all(c.impl in CHANNELS_LAST_IMPLS for c in able):
        return None
    pick = {c.layer: next(i for i in CHANNELS_LAST_IMPLS if i in built[c.layer]) for c in able}
    before = {c.layer: c.impl for c in able}
    record: dict[str, Any] = {"name": "channels-last chain", "layers": list(pick),
                              "impls": sorted(set(pick.values())), "time_us": {},
                              "kept": False}
    extra = sum(built[n][i].held_bytes() - built[n][before[n]].held_bytes()
                for n, i in pick.items())
    if budget is not None and held_bytes(model) + extra > budget:
        record["reason"] = "over the memory budget"
        return record
    keys = [c.key for c in able]
    key = at.fused_key([*keys, "channels-last"], [], False) if all(keys) else None
    hit = cached.get(key) if key else None
    if isinstance(hit, dict) and set(hit.get("time_us", {})) == {"chain", "layers"}:
        record["time_us"] = {k: float(v) for k, v in hit["time_us"].items()}
    else:
        gen = torch.Generator().manual_seed(0)
        x = tuple(torch.randn(t.shape, generator=gen) if t.is_floating_point()
                  else torch.zeros(t.shape, dtype=t.dtype) for t in meta_inputs)

        def assign(impls: dict[str, str]) -> None:
            for name, impl in impls.items():
                model.set_submodule(name, built[name][impl])

        def run(_first: torch.Tensor) -> Any:
            return model(*x)

        try:
            layers_s = at.time_modules({"m": run}, x[0], rounds=rounds)["m"]
            assign(pick)
            chain_s = at.time_modules({"m": run}, x[0], rounds=rounds)["m"]
        except Exception as exc:  # a model that cannot run on random inputs: keep per layer
            record["reason"] = f"not timed: {type(exc).__name__}: {str(exc)[:200]}"
            return record
        finally:
            assign(before)
        record["time_us"] = {"chain": chain_s * 1e6, "layers": layers_s * 1e6}
        if key and cache:
            at.save_cache({key: {"layers": list(pick), "time_us": record["time_us"]}})
    record["kept"] = record["time_us"]["chain"] < record["time_us"]["layers"]
    if record["kept"]:
        for name, impl in pick.items():
            model.set_submodule(name, built[name][impl])
        for c in able:
            c.impl = pick[c.layer]
            c.source = "chain"
    return record


def _fuse(
    model: nn.Module,
    kernel_linear: dict[str, KernelLinear],
    layers: list[at.LayerChoice],
    *,
    tune: bool,
    cache: bool,
    cached: dict[str, Any],
    batch_size: int,
    budget: int | None,
    rounds: int,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Replace chains of compressed Linear layers by :class:`FusedChain` calls where faster."""
    from deepsqueeze.runtime.fuse import (
        FusedChain,
        find_segments,
        fuse_conv_relus,
        raise_plainly,
        replace_segment,
        segment_callable,
        trace,
    )

    gm = trace(model)
    if gm is None:
        return model, []
    by_layer = {c.layer: c for c in layers}
    total = held_bytes(model)
    records: list[dict[str, Any]] = []
    updates: dict[str, Any] = {}
    for i, seg in enumerate(find_segments(gm, lambda n: n in kernel_linear)):
        name = f"fused{i}"
        members = [kernel_linear[n] for n in seg.layers]
        chain = FusedChain(members, seg.relus, seg.flatten).eval()
        chain.layer = " → ".join(seg.layers)
        before = sum(gm.get_submodule(n).held_bytes() for n in seg.layers)
        extra = sum(m.held_bytes() for m in members) - before
        record: dict[str, Any] = {"name": name, "layers": seg.layers, "relus": seg.relus,
                                  "flatten": seg.flatten, "time_us": {}, "kept": False}
        keys = [by_layer[n].key for n in seg.layers]
        if budget is not None and total + extra > budget:
            record["reason"] = "over the memory budget"
        elif tune:
            key = at.fused_key(keys, seg.relus, seg.flatten) if all(keys) else None
            hit = cached.get(key) if key else None
            if isinstance(hit, dict) and set(hit.get("time_us", {})) == {"fused", "modules"}:
                record["time_us"] = {k: float(v) for k, v in hit["time_us"].items()}
            else:
                x = torch.randn(batch_size, members[0].cols,
                                generator=torch.Generator().manual_seed(0))
                secs = at.time_modules(
                    {"fused": chain, "modules": segment_callable(gm, seg)}, x, rounds=rounds)
                record["time_us"] = {k: v * 1e6 for k, v in secs.items()}
                if key:
                    updates[key] = {"batch": batch_size, "layers": seg.layers,
                                    "time_us": record["time_us"]}
            record["kept"] = record["time_us"]["fused"] < record["time_us"]["modules"]
        else:
            record["kept"] = True
        if record["kept"]:
            replace_segment(gm, seg, name, chain)
            total += extra
            for n, member in zip(seg.layers, members, strict=True):
                by_layer[n].impl, by_layer[n].fused_into = member.impl, name
        records.append(record)
    fuse_conv_relus(gm)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    raise_plainly(gm)
    if cache and updates:
        at.save_cache(updates)
    for attr in (SPEC_ATTR, USER_ATTR):  # the model's description, kept for what follows
        if hasattr(model, attr):
            setattr(gm, attr, getattr(model, attr))
    return gm.eval(), records
