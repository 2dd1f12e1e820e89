"""``compress_cait``: one target speed-up turned into a token schedule and a channel budget.

Without training (``epochs=0``) only tokens are merged (ATME, or ToMe as the baseline). With
``epochs > 0`` the channel gates (CDCP) are trained jointly with knowledge distillation from the
original model while the merge schedule is already in place, then frozen and sliced into a
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
from collections.abc import Iterable, Iterator, Sized

from torch import nn
from torch.utils.data import Dataset

from vitslim.adapters import describe
from vitslim.cait.gates import attach_gates
from vitslim.cait.patch import apply_token_merging, force_token_map, merge_schedule, token_merging
from vitslim.cait.schedule import tokens_per_block
from vitslim.cait.shape import CHOICE_IMAGES, choice_batches, planned_schedule
from vitslim.cait.slicing import slice_channels
from vitslim.cait.speed import meet_speedup
from vitslim.errors import ParameterError, VitslimError
from vitslim.train import Training, distill, schedule_sum

TOKEN_SHARE = 0.5  # of log(speed-up) given to token merging when channels are pruned too
# AdamW moves a gate by about lr × lr_scale per step at the peak rate, and warm-up then cosine
# average about half the peak, so at the default scale gates starting at 3 need some 600 steps at
# lr 1e-4 before any can close: a short distillation (dinov2-s14's 125 steps of 16 images at lr
# 1e-5; benchmarks/dinov2.py) ended with every channel kept. The scale is raised, when the run is
# that short, so that a gate pushed down at every step travels GATE_TRAVEL over the run: as far as
# in the run the default was validated on (one epoch of the CIFAR-10 train split, 782 steps at lr
# 1e-4: 3.92 at scale 100, which that run keeps), so a short run has the same trajectory, scaled.
GATE_INIT = 3.0
GATE_TRAVEL = 1.3 * GATE_INIT


def _split(speedup: float, pruning: bool, token_speedup: float | None, channel_ratio: float | None) -> tuple[float, float | None]:
    # a share of 1 or less would plan no merging (or un-merging) and the result would miss its target silently
    if token_speedup is not None and not (token_speedup > 1 and math.isfinite(token_speedup)):
        raise ParameterError("token_speedup", f"must be greater than 1 (the speed-up token merging is to give), got {token_speedup:g}; "
                                              "to prune channels alone, give channel_ratio instead")
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
    token_map: str = "auto",
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
    when timed again). ``token_map`` "full" makes the merging hand the whole token grid on to the
    model's head (dense mode, for dense heads and patch pooling), "merged" lets the merged tokens
    through (the faster classification mode), "auto" decides from the model (``cait.patch``).
    """
    if not speedup > 1:
        raise ParameterError("speedup", f"must be greater than 1 (a speed-up of the original), got {speedup:g}")
    if merge_schedule(model) is not None:
        raise VitslimError("the model already merges tokens; compress the original model")
    pruning = gate_training is not None and gate_training.epochs > 0
    if pruning and batches is None:
        raise VitslimError("channel pruning trains with distillation: pass the training images as batches")
    token_target, channel_target = _split(speedup, pruning, token_speedup, channel_ratio)
    if isinstance(batches, Iterator):
        batches = list(batches)  # read twice: once to choose the schedule, once to distil
    student = copy.deepcopy(model).eval()
    force_token_map(student, token_map)
    schedule, planning = None, {"concentration": 1.0 if concentration is None else concentration}
    if token_target > 1:
        schedule, planning = planned_schedule(student, merge, token_target, None if batches is None else choice_batches(batches, calib_images, seed),
                                              concentration=concentration, images=calib_images, progress=progress)

    if channel_target is not None:
        prune_channels(student, model, batches, gate_training, channel_ratio=channel_target, schedule=schedule, consistent=consistent,
                       gate_lr_scale=gate_lr_scale)
    if measure:
        schedule, measured = meet_speedup(model, student, merge, speedup, schedule, device, concentration=planning["concentration"],
                                          first_level=planning.get("first_level", 1))
        planning = {"measured_speedup": round(measured, 3), **planning}
    if schedule is not None:  # the one recipe step of the merging, with how it was planned and measured
        apply_token_merging(student, schedule, notes=planning)
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
                   consistent: bool = True, gate_lr_scale: float = 100.0) -> None:
    """CDCP on ``student`` in place: gates trained with distillation from ``teacher`` towards
    ``channel_ratio`` of the blocks' FLOPs (counted at the token counts ``schedule`` leaves, with
    the schedule in place during training, so the gates learn for the model that will run), then
    frozen and sliced. Both models end on the CPU in eval mode. The gates learn at
    ``training.lr`` times ``gate_lr_scale``, or faster when the training is too short for them to
    close at that rate (``GATE_TRAVEL``)."""
    spec = describe(student)
    lr_scale = max(gate_lr_scale, GATE_TRAVEL / (training.lr * schedule_sum(_steps(batches, training))))
    gates = attach_gates(student, consistent=consistent, init=GATE_INIT, lr_scale=lr_scale)
    tokens = tokens_per_block(schedule, spec)
    with token_merging(student, schedule):
        distill(student, teacher, batches, training, extra_loss=lambda _: gates.budget_penalty(channel_ratio, tokens=tokens))
    slice_channels(student, gates)
    student.to("cpu").eval()
    teacher.to("cpu")
