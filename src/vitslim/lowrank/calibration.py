"""Input statistics of every compressible Linear, streamed over calibration images.

Each layer keeps one float64 Gram matrix G = Σ x xᵀ over all tokens it sees (memory O(d_in²)
per layer, independent of the number of images). Each batch's product is formed in the
activations' own precision (float32 matrix products run about twice as fast as float64 on CPU,
and one batch sums only a few thousand tokens) and added to the float64 total.

Forming the products costs about as much as the forward pass itself, so compress_lowrank caps the
tokens its statistics use at about ``STAT_TOKENS`` per layer (``LowRank.statistics_tokens`` sets
another cap): the allocation's Gram matrices come from the first images that hold that many
tokens (``leading_batches``), and compensation, which must replay every image, uses a seeded
random subset of each batch's tokens (``token_rows``), the same positions in both models. The cap
is set by compensation: its refit is a least-squares fit over the layer's
input features, which over-fits the calibration tokens when they are few per feature (fc2 has
4 × the width), so the cap keeps every token of 256 images at ViT-S/B's 197-257 tokens and only
thins out larger token counts (docs/dinov2.md measures 12,288 against all 65,792). When compensation
follows, the allocation's statistics need far fewer: they stop at ``ALLOCATION_TOKENS``
(``LowRank.allocation_tokens``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from vitslim._infra.distributed import all_reduce_sum, owns, sum_numbers
from vitslim._infra.progress import track
from vitslim.errors import VitslimError
from vitslim.io.image_batches import as_batch

STAT_TOKENS = 81_920  # every token of 256 images of up to 320 tokens (patch 14-16 at 224-256 px); 26 per input feature of ViT-B's fc2
# When compensation refits every factorised layer, the allocation's Gram matrices only rank the
# layers' spectra against each other, which a few images' tokens do as well as all of them
# (docs/dinov2.md), and their products were two fifths of the compression time.
ALLOCATION_TOKENS = 12_288


def leading_batches(batches: list, tokens_per_image: int, limit: int | None = None) -> list:
    """The leading images that hold ``limit`` (default ``STAT_TOKENS``) tokens, as batches (all if
    they hold fewer)."""
    taken, wanted = [], -(-(limit or STAT_TOKENS) // tokens_per_image)
    for batch in batches:
        if wanted <= 0:
            break
        images = images_of(batch)[:wanted]
        taken.append(images)
        wanted -= images.shape[0]
    return taken


def token_fraction(batches: list, tokens_per_image: int, limit: int | None = None) -> float:
    """The share of tokens the statistics keep so that at most ``limit`` (default ``STAT_TOKENS``) are used."""
    images = sum(images_of(batch).shape[0] for batch in batches)
    return min(1.0, (limit or STAT_TOKENS) / max(images * tokens_per_image, 1))


def token_rows(rows: torch.Tensor, fraction: float, batch_index: int) -> torch.Tensor:
    """A seeded subset (same for the same batch index) of the rows (tokens) of ``rows``."""
    if fraction >= 1.0:
        return rows
    keep = max(1, round(rows.shape[0] * fraction))
    picked = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(batch_index))[:keep].sort().values
    return rows[picked.to(rows.device)]


@dataclass
class GramStats:
    gram: torch.Tensor  # (d_in, d_in), float64
    tokens: int = 0


def images_of(batch) -> torch.Tensor:
    """The images of one calibration batch, in any form ``vitslim.io.image_batches.as_batch`` accepts."""
    images = as_batch(batch, "a calibration batch").images
    if images is None:
        raise VitslimError("a calibration batch holds no images: every image of it was unreadable")
    return images


@torch.no_grad()
def collect_grams(model: nn.Module, linears: dict[str, nn.Linear], batches: Iterable, *, min_images: int = 1, fraction: float = 1.0,
                  progress: bool = True) -> dict[str, GramStats]:
    """Run ``batches`` through ``model`` and return each named Linear's input Gram matrix over
    ``fraction`` of the tokens (see ``token_rows``). Non-finite activations, or fewer than
    ``min_images`` images, are errors. Under ``torchrun`` each rank runs its share of the batches
    (every rank must be given the same ones) and the sums are all-reduced."""
    stats: dict[str, GramStats] = {}
    handles = []
    device = next(model.parameters()).device
    batch_index = 0

    def hook_for(name: str, layer: nn.Linear):
        def accumulate(module, args):
            flat = args[0].reshape(-1, layer.in_features)
            if not torch.isfinite(flat).all():
                raise VitslimError(f"non-finite (NaN/Inf) activations reach {name}; check the calibration images and the model's weights")
            flat = token_rows(flat, fraction, batch_index)
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
        for index, batch in enumerate(track(batches, "calibrating", unit="batch", show=progress)):
            images = images_of(batch)
            images_seen += images.shape[0]
            if owns(index):
                batch_index = index
                model(images.to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    for entry in stats.values():
        all_reduce_sum(entry.gram)
        entry.tokens = int(sum_numbers(entry.tokens)[0])
    if images_seen < min_images:
        raise VitslimError(f"only {images_seen} calibration images were given; at least {min_images} are needed")
    return stats
