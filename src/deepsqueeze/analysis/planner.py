"""``plan``: per-layer methods and settings for a byte target, run with fine-tuning, checked.

1. Sensitivity of every layer alone to every option (single methods and the prune → share /
   prune → quantize chains) on the validation split: accuracy drop and real encoded bytes.
2. A multiple-choice knapsack over the layers (exact, by merging Pareto fronts of
   ``(bytes, drop)``): the per-layer options of least summed drop whose bytes fit the budget,
   the budget being the target minus what the rest of the file costs (header, manifest, other
   tensors), measured by saving the one-shot plan for real and correcting the estimate.
3. The recipe (one stage per method, per-layer settings) runs through
   :func:`deepsqueeze.pipeline.compress` with fine-tuning on the training part only.
4. The file is checked: its bytes on disk, its accuracy on the validation split (and, to
   report only, on the test split). Too big: the budget shrinks by the excess and it runs
   again; too inaccurate: fine-tuning doubles. After ``rounds`` the best round is kept and a
   target not met is said plainly, with how close it came.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from deepsqueeze.analysis.sensitivity import Point, SensitivityResult, TensorBytes, measure
from deepsqueeze.analysis.sweeps import (
    SWEEPS,
    Option,
    apply_option,
    available_sweeps,
    layer_options,
    sweepable_layers,
)
from deepsqueeze.data import ImageDataset
from deepsqueeze.errors import DeepSqueezeError, OptionError
from deepsqueeze.metrics.accuracy import accuracy_and_loss
from deepsqueeze.metrics.size import FP32_BYTES, parameter_count
from deepsqueeze.options import check_float, check_int

MAX_FRONT = 4000
"""Most (bytes, drop) states the knapsack keeps per layer (the cheapest-drop per byte bucket)."""


class TargetUnreachable(DeepSqueezeError):
    """No choice of the swept options fits the byte target (raised before any fine-tuning)."""


@dataclass
class Choice:
    """The option a plan gives one layer, with its measured one-shot drop and bytes."""

    layer: str
    option: list[dict[str, Any]]
    label: str
    drop_points: float
    bytes: int
    latency_us: float | None = None


@dataclass
class Round:
    """One planned recipe, run and checked."""

    round: int
    budget_bytes: int
    predicted_bytes: int
    predicted_drop_points: float
    oneshot_file_bytes: int
    finetune_epochs: float
    choices: list[Choice]
    recipe: dict[str, Any]
    file_bytes: int | None = None
    compression: float | None = None
    val_accuracy: float | None = None
    val_drop_points: float | None = None
    test_accuracy: float | None = None
    test_drop_points: float | None = None
    seconds: float = 0.0
    bytes_ok: bool = False
    accuracy_ok: bool = False
    budget_latency_us: float | None = None
    predicted_latency_ms: float | None = None
    latency_ms: float | None = None
    latency_ok: bool = True

    @property
    def met(self) -> bool:
        return self.bytes_ok and self.accuracy_ok and self.latency_ok


@dataclass
class PlanResult:
    """Everything a plan measured; ``to_dict`` is what ``plan.json`` holds."""

    model: str
    dataset: str
    target_bytes: int
    target_ratio: float
    max_drop_points: float
    dense_bytes: int
    baseline_val_accuracy: float
    baseline_test_accuracy: float | None
    val_samples: int
    fit_samples: int
    rounds: list[Round] = field(default_factory=list)
    best: int | None = None
    reached: bool = False
    message: str = ""
    seconds: float = 0.0
    sensitivity_seconds: float = 0.0
    methods: list[str] = field(default_factory=list)
    target_latency_ms: float | None = None
    latency_batch: int | None = None
    dense_latency_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for r, obj in zip(d["rounds"], self.rounds, strict=True):
            r["met"] = obj.met
        return d

    @property
    def best_round(self) -> Round | None:
        return None if self.best is None else self.rounds[self.best]


# --------------------------------------------------------------------------------------------
# The knapsack
# --------------------------------------------------------------------------------------------


RECOVERED = 0.25
"""Share of a one-shot harm that remains after a stage's fine-tuning (module-replacing,
pruning and codebook stages fine-tune; post-training quantization does not, so its harm stays
whole). Without it the knapsack took a 2-bit post-training quantization of lenet5's conv2 (small
one-shot loss, never recovered) over pruning + sharing (larger one-shot loss, recovered by
fine-tuning) and the plan lost 0.9 points."""


def harm(p: Point) -> float:
    """What the knapsack minimizes for one point: its validation loss increase (nats) where
    measured, else its accuracy drop as a fraction; negative values (noise) count as zero;
    scaled by :data:`RECOVERED` when every method of the option fine-tunes in a plan.

    Summed across layers, the loss increase predicts the joint harm far better than the summed
    accuracy drop, which reads 0.0 for every option that changes fewer predictions than one
    sample's worth on the sensitivity split and so lets the cheapest option of every layer
    look free."""
    value = p.loss_increase if p.loss_increase is not None else (p.drop_points or 0.0) / 100
    tuned = bool(p.option) and all(SWEEPS[s["method"]].finetune for s in p.option
                                   if s.get("method") in SWEEPS)
    return max(value, 0.0) * (RECOVERED if tuned else 1.0)


def _bytes(p: Point) -> float:
    return float(p.bytes or 0)


def _latency(p: Point) -> float:
    if p.latency_us is None:
        raise OptionError(f"{p.layer} / {p.label}: no latency measured")
    return p.latency_us


def solve(
    candidates: dict[str, list[Point]], budget: float, *,
    cost: Callable[[Point], float] = _bytes,
    limit: tuple[Callable[[Point], float], float] | None = None,
) -> tuple[dict[str, Point], float, float] | None:
    """Per layer the point of least summed :func:`harm` whose summed ``cost`` (default: bytes)
    fits ``budget`` (and, with ``limit = (other_cost, other_budget)``, whose summed other cost
    fits too: a byte target and a latency target together); None when no choice fits. Returns
    ``(choice per layer, summed cost, summed accuracy drop in points)``.

    Exact for one resource (merged Pareto fronts of (cost, harm)); with a ``limit`` the fronts
    stay on (cost, harm) and states over the other budget are dropped, so it may miss a choice
    that trades cost for the other resource."""
    other, other_budget = limit if limit is not None else (None, math.inf)
    front: list[tuple[float, float, float, tuple[Point, ...]]] = [(0.0, 0.0, 0.0, ())]
    for layer, points in candidates.items():
        if not points:
            raise OptionError(f"layer {layer!r} has no measured option")
        merged = [(c + cost(p), h + harm(p), o + (other(p) if other else 0.0), (*chosen, p))
                  for c, h, o, chosen in front for p in points]
        merged = [m for m in merged if m[0] <= budget and m[2] <= other_budget]
        if not merged:
            return None
        merged.sort(key=lambda m: (m[0], m[1]))
        pareto: list[tuple[float, float, float, tuple[Point, ...]]] = []
        for m in merged:  # increasing cost: keep only strictly smaller harm
            if not pareto or m[1] < pareto[-1][1] - 1e-12:
                pareto.append(m)
        if len(pareto) > MAX_FRONT:  # keep an even spread over the cost range, ends included
            step = len(pareto) / MAX_FRONT
            pareto = [pareto[int(i * step)] for i in range(MAX_FRONT)] + [pareto[-1]]
        front = pareto
    best = min(front, key=lambda m: (m[1], m[0]))
    layers = list(candidates)
    drop = sum(max(p.drop_points or 0.0, 0.0) for p in best[3])
    return dict(zip(layers, best[3], strict=True)), best[0], drop


def smallest(candidates: dict[str, list[Point]]) -> int:
    """The least summed bytes any choice reaches."""
    return sum(min(p.bytes for p in pts if p.bytes is not None) for pts in candidates.values())


# --------------------------------------------------------------------------------------------
# Recipes from choices
# --------------------------------------------------------------------------------------------


@dataclass
class Finetune:
    """Fine-tuning of a plan's stages: ``epochs`` for module-replacing and pruning stages, half
    of it for value-sharing stages; the pruning schedule reaches its target at 60% of its
    stage."""

    epochs: float = 3.0
    lr: float = 0.01
    batch_size: int = 128
    share_lr: float = 0.001


def build_recipe(
    choices: dict[str, Option], *, model: str | None, dataset: str | None,
    finetune: Finetune, train_samples: int, seed: int = 0,
) -> dict[str, Any]:
    """A recipe (pipeline/recipe.py schema) with one stage per method, in the sweep table's
    order, each setting its layers."""
    per_method: dict[str, dict[str, Any]] = {}
    for layer, option in choices.items():
        for method, value in option.steps:
            per_method.setdefault(method, {})[layer] = value
    stages = []
    steps_per_epoch = max(1, math.ceil(train_samples / finetune.batch_size))
    for method in sorted(per_method, key=lambda m: SWEEPS[m].order):
        sweep = SWEEPS[method]
        values = per_method[method]
        params = sweep.params(values)
        stage: dict[str, Any] = {"name": method, "method": method, "params": params}
        epochs = finetune.epochs if method != "share" else finetune.epochs / 2
        if sweep.finetune and epochs > 0:
            share = method == "share"
            stage["finetune"] = {
                "epochs": epochs, "lr": finetune.share_lr if share else finetune.lr,
                "weight_decay": 0.0 if share else 1e-4, "batch_size": finetune.batch_size,
            }
            if method == "prune":
                end = max(2, int(0.6 * epochs * steps_per_epoch))
                params["schedule"] = {
                    "kind": "polynomial", "initial_sparsity": 0.5, "begin_step": 0,
                    "end_step": end, "frequency": max(1, min(100, end // 10)),
                }
        stages.append(stage)
    recipe: dict[str, Any] = {"name": "plan", "seed": seed, "stages": stages,
                              "encode": {"huffman": True, "index_bits": "auto"}}
    if model is not None:
        recipe["model"] = model
    if dataset is not None:
        recipe["dataset"] = dataset
    return recipe


def oneshot_bytes(model: nn.Module, choices: dict[str, Option], path: Path) -> int:
    """Real file bytes of the plan applied without fine-tuning (saved, then measured)."""
    from deepsqueeze.dsq import save
    from deepsqueeze.pipeline.session import bake

    work = copy.deepcopy(model)
    for layer, option in choices.items():
        apply_option(work, layer, option)
    bake(work)
    return save(work, path).file_bytes


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


def plan(
    model: nn.Module,
    fit_data: ImageDataset,
    val_data: ImageDataset,
    out: str | Path,
    *,
    target_ratio: float | None = None,
    target_bytes: int | None = None,
    max_drop: float = 0.3,
    test_data: ImageDataset | None = None,
    target_latency_ms: float | None = None,
    latency_batch: int = 1,
    sensitivity: SensitivityResult | None = None,
    methods: Sequence[str] | None = None,
    finetune: Finetune | None = None,
    rounds: int = 3,
    max_epochs: float = 16.0,
    model_name: str | None = None,
    dataset: str | None = None,
    sensitivity_samples: int | None = None,
    finetune_samples: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> PlanResult:
    """Plan, run and check a compression of ``model`` to ``target_bytes`` (or ``target_ratio``
    times smaller than its dense fp32 parameters; both: the smaller) losing at most
    ``max_drop`` points of validation accuracy. Writes ``recipe.yaml``, ``model.dsq``,
    ``plan.json``, ``sensitivity.json`` and ``sensitivity.png`` into ``out``.

    A target that no choice of options can fit raises :class:`TargetUnreachable` (before any
    fine-tuning; it says the smallest reachable size); a target reached in bytes but not in
    accuracy (or the reverse) after ``rounds`` is reported in the result's ``message``.
    ``sensitivity_samples``: score the sensitivity sweep on this many validation samples
    (stratified; the final check always uses the whole split); ``finetune_samples``: fine-tune
    on this many samples of the training part (shorter epochs on a slow machine).
    ``sensitivity``: reuse the sweep of an earlier plan of the same model on the same split
    (its ``sensitivity.json``, :meth:`SensitivityResult.from_dict`); it is checked to cover the
    same layers and sample count and to record the same baseline accuracy.
    """
    from deepsqueeze.outputs import check_output_dir
    from deepsqueeze.pipeline import compress

    t_start = time.perf_counter()
    say = progress or (lambda _m: None)
    finetune = finetune or Finetune()
    check_float("max drop (--max-drop, accuracy points)", max_drop, 0.0, 100.0)
    check_int("rounds (--rounds)", rounds, 1, 20)
    check_float("fine-tuning epochs (--epochs)", finetune.epochs, 0.0, 1000.0)
    dense_bytes = parameter_count(model) * FP32_BYTES
    if target_ratio is None and target_bytes is None and target_latency_ms is None:
        raise OptionError("give a target: --target-ratio (e.g. 50), --target-bytes or "
                          "--target-latency (milliseconds at --latency-batch)")
    if target_latency_ms is not None:
        check_float("target latency (--target-latency, milliseconds)", target_latency_ms,
                    1e-6, 1e9)
        check_int("latency batch (--latency-batch)", latency_batch, 1, 1 << 16)
    goal = math.inf
    if target_ratio is not None:
        check_float("target ratio (--target-ratio)", target_ratio, 1.0, 1e9)
        goal = dense_bytes / target_ratio
    if target_bytes is not None:
        check_int("target bytes (--target-bytes)", target_bytes, 1, 1 << 40)
        goal = min(goal, target_bytes)
    out = Path(out)
    check_output_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    name = model_name or type(model).__name__
    model = copy.deepcopy(model).cpu().eval()
    with tempfile.TemporaryDirectory(prefix="dsq-plan-") as tmp:
        from deepsqueeze.dsq import save

        dense_file = save(copy.deepcopy(model), Path(tmp) / "dense.dsq")
    # a latency target alone: any file no larger than the dense one will do
    target = math.floor(goal) if math.isfinite(goal) else dense_file.file_bytes
    if target < dense_file.header_bytes:  # before any sweep: not even the manifest fits
        result_msg = (
            f"target out of reach: {target:,} bytes ({dense_bytes / target:.1f}x) is less than "
            f"the header and manifest of {name}'s file alone ({dense_file.header_bytes:,} "
            "bytes), whatever the weights take; the smallest file is larger still"
        )
        _write_json(out / "plan.json", {"model": name, "target_bytes": target, "rounds": [],
                                        "reached": False, "message": result_msg})
        raise TargetUnreachable(result_msg)
    sens_val = val_data
    if sensitivity_samples is not None:
        check_int("sensitivity samples (--sensitivity-samples)", sensitivity_samples, 1,
                  1 << 31)
        if sensitivity_samples < len(val_data):
            sens_val = val_data.subset(sensitivity_samples, seed=0)
    if finetune_samples is not None:
        check_int("fine-tuning samples (--finetune-samples)", finetune_samples, 1, 1 << 31)
        if finetune_samples < len(fit_data):
            fit_data = fit_data.subset(finetune_samples, seed=0)
    sweeps = available_sweeps(methods)
    layers = sweepable_layers(model)
    options = layer_options(sweeps, chains=True)
    lat_x = None
    dense_lat: dict[str, float] = {}
    lat_overhead = lat_budget = 0.0
    whole_us = None
    if target_latency_ms is not None:
        from deepsqueeze.analysis.latency import example_batch, runtime_latency

        lat_x = example_batch(val_data, latency_batch)
        say(f"timing the dense model in the runtime at batch {latency_batch}")
        dense_lat, whole_us = runtime_latency(model, layers, lat_x)
        assert whole_us is not None
        # what the swept layers do not account for (activations, pooling, other modules)
        lat_overhead = max(whole_us - sum(dense_lat.values()), 0.0)
        lat_budget = 1000 * target_latency_ms - lat_overhead

    # 1. sensitivity of each layer alone (validation split, real bytes)
    t0 = time.perf_counter()
    ref = TensorBytes(model)
    if sensitivity is not None:
        sens = _reusable(sensitivity, model, sens_val, layers, lat_x is not None)
        say(f"sensitivity: reusing {len(sens.points)} measured points")
        sens_base, dense, points = sens.baseline_accuracy, sens.dense_layer_bytes, sens.points
    else:
        say(f"sensitivity: {len(layers)} layers x {len(options)} options")
        sens_base, dense, points = measure(model, sens_val, layers, options, progress=say,
                                           bytes_cache=ref, latency_input=lat_x)
        sens = SensitivityResult(
            model=name, dataset=val_data.name, val_samples=len(sens_val),
            baseline_accuracy=sens_base,
            layers=layers, dense_layer_bytes=dense, points=points,
            seconds=time.perf_counter() - t0,
            settings={n: {"knob": s.knob, "settings": list(s.settings), "label": s.label}
                      for n, s in sweeps.items()},
        )
    _write_json(out / "sensitivity.json", sens.to_dict())
    sens.plot(out / "sensitivity.png")
    base = accuracy_and_loss(model, val_data.normalized(), val_data.labels).accuracy
    base_test = None
    if test_data is not None:
        base_test = accuracy_and_loss(model, test_data.normalized(), test_data.labels).accuracy
    result = PlanResult(
        model=name, dataset=val_data.name, target_bytes=target,
        target_ratio=dense_bytes / target, max_drop_points=max_drop, dense_bytes=dense_bytes,
        baseline_val_accuracy=base, baseline_test_accuracy=base_test,
        val_samples=len(val_data), fit_samples=len(fit_data), sensitivity_seconds=sens.seconds,
        methods=list(sweeps), target_latency_ms=target_latency_ms,
        latency_batch=latency_batch if target_latency_ms is not None else None,
        dense_latency_ms=None if whole_us is None else whole_us / 1000,
    )

    # 2. candidates per layer: the dense layer itself and every measured option
    candidates: dict[str, list[Point]] = {}
    for layer in layers:
        keep = Point(layer, [], "dense", sens_base, 0.0, dense[layer], dense[layer], 0.0,
                     loss_increase=0.0, latency_us=dense_lat.get(layer))
        # a point that also changed other layers (channel pruning) is not additive: left out
        candidates[layer] = [keep] + [p for p in points if p.layer == layer and p.error is None
                                      and p.other_bytes == 0]
    rest = sum(ref.bytes.values()) - sum(dense.values())  # tensors outside the swept layers
    overhead = dense_file.file_bytes - sum(ref.bytes.values())
    budget = target - overhead - rest
    least = smallest(candidates) + overhead + rest
    if budget <= 0 or least > target:
        result.message = (
            f"target out of reach: {target:,} bytes ({dense_bytes / target:.1f}x) is below the "
            f"smallest file the swept options can make, about {least:,} bytes "
            f"({dense_bytes / least:.1f}x: every layer at its most compressing option, "
            f"{overhead + rest:,} bytes of header, manifest and unswept tensors); "
            f"methods swept: {', '.join(sweeps)}"
        )
        result.seconds = time.perf_counter() - t_start
        _write_json(out / "plan.json", result.to_dict())
        raise TargetUnreachable(result.message)

    if lat_x is not None:
        fastest = sum(min(_latency(p) for p in pts) for pts in candidates.values())
        if fastest + lat_overhead > 1000 * target_latency_ms:  # type: ignore[operator]
            result.message = (
                f"target out of reach: {target_latency_ms:g} ms at batch {latency_batch} is "
                f"below the fastest the swept options run in the runtime, about "
                f"{(fastest + lat_overhead) / 1000:.4g} ms (every layer on its fastest option, "
                f"{lat_overhead / 1000:.4g} ms outside the swept layers; dense "
                f"{(whole_us or 0) / 1000:.4g} ms); methods swept: {', '.join(sweeps)}"
            )
            result.seconds = time.perf_counter() - t_start
            _write_json(out / "plan.json", result.to_dict())
            raise TargetUnreachable(result.message)

    def pick(byte_budget: int) -> tuple[dict[str, Point], float, float] | None:
        if lat_x is None:
            return solve(candidates, byte_budget)
        if target_ratio is None and target_bytes is None:
            return solve(candidates, lat_budget, cost=_latency)
        return solve(candidates, byte_budget, limit=(_latency, lat_budget))

    epochs = finetune.epochs
    run_dir = out / "rounds"
    run_dir.mkdir(exist_ok=True)
    for index in range(rounds):
        solved = None
        while budget > 0:
            solved = pick(budget)
            if solved is None:
                break
            picks = {layer: _as_option(p) for layer, p in solved[0].items()}
            real = oneshot_bytes(model, {k: v for k, v in picks.items() if v.steps},
                                 run_dir / f"round-{index + 1}-oneshot.dsq")
            if real <= target:
                break
            budget -= real - target  # the estimate missed the real file: correct and retry
            say(f"one-shot file {real:,} bytes > target {target:,}: budget now {budget:,}")
            solved = None
        if solved is None:
            result.message = (
                f"target out of reach: no choice of options fits {target:,} bytes once the real "
                f"file's overhead is counted (smallest about {least:,} bytes, "
                f"{dense_bytes / least:.1f}x)"
            ) if lat_x is None else (
                f"target out of reach: no choice of options fits {target:,} bytes and "
                f"{target_latency_ms:g} ms at batch {latency_batch} once the real file's "
                f"bytes and latency are counted")
            break
        chosen, _, drop = solved
        predicted = sum(p.bytes or 0 for p in chosen.values())
        picks = {layer: _as_option(p) for layer, p in chosen.items() if p.option}
        if not picks:
            raise DeepSqueezeError("the plan compresses no layer: the target is already met "
                                   "by the dense model; nothing to do")
        recipe = build_recipe(picks, model=_zoo_name(model), dataset=dataset,
                              finetune=Finetune(epochs, finetune.lr, finetune.batch_size,
                                                finetune.share_lr),
                              train_samples=len(fit_data))
        rnd = Round(
            round=index + 1, budget_bytes=budget, predicted_bytes=predicted + overhead + rest,
            predicted_drop_points=drop, oneshot_file_bytes=real, finetune_epochs=epochs,
            choices=[Choice(layer, p.option, p.label, p.drop_points or 0.0, p.bytes or 0,
                            p.latency_us)
                     for layer, p in chosen.items()],
            recipe=recipe,
        )
        if lat_x is not None:
            rnd.budget_latency_us = lat_budget
            rnd.predicted_latency_ms = (sum(_latency(p) for p in chosen.values())
                                        + lat_overhead) / 1000
        say(f"round {index + 1}: " + "; ".join(f"{c.layer}: {c.label}" for c in rnd.choices))
        path = run_dir / f"round-{index + 1}.dsq"
        t0 = time.perf_counter()
        res = compress(copy.deepcopy(model), recipe, train_data=fit_data, eval_data=val_data,
                       out=path, progress=False,
                       extra_meta={"dataset": dataset} if dataset else None)
        rnd.seconds = time.perf_counter() - t0
        rnd.file_bytes = path.stat().st_size
        rnd.compression = dense_bytes / rnd.file_bytes
        rnd.val_accuracy = res.file_accuracy
        rnd.val_drop_points = 100 * (base - (res.file_accuracy or 0.0))
        if test_data is not None:
            from deepsqueeze.dsq import load

            rnd.test_accuracy = accuracy_and_loss(load(path), test_data.normalized(),
                                                  test_data.labels).accuracy
            if base_test is not None:
                rnd.test_drop_points = 100 * (base_test - rnd.test_accuracy)
        rnd.bytes_ok = rnd.file_bytes <= target
        rnd.accuracy_ok = rnd.val_drop_points <= max_drop + 1e-9
        if lat_x is not None:
            from deepsqueeze.analysis.latency import file_latency_us

            rnd.latency_ms = file_latency_us(path, lat_x) / 1000
            rnd.latency_ok = rnd.latency_ms <= target_latency_ms  # type: ignore[operator]
        result.rounds.append(rnd)
        _write_yaml(run_dir / f"round-{index + 1}.yaml", recipe)
        say(f"round {index + 1}: {rnd.file_bytes:,} bytes ({rnd.compression:.1f}x), validation "
            f"drop {rnd.val_drop_points:+.2f} points"
            + ("" if rnd.latency_ms is None else
               f", {rnd.latency_ms:.4g} ms at batch {latency_batch} in the runtime"))
        if rnd.met:
            break
        if not rnd.bytes_ok:
            budget -= rnd.file_bytes - target
        if not rnd.latency_ok:  # the file ran slower than planned: ask the next round for less
            lat_budget -= 1000 * rnd.latency_ms - 1000 * target_latency_ms  # type: ignore[operator]
        if not rnd.accuracy_ok:
            if epochs * 2 > max_epochs:
                break
            epochs = epochs * 2 if epochs > 0 else 1.0
    result.best = _best(result.rounds)
    best = result.best_round
    if best is not None:
        shutil.copyfile(run_dir / f"round-{best.round}.dsq", out / "model.dsq")
        _write_yaml(out / "recipe.yaml", best.recipe)
        result.reached = best.met
        result.message = _verdict(result, best) if not result.message or best.met else (
            result.message + "; " + _verdict(result, best))
    result.seconds = time.perf_counter() - t_start
    _write_json(out / "plan.json", result.to_dict())
    return result


def _reusable(sens: SensitivityResult, model: nn.Module, val: ImageDataset,
              layers: list[str], latency: bool) -> SensitivityResult:
    """``sens`` if it was measured on this model's layers and this split; OptionError saying
    what differs otherwise."""
    if list(sens.layers) != layers or sens.val_samples != len(val):
        raise OptionError(
            f"the reused sensitivity covers layers {sens.layers} on {sens.val_samples} samples; "
            f"this plan sweeps {layers} on {len(val)}: measure it again")
    base = accuracy_and_loss(model, val.normalized(), val.labels).accuracy
    if abs(base - sens.baseline_accuracy) > 1e-9:
        raise OptionError(
            f"the reused sensitivity was measured on a model scoring {sens.baseline_accuracy:.4%} "
            f"on the split, this one scores {base:.4%}: a different model or split")
    if latency and any(p.latency_us is None for p in sens.points if p.error is None):
        raise OptionError("the reused sensitivity holds no latencies; a latency target needs "
                          "them measured (run without reusing it)")
    return sens


def _as_option(p: Point) -> Option:
    return Option(tuple((s["method"], s["setting"]) for s in p.option))


def _zoo_name(model: nn.Module) -> str | None:
    from deepsqueeze.pipeline.session import spec_or_none

    spec = spec_or_none(model)
    return None if spec is None else spec.name


def _best(rounds: list[Round]) -> int | None:
    """The round to keep: a met one with the fewest bytes; else the smallest file within the
    accuracy limit; else the smallest accuracy drop."""
    if not rounds:
        return None
    idx = range(len(rounds))
    met = [i for i in idx if rounds[i].met]
    if met:
        return min(met, key=lambda i: rounds[i].file_bytes or 0)
    accurate = [i for i in idx if rounds[i].accuracy_ok]
    if accurate:
        return min(accurate, key=lambda i: rounds[i].file_bytes or 0)
    return min(idx, key=lambda i: rounds[i].val_drop_points or 0.0)


def _verdict(result: PlanResult, best: Round) -> str:
    got = (f"{best.file_bytes:,} bytes ({best.compression:.1f}x) at a validation drop of "
           f"{best.val_drop_points:+.2f} points")
    want = (f"{result.target_bytes:,} bytes ({result.target_ratio:.1f}x) at most "
            f"{result.max_drop_points:g} points")
    if result.target_latency_ms is not None:
        got += f", {best.latency_ms or 0:.4g} ms at batch {result.latency_batch}"
        want += f", {result.target_latency_ms:g} ms at batch {result.latency_batch}"
    if best.met:
        return f"target reached: {got} (target {want}), round {best.round}"
    missed = []
    if not best.bytes_ok:
        missed.append(f"{best.file_bytes - result.target_bytes:,} bytes over")
    if not best.accuracy_ok:
        missed.append(f"{best.val_drop_points - result.max_drop_points:.2f} points more drop")
    if not best.latency_ok:
        missed.append(f"{(best.latency_ms or 0) - (result.target_latency_ms or 0):.4g} ms slower")
    return (f"target out of reach after {len(result.rounds)} round(s): the best came to {got} "
            f"({', '.join(missed)} than the target {want}); fine-tune longer (--epochs), "
            "allow more drop, or aim lower")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from deepsqueeze.io import atomic_write

    with atomic_write(path, "w") as handle:
        json.dump(data, handle, indent=2)


def _write_yaml(path: Path, data: dict[str, Any]) -> None:
    from deepsqueeze.io import atomic_write

    with atomic_write(path, "w") as handle:
        yaml.safe_dump(data, handle, sort_keys=False)
