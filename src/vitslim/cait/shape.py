"""Choosing how front-loaded a merge schedule is, on the user's own images.

The planner shares the merged tokens among blocks with weights ``(depth-1-i) ** concentration``.
Concentration 1 was the best single rule at moderate targets, but at high ones putting more of
the merging in the first blocks does better, and by a margin: on vit-d6-cifar10 at 2.4x by the
FLOPs model, concentration 4 (chosen on train images) kept both methods' logits clearly closer to
the unmerged model's on the test split, while at 1.3x to 1.6x concentration 1 stayed best for
both (benchmarks/results/cait/shape.md). A dense output can want the opposite: on dinov2-s14's
saliency map at 1.5x an even spread (0) kept the maps closest for both methods
(benchmarks/results/dinov2/atme-dense.md). Where the turn comes depends on the model, its task and
the target, so with calibration images at hand each candidate is planned for the same target and
the one whose output stays closest to the unmerged model's (the model's objective: KL for logits,
MSE for maps and features, ``vitslim.measure.objective``) is kept. Every candidate reaches the same
predicted speed-up, so the choice trades no speed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sized

import torch
from torch import nn
from torch.utils.data import Dataset

from vitslim._infra.distributed import on_main
from vitslim._infra.progress import track
from vitslim.adapters import describe
from vitslim.cait.patch import token_merging
from vitslim.cait.schedule import MergeSchedule, schedule_for_speedup
from vitslim.errors import VitslimError
from vitslim.io import image_batches
from vitslim.io.image_batches import leading_images
from vitslim.measure.objective import mean_divergence

logger = logging.getLogger("vitslim")

CONCENTRATIONS = (1.0, 2.0, 4.0, 0.0)  # 0 last: ties keep the earlier, front-loaded choices
CHOICE_IMAGES = 256
# The lattice reading's first sub-grid level: 1 (every other column merges) was best on vit-d6-cifar10's 8x8 grid;
# on dinov2-s14's 16x16 saliency maps, 2 (three tokens in four may merge) kept them far closer
# (benchmarks/results/dinov2/atme-dense.md), so the calibration images choose
FIRST_LEVELS = (1, 2)


def choice_batches(batches, count: int, seed: int) -> Iterable:
    """What the schedule is chosen on: a seeded subset of a Dataset (an ImageFolder lists its
    images class by class, so its first images would be one class), else the batches as given."""
    if isinstance(batches, Dataset) and isinstance(batches, Sized):
        return image_batches.make_loader(image_batches.select(batches, limit=min(count, len(batches)), seed=seed), 64)
    return batches


class _Scorer:
    """Mean ``objective`` distance between ``model`` merging on a schedule (in the ``dense`` mode,
    ``cait.patch``) and its unmerged self, on the first ``images`` calibration images; each
    schedule scored once."""

    def __init__(self, model: nn.Module, calibration: Iterable, images: int, *, dense: bool | None = None, objective: str = "auto") -> None:
        self.model, self.spec, self.dense, self.objective = model, describe(model), dense, objective
        self.batches = leading_images(calibration, images, next(model.parameters()).device)
        if not self.batches:
            raise VitslimError("the calibration data holds no images to choose the merge schedule on")
        with torch.no_grad():
            self.teacher_outputs = [self.spec.output(batch) for batch in self.batches]
        self.scored: dict[MergeSchedule, float] = {}

    def __call__(self, schedule: MergeSchedule) -> float:
        if schedule not in self.scored:
            with token_merging(self.model, schedule, dense=self.dense):
                self.scored[schedule] = mean_divergence(self.spec, self.teacher_outputs, self.batches, self.objective)
        return self.scored[schedule]


def choose_concentration(model: nn.Module, merge: str, speedup: float, calibration: Iterable, *,
                         candidates: tuple[float, ...] = CONCENTRATIONS, images: int = CHOICE_IMAGES,
                         progress: bool = True, first_level: int = 1, scorer: _Scorer | None = None) -> tuple[float, dict[float, float]]:
    """The candidate concentration whose schedule for ``speedup`` keeps ``model``'s output closest
    (mean objective: KL for logits) to its unmerged one on the first ``images`` calibration images,
    and every candidate's score. Ties go to the earlier candidate; candidates that plan the same
    schedule share one score. ``model`` must not be merging tokens; it is left as it was."""
    if not candidates:
        raise VitslimError("choosing a merge schedule's concentration needs at least one candidate")
    scorer = scorer or _Scorer(model, calibration, images)
    scores = {concentration: scorer(schedule_for_speedup(scorer.spec, merge, speedup, concentration=concentration, first_level=first_level))
              for concentration in track(candidates, "merge schedule shapes", unit="shape", show=progress)}
    best = min(candidates, key=lambda concentration: (scores[concentration], candidates.index(concentration)))
    logger.info("merge schedule concentration %g chosen (score on %d images: %s)", best, sum(len(b) for b in scorer.batches),
                ", ".join(f"{c:g}: {kl:.4f}" for c, kl in scores.items()))
    return best, scores


def choose_shape(model: nn.Module, merge: str, speedup: float, calibration: Iterable, *, images: int = CHOICE_IMAGES,
                 progress: bool = True, dense: bool | None = None, objective: str = "auto") -> tuple[float, int, dict]:
    """The concentration (``choose_concentration``) and, for the lattice reading, then the first sub-grid level
    (``FIRST_LEVELS``, at that concentration) whose schedule keeps the output closest; and the
    recipe fields recording every score. ``dense`` and ``objective`` are how candidates run and are
    judged (``_Scorer``)."""
    scorer = _Scorer(model, calibration, images, dense=dense, objective=objective)
    concentration, scores = choose_concentration(model, merge, speedup, calibration, images=images, progress=progress, scorer=scorer)
    fields = {"concentration_kl": {f"{c:g}": round(score, 6) for c, score in scores.items()}}
    if merge != "atme-lattice":
        return concentration, 1, fields
    levels = {level: scorer(schedule_for_speedup(scorer.spec, merge, speedup, concentration=concentration, first_level=level))
              for level in FIRST_LEVELS}
    first_level = min(FIRST_LEVELS, key=lambda level: (levels[level], FIRST_LEVELS.index(level)))
    fields["first_level_score"] = {str(level): round(score, 6) for level, score in levels.items()}
    return concentration, first_level, fields


def planned_schedule(model: nn.Module, merge: str, speedup: float, calibration: Iterable | None, *, concentration: float | None = None,
                     images: int = CHOICE_IMAGES, progress: bool = True, dense: bool | None = None,
                     objective: str = "auto") -> tuple[MergeSchedule, dict]:
    """The schedule for ``speedup``: at ``concentration`` (and the lattice's first level 1) when given,
    else at the shape chosen on ``calibration`` (concentration 1 without images); and the recipe
    fields that record how it was planned. Under ``torchrun`` rank 0 chooses and the others take
    its choice, so every rank merges alike."""
    fields, first_level = {}, 1
    if concentration is None and calibration is not None:
        concentration, first_level, fields = on_main(lambda: choose_shape(model, merge, speedup, calibration, images=images, progress=progress,
                                                                          dense=dense, objective=objective))
    concentration = 1.0 if concentration is None else concentration
    schedule = schedule_for_speedup(describe(model), merge, speedup, concentration=concentration, first_level=first_level)
    return schedule, {"concentration": concentration, "first_level": first_level, **fields}
