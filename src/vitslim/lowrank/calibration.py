"""Input statistics of every compressible Linear, streamed over calibration images.

Each layer keeps one float64 Gram matrix G = Σ x xᵀ over all tokens it sees (memory O(d_in²)
per layer, independent of the number of images). Each batch's product is formed in the
activations' own precision (float32 matrix products run about twice as fast as float64 on CPU,
and one batch sums only a few thousand tokens) and added to the float64 total.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from vitslim.errors import VitslimError


@dataclass
class GramStats:
    gram: torch.Tensor  # (d_in, d_in), float64
    tokens: int = 0


def images_of(batch) -> torch.Tensor:
    """Accept bare tensors, (images, labels) pairs and vitslim loader triples."""
    images = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(images, torch.Tensor):
        raise VitslimError(f"calibration batches must be image tensors, got {type(images).__name__}")
    return images


@torch.no_grad()
def collect_grams(model: nn.Module, linears: dict[str, nn.Linear], batches: Iterable, *, min_images: int = 1, progress: bool = True) -> dict[str, GramStats]:
    """Run ``batches`` through ``model`` and return each named Linear's input Gram matrix.
    Non-finite activations, or fewer than ``min_images`` images, are errors."""
    stats: dict[str, GramStats] = {}
    handles = []
    device = next(model.parameters()).device

    def hook_for(name: str, layer: nn.Linear):
        def accumulate(module, args):
            flat = args[0].reshape(-1, layer.in_features)
            if not torch.isfinite(flat).all():
                raise VitslimError(f"non-finite (NaN/Inf) activations reach {name}; check the calibration images and the model's weights")
            stats[name].gram += (flat.T @ flat).double()
            stats[name].tokens += flat.shape[0]

        return accumulate

    for name, layer in linears.items():
        stats[name] = GramStats(torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64, device=device))
        handles.append(layer.register_forward_pre_hook(hook_for(name, layer)))
    images_seen = 0
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, desc="calibrating", unit="batch", disable=None if progress else True, leave=False):
            images = images_of(batch)
            model(images.to(device))
            images_seen += images.shape[0]
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if images_seen < min_images:
        raise VitslimError(f"only {images_seen} calibration images were given; at least {min_images} are needed")
    return stats
