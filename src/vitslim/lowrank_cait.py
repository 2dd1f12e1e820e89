"""The ``lowrank+cait`` method (``LowRankCait``): channels, low-rank factors and tokens under one target.

The three axes compound: CDCP narrows every block, the low-rank factors then thin the narrowed
projections, and ATME shortens the token sequence all of it runs on. How much to ask of each axis
is decided by measurement, not by fixed shares:

1. **Probe** each axis alone, training-free, at a ladder of levels (``LEVELS``) on a few
   calibration images: token merging at a schedule's predicted speed-up, channels sliced to a
   FLOPs ratio by weight importance (``importance_masks``), whitened low-rank factors keeping a
   fraction of the compressible weights. Each probe's *cost* is the mean KL divergence of its
   logits from the original's; its *gains* are its throughput ratio (all probes timed against
   the original in one interleaved run; only when the target states a speed-up, so that a FLOPs
   or parameter target's plan does not depend on the machine's load), FLOPs ratio and parameter
   count.
2. **Split** (``split_target``): the combination of levels with the least summed cost whose
   combined gains meet every stated bound, found exhaustively over the ladder. Gains combine
   multiplicatively (speed, FLOPs) and on the compressible weights (parameters); costs add.
   Both are approximations, and the final model is measured, not predicted.
3. **Build**: channels pruned with distillation (``gate_training``) while the chosen merge schedule
   is in place, low-rank factors fitted to the sliced model with compensation, then the merge
   schedule; for a speed-up target the
   schedule is tightened until the measured speed-up reaches it (``cait.speed``, as for ``compress_cait``).
   The schedule's concentration is chosen on the calibration images as ``compress_cait`` chooses
   it (``cait.shape``); the token probes keep concentration 1, three schedules per level being
   more than a probe is worth.

The probes are training-free, so they cannot see how much distillation recovers on each axis
(on the reference CIFAR ViT low-rank factors recover more than merged tokens, so the split's mix
for 2x ended behind low-rank alone: docs/composition.md). The recipe holds the channel,
low-rank and merging steps in that order, so the folder reloads exactly.
"""

from __future__ import annotations

import copy
import itertools
import logging
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from vitslim._infra.distributed import on_main
from vitslim._infra.table import render
from vitslim.adapters import describe
from vitslim.cait.compress import check_speedup, prune_channels
from vitslim.cait.importance import importance_masks
from vitslim.cait.patch import apply_token_merging, check_not_merging, full_maps_read, reads_patch_tokens, token_merging
from vitslim.cait.schedule import schedule_for_speedup
from vitslim.cait.shape import planned_schedule
from vitslim.cait.slicing import slice_channels
from vitslim.cait.speed import PROMISE, meet_speedup, steady_timing
from vitslim.deploy.int8_fallback import carried_over, plan_int8
from vitslim.deploy.quantize import int8_layers, quantize_int8
from vitslim.errors import ParameterError, VitslimError
from vitslim.io.image_batches import leading_images
from vitslim.io.recipe import find_step, record_step, register_step
from vitslim.lowrank.compress import LowRank, ParameterBudget, compress_lowrank, compressible_linears
from vitslim.measure.metrics import count_flops, count_params
from vitslim.measure.objective import mean_divergence
from vitslim.methods import Example, Inputs, SweepBudget, register_method, setting
from vitslim.train import Training

logger = logging.getLogger("vitslim")

