"""Which Linears int8 should leave in float32, judged by the model's own objective.

Dynamic int8 quantises every Linear's input at run time with one scale per call. A layer whose
inputs carry a few large channels (the outliers ViTs are known for) loses the small ones to the
rounding, and on a dense task that shows first in the thresholded maps (docs/runtimes.md measures
it on dinov2-s14's saliency model). ``plan_int8`` quantises each Linear alone, scores the
model's output against the float model's on calibration images (``measure.objective``: KL for
logits, per-pixel MSE for maps), and leaves in float32 the layers whose own int8 cost stands out
from the rest (more than ``OUTLIER_FACTOR`` times the median layer's), at most ``MAX_FLOAT_SHARE``
of them, most costly first. The fallback is kept only if the model quantised with it scores better
than the model with every Linear in int8: a layer's cost alone does not always add up.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from vitslim._infra.progress import track
from vitslim.adapters import describe
from vitslim.deploy.quantize import check_kind, int8_layers, quantize_int8
from vitslim.io.image_batches import leading_images
from vitslim.measure.objective import mean_divergence

logger = logging.getLogger("vitslim")

OUTLIER_FACTOR = 4.0
MAX_FLOAT_SHARE = 0.125
FALLBACK_IMAGES = 32


@dataclass(frozen=True)
class Int8Plan:
    """The int8 a model should get: its ``kind``, the Linears ``keep_float`` leaves in float32,
    and the objective's divergence from the float model with them (``cost``) and with every
    Linear in int8 (``cost_all``), on the calibration images."""

    kind: str
    keep_float: tuple[str, ...]
    cost: float
    cost_all: float
    layer_costs: dict[str, float]

    def as_dict(self) -> dict:
        return {"kind": self.kind, "keep_float": list(self.keep_float), "cost": round(self.cost, 6), "cost_all": round(self.cost_all, 6)}


def outliers(layer_costs: dict[str, float], *, factor: float = OUTLIER_FACTOR, max_share: float = MAX_FLOAT_SHARE) -> tuple[str, ...]:
    """The layers whose cost exceeds ``factor`` times the median cost, most costly first, at most
    ``max_share`` of all layers (rounded down)."""
    if not layer_costs:
        return ()
    median = statistics.median(layer_costs.values())
    ranked = sorted(layer_costs, key=layer_costs.get, reverse=True)
    chosen = [name for name in ranked if layer_costs[name] > factor * median]
    return tuple(chosen[: int(max_share * len(layer_costs))])


def carried_over(keep_float: Iterable[str], names: Iterable[str]) -> tuple[str, ...]:
    """The Linears among ``names`` (a changed model's) at or under one that ``keep_float`` names
    (the original's): a Linear that low-rank split into factors keeps both factors in float32."""
    kept = tuple(keep_float)
    return tuple(name for name in names if any(name == other or name.startswith(other + ".") for other in kept))


def plan_int8(model: nn.Module, kind: str, calibration: Iterable, *, objective: str = "auto", images: int = FALLBACK_IMAGES,
              progress: bool = True) -> Int8Plan:
    """The int8 of ``kind`` for ``model`` with the float32 fallback described in the module
    docstring, judged on the first ``images`` calibration images."""
    check_kind(kind)
    batches = leading_images(calibration, images, next(model.parameters()).device)
    spec = describe(model)
    with torch.no_grad():
        teacher = [spec.output(batch) for batch in batches]

    def cost(keep_float: Iterable[str]) -> float:
        return mean_divergence(describe(quantize_int8(model, kind, keep_float=tuple(keep_float))), teacher, batches, objective)

    every = quantize_int8(model, kind)  # its names are the ones keep_float takes (attention a family packs is unpacked first)
    cost_all = mean_divergence(describe(every), teacher, batches, objective)
    names = list(int8_layers(every))
    layer_costs = {name: cost(other for other in names if other != name)
                   for name in track(names, "int8: scoring each layer", unit="layer", show=progress)}
    keep_float = outliers(layer_costs)
    with_fallback = cost(keep_float) if keep_float else cost_all
    if keep_float and with_fallback >= cost_all:
        logger.info("int8: leaving %s in float32 would not lower the objective (%.4g against %.4g): every Linear is quantised",
                    ", ".join(keep_float), with_fallback, cost_all)
        keep_float, with_fallback = (), cost_all
    elif keep_float:
        logger.info("int8: %s left in float32 (their int8 costs %s; median layer %.3g); the objective %.4g instead of %.4g",
                    ", ".join(keep_float), ", ".join(f"{layer_costs[name]:.3g}" for name in keep_float),
                    statistics.median(layer_costs.values()), with_fallback, cost_all)
    return Int8Plan(kind, keep_float, with_fallback, cost_all, layer_costs)
