"""Choosing how front-loaded a merge schedule is, on the user's own images.

The planner shares the merged tokens among blocks with weights ``(depth-1-i) ** concentration``.
Concentration 1 was the best single rule at moderate targets, but at high ones putting more of
the merging in the first blocks does better, and by a margin: on vit-d6-cifar10 at 2.4x by the
FLOPs model, concentration 4 (chosen on train images) kept both methods' logits clearly closer to
the unmerged model's on the test split, while at 1.3x to 1.6x concentration 1 stayed best for
both (benchmarks/results/cait/shape.md). Where the turn comes depends on the model and the
target, so with calibration images at hand each candidate is planned for the same target and
the one whose logits stay closest to the unmerged model's (mean KL) is kept. Every candidate
reaches the same predicted speed-up, so the choice trades no speed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sized

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from vitslim import data as imagedata
from vitslim.adapters import describe
from vitslim.cait.patch import token_merging
from vitslim.cait.schedule import MergeSchedule, schedule_for_speedup
from vitslim.distributed import on_main
from vitslim.errors import VitslimError
from vitslim.lowrank.calibration import leading_images
from vitslim.objective import mean_divergence

logger = logging.getLogger("vitslim")

CONCENTRATIONS = (1.0, 2.0, 4.0)
CHOICE_IMAGES = 256


def choice_batches(batches, count: int, seed: int) -> Iterable:
    """What the schedule is chosen on: a seeded subset of a Dataset (an ImageFolder lists its
    images class by class, so its first images would be one class), else the batches as given."""
    if isinstance(batches, Dataset) and isinstance(batches, Sized):
        return imagedata.make_loader(imagedata.select(batches, limit=min(count, len(batches)), seed=seed), 64)
    return batches


def choose_concentration(model: nn.Module, method: str, speedup: float, calibration: Iterable, *,
                         candidates: tuple[float, ...] = CONCENTRATIONS, images: int = CHOICE_IMAGES,
                         progress: bool = True) -> tuple[float, dict[float, float]]:
    """The candidate concentration whose schedule for ``speedup`` keeps ``model``'s logits closest
    (mean KL) to its unmerged ones on the first ``images`` calibration images, and every
    candidate's KL. Ties go to the earlier candidate; candidates that plan the same schedule
    share one score. ``model`` must not be merging tokens; it is left as it was."""
    if not candidates:
        raise VitslimError("choosing a merge schedule's concentration needs at least one candidate")
    device = next(model.parameters()).device
    batches = leading_images(calibration, images, device)
    if not batches:
        raise VitslimError("the calibration data holds no images to choose the merge schedule on")
    spec = describe(model)
    with torch.no_grad():
        teacher_outputs = [spec.output(batch) for batch in batches]
    scores: dict[float, float] = {}
    scored: dict[MergeSchedule, float] = {}
    for concentration in tqdm(candidates, desc="merge schedule shapes", unit="shape", disable=not progress):
        schedule = schedule_for_speedup(spec, method, speedup, concentration=concentration)
        if schedule not in scored:
            with token_merging(model, schedule):
                scored[schedule] = mean_divergence(spec, teacher_outputs, batches)
        scores[concentration] = scored[schedule]
    best = min(candidates, key=lambda concentration: (scores[concentration], candidates.index(concentration)))
    logger.info("merge schedule concentration %g chosen (KL on %d images: %s)", best, sum(len(b) for b in batches),
                ", ".join(f"{c:g}: {kl:.4f}" for c, kl in scores.items()))
    return best, scores


def planned_schedule(model: nn.Module, method: str, speedup: float, calibration: Iterable | None, *, concentration: float | None = None,
                     images: int = CHOICE_IMAGES, progress: bool = True) -> tuple[MergeSchedule, dict]:
    """The schedule for ``speedup``: at ``concentration`` when given, else at the one chosen on
    ``calibration`` (1 without images); and the recipe fields that record how it was planned.
    Under ``torchrun`` rank 0 chooses and the others take its choice, so every rank merges alike."""
    fields = {}
    if concentration is None and calibration is not None:
        concentration, scores = on_main(lambda: choose_concentration(model, method, speedup, calibration, images=images, progress=progress))
        fields["concentration_kl"] = {f"{c:g}": round(kl, 6) for c, kl in scores.items()}
    concentration = 1.0 if concentration is None else concentration
    return schedule_for_speedup(describe(model), method, speedup, concentration=concentration), {"concentration": concentration, **fields}