AXES = ("channels", "lowrank", "tokens")
# the ladder each axis is probed at: channels, the blocks' FLOPs ratio kept; lowrank, the share
# of the compressible Linears' weights kept; tokens, the merge schedule's predicted speed-up
LEVELS = {
    "channels": (0.85, 0.7, 0.6, 0.5, 0.4, 0.3),
    "lowrank": (0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1, 0.07),
    "tokens": (1.1, 1.2, 1.3, 1.45, 1.6, 1.8, 2.0, 2.3),
}
IDENTITY = {"channels": 1.0, "lowrank": 1.0, "tokens": 1.0}  # the int8 axis appears in a split's levels only when chosen
# the int8 axis's one level: the share of each Linear weight's bits kept (8 of 32); 1.0 is float32
INT8_LEVEL = 0.25
# under int8, a structured axis whose probe gains less than this over int8 alone (in the runtime's
# timings, which move by about 5% between runs: cait.speed) adds nothing measurable, and is left out
MEASURABLE_GAIN = 1.05
PROBE_IMAGES = 64
# how much more of the objective than the planned merging the speed check may spend merging more
TIGHTENING_SLACK = 1.5
STEP = "lowrank+cait"  # the method's name; recipes written before 0.2 call the step "composed"


@dataclass(frozen=True)
class Probe:
    """One axis applied alone at one level, as measured against the original."""

    axis: str
    level: float
    cost: float  # mean KL(original ‖ probe) of the logits on the probe images, nats
    speedup: float | None  # measured throughput ratio; None when not timed (no speed-up target)
    flops_ratio: float
    params: int
    int8_speedup: float | None = None  # the same, with int8 applied to the probe (when int8 is an axis of the plan)
    keep_float: tuple[str, ...] = ()  # the int8 probe's: the original's Linears its int8 leaves in float32, in every probe's int8 too


@dataclass(frozen=True)
class Target:
    """The bounds the composed model must meet; any of them may be None (not stated). Checked by
    the ``LowRankCait`` config that states them."""

    speedup: float | None = None
    flops_ratio: float | None = None
    params: int | None = None


@dataclass(frozen=True)
class Split:
    """The chosen level of every axis and what the probes predict for their combination."""

    levels: dict[str, float]
    cost: float
    speedup: float | None
    flops_ratio: float
    params: int

    def as_dict(self) -> dict:
        return {"levels": self.levels, "predicted": {"cost": round(self.cost, 6), "speedup": _rounded(self.speedup, 3),
                                                     "flops_ratio": round(self.flops_ratio, 4), "params": self.params}}


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def combine(chosen: list[Probe], *, total: int, fixed: int) -> tuple[float, float | None, float, int]:
    """(cost, speed-up, FLOPs ratio, params) of applying every probe's axis at its level: costs
    add, speed and FLOPs multiply, and the parameter cuts compound on the ``total - fixed``
    compressible weights (tokens and int8 cut none). With int8 among them, each other axis
    contributes its speed-up *under int8* (``int8_speedup`` over int8 alone's), since a structured
    cut gains less where int8 has already made the matmuls cheap. The speed-up is None unless
    every probe was timed."""
    int8 = next((probe for probe in chosen if probe.axis == "int8"), None)
    cost, speedup, flops, kept = 0.0, 1.0, 1.0, 1.0
    for probe in chosen:
        cost += probe.cost
        gain = probe.speedup if int8 is None or probe is int8 else _gain_under_int8(probe, int8)
        speedup = None if speedup is None or gain is None else speedup * gain
        flops *= probe.flops_ratio
        kept *= (probe.params - fixed) / (total - fixed)
    return cost, speedup, flops, round(fixed + kept * (total - fixed))


def _gain_under_int8(probe: Probe, int8: Probe) -> float | None:
    """``probe``'s speed-up over int8 alone, both with int8 applied; None when either was not timed."""
    return None if probe.int8_speedup is None or int8.speedup is None else probe.int8_speedup / int8.speedup


