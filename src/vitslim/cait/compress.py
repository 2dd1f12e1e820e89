"""The ``cait`` method (``Cait``): one target speed-up turned into a token schedule and a channel budget.

Without gate training only tokens are merged (ATME, or ToMe / 2x2 windows as baselines). With
``gate_training`` the channel gates (CDCP) are trained jointly with knowledge distillation from
the original model while the merge schedule is already in place, then frozen and sliced into a
smaller dense model, and the schedule is put back on top. The split between the two axes is
even in log-speed by default (each gives √S), our choice where the paper's abstract is silent;
``token_speedup`` sets it directly. How front-loaded the merge schedule is gets chosen on the
training images when there are any (``cait.shape``). Finally the result is measured against the
original in the same process and, when it falls short of the target, merges a little more
(``cait.speed``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sized
from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import nn
from torch.utils.data import Dataset

from vitslim._infra.table import render
from vitslim.adapters import describe
from vitslim.cait.gates import attach_gates
from vitslim.cait.patch import (
    apply_token_merging,
    check_not_merging,
    full_maps_read,
    merge_schedule,
    reads_patch_tokens,
    token_merging,
)
from vitslim.cait.schedule import LEVELLED, tokens_per_block
from vitslim.cait.shape import choice_batches, planned_schedule
from vitslim.cait.slicing import slice_channels
from vitslim.cait.speed import meet_speedup
from vitslim.errors import ParameterError, VitslimError
from vitslim.io.recipe import find_step
from vitslim.measure.metrics import count_params
from vitslim.methods import Example, Inputs, Method, SweepBudget, register_method, setting
from vitslim.train import Training, distill, schedule_sum

TOKEN_SHARE = 0.5  # of log(speed-up) given to token merging when channels are pruned too
# AdamW moves a gate by about lr × lr_scale per step at the peak rate, and warm-up then cosine
# average about half the peak. For the distillation to change which channels the budget keeps,
# gates must be able to move past one another within the run, so when a run is short (dinov2-s14's
# 125 steps of 16 images at lr 1e-5; benchmarks/dinov2.py) the scale is raised until a gate pushed
# the same way at every step travels GATE_TRAVEL over the run: as far as in the run the default
# was validated on (one epoch of the CIFAR-10 train split, 782 steps at lr 1e-4: 3.92 at scale 100).
GATE_INIT = 3.0
GATE_LR_SCALE = 100.0  # gates learn at the training's learning rate times this, at least
GATE_TRAVEL = 1.3 * GATE_INIT


def check_speedup(speedup: float | None) -> None:
    """A stated speed-up is a multiple of the original's throughput, above 1 (and a number)."""
    if speedup is not None and not speedup > 1:
        raise ParameterError("speedup", f"must be greater than 1 (a speed-up of the original), got {speedup:g}")


