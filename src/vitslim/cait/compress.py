"""``compress_cait``: one target speed-up turned into a token schedule and a channel budget.

Without training (``epochs=0``) only tokens are merged (ATME, or ToMe as the baseline). With
``epochs > 0`` the channel gates (CDCP) are trained jointly with knowledge distillation from the
original model while the merge schedule is already in place, then frozen and sliced into a
smaller dense model, and the schedule is put back on top. The split between the two axes is
even in log-speed by default (each gives √S), our choice where the paper's abstract is silent;
``token_speedup`` sets it directly. How front-loaded the merge schedule is gets chosen on the
training images when there are any (``cait.shape``). Finally the result is measured against the
original in the same process and, when it falls short of the target, merges a little more.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Iterator

from torch import nn

from vitslim.adapters import describe
from vitslim.cait.channels import attach_gates, slice_channels
from vitslim.cait.patch import MERGING_ATTR, apply_token_merging, remove_token_merging, token_merging
from vitslim.cait.patch import STEP as MERGING_STEP
from vitslim.cait.schedule import predicted_speedup, schedule_for_speedup, strongest_schedule, tokens_per_block
from vitslim.cait.shape import CHOICE_IMAGES, choice_batches, planned_schedule
from vitslim.distributed import on_main
from vitslim.errors import ParameterError, VitslimError
from vitslim.recipe import find_step, update_step
from vitslim.train import Training, distill

logger = logging.getLogger("vitslim")

TOKEN_SHARE = 0.5  # of log(speed-up) given to token merging when channels are pruned too
PROMISE = 0.95  # measured/target that --speedup promises
AIM = 1.0  # measured/target the schedule is tightened to reach: on a shared CPU the ratio moves by
# up to ~5% between timing runs, so aiming at 0.98 left a 1.3x request at 0.946x of it when re-timed,
# and aiming at the promise itself left a 1.8x one at 0.94x (benchmarks/cait.py --parts delivery)
MEASURE_ROUNDS = 4
MAX_STEP = 1.15  # largest factor by which one round raises the predicted speed-up (timings are noisy)


def measured_speedup(original: nn.Module, compressed: nn.Module, *, batch_size: int = 32, runs: int = 20, device: str = "cpu") -> float:
    """Throughput of ``compressed`` over ``original``'s, timed in one run; under ``torchrun`` on
    rank 0 alone (ranks timing at once would slow each other) and shared with the others, so all
    ranks take the same decisions from it."""
    from vitslim.bench import benchmark

    return on_main(lambda: benchmark([("original", original), ("compressed", compressed)], batch_size=batch_size, runs=runs,
                                     device=device, progress=False)[1].ratio)


def _split(speedup: float, pruning: bool, token_speedup: float | None, channel_ratio: float | None) -> tuple[float, float | None]:
    if not pruning:
        if channel_ratio is not None:
            raise ParameterError("channel_ratio", "needs gate training: give gate_training (or drop channel_ratio for training-free ATME)")
        return token_speedup or speedup, None
    if token_speedup is None:
        token_speedup = speedup ** TOKEN_SHARE if channel_ratio is None else speedup * channel_ratio
    if channel_ratio is None:
        channel_ratio = token_speedup / speedup
    if token_speedup < 1 or not 0 < channel_ratio <= 1:
        raise VitslimError(f"token speed-up {token_speedup:g} and channel FLOPs ratio {channel_ratio:g} cannot give {speedup:g}x")
    return token_speedup, channel_ratio


def compress_cait(
    model: nn.Module,
    batches: Iterable | None = None,
    *,
    speedup: float,
    gate_training: Training | None = None,
    merge: str = "atme",
    token_speedup: float | None = None,
    channel_ratio: float | None = None,
    concentration: float | None = None,
    calib_images: int = CHOICE_IMAGES,
    consistent: bool = True,
    gate_lr_scale: float = 100.0,
    seed: int = 0,
    device: str = "cpu",
    measure: bool = True,
    progress: bool = True,
) -> nn.Module:
    """A CAIT-compressed copy of ``model`` (the original is left untouched) aiming at ``speedup``
    times its throughput.

    ``batches`` are the training images (a Dataset of (image, label) or an iterable of image
    batches, as ``vitslim.distill`` takes them): the gate training's when ``gate_training`` is
    given and, in every case, ``calib_images`` of them (a seeded subset of a Dataset, drawn from
    ``seed``, else the leading batches) choose the merge schedule's ``concentration`` (see
    ``cait.shape``; without images, or when ``concentration`` is given, no choice is made and it
    defaults to 1). ``merge`` picks ATME or the ToMe baseline. With ``gate_training`` the
    channels are pruned too (CDCP): ``channel_ratio`` is the fraction of the blocks' FLOPs the
    gates may keep; ``consistent=False`` trains per-head masks (the ablation without CDCP's
    consistency constraints); the gates learn at ``gate_training.lr`` times ``gate_lr_scale``
    (they must travel far in a few epochs). With ``measure`` the result is timed against the
    original (on ``device``, batch 32) and the merge schedule tightened, at most a few times,
    until the measured speed-up reaches the target (so that it still shows at least 95% of it
    when timed again).
    """
    if not speedup > 1:
        raise ParameterError("speedup", f"must be greater than 1 (a speed-up of the original), got {speedup:g}")
    if getattr(model, MERGING_ATTR, None) is not None:
        raise VitslimError("the model already merges tokens; compress the original model")
    pruning = gate_training is not None and gate_training.epochs > 0
    if pruning and batches is None:
        raise VitslimError("channel pruning trains with distillation: pass the training images as batches")
    token_target, channel_target = _split(speedup, pruning, token_speedup, channel_ratio)
    if isinstance(batches, Iterator):
        batches = list(batches)  # read twice: once to choose the schedule, once to distil
    student = copy.deepcopy(model).eval()
    schedule, planning = None, {"concentration": 1.0 if concentration is None else concentration}
    if token_target > 1:
        schedule, planning = planned_schedule(student, merge, token_target, None if batches is None else choice_batches(batches, calib_images, seed),
                                              concentration=concentration, images=calib_images, progress=progress)

    if channel_target is not None:
        prune_channels(student, model, batches, gate_training, channel_ratio=channel_target, schedule=schedule, consistent=consistent,
                       gate_lr_scale=gate_lr_scale)
    reference = describe(model)
    if schedule is not None:
        apply_token_merging(student, schedule)
    if measure:
        meet_speedup(model, student, reference, merge, speedup, schedule, device, concentration=planning["concentration"])
    if find_step(student, MERGING_STEP) is not None:  # after meet_speedup, which may record the step anew
        update_step(student, MERGING_STEP, planning)
    return student


def prune_channels(student: nn.Module, teacher: nn.Module, batches, training: Training, *, channel_ratio: float, schedule,
                   consistent: bool = True, gate_lr_scale: float = 100.0) -> None:
    """CDCP on ``student`` in place: gates trained with distillation from ``teacher`` towards
    ``channel_ratio`` of the blocks' FLOPs (counted at the token counts ``schedule`` leaves, with
    the schedule in place during training, so the gates learn for the model that will run), then
    frozen and sliced. Both models end on the CPU in eval mode."""
    spec = describe(student)
    gates = attach_gates(student, consistent=consistent, lr_scale=gate_lr_scale)
    tokens = tokens_per_block(schedule, spec)
    with token_merging(student, schedule):
        distill(student, teacher, batches, training, extra_loss=lambda _: gates.budget_penalty(channel_ratio, tokens=tokens))
    slice_channels(student, gates)
    student.to("cpu").eval()
    teacher.to("cpu")


def meet_speedup(model, student, reference, merge, speedup, schedule, device, *, concentration: float = 1.0) -> float:
    """Merge more (keeping the schedule's ``concentration``) until the measured speed-up reaches
    ``AIM`` of the target; return the last measurement."""
    measured = measured_speedup(model, student, device=device)
    for _ in range(MEASURE_ROUNDS):
        if measured >= AIM * speedup:
            break
        if schedule is not None:
            remove_token_merging(student)
        spec = describe(student)
        predicted = predicted_speedup(spec, schedule, reference)
        try:
            tighter = schedule_for_speedup(spec, merge, predicted * min(speedup / measured, MAX_STEP), reference=reference,
                                           concentration=concentration)
        except VitslimError:  # beyond what the plans reach: merge all they can, if that is more
            strongest = strongest_schedule(spec, merge, concentration)
            tighter = strongest if predicted_speedup(spec, strongest, reference) > predicted else schedule
        if tighter == schedule:
            if schedule is not None:
                apply_token_merging(student, schedule)
            logger.warning("measured %.2fx against a %.2fx target, and merging cannot go further", measured, speedup)
            break
        schedule = tighter
        apply_token_merging(student, schedule)
        measured = measured_speedup(model, student, device=device)
    if measured < PROMISE * speedup:
        logger.warning("measured speed-up %.2fx is below the %.2fx target", measured, speedup)
    if find_step(student, MERGING_STEP) is not None:
        update_step(student, MERGING_STEP, {"measured_speedup": round(measured, 3)})
    return measured