def split_target(probes: list[Probe], target: Target, *, total: int, fixed: int, required: tuple[str, ...] = (), hint: str = "") -> Split:
    """The least-cost combination of one level per axis meeting ``target``; an axis may stay off
    unless it is ``required``. ``hint`` ends the error when nothing meets the target. A structured
    probe whose gain under int8 is below ``MEASURABLE_GAIN`` is never combined with int8: the
    timings cannot tell its gain from noise, and it would add cost for nothing.

    Exhaustive over the probed ladder: a few hundred combinations, each a handful of products.
    Ties go to the higher predicted speed-up (the fewer FLOPs when untimed)."""
    by_axis: dict[str, list[Probe | None]] = {}
    for probe in probes:
        by_axis.setdefault(probe.axis, [] if probe.axis in required else [None]).append(probe)
    best, best_key = None, None
    for combination in itertools.product(*by_axis.values()):
        chosen = [probe for probe in combination if probe is not None]
        int8 = next((probe for probe in chosen if probe.axis == "int8"), None)
        if int8 is not None and not all(probe is int8 or _measurable_under_int8(probe, int8) for probe in chosen):
            continue
        cost, speedup, flops, params = combine(chosen, total=total, fixed=fixed)
        if target.speedup is not None and (speedup is None or speedup < target.speedup):
            continue
        if target.flops_ratio is not None and flops > target.flops_ratio:
            continue
        if target.params is not None and params > target.params:
            continue
        key = (cost, flops if speedup is None else -speedup)
        if best_key is None or key < best_key:
            levels = {**IDENTITY, **{probe.axis: probe.level for probe in chosen}}
            best, best_key = Split(levels, cost, speedup, flops, params), key
    if best is None:
        strongest = [min(filter(None, options), key=lambda p: p.flops_ratio if p.speedup is None else -p.speedup) for options in by_axis.values()]
        _, speedup, flops, params = combine(strongest, total=total, fixed=fixed)
        speed = "" if speedup is None else f"{speedup:.2f}x, "
        raise VitslimError(f"no probed combination meets the target ({_describe(target)}); the strongest reaches "
                           f"{speed}FLOPs ratio {flops:.2f}, {params:,} parameters. Ask for less{hint}")
    return best


def _measurable_under_int8(probe: Probe, int8: Probe) -> bool:
    gain = _gain_under_int8(probe, int8)
    return gain is None or gain >= MEASURABLE_GAIN


def unmeasurable_under_int8(probes: list[Probe]) -> dict[str, float]:
    """The structured axes none of whose probes gains ``MEASURABLE_GAIN`` over int8 alone, with
    the best gain each reached: what int8 leaves them to add."""
    int8 = next((probe for probe in probes if probe.axis == "int8"), None)
    if int8 is None or int8.speedup is None:
        return {}
    best: dict[str, float] = {}
    for probe in probes:
        gain = None if probe is int8 else _gain_under_int8(probe, int8)
        if gain is not None:
            best[probe.axis] = max(best.get(probe.axis, 0.0), gain)
    return {axis: gain for axis, gain in best.items() if gain < MEASURABLE_GAIN}


def _describe(target: Target) -> str:
    parts = [f"{target.speedup:g}x" if target.speedup else "", f"FLOPs ratio {target.flops_ratio:g}" if target.flops_ratio else "",
             f"{target.params:,} parameters" if target.params else ""]
    return ", ".join(part for part in parts if part)


def fixed_params(model: nn.Module) -> int:
    """Parameters outside the compressible Linears' weights: what no axis removes."""
    return count_params(model) - sum(layer.weight.numel() for layer in compressible_linears(model).values())


def _probe_model(model: nn.Module, axis: str, level: float, calibration: list, merge: str) -> nn.Module:
    if axis == "tokens":
        probe = copy.deepcopy(model)
        return apply_token_merging(probe, schedule_for_speedup(describe(probe), merge, level), record=False)
    if axis == "channels":
        probe = copy.deepcopy(model)
        slice_channels(probe, masks=importance_masks(probe, level))
        return probe.eval()
    fixed = fixed_params(model)
    config = LowRank(params=_vit_params(model, fixed + int(level * (count_params(model) - fixed))), sensitivity="none", compensation=False)
    return compress_lowrank(model, calibration, config, progress=False)


