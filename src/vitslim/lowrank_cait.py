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
from vitslim.cait.patch import apply_token_merging, check_not_merging, full_maps_read, reads_patch_tokens
from vitslim.cait.schedule import schedule_for_speedup
from vitslim.cait.shape import planned_schedule
from vitslim.cait.slicing import slice_channels
from vitslim.cait.speed import PROMISE, meet_speedup, steady_timing
from vitslim.errors import ParameterError, VitslimError
from vitslim.io.recipe import find_step, record_step, register_step
from vitslim.lowrank.calibration import leading_images
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
IDENTITY = {"channels": 1.0, "lowrank": 1.0, "tokens": 1.0}
PROBE_IMAGES = 64
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
    compressible weights (tokens cut none). The speed-up is None unless every probe was timed."""
    cost, speedup, flops, kept = 0.0, 1.0, 1.0, 1.0
    for probe in chosen:
        cost += probe.cost
        speedup = None if speedup is None or probe.speedup is None else speedup * probe.speedup
        flops *= probe.flops_ratio
        kept *= (probe.params - fixed) / (total - fixed)
    return cost, speedup, flops, round(fixed + kept * (total - fixed))


def split_target(probes: list[Probe], target: Target, *, total: int, fixed: int, required: tuple[str, ...] = (), hint: str = "") -> Split:
    """The least-cost combination of one level per axis meeting ``target``; an axis may stay off
    unless it is ``required``. ``hint`` ends the error when nothing meets the target.

    Exhaustive over the probed ladder: a few hundred combinations, each a handful of products.
    Ties go to the higher predicted speed-up (the fewer FLOPs when untimed)."""
    by_axis: dict[str, list[Probe | None]] = {}
    for probe in probes:
        by_axis.setdefault(probe.axis, [] if probe.axis in required else [None]).append(probe)
    best, best_key = None, None
    for combination in itertools.product(*by_axis.values()):
        chosen = [probe for probe in combination if probe is not None]
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
               progress: bool = True, objective: str = "auto") -> list[Probe]:
    """Every axis of ``levels`` alone at every level of its ladder, measured (see the module
    docstring); ``timed=False`` skips the timing run (speed-ups None). Levels an axis cannot
    reach on this model (merging beyond what the grid allows) are left out."""
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
    if not timed:
        size = spec.preprocessing.input_size
        original_flops = count_flops(model, size)
        return [Probe(axis, level, cost, None, count_flops(probe, size) / original_flops, count_params(probe))
                for axis, level, probe, cost in built]
    results = on_main(lambda: benchmark([("original", model)] + [(f"{axis}@{level:g}", probe) for axis, level, probe, _ in built],
                                        batch_size=batch_size, runs=runs, device=device, progress=progress))
    original = results[0]
    return [Probe(axis, level, cost, result.ratio, result.flops / original.flops, result.params)
            for (axis, level, _, cost), result in zip(built, results[1:])]


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
        if self.channel_ratio is not None and not (0 < self.channel_ratio < 1 and self.pruning and "channels" in self.axes):
            raise ParameterError("channel_ratio", "must lie in (0, 1), and channel pruning needs gate_training and the channels axis")

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
                        for probe in split["probes"] if probe["level"] == split["levels"][probe["axis"]]])
        measured = split.get("measured_speedup")
        return [table, f"split: {', '.join(f'{axis} {level:g}' for axis, level in split['levels'].items())}; "
                       f"params {count_params(original):,} -> {count_params(compressed):,}" + (f"; measured speed-up {measured:.2f}x" if measured else "")]


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
    ladders = {axis: LEVELS[axis] for axis in axes}
    if config.channel_ratio is not None:
        ladders["channels"] = (config.channel_ratio,)
    probes = probe_axes(model, calibration, levels=ladders, merge=merge, probe_images=config.probe_images, timed=config.speedup is not None,
                        runs=config.probe_runs, device=device, progress=progress, objective=inputs.objective)
    split = split_target(probes, target, total=total, fixed=fixed, required=("channels",) if config.channel_ratio is not None else (), hint=hint)
    logger.info("split: %s", split.as_dict())

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
    if config.speedup is not None and "tokens" in axes:
        schedule, measured = meet_speedup(model, student, merge, config.speedup, schedule, device, concentration=planning["concentration"],
                                          first_level=planning.get("first_level", 1), full_map_after=full_map_after)
        planning = {"measured_speedup": round(measured, 3), **planning}
    elif config.speedup is not None:
        timing = steady_timing(model, student, device=device)
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
                          "measured_speedup": None if measured is None else round(measured, 3),
                          "probes": [{**probe.__dict__, "cost": round(probe.cost, 6), "speedup": _rounded(probe.speedup, 3),
                                      "flops_ratio": round(probe.flops_ratio, 4)} for probe in probes]})
    return student


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
