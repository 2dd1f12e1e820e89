"""Per-layer sensitivity: how much a unit of output error in each layer costs the model.

**Our reading** of "optionally weighted by a per-layer sensitivity" (docs/methods-lowrank.md): a second
order (diagonal Fisher) estimate of the loss increase caused by an output perturbation δY of
layer l is ½ · F_l · ‖δY‖², with F_l the mean squared gradient of the loss per output element.
The whitened error curve gives ‖δY‖² exactly, so F_l · σ²_i is the loss a component removes.
For a classifier the loss is the cross-entropy against the model's own top-1 prediction: it needs
no labels, so any calibration images serve, and its gradient is not zero at the original weights
(unlike the KL to the original model). For a model whose output is a map or features, a random
projection of the output plays that part (``Objective.sensitivity_loss``).

One scalar per layer needs far fewer images than the Gram matrices do, and a backward pass costs
about three forward passes, so by default only the first ``FISHER_IMAGES`` calibration images are
used, in chunks of ``CHUNK`` images so the activations kept for the backward pass stay small
(ViT-B at 224 keeps roughly 0.2 GB per image).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from vitslim._infra.distributed import all_reduce_sum, owns, sum_numbers
from vitslim._infra.progress import track
from vitslim.adapters import describe
from vitslim.lowrank.calibration import images_of
from vitslim.measure.objective import objective_for

FISHER_IMAGES = 16
CHUNK = 8


def _chunks(batches: Iterable, limit: int | None):
    """The images of ``batches``, at most ``limit`` of them, in chunks of at most ``CHUNK``."""
    taken = 0
    for batch in batches:
        for chunk in images_of(batch).split(CHUNK):
            if limit is not None and taken >= limit:
                return
            chunk = chunk if limit is None else chunk[: limit - taken]
            taken += chunk.shape[0]
            yield chunk


def fisher_channels(model: nn.Module, linears: dict[str, nn.Linear], batches: Iterable, *, images: int | None = FISHER_IMAGES, progress: bool = True,
                    objective: str = "auto") -> dict[str, torch.Tensor]:
    """Mean squared gradient of the pseudo-label loss for each output channel of each named
    Linear (float64, one value per output feature), over the first ``images`` images of
    ``batches`` (all of them with ``None``), the loss being ``objective``'s (``vitslim.measure.objective``)."""
    spec = describe(model)
    sums = {name: torch.zeros(layer.out_features, dtype=torch.float64) for name, layer in linears.items()}
    rows = {name: 0 for name in linears}
    handles = []

    def watch(name: str):
        def on_output(module, args, output):
            if output.requires_grad:
                output.register_hook(lambda grad: _add(name, grad))

        return on_output

    def _add(name: str, grad: torch.Tensor) -> None:
        flat = grad.detach().reshape(-1, grad.shape[-1])
        sums[name] += flat.double().square().sum(0).cpu()
        rows[name] += flat.shape[0]

    for name, layer in linears.items():
        handles.append(layer.register_forward_hook(watch(name)))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    directions = torch.Generator(device).manual_seed(0)
    try:
        for index, chunk in enumerate(track(_chunks(batches, images), "measuring layer sensitivity", unit="chunk", show=progress)):
            if not owns(index):  # under torchrun: this rank's share, summed over ranks below
                continue
            # gradients must reach the activations even when the user froze the parameters
            chunk = chunk.to(device).requires_grad_(True)
            with torch.enable_grad():
                outputs = spec.output(chunk)
                objective_for(spec, outputs, objective).sensitivity_loss(outputs, directions).backward()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    counts = sum_numbers(*rows.values())
    return {name: all_reduce_sum(sums[name]) / max(count, 1) for name, count in zip(linears, counts)}