def probe_axes(model: nn.Module, calibration: list, *, levels: dict[str, tuple[float, ...]] = LEVELS, merge: str = "atme",
               probe_images: int = PROBE_IMAGES, timed: bool = True, runs: int = 20, batch_size: int = 32, device: str = "cpu",
               progress: bool = True, objective: str = "auto", runtime: str = "eager", int8: str | None = None) -> list[Probe]:
    """Every axis of ``levels`` alone at every level of its ladder, measured (see the module
    docstring); ``timed=False`` skips the timing run (speed-ups None). Levels an axis cannot
    reach on this model (merging beyond what the grid allows) are left out. Probes are timed in
    ``runtime`` against the float original in the same run.

    ``int8`` (an int8 kind) adds the int8 axis: a probe of int8 alone, and every other probe timed
    once more with int8 applied (``Probe.int8_speedup``), all in the same run. The int8 is the one
    the plan will apply, the original's float32 fallback included (``plan_int8``; a fallback Linear
    that a probe factorised keeps its factors float), so that a Linear left float is priced into
    every int8 timing instead of surfacing only when the composed model is timed (docs/runtimes.md
    measures the difference)."""
    from vitslim.measure.bench import benchmark

    images = leading_images(calibration, probe_images, next(model.parameters()).device)
    spec = describe(model)
    with torch.no_grad():
        teacher_outputs = [spec.output(batch) for batch in images]
    built = []
    for axis, ladder in levels.items():
        for level in ladder:
            try:
                probe = _probe_model(model, axis, level, calibration, merge)
            except VitslimError as error:
                logger.info("probe %s at %g skipped: %s", axis, level, error)
                continue
            built.append((axis, level, probe, mean_divergence(describe(probe), teacher_outputs, images, objective)))
    quantised, keep_float = None, ()
    if int8 is not None:
        keep_float = plan_int8(model, int8, calibration, objective=objective, progress=progress).keep_float
        quantised = quantize_int8(model, int8, keep_float=keep_float)
        int8_cost = mean_divergence(describe(quantised), teacher_outputs, images, objective)
    if not timed:
        size = spec.preprocessing.input_size
        original_flops = count_flops(model, size)
        probes = [Probe(axis, level, cost, None, count_flops(probe, size) / original_flops, count_params(probe))
                  for axis, level, probe, cost in built]
        return probes + ([Probe("int8", INT8_LEVEL, int8_cost, None, 1.0, count_params(model), keep_float=keep_float)] if int8 is not None else [])
    timed_models = [("original", model)] + [(f"{axis}@{level:g}", probe) for axis, level, probe, _ in built]
    if int8 is not None:
        timed_models += [("int8", quantised)] + [(f"{axis}@{level:g}+int8", _with_int8(probe, int8, keep_float)) for axis, level, probe, _ in built]
    results = on_main(lambda: benchmark(timed_models, batch_size=batch_size, runs=runs, device=device, progress=progress, runtime=runtime))
    original, count = results[0], len(built)
    under_int8 = results[count + 2:] if int8 is not None else [None] * count
    probes = [Probe(axis, level, cost, result.ratio, result.flops / original.flops, result.params, None if with_int8 is None else with_int8.ratio)
              for (axis, level, _, cost), result, with_int8 in zip(built, results[1:count + 1], under_int8)]
    if int8 is not None:
        probes.append(Probe("int8", INT8_LEVEL, int8_cost, results[count + 1].ratio, results[count + 1].flops / original.flops,
                            results[count + 1].params, keep_float=keep_float))
    return probes


def _with_int8(probe: nn.Module, kind: str, keep_float: tuple[str, ...]) -> nn.Module:
    """``probe`` in int8 of ``kind``, the original's ``keep_float`` Linears (or their factors) left float."""
    every = quantize_int8(probe, kind)
    if not keep_float:
        return every
    return quantize_int8(probe, kind, keep_float=carried_over(keep_float, int8_layers(every)))  # names as int8 takes them (unpacked)