@register_method
@dataclass(frozen=True)
class Cait(Method):
    """CAIT (arXiv 2309.15755): asymmetric merging of neighbouring tokens (ATME) to a measured
    speed-up, plus, with ``gate_training``, consistent dynamic channel pruning (CDCP)."""

    name: ClassVar[str] = "cait"
    summary: ClassVar[str] = "token merging (ATME) plus, with --gate-epochs, consistent channel pruning (CDCP)"
    calibrates: ClassVar[bool] = False  # the schedule's shape is chosen on its own seeded subset of ``Inputs.train``
    # a sweep plans by the FLOPs model: timing inside it would let the load of the moment shape the
    # plan; its final run measures every point together
    sweep: ClassVar[tuple[SweepBudget, ...]] = tuple(
        SweepBudget(name, "speed-ups (greater than 1)", lambda value: value > 1,
                    lambda value, cap, merge=merge: {"speedup": value, "merge": merge, "measure": False})
        for name, merge in (("cait", "atme"), ("tome", "tome")))
    examples: ClassVar[tuple[Example, ...]] = (
        Example("CAIT ATME", "cait-atme", {"speedup": 1.5, "measure": False}, "training-free neighbour token merging, 1.5x by the FLOPs model"),)

    speedup: float | None = setting(None, "Target throughput, times the original's (measured after compression).")
    gate_training: Training | None = setting(None, "Train CDCP's channel gates with distillation for E epochs over all the training "
                                                   "images, then slice the pruned channels away (0: training-free token merging only).",
                                             flag="--gate-epochs", folder="gates")
    merge: Literal["atme", "tome", "window", "row-column", "atme-lattice"] = setting("atme", "Token merging kind (tome: the ToMe baseline; window: merging whole 2x2 "
                                                               "windows, an ALGM-style grid-keeping baseline; row-column: CubistMerge-style merging along rows then "
                                                               "columns, keeping a regular grid; atme-lattice: ATME's first, fixed-lattice reading).")
    token_speedup: float | None = setting(None, "The share of the speed-up given to token merging (default: its square root when "
                                                "channels are pruned, all of it otherwise).")
    channel_ratio: float | None = setting(None, "Fraction of the blocks' FLOPs the channel gates keep (default: what the speed-up "
                                                "leaves after tokens).")
    concentration: float | None = setting(None, "How front-loaded the merge schedule is (block i's share of the merged tokens weighs "
                                                "(depth-1-i)^C; 0 spreads evenly). Default: the C of 0, 1, 2 or 4 whose schedule keeps "
                                                "the original's output best on the calibration images.")
    consistent: bool = setting(True, "One channel mask shared by all heads (CDCP), or per-head masks (the ablation).", off="--unconstrained")
    measure: bool = setting(True, "Time the result against the original and merge more until the measured speed-up reaches the target "
                                  "(--plan-only: trust the FLOPs model).", off="--plan-only")
    dense: bool | None = setting(None, "Dense mode: the merged tokens are spread back over the whole token grid before they leave the "
                                       "ViT (dense heads, patch pooling); --classification: they reach the head merged (faster). "
                                       "Default: dense exactly when the output reads the patch tokens.", off="--classification")
    gate_lr_scale: float = setting(GATE_LR_SCALE, "Gates learn at the training's learning rate times this (they must travel far in a few "
                                          "epochs; raised further for short runs, GATE_TRAVEL).", cli=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.speedup is None:
            raise ParameterError("speedup", "is needed by the cait method (S > 1, a multiple of the original's throughput)")
        check_speedup(self.speedup)
        # a share of 1 or less would plan no merging (or un-merging) and the result would miss its target silently
        if self.token_speedup is not None and not (self.token_speedup > 1 and math.isfinite(self.token_speedup)):
            raise ParameterError("token_speedup", f"must be greater than 1 (the speed-up token merging is to give), got {self.token_speedup:g}; "
                                                  "to prune channels alone, give channel_ratio instead")
        if self.channel_ratio is not None:
            if not self.pruning:
                raise ParameterError("channel_ratio", "needs gate training: give gate_training (or drop channel_ratio for training-free ATME)")
            if not 0 < self.channel_ratio <= 1:
                raise ParameterError("channel_ratio", f"must lie in (0, 1], got {self.channel_ratio:g}")
        if self.concentration is not None and not self.concentration >= 0:
            raise ParameterError("concentration", f"must be 0 or more, got {self.concentration:g}")
        if not self.gate_lr_scale > 0:
            raise ParameterError("gate_lr_scale", f"must be above 0, got {self.gate_lr_scale:g}")
        self.split()  # a target the two axes cannot share fails here, before any work

    @property
    def pruning(self) -> bool:
        return self.gate_training is not None and self.gate_training.epochs > 0

    def split(self) -> tuple[float, float | None]:
        """The token speed-up and the channels' FLOPs ratio (None: channels are not pruned)."""
        token_speedup, channel_ratio = self.token_speedup, self.channel_ratio
        if not self.pruning:
            return token_speedup or self.speedup, None
        if token_speedup is None:
            token_speedup = self.speedup ** TOKEN_SHARE if channel_ratio is None else self.speedup * channel_ratio
        if channel_ratio is None:
            channel_ratio = token_speedup / self.speedup
        if token_speedup < 1 or not 0 < channel_ratio <= 1:
            raise VitslimError(f"token speed-up {token_speedup:g} and channel FLOPs ratio {channel_ratio:g} cannot give {self.speedup:g}x")
        return token_speedup, channel_ratio

    def compress(self, model: nn.Module, inputs: Inputs) -> nn.Module:
        return compress_cait(model, self, inputs)

    def report(self, original: nn.Module, compressed: nn.Module) -> list[str]:
        lines = merging_report(compressed)
        channels = find_step(compressed, "channels")
        if channels is not None:
            lines.append(render(["block", "head dim", "MLP hidden"], [[index, str(w.get("head_dim", "-")), str(w.get("mlp_hidden", "-"))]
                                                                     for index, w in channels["blocks"].items()]))
        measured = (find_step(compressed, "merging") or {}).get("measured_speedup")
        lines.append(f"params {count_params(original):,} -> {count_params(compressed):,}" + (f"; measured speed-up {measured:.2f}x" if measured else ""))
        return lines


def merging_report(compressed: nn.Module) -> list[str]:
    """The merge schedule's table and how its concentration was chosen."""
    schedule, step = merge_schedule(compressed), find_step(compressed, "merging")
    if schedule is None or step is None:
        return []
    levels = schedule.merge in LEVELLED
    lines = [render(["block", "tokens merged after it", "level"], [[str(b), str(r), str(level) if levels else "-"] for b, r, level in schedule.steps])]
    scores = step.get("concentration_kl")
    lines.append(f"schedule concentration {step['concentration']:g}"
                 + (f" (score to the original on the calibration images: {', '.join(f'{c}: {kl:.4f}' for c, kl in scores.items())})" if scores else ""))
    levels = step.get("first_level_score")
    if levels:
        lines.append(f"lattice first level {step['first_level']} (score to the original: {', '.join(f'{level}: {score:.4f}' for level, score in levels.items())})")
    return lines


def compress_cait(model: nn.Module, config: Cait, inputs: Inputs) -> nn.Module:
    """A CAIT-compressed copy of ``model`` (the original is left untouched) aiming at
    ``config.speedup`` times its throughput.

    ``inputs.train`` are the training images (a Dataset of (image, label) or an iterable of image
    batches, as ``vitslim.distill`` takes them): the gate training's when ``config.gate_training``
    is given and, in every case, ``inputs.calib_images`` of them (a seeded subset of a Dataset,
    drawn from ``inputs.seed``, else the leading batches) choose the merge schedule's
    concentration (see ``cait.shape``; without images, or when ``config.concentration`` is
    given, no choice is made and it defaults to 1), judged by ``inputs.objective``. With gate
    training the channels are pruned too (CDCP). With ``config.measure`` the result is timed
    against the original (on ``inputs.device``, batch 32) and the merge schedule tightened, at
    most a few times, until the measured speed-up reaches the target (so that it still shows at
    least 95% of it when timed again). Every candidate merges in the mode ``config.dense`` gives
    (None: dense exactly when ``cait.patch.reads_patch_tokens``).
    """
    check_not_merging(model)
    batches = inputs.train
    if config.pruning and batches is None:
        raise VitslimError("channel pruning trains with distillation: pass the training images")
    token_target, channel_target = config.split()
    if isinstance(batches, Iterator):
        batches = list(batches)  # read twice: once to choose the schedule, once to distil
    student = copy.deepcopy(model).eval()
    dense = reads_patch_tokens(student) if config.dense is None else config.dense
    schedule, planning = None, {"concentration": 1.0 if config.concentration is None else config.concentration}
    if token_target > 1:
        choice = None if batches is None else choice_batches(batches, inputs.calib_images, inputs.seed)
        schedule, planning = planned_schedule(student, config.merge, token_target, choice, concentration=config.concentration,
                                              images=inputs.calib_images, progress=inputs.progress, dense=dense, objective=inputs.objective)
    if channel_target is not None:
        prune_channels(student, model, batches, config.gate_training, channel_ratio=channel_target, schedule=schedule,
                       consistent=config.consistent, gate_lr_scale=config.gate_lr_scale, dense=dense, objective=inputs.objective)
    full_map_after = full_maps_read(student, schedule) if dense and schedule is not None else None
    if config.measure:
        checks: list[dict] = []
        schedule, measured = meet_speedup(model, student, config.merge, config.speedup, schedule, inputs.device,
                                          concentration=planning["concentration"], first_level=planning.get("first_level", 1), dense=dense,
                                          full_map_after=full_map_after, checks=checks)
        planning = {"measured_speedup": round(measured, 3), "speed_checks": checks, **planning}
    if schedule is not None:  # the one recipe step of the merging, with how it was planned and measured
        apply_token_merging(student, schedule, dense=dense, notes=planning, full_map_after=full_map_after)
    return student


def _steps(batches, training: Training) -> int:
    """Optimiser steps ``distill`` will take over ``batches`` (a Dataset is batched, anything sized
    is batches already)."""
    if isinstance(batches, Dataset):
        per_epoch = math.ceil(len(batches) / training.batch_size)
    else:
        per_epoch = len(batches) if isinstance(batches, Sized) else 1
    return max(1, training.epochs * per_epoch)


def prune_channels(student: nn.Module, teacher: nn.Module, batches, training: Training, *, channel_ratio: float, schedule,
                   consistent: bool = True, gate_lr_scale: float = GATE_LR_SCALE, dense: bool | None = None, objective: str = "auto") -> None:
    """CDCP on ``student`` in place: gates trained with distillation from ``teacher`` towards
    ``channel_ratio`` of the blocks' FLOPs (counted at the token counts ``schedule`` leaves, with
    the schedule in place during training, so the gates learn for the model that will run), then
    frozen and sliced. The budget is met from ``cait.gates.BUDGET_REACH`` of the steps on
    (``ChannelGates.follow_budget``). Both models end on the CPU in eval mode. The gates learn at
    ``training.lr`` times ``gate_lr_scale``, or faster when the training is too short for them to
    move that far at that rate (``GATE_TRAVEL``). The merging runs in the ``dense`` mode during training,
    and the distillation is judged by ``objective``."""
    spec = describe(student)
    lr_scale = max(gate_lr_scale, GATE_TRAVEL / (training.lr * schedule_sum(_steps(batches, training))))
    gates = attach_gates(student, consistent=consistent, init=GATE_INIT, lr_scale=lr_scale)
    tokens = tokens_per_block(schedule, spec)
    with token_merging(student, schedule, dense=dense):
        distill(student, teacher, batches, training, objective=objective,
                before_step=lambda _, step, steps: gates.follow_budget(channel_ratio, tokens=tokens, step=step, steps=steps))
    slice_channels(student, gates)
    student.to("cpu").eval()
    teacher.to("cpu")
