"""Per-layer sensitivity: how much a unit of output error in each layer costs the model.

**Our reading** of "optionally weighted by a per-layer sensitivity" (DESIGN.md §1.1.3): a second
order (diagonal Fisher) estimate of the loss increase caused by an output perturbation δY of
layer l is ½ · F_l · ‖δY‖², with F_l the mean squared gradient of the loss per output element.
The whitened error curve gives ‖δY‖² exactly, so F_l · σ²_i is the loss a component removes.
The loss is the cross-entropy against the model's own top-1 prediction: it needs no labels, so
any calibration images serve, and its gradient is not zero at the original weights (unlike the
KL to the original model).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from vitslim.adapters import describe
from vitslim.lowrank.calibration import images_of


def fisher_sensitivity(model: nn.Module, linears: dict[str, nn.Linear], batches: Iterable, *, progress: bool = True) -> dict[str, float]:
    """Mean squared gradient of the pseudo-label loss per output element of each named Linear."""
    spec = describe(model)
    sums = {name: 0.0 for name in linears}
    elements = {name: 0 for name in linears}
    handles = []

    def watch(name: str):
        def on_output(module, args, output):
            if output.requires_grad:
                output.register_hook(lambda grad: _add(name, grad))

        return on_output

    def _add(name: str, grad: torch.Tensor) -> None:
        sums[name] += float(grad.double().square().sum())
        elements[name] += grad.numel()

    for name, layer in linears.items():
        handles.append(layer.register_forward_hook(watch(name)))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in tqdm(batches, desc="measuring layer sensitivity", unit="batch", disable=None if progress else True, leave=False):
            # gradients must reach the activations even when the user froze the parameters
            images = images_of(batch).to(device).requires_grad_(True)
            with torch.enable_grad():
                logits = spec.logits(images)
                F.cross_entropy(logits, logits.argmax(1).detach(), reduction="sum").backward()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {name: sums[name] / max(elements[name], 1) for name in linears}