@register_method
@dataclass(frozen=True)
class LowRankCait(ParameterBudget):
    """All three axes under one target (``vitslim.lowrank_cait``): CDCP channels (with gate training),
    low-rank factors and ATME tokens, the target split between them by measured cost."""

    name: ClassVar[str] = "lowrank+cait"
    summary: ClassVar[str] = "all three axes (channels, low-rank, tokens), the target split between them by measured cost"
    sweep: ClassVar[tuple[SweepBudget, ...]] = (
        SweepBudget("lowrank+cait", "FLOPs reduction factors (greater than 1; 2 keeps half the FLOPs), with an optional parameter cap (2@0.5)",
                    lambda value: value > 1, lambda value, cap: {"flops_ratio": 1 / value, "param_ratio": cap}, cap=True, recovery=True),)
    examples: ClassVar[tuple[Example, ...]] = (
        Example("low-rank + ATME", "lowrank+cait", {"flops_ratio": 0.4, "param_ratio": 0.5},
                "one target (40% of the FLOPs, 50% of the parameters) split by measured cost"),)

    speedup: float | None = setting(None, "Target throughput, times the original's (measured after compression).")
    flops_ratio: float | None = setting(None, "Keep at most this fraction of the original's FLOPs per image.")
    gate_training: Training | None = setting(None, "Train CDCP's channel gates with distillation for E epochs over all the training "
                                                   "images, then slice the pruned channels away (0: channels are not pruned).",
                                             flag="--gate-epochs", folder="gates")
    channel_ratio: float | None = setting(None, "Fix the channels' FLOPs ratio (0 < R < 1) instead of letting the split choose it.")
    merge: Literal["atme", "tome", "window", "row-column", "atme-lattice"] = setting("atme", "Token merging kind (tome: the ToMe baseline; window: merging whole 2x2 "
                                                               "windows, an ALGM-style grid-keeping baseline; row-column: CubistMerge-style merging along rows then "
                                                               "columns, keeping a regular grid; atme-lattice: ATME's first, fixed-lattice reading).")
    concentration: float | None = setting(None, "How front-loaded the merge schedule is (0 spreads evenly). Default: chosen on the "
                                                "calibration images.")
    axes: tuple[str, ...] = setting(AXES, "The axes the split may use (one axis alone is that method's own speed-matched baseline).",
                                    cli=False)
    runtime: Literal["eager", "compile", "onnxruntime"] = setting("eager", "The runtime the speed-up target is measured in: every probe "
                                                                  "and the result, against the float32 original in the same runtime "
                                                                  "(vitslim bench --runtime names them alike).")
    int8_axis: Literal["none", "weight", "dynamic"] = setting("none", "int8 as an axis of the plan (needs a speed-up target): the split may "
                                                              "quantise the Linears, applied after any recovery with the Linears whose "
                                                              "int8 the output cannot afford kept in float32, and drops a structured "
                                                              "axis that adds nothing measurable over int8 alone.")
    ladders: dict | None = setting(None, "The levels each axis is probed at ({axis: levels}); default LEVELS. Fewer levels are fewer "
                                         "probes to build and time (each one exported too in onnxruntime).", cli=False)
    probe_images: int = setting(PROBE_IMAGES, "Calibration images each probe is scored on.", cli=False)
    probe_runs: int = setting(20, "Timed rounds of the probes' speed run.", cli=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.speedup is None and self.flops_ratio is None and self.param_ratio is None and self.params is None:
            raise ParameterError("speedup", "(or flops_ratio, param_ratio, params): the lowrank+cait method needs one to state a target")
        check_speedup(self.speedup)
        if self.flops_ratio is not None and not 0 < self.flops_ratio < 1:
            raise ParameterError("flops_ratio", f"must be between 0 and 1 (exclusive), got {self.flops_ratio:g}")
        unknown = set(self.axes) - set(AXES)
        if unknown or not self.axes:
            raise ParameterError("axes", f"names unknown axes {sorted(unknown)}; choose from {', '.join(AXES)}")
        probed = [axis for axis in self.axes if axis != "channels" or self.pruning]
        if self.ladders is not None and not all(self.ladders.get(axis) for axis in probed):
            raise ParameterError("ladders", f"must give levels for every axis probed: {', '.join(probed)}")
        if self.channel_ratio is not None and not (0 < self.channel_ratio < 1 and self.pruning and "channels" in self.axes):
            raise ParameterError("channel_ratio", "must lie in (0, 1), and channel pruning needs gate_training and the channels axis")
        if self.plans_int8 and self.speedup is None:
            raise ParameterError("int8_axis", "needs a speedup target: int8 removes no FLOPs or parameters, so only a measured "
                                              "speed-up can choose it")

    @property
    def plans_int8(self) -> bool:
        return self.int8_axis != "none"

    def planned_int8(self, compressed: nn.Module) -> tuple[str, tuple[str, ...]] | None:
        planned = (find_step(compressed, STEP) or {}).get("int8")
        return None if planned is None else (planned["kind"], tuple(planned["keep_float"]))

    @property
    def pruning(self) -> bool:
        return self.gate_training is not None and self.gate_training.epochs > 0

    def compress(self, model: nn.Module, inputs: Inputs) -> nn.Module:
        model.to(inputs.device)
        return compress_composed(model, self, inputs)

    def chosen(self, compressed: nn.Module) -> str:
        split = find_step(compressed, STEP)
        return "" if split is None else ", ".join(f"{axis} {level:g}" for axis, level in split["levels"].items())

    def report(self, original: nn.Module, compressed: nn.Module) -> list[str]:
        split = find_step(compressed, STEP)
        table = render(["axis", "level", "probe cost (KL)", "probe FLOPs ratio", "probe speed-up"],
                       [[probe["axis"], f"{probe['level']:g}", f"{probe['cost']:.4f}", f"{probe['flops_ratio']:.2f}",
                         "not timed" if probe["speedup"] is None else f"{probe['speedup']:.2f}x"]
                        for probe in split["probes"] if probe["level"] == split["levels"].get(probe["axis"], 1.0)])
        measured = split.get("measured_speedup")
        lines = [table, f"split: {', '.join(f'{axis} {level:g}' for axis, level in split['levels'].items())}; "
                        f"params {count_params(original):,} -> {count_params(compressed):,}"
                        + (f"; measured speed-up {measured:.2f}x ({split.get('runtime', 'eager')})" if measured else "")]
        for axis, gain in split.get("unmeasurable_under_int8", {}).items():
            lines.append(f"{axis} adds nothing measurable over int8 alone (at best {gain:.2f}x): left out of the plans with int8")
        planned = split.get("int8")
        if planned is not None:
            kept = f"; kept in float32: {', '.join(planned['keep_float'])}" if planned["keep_float"] else ""
            lines.append(f"int8 ({planned['kind']}) applied to the result{kept}")
        return lines


def compress_composed(model: nn.Module, config: LowRankCait, inputs: Inputs) -> nn.Module:
    """A copy of ``model`` compressed on all three axes to meet every bound ``config`` states (a
    measured ``speedup``, a ``flops_ratio``, a parameter budget as ``param_ratio`` or ``params``,
    of the ViT as for low-rank).

    ``inputs.calibration`` are the calibration image batches (probes and low-rank statistics);
    ``inputs.train`` the training images the channel gates are trained on (as ``vitslim.distill``
    takes them), needed with ``config.gate_training`` (CDCP; without it channels are not pruned).
    ``config.axes`` limits the split to some of the axes; ``config.channel_ratio`` fixes the
    channels' FLOPs ratio instead of letting the split choose it; ``config.concentration`` fixes
    the merge schedule's instead of choosing it on the calibration images. Every candidate is
    judged by ``inputs.objective``. The split and the probes it came from are recorded in the
    recipe (step ``lowrank+cait``). A distillation of the composed model is the pipeline's recovery
    step (``vitslim.compress(..., recovery=Training(...))``), as for every method.
    """
    pruning, axes, merge, device, progress = config.pruning, config.axes, config.merge, inputs.device, inputs.progress
    if pruning and inputs.train is None:
        raise VitslimError("gate training needs the training images: pass them")
    check_not_merging(model)
    total, fixed = count_params(model), fixed_params(model)
    params = config.target_params(model)
    if params is not None:  # the budget counts the ViT's parameters; the probes count the whole model's
        params += total - count_params(describe(model).model)
        if not fixed < params:
            raise ParameterError("params", f"(the parameter budget) must be above the {fixed:,} parameters no axis removes")
    target = Target(speedup=config.speedup, flops_ratio=config.flops_ratio, params=params)
    calibration = list(inputs.calibration)
    hint = ""
    if not pruning and "channels" in axes:
        axes = tuple(axis for axis in axes if axis != "channels")
        hint = ", or give gate training so that channels can be pruned too"
        logger.info("channels are not pruned: CDCP trains its gates, and no gate training was given")
    ladders = {axis: tuple((config.ladders or LEVELS)[axis]) for axis in axes}
    if config.channel_ratio is not None:
        ladders["channels"] = (config.channel_ratio,)
    int8_kind = config.int8_axis if config.plans_int8 else None
    probes = probe_axes(model, calibration, levels=ladders, merge=merge, probe_images=config.probe_images, timed=config.speedup is not None,
                        runs=config.probe_runs, device=device, progress=progress, objective=inputs.objective, runtime=config.runtime,
                        int8=int8_kind)
    unmeasurable = unmeasurable_under_int8(probes)
    for axis, gain in unmeasurable.items():
        logger.info("%s adds nothing measurable over int8 alone in %s (at best %.2fx over it): left out of the plans with int8",
                    axis, config.runtime, gain)
    split = split_target(probes, target, total=total, fixed=fixed, required=("channels",) if config.channel_ratio is not None else (), hint=hint)
    logger.info("split: %s", split.as_dict())
    if "int8" in split.levels and all(split.levels[axis] == 1 for axis in AXES):
        logger.info("int8 alone is the cheapest way to the target here: no structured axis is applied")

    student = copy.deepcopy(model).eval()
    schedule, planning = None, {"concentration": 1.0}
    if split.levels["tokens"] > 1:
        schedule, planning = planned_schedule(student, merge, split.levels["tokens"], calibration, concentration=config.concentration,
                                              progress=progress, objective=inputs.objective)
    if split.levels["channels"] < 1:
        prune_channels(student, model, inputs.train, config.gate_training, channel_ratio=split.levels["channels"], schedule=schedule,
                       objective=inputs.objective)
    kept = fixed_params(student)
    budget = kept + int(split.levels["lowrank"] * (count_params(student) - kept))
    if params is not None:  # the stated budget holds whatever widths the channel gates settled on
        budget = min(budget, params)
    if budget < count_params(student):
        student = compress_lowrank(student.to(device), calibration, LowRank(params=_vit_params(student, budget)), progress=progress,
                                   objective=inputs.objective).to("cpu")
    measured = None
    full_map_after = full_maps_read(student, schedule) if schedule is not None and reads_patch_tokens(student) else None
    int8 = None
    if "int8" in split.levels:
        with token_merging(student, schedule, full_map_after=full_map_after):
            int8 = plan_int8(student, int8_kind, calibration, objective=inputs.objective, progress=progress)
    timed_as = None if int8 is None else lambda float_model: quantize_int8(float_model, int8.kind, keep_float=int8.keep_float)
    if config.speedup is not None and "tokens" in axes:
        affordable = merging_cost_bound(student, model, schedule, calibration, images=config.probe_images, objective=inputs.objective,
                                        full_map_after=full_map_after)
        checks: list[dict] = []
        schedule, measured = meet_speedup(model, student, merge, config.speedup, schedule, device, concentration=planning["concentration"],
                                          first_level=planning.get("first_level", 1), full_map_after=full_map_after, runtime=config.runtime,
                                          timed_as=timed_as, affordable=affordable, checks=checks)
        planning = {"measured_speedup": round(measured, 3), "speed_checks": checks, **planning}
    elif config.speedup is not None:
        timing = steady_timing(model, student if timed_as is None else timed_as(student), device=device, runtime=config.runtime)
        measured = timing.ratio
        if timing.noisy:
            logger.warning("the speed-up timings stay unstable (ratio spread %.0f%%): the machine is busy, so the measured %.2fx "
                           "says little; time the result on a quiet machine (vitslim bench)", 100 * timing.ratio_spread, measured)
        elif measured < PROMISE * config.speedup:
            logger.warning("measured speed-up %.2fx is below the %.2fx target (token merging, which could close the gap, is not among the axes)",
                           measured, config.speedup)
    if schedule is not None:
        apply_token_merging(student, schedule, notes=planning, full_map_after=full_map_after)
    record_step(student, {"method": STEP, "target": {k: v for k, v in target.__dict__.items() if v is not None}, **split.as_dict(),
                          "measured_speedup": None if measured is None else round(measured, 3), "runtime": config.runtime,
                          "int8": None if int8 is None else int8.as_dict(), "unmeasurable_under_int8": {k: round(v, 3) for k, v in unmeasurable.items()},
                          "probes": [{**_recorded(probe), "cost": round(probe.cost, 6), "speedup": _rounded(probe.speedup, 3),
                                      "flops_ratio": round(probe.flops_ratio, 4), "int8_speedup": _rounded(probe.int8_speedup, 3)}
                                     for probe in probes]})
    return student


def _recorded(probe: Probe) -> dict:
    """``probe``'s fields for the recipe: ``keep_float`` only where it names Linears (the int8 probe's)."""
    return {key: value for key, value in probe.__dict__.items() if key != "keep_float" or value}


def merging_cost_bound(student: nn.Module, teacher: nn.Module, schedule, calibration: list, *, images: int, objective: str,
                       full_map_after: tuple[int, ...] | None):
    """The test ``meet_speedup`` puts to each tighter merging schedule: ``student`` merging on it
    costs (the objective against ``teacher`` on the first ``images`` calibration images) at most
    ``TIGHTENING_SLACK`` times what it costs on the planned ``schedule``. The split chose its
    merging level from measured costs; without this bound a speed check that measures short keeps
    merging past every level any probe measured. Nothing is run until the first question: a plan
    whose first measurement meets its target never pays for the bound."""
    measured: dict = {}

    def cost(candidate) -> float:
        with token_merging(student, candidate, full_map_after=full_map_after):
            return mean_divergence(describe(student), measured["teacher_outputs"], measured["batches"], objective)

    def affordable(candidate) -> bool:
        if not measured:
            device, teacher_device = next(student.parameters()).device, next(teacher.parameters()).device
            measured["batches"] = leading_images(calibration, images, device)
            with torch.no_grad():
                measured["teacher_outputs"] = [describe(teacher).output(batch.to(teacher_device)).to(device) for batch in measured["batches"]]
            measured["bound"] = TIGHTENING_SLACK * cost(schedule)
        found = cost(candidate)
        logger.info("a tighter merging schedule costs %.4g (the planned one's bound: %.4g)", found, measured["bound"])
        return found <= measured["bound"]

    return affordable


def _vit_params(model: nn.Module, whole: int) -> int:
    """A whole-model parameter count as the ViT's (what a ``LowRank`` budget counts)."""
    return whole - (count_params(model) - count_params(describe(model).model))


def _summary(step: dict) -> str:
    return "lowrank+cait split: " + ", ".join(f"{axis} {level:g}" for axis, level in step.get("levels", {}).items())


@register_step(STEP, summary=_summary)
@register_step("composed", summary=_summary)
def _rebuild(model: nn.Module, step: dict) -> None:
    """Nothing to rebuild: the step documents the split; the channel, low-rank and merging steps
    before it carry the structure."""
