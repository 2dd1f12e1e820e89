"""Layer-wise error compensation: refit each factorised layer to what the compressed prefix feeds it.

**Stated** (arXiv 2402.06004): a layer-wise step refines the approximation with the gradient of
each layer's output loss.

**Our reading**, and one deliberate deviation. Layers are processed in execution order; layer l
sees inputs X̃ produced by the already-compressed prefix, while its target stays the original
output Y = X Wᵀ on the original inputs X. The layer loss ‖Y − X̃ Ŵᵀ‖² over rank-r Ŵ is a
reduced-rank regression with an exact solution: with G̃ = X̃ᵀX̃ = L̃ L̃ᵀ and H = XᵀX̃, the
unconstrained minimiser is W_ls = W H G̃⁻¹ and the loss is const + ‖(W_ls − Ŵ) L̃‖², so the best
rank-r Ŵ is the whitened truncation of W_ls. We compute that global minimiser directly instead of
running gradient descent on the same loss from the principal term (which can only approach it),
so the paper's split into a principal and a gradient-trained second term collapses into one pair
of factors of the same total rank.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from tqdm import tqdm

from vitslim.lowrank.calibration import images_of
from vitslim.lowrank.layers import LowRankLinear
from vitslim.lowrank.whitening import DEFAULT_RIDGE, whitened_spectrum, whitening_factor


def compensated_factors(weight: torch.Tensor, cross: torch.Tensor, gram: torch.Tensor, rank: int, ridge: float = DEFAULT_RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) minimising ‖X Wᵀ − X̃ (up·down)ᵀ‖² given H = XᵀX̃ (``cross``) and G̃ = X̃ᵀX̃."""
    factor, inverse = whitening_factor(gram, ridge)
    least_squares = weight.double() @ cross.double() @ inverse.T @ inverse  # W H G̃⁻¹
    return whitened_spectrum(least_squares, gram, ridge).factors(rank)


@torch.no_grad()
def _paired_statistics(original: nn.Module, compressed: nn.Module, name: str, batches: list) -> tuple[torch.Tensor, torch.Tensor]:
    """H = Σ xᵀx̃ and G̃ = Σ x̃ᵀx̃ for one layer, over all calibration tokens."""
    seen: dict[str, torch.Tensor] = {}

    def keep(key: str):
        def hook(module, args):
            seen[key] = args[0].reshape(-1, args[0].shape[-1]).double()

        return hook

    handles = [original.get_submodule(name).register_forward_pre_hook(keep("x")),
               compressed.get_submodule(name).register_forward_pre_hook(keep("x_tilde"))]
    cross = gram = None
    try:
        for batch in batches:
            images = images_of(batch)
            original(images)
            compressed(images)
            x, x_tilde = seen["x"], seen["x_tilde"]
            if cross is None:
                cross = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
                gram = torch.zeros_like(cross)
            cross.addmm_(x.T, x_tilde)
            gram.addmm_(x_tilde.T, x_tilde)
    finally:
        for handle in handles:
            handle.remove()
    return cross, gram


@torch.no_grad()
def compensate(original: nn.Module, compressed: nn.Module, names: list[str], batches: Iterable, *, progress: bool = True) -> None:
    """Refit the factorised layers ``names`` of ``compressed`` in place, in the given (execution) order."""
    batches = list(batches)
    original.eval()
    compressed.eval()
    for name in tqdm(names, desc="compensating layers", unit="layer", disable=None if progress else True, leave=False):
        layer: LowRankLinear = compressed.get_submodule(name)
        cross, gram = _paired_statistics(original, compressed, name, batches)
        up, down = compensated_factors(original.get_submodule(name).weight.detach(), cross, gram, layer.rank)
        layer.up.weight.copy_(up.to(layer.up.weight.dtype))
        layer.down.weight.copy_(down.to(layer.down.weight.dtype))
